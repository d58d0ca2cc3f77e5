//! The server a replay drives: one reached at `--target`, or the private one started for
//! `--model DIR` (a `reflex serve` child on a Unix socket in a temporary folder, see
//! [`crate::private_server`], stopped by [`Target::stop`]). Either way the replay talks
//! `reflex.v1.Policy` over a real socket, so `--model` measures what a robot would see.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reflex_proto::v1::policy_client::PolicyClient;
use reflex_proto::v1::{GetModelInfoRequest, ModelInfo};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::private_server::{PrivateServer, StartError};

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
    private: Option<PrivateServer>,
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

    /// Starts `bin serve dir` on a temporary Unix socket and connects to it. `bin` is the
    /// `reflex` binary (`--serve-bin`, by default the running one). `concurrency` sizes its
    /// queue so the replay itself never overflows it.
    pub async fn start_private(
        bin: &Path,
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
        let private = match PrivateServer::start(bin, &dir, concurrency, shutdown).await {
            Ok(p) => p,
            Err(StartError::Interrupted) => return Err(TargetError::Interrupted),
            Err(e) => return Err(fail(e.to_string())),
        };
        match Target::connect(&private.uri, &reflex_proto::ConnectOptions::default()).await {
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
