//! The images built without a container engine (`hack/image.py`, `make images`) have the Dockerfile's
//! runtime layout: the builder carries out the Dockerfile's own runtime stages, and refuses any
//! instruction it does not know rather than build something different. Needs only Python.
use std::path::Path;
use std::process::Command;

use serde_json::Value;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn image_py(args: &[&str]) -> std::process::Output {
    Command::new("python3").arg(format!("{REPO}/hack/image.py")).args(args).output().expect("running python3")
}

/// The files of an image archive: its index, its image config, and the paths in its one layer.
fn read_archive(path: &Path) -> (Value, Value, Vec<String>) {
    let script = r#"
import gzip, io, json, sys, tarfile
t = tarfile.open(sys.argv[1])
blob = lambda d: t.extractfile("blobs/sha256/" + d.removeprefix("sha256:")).read()
index = json.load(t.extractfile("index.json"))
manifest = json.loads(blob(index["manifests"][0]["digest"]))
config = json.loads(blob(manifest["config"]["digest"]))
layer = tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob(manifest["layers"][0]["digest"]))))
print(json.dumps([index, config, [m.name for m in layer.getmembers()]]))
"#;
    let out = Command::new("python3").args(["-c", script]).arg(path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let files = v[2].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_string()).collect();
    (v[0].clone(), v[1].clone(), files)
}

#[test]
fn each_runtime_stage_of_the_dockerfile_becomes_the_same_image() {
    let dir = tempfile::tempdir().unwrap();
    for bin in ["mesh-operator", "mesh-agent", "rendezvous"] {
        std::fs::write(dir.path().join(bin), format!("#!/bin/false {bin}")).unwrap();
    }
    let context = format!("build={}", dir.path().display());
    let cases =
        [("operator", "mesh-operator", Some("run")), ("agent", "mesh-agent", None), ("rendezvous", "rendezvous", None)];
    for (stage, bin, cmd) in cases {
        let out = dir.path().join(format!("{stage}.tar"));
        let name = format!("mesh.local/{bin}:test");
        let run = image_py(&[
            "dockerfile",
            &format!("{REPO}/Dockerfile"),
            stage,
            &name,
            out.to_str().unwrap(),
            "--context",
            &context,
        ]);
        assert!(run.status.success(), "{stage}: {}", String::from_utf8_lossy(&run.stderr));
        let (index, config, files) = read_archive(&out);
        assert_eq!(index["manifests"][0]["annotations"]["io.containerd.image.name"], name.as_str());
        assert_eq!(files, [bin], "{stage}: the layer holds the one binary");
        let c = &config["config"];
        assert_eq!(c["User"], "65532:65532", "{stage} runs as the unprivileged user");
        assert_eq!(c["Entrypoint"], serde_json::json!([format!("/{bin}")]), "{stage}");
        assert_eq!(c["Cmd"].as_array().map(|a| a[0].as_str().unwrap()), cmd, "{stage}");
        // Reproducible: the same inputs give the same digest.
        let again = dir.path().join(format!("{stage}-again.tar"));
        image_py(&[
            "dockerfile",
            &format!("{REPO}/Dockerfile"),
            stage,
            &name,
            again.to_str().unwrap(),
            "--context",
            &context,
        ]);
        assert_eq!(read_archive(&again).0, index, "{stage}: the same digest twice");
    }
}

#[test]
fn an_instruction_the_builder_does_not_carry_out_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let dockerfile = dir.path().join("Dockerfile");
    std::fs::write(&dockerfile, "FROM scratch AS app\nCOPY --from=build /out/app /app\nRUN echo hi\n").unwrap();
    std::fs::write(dir.path().join("app"), "x").unwrap();
    let context = format!("build={}", dir.path().display());
    let out = dir.path().join("app.tar");
    let run = image_py(&[
        "dockerfile",
        dockerfile.to_str().unwrap(),
        "app",
        "x:y",
        out.to_str().unwrap(),
        "--context",
        &context,
    ]);
    assert!(!run.status.success());
    assert!(
        String::from_utf8_lossy(&run.stderr).contains("RUN is not supported"),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(!out.exists(), "no archive from a stage it could not carry out");
}
