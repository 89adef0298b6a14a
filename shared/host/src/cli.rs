//! The command line of every service binary.
//!
//! ```text
//! user-service [serve]        gRPC server, outbox relay and the service's tasks (default)
//! user-service relay          only the outbox relay
//! user-service healthcheck    exit 0 when the server at GRPC_ADDR is SERVING
//!   [--service NAME]          … or the part named (order-service.consumer)
//! user-service --print-config every setting, where it came from, secrets hidden
//! user-service --help         every setting with its variable and default
//! ```
//!
//! Settings come from environment variables; each is also a flag
//! (`DATABASE_POOL_SIZE` is `--database-pool-size`), which wins over the
//! variable. A bad value stops start-up before anything runs, with one line
//! that names the variable and what it accepts, and exit code 2.

use std::io::Write as _;
use std::process::ExitCode;

use clap::{Arg, ArgAction, ArgMatches, Command};

use crate::config::{Config, settings_command};
use crate::{Service, shutdown};

/// What the binary was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Serve (the default).
    Serve,
    /// Run only the outbox relay.
    Relay,
    /// Check the health of the server at `GRPC_ADDR`, or of one of its
    /// parts.
    Healthcheck {
        /// The health name to check (`""`: the server).
        service: String,
    },
    /// Print the configuration.
    PrintConfig,
}

/// The whole command line of `S`: subcommands, `--print-config` and every
/// setting.
pub fn command<S: Service>() -> Command {
    settings_command::<S>()
        .about(S::ABOUT)
        .version(crate::VERSION)
        .long_about(format!(
            "{}\n\nEvery setting is read from its environment variable (shown as [env: …]) and can be \
             given as a flag instead; durations take a unit (250ms, 10s, 5m, 24h).",
            S::ABOUT
        ))
        .arg(
            Arg::new("print_config")
                .long("print-config")
                .action(ArgAction::SetTrue)
                .help("Print every setting with its value and where it came from (secrets hidden), then exit"),
        )
        .subcommand(Command::new("serve").about(
            "Run the gRPC server, the outbox relay (unless RELAY_ENABLED=false) and the service's tasks (the default)",
        ))
        .subcommand(
            Command::new("relay").about("Run only the outbox relay (with RELAY_ENABLED=false on the servers)"),
        )
        .subcommand(
            Command::new("healthcheck")
                .about("Exit 0 if the server at GRPC_ADDR reports SERVING (container health check)")
                .arg(
                    Arg::new("service")
                        .long("service")
                        .value_name("NAME")
                        .default_value("")
                        .help("Check this health name instead of the server (e.g. order-service.consumer)"),
                ),
        )
}

/// Parses `args` as the command line of `S`.
///
/// `Err` carries what to print and the exit code: help and version (0), or a
/// one-line error (2).
pub fn parse<S, I, T>(args: I) -> Result<(Action, Config<S>, ArgMatches), (String, u8)>
where
    S: Service,
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let command = command::<S>();
    let matches = match command.clone().try_get_matches_from(args) {
        Ok(matches) => matches,
        Err(error) => {
            use clap::error::ErrorKind;
            return Err(match error.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => (error.render().to_string(), 0),
                _ => (
                    format!("{}: {}\n", S::NAME, shop_config::one_line_error(&command, &error)),
                    2,
                ),
            });
        }
    };
    let config = Config::<S>::from_matches(&matches).map_err(|error| {
        (
            format!("{}: {}\n", S::NAME, shop_config::one_line_error(&command, &error)),
            2,
        )
    })?;
    config
        .host
        .validate()
        .map_err(|error| (format!("{}: {error}\n", S::NAME), 2))?;
    let action = if matches.get_flag("print_config") {
        Action::PrintConfig
    } else {
        match matches.subcommand_name() {
            Some("relay") => Action::Relay,
            Some("healthcheck") => Action::Healthcheck {
                service: matches
                    .subcommand_matches("healthcheck")
                    .and_then(|m| m.get_one::<String>("service"))
                    .cloned()
                    .unwrap_or_default(),
            },
            _ => Action::Serve,
        }
    };
    // Settings that serving needs (who may call, a signing key, trusted
    // keys) are checked now, for the same one-line refusal; printing the
    // configuration and the health check do without them.
    let ready = match action {
        Action::Serve => config.validate_for_serving(),
        Action::Relay => config.host.signing_key().map(drop),
        Action::Healthcheck { .. } | Action::PrintConfig => Ok(()),
    };
    ready.map_err(|error| (format!("{}: {error}\n", S::NAME), 2))?;
    Ok((action, config, matches))
}

/// Every setting of `S` as `VARIABLE=value  # source`, secrets redacted.
pub fn print_config<S: Service>(matches: &ArgMatches) -> String {
    let settings = shop_config::describe(&command::<S>(), matches);
    let width = settings
        .iter()
        .map(|s| s.variable.len() + s.value.len() + 1)
        .max()
        .unwrap_or(0);
    settings
        .iter()
        .map(|setting| {
            let assignment = format!("{}={}", setting.variable, setting.value);
            let source = setting
                .source
                .map_or_else(|| "unset".to_owned(), |source| source.to_string());
            format!("{assignment:width$}  # {source}\n")
        })
        .collect()
}

/// The `main` of every service binary: parses the command line, sets up
/// telemetry and runs what was asked until SIGINT/SIGTERM.
pub fn main<S: Service>() -> ExitCode {
    crate::arm_fault_points();
    let (action, config, matches) = match parse::<S, _, _>(std::env::args_os()) {
        Ok(parsed) => parsed,
        Err((text, code)) => {
            if code == 0 {
                let _ = std::io::stdout().write_all(text.as_bytes());
            } else {
                let _ = std::io::stderr().write_all(text.as_bytes());
            }
            return ExitCode::from(code);
        }
    };
    if action == Action::PrintConfig {
        let _ = std::io::stdout().write_all(print_config::<S>(&matches).as_bytes());
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            let _ = writeln!(
                std::io::stderr(),
                "{}: failed to start the runtime: {error}",
                S::NAME
            );
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(action, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(()) => ExitCode::FAILURE,
    }
}

async fn run<S: Service>(action: Action, mut config: Config<S>) -> Result<(), ()> {
    if matches!(action, Action::Healthcheck { .. }) {
        // A one-shot probe: only problems are logged, nothing is exported.
        config.host.telemetry.log_filter = "warn".to_owned();
        config.host.telemetry.otlp_endpoint = None;
    }
    let telemetry = match shop_telemetry::init(&config.host.telemetry) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "{}: {error:#}", S::NAME);
            return Err(());
        }
    };
    let shutdown = crate::CancellationToken::new();
    shutdown::cancel_on_signal(shutdown.clone());
    let outcome = match action {
        Action::Serve => match crate::App::build(config).await {
            Ok(app) => app.run(shutdown).await,
            Err(error) => Err(error),
        },
        Action::Relay => crate::run_relay(config, shutdown).await,
        Action::Healthcheck { service } => crate::healthcheck::check(&config.host.grpc, &service).await,
        Action::PrintConfig => Ok(()),
    };
    if let Err(error) = &outcome {
        tracing::error!(service = S::NAME, error = format!("{error:#}"), "service failed");
    }
    telemetry.shutdown();
    outcome.map_err(drop)
}
