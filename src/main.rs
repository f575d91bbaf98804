/// mimalloc: a fleet-sized reconcile allocates and frees many small strings, and glibc's allocator both
/// spends a third of the decide step consolidating them and keeps the freed memory from the OS.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    mesh_operator::cli::main()
}
