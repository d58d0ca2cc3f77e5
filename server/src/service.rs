//! `reflex.v1.Policy` over gRPC: translates between the wire and the policy.
//!
//! A request's images map onto the model's camera slots by the image contract of
//! `reflex_proto::images` ([`to_input`]); domain errors become a gRPC `Status` in
//! `crate::error`. Model work goes to the bounded [`Pool`]; the async side only maps
//! messages, checks cheap things and awaits the result.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use reflex_engine::policy::{ActInput, ActOutput, FrameInput, InputError, Policy};
use reflex_proto::images::{camera_slot, fold_primary};
use reflex_proto::v1::{self as pb, policy_server::Policy as PolicyRpc};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::error::{ProbeError, ServiceError};
use crate::pool::{ConnectionKey, Pool, Skipped, Slot, SubmitError};
use crate::recording::{ActEvent, Recording};
use crate::telemetry::{ActSpan, ActTelemetry};

/// Everything the handlers share.
pub struct PolicyService {
    policy: Arc<Policy>,
    pool: Pool,
    info: pb::ModelInfo,
    max_message_bytes: usize,
    recording: Recording,
    episode: Mutex<(String, u64)>,
    telemetry: ActTelemetry,
}

/// What the service answers that is not in the export.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    pub workers: usize,
    pub queue_depth: usize,
    /// Places of the queue one connection may hold (the fairness share).
    pub queue_per_connection: usize,
    pub max_message_bytes: usize,
    pub embodiment: String,
    pub session_id: String,
}

impl PolicyService {
    pub fn new(policy: Arc<Policy>, opts: &ServiceOptions, recording: Recording) -> Self {
        let cfg = policy.config();
        let info = pb::ModelInfo {
            model_hash: policy.model_hash().into(),
            config_hash: policy.config_hash().into(),
            model_type: cfg.model_type.clone(),
            export_kind: cfg.export_kind.clone(),
            embodiment: opts.embodiment.clone(),
            cameras: cfg.cameras.clone(),
            image_height: cfg.image_height,
            image_width: cfg.image_width,
            state_dim: cfg.state_dim as u32,
            action_dim: cfg.action_dim as u32,
            chunk_size: cfg.chunk_size as u32,
            denoise_steps: cfg.denoise_steps,
            mode: policy.mode().into(),
            reflex_version: env!("CARGO_PKG_VERSION").into(),
            session_id: opts.session_id.clone(),
            max_instruction_tokens: cfg.max_tokens as u32,
            noise_width: cfg.noise_width as u32,
            export: cfg.export.clone().into_iter().collect(),
        };
        PolicyService {
            pool: Pool::new(opts.workers, opts.queue_depth, opts.queue_per_connection),
            policy,
            info,
            max_message_bytes: opts.max_message_bytes,
            recording,
            episode: Mutex::new((String::new(), 0)),
            telemetry: ActTelemetry::default(),
        }
    }

    /// Turns on the spans and metrics `telemetry` carries (off by default).
    pub fn with_telemetry(mut self, telemetry: ActTelemetry) -> Self {
        self.telemetry = telemetry;
        self
    }

    pub fn telemetry(&self) -> &ActTelemetry {
        &self.telemetry
    }

    pub fn info(&self) -> &pb::ModelInfo {
        &self.info
    }

    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    pub fn recording(&self) -> &Recording {
        &self.recording
    }

    /// Proves the engine still answers: a cheap engine call ([`Policy::probe`]) through the
    /// same pool as Act calls, in the slot the pool reserves for it. It returns only once a
    /// worker has run it, so a wedged engine or a stuck pool makes it hang; the caller (the
    /// systemd watchdog) bounds the wait.
    pub async fn probe(&self) -> Result<(), ProbeError> {
        let policy = self.policy.clone();
        let rx = self.pool.submit_probe(move || policy.probe())?;
        rx.await.map_err(|_| ProbeError::WorkerLost)??;
        Ok(())
    }

