//! Telling a database outage from a failure of the statement itself.
//!
//! A caller needs to know whether trying again can help: a command answers
//! `UNAVAILABLE` (retry) or `INTERNAL`, a consumer holds a message while the
//! database is away instead of charging it an attempt, the relay backs off.

use diesel::result::{DatabaseErrorKind, Error};

/// What an error of a database call means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The database could not be reached or cannot do the work right now:
    /// waiting and trying again will succeed once it is back.
    Outage,
    /// The statement itself failed (a constraint, a bug, bad data): the same
    /// call fails again.
    Failure,
}

impl Fault {
    /// The fault `error` is.
    pub fn of(error: &Error) -> Self {
        match error {
            Error::DatabaseError(DatabaseErrorKind::ClosedConnection, _)
            | Error::BrokenTransactionManager => Self::Outage,
            _ => Self::Failure,
        }
    }
}

/// Whether `error` means the database could not be reached or cannot do the
/// work right now (see [`Fault::Outage`]).
pub fn is_outage(error: &Error) -> bool {
    Fault::of(error) == Fault::Outage
}

/// Whether `error` is a violation of the unique constraint (or unique index)
/// named `constraint`.
pub fn is_unique_violation(error: &Error, constraint: &str) -> bool {
    matches!(
        error,
        Error::DatabaseError(DatabaseErrorKind::UniqueViolation, info)
            if info.constraint_name() == Some(constraint)
    )
}
