//! The one error type of the user service and its mapping to gRPC codes.

use shop_bootstrap::grpc::FieldViolations;
use tonic::Status;
use uuid::Uuid;

/// Everything a user service call can fail with. Each variant's doc names its
/// gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `INVALID_ARGUMENT`, with `google.rpc.BadRequest` field violations.
    #[error("invalid request")]
    Invalid(FieldViolations),
    /// `NOT_FOUND`.
    #[error("user {0} not found")]
    NotFound(Uuid),
    /// `ALREADY_EXISTS`: another user has this email (compared
    /// case-insensitively).
    #[error("a user with this email already exists")]
    EmailTaken,
    /// `ALREADY_EXISTS`: the request_id was used before for a request with
    /// other fields.
    #[error("request_id {0} was already used for a different request")]
    RequestIdReused(Uuid),
    /// `NOT_FOUND`: the request_id created a user that has since been
    /// deleted.
    #[error("the user created by request_id {request_id} ({user_id}) has since been deleted")]
    CreatedUserDeleted {
        /// The repeated request id.
        request_id: Uuid,
        /// The user it created.
        user_id: Uuid,
    },
    /// `ABORTED`: optimistic concurrency check failed.
    #[error("user {id} is at version {actual}, not the expected version {expected}")]
    VersionMismatch {
        /// The user.
        id: Uuid,
        /// What the caller expected.
        expected: i64,
        /// What is stored.
        actual: i64,
    },
    /// `UNAVAILABLE`: the database is unreachable or the pool is exhausted;
    /// the caller may retry.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// `INTERNAL`: a bug or an unexpected database failure. The details are
    /// logged, never sent to the caller.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<diesel::result::Error> for Error {
    fn from(error: diesel::result::Error) -> Self {
        if shop_bootstrap::db::is_unique_violation(&error, "users_email_key") {
            Self::EmailTaken
        } else if shop_bootstrap::db::is_unavailable(&error) {
            Self::Unavailable(error.to_string())
        } else {
            Self::Internal(error.to_string())
        }
    }
}

impl From<diesel_async::pooled_connection::deadpool::PoolError> for Error {
    fn from(error: diesel_async::pooled_connection::deadpool::PoolError) -> Self {
        Self::Unavailable(error.to_string())
    }
}

impl From<FieldViolations> for Error {
    fn from(violations: FieldViolations) -> Self {
        Self::Invalid(violations)
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        match error {
            Error::Invalid(violations) => violations.into_status(),
            Error::NotFound(_) | Error::CreatedUserDeleted { .. } => Status::not_found(error.to_string()),
            Error::EmailTaken | Error::RequestIdReused(_) => Status::already_exists(error.to_string()),
            Error::VersionMismatch { .. } => Status::aborted(error.to_string()),
            Error::Unavailable(detail) => shop_bootstrap::grpc::unavailable(&detail),
            Error::Internal(detail) => shop_bootstrap::grpc::internal(&detail),
        }
    }
}
