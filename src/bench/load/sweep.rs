//! The sweep: one run per client count (a fresh server for each), the table, the JSON
//! document, and the exit decision (books FAIL or no successful call: an error).

use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::books::BookOutcome;
use super::clients::{Frames, codes};
use super::report::{RunResult, table};
use super::run::{run_managed, run_target};
use super::{CacheMode, LoadBench};

pub async fn run(args: LoadBench) -> anyhow::Result<()> {
    // main's signal handler has no way to reach a bench; Ctrl-C ends the load early here,
    // and the children are still stopped gracefully and the books still checked.
    let interrupt = CancellationToken::new();
    let token = interrupt.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            token.cancel();
        }
    });
    let counts = if args.sweep.is_empty() {
        vec![args.clients]
    } else {
        args.sweep.clone()
    };
    let frames = Arc::new(tokio::task::spawn_blocking(Frames::new).await?);
    let work = tempfile::Builder::new().prefix("reflex-load-").tempdir()?;
    let export = match (&args.target, &args.model) {
        (Some(_), _) => None,
        (None, Some(dir)) => Some(dir.clone()),
        (None, None) => {
            let dir = work.path().join("export");
            reflex_engine::export::write_reference_export(&dir, 0)?;
            Some(dir)
        }
    };
    println!("{}", preamble(&args, counts.len()));
    let mut results = vec![];
    for (i, &k) in counts.iter().enumerate() {
        if interrupt.is_cancelled() {
            break;
        }
        let res = match &export {
            Some(export) => {
                let dir = work.path().join(format!("run{i}-k{k}"));
                run_managed(&args, export, &dir, k, &frames, &interrupt).await
            }
            None => run_target(&args, k, &frames, &interrupt).await,
        };
        let res = res.with_context(|| format!("load run with {k} clients"))?;
        println!("{}", res.describe(&args));
        results.push(res);
    }
    if results.len() > 1 {
        println!("{}", table(&results));
    }
    if let Some(path) = &args.output {
        let doc = serde_json::json!({
            "tool": "reflex bench load",
            "reflex_version": env!("CARGO_PKG_VERSION"),
            "machine": machine(),
            "settings": settings_json(&args),
            "interrupted": interrupt.is_cancelled(),
            "runs": results.iter().map(RunResult::json).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| match &r.books {
            BookOutcome::Fail(why) => Some(format!("{} clients: {why}", r.clients)),
            _ => None,
        })
        .collect();
    anyhow::ensure!(failed.is_empty(), "books FAIL: {}", failed.join("; "));
    if let Some(r) = results.iter().find(|r| r.ok_all == 0) {
        anyhow::bail!(
            "no Act call succeeded with {} clients (errors: {})",
            r.clients,
            codes(&r.server_errors_all)
        );
    }
    anyhow::ensure!(!interrupt.is_cancelled(), "interrupted");
    Ok(())
}

fn preamble(args: &LoadBench, runs: usize) -> String {
    let m = machine();
    let what = match &args.target {
        Some(t) => format!("target {t}"),
        None => format!(
            "{}, a reflex serve child {} recording {} through a reflex recorder child, workers {}, queue {}, cache {}",
            match &args.model {
                Some(d) => format!("model {}", d.display()),
                None => "reference model".into(),
            },
            if args.tcp {
                "on TCP loopback"
            } else {
                "on a Unix socket"
            },
            args.record_images.as_str(),
            args.workers.map_or("default".into(), |w| w.to_string()),
            args.queue_depth
                .map_or("default (32)".into(), |q| q.to_string()),
            match args.cache {
                CacheMode::On =>
                    "on (scene frames: new while the arm moves, repeated while it pauses)",
                CacheMode::Off => "off",
            }
        ),
    };
    format!(
        "reflex bench load: {runs} run(s), {} s measured after {} s warm-up each; {what}; \
         busy back-off {} ms\nmachine: {} CPUs, load average {} at start",
        args.secs,
        args.warmup_secs,
        args.busy_backoff_ms,
        m["cpus"],
        m["loadavg"].as_str().unwrap_or("?"),
    )
}

fn machine() -> serde_json::Value {
    let loadavg = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    serde_json::json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "loadavg": loadavg,
    })
}

fn settings_json(args: &LoadBench) -> serde_json::Value {
    serde_json::json!({
        "secs": args.secs,
        "warmup_secs": args.warmup_secs,
        "target": args.target,
        "model": args.model.as_ref().map(|p| p.display().to_string()),
        "workers": args.workers,
        "queue": args.queue_depth,
        "record_images": args.record_images.as_str(),
        "cache": matches!(args.cache, CacheMode::On),
        "transport": if args.tcp { "tcp" } else { "unix" },
        "busy_backoff_ms": args.busy_backoff_ms,
    })
}
