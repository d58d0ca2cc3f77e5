//! The seed tool's HTTP API (`reflex serve --http-listen ADDR`), so that its client
//! (`reflex.client.ReflexClient` / `ReflexAsyncClient` of reflex-vla) drives `reflex
//! serve` unchanged.
//!
//! - `POST /act`: the seed's JSON body — `image` and `image_wrist` (base64 of an encoded
//!   frame), `instruction`, `state`, `episode_id` — becomes an `ActRequest` (`image` the
//!   primary camera, `image_wrist` the second, by position) and goes through
//!   [`PolicyService::submit`]. The answer has the seed's fields (`actions` as rows,
//!   `num_actions`, `action_dim`, `latency_ms`, `inference_mode`) and ours (`seq`,
//!   `noise_seed`, `cache`, `model_hash`, `recorded`, `latency` with its stages).
//! - `GET /health` (open, as gRPC Health is) and `GET /config` (the model's facts).
//! - Errors in the seed's shape, `{"error", "message"}`: 401 without the token
//!   (`Authorization: Bearer TOKEN` or the seed's `X-Reflex-Key: TOKEN`); 400 for a body
//!   that is not the seed's JSON, naming the field; 413 for a body over the limit, declared
//!   or not; 422 for a request the Act path refuses (`INVALID_ARGUMENT`: the seed's client
//!   does not retry a 422, while it would retry a 400); 503 with `Retry-After: 1` when the
//!   queue has no place (the seed client's retry), or when the bytes of all bodies being
//!   read are at their bound.
//!
//! TLS: with `--tls-cert`/`--tls-key`, the same certificate as the gRPC listeners
//! (rustls, `http/1.1`).
//!
//! Not produced: the seed's "degraded" 503 (`Retry-After: 60`): reflex has no circuit
//! breaker. HTTP carries no deadline, so these calls have none.
//!
//! Bounds: a body is at most the base64 of `--max-message-mb` plus 64 KiB; all bodies being
//! read at once share four times that; at most [`MAX_CONNECTIONS`] connections, headers
//! within 10 s, a body within [`BODY_TIMEOUT`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use reflex_proto::v1 as pb;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{FrontEnd, Shared};
use crate::service::Call;

/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 1024;
/// A request body must arrive within this.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// The HTTP front-end of one server: what every connection shares.
pub struct HttpFrontend {
    shared: Shared,
    max_body: usize,
    budget: BodyBudget,
}

/// Bytes of all request bodies being read or held at once.
struct BodyBudget {
    used: AtomicUsize,
    total: usize,
}

/// A share of the [`BodyBudget`], given back when dropped.
struct Held<'a> {
    budget: &'a BodyBudget,
    bytes: usize,
}

impl BodyBudget {
    fn take(&self, bytes: usize, held: &mut Held<'_>) -> bool {
        let ok = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&n| n <= self.total)
            })
            .is_ok();
        if ok {
            held.bytes += bytes;
        }
        ok
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

type Reply = Response<Full<Bytes>>;

