//! `shop`: the command line of the system. See `shop --help`.

use std::process::ExitCode;

use clap::Parser as _;
use shop_cli::{Cli, run};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    run(cli).await
}
