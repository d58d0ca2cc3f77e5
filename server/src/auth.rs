//! Access control for TCP listeners: a bearer token (`--auth-token-file`) and TLS
//! (`--tls-cert`, `--tls-key`).
//!
//! Design:
//! - The token comes from a file, never from a flag value or an environment variable:
//!   every user can read a process's argv, and an environment ends up in crash reports
//!   and `systemctl show`. The file must not be readable by "other"; under systemd,
//!   `LoadCredential=` hands the service a private copy.
//! - Only the token's SHA-256 is kept. A presented token is hashed and the two digests
//!   are compared in constant time (`subtle`), so timing reveals neither the content nor
//!   the length of the secret.
//! - [`BearerAuth`] is a tonic interceptor: it only reads the `authorization` metadata.
//!   `serve` wraps Policy and reflection with it on TCP listeners; `grpc.health.v1.Health`
//!   stays open (probes need no secret, and it tells nothing but SERVING).
//! - Unix listeners are not token-checked: the socket's mode (0660) and its folder decide
//!   who may connect. `serve` builds one router per listener, so this is a property of the
//!   router, not a per-call guess about the peer.
//! - TLS is rustls (ring) through tonic; the key file gets the same "not readable by
//!   other" rule as the token.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::transport::{Identity, ServerTlsConfig};
use tonic::{Request, Status};

/// A token file larger than this is a mistake (a key, a whole config), not a token.
pub const MAX_TOKEN_FILE_BYTES: u64 = 4096;

/// Tokens shorter than this start with a warning: they can be guessed.
pub const SHORT_TOKEN: usize = 16;

/// A TLS handshake that takes longer than this is dropped (a stalled peer holds a task).
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a secret file (token, TLS key) or a certificate cannot be used; the server does not start.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{what} {} is readable by every user (mode {mode:04o}); make it private with \
         `chmod 600 {}` (owned by the user the server runs as), or hand it over with \
         systemd's LoadCredential=",
        path.display(),
        path.display()
    )]
    ReadableByOther {
        what: &'static str,
        path: PathBuf,
        mode: u32,
    },
    #[error(
        "--auth-token-file {} is {size} bytes; it should hold one token (at most {MAX_TOKEN_FILE_BYTES} bytes)",
        path.display()
    )]
    TokenFileTooLarge { path: PathBuf, size: u64 },
    #[error("--auth-token-file {} is empty; put one token in it (e.g. `openssl rand -hex 32`)", path.display())]
    TokenEmpty { path: PathBuf },
    #[error(
        "--auth-token-file {} holds a character that cannot travel in a gRPC header \
         (space, control character or non-ASCII); use letters, digits and -._~+/=",
        path.display()
    )]
    TokenCharacters { path: PathBuf },
    #[error("--tls-cert {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)", path.display())]
    NotACertificate { path: PathBuf },
    #[error("--tls-key {} holds no PEM private key (-----BEGIN ... PRIVATE KEY-----)", path.display())]
    NotAKey { path: PathBuf },
    #[error("--tls-cert {} and --tls-key {} cannot be used together: {reason}", cert.display(), key.display())]
    Tls {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// The server's token, as its SHA-256 only.
#[derive(Clone)]
pub struct AuthToken {
    digest: [u8; 32],
}

impl std::fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthToken(..)")
    }
}

impl AuthToken {
    /// Reads `--auth-token-file`: private to its owner, one token (surrounding whitespace
    /// trimmed), characters a header can carry.
    pub fn load(path: &Path) -> Result<AuthToken, AuthError> {
        let what = "--auth-token-file";
        let bytes = read_private(what, path, MAX_TOKEN_FILE_BYTES)?;
        if bytes.len() as u64 > MAX_TOKEN_FILE_BYTES {
            return Err(AuthError::TokenFileTooLarge {
                path: path.into(),
                size: bytes.len() as u64,
            });
        }
        let token = bytes.trim_ascii();
        if token.is_empty() {
            return Err(AuthError::TokenEmpty { path: path.into() });
        }
        if !token.iter().all(|b| b.is_ascii_graphic()) {
            return Err(AuthError::TokenCharacters { path: path.into() });
        }
        if token.len() < SHORT_TOKEN {
            tracing::warn!(
                bytes = token.len(),
                "the auth token is short and could be guessed; use at least {SHORT_TOKEN} random bytes (e.g. `openssl rand -hex 32`)"
            );
        }
        Ok(AuthToken::from_secret(token))
    }

    /// A token from its bytes (tests, in-process servers).
    pub fn from_secret(token: &[u8]) -> AuthToken {
        AuthToken {
            digest: Sha256::digest(token).into(),
        }
    }

    /// Whether `presented` is the token (compared as digests, in constant time): for
    /// front-ends that carry it in their own header (`crate::frontend`).
    pub fn matches(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        bool::from(digest.ct_eq(&self.digest))
    }

