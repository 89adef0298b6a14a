//! What a call can fail with, as types rather than status strings.

use tonic::Code;
use tonic_types::StatusExt as _;

/// One invalid field of a request, from the server's `google.rpc.BadRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Path of the field, e.g. `items[2].quantity`.
    pub field: String,
    /// What is wrong with it.
    pub description: String,
}

/// Why a call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// `INVALID_ARGUMENT`: the request broke the documented rules.
    #[error("invalid request: {message}")]
    InvalidArgument {
        /// The server's message.
        message: String,
        /// Every invalid field.
        violations: Vec<FieldViolation>,
    },
    /// `NOT_FOUND`.
    #[error("not found: {0}")]
    NotFound(String),
    /// `ALREADY_EXISTS`: a unique value is taken, or a request id was reused
    /// for another request.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// `ABORTED`: the expected version is not the current one; read again
    /// and retry with the new version.
    #[error("conflict: {0}")]
    Conflict(String),
    /// `FAILED_PRECONDITION`: the target is not in a state that allows the
    /// call (an unknown or deleted user, an order already cancelled).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// `UNAVAILABLE` (after the retries), or the server could not be reached.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// `DEADLINE_EXCEEDED` (after the retries).
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// `UNAUTHENTICATED`: no credentials, or credentials the server does
    /// not accept (an expired token, a key it does not know).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// `PERMISSION_DENIED`: the caller lacks the permission, or acts on
    /// another user's data.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// Any other status.
    #[error("{code:?}: {message}")]
    Server {
        /// The gRPC code.
        code: Code,
        /// The server's message.
        message: String,
    },
    /// The client's own settings are wrong.
    #[error("invalid client settings: {0}")]
    Config(String),
}

impl Error {
    /// The gRPC code this error stands for.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument { .. } => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::Conflict(_) => Code::Aborted,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::Unavailable(_) => Code::Unavailable,
            Self::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::Server { code, .. } => *code,
            Self::Config(_) => Code::InvalidArgument,
        }
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        let message = status.message().to_owned();
        match status.code() {
            Code::InvalidArgument => {
                let violations = status
                    .get_details_bad_request()
                    .map(|bad| {
                        bad.field_violations
                            .into_iter()
                            .map(|v| FieldViolation {
                                field: v.field,
                                description: v.description,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                Self::InvalidArgument { message, violations }
            }
            Code::NotFound => Self::NotFound(message),
            Code::AlreadyExists => Self::AlreadyExists(message),
            Code::Aborted => Self::Conflict(message),
            Code::FailedPrecondition => Self::FailedPrecondition(message),
            Code::Unavailable => Self::Unavailable(message),
            Code::DeadlineExceeded => Self::DeadlineExceeded(message),
            Code::Unauthenticated => Self::Unauthenticated(message),
            Code::PermissionDenied => Self::PermissionDenied(message),
            code => Self::Server { code, message },
        }
    }
}
