//! The reflex.v1 wire contract: generated messages, clients and servers for
//! `reflex.v1.Policy` and `reflex.v1.Recorder`, plus the encoded file
//! descriptor set that server reflection serves (grpcurl needs no .proto); and the
//! client side of dialing: [`connect`], and [`connect_with`] for servers that want a
//! bearer token or TLS; and [`CallTracer`], the hook a client traces its calls through.
//!
//! The `.proto` under `proto/reflex/v1/` is the single source of the wire schema. Beside
//! it, the contracts that cross processes and that the proto cannot state, each defined
//! once and imported by the server, the recorder and the replayer:
//! - [`images`]: `ImageMode`, the primary-image rule, canonical images and their SHA-256;
//! - [`errors`]: canonical gRPC code names and the server's error slugs;
//! - [`time`]: the RFC 3339 formatter of every timestamp on the wire and in traces.

pub mod codec;
pub mod errors;
pub mod images;
pub mod time;
pub mod tracer;

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("reflex.v1");
}

/// Encoded `FileDescriptorSet` of `reflex/v1/reflex.proto`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/reflex_descriptor.bin"));

pub use tracer::{CallSpan, CallTracer};
pub use v1::*;

/// Opens a channel to a reflex server or recorder.
///
/// `target` is `unix:///path/to.sock` (or `unix:path`), `http://host:port`,
/// `tcp://host:port` or `host:port`. Over a Unix socket the `:authority` is
/// `localhost`: h2 servers refuse a socket path there (see the server's
/// `authority` module), so our own clients never send one.
pub async fn connect(target: &str) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    endpoint(target)?.connect().await
}

/// A channel that sends the bearer token of its [`ConnectOptions`] with every call.
pub type AuthChannel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerToken>;

/// Like [`connect`], for a server that wants a bearer token and/or TLS.
///
/// `https://host:port` targets use TLS and need [`ConnectOptions::tls_ca_file`] (the CA
/// that signed the server's certificate; there are no built-in roots). The token goes
/// with every call as `authorization: Bearer TOKEN`.
pub async fn connect_with(
    target: &str,
    opts: &ConnectOptions,
) -> Result<AuthChannel, ConnectError> {
    let mut connector = endpoint(target)?;
    let https = matches!(&connector, Connector::Tcp(ep) if ep.uri().scheme_str() == Some("https"));
    match (&mut connector, https, &opts.ca_pem) {
        (Connector::Tcp(ep), true, Some(ca)) => {
            let mut tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca));
            if let Some(d) = &opts.tls_domain {
                tls = tls.domain_name(d.clone());
            }
            **ep = ep.as_ref().clone().tls_config(tls)?;
        }
        (_, true, None) => return Err(ConnectError::HttpsNeedsCa(target.into())),
        (_, false, Some(_)) => return Err(ConnectError::CaWithoutHttps(target.into())),
        _ => {}
    }
    let channel = connector.connect().await?;
    Ok(tonic::service::interceptor::InterceptedService::new(
        channel,
        BearerToken(opts.bearer.clone()),
    ))
}

/// What [`connect_with`] needs beyond the target: a bearer token, a CA for `https://`.
#[derive(Clone, Default)]
pub struct ConnectOptions {
    bearer: Option<tonic::metadata::AsciiMetadataValue>,
    ca_pem: Option<Vec<u8>>,
    tls_domain: Option<String>,
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("bearer", &self.bearer.as_ref().map(|_| ".."))
            .field("tls_ca", &self.ca_pem.is_some())
            .field("tls_domain", &self.tls_domain)
            .finish()
    }
}

