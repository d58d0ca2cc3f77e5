//! One load run at one client count: against a `reflex recorder` and a `reflex serve` this
//! tool starts ([`run_managed`]), or against a `--target` server ([`run_target`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use reflex_proto::v1::{self as pb, policy_client::PolicyClient};
use tokio_util::sync::CancellationToken;

use super::books::{BookOutcome, Books, book_outcome, session_files};
use super::children::{Spawned, stop_foreign, wait_recorder, wait_server};
use super::clients::{Frames, drive};
use super::report::RunResult;
use super::watch::{Rss, RssWatch, proc_status_kib, trace_bytes};
use super::{CacheMode, LoadBench};

// One run against children this tool starts.

pub(super) async fn run_managed(
    args: &LoadBench,
    export: &Path,
    dir: &Path,
    k: u32,
    frames: &Arc<Frames>,
    interrupt: &CancellationToken,
) -> anyhow::Result<RunResult> {
    std::fs::create_dir_all(dir)?;
    let traces = dir.join("traces");
    let rsock = dir.join("recorder.sock");
    let psock = dir.join("policy.sock");
    let me = std::env::current_exe()?;
    let recorder_uri = format!("unix://{}", rsock.display());

    let recorder_args: [&std::ffi::OsStr; 5] = [
        "recorder".as_ref(),
        "--trace-dir".as_ref(),
        traces.as_os_str(),
        "--listen".as_ref(),
        recorder_uri.as_ref(),
    ];
    let mut recorder = Spawned::start("reflex recorder", &me, &recorder_args)?;
    wait_recorder(&recorder_uri, &mut recorder).await?;

    let mut flags: Vec<std::ffi::OsString> = vec![
        "serve".into(),
        export.into(),
        "--listen".into(),
        format!("unix://{}", psock.display()).into(),
        "--recorder".into(),
        recorder_uri.clone().into(),
        "--record-images".into(),
        args.record_images.as_str().into(),
        "--embodiment".into(),
        "load-test".into(),
    ];
    if args.tcp {
        flags.extend(["--listen".into(), "127.0.0.1:0".into()]);
    }
    if let Some(w) = args.workers {
        flags.extend(["--workers".into(), w.to_string().into()]);
    }
    if let Some(q) = args.queue_depth {
        flags.extend(["--queue-depth".into(), q.to_string().into()]);
    }
    if args.cache == CacheMode::Off {
        flags.extend(["--cache-entries".into(), "0".into()]);
    }
    let flag_refs: Vec<&std::ffi::OsStr> = flags.iter().map(|f| f.as_os_str()).collect();
    let mut server = Spawned::start("reflex serve", &me, &flag_refs)?;
    let unix_target = format!("unix://{}", psock.display());
    let info = wait_server(&unix_target, &mut server).await?;
    let target = if args.tcp {
        let line = server.wait_log("listen=tcp://").await?;
        let at = line.find("listen=tcp://").unwrap_or(0) + "listen=tcp://".len();
        line[at..]
            .split_whitespace()
            .next()
            .context("no address after listen=")?
            .to_string()
    } else {
        unix_target
    };

    let pids = [Some(server.pid), Some(recorder.pid)];
    let watch = RssWatch::start(&pids);
    // With --kill-recorder-at: SIGKILL mid-run, then a new recorder on the same socket.
    let killer = async {
        let Some(at) = args.kill_recorder_at else {
            return Ok::<_, anyhow::Error>(());
        };
        tokio::time::sleep(Duration::from_secs_f64(at)).await;
        recorder.kill9().await?;
        eprintln!("load: recorder killed with SIGKILL at {at} s; starting it again");
        recorder = Spawned::start("reflex recorder", &me, &recorder_args)?;
        wait_recorder(&recorder_uri, &mut recorder).await
    };
    let (load, killed) = tokio::join!(drive(&target, k, args, frames, interrupt, pids), killer);
    let load = load?;
    killed.context("killing and restarting the recorder")?;
    // The sampler stops first: a high-water mark read after the last sample is at least
    // every sampled value.
    let sampled = watch.stop().await;
    let hwm = pids.map(|p| p.and_then(|p| proc_status_kib(p, "VmHWM")));

    // SIGTERM, server first: it drains, ends its session (footer), exits; then the recorder
    // closes its files. Both must exit 0.
    let mut problems = vec![];
    let server_exit = server.terminate(Duration::from_secs(30)).await;
    match &server_exit {
        Ok(st) if st.success() => {}
        Ok(st) => problems.push(format!(
            "the server exited with {st} after SIGTERM; its stderr ends:\n{}",
            server.tail()
        )),
        Err(e) => problems.push(format!("{e:#}")),
    }
    match recorder.terminate(Duration::from_secs(30)).await {
        Ok(st) if st.success() => {}
        Ok(st) => problems.push(format!(
            "the recorder exited with {st} after SIGTERM; its stderr ends:\n{}",
            recorder.tail()
        )),
        Err(e) => problems.push(format!("{e:#}")),
    }
    let books = session_files(&traces, &info.session_id).map(|files| {
        let books = Books::check(&files);
        (books, files)
    });
    let outcome = book_outcome(books, &load, true, problems);
    Ok(RunResult::new(
        k,
        args,
        info,
        load,
        [
            Some(Rss {
                hwm_kib: hwm[0],
                sampled_max_kib: sampled[0],
            }),
            Some(Rss {
                hwm_kib: hwm[1],
                sampled_max_kib: sampled[1],
            }),
        ],
        outcome,
        trace_bytes(&traces),
    ))
}

// One run against a server somebody else started.

pub(super) async fn run_target(
    args: &LoadBench,
    k: u32,
    frames: &Arc<Frames>,
    interrupt: &CancellationToken,
) -> anyhow::Result<RunResult> {
    let target = args.target.clone().context("--target is required here")?;
    let mut client = PolicyClient::new(
        reflex_proto::connect(&target)
            .await
            .with_context(|| format!("cannot connect to {target}"))?,
    );
    let info = client
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .with_context(|| format!("GetModelInfo on {target} failed"))?
        .into_inner();
    let pids = [args.server_pid, args.recorder_pid];
    let watch = RssWatch::start(&pids);
    let load = drive(&target, k, args, frames, interrupt, pids).await?;
    // The sampler stops first: a high-water mark read after the last sample is at least
    // every sampled value.
    let sampled = watch.stop().await;
    let hwm = pids.map(|p| p.and_then(|p| proc_status_kib(p, "VmHWM")));
    let rss = [0, 1].map(|i| {
        pids[i].map(|_| Rss {
            hwm_kib: hwm[i],
            sampled_max_kib: sampled[i],
        })
    });
    let (outcome, bytes) = match (&args.trace_dir, args.server_pid) {
        (Some(dir), Some(pid)) => {
            let mut problems = vec![];
            if let Err(e) = stop_foreign(pid, Duration::from_secs(30)).await {
                problems.push(format!("{e:#}"));
            }
            let books = session_files(dir, &info.session_id).map(|files| {
                let books = Books::check(&files);
                (books, files)
            });
            let bytes = books
                .as_ref()
                .map(|(_, f)| f.iter().map(|f| f.bytes).sum())
                .unwrap_or(0);
            (book_outcome(books, &load, false, problems), Some(bytes))
        }
        _ => (
            BookOutcome::Skipped(
                "needs --trace-dir and --server-pid with --target (the server is stopped at the end so its footer is written)"
                    .into(),
            ),
            None,
        ),
    };
    Ok(RunResult::new(k, args, info, load, rss, outcome, bytes))
}
