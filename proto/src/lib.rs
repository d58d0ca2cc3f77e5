//! The reflex.v1 wire contract: generated messages, clients and servers for
//! `reflex.v1.Policy` and `reflex.v1.Recorder`, plus the encoded file
//! descriptor set that server reflection serves (grpcurl needs no .proto).
//!
//! The `.proto` under `proto/reflex/v1/` is the single source of the wire schema.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("reflex.v1");
}

/// Encoded `FileDescriptorSet` of `reflex/v1/reflex.proto`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/reflex_descriptor.bin"));

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
