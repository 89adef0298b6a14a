//! The configuration of a service: what every service reads
//! ([`HostConfig`]), beside what the service itself reads, as one typed
//! structure ([`Config`]) parsed from the environment and the command line.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{ArgAction, Args, Command, FromArgMatches as _};
use shop_database::DatabaseConfig;
use shop_messaging::AmqpConfig;
use shop_outbox::RelayConfig;
use shop_telemetry::TelemetryConfig;

use crate::Service;
use crate::grpc::GrpcConfig;

/// Everything the host reads for any service.
#[derive(Debug, Clone, Args)]
pub struct HostConfig {
    /// The service's PostgreSQL.
    #[command(flatten)]
    pub database: DatabaseConfig,
    /// RabbitMQ.
    #[command(flatten)]
    pub amqp: AmqpConfig,
    /// The gRPC server.
    #[command(flatten)]
    pub grpc: GrpcConfig,
    /// HTTP address of `/metrics` (Prometheus) and `/health`
    /// (dependencies).
    #[arg(
        id = "admin_addr",
        long = "admin-addr",
        env = "ADMIN_ADDR",
        value_name = "ADDR",
        default_value = "0.0.0.0:9101"
    )]
    pub admin_addr: SocketAddr,
    /// Run the outbox relay in this process; `false` to run it separately
    /// (`<service> relay`).
    #[arg(
        long = "relay-enabled",
        env = "RELAY_ENABLED",
        value_name = "BOOL",
        default_value = "true",
        action = ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub relay_enabled: bool,
    /// The outbox relay.
    #[command(flatten)]
    pub relay: RelayConfig,
    /// How long the request ids of idempotent creates are kept: a create
    /// repeated with the same `request_id` within this returns the first
    /// result; later it is a new request.
    #[arg(
        long = "request-id-retention",
        env = "REQUEST_ID_RETENTION",
        value_name = "DURATION",
        default_value = "24h",
        value_parser = shop_config::duration
    )]
    pub request_id_retention: Duration,
    /// How often rows past their retention (outbox, inbox, request ids) are
    /// deleted; every start sweeps once too.
    #[arg(
        long = "retention-interval",
        env = "RETENTION_INTERVAL",
        value_name = "DURATION",
        default_value = "1m",
        value_parser = shop_config::duration
    )]
    pub retention_interval: Duration,
    /// After SIGTERM, how long in-flight calls, the relay's last batch and
    /// the consumer's batch may take.
    #[arg(
        long = "shutdown-grace",
        env = "SHUTDOWN_GRACE",
        value_name = "DURATION",
        default_value = "10s",
        value_parser = shop_config::duration
    )]
    pub shutdown_grace: Duration,
    /// Logs and traces.
    #[command(flatten)]
    pub telemetry: TelemetryConfig,
    /// Refuse to start with any plaintext connection: a `DATABASE_URL`
    /// without `sslmode=require`, an `amqp://` broker, gRPC without
    /// `GRPC_TLS_CERT` (see [`crate::require_tls`]).
    #[arg(
        long = "require-tls",
        env = "REQUIRE_TLS",
        value_name = "BOOL",
        default_value = "false",
        action = ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub require_tls: bool,
}

impl HostConfig {
    /// The checks that span several settings (each setting alone is checked
    /// by its parser): one line naming the variables when one fails.
    pub fn validate(&self) -> Result<(), String> {
        self.database.validate()?;
        crate::require_tls::check(self)?;
        let idle = self.database.idle_in_transaction_timeout;
        let confirm = self.relay.confirm_timeout;
        let batch = self.relay.batch_time;
        if idle <= batch + confirm {
            return Err(format!(
                "DATABASE_IDLE_IN_TRANSACTION_TIMEOUT ({}) must be longer than RELAY_BATCH_TIME ({}) plus \
                 RELAY_CONFIRM_TIMEOUT ({}): the relay publishes and waits for the broker's confirms \
                 inside its batch's transaction",
                humantime::format_duration(idle),
                humantime::format_duration(batch),
                humantime::format_duration(confirm)
            ));
        }
        Ok(())
    }
}

impl HostConfig {
    /// The relay's signing key, or the one line naming the missing
    /// setting: every relay signs (`EVENT_SIGNING_KEY_FILE`,
    /// `EVENT_SIGNING_KEY_ID`).
    pub fn signing_key(&self) -> Result<shop_messaging::signing::SigningKey, String> {
        self.relay.signing.key()
    }
}

/// The configuration of service `S`: the host's part and the service's own.
#[derive(Debug)]
pub struct Config<S: Service> {
    /// What every service reads.
    pub host: HostConfig,
    /// What this service reads besides.
    pub service: S::Config,
}

