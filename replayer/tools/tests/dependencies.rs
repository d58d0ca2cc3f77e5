//! Where arrow, parquet and mcap may be linked: in the trace tools only. The server, the
//! recorder and the replayer stay as small as they were (a robot's server has no use for a
//! columnar writer), and the trace tools link no server or model runtime.

use std::path::Path;
use std::process::Command;

/// `cargo tree -p PACKAGE` (normal, build and its own dev edges) as package names.
fn tree(package: &str) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
    let out = Command::new(cargo)
        .args(["tree", "--offline", "-p", package])
        .args(["--prefix", "none", "--format", "{p}", "--manifest-path"])
        .arg(&manifest)
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect()
}

#[test]
fn columnar_and_mcap_writers_stay_in_the_trace_tools() {
    for package in ["reflex-server", "reflex-recorder", "reflex-replayer"] {
        let names = tree(package);
        for forbidden in ["parquet", "arrow-array", "mcap"] {
            assert!(
                !names.iter().any(|n| n == forbidden),
                "{package} reaches {forbidden}"
            );
        }
    }
    let names = tree("reflex-tracetools");
    for forbidden in ["reflex-server", "reflex-engine", "tract-onnx", "cudarc"] {
        assert!(
            !names.iter().any(|n| n == forbidden),
            "reflex-tracetools reaches {forbidden}"
        );
    }
    assert!(names.iter().any(|n| n == "parquet") && names.iter().any(|n| n == "mcap"));
}
