//! `reflex.v1.Policy` over gRPC: translates between the wire and the policy.
//!
//! This is the one place where domain errors become a gRPC `Status`
//! ([`status_of`]). Model work goes to the bounded [`Pool`]; the async side
//! only maps messages, checks cheap things and awaits the result.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prost::Message;
use reflex_proto::v1::{self as pb, policy_server::Policy as PolicyRpc};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::engine::EngineError;
use crate::policy::{ActError, ActInput, ActOutput, FrameInput, InputError, Policy};
use crate::pool::{Pool, ProbeSubmitError, SubmitError};
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
            image_height: cfg.image.height,
            image_width: cfg.image.width,
            state_dim: cfg.state_dim as u32,
            action_dim: cfg.action_dim as u32,
            chunk_size: cfg.chunk_size as u32,
            denoise_steps: cfg.denoise.steps,
            mode: policy.mode().into(),
            reflex_version: env!("CARGO_PKG_VERSION").into(),
            session_id: opts.session_id.clone(),
            max_instruction_tokens: cfg.instruction.max_tokens as u32,
        };
        PolicyService {
            pool: Pool::new(opts.workers, opts.queue_depth),
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
        self.act_in_trace(req, None).await
    }

    /// One Act inside the caller's trace (`parent`, from its `traceparent`).
    /// With tracing off this is [`PolicyService::act`]: no span is built.
    pub async fn act_in_trace(
        &self,
        req: pb::ActRequest,
        parent: Option<opentelemetry::Context>,
    ) -> Result<pb::ActResponse, Status> {
        match self.telemetry.act_span(&self.info, parent) {
            Some(span) => {
                let inner = span.span.clone();
                self.act_spanned(req, Some(&span)).instrument(inner).await
            }
            None => self.act_spanned(req, None).await,
        }
    }

    async fn act_spanned(
        &self,
        req: pb::ActRequest,
        span: Option<&ActSpan>,
    ) -> Result<pb::ActResponse, Status> {
        let arrived = Instant::now();
        // Formatted only when a record is built: recording off costs nothing here.
        let timestamp = std::time::SystemTime::now();
        let chunk_id = self.chunk_id(&req.episode_id);
        let result = self.run(&req, arrived).await;
        let total_ms = arrived.elapsed().as_secs_f64() * 1e3;
        let cfg = self.policy.config();
        let (seq, recorded) = self.recording.complete(|| ActEvent {
            chunk_id,
            timestamp,
            request: &req,
            cameras: &cfg.cameras,
            result: &result,
            total_ms,
            mode: self.policy.mode(),
            action_dim: cfg.action_dim as u32,
            steps_configured: cfg.denoise.steps,
        });
        if let Some(span) = span {
            self.telemetry.finish_act_span(
                span,
                seq,
                recorded,
                &result,
                total_ms,
                cfg.denoise.steps,
            );
        }
        if let Some(m) = self.telemetry.metrics() {
            m.record(total_ms, &result);
        }
        match result {
            Ok((out, queue_ms)) => Ok(self.response(out, queue_ms, total_ms, seq, recorded)),
            Err(e) => {
                tracing::debug!(seq, error = %e, "act failed");
                Err(status_of(&e))
            }
        }
    }

    async fn run(
        &self,
        req: &pb::ActRequest,
        arrived: Instant,
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
        let rx = self.pool.submit(move || {
            drop(waiting);
            let queue_ms = arrived.elapsed().as_secs_f64() * 1e3;
            policy.act(&input).map(|out| (out, queue_ms))
        })?;
        // The worker dropped the sender only if the job panicked.
        let out = rx.await.map_err(|_| ServiceError::WorkerLost)??;
        Ok(out)
    }

    fn response(
        &self,
        out: ActOutput,
        queue_ms: f64,
        total_ms: f64,
        seq: u64,
        recorded: bool,
    ) -> pb::ActResponse {
        let cfg = self.policy.config();
        let latency = latency(&out, queue_ms, total_ms);
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
                steps_configured: cfg.denoise.steps,
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

pub fn latency(out: &ActOutput, queue_ms: f64, total_ms: f64) -> pb::Latency {
    pb::Latency {
        total_ms,
        queue_ms,
        decode_ms: out.times.decode_ms,
        prefix_ms: out.times.prefix_ms,
        denoise_ms: out.times.denoise_ms,
        postprocess_ms: out.times.postprocess_ms,
    }
}

/// Why the service could not answer with actions.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Act(#[from] ActError),
    #[error(transparent)]
    Submit(#[from] SubmitError),
    #[error("an inference worker failed on this request")]
    WorkerLost,
}

/// Why the liveness probe failed (see [`PolicyService::probe`]).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Submit(#[from] ProbeSubmitError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("an inference worker panicked while running the probe")]
    WorkerLost,
}

impl From<InputError> for ServiceError {
    fn from(e: InputError) -> Self {
        ServiceError::Act(ActError::Input(e))
    }
}