    /// One Act, from wire request to wire response.
    pub async fn act(&self, req: pb::ActRequest) -> Result<pb::ActResponse, Status> {
        self.submit(req, None, Call::default()).await.result
    }

    /// One Act with the seq it was given and whether it was recorded, which a failed call
    /// has too (ActStream reports them in its error answers); inside the caller's trace
    /// (`parent`, from its `traceparent`) when tracing is on. **The one seam** every Act
    /// goes through, gRPC's and the front-ends' (`crate::frontend`) alike: admission,
    /// seq, record, spans, metrics and deadline are decided here.
    pub async fn submit(
        &self,
        req: pb::ActRequest,
        parent: Option<opentelemetry::Context>,
        call: Call,
    ) -> Answer {
        match self.telemetry.act_span(&self.info, parent) {
            Some(span) => {
                let inner = span.span.clone();
                self.act_spanned(req, Some(&span), call)
                    .instrument(inner)
                    .await
            }
            None => self.act_spanned(req, None, call).await,
        }
    }

    async fn act_spanned(&self, req: pb::ActRequest, span: Option<&ActSpan>, call: Call) -> Answer {
        let arrived = call.arrived.unwrap_or_else(Instant::now);
        // Refuse before any work: a call that cannot get a place in the queue is answered
        // before its images are decoded or hashed, and is counted instead of recorded (no
        // seq, no record; see `Recording::refused`).
        let slot = match self.pool.admit(call.connection) {
            Ok(slot) => slot,
            Err(e) => return self.refuse(e, arrived, span),
        };
        // Formatted only when a record is built: recording off costs nothing here.
        let timestamp = std::time::SystemTime::now();
        let chunk_id = self.chunk_id(&req.episode_id);
        let result = self.run(&req, arrived, slot, call.deadline).await;
        let total_ms = arrived.elapsed().as_secs_f64() * 1e3;
        let cfg = self.policy.config();
        // One latency for the answer and the record, so the two cannot disagree.
        let latency = match &result {
            Ok((out, queue_ms)) => latency(out, *queue_ms, total_ms),
            Err(_) => pb::Latency {
                total_ms,
                ..Default::default()
            },
        };
        let (seq, recorded) = self.recording.complete(|| ActEvent {
            chunk_id,
            timestamp,
            request: &req,
            cameras: &cfg.cameras,
            result: &result,
            latency,
            mode: self.policy.mode(),
            action_dim: cfg.action_dim as u32,
            steps_configured: cfg.denoise_steps,
        });
        if let Some(span) = span {
            self.telemetry.finish_act_span(
                span,
                Some(seq),
                recorded,
                &result,
                total_ms,
                cfg.denoise_steps,
            );
        }
        if let Some(m) = self.telemetry.metrics() {
            m.record(total_ms, &result);
        }
        let result = match result {
            Ok((out, _)) => Ok(self.response(out, latency, seq, recorded)),
            Err(e) => {
                tracing::debug!(seq, error = %e, "act failed");
                Err(e.status())
            }
        };
        Answer {
            seq: Some(seq),
            recorded,
            result,
        }
    }

    /// The answer to a call the queue had no place for: counted (metrics, the session's
    /// refusal count in the trace footer), never given a seq or a record.
    fn refuse(&self, e: SubmitError, arrived: Instant, span: Option<&ActSpan>) -> Answer {
        let total_ms = arrived.elapsed().as_secs_f64() * 1e3;
        self.recording.refused();
        let err = ServiceError::from(e);
        let mut status = err.status();
        let result: Result<(ActOutput, f64), ServiceError> = Err(err);
        if let Some(span) = span {
            let steps = self.policy.config().denoise_steps;
            self.telemetry
                .finish_act_span(span, None, false, &result, total_ms, steps);
        }
        if let Some(m) = self.telemetry.metrics() {
            m.record(total_ms, &result);
        }
        // gRPC's server pushback: clients with a retry policy wait this long (A6).
        if let Ok(v) = self.pool.pushback_ms().to_string().parse() {
            status.metadata_mut().insert("grpc-retry-pushback-ms", v);
        }
        Answer {
            seq: None,
            recorded: false,
            result: Err(status),
        }
    }

