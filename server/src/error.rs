//! The service's errors, and the one place a domain error becomes a gRPC `Status`
//! ([`ServiceError::status`]).
//!
//! Every failure has a slug ([`reflex_proto::errors::ErrorSlug`]: the trace record's
//! `error.slug`, the metrics' `status`) and the slug decides the status code, so the record,
//! the metrics and the answer of one call cannot disagree.

use reflex_engine::engine::EngineError;
use reflex_engine::policy::{ActError, InputError};
use reflex_proto::errors::ErrorSlug;
use reflex_proto::images::TwoPrimaryImages;
use tonic::Status;

use crate::pool::{ProbeSubmitError, Skipped, SubmitError};

/// Why the service could not answer with actions.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request's images break the image contract (`reflex_proto::images`).
    #[error(transparent)]
    Images(#[from] TwoPrimaryImages),
    #[error(transparent)]
    Act(#[from] ActError),
    #[error(transparent)]
    Submit(#[from] SubmitError),
    /// Admitted, but its deadline passed before a worker took it: not run.
    #[error(transparent)]
    Skipped(#[from] Skipped),
    #[error("an inference worker failed on this request")]
    WorkerLost,
}

/// Why the liveness probe failed (see `PolicyService::probe`).
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
    /// Short greppable name: the trace record's `error.slug`, the metrics' `status`.
    pub fn slug(&self) -> ErrorSlug {
        match self {
            ServiceError::Images(_) | ServiceError::Act(ActError::Input(_)) => {
                ErrorSlug::InvalidArgument
            }
            ServiceError::Act(ActError::Engine(_)) => ErrorSlug::EngineFailed,
            ServiceError::Submit(SubmitError::Busy(_) | SubmitError::ConnectionShare(_)) => {
                ErrorSlug::QueueFull
            }
            ServiceError::Skipped(Skipped::DeadlineExceeded { .. }) => ErrorSlug::DeadlineExceeded,
            ServiceError::Submit(SubmitError::Closed) => ErrorSlug::ShuttingDown,
            ServiceError::WorkerLost => ErrorSlug::WorkerLost,
        }
    }

    /// What the client is told (and the trace records): the field at fault for a bad
    /// request, nothing of the internals for a failure of ours.
    pub fn public_message(&self) -> String {
        match self {
            ServiceError::Act(ActError::Engine(_)) => {
                "the model failed on this request; the server log has the details".into()
            }
            other => other.to_string(),
        }
    }

    /// The one place a domain error becomes a gRPC status: the slug's code, the public
    /// message. Failures of ours are logged here, with their details, once per answer.
    pub fn status(&self) -> Status {
        let slug = self.slug();
        match self {
            ServiceError::Act(ActError::Engine(e)) => {
                tracing::error!(error = %e, slug = slug.as_str(), "engine failed");
            }
            ServiceError::WorkerLost => {
                tracing::error!(slug = slug.as_str(), "an inference job panicked");
            }
            _ => {}
        }
        Status::new(slug.code(), self.public_message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_answers_with_its_slugs_code_and_a_public_message() {
        let cases: Vec<(ServiceError, ErrorSlug, tonic::Code)> = vec![
            (
                TwoPrimaryImages.into(),
                ErrorSlug::InvalidArgument,
                tonic::Code::InvalidArgument,
            ),
            (
                InputError::StateLength { got: 3, want: 8 }.into(),
                ErrorSlug::InvalidArgument,
                tonic::Code::InvalidArgument,
            ),
            (
                ServiceError::Act(ActError::Engine(EngineError::Run {
                    graph: "expert",
                    message: "secret internals".into(),
                })),
                ErrorSlug::EngineFailed,
                tonic::Code::Internal,
            ),
            (
                SubmitError::Closed.into(),
                ErrorSlug::ShuttingDown,
                tonic::Code::Unavailable,
            ),
            (
                ServiceError::WorkerLost,
                ErrorSlug::WorkerLost,
                tonic::Code::Internal,
            ),
            (
                SubmitError::ConnectionShare(8).into(),
                ErrorSlug::QueueFull,
                tonic::Code::ResourceExhausted,
            ),
            (
                Skipped::DeadlineExceeded { waited_ms: 12.0 }.into(),
                ErrorSlug::DeadlineExceeded,
                tonic::Code::DeadlineExceeded,
            ),
        ];
        for (e, slug, code) in cases {
            assert_eq!(e.slug(), slug, "{e}");
            let s = e.status();
            assert_eq!(s.code(), code, "{e}");
            assert_eq!(s.message(), e.public_message());
            assert!(!s.message().contains("secret"), "{}", s.message());
        }
        assert_eq!(
            ServiceError::from(TwoPrimaryImages).public_message(),
            "image_b64 and images[0].data are both set; send the primary image once"
        );
    }
}