    /// Checks the `authorization` metadata of one call.
    pub fn verify(&self, metadata: &MetadataMap) -> Result<(), Refusal> {
        let value = metadata.get("authorization").ok_or(Refusal::Missing)?;
        let presented = bearer(value).ok_or(Refusal::Malformed)?;
        let digest: [u8; 32] = Sha256::digest(presented).into();
        if bool::from(digest.ct_eq(&self.digest)) {
            Ok(())
        } else {
            Err(Refusal::Wrong)
        }
    }
}

/// The token of `Bearer <token>` (scheme case-insensitive, RFC 7235), if the value has that form.
fn bearer(value: &AsciiMetadataValue) -> Option<&[u8]> {
    let text = value.to_str().ok()?;
    let (scheme, rest) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim_matches(' ');
    (!token.is_empty()).then_some(token.as_bytes())
}

/// Why a call was refused. The message goes to the caller; it never echoes the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "this server requires a bearer token: send the metadata `authorization: Bearer <token>`"
    )]
    Missing,
    #[error("malformed authorization metadata: expected `Bearer <token>`")]
    Malformed,
    #[error("the bearer token is not valid for this server")]
    Wrong,
}

impl Refusal {
    /// For the log's `reason` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::Malformed => "malformed",
            Refusal::Wrong => "wrong",
        }
    }
}

/// The interceptor that guards one service on a TCP listener.
#[derive(Clone)]
pub struct BearerAuth {
    token: Arc<AuthToken>,
    service: &'static str,
}

impl BearerAuth {
    /// Guards `service` (its name goes to the log of refused calls) with `token`.
    pub fn new(token: Arc<AuthToken>, service: &'static str) -> BearerAuth {
        BearerAuth { token, service }
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        match self.token.verify(req.metadata()) {
            Ok(()) => Ok(req),
            Err(refusal) => {
                // Warn, not debug: a refused call is what an operator looks for when a
                // robot "cannot connect". The token itself is never logged.
                tracing::warn!(
                    slug = "auth-refused",
                    service = self.service,
                    peer = %req
                        .remote_addr()
                        .map_or_else(|| "unknown".into(), |a| a.to_string()),
                    reason = refusal.as_str(),
                    "call refused"
                );
                Err(Status::unauthenticated(refusal.to_string()))
            }
        }
    }
}

/// Reads `--tls-cert` and `--tls-key` into a server TLS configuration, checked now rather
/// than at the first handshake: PEM content, a private key file, a key that fits.
pub fn load_tls(cert: &Path, key: &Path) -> Result<ServerTlsConfig, AuthError> {
    // Certificate chains and keys are a few KiB; 1 MiB leaves room for long chains.
    const MAX_PEM: u64 = 1024 * 1024;
    let cert_pem = std::fs::read(cert).map_err(|source| AuthError::Read {
        what: "--tls-cert",
        path: cert.into(),
        source,
    })?;
    if !contains(&cert_pem, b"-----BEGIN CERTIFICATE-----") {
        return Err(AuthError::NotACertificate { path: cert.into() });
    }
    let key_pem = read_private("--tls-key", key, MAX_PEM)?;
    if !contains(&key_pem, b"PRIVATE KEY-----") {
        return Err(AuthError::NotAKey { path: key.into() });
    }
    let config = ServerTlsConfig::new()
        .identity(Identity::from_pem(cert_pem, key_pem))
        .timeout(TLS_HANDSHAKE_TIMEOUT);
    // Building the acceptor parses both and pairs them; do it once here for a clear error.
    tonic::transport::Server::builder()
        .tls_config(config.clone())
        .map_err(|e| AuthError::Tls {
            cert: cert.into(),
            key: key.into(),
            reason: reflex_proto::error_chain(&e),
        })?;
    Ok(config)
}