    async fn run(
        &self,
        req: &pb::ActRequest,
        arrived: Instant,
        slot: Slot,
        deadline: Option<Instant>,
    ) -> Result<(ActOutput, f64), ServiceError> {
        let size = req.encoded_len();
        if size > self.max_message_bytes {
            return Err(InputError::TooLarge {
                got: size,
                limit: self.max_message_bytes,
            }
            .into());
        }
        let input = to_input(req, &self.policy.config().cameras)?;
        self.policy.check_cheap(&input)?;
        let policy = self.policy.clone();
        let waiting = self.telemetry.metrics().map(|m| m.waiting());
        let rx = self.pool.submit(slot, arrived, deadline, move || {
            drop(waiting);
            let queue_ms = arrived.elapsed().as_secs_f64() * 1e3;
            policy.act(&input).map(|out| (out, queue_ms))
        })?;
        let answer = match deadline {
            // Answer DEADLINE_EXCEEDED ourselves just before the client's deadline, so the
            // call is recorded and counted; the transport's own timer (tonic's, at the same
            // deadline counted from the headers) would drop the call unanswered by us. The
            // job, if still queued, sees its caller gone and is not run.
            Some(d) => {
                let margin = d
                    .saturating_duration_since(arrived)
                    .div_f64(10.0)
                    .min(DEADLINE_MARGIN);
                match tokio::time::timeout_at((d - margin).into(), rx).await {
                    Ok(answer) => answer,
                    Err(_) => {
                        return Err(ServiceError::Skipped(Skipped::DeadlineExceeded {
                            waited_ms: arrived.elapsed().as_secs_f64() * 1e3,
                        }));
                    }
                }
            }
            None => rx.await,
        };
        // The worker dropped the sender only if the job panicked.
        let out = answer.map_err(|_| ServiceError::WorkerLost)???;
        Ok(out)
    }

    fn response(
        &self,
        out: ActOutput,
        latency: pb::Latency,
        seq: u64,
        recorded: bool,
    ) -> pb::ActResponse {
        let cfg = self.policy.config();
        pb::ActResponse {
            num_actions: cfg.chunk_size as u32,
            action_dim: cfg.action_dim as u32,
            actions: out.actions,
            seq,
            noise_seed: out.noise_seed,
            mode: self.policy.mode().into(),
            cache: out.cache.as_str().into(),
            latency: Some(latency),
            denoise: Some(pb::Denoise {
                steps_used: out.steps_used,
                steps_configured: cfg.denoise_steps,
                adaptive: false,
            }),
            model_hash: self.policy.model_hash().into(),
            recorded,
            error: None,
        }
    }

    /// Index of this call within its episode (0 for the first chunk).
    fn chunk_id(&self, episode: &str) -> u64 {
        let Ok(mut e) = self.episode.lock() else {
            return 0;
        };
        if e.0 == episode {
            e.1 += 1;
        } else {
            *e = (episode.to_string(), 0);
        }
        e.1
    }
}

/// At most this much before a call's deadline, the server answers DEADLINE_EXCEEDED itself
/// (a tenth of the call's time when that is less): the answer and its record must be done
/// before the transport's own timer for the same deadline drops the call.
const DEADLINE_MARGIN: Duration = Duration::from_millis(5);

/// What the transport knows of a call, beyond its message.
#[derive(Debug, Clone, Copy, Default)]
pub struct Call {
    /// The connection it came on (the queue's fairness share counts per connection).
    pub connection: Option<ConnectionKey>,
    /// When its `grpc-timeout` runs out (unary Act only; a stream's timeout is the stream's).
    pub deadline: Option<Instant>,
    /// When the handler got it (default: now).
    pub arrived: Option<Instant>,
}

impl Call {
    /// The connection key and the deadline of a unary request.
    pub fn of<T>(request: &Request<T>) -> Call {
        let arrived = Instant::now();
        Call {
            connection: connection_key(request),
            deadline: grpc_timeout(request.metadata()).map(|t| arrived + t),
            arrived: Some(arrived),
        }
    }
}