impl HttpFrontend {
    /// `max_message_bytes` is `--max-message-mb`: the largest `ActRequest`; a body carries
    /// its images as base64, 4/3 of their bytes.
    pub fn new(shared: Shared, max_message_bytes: usize) -> HttpFrontend {
        let max_body = max_message_bytes.div_ceil(3).saturating_mul(4) + 64 * 1024;
        HttpFrontend {
            shared,
            max_body,
            budget: BodyBudget {
                used: AtomicUsize::new(0),
                total: max_body.saturating_mul(4),
            },
        }
    }

    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Reply {
        let arrived = Instant::now();
        let path = req.uri().path().to_string();
        match (req.method(), path.as_str()) {
            (&Method::GET | &Method::HEAD, "/health") => self.health(),
            (&Method::GET | &Method::HEAD, "/config") => match self.refusal(req.headers(), peer) {
                Some(r) => r,
                None => self.config(),
            },
            (&Method::POST, "/act") => match self.refusal(req.headers(), peer) {
                Some(r) => r,
                None => self.act(req, peer, arrived).await,
            },
            (_, "/health" | "/config" | "/act") => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!(
                    "{} {path}: use POST /act, GET /health, GET /config",
                    req.method()
                ),
            ),
            _ => error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no {path} here: POST /act, GET /health, GET /config"),
            ),
        }
    }

    /// The 401 for a call without the token, as the seed's client sends it (`X-Reflex-Key`)
    /// or as ours does (`Authorization: Bearer`); `None` lets it through. The token is
    /// never logged, never echoed.
    fn refusal(&self, headers: &HeaderMap, peer: SocketAddr) -> Option<Reply> {
        let presented = headers
            .get("x-reflex-key")
            .map(|v| v.as_bytes().trim_ascii())
            .or_else(|| super::authorization(headers, &["bearer"]));
        if self.shared.admits(presented, peer, Self::NAME) {
            return None;
        }
        Some(error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this server requires a token: send `X-Reflex-Key: TOKEN` or `Authorization: Bearer TOKEN`"
                .into(),
        ))
    }

    fn health(&self) -> Reply {
        let info = self.shared.service.info();
        reply(
            StatusCode::OK,
            &json!({
                "status": "ok",
                "state": "ready",
                "model_loaded": true,
                "inference_mode": info.mode,
                "model_hash": info.model_hash,
                "vlm_loaded": true,
            }),
        )
    }

    fn config(&self) -> Reply {
        let i = self.shared.service.info();
        reply(
            StatusCode::OK,
            &json!({
                "model_hash": i.model_hash,
                "config_hash": i.config_hash,
                "model_type": i.model_type,
                "export_kind": i.export_kind,
                "embodiment": i.embodiment,
                "cameras": i.cameras,
                "image_height": i.image_height,
                "image_width": i.image_width,
                "state_dim": i.state_dim,
                "action_dim": i.action_dim,
                "chunk_size": i.chunk_size,
                "num_denoising_steps": i.denoise_steps,
                "inference_mode": i.mode,
                "reflex_version": i.reflex_version,
                "session_id": i.session_id,
            }),
        )
    }

    async fn act(&self, req: Request<Incoming>, peer: SocketAddr, arrived: Instant) -> Reply {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body as u64) {
            return too_large(self.max_body);
        }
        let mut held = Held {
            budget: &self.budget,
            bytes: 0,
        };
        let body =
            match tokio::time::timeout(BODY_TIMEOUT, self.read_body(req.into_body(), &mut held))
                .await
            {
                Ok(Ok(b)) => b,
                Ok(Err(r)) => return r,
                Err(_) => {
                    return error(
                        StatusCode::REQUEST_TIMEOUT,
                        "timeout",
                        format!(
                            "the body did not arrive within {} s",
                            BODY_TIMEOUT.as_secs()
                        ),
                    );
                }
            };
        let request = match parse_act(&body) {
            Ok(r) => r,
            Err(message) => return error(StatusCode::BAD_REQUEST, "invalid_request", message),
        };
        drop(body);
        let call = Call {
            connection: Some(super::connection_key(peer)),
            deadline: None,
            arrived: Some(arrived),
        };
        let answer = self.shared.service.submit(request, None, call).await;
        drop(held);
        match answer.result {
            Ok(r) => reply(StatusCode::OK, &act_json(&r)),
            Err(status) => {
                let (code, slug) = match status.code() {
                    tonic::Code::ResourceExhausted => {
                        (StatusCode::SERVICE_UNAVAILABLE, "queue_full")
                    }
                    tonic::Code::InvalidArgument => {
                        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_argument")
                    }
                    tonic::Code::DeadlineExceeded => {
                        (StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded")
                    }
                    tonic::Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
                    _ => (StatusCode::INTERNAL_SERVER_ERROR, "inference_error"),
                };
                let mut body = json!({"error": slug, "message": status.message()});
                if let Some(seq) = answer.seq {
                    body["seq"] = json!(seq);
                }
                body["recorded"] = json!(answer.recorded);
                let mut r = reply(code, &body);
                if code == StatusCode::SERVICE_UNAVAILABLE {
                    r.headers_mut()
                        .insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
                }
                r
            }
        }
    }

    /// The whole body, within the per-body limit and the shared budget.
    async fn read_body(&self, mut body: Incoming, held: &mut Held<'_>) -> Result<Vec<u8>, Reply> {
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                error(
                    StatusCode::BAD_REQUEST,
                    "bad_body",
                    format!("the body could not be read: {e}"),
                )
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if out.len() + data.len() > self.max_body {
                return Err(too_large(self.max_body));
            }
            if !self.budget.take(data.len(), held) {
                let mut r = error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "busy",
                    "too many request bodies are being read at once; retry".into(),
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
                return Err(r);
            }
            out.extend_from_slice(&data);
        }
        Ok(out)
    }
}

