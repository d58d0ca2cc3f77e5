//! openpi's websocket policy protocol (`reflex serve --openpi-listen ADDR`), so that
//! openpi-client's `WebsocketClientPolicy` (and `ActionChunkBroker` over it) drives `reflex
//! serve` unchanged.
//!
//! The protocol, as openpi's `WebsocketPolicyServer` speaks it: on connect the server sends
//! one binary frame, its metadata dict packed with msgpack; then per call the client sends a
//! binary frame, the packed observation dict, and the server answers a binary frame, the
//! packed `{"actions": ndarray[H, D] float32, "policy_timing": {"infer_ms"}, "server_timing":
//! {"infer_ms", "prev_total_ms" from the second call}}` — plus ours under `"reflex"`:
//! `seq`, `noise_seed`, `cache`, `model_hash`, `recorded` (a client that does not look there
//! sees openpi's answer; `ActionChunkBroker` passes non-arrays through). numpy values travel
//! as `msgpack_numpy` packs them ([`wire`]). On an error, as openpi does, the server sends
//! the message as a *text* frame (the client raises it) and closes with 1011 (internal
//! error); the client reconnects. Every message starts with the canonical gRPC code name
//! (`INVALID_ARGUMENT: …`) and names the observation key when one is at fault.
//!
//! - The observation's keys map onto the model's cameras, state and prompt by
//!   [`mapping`] (`--openpi-preset`, `--openpi-map`), images from uint8 arrays (no JPEG on
//!   this path), and every call goes through [`PolicyService::submit`]: admitted, seq'd,
//!   recorded, traced and counted like a gRPC call. `noise_seed` in the observation is the
//!   call's seed (openpi has none).
//! - `GET /healthz` answers `OK` (openpi's health check); any other plain HTTP request is
//!   answered 426 Upgrade Required.
//! - Auth: with `--auth-token-file`, the handshake must carry `Authorization: Api-Key
//!   TOKEN` (what `WebsocketClientPolicy(api_key=…)` sends; `Bearer` works too), else it is
//!   refused with 401 before the upgrade. The token is compared in constant time
//!   ([`Shared::admits`]) and never logged.
//! - TLS: with `--tls-cert`/`--tls-key`, `wss://` with the certificate the other listeners
//!   serve.
//!
//! Bounds: a message is at most `--max-message-mb` plus 64 KiB (a raw frame is not base64:
//! the limit is the images' own bytes); a bigger one is read to its end and thrown away
//! (nothing of it is kept), then answered with the error, so the client sees the message
//! rather than a reset — unless it pauses [`DRAIN_QUIET`] in the middle. At most
//! [`MAX_CONNECTIONS`] connections (robots, each with one call in flight at a time), so at
//! most that many messages in memory; the handshake within [`HANDSHAKE_TIMEOUT`]. An idle
//! connection is kept: a robot may pause between episodes.
//!
//! The work on the async runtime per call is decoding the message (borrowing it: a frame is
//! not copied) and encoding each frame as PNG (see [`mapping`] for why, and its cost);
//! inference runs on the pool, as for gRPC. On shutdown a connection finishes the call it is
//! in and closes with 1001 (going away).

pub mod mapping;
pub mod wire;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use reflex_proto::v1 as pb;
use tokio::io::AsyncReadExt;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, error::CapacityError};
use tokio_util::sync::CancellationToken;

use super::{FrontEnd, Shared};
use crate::service::Call;
use mapping::Mapping;
use wire::Writer;

/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 64;
/// The HTTP request that opens a connection must arrive within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A message over the limit is drained until the client has sent nothing for this long.
pub const DRAIN_QUIET: Duration = Duration::from_millis(250);
/// ... and for at most this long in all.
pub const DRAIN_MAX: Duration = Duration::from_secs(30);

/// What openpi's server says in its close frame after an error.
const CLOSE_REASON: &str = "Internal server error. Traceback included in previous frame.";

/// The openpi front-end of one server: what every connection shares.
pub struct OpenpiFrontend {
    shared: Shared,
    mapping: Mapping,
    max_message: usize,
    /// The packed metadata, the first frame of every connection.
    metadata: Bytes,
}

type Reply = Response<Full<Bytes>>;