impl ServiceError {
    /// Short greppable name, used as the trace record's `error.slug`.
    pub fn slug(&self) -> &'static str {
        match self {
            ServiceError::Act(ActError::Input(_)) => "invalid-argument",
            ServiceError::Act(ActError::Engine(_)) => "engine-failed",
            ServiceError::Submit(SubmitError::Busy(_)) => "queue-full",
            ServiceError::Submit(SubmitError::Closed) => "shutting-down",
            ServiceError::WorkerLost => "worker-lost",
        }
    }
}

/// The one place a domain error becomes a gRPC status.
pub fn status_of(e: &ServiceError) -> Status {
    match e {
        ServiceError::Act(ActError::Input(e)) => Status::invalid_argument(e.to_string()),
        ServiceError::Act(ActError::Engine(e)) => {
            tracing::error!(error = %e, slug = "engine-failed", "engine failed");
            Status::internal("the model failed on this request; the server log has the details")
        }
        ServiceError::Submit(e @ SubmitError::Busy(_)) => Status::resource_exhausted(e.to_string()),
        ServiceError::Submit(e @ SubmitError::Closed) => Status::unavailable(e.to_string()),
        ServiceError::WorkerLost => {
            tracing::error!(slug = "worker-lost", "an inference job panicked");
            Status::internal(e.to_string())
        }
    }
}

/// Maps the wire request onto the model's camera slots.
pub fn to_input(req: &pb::ActRequest, cameras: &[String]) -> Result<ActInput, InputError> {
    let list = || cameras.join(", ");
    let mut images: Vec<pb::Image> = req.images.clone();
    // Seed-compatible single-image form: `image_b64` is the primary's bytes.
    if !req.image_b64.is_empty() {
        match images.first_mut() {
            None => images.push(pb::Image {
                data: req.image_b64.clone(),
                ..Default::default()
            }),
            Some(first) if first.data.is_empty() => first.data = req.image_b64.clone(),
            Some(_) => return Err(InputError::TwoPrimaryImages),
        }
    }
    if images.is_empty() {
        return Err(InputError::MissingPrimary {
            camera: cameras[0].clone(),
        });
    }
    if images.len() > cameras.len() {
        return Err(InputError::TooManyImages {
            got: images.len(),
            max: cameras.len(),
            cameras: list(),
        });
    }
    let mut frames: Vec<Option<FrameInput>> = vec![None; cameras.len()];
    for (index, img) in images.into_iter().enumerate() {
        let slot = if img.camera.is_empty() {
            index
        } else {
            cameras
                .iter()
                .position(|c| *c == img.camera)
                .ok_or_else(|| InputError::UnknownCamera {
                    index,
                    name: quoted(&img.camera),
                    cameras: list(),
                })?
        };
        if index == 0 && slot != 0 {
            return Err(InputError::PrimaryNotFirst {
                primary: cameras[0].clone(),
                got: quoted(&img.camera),
            });
        }
        if frames[slot].is_some() {
            return Err(InputError::DuplicateCamera {
                index,
                name: cameras[slot].clone(),
            });
        }
        if img.data.is_empty() {
            return Err(InputError::EmptyImage {
                index,
                camera: cameras[slot].clone(),
            });
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
    })
}

/// A client's string as an error message repeats it: the first 64 characters. The message
/// travels in the `grpc-message` trailer, and a camera name of megabytes must not make it
/// that big (gRPC C-core clients refuse trailers over 16 KiB and report their own error
/// instead of ours).
fn quoted(s: &str) -> String {
    const MAX_CHARS: usize = 64;
    match s.char_indices().nth(MAX_CHARS) {
        None => s.to_string(),
        Some((cut, _)) => format!("{}…", &s[..cut]),
    }
}

type ActStream = Pin<Box<dyn Stream<Item = Result<pb::ActResponse, Status>> + Send>>;

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
        self.0
            .act_in_trace(request.into_inner(), parent)
            .await
            .map(Response::new)
    }

    type ActStreamStream = ActStream;

    async fn act_stream(
        &self,
        request: Request<Streaming<pb::ActRequest>>,
    ) -> Result<Response<Self::ActStreamStream>, Status> {
        // Every message's span continues the stream's `traceparent`, if any.
        let parent = self.0.telemetry.parent(request.metadata());
        let mut inbound = request.into_inner();
        // Small buffer: a control loop has one request in flight; backpressure
        // beyond that reaches the client through HTTP/2 flow control.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let svc = self.0.clone();
        tokio::spawn(async move {
            while let Some(msg) = inbound.next().await {
                let reply = match msg {
                    Ok(req) => match svc.act_in_trace(req, parent.clone()).await {
                        Ok(resp) => Ok(resp),
                        Err(status) => Ok(pb::ActResponse {
                            error: Some(pb::ActError {
                                code: format!("{:?}", status.code()),
                                message: status.message().to_string(),
                            }),
                            ..Default::default()
                        }),
                    },
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
        assert_eq!(
            to_input(&both, &cams()).unwrap_err(),
            InputError::TwoPrimaryImages
        );
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
