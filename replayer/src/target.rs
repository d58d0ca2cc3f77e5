//! The server a replay drives: one reached at `--target`, or a private one started for
//! `--model DIR` (in process, on a Unix socket in a temporary folder, stopped by
//! [`Target::stop`]). Either way the replay talks `reflex.v1.Policy` over a real socket,
//! so `--model` measures what a robot would see.

use std::path::PathBuf;
use std::time::Duration;

use reflex_proto::v1::policy_client::PolicyClient;
use reflex_proto::v1::{GetModelInfoRequest, ModelInfo};
use reflex_server::serve::{ListenAddr, Running, ServeArgs};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// How long dialing or asking for the model info may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why there is no target to replay against (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("cannot reach --target {target}: {reason}")]
    Unreachable { target: String, reason: String },
    #[error("--model {}: {reason}", dir.display())]
    Model { dir: PathBuf, reason: String },
    #[error("no target: give --target URI or --model DIR (or --no-replay to only read the trace)")]
    Missing,
    #[error("interrupted before the target was ready")]
    Interrupted,
}

/// What the report says about the target.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TargetInfo {
    /// The URI dialed (for `--model`, the private socket).
    pub uri: String,
    /// `--model DIR`, when the target is a private server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_dir: Option<PathBuf>,
    /// From `GetModelInfo`; empty when the target does not answer it.
    pub model_hash: String,
    pub config_hash: String,
    pub model_type: String,
    pub mode: String,
    pub reflex_version: String,
    /// Whether `model_hash` equals the trace header's.
    pub model_hash_matches: bool,
}

/// A connected target.
pub struct Target {
    pub client: PolicyClient<reflex_proto::AuthChannel>,
    pub info: TargetInfo,
    private: Option<Private>,
}

/// The in-process server of `--model`.
struct Private {
    token: CancellationToken,
    running: Running,
    // Holds the socket's folder until the server is gone.
    _dir: tempfile::TempDir,
}

impl Target {
    /// Dials `uri` and asks for its model.
    pub async fn connect(
        uri: &str,
        opts: &reflex_proto::ConnectOptions,
    ) -> Result<Target, TargetError> {
        let unreachable = |reason: String| TargetError::Unreachable {
            target: uri.to_string(),
            reason,
        };
        let channel = tokio::time::timeout(CONNECT_TIMEOUT, reflex_proto::connect_with(uri, opts))
            .await
            .map_err(|_| unreachable(format!("no connection within {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| unreachable(reflex_proto::error_chain(&e)))?;
        let mut client = PolicyClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
        let mut req = tonic::Request::new(GetModelInfoRequest {});
        req.set_timeout(CONNECT_TIMEOUT);
        let model = match client.get_model_info(req).await {
            Ok(r) => r.into_inner(),
            // An older or foreign server without GetModelInfo can still be replayed against.
            Err(s) if s.code() == tonic::Code::Unimplemented => ModelInfo::default(),
            Err(s) => {
                return Err(unreachable(format!(
                    "GetModelInfo failed: {} ({})",
                    s.message(),
                    crate::diff::code_name(s.code())
                )));
            }
        };
        Ok(Target {
            client,
            info: TargetInfo {
                uri: uri.to_string(),
                model_dir: None,
                model_hash: model.model_hash,
                config_hash: model.config_hash,
                model_type: model.model_type,
                mode: model.mode,
                reflex_version: model.reflex_version,
                model_hash_matches: false,
            },
            private: None,
        })
    }

    /// Loads `dir` into a private server on a temporary Unix socket and connects to it.
    /// `concurrency` sizes its queue so the replay itself never overflows it.
    pub async fn start_private(
        dir: PathBuf,
        concurrency: usize,
        shutdown: &CancellationToken,
    ) -> Result<Target, TargetError> {
        let fail = |reason: String| TargetError::Model {
            dir: dir.clone(),
            reason,
        };
        if !dir.is_dir() {
            return Err(fail("not a folder".into()));
        }
        let tmp = tempfile::Builder::new()
            .prefix("reflex-replay-")
            .tempdir()
            .map_err(|e| fail(format!("cannot make a folder for the private socket: {e}")))?;
        let socket = tmp.path().join("policy.sock");
        let mut args = ServeArgs::new(dir.clone(), vec![ListenAddr::Unix(socket.clone())]);
        args.queue_depth = args.queue_depth.max(concurrency);
        args.drain_ms = 2000;
        // Its own token: the private server must outlive a SIGINT long enough to answer
        // the calls in flight; `stop` ends it.
        let token = CancellationToken::new();
        let running = tokio::select! {
            r = reflex_server::serve::start(args, token.clone()) => r
                .map_err(|e| fail(format!("{e:#}")))?,
            _ = shutdown.cancelled() => return Err(TargetError::Interrupted),
        };
        let uri = format!("unix://{}", socket.display());
        let private = Private {
            token,
            running,
            _dir: tmp,
        };
        match Target::connect(&uri, &reflex_proto::ConnectOptions::default()).await {
            Ok(mut t) => {
                t.info.model_dir = Some(dir);
                t.private = Some(private);
                Ok(t)
            }
            Err(e) => {
                private.stop().await;
                Err(fail(e.to_string()))
            }
        }
    }

    /// Whether this is the private server of `--model`.
    pub fn is_private(&self) -> bool {
        self.private.is_some()
    }

    /// Stops the private server, if any (after the replay's calls are answered).
    pub async fn stop(self) {
        if let Some(p) = self.private {
            p.stop().await;
        }
    }
}

impl Private {
    async fn stop(self) {
        self.token.cancel();
        if let Err(e) = self.running.wait().await {
            tracing::warn!(error = %format!("{e:#}"), "private server stopped with an error");
        }
    }
}
