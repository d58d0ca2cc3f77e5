//! Front-ends in the protocols robots already speak, beside our own gRPC: each one only
//! translates its wire form to a `reflex.v1.ActRequest` and back, and every call goes
//! through [`crate::service::PolicyService::submit`], the seam gRPC's Act goes through —
//! so a front-end's call gets the same admission (and refusal before any work), seq,
//! record, spans, metrics and errors as a gRPC call.
//!
//! - [`http`]: the seed tool's HTTP API (`reflex serve --http-listen ADDR`): `POST /act`,
//!   `GET /health`, `GET /config`, with its JSON bodies, error shapes and auth headers.
//! - [`openpi`]: openpi's websocket policy protocol (`reflex serve --openpi-listen ADDR`):
//!   msgpack observations with numpy arrays in, action chunks out, for openpi-client's
//!   `WebsocketClientPolicy`; [`openpi::mapping`] maps its observation keys onto the
//!   model's cameras, state and prompt.
//!
//! What they share is here: the TCP accept loop with its optional TLS handshake
//! ([`serve_tcp`]), the queue's connection key, and reading a token from the
//! `Authorization` header.
//!
//! **Invariant:** a front-end never runs model work or touches the recorder itself; it
//! holds no state but its listener's.

pub mod http;
pub mod openpi;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

/// One accepted connection, in clear or after the TLS handshake.
pub type Stream = Either<TcpStream, tokio_rustls::server::TlsStream<TcpStream>>;

/// Accepts connections from `listener` until `stop`, at most `max_connections` at once
/// (more wait in the listen backlog), each one's TLS handshake (with `tls`) inside its own
/// task; then waits for every connection's task, which `stop` asks to finish what it is in.
pub async fn serve_tcp<F, Fut>(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    max_connections: usize,
    stop: CancellationToken,
    name: &'static str,
    connection: F,
) where
    F: Fn(Stream, SocketAddr, CancellationToken) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept(), if conns.len() < max_connections => {
                let (io, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // E.g. out of file descriptors: wait instead of spinning.
                        tracing::warn!(error = %e, front_end = name, "cannot accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = io.set_nodelay(true);
                let stop = stop.clone();
                match tls.clone() {
                    None => {
                        conns.spawn(connection(Either::Left(io), peer, stop));
                    }
                    Some(acceptor) => {
                        let connection = connection.clone();
                        conns.spawn(async move {
                            // The handshake inside the task: a slow client holds only
                            // its own connection, for at most the handshake timeout.
                            match tokio::time::timeout(crate::auth::TLS_HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
                                Ok(Ok(tls)) => connection(Either::Right(tls), peer, stop).await,
                                Ok(Err(e)) => {
                                    tracing::debug!(error = %e, %peer, "tls handshake failed")
                                }
                                Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
                            }
                        });
                    }
                }
            }
        }
    }
    while conns.join_next().await.is_some() {}
}

/// The same key gRPC gives a TCP connection (the peer's address, top bit set), so the
/// queue's share per connection counts a front-end's connection as one.
pub fn connection_key(peer: SocketAddr) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    peer.hash(&mut h);
    h.finish() | 1 << 63
}

/// The credentials of `Authorization: SCHEME CREDENTIALS` when SCHEME is one of `schemes`
/// (compared without case, as RFC 9110 says); `None` when the header is absent, not text,
/// or of another scheme.
pub fn authorization<'h>(headers: &'h ::http::HeaderMap, schemes: &[&str]) -> Option<&'h [u8]> {
    let v = headers.get(::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    schemes
        .iter()
        .any(|s| scheme.eq_ignore_ascii_case(s))
        .then(|| rest.trim().as_bytes())
}
