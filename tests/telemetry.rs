//! Observability end to end: a real `reflex serve` exporting to an OTLP
//! receiver this test runs (the `opentelemetry-proto` TraceService), and its
//! Prometheus endpoint scraped over HTTP.

mod util;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::{Span, status::StatusCode};
use reflex_proto::v1 as pb;
use tokio_util::sync::CancellationToken;
use util::*;

/// An OTLP/gRPC receiver: keeps every span, counts every export call.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
    /// (trace exports, metric exports)
    calls: Arc<Mutex<(usize, usize)>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.calls.lock().unwrap().0 += 1;
        let mut spans = self.spans.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        _req: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.calls.lock().unwrap().1 += 1;
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

/// A started receiver; stops when dropped.
struct Receiver {
    collector: Collector,
    endpoint: String,
    stop: CancellationToken,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let collector = Collector::default();
        let stop = CancellationToken::new();
        let router = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .add_service(MetricsServiceServer::new(collector.clone()));
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        tokio::spawn(router.serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned()));
        Receiver {
            collector,
            endpoint,
            stop,
        }
    }

    fn act_spans(&self) -> Vec<Span> {
        self.collector
            .spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.name == "act")
            .cloned()
            .collect()
    }

    fn spans(&self) -> Vec<Span> {
        self.collector.spans.lock().unwrap().clone()
    }
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn attr_str(span: &Span, key: &str) -> String {
    match attr(span, key) {
        Some(Value::StringValue(s)) => s.clone(),
        other => panic!(
            "{key}: not a string attribute: {other:?} in {:?}",
            span.attributes
        ),
    }
}

fn attr_int(span: &Span, key: &str) -> i64 {
    match attr(span, key) {
        Some(Value::IntValue(i)) => *i,
        other => panic!(
            "{key}: not an int attribute: {other:?} in {:?}",
            span.attributes
        ),
    }
}

