//! The one error type of the user service and its mapping to gRPC codes.

use shop_host::grpc::{StaleVersion, StorageError};
use shop_host::validate::FieldViolations;
use tonic::Status;
use uuid::Uuid;

/// Everything a user service call can fail with. Each variant's doc names its
/// gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `INVALID_ARGUMENT`, with `google.rpc.BadRequest` field violations.
    #[error("invalid request")]
    Invalid(#[from] FieldViolations),
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
        if shop_database::is_unique_violation(&error, "users_email_key") {
            Self::EmailTaken
        } else {
            Self::Storage(error.into())
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        match error {
            Error::Invalid(violations) => violations.into_status(),
            Error::NotFound(_) | Error::CreatedUserDeleted { .. } => Status::not_found(error.to_string()),
            Error::EmailTaken | Error::RequestIdReused(_) => Status::already_exists(error.to_string()),
            Error::StaleVersion(error) => error.into(),
            Error::Storage(error) => error.into(),
        }
    }
}
