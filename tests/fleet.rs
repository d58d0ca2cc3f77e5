//! `reflex fleet index|query` end to end: real `reflex serve` processes record through their
//! real recorders (two robots, two models, several sessions, some failing calls), `reflex
//! ship --once` puts the traces in a real S3-compatible server (s3s-fs), `reflex fleet index`
//! builds the dataset from the bucket (into a folder and into the bucket), and every built-in
//! report from `reflex fleet query` is checked three ways: against the traces themselves,
//! between the folder and the `s3://` dataset, and against DuckDB running the same SQL
//! (`--print-sql duckdb`) over the same Parquet files.

mod util;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use util::s3::{self, S3Server};
use util::*;

const REPORTS: [&str; 5] = ["summary", "latency", "cache", "errors", "drift"];

fn run_bounded(cmd: &mut Command) -> Output {
    run_bounded_for(cmd, Duration::from_secs(120))
}

fn text(o: &Output) -> String {
    output_text(o)
}

/// The world: exports A and B, the S3 server, and per robot a recorder folder.
struct Fleet {
    dir: tempfile::TempDir,
    s3: S3Server,
    exports: [PathBuf; 2],
}

impl Fleet {
    fn new() -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let exports = [dir.path().join("export-a"), dir.path().join("export-b")];
        export(&exports[0], 7);
        export(&exports[1], 8);
        let s3 = S3Server::start(&dir.path().join("s3"));
        Fleet { dir, s3, exports }
    }

    fn traces(&self, robot: &str) -> PathBuf {
        self.dir.path().join("robots").join(robot)
    }

    /// One session of `robot` on model `model` (0 = A, 1 = B): a real server recording
    /// through its own recorder, `calls` Acts over episodes of 5 chunks, every 7th call
    /// malformed (a recorded `invalid-argument`), the same noise seeds for the same call
    /// numbers so that A and B answer the same episodes.
    async fn session(&self, robot: &str, model: usize, calls: u32) {
        let run = self.dir.path().join(format!("run-{robot}-{model}-{calls}"));
        std::fs::create_dir_all(&run).unwrap();
        let traces = self.traces(robot);
        let (server, sock) = serve(
            &run,
            &self.exports[model],
            &["--record", traces.to_str().unwrap()],
        )
        .await;
        let mut c = policy_client(&format!("unix://{}", sock.display())).await;
        for i in 0..calls {
            let mut req = act_request((i % 3) as u8, Some(1000 + u64::from(i)));
            req.episode_id = format!("ep-{robot}-{}", i / 5);
            if i % 7 == 6 {
                req.state.truncate(3);
            }
            let _ = timeout(c.act(req)).await;
        }
        stop_cleanly(server);
    }

    fn reflex(&self, args: &[&str]) -> Output {
        run_bounded(
            Command::new(BIN)
                .args(args)
                .env("RUST_LOG", "info")
                .env("AWS_ACCESS_KEY_ID", s3::ACCESS_KEY)
                .env("AWS_SECRET_ACCESS_KEY", s3::SECRET_KEY)
                .env("AWS_ENDPOINT_URL", self.s3.endpoint())
                .env("HOME", self.dir.path()),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.reflex(args);
        assert!(o.status.success(), "reflex {args:?}: {}", text(&o));
        String::from_utf8(o.stdout).unwrap()
    }

    fn ship(&self, robot: &str) {
        self.ok(&[
            "ship",
            "--dir",
            self.traces(robot).to_str().unwrap(),
            "--to",
            &format!("s3://{}/traces", s3::BUCKET),
            "--robot",
            robot,
            "--once",
        ]);
    }

    fn query_json(&self, dataset: &str, args: &[&str]) -> Vec<serde_json::Value> {
        let mut all = vec!["fleet", "query", dataset, "--format", "json"];
        all.extend_from_slice(args);
        let out = self.ok(&all);
        serde_json::from_str::<serde_json::Value>(&out)
            .unwrap_or_else(|e| panic!("{e}: {out}"))
            .as_array()
            .unwrap()
            .clone()
    }
}

/// Every Parquet file of a dataset folder → (size, mtime).
fn dataset_files(root: &Path) -> BTreeMap<String, (u64, std::time::SystemTime)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let m = e.metadata().unwrap();
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, (m.len(), m.modified().unwrap()));
            }
        }
    }
    out
}