impl OpenpiFrontend {
    /// `max_message_bytes` is `--max-message-mb`.
    pub fn new(shared: Shared, mapping: Mapping, max_message_bytes: usize) -> OpenpiFrontend {
        let metadata = metadata(shared.service.info(), &mapping);
        OpenpiFrontend {
            shared,
            mapping,
            max_message: max_message_bytes + 64 * 1024,
            metadata,
        }
    }

    /// The answer to the HTTP request: 101 for a websocket handshake with the token, 401
    /// without it, `OK` on `/healthz`, 426 for anything else.
    fn handshake(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        slot: &Mutex<Option<OnUpgrade>>,
    ) -> Reply {
        let h = req.headers();
        let has = |name: header::HeaderName, token: &str| {
            h.get_all(name).iter().any(|v| {
                v.to_str()
                    .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            })
        };
        let websocket = req.method() == Method::GET
            && has(header::UPGRADE, "websocket")
            && has(header::CONNECTION, "upgrade");
        if !websocket {
            if matches!(*req.method(), Method::GET | Method::HEAD) && req.uri().path() == "/healthz"
            {
                return text(StatusCode::OK, "OK\n");
            }
            let mut r = text(
                StatusCode::UPGRADE_REQUIRED,
                "this port speaks openpi's websocket policy protocol: connect with \
                 openpi_client.websocket_client_policy.WebsocketClientPolicy (GET /healthz for health)\n",
            );
            r.headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            return r;
        }
        if let Some(r) = self.refusal(h, peer) {
            return r;
        }
        if h.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
            let mut r = text(StatusCode::UPGRADE_REQUIRED, "websocket version 13 only\n");
            r.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
            return r;
        }
        let Some(key) = h.get(header::SEC_WEBSOCKET_KEY) else {
            return text(StatusCode::BAD_REQUEST, "Sec-WebSocket-Key is missing\n");
        };
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let on = hyper::upgrade::on(&mut req);
        match slot.lock() {
            Ok(mut s) => *s = Some(on),
            Err(_) => {
                return text(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n");
            }
        }
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let hs = r.headers_mut();
        hs.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        hs.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        // The accept key is base64: always a valid header value.
        if let Ok(v) = HeaderValue::from_str(&accept) {
            hs.insert(header::SEC_WEBSOCKET_ACCEPT, v);
        }
        r
    }

    /// The 401 for a handshake without the token; `None` lets it through.
    fn refusal(&self, headers: &HeaderMap, peer: SocketAddr) -> Option<Reply> {
        let presented = super::authorization(headers, &["api-key", "bearer"]);
        if self.shared.admits(presented, peer, Self::NAME) {
            return None;
        }
        Some(text(
            StatusCode::UNAUTHORIZED,
            "this server requires a token: WebsocketClientPolicy(host, port, api_key=TOKEN) \
             (sent as `Authorization: Api-Key TOKEN`)\n",
        ))
    }

    /// One connection's calls, one at a time, until the client closes, an error, or `stop`.
    async fn session<S>(&self, io: S, peer: SocketAddr, stop: CancellationToken)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let config = WebSocketConfig::default()
            .max_message_size(Some(self.max_message))
            .max_frame_size(Some(self.max_message));
        let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
        if ws
            .send(Message::Binary(self.metadata.clone()))
            .await
            .is_err()
        {
            return;
        }
        tracing::debug!(%peer, "openpi session opened");
        let mut prev_total_ms = None;
        loop {
            let msg = tokio::select! {
                m = ws.next() => m,
                _ = stop.cancelled() => {
                    let _ = ws
                        .close(Some(CloseFrame {
                            code: CloseCode::Away,
                            reason: "server shutting down".into(),
                        }))
                        .await;
                    return;
                }
            };
            let message = match msg {
                None => return,
                Some(Ok(Message::Binary(b))) => b,
                Some(Ok(Message::Text(_))) => {
                    let e = "INVALID_ARGUMENT: expected a binary frame, the observation packed with \
                             msgpack (openpi_client.msgpack_numpy), got a text frame";
                    fail(&mut ws, e.into()).await;
                    return;
                }
                // Pings are answered by the library; a close is answered and ends the stream.
                Some(Ok(_)) => continue,
                Some(Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size }))) => {
                    drain(ws.get_mut()).await;
                    let e = format!(
                        "INVALID_ARGUMENT: the message is {size} bytes; this server takes at most \
                         {max_size} (--max-message-mb plus 64 KiB)"
                    );
                    fail(&mut ws, e).await;
                    return;
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, %peer, "openpi session ended");
                    return;
                }
            };
            let arrived = Instant::now();
            match self.call(&message, peer, arrived, prev_total_ms).await {
                Ok(answer) => {
                    drop(message);
                    if ws.send(Message::Binary(answer.into())).await.is_err() {
                        return;
                    }
                    prev_total_ms = Some(arrived.elapsed().as_secs_f64() * 1e3);
                }
                Err(e) => {
                    fail(&mut ws, e).await;
                    return;
                }
            }
        }
    }

    /// One observation in, the packed answer out; `Err` is the error frame's text.
    async fn call(
        &self,
        message: &[u8],
        peer: SocketAddr,
        arrived: Instant,
        prev_total_ms: Option<f64>,
    ) -> Result<Vec<u8>, String> {
        let request = wire::read(message)
            .map_err(mapping::ObservationError::from)
            .and_then(|obs| self.mapping.request(obs))
            .map_err(|e| format!("INVALID_ARGUMENT: {e}"))?;
        let call = Call {
            connection: Some(super::connection_key(peer)),
            deadline: None,
            arrived: Some(arrived),
        };
        let answer = self.shared.service.submit(request, None, call).await;
        let infer_ms = arrived.elapsed().as_secs_f64() * 1e3;
        match answer.result {
            Ok(r) => Ok(reply(&r, infer_ms, prev_total_ms)),
            Err(status) => {
                let code = reflex_proto::errors::code_name(status.code());
                Err(match answer.seq {
                    Some(seq) => format!("{code}: {} (seq {seq})", status.message()),
                    None => format!("{code}: {}", status.message()),
                })
            }
        }
    }
}

