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
//! What they share is here: [`Shared`] (the Act seam, the token check, the certificate),
//! the TCP accept loop with its TLS handshake ([`serve`], for any [`FrontEnd`]), the queue's
//! connection key, and reading a token from the `Authorization` header.
//!
//! **Invariant:** a front-end never runs model work or touches the recorder itself; it
//! holds no state but its listener's.

pub mod http;
pub mod openpi;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthToken, TLS_HANDSHAKE_TIMEOUT};
use crate::service::PolicyService;

/// One accepted connection, in clear or after the TLS handshake.
pub type Stream = Either<TcpStream, tokio_rustls::server::TlsStream<TcpStream>>;

/// What every front-end of one server shares: the Act seam, and the token and certificate
/// of the TCP listeners.
pub struct Shared {
    pub service: Arc<PolicyService>,
    token: Option<Arc<AuthToken>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Shared {
    /// `tls`: the certificate the gRPC listeners serve, see [`crate::auth::load_rustls`].
    pub fn new(
        service: Arc<PolicyService>,
        token: Option<Arc<AuthToken>>,
        tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    ) -> Shared {
        Shared {
            service,
            token,
            tls: tls.map(tokio_rustls::TlsAcceptor::from),
        }
    }

    /// Whether a call that `presented` these credentials may go on: any call when the server
    /// has no token, else only one with it (compared in constant time). A refusal is logged
    /// (`slug=auth-refused`); the token never is.
    pub fn admits(&self, presented: Option<&[u8]>, peer: SocketAddr, front_end: &str) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let reason = match presented {
            Some(p) if !p.is_empty() && token.matches(p) => return true,
            Some(_) => "wrong",
            None => "missing",
        };
        tracing::warn!(
            slug = "auth-refused",
            service = front_end,
            %peer,
            reason,
            "call refused"
        );
        false
    }
}

/// One front-end's protocol on a connection; [`serve`] accepts the connections.
pub trait FrontEnd: Send + Sync + 'static {
    /// Its name in logs (`service=` of an auth refusal).
    const NAME: &'static str;
    /// Connections served at once; more wait in the listen backlog.
    const MAX_CONNECTIONS: usize;

    fn shared(&self) -> &Shared;

    /// Serves one connection until it ends or `stop`, then finishes the call it is in.
    fn connection(
        self: Arc<Self>,
        io: Stream,
        peer: SocketAddr,
        stop: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static;
}

/// Accepts connections from `listener` until `stop`, at most `F::MAX_CONNECTIONS` at once,
/// each one's TLS handshake (with the certificate) inside its own task; then waits for
/// every connection's task, which `stop` asks to finish what it is in.
pub async fn serve<F: FrontEnd>(fe: Arc<F>, listener: TcpListener, stop: CancellationToken) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept(), if conns.len() < F::MAX_CONNECTIONS => {
                let (io, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // E.g. out of file descriptors: wait instead of spinning.
                        tracing::warn!(error = %e, front_end = F::NAME, "cannot accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = io.set_nodelay(true);
                let (fe, stop) = (fe.clone(), stop.clone());
                match fe.shared().tls.clone() {
                    None => {
                        conns.spawn(fe.connection(Either::Left(io), peer, stop));
                    }
                    Some(acceptor) => {
                        conns.spawn(async move {
                            // The handshake inside the task: a slow client holds only
                            // its own connection, for at most the handshake timeout.
                            let handshake = acceptor.accept(io);
                            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, handshake).await {
                                Ok(Ok(tls)) => fe.connection(Either::Right(tls), peer, stop).await,
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
