//! Telling a database outage from a failure of the statement itself.
//!
//! A caller needs to know whether trying again can help: a command answers
//! `UNAVAILABLE` (the client retries) rather than `INTERNAL`, a consumer
//! holds a message while the database is away instead of charging it an
//! attempt, the relay backs off instead of publishing the same batch again.
//!
//! The class comes from the SQLSTATE where diesel exposes it
//! (`DatabaseErrorKind`): `25006` read-only transaction (a failover onto a
//! standby, `default_transaction_read_only`) is an outage, `40001`
//! serialization failure is worth an immediate retry, the integrity
//! violations (`23xxx`) are the statement's own fault. A lost connection
//! (no SQLSTATE at all) is an outage. diesel 2.3 does not expose the
//! SQLSTATE of the other codes (diesel-rs/diesel#4290 adds it), so for
//! those the server's message is read, for the codes that matter here:
//! `53xxx` insufficient resources (disk full, out of memory, too many
//! connections), `57xxx` operator intervention (admin shutdown, crash
//! shutdown, cannot connect now, statement or lock timeout, cancellation),
//! `25P03` idle-in-transaction timeout, `58xxx` system errors, `08xxx`
//! connection exceptions are outages; `40P01` deadlock and `55P03` lock not
//! available are retried at once. The messages are PostgreSQL's in English:
//! every session the pool opens sets `lc_messages = C` for itself, whatever
//! the server, the database or the role are set to (a role needs `GRANT SET
//! ON PARAMETER lc_messages`, PostgreSQL 15 and later; without it a warning
//! says so, and in another message language those codes fall back to
//! [`Fault::Failure`]). Proven against a database whose messages are in
//! German: a statement cancelled (57014) under a consumer's handler is
//! charged to the event without the pinned language, and is not with it
//! (`shop-messaging` `faults::a_statement_cancelled_…_whatever_the_servers_message_language`).
//! The complete way out is the SQLSTATE itself, which diesel-async has but
//! does not show (it keeps only the message). A caller that must not charge
//! a message for an outage also checks the database itself ([`crate::probe`]).
//! A [`Timeout`] of [`crate::Pool::run`] and a [`crate::PoolError`] are
//! outages.

use diesel::result::{DatabaseErrorKind, Error};

use crate::Timeout;

/// What an error of a database call means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The database is unreachable, silent, read-only, full, overloaded or
    /// shutting down: waiting and trying again will succeed once it is back.
    Outage,
    /// A conflict between concurrent transactions (serialization failure,
    /// deadlock, lock timeout): trying again at once will likely succeed.
    Conflict,
    /// The statement itself failed (a constraint, a bug, bad data): the same
    /// call fails again.
    Failure,
}

/// Server messages (in English) of SQLSTATEs diesel does not name, and
/// their class; see the module docs.
const MESSAGES: &[(&str, Fault)] = &[
    // 53100 disk_full, 53200 out_of_memory, 53300 too_many_connections.
    ("could not extend file", Fault::Outage),
    ("no space left on device", Fault::Outage),
    ("could not write", Fault::Outage),
    ("out of memory", Fault::Outage),
    ("too many connections", Fault::Outage),
    ("remaining connection slots are reserved", Fault::Outage),
    // 57P01 admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now.
    (
        "terminating connection due to administrator command",
        Fault::Outage,
    ),
    ("terminating connection because of crash", Fault::Outage),
    ("the database system is", Fault::Outage),
    // 57014 query_canceled (statement timeout, cancel request).
    ("canceling statement due to", Fault::Outage),
    // 25P03 idle_in_transaction_session_timeout.
    (
        "terminating connection due to idle-in-transaction timeout",
        Fault::Outage,
    ),
    // 08xxx connection_exception, 58xxx system_error.
    ("server closed the connection", Fault::Outage),
    ("connection to server", Fault::Outage),
    ("connection reset", Fault::Outage),
    ("could not read", Fault::Outage),
    ("i/o error", Fault::Outage),
    // 25006 read_only_sql_transaction when raised by a function.
    ("read-only transaction", Fault::Outage),
    ("during recovery", Fault::Outage),
    // 40P01 deadlock_detected, 55P03 lock_not_available.
    ("deadlock detected", Fault::Conflict),
    ("could not obtain lock", Fault::Conflict),
    ("could not serialize access", Fault::Conflict),
];

