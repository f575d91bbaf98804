fn main() -> std::process::ExitCode {
    mesh_operator::cli::main()
}
