//! The `shop` command line, on the client SDK: manage users and orders,
//! inspect and repair dead letters, and run the whole system locally.
//!
//! Exit codes tell scripts what happened: 0 success, 2 a usage error (bad
//! arguments, or a request the server refused as invalid), 3 not found, 4 a
//! conflict (already exists, version mismatch, failed precondition), 5 a
//! service unavailable or too slow, 6 a call refused for its credentials
//! (unauthenticated, not permitted), 1 anything else.
//!
//! The services authenticate every call: the CLI sends the bearer token of
//! `--token` / `SHOP_TOKEN`, else of `--token-file` / `SHOP_TOKEN_FILE`,
//! else the one `shop up` writes to the state directory ([`token`]), and a
//! client certificate with `--cert-file` and `--key-file`.
#![forbid(unsafe_code)]

mod args;
mod dlq;
pub mod keys;
mod output;
mod records;
pub mod token;
pub mod up;

use std::process::ExitCode;

pub use args::{Cli, Command, DlqCommand, OrdersCommand, ResyncArgs, UsersCommand};
use shop_client::{ClientConfig, Error, OrderClient, ResyncSelection, UserClient, UserUpdate};

use crate::output::Output;

/// Exit code of a usage error.
pub const EXIT_USAGE: u8 = 2;
/// Exit code of a not-found error.
pub const EXIT_NOT_FOUND: u8 = 3;
/// Exit code of a conflict.
pub const EXIT_CONFLICT: u8 = 4;
/// Exit code of an unavailable service.
pub const EXIT_UNAVAILABLE: u8 = 5;
/// Exit code of a call refused for its credentials (`UNAUTHENTICATED`,
/// `PERMISSION_DENIED`).
pub const EXIT_DENIED: u8 = 6;

/// Runs a parsed command line and returns the process's exit code.
pub async fn run(cli: Cli) -> ExitCode {
    let output = Output { json: cli.json };
    let outcome = match cli.command {
        Command::Users(command) => users(&cli.connection, command, &output).await,
        Command::Orders(command) => orders(&cli.connection, command, &output).await,
        Command::Dlq(command) => dlq::run(&cli.connection, command, &output)
            .await
            .map_err(Failure::Other),
        Command::Up(args) => up::run(args).await.map_err(Failure::Other),
        Command::Token(command) => match token::run(command) {
            Ok(printed) => {
                #[allow(clippy::print_stdout)] // a token or a line for the operator
                {
                    print!("{printed}");
                }
                Ok(())
            }
            Err(error) => Err(Failure::Other(error)),
        },
        Command::EventKeys(args::EventKeysCommand::New(args)) => match keys::ensure(&args) {
            Ok(ensured) => {
                output.value(
                    serde_json::json!({"id": args.id, "public": ensured.line, "made": ensured.made}),
                    &ensured.line,
                );
                Ok(())
            }
            Err(error) => Err(Failure::Other(error)),
        },
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            output.failure(&failure);
            ExitCode::from(failure.exit_code())
        }
    }
}

/// Why a command failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// A call to a service failed.
    Call(Error),
    /// Anything else (the broker, the command's own checks).
    Other(anyhow::Error),
}

impl Failure {
    fn exit_code(&self) -> u8 {
        let Self::Call(error) = self else { return 1 };
        match error {
            Error::InvalidArgument { .. } | Error::Config(_) => EXIT_USAGE,
            Error::NotFound(_) => EXIT_NOT_FOUND,
            Error::AlreadyExists(_) | Error::Conflict(_) | Error::FailedPrecondition(_) => EXIT_CONFLICT,
            Error::Unavailable(_) | Error::DeadlineExceeded(_) => EXIT_UNAVAILABLE,
            Error::Unauthenticated(_) | Error::PermissionDenied(_) => EXIT_DENIED,
            Error::Server { .. } => 1,
        }
    }
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Self::Call(error)
    }
}

fn config(endpoint: &str, connection: &args::Connection) -> Result<ClientConfig, Failure> {
    connection.client_config(endpoint).map_err(Failure::Other)
}

async fn users(connection: &args::Connection, command: UsersCommand, output: &Output) -> Result<(), Failure> {
    let client = UserClient::connect(config(&connection.user_endpoint, connection)?)?;
    match command {
        UsersCommand::Create { email, name } => output.user(&client.create_user(&email, &name).await?),
        UsersCommand::Get { id } => output.user(&client.get_user(&id).await?),
        UsersCommand::Update {
            id,
            version,
            email,
            name,
        } => output.user(
            &client
                .update_user(&id, version, UserUpdate { email, name })
                .await?,
        ),
        UsersCommand::Delete { id, version } => {
            client.delete_user(&id, version).await?;
            output.done(&format!("deleted user {id}"));
        }
        UsersCommand::List { page } => {
            let mut token = page.page_token.clone();
            let mut users = Vec::new();
            loop {
                let listed = client.list_users(page.page_size, &token).await?;
                users.extend(listed.items);
                token = listed.next_page_token;
                if !page.all || token.is_empty() {
                    break;
                }
            }
            output.users(&users, &token);
        }
        UsersCommand::Resync(args) => {
            let selection = match (args.all, args.changed_since) {
                (true, _) => ResyncSelection::All,
                (false, Some(since)) => ResyncSelection::ChangedSince(since),
                (false, None) => ResyncSelection::Users(args.users),
            };
            let last = client
                .resync_users(selection, args.max_per_second, |progress| {
                    output.resync_progress(progress)
                })
                .await?;
            output.resync_done(&last);
        }
    }
    Ok(())
}

async fn orders(
    connection: &args::Connection,
    command: OrdersCommand,
    output: &Output,
) -> Result<(), Failure> {
    let client = OrderClient::connect(config(&connection.order_endpoint, connection)?)?;
    match command {
        OrdersCommand::Create { user, items } => {
            let items: Vec<(&str, i32)> = items
                .iter()
                .map(|item| (item.product_id.as_str(), item.quantity))
                .collect();
            output.order(&client.create_order(&user, &items).await?);
        }
        OrdersCommand::Get { id } => output.order(&client.get_order(&id).await?),
        OrdersCommand::List { user, page } => {
            let mut token = page.page_token.clone();
            let mut orders = Vec::new();
            loop {
                let listed = client.list_orders(&user, page.page_size, &token).await?;
                orders.extend(listed.items);
                token = listed.next_page_token;
                if !page.all || token.is_empty() {
                    break;
                }
            }
            output.orders(&orders, &token);
        }
        OrdersCommand::Cancel { id, version } => output.order(&client.cancel_order(&id, version).await?),
    }
    Ok(())
}