/// What the traces of a robot folder say: (model_hash, robot) → (acts, errors, hits, misses).
fn truth(fleet: &Fleet, robots: &[&str]) -> BTreeMap<(String, String), (u64, u64, u64, u64)> {
    let mut out = BTreeMap::new();
    for robot in robots {
        for f in trace_files(&fleet.traces(robot)) {
            let lines = trace_lines(&f);
            let model = lines[0]["model_hash"].as_str().unwrap().to_string();
            let e = out
                .entry((model, robot.to_string()))
                .or_insert((0, 0, 0, 0));
            for l in lines.iter().filter(|l| l["kind"] == "request") {
                e.0 += 1;
                if !l["error"].is_null() {
                    e.1 += 1;
                }
                match l["cache"]["status"].as_str() {
                    Some("hit") => e.2 += 1,
                    Some("miss") => e.3 += 1,
                    _ => {}
                }
            }
        }
    }
    out
}

/// DuckDB (Python) running `sql` over the dataset folder as the view `acts`; rows as JSON.
fn duckdb(dataset: &Path, sql: &str) -> Vec<serde_json::Value> {
    let script = r#"
import json, sys, duckdb
dataset, sql = sys.argv[1], sys.stdin.read()
con = duckdb.connect()
con.execute(f"CREATE VIEW acts AS SELECT * FROM read_parquet('{dataset}/**/*.parquet', hive_partitioning = true, hive_types_autocast = false)")
cur = con.execute(sql)
cols = [d[0] for d in cur.description]
print(json.dumps([dict(zip(cols, [v if isinstance(v, (int, float, str, type(None))) else str(v) for v in row])) for row in cur.fetchall()]))
"#;
    let mut child = Command::new("python3")
        .args(["-c", script, dataset.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(sql.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "DuckDB failed (run deploy/ci-setup.sh if the module is missing): {}\n{sql}",
        text(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Two result sets equal row by row: same columns, strings and integers equal, floats within
/// a relative 1e-6 (the engines' percentile interpolation differs in its last digits: 6.40319942
/// vs 6.4032 seen) and 1e-5 for the drift distances, which they sum in different orders.
fn assert_same_rows(what: &str, a: &[serde_json::Value], b: &[serde_json::Value]) {
    assert_eq!(a.len(), b.len(), "{what}: row counts\n{a:#?}\n{b:#?}");
    for (ra, rb) in a.iter().zip(b) {
        let (oa, ob) = (ra.as_object().unwrap(), rb.as_object().unwrap());
        let ka: Vec<_> = oa.keys().collect();
        let kb: Vec<_> = ob.keys().collect();
        assert_eq!(ka, kb, "{what}: columns");
        for (k, va) in oa {
            let vb = &ob[k];
            match (va.as_f64(), vb.as_f64()) {
                (Some(x), Some(y)) => {
                    let tol = if what.contains("drift") { 1e-5 } else { 1e-6 };
                    assert!(
                        (x - y).abs() <= tol * x.abs().max(y.abs()).max(1.0),
                        "{what}: {k}: {x} vs {y}\n{ra}\n{rb}"
                    );
                }
                _ => assert_eq!(va, vb, "{what}: {k}\n{ra}\n{rb}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn index_from_a_bucket_and_every_report_agrees_with_the_traces_and_with_duckdb() {
    let fleet = Fleet::new();
    // r1 runs model A, then switches to model B and sees the same episodes (an A/B rollout);
    // r2 runs model A in two sessions.
    fleet.session("r1", 0, 24).await;
    fleet.session("r1", 1, 24).await;
    fleet.session("r2", 0, 15).await;
    fleet.session("r2", 0, 10).await;
    fleet.ship("r1");
    fleet.ship("r2");
    let files: usize = ["r1", "r2"]
        .iter()
        .map(|r| trace_files(&fleet.traces(r)).len())
        .sum();
    assert_eq!(files, 4);

    // From the bucket into a folder, and into the bucket.
    let local = fleet.dir.path().join("dataset");
    let src = format!("s3://{}/traces", s3::BUCKET);
    let remote = format!("s3://{}/dataset", s3::BUCKET);
    let line = fleet.ok(&["fleet", "index", &src, "--to", local.to_str().unwrap()]);
    assert!(
        line.contains("indexed 4 new trace file(s): 73 rows"),
        "{line}"
    );
    let line = fleet.ok(&["fleet", "index", &src, "--to", &remote]);
    assert!(line.contains("indexed 4 new trace file(s)"), "{line}");
    let objects = s3::objects(&s3::bucket(&fleet.s3.endpoint()), "dataset").await;
    assert_eq!(objects.len(), 4, "{objects:?}");
    for k in objects.keys() {
        assert!(
            k.starts_with("dataset/robot=r") && k.contains("/date=") && k.contains("/model="),
            "{k}"
        );
    }

    // Idempotent: nothing read or written again.
    let before = dataset_files(&local);
    let line = fleet.ok(&["fleet", "index", &src, "--to", local.to_str().unwrap()]);
    assert!(
        line.contains("indexed 0 new") && line.contains("4 already indexed"),
        "{line}"
    );
    assert_eq!(dataset_files(&local), before);

    // Ground truth from the traces themselves.
    let truth = truth(&fleet, &["r1", "r2"]);
    let summary = fleet.query_json(local.to_str().unwrap(), &["--report", "summary"]);
    assert_eq!(summary.len(), truth.len(), "{summary:#?}");
    for row in &summary {
        let key = (
            row["model_hash"].as_str().unwrap().to_string(),
            row["robot"].as_str().unwrap().to_string(),
        );
        let (acts, errors, hits, misses) = truth[&key];
        assert_eq!(row["acts"], acts, "{row}");
        let rate = row["error_rate"].as_f64().unwrap();
        assert!((rate - errors as f64 / acts as f64).abs() < 1e-12, "{row}");
        assert!(errors > 0, "the malformed calls were recorded as errors");
        let hit_rate = row["cache_hit_rate"].as_f64().unwrap();
        assert!(
            (hit_rate - hits as f64 / (hits + misses) as f64).abs() < 1e-12,
            "{row}"
        );
    }
    let model_a = summary.iter().find(|r| r["robot"] == "r2").unwrap()["model_hash"]
        .as_str()
        .unwrap()
        .to_string();
    let model_b = summary
        .iter()
        .map(|r| r["model_hash"].as_str().unwrap())
        .find(|m| *m != model_a)
        .unwrap()
        .to_string();
    let models = format!("{model_a},{model_b}");

    // Every report: the folder, the bucket and DuckDB agree.
    for report in REPORTS {
        let mut args = vec!["--report", report];
        if report == "drift" {
            args.extend(["--models", &models]);
        }
        let here = fleet.query_json(local.to_str().unwrap(), &args);
        let there = fleet.query_json(&remote, &args);
        assert_same_rows(&format!("{report}: folder vs s3"), &here, &there);
        let mut print = vec![
            "fleet",
            "query",
            local.to_str().unwrap(),
            "--print-sql",
            "duckdb",
        ];
        print.extend_from_slice(&args);
        let sql = fleet.ok(&print);
        let duck = duckdb(&local, &sql);
        assert!(!here.is_empty(), "{report}: no rows");
        assert_same_rows(&format!("{report}: reflex vs DuckDB"), &here, &duck);
    }
    // Drift: r1 answered the same episodes under both models with the same noise seeds:
    // every successful call pairs up, and two different models do differ.
    let drift = fleet.query_json(
        local.to_str().unwrap(),
        &["--report", "drift", "--models", &models],
    );
    assert_eq!(drift.len(), 1, "{drift:#?}");
    assert_eq!(drift[0]["robot"], "r1");
    let (acts, errors, _, _) = truth[&(model_a.clone(), "r1".to_string())];
    assert_eq!(drift[0]["pairs"], acts - errors, "{drift:#?}");
    assert!(drift[0]["l2_mean"].as_f64().unwrap() > 0.0);
    // A model against itself: distance 0.
    let same = fleet.query_json(
        local.to_str().unwrap(),
        &[
            "--report",
            "drift",
            "--models",
            &format!("{model_a},{model_a}"),
        ],
    );
    assert_eq!(same[0]["l2_max"].as_f64().unwrap(), 0.0, "{same:#?}");

    // SQL, csv, date pruning.
    let csv = fleet.ok(&[
        "fleet",
        "query",
        local.to_str().unwrap(),
        "--format",
        "csv",
        "--sql",
        "SELECT robot, count(*) AS n FROM acts GROUP BY robot ORDER BY robot",
    ]);
    let r1: u64 = truth
        .iter()
        .filter(|(k, _)| k.1 == "r1")
        .map(|(_, v)| v.0)
        .sum();
    let r2: u64 = truth
        .iter()
        .filter(|(k, _)| k.1 == "r2")
        .map(|(_, v)| v.0)
        .sum();
    assert_eq!(csv, format!("robot,n\nr1,{r1}\nr2,{r2}\n"));
    let none = fleet.query_json(
        local.to_str().unwrap(),
        &["--report", "summary", "--since", "2999-01-01"],
    );
    assert!(none.is_empty(), "{none:#?}");

    // Incremental: one more session is the only file read.
    fleet.session("r2", 0, 5).await;
    fleet.ship("r2");
    let line = fleet.ok(&["fleet", "index", &src, "--to", local.to_str().unwrap()]);
    assert!(
        line.contains("indexed 1 new trace file(s): 5 rows") && line.contains("4 already indexed"),
        "{line}"
    );
    let after = dataset_files(&local);
    assert_eq!(after.len(), 5);
    for (k, v) in &before {
        assert_eq!(after.get(k), Some(v), "{k} was rewritten");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recorder_folder_is_indexed_with_its_robot_and_bad_input_is_a_clear_error() {
    let fleet = Fleet::new();
    fleet.session("r9", 0, 12).await;
    let traces = fleet.traces("r9");
    let dataset = fleet.dir.path().join("dataset");
    let ds = dataset.to_str().unwrap();

    // No robot=<ID> in the path: --robot is needed, and said so.
    let o = fleet.reflex(&["fleet", "index", traces.to_str().unwrap(), "--to", ds]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--robot"),
        "{}",
        text(&o)
    );

    // A trace still being written (no footer) is left for later; a damaged one is named and
    // the run exits 1; the good one is indexed all the same.
    let good = trace_files(&traces);
    assert_eq!(good.len(), 1);
    let plain = trace_text(&good[0]);
    let lines: Vec<&str> = plain.lines().collect();
    // Open: header and records, no footer.
    std::fs::write(
        traces.join("20990101-000000-open.jsonl"),
        lines[..lines.len() - 1].join("\n") + "\n",
    )
    .unwrap();
    // Damaged: a record in the middle is not JSON.
    let mut damaged: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
    damaged[2] = "{not json".into();
    std::fs::write(
        traces.join("20990101-000001-damaged.jsonl"),
        damaged.join("\n") + "\n",
    )
    .unwrap();
    let o = fleet.reflex(&[
        "fleet",
        "index",
        traces.to_str().unwrap(),
        "--to",
        ds,
        "--robot",
        "r9",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("indexed 1 new trace file(s): 12 rows")
            && out.contains("1 not closed yet")
            && out.contains("1 failed"),
        "{}",
        text(&o)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("slug=\"fleet-index-failed\"") || err.contains("slug=fleet-index-failed"),
        "{err}"
    );
    assert!(
        err.contains("not indexed: 20990101-000001-damaged.jsonl"),
        "{err}"
    );
    let files = dataset_files(&dataset);
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(
        files.keys().next().unwrap().starts_with("robot=r9/date="),
        "{files:?}"
    );
    let rows = fleet.query_json(
        ds,
        &[
            "--sql",
            "SELECT count(*) AS n, min(robot) AS robot FROM acts",
        ],
    );
    assert_eq!(rows[0]["n"], 12);
    assert_eq!(rows[0]["robot"], "r9");

    // Bad SQL, a missing dataset, a dataset inside its source, a hostile --models.
    let o = fleet.reflex(&["fleet", "query", ds, "--sql", "SELECT nope FROM acts"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("nope"),
        "{}",
        text(&o)
    );
    let missing = fleet.dir.path().join("no-such-dataset");
    let o = fleet.reflex(&[
        "fleet",
        "query",
        missing.to_str().unwrap(),
        "--report",
        "summary",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("reflex fleet index"),
        "{}",
        text(&o)
    );
    let inside = traces.join("dataset");
    let o = fleet.reflex(&[
        "fleet",
        "index",
        traces.to_str().unwrap(),
        "--to",
        inside.to_str().unwrap(),
        "--robot",
        "r9",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("must not contain"),
        "{}",
        text(&o)
    );
    let o = fleet.reflex(&[
        "fleet",
        "query",
        ds,
        "--report",
        "drift",
        "--models",
        "a,b' OR 1=1",
    ]);
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
}