impl FrontEnd for HttpFrontend {
    const NAME: &'static str = "http";
    const MAX_CONNECTIONS: usize = MAX_CONNECTIONS;

    fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Serves HTTP/1.1 on one connection until it ends; on `stop`, lets it finish the
    /// request it is in (graceful shutdown).
    async fn connection(
        self: Arc<Self>,
        io: super::Stream,
        peer: SocketAddr,
        stop: CancellationToken,
    ) {
        let fe = self.clone();
        let svc = hyper::service::service_fn(move |req| {
            let fe = fe.clone();
            async move { Ok::<_, Infallible>(fe.handle(req, peer).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10))
            .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
        tokio::pin!(conn);
        let res = tokio::select! {
            r = conn.as_mut() => r,
            _ = stop.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = res {
            tracing::debug!(error = %e, %peer, "http connection ended");
        }
    }
}

/// The seed's `/act` body as an `ActRequest`; the error names the field.
fn parse_act(body: &[u8]) -> Result<pb::ActRequest, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    let Value::Object(map) = v else {
        return Err(
            "the body must be a JSON object (image, instruction, state, episode_id)".into(),
        );
    };
    let text = |field: &str| -> Result<String, String> {
        match map.get(field) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(format!("{field}: expected a string")),
        }
    };
    let image = |field: &str| -> Result<Vec<u8>, String> {
        let b64 = text(field)?;
        let b64 = b64.trim();
        // A data URL's prefix, as browsers and some clients write it.
        let b64 = match b64.split_once(";base64,") {
            Some((prefix, rest)) if prefix.starts_with("data:") => rest,
            _ => b64,
        };
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| format!("{field}: not valid base64 ({e})"))
    };
    let state = match map.get("state") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_f64()
                    .map(|f| f as f32)
                    .ok_or_else(|| format!("state[{i}]: expected a number"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err("state: expected an array of numbers".into()),
    };
    let primary = image("image")?;
    let wrist = image("image_wrist")?;
    let mut images = vec![pb::Image {
        data: primary,
        ..Default::default()
    }];
    if !wrist.is_empty() {
        images.push(pb::Image {
            data: wrist,
            ..Default::default()
        });
    }
    if images.len() == 1 && images[0].data.is_empty() {
        images.clear();
    }
    Ok(pb::ActRequest {
        images,
        instruction: text("instruction")?,
        state,
        episode_id: text("episode_id")?,
        ..Default::default()
    })
}

/// The seed's answer fields, then ours.
fn act_json(r: &pb::ActResponse) -> Value {
    let dim = (r.action_dim as usize).max(1);
    let rows: Vec<&[f32]> = r.actions.chunks(dim).collect();
    let l = r.latency.unwrap_or_default();
    json!({
        "actions": rows,
        "num_actions": r.num_actions,
        "action_dim": r.action_dim,
        "latency_ms": l.total_ms,
        "inference_mode": r.mode,
        "seq": r.seq,
        "noise_seed": r.noise_seed,
        "cache": r.cache,
        "model_hash": r.model_hash,
        "recorded": r.recorded,
        "latency": {
            "total_ms": l.total_ms,
            "stages": {
                "queue_ms": l.queue_ms,
                "decode_ms": l.decode_ms,
                "prefix_ms": l.prefix_ms,
                "denoise_ms": l.denoise_ms,
                "postprocess_ms": l.postprocess_ms,
            },
        },
    })
}

fn too_large(limit: usize) -> Reply {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("the body is larger than {limit} bytes (--max-message-mb, as base64)"),
    )
}