impl FrontEnd for OpenpiFrontend {
    const NAME: &'static str = "openpi";
    const MAX_CONNECTIONS: usize = MAX_CONNECTIONS;

    fn shared(&self) -> &Shared {
        &self.shared
    }

    /// The HTTP/1.1 request that opens the websocket (hyper answers it), then the session
    /// on the same connection.
    async fn connection(
        self: Arc<Self>,
        io: super::Stream,
        peer: SocketAddr,
        stop: CancellationToken,
    ) {
        // The upgrade the handshake answered 101 to; taken once the 101 is written.
        let upgrade: Arc<Mutex<Option<OnUpgrade>>> = Arc::default();
        let fe = self.clone();
        let slot = upgrade.clone();
        let svc = hyper::service::service_fn(move |req| {
            let reply = fe.handshake(req, peer, &slot);
            async move { Ok::<_, Infallible>(reply) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(HANDSHAKE_TIMEOUT)
            .serve_connection(TokioIo::new(io), svc)
            .with_upgrades();
        tokio::pin!(conn);
        let res = tokio::select! {
            r = conn.as_mut() => r,
            _ = stop.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = res {
            tracing::debug!(error = %e, %peer, "openpi connection ended");
            return;
        }
        // Only this task takes it; a poisoned lock means the handshake panicked.
        let taken = upgrade.lock().ok().and_then(|mut u| u.take());
        if let Some(on) = taken {
            match on.await {
                Ok(upgraded) => self.session(TokioIo::new(upgraded), peer, stop).await,
                Err(e) => tracing::debug!(error = %e, %peer, "openpi upgrade failed"),
            }
        }
    }
}

/// openpi's answer, and ours under `"reflex"`.
fn reply(r: &pb::ActResponse, infer_ms: f64, prev_total_ms: Option<f64>) -> Vec<u8> {
    let l = r.latency.unwrap_or_default();
    let mut w = Writer::default();
    w.map(4)
        .str("actions")
        .ndarray_f32(&[r.num_actions as usize, r.action_dim as usize], &r.actions);
    // The model's own time, as openpi's `policy_timing` is.
    let model_ms = l.decode_ms + l.prefix_ms + l.denoise_ms + l.postprocess_ms;
    w.str("policy_timing")
        .map(1)
        .str("infer_ms")
        .float(model_ms);
    w.str("server_timing")
        .map(1 + u32::from(prev_total_ms.is_some()))
        .str("infer_ms")
        .float(infer_ms);
    if let Some(ms) = prev_total_ms {
        w.str("prev_total_ms").float(ms);
    }
    w.str("reflex").map(5);
    w.str("seq").uint(r.seq);
    w.str("noise_seed").uint(r.noise_seed);
    w.str("cache").str(&r.cache);
    w.str("model_hash").str(&r.model_hash);
    w.str("recorded").bool(r.recorded);
    w.0
}

/// The first frame: what openpi's server sends as its policy's metadata, here the model's
/// facts and the observation keys this server reads.
fn metadata(i: &pb::ModelInfo, mapping: &Mapping) -> Bytes {
    let mut w = Writer::default();
    let strs = |w: &mut Writer, items: &[String]| {
        w.array(items.len() as u32);
        for s in items {
            w.str(s);
        }
    };
    w.map(12);
    w.str("server").str("reflex");
    w.str("reflex_version").str(&i.reflex_version);
    w.str("model_hash").str(&i.model_hash);
    w.str("model_type").str(&i.model_type);
    w.str("mode").str(&i.mode);
    w.str("cameras");
    strs(&mut w, &i.cameras);
    w.str("image_height").uint(i.image_height.into());
    w.str("image_width").uint(i.image_width.into());
    w.str("state_dim").uint(i.state_dim.into());
    w.str("action_dim").uint(i.action_dim.into());
    w.str("action_horizon").uint(i.chunk_size.into());
    let keys = mapping.keys();
    w.str("observation_keys").map(4).str("cameras");
    strs(&mut w, &keys.cameras);
    w.str("state");
    strs(&mut w, &keys.state);
    w.str("prompt");
    match &keys.prompt {
        Some(p) => w.str(p),
        None => w.str(""),
    };
    w.str("noise_seed").str(mapping::NOISE_SEED_KEY);
    Bytes::from(w.0)
}

/// Reads and throws away what the client still sends of a message over the limit, so that
/// it gets to read the error instead of a connection reset.
async fn drain<S: tokio::io::AsyncRead + Unpin>(io: &mut S) {
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + DRAIN_MAX;
    loop {
        let quiet = (tokio::time::Instant::now() + DRAIN_QUIET).min(deadline);
        match tokio::time::timeout_at(quiet, io.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
    }
}

/// openpi's error answer: the message as a text frame, then close with 1011; then waits
/// (briefly) for the client's close so that both frames reach it.
async fn fail<S>(ws: &mut WebSocketStream<S>, message: String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tracing::debug!(error = %message, "openpi call failed");
    if ws.send(Message::Text(message.into())).await.is_err() {
        return;
    }
    let close = CloseFrame {
        code: CloseCode::Error,
        reason: CLOSE_REASON.into(),
    };
    if ws.close(Some(close)).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

fn text(code: StatusCode, body: &'static str) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_what_msgpack_numpy_unpacks() {
        let r = pb::ActResponse {
            actions: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            num_actions: 3,
            action_dim: 2,
            seq: 7,
            noise_seed: 9,
            cache: "miss".into(),
            ..Default::default()
        };
        let packed = reply(&r, 2.5, Some(4.0));
        let wire::Value::Map(e) = wire::read(&packed).unwrap() else {
            panic!()
        };
        let get = |k: &str| {
            &e.iter()
                .find(|(key, _)| wire::key_text(key) == Some(k))
                .unwrap()
                .1
        };
        let wire::Value::NdArray(a) = get("actions") else {
            panic!("{:?}", get("actions"))
        };
        assert_eq!(a.shape, [3, 2]);
        assert_eq!(a.to_f32().unwrap(), r.actions);
        let wire::Value::Map(st) = get("server_timing") else {
            panic!()
        };
        assert_eq!(st.len(), 2, "prev_total_ms once known");
        let wire::Value::Map(ours) = get("reflex") else {
            panic!()
        };
        assert!(ours.contains(&(wire::Value::Str("seq"), wire::Value::Int(7))));
        let packed = reply(&r, 2.5, None);
        assert!(!String::from_utf8_lossy(&packed).contains("prev_total_ms"));
    }

    #[test]
    fn the_metadata_is_a_map_with_the_keys() {
        let info = pb::ModelInfo {
            cameras: vec!["base".into(), "wrist".into()],
            chunk_size: 50,
            ..Default::default()
        };
        let m = Mapping::new(mapping::Preset::Libero.keys(), &info.cameras);
        let md = metadata(&info, &m);
        let wire::Value::Map(e) = wire::read(&md).unwrap() else {
            panic!()
        };
        assert_eq!(e.len(), 12);
        assert!(e.contains(&(wire::Value::Str("action_horizon"), wire::Value::Int(50))));
    }
}