impl Fault {
    /// The fault `error` is.
    pub fn of(error: &Error) -> Self {
        match error {
            Error::DatabaseError(kind, info) => match kind {
                DatabaseErrorKind::ClosedConnection
                | DatabaseErrorKind::UnableToSendCommand
                | DatabaseErrorKind::ReadOnlyTransaction => Self::Outage,
                DatabaseErrorKind::SerializationFailure => Self::Conflict,
                DatabaseErrorKind::UniqueViolation
                | DatabaseErrorKind::ForeignKeyViolation
                | DatabaseErrorKind::NotNullViolation
                | DatabaseErrorKind::CheckViolation
                | DatabaseErrorKind::RestrictViolation
                | DatabaseErrorKind::ExclusionViolation => Self::Failure,
                _ => Self::of_message(info.message()),
            },
            Error::BrokenTransactionManager => Self::Outage,
            Error::RollbackErrorOnCommit { commit_error, .. } => Self::of(commit_error),
            // The rest, transaction misuse (`RollbackTransaction`,
            // `AlreadyInTransaction`, `NotInTransaction`) included, is the
            // call's own failure.
            _ => Self::Failure,
        }
    }

    /// The class of a server message of an unnamed SQLSTATE.
    fn of_message(message: &str) -> Self {
        let message = message.to_ascii_lowercase();
        MESSAGES
            .iter()
            .find(|(text, _)| message.contains(text))
            .map_or(Self::Failure, |(_, fault)| *fault)
    }

    /// Whether trying again (now or after a wait) can succeed.
    pub fn is_retryable(self) -> bool {
        !matches!(self, Self::Failure)
    }
}