fn error(code: StatusCode, slug: &str, message: String) -> Reply {
    reply(code, &json!({"error": slug, "message": message}))
}

fn reply(code: StatusCode, body: &Value) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seeds_body_becomes_an_act_request() {
        let body = br#"{"image":"aGk=","image_wrist":"d3I=","instruction":"pick","state":[0.5,1],"episode_id":"e","extra":1}"#;
        let r = parse_act(body).unwrap();
        assert_eq!(r.images.len(), 2);
        assert_eq!(
            (r.images[0].data.as_slice(), r.images[1].data.as_slice()),
            (&b"hi"[..], &b"wr"[..])
        );
        assert!(
            r.images[0].camera.is_empty(),
            "by position: the primary camera"
        );
        assert_eq!(
            (r.instruction.as_str(), r.state.as_slice()),
            ("pick", &[0.5f32, 1.0][..])
        );
        assert_eq!(r.episode_id, "e");
        // The seed's client sends nulls for what it lacks.
        let r = parse_act(br#"{"image":null,"instruction":"","state":null,"episode_id":null}"#)
            .unwrap();
        assert!(r.images.is_empty() && r.state.is_empty());
        let r = parse_act(br#"{"image":"data:image/jpeg;base64,aGk="}"#).unwrap();
        assert_eq!(r.images[0].data, b"hi");
    }

    #[test]
    fn bad_bodies_name_the_field() {
        let err = |b: &[u8]| parse_act(b).unwrap_err();
        assert!(err(b"{not json").starts_with("the body is not JSON"));
        assert!(err(b"[1]").contains("JSON object"));
        assert_eq!(err(br#"{"image":"%%%"}"#).split(':').next(), Some("image"));
        assert_eq!(
            err(br#"{"image_wrist":7}"#),
            "image_wrist: expected a string"
        );
        assert_eq!(
            err(br#"{"state":"1,2"}"#),
            "state: expected an array of numbers"
        );
        assert_eq!(err(br#"{"state":[1,"x"]}"#), "state[1]: expected a number");
        assert_eq!(
            err(br#"{"instruction":["a"]}"#),
            "instruction: expected a string"
        );
    }

    #[test]
    fn the_body_budget_is_shared_and_given_back() {
        let budget = BodyBudget {
            used: AtomicUsize::new(0),
            total: 10,
        };
        let mut a = Held {
            budget: &budget,
            bytes: 0,
        };
        assert!(budget.take(6, &mut a));
        let mut b = Held {
            budget: &budget,
            bytes: 0,
        };
        assert!(!budget.take(5, &mut b), "6 + 5 is over 10");
        assert!(budget.take(4, &mut b));
        drop(a);
        assert_eq!(budget.used.load(Ordering::Acquire), 4);
        drop(b);
        assert_eq!(budget.used.load(Ordering::Acquire), 0);
    }

    #[test]
    fn answers_carry_the_seeds_fields_and_ours() {
        let r = pb::ActResponse {
            actions: vec![1.0, 2.0, 3.0, 4.0],
            num_actions: 2,
            action_dim: 2,
            seq: 5,
            noise_seed: 9,
            mode: "cpu".into(),
            cache: "hit".into(),
            latency: Some(pb::Latency {
                total_ms: 3.5,
                ..Default::default()
            }),
            ..Default::default()
        };
        let v = act_json(&r);
        assert_eq!(v["actions"], json!([[1.0, 2.0], [3.0, 4.0]]));
        assert_eq!(
            (v["latency_ms"].as_f64(), v["inference_mode"].as_str()),
            (Some(3.5), Some("cpu"))
        );
        assert_eq!(
            (v["seq"].as_u64(), v["noise_seed"].as_u64()),
            (Some(5), Some(9))
        );
        assert!(v["latency"]["stages"].is_object());
    }
}
