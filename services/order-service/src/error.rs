//! The one error type of the order service and its mapping to gRPC codes.

use shop_host::grpc::{StaleVersion, StorageError};
use shop_host::validate::FieldViolations;
use tonic::Status;
use uuid::Uuid;

/// Everything an order service call can fail with. Each variant's doc names
/// its gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `INVALID_ARGUMENT`, with `google.rpc.BadRequest` field violations.
    #[error("invalid request")]
    Invalid(#[from] FieldViolations),
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
    /// `ABORTED`: `expected_version` is not the stored version.
    #[error(transparent)]
    StaleVersion(#[from] StaleVersion),
    /// `UNAVAILABLE` during a database outage (the caller may retry),
    /// `INTERNAL` for any other failure of storage; the cause is logged,
    /// never sent to the caller.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<shop_database::PoolError> for Error {
    fn from(error: shop_database::PoolError) -> Self {
        Self::Storage(error.into())
    }
}

impl From<shop_database::Timeout> for Error {
    fn from(error: shop_database::Timeout) -> Self {
        Self::Storage(error.into())
    }
}

impl From<diesel::result::Error> for Error {
    fn from(error: diesel::result::Error) -> Self {
        Self::Storage(error.into())
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
            Error::StaleVersion(error) => error.into(),
            Error::Storage(error) => error.into(),
        }
    }
}