fn attr_f64(span: &Span, key: &str) -> f64 {
    match attr(span, key) {
        Some(Value::DoubleValue(f)) => *f,
        other => panic!(
            "{key}: not a double attribute: {other:?} in {:?}",
            span.attributes
        ),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A traceparent with a trace id and span id made from `n`, sampled.
fn traceparent(n: u8) -> (String, String, String) {
    let trace = format!("{:02x}", n).repeat(16);
    let span = format!("{:02x}", n.wrapping_add(1)).repeat(8);
    (format!("00-{trace}-{span}-01"), trace, span)
}

fn with_parent(req: pb::ActRequest, tp: &str) -> tonic::Request<pb::ActRequest> {
    let mut r = tonic::Request::new(req);
    r.metadata_mut().insert("traceparent", tp.parse().unwrap());
    r
}

/// SIGTERM and wait for a clean exit (the server flushes its spans on the way out).
fn stop(p: &mut Proc) {
    p.signal(libc::SIGTERM);
    let st = p
        .wait_exit(Duration::from_secs(20))
        .expect("server exits after SIGTERM");
    assert!(st.success(), "{st:?}; stderr:\n{}", p.stderr());
}

#[tokio::test(flavor = "multi_thread")]
async fn every_act_has_one_span_whose_seq_matches_its_trace_record_and_callers_traces_continue() {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("export");
    export(&exp, 0);
    let traces = dir.path().join("traces");
    let rx = Receiver::start().await;
    let (mut server, sock) = serve_env(
        dir.path(),
        &exp,
        &[
            "--record",
            traces.to_str().unwrap(),
            "--record-no-gzip",
            "--embodiment",
            "franka",
            "--otel-endpoint",
            &rx.endpoint,
        ],
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    )
    .await;
    let target = format!("unix://{}", sock.display());
    let mut c = policy_client(&target).await;
    let info = timeout(c.get_model_info(pb::GetModelInfoRequest {}))
        .await
        .unwrap()
        .into_inner();

    // call i: (traceparent?, noise seed); shade 1 twice in a row gives a cache hit.
    let plan: [(Option<u8>, u64, u8); 5] = [
        (Some(0x11), 101, 1),
        (None, 102, 1),
        (Some(0x33), 103, 2),
        (None, 104, 3),
        (Some(0x55), 105, 4),
    ];
    let mut answers = vec![];
    for (tp, seed, shade) in plan {
        let req = act_request(shade, Some(seed));
        let r = match tp {
            Some(n) => timeout(c.act(with_parent(req, &traceparent(n).0))).await,
            None => timeout(c.act(req)).await,
        };
        answers.push(r.unwrap().into_inner());
    }
    // A failing call, in the caller's trace too.
    let bad = pb::ActRequest {
        state: vec![0.0],
        ..act_request(5, Some(106))
    };
    let (tp_bad, bad_trace, _) = traceparent(0x77);
    let status = timeout(c.act(with_parent(bad, &tp_bad))).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    eventually("six act spans", Duration::from_secs(20), || {
        rx.act_spans().len() >= 6
    })
    .await;
    stop(&mut server);
    let spans = rx.act_spans();
    assert_eq!(spans.len(), 6, "one act span per call, no more: {spans:#?}");

    let files = trace_files(&traces);
    assert_eq!(files.len(), 1, "{files:?}");
    let records: HashMap<u64, serde_json::Value> = trace_lines(&files[0])
        .into_iter()
        .filter(|l| l["kind"] == "request")
        .map(|l| (l["seq"].as_u64().unwrap(), l))
        .collect();
    assert_eq!(records.len(), 6);

    let by_seq: HashMap<u64, &Span> = spans
        .iter()
        .map(|s| (attr_int(s, "reflex.record.seq") as u64, s))
        .collect();
    assert_eq!(by_seq.len(), 6, "every span has its own seq");
    for ((tp, seed, _), answer) in plan.iter().zip(&answers) {
        let span = by_seq[&answer.seq];
        let record = &records[&answer.seq];
        assert_eq!(
            record["noise_seed"], *seed,
            "the span's seq names this call's trace record"
        );
        assert_eq!(attr_str(span, "gen_ai.operation.name"), "act");
        assert_eq!(attr_str(span, "gen_ai.request.model"), info.model_type);
        assert_eq!(attr_str(span, "gen_ai.action.embodiment"), "franka");
        assert_eq!(
            attr_int(span, "gen_ai.action.chunk_size"),
            info.chunk_size as i64
        );
        assert_eq!(
            attr_int(span, "gen_ai.action.denoise_steps"),
            answer.denoise.as_ref().unwrap().steps_used as i64
        );
        assert_eq!(attr_str(span, "reflex.cache.status"), answer.cache);
        assert_eq!(
            attr_str(span, "reflex.cache.status"),
            record["cache"]["status"].as_str().unwrap()
        );
        assert_eq!(attr_str(span, "reflex.inference_mode"), answer.mode);
        let l = answer.latency.as_ref().unwrap();
        let model_ms = l.decode_ms + l.prefix_ms + l.denoise_ms + l.postprocess_ms;
        assert!((attr_f64(span, "reflex.inference_ms") - model_ms).abs() < 1e-9);
        assert!(attr(span, "error.type").is_none());
        assert_ne!(
            span.status.as_ref().map(|s| s.code),
            Some(StatusCode::Error as i32)
        );
        match tp {
            Some(n) => {
                let (_, trace, parent) = traceparent(*n);
                assert_eq!(hex(&span.trace_id), trace, "the caller's trace continues");
                assert_eq!(hex(&span.parent_span_id), parent);
            }
            None => assert!(
                span.parent_span_id.is_empty(),
                "a call without traceparent starts a trace"
            ),
        }
        // The stages, as children laid inside the act span.
        let mut children: Vec<Span> = rx
            .spans()
            .into_iter()
            .filter(|s| s.parent_span_id == span.span_id)
            .collect();
        children.sort_by_key(|s| s.start_time_unix_nano);
        let children: Vec<&str> = children.iter().map(|s| s.name.as_str()).collect();
        let want: &[&str] = if answer.cache == "hit" {
            &["queue", "cache_hit", "denoise", "postprocess"]
        } else {
            &["queue", "decode", "prefix", "denoise", "postprocess"]
        };
        assert_eq!(children, want, "seq {}", answer.seq);
    }
    assert_eq!(
        answers[1].cache, "hit",
        "the plan repeats a frame for one cache hit"
    );

    let failed = spans
        .iter()
        .find(|s| attr(s, "error.type").is_some())
        .expect("the failed call's span");
    assert_eq!(attr_str(failed, "error.type"), "invalid-argument");
    assert_eq!(
        failed.status.as_ref().unwrap().code,
        StatusCode::Error as i32
    );
    assert_eq!(hex(&failed.trace_id), bad_trace);
    let seq = attr_int(failed, "reflex.record.seq") as u64;
    assert_eq!(
        records[&seq]["error"]["slug"], "invalid-argument",
        "{}",
        records[&seq]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sampling_is_parent_based_a_sampled_caller_is_traced_at_ratio_zero() {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("export");
    export(&exp, 0);
    let rx = Receiver::start().await;
    let (mut server, sock) = serve_env(
        dir.path(),
        &exp,
        &["--otel-endpoint", &rx.endpoint, "--otel-sample", "0"],
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    )
    .await;
    let mut c = policy_client(&format!("unix://{}", sock.display())).await;
    for i in 0..3 {
        timeout(c.act(act_request(i, Some(i as u64))))
            .await
            .unwrap();
    }
    let (tp, trace, _) = traceparent(0x42);
    timeout(c.act(with_parent(act_request(9, Some(9)), &tp)))
        .await
        .unwrap();
    eventually("the caller's span", Duration::from_secs(20), || {
        !rx.act_spans().is_empty()
    })
    .await;
    stop(&mut server);
    let spans = rx.act_spans();
    assert_eq!(spans.len(), 1, "{spans:#?}");
    assert_eq!(hex(&spans[0].trace_id), trace);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_tracing_off_nothing_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("export");
    export(&exp, 0);
    let rx = Receiver::start().await;
    // Off by default; and the standard switch wins over the standard endpoint variable.
    let variants: [&[(&str, &str)]; 2] = [
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &rx.endpoint),
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    ];
    for (i, envs) in variants.into_iter().enumerate() {
        let sdir = dir.path().join(format!("s{i}"));
        std::fs::create_dir_all(&sdir).unwrap();
        let (mut server, sock) = serve_env(&sdir, &exp, &[], envs).await;
        let mut c = policy_client(&format!("unix://{}", sock.display())).await;
        let (tp, _, _) = traceparent(0x21);
        timeout(c.act(act_request(1, Some(1)))).await.unwrap();
        timeout(c.act(with_parent(act_request(2, Some(2)), &tp)))
            .await
            .unwrap();
        stop(&mut server);
        assert!(
            !server.stderr().contains("tracing to OTLP"),
            "{}",
            server.stderr()
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        *rx.collector.calls.lock().unwrap(),
        (0, 0),
        "no export call reached the receiver"
    );
}

/// The value of the sample `name` (exact text before the value, labels included).
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_counts_calls_and_the_drops_after_the_recorder_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("export");
    export(&exp, 0);
    let traces = dir.path().join("traces");
    let rsock = dir.path().join("recorder.sock");
    let mut rec = recorder(&traces, &rsock, &[]).await;
    let recorder_uri = format!("unix://{}", rsock.display());
    let (server, sock) = serve(
        dir.path(),
        &exp,
        &[
            "--recorder",
            &recorder_uri,
            "--record-queue",
            "2",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    )
    .await;
    let line = server.wait_for_log("metrics=http://");
    let at = line.find("metrics=http://").unwrap() + "metrics=http://".len();
    let addr = line[at..].split('/').next().unwrap().to_string();

    let scrape = || async { http_get(&addr, "/metrics").await };
    let first = scrape().await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(
        first
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{first}"
    );
    assert!(first.contains("reflex_act_queue_depth 0"), "{first}");

    let mut c = policy_client(&format!("unix://{}", sock.display())).await;
    for shade in [1, 1, 2] {
        timeout(c.act(act_request(shade, Some(7)))).await.unwrap();
    }
    let bad = pb::ActRequest {
        state: vec![],
        ..act_request(3, Some(1))
    };
    timeout(c.act(bad)).await.unwrap_err();

    let text = scrape().await;
    assert_eq!(
        sample(&text, "reflex_act_requests_total{status=\"ok\"}"),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "reflex_act_requests_total{status=\"invalid-argument\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "reflex_act_duration_seconds_count{status=\"ok\"}"),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "reflex_cache_lookups_total{result=\"hit\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "reflex_cache_lookups_total{result=\"miss\"}"),
        Some(2.0),
        "{text}"
    );
    assert!(
        (sample(&text, "reflex_cache_hit_ratio").unwrap() - 1.0 / 3.0).abs() < 1e-9,
        "{text}"
    );
    assert_eq!(
        sample(&text, "reflex_record_queued_total"),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "reflex_record_dropped_total"),
        Some(0.0),
        "{text}"
    );

    // The shared recorder's own view arrives with the next status poll (every 5 s).
    let mut text = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        text = scrape().await;
        if sample(&text, "reflex_recorder_records_total").is_some_and(|n| n >= 4.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(sample(&text, "reflex_recorder_up"), Some(1.0), "{text}");
    assert_eq!(
        sample(&text, "reflex_recorder_degraded"),
        Some(0.0),
        "{text}"
    );
    assert!(
        sample(&text, "reflex_recorder_records_total").unwrap() >= 4.0,
        "{text}"
    );
    assert!(
        sample(&text, "reflex_recorder_written_bytes_total").unwrap() > 0.0,
        "{text}"
    );
    assert_eq!(
        sample(&text, "reflex_record_delivered_total"),
        Some(4.0),
        "{text}"
    );

    // kill -9 the recorder: calls still succeed, and with a queue of 2 they are dropped and counted.
    rec.signal(libc::SIGKILL);
    rec.wait_exit(Duration::from_secs(5))
        .expect("recorder killed");
    for i in 0..24u8 {
        timeout(c.act(act_request(10 + i % 4, Some(i as u64))))
            .await
            .unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        text = scrape().await;
        let dropped = sample(&text, "reflex_record_dropped_total").unwrap_or(0.0);
        if dropped > 0.0 && sample(&text, "reflex_recorder_up") == Some(0.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no drops counted or recorder still up:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        sample(&text, "reflex_act_requests_total{status=\"ok\"}"),
        Some(27.0),
        "{text}"
    );
    assert!(http_get(&addr, "/").await.starts_with("HTTP/1.1 404"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replay_traces_each_call_beside_the_original_with_the_servers_act_as_child() {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("export");
    export(&exp, 0);
    let traces = dir.path().join("traces");
    let (mut server, sock) = serve(
        dir.path(),
        &exp,
        &[
            "--record",
            traces.to_str().unwrap(),
            "--record-images",
            "full",
            "--record-no-gzip",
        ],
    )
    .await;
    let mut c = policy_client(&format!("unix://{}", sock.display())).await;
    for i in 0..3u8 {
        timeout(c.act(act_request(i, Some(i as u64))))
            .await
            .unwrap();
    }
    stop(&mut server);
    let trace = trace_files(&traces).pop().expect("a trace file");

    // The replay and its private server (--model) trace to the receiver through the standard variable.
    let rx = Receiver::start().await;
    let out = tokio::process::Command::new(BIN)
        .args([
            "replay",
            trace.to_str().unwrap(),
            "--model",
            exp.to_str().unwrap(),
        ])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &rx.endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .output();
    let out = timeout(out).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let spans = rx.spans();
    let replays: Vec<&Span> = spans.iter().filter(|s| s.name == "replay.act").collect();
    assert_eq!(replays.len(), 3, "{spans:#?}");
    for r in replays {
        let seq = attr_int(r, "reflex.record.seq");
        assert!(
            r.parent_span_id.is_empty(),
            "each replayed call starts its own trace"
        );
        let act = spans
            .iter()
            .find(|s| s.name == "act" && s.parent_span_id == r.span_id)
            .expect("the server's act span");
        assert_eq!(act.trace_id, r.trace_id);
        assert_eq!(
            attr_int(act, "reflex.record.seq"),
            seq,
            "a fresh private server counts the same seqs"
        );
    }
}
