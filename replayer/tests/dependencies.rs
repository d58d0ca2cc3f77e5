//! The replayer's dependency graph, as `cargo tree` shows it: no server, no model runtime,
//! no tracing SDK. The replayer talks to a server over the proto only (`--model` runs
//! `reflex serve` as a child) and traces through the `reflex_proto::CallTracer` hook its
//! caller fills; a new edge to any of these would quietly put a model runtime and a GPU
//! binding back into a client.

use std::path::Path;
use std::process::Command;

/// Packages that must not be reachable from reflex-replayer (dev-dependencies included).
const FORBIDDEN: &[&str] = &[
    "reflex-server",
    "reflex-engine",
    "opentelemetry_sdk",
    "cudarc",
];

#[test]
fn replayer_links_no_server_engine_or_tracing_sdk() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    // `cargo tree`'s default edges (normal, build, and dev for the package itself), for
    // the host platform; --offline: the lock file pins everything already.
    let out = Command::new(cargo)
        .args(["tree", "--offline", "-p", "reflex-replayer"])
        .args(["--prefix", "none", "--format", "{p}", "--manifest-path"])
        .arg(&manifest)
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        names.contains(&"reflex-proto") && names.contains(&"reflex-recorder"),
        "the tree lists the replayer's own dependencies:\n{text}"
    );
    let bad: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| FORBIDDEN.contains(n) || n.starts_with("tract"))
        .collect();
    assert!(
        bad.is_empty(),
        "reflex-replayer reaches {bad:?} (see `cargo tree -p reflex-replayer -i NAME`)"
    );
}
