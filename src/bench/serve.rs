//! `reflex bench` (the default suite): Act latency of the reference model measured side by
//! side in one run — engine-only (the policy called directly), end to end over a Unix socket,
//! and end to end over TCP — interleaved call by call so machine noise hits all three alike.
//! Serving overhead = end-to-end − engine.

use std::sync::Arc;
use std::time::Instant;

use reflex_proto::v1::{self as pb, policy_client::PolicyClient};
use reflex_server::serve::{ListenAddr, ServeArgs};
use reflex_server::service::to_input;
use tokio_util::sync::CancellationToken;

use super::CacheMode;
use crate::latency::{Summary, ms_since};
use crate::scene::{Scene, request};

/// Serving latency (the default suite).
#[derive(Debug, clap::Args)]
pub struct ServeBench {
    /// Measured calls per path (after the warm-up).
    #[arg(long, default_value_t = 300)]
    pub calls: usize,
    /// Warm-up calls per path, not measured.
    #[arg(long, default_value_t = 20)]
    pub warmup: usize,
    /// Prefix cache: on (hit path for repeated frames) or off (the default: every call does
    /// full work). A bare --cache means on.
    #[arg(long, value_name = "on|off", default_value = "off", num_args = 0..=1, default_missing_value = "on")]
    pub cache: CacheMode,
}

pub async fn run(args: ServeBench) -> anyhow::Result<()> {
    let work = tempfile::Builder::new().prefix("reflex-bench-").tempdir()?;
    let export = work.path().join("export");
    reflex_engine::export::write_reference_export(&export, 0)?;
    let socket = work.path().join("policy.sock");
    let stop = CancellationToken::new();
    let serve_args = ServeArgs {
        workers: Some(1),
        cache_entries: if args.cache == CacheMode::On { 1024 } else { 0 },
        ..ServeArgs::new(
            export,
            vec![
                ListenAddr::Unix(socket.clone()),
                "127.0.0.1:0".parse().unwrap(),
            ],
        )
    };
    let running = reflex_server::serve::start(serve_args, stop.clone()).await?;
    let tcp = running
        .listening
        .iter()
        .find_map(|l| match l {
            ListenAddr::Tcp(a) => Some(a.to_string()),
            _ => None,
        })
        .expect("a TCP listener was requested");
    let policy = running.service.policy().clone();
    let mut unix =
        PolicyClient::new(reflex_proto::connect(&format!("unix://{}", socket.display())).await?);
    let mut tcpc = PolicyClient::new(reflex_proto::connect(&tcp).await?);

    // 16 distinct frames, each with its own seed, reused round-robin.
    let scene = Scene::new();
    let reqs: Vec<pb::ActRequest> = (0..16)
        .map(|i| request(&scene.tick(i * 3), Some(i as u64)))
        .collect();
    let cams = policy.config().cameras.clone();
    let inputs: Vec<_> = reqs
        .iter()
        .map(|r| to_input(r, &cams))
        .collect::<Result<_, _>>()?;
    let request_bytes = prost::Message::encoded_len(&reqs[0]);

    let (mut engine, mut over_unix, mut over_tcp, mut server_total, mut floor) = (
        Summary::default(),
        Summary::default(),
        Summary::default(),
        Summary::default(),
        Summary::default(),
    );
    // Same bytes on the wire, refused before any model work (one state value
    // short): the transport's own cost for an Act-sized request.
    let mut reject = reqs[0].clone();
    reject.state.pop();
    for i in 0..args.warmup + args.calls {
        let k = i % reqs.len();
        let p = Arc::clone(&policy);
        let input = inputs[k].clone();
        let e = tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            p.act(&input).map(|_| ms_since(t))
        })
        .await??;
        let t = Instant::now();
        let r = unix.act(reqs[k].clone()).await?.into_inner();
        let u = ms_since(t);
        let t = Instant::now();
        tcpc.act(reqs[k].clone()).await?;
        let c = ms_since(t);
        let t = Instant::now();
        let refused = unix.act(reject.clone()).await;
        let f = ms_since(t);
        anyhow::ensure!(refused.is_err(), "the floor request should be refused");
        if i >= args.warmup {
            engine.push(e);
            over_unix.push(u);
            over_tcp.push(c);
            server_total.push(u - r.latency.map(|l| l.total_ms).unwrap_or(f64::NAN));
            floor.push(f);
        }
    }
    stop.cancel();
    running.wait().await?;

    println!(
        "reflex bench: reference model, {} calls per path, 1 worker, cache {}, request {} KB",
        args.calls,
        if args.cache == CacheMode::On {
            "on"
        } else {
            "off"
        },
        request_bytes / 1024
    );
    println!("{:<28} {:>9} {:>9}", "path", "p50 ms", "p99 ms");
    for (name, s) in [
        ("engine only (policy.act)", &engine),
        ("Act over Unix socket", &over_unix),
        ("Act over TCP (loopback)", &over_tcp),
        ("unix: client rtt − server", &server_total),
        ("unix: refused Act (floor)", &floor),
    ] {
        println!("{name:<28} {:>9.3} {:>9.3}", s.pct(50.0), s.pct(99.0));
    }
    println!(
        "serving overhead p50 (end-to-end − engine): unix {:.0} µs, tcp {:.0} µs",
        (over_unix.pct(50.0) - engine.pct(50.0)) * 1e3,
        (over_tcp.pct(50.0) - engine.pct(50.0)) * 1e3
    );
    Ok(())
}
