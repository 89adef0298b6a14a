//! `bench`: every stage of the system measured beside the raw limit of the
//! same machine, in one run. See `cargo run --release -p bench -- --help`.
#![allow(clippy::print_stdout)] // the report is the point

mod cpu;
mod env;
mod marker;
mod noop;
mod report;
mod stages;
mod stats;

use std::time::Duration;

use clap::{Parser, Subcommand};

/// Measures the system against the raw limits of this machine: starts the
/// services itself against the local PostgreSQL (`BENCH_DATABASE_URL`,
/// default `postgres://postgres:postgres@localhost:5432/postgres`, whose
/// server gets two fresh databases) and RabbitMQ (`AMQP_URL`), prints one
/// table, writes it as JSON, and removes what it created.
#[derive(Debug, Parser)]
#[command(name = "bench", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    options: Options,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every stage and print the table (the default).
    All,
    /// Run one service (the benchmark starts its services as child
    /// processes of itself, so their memory is theirs alone).
    #[command(hide = true)]
    Serve {
        /// `user`, `order`, or `noop` (a gRPC server that does nothing).
        service: String,
    },
}

/// What to measure, and how much.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Options {
    /// Seconds per CreateUser concurrency level (gRPC and raw each).
    #[arg(long, global = true, default_value_t = 5)]
    pub(crate) duration_secs: u64,
    /// CreateUser concurrency levels.
    #[arg(long, global = true, value_delimiter = ',', default_value = "1,8,32,64")]
    pub(crate) concurrency: Vec<usize>,
    /// Events for the relay, consumer and end-to-end stages.
    #[arg(long, global = true, default_value_t = 50_000)]
    pub(crate) events: usize,
    /// Prefetch of the consumer and of the raw consumer.
    #[arg(long, global = true, default_value_t = 200)]
    pub(crate) prefetch: u16,
    /// Seconds of each end-to-end latency rate.
    #[arg(long, global = true, default_value_t = 20)]
    pub(crate) latency_secs: u64,
    /// Where to write the results as JSON.
    #[arg(long, global = true, default_value = "target/bench-results.json")]
    pub(crate) out: std::path::PathBuf,
    /// Stages to run: create-user, relay, consumer, ordered, end-to-end,
    /// latency, steady, cpu-bound, replicas, signing (consumer drains what
    /// relay published, so it needs relay; steady's rate bound needs
    /// create-user, relay and consumer; cpu-bound measures the raw stages
    /// at the batch sizes steady formed and compares with its CPU per
    /// event, so it needs steady; signing puts its cost beside relay's and
    /// steady's when they ran).
    #[arg(
        long,
        global = true,
        value_delimiter = ',',
        default_value = "create-user,relay,consumer,ordered,end-to-end,latency,steady,cpu-bound,replicas,signing"
    )]
    pub(crate) stages: Vec<String>,
    /// Seconds of each raw stage of the CPU bound (and of each commit
    /// ceiling round).
    #[arg(long, global = true, default_value_t = 5)]
    pub(crate) cpu_secs: u64,
    /// Seconds of each steady-state rate step.
    #[arg(long, global = true, default_value_t = 10)]
    pub(crate) steady_secs: u64,
    /// The first steady-state rate, commands/s; each step offers 1.4 times
    /// the one before until the pipeline no longer keeps up.
    #[arg(long, global = true, default_value_t = 500.0)]
    pub(crate) steady_start: f64,
    /// Rounds of each CreateUser measurement, alternating the service and
    /// the raw transaction; the median round is reported (the disk's fsync
    /// time drifts, alternating keeps both sides under the same drift).
    #[arg(long, global = true, default_value_t = 3)]
    pub(crate) rounds: usize,
    /// Partition counts of the ordered drain.
    #[arg(long, global = true, value_delimiter = ',', default_value = "1,2,4")]
    pub(crate) ordered_partitions: Vec<u16>,
    /// Consumer instance counts of the ordered drain.
    #[arg(long, global = true, value_delimiter = ',', default_value = "1,2")]
    pub(crate) ordered_instances: Vec<usize>,
    /// The PostgreSQL server (and maintenance database) the benchmark
    /// creates its two databases on.
    #[arg(
        long,
        global = true,
        env = "BENCH_DATABASE_URL",
        default_value = "postgres://postgres:postgres@localhost:5432/postgres",
        hide_env_values = true
    )]
    pub(crate) database_url: String,
    /// RabbitMQ.
    #[arg(
        long,
        global = true,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@localhost:5672/%2f",
        hide_env_values = true
    )]
    pub(crate) amqp_url: String,
    /// A tiny run that checks the benchmark works (CI), not a measurement.
    #[arg(long, global = true)]
    pub(crate) smoke: bool,
}

impl Options {
    pub(crate) fn duration(&self) -> Duration {
        Duration::from_secs(self.duration_secs)
    }

    /// How long each raw stage of the CPU bound runs.
    pub(crate) fn cpu_duration(&self) -> Duration {
        Duration::from_secs(self.cpu_secs)
    }

    fn smoke(mut self) -> Self {
        if self.smoke {
            self.duration_secs = 1;
            self.concurrency = vec![1, 8];
            self.events = 500;
            self.latency_secs = 2;
            self.steady_secs = 1;
            self.cpu_secs = 1;
            self.steady_start = 50.0;
            self.rounds = 1;
        }
        self
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Some(Command::Serve { service }) => runtime.block_on(env::serve(&service)),
        Some(Command::All) | None => runtime.block_on(run(cli.options.smoke())),
    }
}

async fn run(options: Options) -> anyhow::Result<()> {
    let bench = env::Bench::prepare(&options).await?;
    let mut report = report::Report::new().await;
    let outcome = stages::run_all(&bench, &options, &mut report).await;
    bench.clean_up().await;
    outcome?;
    report.print();
    report.write(&options.out)?;
    println!("\nwritten to {}", options.out.display());
    Ok(())
}
