//! The names a failure goes by between processes: the canonical gRPC code names (what
//! `ActError.code` of an ActStream answer says, and the replayer reports) and the server's
//! error slugs (what a trace record's `error.slug` says, and the server's metrics and logs).
//! Defined once here; the server produces them, the replayer reads them back.

use tonic::Code;

/// The canonical upper-snake gRPC name of `code`: `INVALID_ARGUMENT` for
/// `Code::InvalidArgument` (tonic's `Debug` form, `InvalidArgument`, is not a wire name).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The code of a canonical name (exactly as [`code_name`] writes it); `None` otherwise.
pub fn code_from_name(name: &str) -> Option<Code> {
    // The 17 codes are 0..=16 on the wire.
    (0..=16).map(Code::from_i32).find(|c| code_name(*c) == name)
}

/// Why the server could not answer an Act with actions, as a short greppable name: the
/// trace record's `error.slug`, the `status` attribute of the server's metrics, the `slug`
/// field of its logs. Each maps to the one gRPC code the server answers with ([`ErrorSlug::code`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorSlug {
    /// The request is wrong (a field, an image, the size); the message names the field.
    InvalidArgument,
    /// The model failed on a valid request.
    EngineFailed,
    /// Every inference worker busy and the queue full.
    QueueFull,
    /// The call's `grpc-timeout` passed while it waited for a worker: it was not run.
    DeadlineExceeded,
    /// The server is draining for shutdown.
    ShuttingDown,
    /// An inference job panicked.
    WorkerLost,
}

impl ErrorSlug {
    /// Every slug, for tables and tests that must cover them all.
    pub const ALL: [ErrorSlug; 6] = [
        ErrorSlug::InvalidArgument,
        ErrorSlug::EngineFailed,
        ErrorSlug::QueueFull,
        ErrorSlug::DeadlineExceeded,
        ErrorSlug::ShuttingDown,
        ErrorSlug::WorkerLost,
    ];

    /// The written form, lowercase with dashes (`queue-full`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorSlug::InvalidArgument => "invalid-argument",
            ErrorSlug::EngineFailed => "engine-failed",
            ErrorSlug::QueueFull => "queue-full",
            ErrorSlug::DeadlineExceeded => "deadline-exceeded",
            ErrorSlug::ShuttingDown => "shutting-down",
            ErrorSlug::WorkerLost => "worker-lost",
        }
    }

    /// The gRPC code the server answers a call that failed this way with.
    pub fn code(self) -> Code {
        match self {
            ErrorSlug::InvalidArgument => Code::InvalidArgument,
            ErrorSlug::EngineFailed | ErrorSlug::WorkerLost => Code::Internal,
            ErrorSlug::QueueFull => Code::ResourceExhausted,
            ErrorSlug::DeadlineExceeded => Code::DeadlineExceeded,
            ErrorSlug::ShuttingDown => Code::Unavailable,
        }
    }

    /// The slug written as [`ErrorSlug::as_str`] does; `None` otherwise.
    pub fn parse(s: &str) -> Option<ErrorSlug> {
        ErrorSlug::ALL.into_iter().find(|slug| slug.as_str() == s)
    }
}

impl std::fmt::Display for ErrorSlug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_its_canonical_name_and_back() {
        let names: Vec<&str> = (0..=16).map(|i| code_name(Code::from_i32(i))).collect();
        assert_eq!(names[3], "INVALID_ARGUMENT");
        assert_eq!(names[8], "RESOURCE_EXHAUSTED");
        assert_eq!(names[16], "UNAUTHENTICATED");
        for (i, n) in names.iter().enumerate() {
            assert!(
                n.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
                "{n}"
            );
            assert_eq!(code_from_name(n), Some(Code::from_i32(i as i32)));
        }
        assert_eq!(code_from_name("InvalidArgument"), None);
        assert_eq!(code_from_name("invalid_argument"), None);
    }

    #[test]
    fn slugs_parse_back_and_name_their_code() {
        for s in ErrorSlug::ALL {
            assert_eq!(ErrorSlug::parse(s.as_str()), Some(s));
            assert_eq!(s.to_string(), s.as_str());
        }
        assert_eq!(ErrorSlug::parse("queue_full"), None);
        assert_eq!(ErrorSlug::QueueFull.code(), Code::ResourceExhausted);
        assert_eq!(ErrorSlug::InvalidArgument.code(), Code::InvalidArgument);
    }
}