impl ConnectOptions {
    /// Sends `authorization: Bearer TOKEN` (surrounding whitespace trimmed).
    pub fn bearer_token(mut self, token: &str) -> Result<Self, ConnectError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(ConnectError::EmptyToken);
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConnectError::TokenCharacters);
        }
        let mut v: tonic::metadata::AsciiMetadataValue = format!("Bearer {token}")
            .parse()
            .map_err(|_| ConnectError::TokenCharacters)?;
        // Kept out of Debug output of the request's headers.
        v.set_sensitive(true);
        self.bearer = Some(v);
        Ok(self)
    }

    /// The token from a file (what `reflex serve --auth-token-file` reads).
    pub fn bearer_token_file(self, path: &std::path::Path) -> Result<Self, ConnectError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConnectError::Read {
            what: "token file",
            path: path.into(),
            source,
        })?;
        self.bearer_token(&text)
    }

    /// Trusts the CA certificate(s) in PEM for `https://` targets.
    pub fn tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// Trusts the CA certificate(s) in a PEM file for `https://` targets.
    pub fn tls_ca_file(self, path: &std::path::Path) -> Result<Self, ConnectError> {
        let pem = std::fs::read(path).map_err(|source| ConnectError::Read {
            what: "CA file",
            path: path.into(),
            source,
        })?;
        Ok(self.tls_ca_pem(pem))
    }

    /// Checks the server's certificate against `name` instead of the target's host.
    pub fn tls_domain(mut self, name: impl Into<String>) -> Self {
        self.tls_domain = Some(name.into());
        self
    }
}

/// The interceptor of [`AuthChannel`]: adds the `authorization` metadata, if any.
#[derive(Clone)]
pub struct BearerToken(Option<tonic::metadata::AsciiMetadataValue>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// Why [`connect_with`] could not dial.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the bearer token is empty")]
    EmptyToken,
    #[error(
        "the bearer token holds a character that cannot travel in a gRPC header \
         (space, control character or non-ASCII)"
    )]
    TokenCharacters,
    #[error(
        "{0}: an https:// target needs the CA certificate that signed the server's (a CA file)"
    )]
    HttpsNeedsCa(String),
    #[error("{0}: a CA file is only for TLS; use https://HOST:PORT")]
    CaWithoutHttps(String),
}

fn endpoint(target: &str) -> Result<Connector, tonic::transport::Error> {
    if let Some(path) = target
        .strip_prefix("unix://")
        .or_else(|| target.strip_prefix("unix:"))
    {
        return Ok(Connector::Unix(std::path::PathBuf::from(path)));
    }
    let rest = target.strip_prefix("tcp://").unwrap_or(target);
    let uri = if rest.starts_with("http://") || rest.starts_with("https://") {
        rest.to_string()
    } else {
        format!("http://{rest}")
    };
    Ok(Connector::Tcp(Box::new(
        tonic::transport::Endpoint::from_shared(uri)?.tcp_nodelay(true),
    )))
}

enum Connector {
    Unix(std::path::PathBuf),
    Tcp(Box<tonic::transport::Endpoint>),
}

impl Connector {
    async fn connect(self) -> Result<tonic::transport::Channel, tonic::transport::Error> {
        match self {
            Connector::Tcp(ep) => ep.connect().await,
            Connector::Unix(path) => {
                // The URI is only a placeholder for the authority; the connector dials the socket.
                tonic::transport::Endpoint::from_static("http://localhost")
                    .connect_with_connector(tower::service_fn(move |_| {
                        let path = path.clone();
                        async move {
                            let s = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                        }
                    }))
                    .await
            }
        }
    }
}

/// `e` and its sources, joined, repeats skipped (tonic's transport and TLS
/// errors say little at the top).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_trimmed_checked_and_kept_out_of_debug() {
        let o = ConnectOptions::default()
            .bearer_token(" abc-123\n")
            .unwrap();
        assert_eq!(
            o.bearer.as_ref().unwrap().to_str().unwrap(),
            "Bearer abc-123"
        );
        assert!(!format!("{o:?}").contains("abc-123"));
        assert!(matches!(
            ConnectOptions::default().bearer_token(" \n"),
            Err(ConnectError::EmptyToken)
        ));
        assert!(matches!(
            ConnectOptions::default().bearer_token("two words"),
            Err(ConnectError::TokenCharacters)
        ));
        let e = ConnectOptions::default()
            .bearer_token_file(std::path::Path::new("/nonexistent/token"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot read token file /nonexistent/token"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn tls_needs_https_and_a_ca_before_dialing() {
        let e = connect_with("https://localhost:1", &ConnectOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(e, ConnectError::HttpsNeedsCa(_)), "{e}");
        let ca = ConnectOptions::default().tls_ca_pem(b"not used".to_vec());
        for plain in [
            "127.0.0.1:1",
            "http://127.0.0.1:1",
            "unix:///nonexistent.sock",
        ] {
            let e = connect_with(plain, &ca).await.unwrap_err();
            assert!(matches!(e, ConnectError::CaWithoutHttps(_)), "{plain}: {e}");
        }
    }
}