// By hand: a derive would ask `S` itself to be `Clone`.
impl<S: Service> Clone for Config<S> {
    fn clone(&self) -> Self {
        Self {
            host: self.host.clone(),
            service: self.service.clone(),
        }
    }
}

impl<S: Service> Config<S> {
    /// Every setting at its default for `S`, ignoring the environment: what
    /// tests and tools start from.
    ///
    /// # Panics
    ///
    /// When a setting has no default (a mistake caught by each service's
    /// tests).
    #[allow(clippy::expect_used)]
    pub fn defaults() -> Self {
        let command = shop_config::without_environment(settings_command::<S>());
        let matches = command
            .try_get_matches_from([S::NAME])
            .expect("every setting declares a default");
        Self::from_matches(&matches).expect("defaults fit their fields")
    }

    /// The configuration from the process's environment, with `flags`
    /// (`--grpc-addr=…`) taking precedence: how `shop up` runs two services in
    /// one process with their own addresses and databases.
    pub fn from_env_and_flags<I, T>(flags: I) -> anyhow::Result<Self>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let command = settings_command::<S>();
        let args =
            std::iter::once(std::ffi::OsString::from(S::NAME)).chain(flags.into_iter().map(Into::into));
        let matches = command.clone().try_get_matches_from(args).map_err(|error| {
            anyhow::anyhow!("{}: {}", S::NAME, shop_config::one_line_error(&command, &error))
        })?;
        Ok(Self::from_matches(&matches)?)
    }

    /// What serving needs beyond each setting's own check: who may call
    /// (`GRPC_AUTH` and what it needs), the relay's signing key (when the
    /// relay runs in the process) and the service's own checks
    /// ([`Service::validate`]); one line when one fails.
    pub fn validate_for_serving(&self) -> Result<(), String> {
        self.host.grpc.auth.validate(self.host.grpc.tls_cert.is_some())?;
        if self.host.relay_enabled {
            self.host.signing_key()?;
        }
        S::validate(&self.service)
    }

    pub(crate) fn from_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut host = HostConfig::from_arg_matches(matches)?;
        host.database.read_files();
        host.amqp.read_files();
        let config = Self {
            host,
            service: S::Config::from_arg_matches(matches)?,
        };
        Ok(config.complete())
    }

    /// Fills what follows from the service rather than from a variable (the
    /// relay's exchange and `app_id`, the telemetry's service name), after
    /// the service's settings were changed in code. [`crate::App::build`]
    /// does it too.
    #[must_use]
    pub fn complete(mut self) -> Self {
        self.host.relay.exchange = S::events_exchange(&self.service).to_owned();
        self.host.relay.app_id = S::NAME.to_owned();
        self.host.telemetry.service_name = S::NAME.to_owned();
        self.host.telemetry.service_version = crate::VERSION.to_owned();
        self
    }
}

/// Every setting of `S` as a command (no subcommands), with the service's
/// own defaults for its database, its gRPC address and its admin address.
pub fn settings_command<S: Service>() -> Command {
    let command = HostConfig::augment_args(Command::new(S::NAME));
    // In place, so every setting keeps its position in `--help`.
    S::Config::augment_args(command).mut_args(|arg| match arg.get_id().as_str() {
        "database_url" => arg.default_value(S::DEFAULTS.database_url),
        "grpc_addr" => arg.default_value(S::DEFAULTS.grpc_addr),
        "admin_addr" => arg.default_value(S::DEFAULTS.admin_addr),
        "relay_unroutable" => arg.default_value(S::DEFAULTS.relay_unroutable),
        _ => arg,
    })
}

/// The defaults that differ between services.
#[derive(Debug, Clone, Copy)]
pub struct ServiceDefaults {
    /// `DATABASE_URL`: the service's own database on the local server.
    pub database_url: &'static str,
    /// `GRPC_ADDR`.
    pub grpc_addr: &'static str,
    /// `ADMIN_ADDR`.
    pub admin_addr: &'static str,
    /// `RELAY_UNROUTABLE`: `wait` for events some consumer must receive,
    /// `drop` for an exchange nobody consumes yet.
    pub relay_unroutable: &'static str,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_idle_in_transaction_timeout_must_outlast_a_relay_batch_and_its_last_confirms() {
        let mut config: HostConfig = shop_config::defaults();
        assert_eq!(config.validate(), Ok(()), "the defaults: 2 s + 10 s within 15 s");

        config.relay.batch_time = Duration::from_secs(6);
        let Err(error) = config.validate() else {
            panic!("6 s of sending and 10 s of confirms outlast 15 s idle in a transaction");
        };
        assert!(
            error.contains("RELAY_BATCH_TIME")
                && error.contains("RELAY_CONFIRM_TIMEOUT")
                && error.contains("DATABASE_IDLE_IN_TRANSACTION_TIMEOUT"),
            "{error}"
        );
    }
}
