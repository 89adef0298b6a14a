//! PostgreSQL for the services, as one small library: the settings of a
//! connection ([`DatabaseConfig`]), the pool of diesel-async connections on
//! deadpool ([`Pool`]), TLS with a verified server certificate, migrations
//! applied once under a lock ([`connect`]), the classification of errors
//! into an outage or a failure ([`Fault`]), raw SQL kept prepared
//! ([`prepared`]), and the retention of tables that grow with traffic
//! ([`retention`]).
//!
//! No libpq is involved at build or run time: the driver is tokio-postgres.
//! The messaging library, the outbox and the service host depend on this
//! crate and nothing heavier.
#![forbid(unsafe_code)]

mod fault;
mod pool;
mod prepared;
pub mod retention;

pub use fault::{Fault, is_outage, is_unique_violation};
pub use pool::{
    DatabaseConfig, Grant, Pool, PoolError, PooledConnection, RUNTIME_GRANTS, RunError, Timeout, connect,
    connect_granting, ensure_database_exists, establish, migrate, migrate_and_grant, pool, probe,
    quote_identifier,
};
pub use prepared::{Prepared, prepared};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse() {
        let config = DatabaseConfig::new("postgres://localhost/x");
        assert_eq!(config.pool_size, 16);
        assert_eq!(config.acquire_timeout, std::time::Duration::from_secs(5));
    }
}