impl From<&Timeout> for Fault {
    fn from(_: &Timeout) -> Self {
        Self::Outage
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

#[cfg(test)]
mod tests {
    use super::*;

    fn database_error(kind: DatabaseErrorKind, message: &str) -> Error {
        Error::DatabaseError(kind, Box::new(message.to_owned()))
    }

    #[test]
    fn outages_are_told_from_failures_by_sqlstate_and_message() {
        let outage = [
            database_error(
                DatabaseErrorKind::ReadOnlyTransaction,
                "cannot execute INSERT in a read-only transaction",
            ),
            database_error(DatabaseErrorKind::ClosedConnection, "connection closed"),
            database_error(DatabaseErrorKind::UnableToSendCommand, "broken pipe"),
            database_error(
                DatabaseErrorKind::Unknown,
                "could not extend file \"base/16384/2619\": No space left on device",
            ),
            database_error(
                DatabaseErrorKind::Unknown,
                "sorry, too many clients already: too many connections",
            ),
            database_error(
                DatabaseErrorKind::Unknown,
                "terminating connection due to administrator command",
            ),
            database_error(DatabaseErrorKind::Unknown, "the database system is starting up"),
            database_error(
                DatabaseErrorKind::Unknown,
                "canceling statement due to statement timeout",
            ),
            database_error(
                DatabaseErrorKind::Unknown,
                "terminating connection due to idle-in-transaction timeout",
            ),
            Error::BrokenTransactionManager,
        ];
        for error in &outage {
            assert_eq!(Fault::of(error), Fault::Outage, "{error:?}");
        }
        let conflict = [
            database_error(
                DatabaseErrorKind::SerializationFailure,
                "could not serialize access",
            ),
            database_error(DatabaseErrorKind::Unknown, "deadlock detected"),
        ];
        for error in &conflict {
            assert_eq!(Fault::of(error), Fault::Conflict, "{error:?}");
        }
        let failure = [
            database_error(
                DatabaseErrorKind::UniqueViolation,
                "duplicate key value violates unique constraint",
            ),
            database_error(
                DatabaseErrorKind::CheckViolation,
                "new row violates check constraint",
            ),
            database_error(
                DatabaseErrorKind::Unknown,
                "value too long for type character varying(3)",
            ),
            database_error(DatabaseErrorKind::Unknown, "relation \"nope\" does not exist"),
            Error::NotFound,
        ];
        for error in &failure {
            assert_eq!(Fault::of(error), Fault::Failure, "{error:?}");
        }
    }

    #[test]
    fn a_sqlstate_diesel_names_decides_whatever_the_message_says() {
        // The kind decides; the message is read only for the kinds diesel
        // does not name (here each message would say the opposite).
        assert_eq!(
            Fault::of(&database_error(
                DatabaseErrorKind::SerializationFailure,
                "serialization failure"
            )),
            Fault::Conflict
        );
        assert_eq!(
            Fault::of(&database_error(
                DatabaseErrorKind::UniqueViolation,
                "duplicate key value: connection reset by the application"
            )),
            Fault::Failure
        );
        assert_eq!(
            Fault::of(&database_error(DatabaseErrorKind::ClosedConnection, "gone")),
            Fault::Outage
        );
    }

    #[test]
    fn a_failed_commit_is_classed_by_its_commit_error_not_its_rollback() {
        let outage = Error::RollbackErrorOnCommit {
            rollback_error: Box::new(Error::NotFound),
            commit_error: Box::new(database_error(DatabaseErrorKind::ClosedConnection, "closed")),
        };
        assert_eq!(Fault::of(&outage), Fault::Outage);
        let failure = Error::RollbackErrorOnCommit {
            rollback_error: Box::new(Error::BrokenTransactionManager),
            commit_error: Box::new(database_error(DatabaseErrorKind::CheckViolation, "check")),
        };
        assert_eq!(Fault::of(&failure), Fault::Failure);
    }

    #[test]
    fn outages_and_conflicts_are_retried_failures_are_not() {
        assert!(Fault::Outage.is_retryable());
        assert!(Fault::Conflict.is_retryable());
        assert!(!Fault::Failure.is_retryable());
        let outage = database_error(DatabaseErrorKind::ReadOnlyTransaction, "read-only");
        let conflict = database_error(DatabaseErrorKind::SerializationFailure, "conflict");
        let failure = database_error(DatabaseErrorKind::CheckViolation, "check");
        assert!(is_outage(&outage));
        assert!(!is_outage(&conflict));
        assert!(!is_outage(&failure));
    }

    /// A unique violation's information with its constraint's name, as
    /// PostgreSQL reports it.
    #[derive(Debug)]
    struct Violation(&'static str);

    impl diesel::result::DatabaseErrorInformation for Violation {
        fn message(&self) -> &str {
            "duplicate key value violates unique constraint"
        }
        fn details(&self) -> Option<&str> {
            None
        }
        fn hint(&self) -> Option<&str> {
            None
        }
        fn table_name(&self) -> Option<&str> {
            None
        }
        fn column_name(&self) -> Option<&str> {
            None
        }
        fn constraint_name(&self) -> Option<&str> {
            Some(self.0)
        }
        fn statement_position(&self) -> Option<i32> {
            None
        }
    }

    #[test]
    fn a_unique_violation_is_told_by_its_constraint() {
        let email = Error::DatabaseError(
            DatabaseErrorKind::UniqueViolation,
            Box::new(Violation("users_email_key")),
        );
        assert!(is_unique_violation(&email, "users_email_key"));
        assert!(!is_unique_violation(&email, "users_pkey"));
        let check = Error::DatabaseError(
            DatabaseErrorKind::CheckViolation,
            Box::new(Violation("users_email_key")),
        );
        assert!(!is_unique_violation(&check, "users_email_key"));
    }
}