/// A number unique among the open connections: the listener's connection number for a
/// Unix socket, the peer's address for TCP (with or without TLS).
fn connection_key<T>(request: &Request<T>) -> Option<ConnectionKey> {
    use std::hash::{Hash, Hasher};
    let ext = request.extensions();
    if let Some(info) =
        ext.get::<reflex_listen::ConnectionInfo<tonic::transport::server::UdsConnectInfo>>()
    {
        return Some(info.connection);
    }
    let addr = request.remote_addr()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    addr.hash(&mut h);
    // Top bit set: never equal to a Unix connection's number.
    Some(h.finish() | 1 << 63)
}

/// The `grpc-timeout` header (gRPC over HTTP/2: up to 8 digits and a unit H, M, S, m, u, n);
/// `None` when absent or malformed (tonic ignores a malformed one too).
pub fn grpc_timeout(meta: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = meta.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// What [`PolicyService::submit`] tells its caller.
pub struct Answer {
    /// The call's seq (the `seq` of its trace record), failed or not; `None` for a refusal
    /// (RESOURCE_EXHAUSTED: counted, not recorded).
    pub seq: Option<u64>,
    /// Whether the call was handed to the recorder.
    pub recorded: bool,
    pub result: Result<pb::ActResponse, Status>,
}

fn latency(out: &ActOutput, queue_ms: f64, total_ms: f64) -> pb::Latency {
    pb::Latency {
        total_ms,
        queue_ms,
        decode_ms: out.times.decode_ms,
        prefix_ms: out.times.prefix_ms,
        denoise_ms: out.times.denoise_ms,
        postprocess_ms: out.times.postprocess_ms,
    }
}

/// Maps the wire request onto the model's camera slots, by the image contract of
/// `reflex_proto::images` (the primary-image rule, camera slots): the engine takes the
/// slots only and never sees the wire's two forms of the primary image.
pub fn to_input(req: &pb::ActRequest, cameras: &[String]) -> Result<ActInput, ServiceError> {
    let list = || cameras.join(", ");
    let mut images: Vec<pb::Image> = req.images.clone();
    let mut image_b64 = req.image_b64.clone();
    fold_primary(&mut images, &mut image_b64)?;
    if images.is_empty() {
        return Err(InputError::MissingPrimary {
            camera: cameras[0].clone(),
        }
        .into());
    }
    if images.len() > cameras.len() {
        return Err(InputError::TooManyImages {
            got: images.len(),
            max: cameras.len(),
            cameras: list(),
        }
        .into());
    }
    let mut frames: Vec<Option<FrameInput>> = vec![None; cameras.len()];
    for (index, img) in images.into_iter().enumerate() {
        // Never `None` for an unnamed image: there are no more images than cameras.
        let slot =
            camera_slot(index, &img.camera, cameras).ok_or_else(|| InputError::UnknownCamera {
                index,
                name: quoted(&img.camera),
                cameras: list(),
            })?;
        if index == 0 && slot != 0 {
            return Err(InputError::PrimaryNotFirst {
                primary: cameras[0].clone(),
                got: quoted(&img.camera),
            }
            .into());
        }
        if frames[slot].is_some() {
            return Err(InputError::DuplicateCamera {
                index,
                name: cameras[slot].clone(),
            }
            .into());
        }
        if img.data.is_empty() {
            return Err(InputError::EmptyImage {
                index,
                camera: cameras[slot].clone(),
            }
            .into());
        }
        // Of the two hash fields for the primary, the per-image one wins.
        let (expect_sha256, sha_field) = if !img.sha256.is_empty() {
            (Some(img.sha256), format!("images[{index}].sha256"))
        } else if index == 0 && !req.image_sha256.is_empty() {
            (Some(req.image_sha256.clone()), "image_sha256".to_string())
        } else {
            (None, String::new())
        };
        frames[slot] = Some(FrameInput {
            index,
            data: img.data,
            expect_sha256,
            sha_field,
        });
    }
    Ok(ActInput {
        frames,
        instruction: req.instruction.clone(),
        state: req.state.clone(),
        noise_seed: req.noise_seed,
        noise: (!req.noise.is_empty()).then(|| req.noise.clone()),
    })
}

/// A client's string as an error message repeats it: the first 64 characters. The message
/// travels in the `grpc-message` trailer, and a camera name of megabytes must not make it
/// that big (gRPC C-core clients refuse trailers over 16 KiB and report their own error
/// instead of ours).
pub(crate) fn quoted(s: &str) -> String {
    const MAX_CHARS: usize = 64;
    match s.char_indices().nth(MAX_CHARS) {
        None => s.to_string(),
        Some((cut, _)) => format!("{}…", &s[..cut]),
    }
}

type ActStream = Pin<Box<dyn Stream<Item = Result<pb::ActResponse, Status>> + Send>>;

/// The ActStream answer to a request that failed: the status as `error`, with the
/// canonical code name the proto promises (`INVALID_ARGUMENT`), and the call's own seq (0
/// for a refusal, which has none: `RESOURCE_EXHAUSTED`, `recorded` false).
fn stream_error(status: &Status, seq: Option<u64>, recorded: bool) -> pb::ActResponse {
    pb::ActResponse {
        seq: seq.unwrap_or(0),
        recorded,
        error: Some(pb::ActError {
            code: reflex_proto::errors::code_name(status.code()).into(),
            message: status.message().to_string(),
        }),
        // No actions, shapes, latency or engine facts: the call produced none.
        ..Default::default()
    }
}

/// The tonic-facing handle; cheap to clone into every listener's router.
#[derive(Clone)]
pub struct PolicyHandle(pub Arc<PolicyService>);

#[tonic::async_trait]
impl PolicyRpc for PolicyHandle {
    async fn act(
        &self,
        request: Request<pb::ActRequest>,
    ) -> Result<Response<pb::ActResponse>, Status> {
        let parent = self.0.telemetry.parent(request.metadata());
        let call = Call::of(&request);
        self.0
            .submit(request.into_inner(), parent, call)
            .await
            .result
            .map(Response::new)
    }

    type ActStreamStream = ActStream;

    async fn act_stream(
        &self,
        request: Request<Streaming<pb::ActRequest>>,
    ) -> Result<Response<Self::ActStreamStream>, Status> {
        // Every message's span continues the stream's `traceparent`, if any.
        let parent = self.0.telemetry.parent(request.metadata());
        let connection = connection_key(&request);
        let mut inbound = request.into_inner();
        // Small buffer: a control loop has one request in flight; backpressure
        // beyond that reaches the client through HTTP/2 flow control.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let svc = self.0.clone();
        tokio::spawn(async move {
            while let Some(msg) = inbound.next().await {
                let reply = match msg {
                    Ok(req) => {
                        let call = Call {
                            connection,
                            ..Call::default()
                        };
                        let answer = svc.submit(req, parent.clone(), call).await;
                        Ok(answer.result.unwrap_or_else(|status| {
                            stream_error(&status, answer.seq, answer.recorded)
                        }))
                    }
                    Err(status) => Err(status),
                };
                let fatal = reply.is_err();
                if tx.send(reply).await.is_err() || fatal {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_model_info(
        &self,
        _request: Request<pb::GetModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        Ok(Response::new(self.0.info.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cams() -> Vec<String> {
        vec!["base".into(), "wrist".into()]
    }

    fn img(camera: &str, data: &[u8]) -> pb::Image {
        pb::Image {
            camera: camera.into(),
            data: data.to_vec(),
            sha256: String::new(),
        }
    }

    #[test]
    fn images_map_to_camera_slots() {
        let req = pb::ActRequest {
            images: vec![img("", b"a"), img("wrist", b"b")],
            ..Default::default()
        };
        let input = to_input(&req, &cams()).unwrap();
        assert_eq!(input.frames[0].as_ref().unwrap().data, b"a");
        assert_eq!(input.frames[1].as_ref().unwrap().data, b"b");
        let only = pb::ActRequest {
            images: vec![img("base", b"a")],
            ..Default::default()
        };
        assert!(to_input(&only, &cams()).unwrap().frames[1].is_none());
    }

    #[test]
    fn image_b64_fills_the_primary() {
        let req = pb::ActRequest {
            image_b64: b"x".to_vec(),
            ..Default::default()
        };
        assert_eq!(
            to_input(&req, &cams()).unwrap().frames[0]
                .as_ref()
                .unwrap()
                .data,
            b"x"
        );
        let req = pb::ActRequest {
            image_b64: b"x".to_vec(),
            images: vec![pb::Image {
                camera: "base".into(),
                sha256: "ab".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let f = to_input(&req, &cams()).unwrap().frames[0].clone().unwrap();
        assert_eq!(
            (f.data.as_slice(), f.expect_sha256.as_deref()),
            (&b"x"[..], Some("ab"))
        );
        let both = pb::ActRequest {
            image_b64: b"x".to_vec(),
            images: vec![img("base", b"y")],
            ..Default::default()
        };
        assert!(matches!(
            to_input(&both, &cams()),
            Err(ServiceError::Images(reflex_proto::images::TwoPrimaryImages))
        ));
    }

    #[test]
    fn camera_mistakes_are_named() {
        let e = |req: pb::ActRequest| to_input(&req, &cams()).unwrap_err().to_string();
        assert!(e(pb::ActRequest::default()).contains("images is empty"));
        let msg = e(pb::ActRequest {
            images: vec![img("base", b"a"), img("left", b"b")],
            ..Default::default()
        });
        assert!(
            msg.contains("images[1].camera \"left\"") && msg.contains("base, wrist"),
            "{msg}"
        );
        let msg = e(pb::ActRequest {
            images: vec![img("base", b"a"), img("base", b"b")],
            ..Default::default()
        });
        assert!(msg.contains("appears twice"), "{msg}");
        let msg = e(pb::ActRequest {
            images: vec![img("wrist", b"a")],
            ..Default::default()
        });
        assert!(msg.contains("primary camera \"base\""), "{msg}");
        let msg = e(pb::ActRequest {
            images: vec![img("base", b"")],
            ..Default::default()
        });
        assert!(
            msg.contains("images[0].data is empty") && msg.contains("--image-dir"),
            "{msg}"
        );
        let three = vec![img("", b"a"), img("", b"b"), img("", b"c")];
        assert!(
            e(pb::ActRequest {
                images: three,
                ..Default::default()
            })
            .contains("3 entries")
        );
    }

    /// Regression (found by `server/tests/fuzz_input.rs`): an unknown camera name was
    /// repeated whole in the message, so a 100 kB name made a 100 kB `grpc-message` trailer.
    #[test]
    fn a_huge_camera_name_is_cut_short_in_the_message() {
        let e = |req: pb::ActRequest| to_input(&req, &cams()).unwrap_err().to_string();
        let huge = "c".repeat(100_000);
        let msg = e(pb::ActRequest {
            images: vec![img("base", b"a"), img(&huge, b"b")],
            ..Default::default()
        });
        let want = format!("images[1].camera \"{}…\" is not a camera", "c".repeat(64));
        assert!(msg.starts_with(&want), "{msg}");
        assert!(msg.len() < 200, "{} bytes", msg.len());
        let msg = e(pb::ActRequest {
            images: vec![img(&"é".repeat(50_000), b"a")],
            ..Default::default()
        });
        assert!(
            msg.starts_with(&format!("images[0].camera \"{}…\" is not", "é".repeat(64))),
            "{msg}"
        );
        // Names up to 64 characters are quoted whole.
        let name = "ü".repeat(64);
        let msg = e(pb::ActRequest {
            images: vec![img("base", b"a"), img(&name, b"b")],
            ..Default::default()
        });
        assert!(msg.contains(&format!("\"{name}\" is not")), "{msg}");
    }
}
