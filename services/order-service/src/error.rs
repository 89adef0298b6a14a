//! The one error type of the order service and its mapping to gRPC codes.

use shop_bootstrap::grpc::FieldViolations;
use tonic::Status;
use uuid::Uuid;

/// Everything an order service call can fail with. Each variant's doc names
/// its gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `INVALID_ARGUMENT`, with `google.rpc.BadRequest` field violations.
    #[error("invalid request")]
    Invalid(FieldViolations),
    /// `NOT_FOUND`.
    #[error("order {0} not found")]
    NotFound(Uuid),
    /// `FAILED_PRECONDITION`: no event of this user has reached the order
    /// service (it does not exist, or its creation is still on its way).
    #[error("user {0} is not known to the order service (unknown user, or its creation has not arrived yet)")]
    UnknownUser(Uuid),
    /// `FAILED_PRECONDITION`: the user was deleted.
    #[error("user {0} has been deleted")]
    DeletedUser(Uuid),
    /// `FAILED_PRECONDITION`: only pending orders can be cancelled.
    #[error("order {0} is already cancelled")]
    AlreadyCancelled(Uuid),
    /// `ALREADY_EXISTS`: the request_id was used before for another request.
    #[error("request_id {0} was already used for a different request")]
    RequestIdReused(Uuid),
    /// `ABORTED`: optimistic concurrency check failed.
    #[error("order {id} is at version {actual}, not the expected version {expected}")]
    VersionMismatch {
        /// The order.
        id: Uuid,
        /// What the caller expected.
        expected: i64,
        /// What is stored.
        actual: i64,
    },
    /// `UNAVAILABLE`: the database is unreachable or the pool is exhausted.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// `INTERNAL`: details are logged, never sent to the caller.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<diesel::result::Error> for Error {
    fn from(error: diesel::result::Error) -> Self {
        if shop_bootstrap::db::is_unavailable(&error) {
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
            Error::NotFound(_) => Status::not_found(error.to_string()),
            Error::UnknownUser(_) | Error::DeletedUser(_) | Error::AlreadyCancelled(_) => {
                Status::failed_precondition(error.to_string())
            }
            Error::RequestIdReused(_) => Status::already_exists(error.to_string()),
            Error::VersionMismatch { .. } => Status::aborted(error.to_string()),
            Error::Unavailable(detail) => shop_bootstrap::grpc::unavailable(&detail),
            Error::Internal(detail) => shop_bootstrap::grpc::internal(&detail),
        }
    }
}