/// The TLS of [`load_tls`] as a plain rustls server configuration, for a listener tonic
/// does not serve (`--http-listen`), offering `alpn` (e.g. `http/1.1`). The same files
/// with the same checks.
pub fn load_rustls(
    cert: &Path,
    key: &Path,
    alpn: &[&[u8]],
) -> Result<Arc<tokio_rustls::rustls::ServerConfig>, AuthError> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    const MAX_PEM: u64 = 1024 * 1024;
    let fail = |reason: String| AuthError::Tls {
        cert: cert.into(),
        key: key.into(),
        reason,
    };
    let cert_pem = std::fs::read(cert).map_err(|source| AuthError::Read {
        what: "--tls-cert",
        path: cert.into(),
        source,
    })?;
    let key_pem = read_private("--tls-key", key, MAX_PEM)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(format!("certificate: {e}")))?;
    if chain.is_empty() {
        return Err(AuthError::NotACertificate { path: cert.into() });
    }
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| fail(format!("key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| fail(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| fail(e.to_string()))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Reads a secret file, refusing one that "other" may read. Reads at most `limit + 1` bytes
/// so the caller can tell an oversize file.
fn read_private(what: &'static str, path: &Path, limit: u64) -> Result<Vec<u8>, AuthError> {
    use std::io::Read;
    let read_err = |source| AuthError::Read {
        what,
        path: path.into(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if meta.is_dir() {
        return Err(read_err(std::io::Error::other("it is a folder")));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o004 != 0 {
        return Err(AuthError::ReadableByOther {
            what,
            path: path.into(),
            mode,
        });
    }
    let mut out = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut out)
        .map_err(read_err)?;
    Ok(out)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, body: &[u8], mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn md(value: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", value.parse().unwrap());
        m
    }

    #[test]
    fn token_is_trimmed_and_checked() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "t", b"  s3cret-token-0123456789\n", 0o600);
        let t = AuthToken::load(&p).unwrap();
        assert_eq!(t.verify(&md("Bearer s3cret-token-0123456789")), Ok(()));
        assert_eq!(t.verify(&md("bearer  s3cret-token-0123456789")), Ok(()));
        assert_eq!(
            t.verify(&md("Bearer s3cret-token-012345678")),
            Err(Refusal::Wrong)
        );
        assert_eq!(
            t.verify(&md("Bearer s3cret-token-01234567890")),
            Err(Refusal::Wrong)
        );
        assert_eq!(t.verify(&MetadataMap::new()), Err(Refusal::Missing));
        assert_eq!(
            t.verify(&md("Basic s3cret-token-0123456789")),
            Err(Refusal::Malformed)
        );
        assert_eq!(
            t.verify(&md("s3cret-token-0123456789")),
            Err(Refusal::Malformed)
        );
        assert_eq!(t.verify(&md("Bearer ")), Err(Refusal::Malformed));
        assert!(!format!("{t:?}").contains("s3cret"));
    }

    #[test]
    fn token_file_must_be_private_nonempty_and_headerable() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "open", b"s3cret-token-0123456789", 0o644);
        let e = AuthToken::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("readable by every user")
                && e.contains("0644")
                && e.contains("chmod 600")
                && e.contains("LoadCredential"),
            "{e}"
        );
        // Group-readable is fine: the server's group may hold the file.
        let p = write(d.path(), "group", b"s3cret-token-0123456789", 0o640);
        AuthToken::load(&p).unwrap();
        let p = write(d.path(), "empty", b" \n\t", 0o600);
        assert!(
            AuthToken::load(&p)
                .unwrap_err()
                .to_string()
                .contains("is empty")
        );
        let p = write(d.path(), "space", b"two words", 0o600);
        assert!(matches!(
            AuthToken::load(&p),
            Err(AuthError::TokenCharacters { .. })
        ));
        let p = write(d.path(), "big", &[b'a'; 5000], 0o600);
        assert!(matches!(
            AuthToken::load(&p),
            Err(AuthError::TokenFileTooLarge { .. })
        ));
        let e = AuthToken::load(&d.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read --auth-token-file"), "{e}");
        let e = AuthToken::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("folder"), "{e}");
    }

    #[test]
    fn refusals_are_unauthenticated_and_never_echo_the_token() {
        let mut auth = BearerAuth::new(Arc::new(AuthToken::from_secret(b"right")), "test");
        use tonic::service::Interceptor;
        let mut req = Request::new(());
        req.metadata_mut()
            .insert("authorization", "Bearer wrong-guess".parse().unwrap());
        let s = auth.call(req).unwrap_err();
        assert_eq!(s.code(), tonic::Code::Unauthenticated);
        assert!(!s.message().contains("wrong-guess"), "{}", s.message());
        let s = auth.call(Request::new(())).unwrap_err();
        assert_eq!(s.code(), tonic::Code::Unauthenticated);
        assert!(
            s.message().contains("authorization: Bearer"),
            "{}",
            s.message()
        );
        let mut req = Request::new(());
        req.metadata_mut()
            .insert("authorization", "Bearer right".parse().unwrap());
        assert!(auth.call(req).is_ok());
    }

    #[test]
    fn tls_files_are_checked_before_serving() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tls");
        let d = tempfile::tempdir().unwrap();
        let cert = fixtures.join("server.crt");
        let key_pem = std::fs::read(fixtures.join("server.key")).unwrap();
        let key = write(d.path(), "key", &key_pem, 0o600);
        load_tls(&cert, &key).unwrap();

        let open = write(d.path(), "open.key", &key_pem, 0o644);
        assert!(matches!(
            load_tls(&cert, &open),
            Err(AuthError::ReadableByOther { .. })
        ));
        let e = load_tls(&key, &key).unwrap_err().to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
        let e = load_tls(&cert, &write(d.path(), "k2", b"nope", 0o600))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no PEM private key"), "{e}");
        // A key that is not the certificate's.
        let other = std::fs::read(fixtures.join("other.key")).unwrap();
        let e = load_tls(&cert, &write(d.path(), "k3", &other, 0o600))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot be used together"), "{e}");
    }
}
