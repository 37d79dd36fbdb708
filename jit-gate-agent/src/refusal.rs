//! Why the agent refuses a call. The kinds map one-to-one to gRPC status
//! codes (in `api`), so the control plane stays free of transport types.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalKind {
    /// Malformed or out-of-range input.
    InvalidArgument,
    /// The named port, rule or grant does not exist.
    NotFound,
    /// The request id was used before for a different request.
    AlreadyExists,
    /// The policy forbids it (source outside the allowed prefixes), or the
    /// caller's role does not allow the call.
    PermissionDenied,
    /// The caller could not be identified.
    Unauthenticated,
    /// The state is not what the call assumed (policy revision, ended grant).
    FailedPrecondition,
    /// A limit was reached (message size, open streams).
    ResourceExhausted,
    /// The agent could not record it now (store failure, disk full); nothing
    /// changed and the same call may be retried.
    Unavailable,
    /// The agent could not do it (enforcer failure).
    Internal,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub kind: RefusalKind,
    pub message: String,
}

impl Refusal {
    pub fn new(kind: RefusalKind, message: impl Into<String>) -> Self {
        Refusal {
            kind,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Refusal::new(RefusalKind::InvalidArgument, message)
    }

    pub fn internal(context: &str, error: impl fmt::Display) -> Self {
        Refusal::new(RefusalKind::Internal, format!("{context}: {error}"))
    }

    /// The store failed: nothing was recorded, so nothing changed.
    pub fn unavailable(context: &str, error: impl fmt::Display) -> Self {
        Refusal::new(
            RefusalKind::Unavailable,
            format!("{context}: {error}; nothing changed, retry later"),
        )
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for Refusal {}
