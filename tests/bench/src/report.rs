//! The table (figure, raw limit, ratio), printed and written as JSON.

use serde_json::{Value, json};

/// One line of the table.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub(crate) figure: String,
    pub(crate) value: String,
    pub(crate) raw: String,
    pub(crate) ratio: Option<f64>,
    pub(crate) numbers: Value,
}

/// The results of a run and the machine it ran on.
#[derive(Debug)]
pub(crate) struct Report {
    machine: Value,
    rows: Vec<Row>,
    /// The raw rates of the run, by what they measure, for the steady
    /// state's bound (the best one seen of each).
    bounds: std::collections::BTreeMap<&'static str, f64>,
}

fn command_version(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

impl Report {
    pub(crate) async fn new() -> Self {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|info| {
                let line = info.lines().find(|l| l.starts_with("MemTotal:"))?.to_owned();
                let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
                Some(format!("{:.1} GiB", kib / 1024.0 / 1024.0))
            })
            .unwrap_or_default();
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, name)| name.trim().to_owned())
            })
            .unwrap_or_default();
        let machine = json!({
            "cores": cores,
            "memory": memory,
            "cpu": cpu,
            "rustc": command_version("rustc", &["--version"]),
            "postgresql": command_version("psql", &["--version"]),
            "rabbitmq": command_version("rabbitmqctl", &["version"]),
        });
        Self {
            machine,
            rows: Vec::new(),
            bounds: std::collections::BTreeMap::new(),
        }
    }

    /// Records a raw rate (per second) of `what`; the highest is kept.
    pub(crate) fn bound(&mut self, what: &'static str, rate: f64) {
        let best = self.bounds.entry(what).or_insert(rate);
        *best = best.max(rate);
    }

    /// `1 / Σ (1 / rate)` over the raw rates of `parts`, and their per-event
    /// costs spelled out; `None` unless every part was measured.
    pub(crate) fn bound_rate(&self, parts: &[&str]) -> Option<(f64, String)> {
        let rates: Vec<(&str, f64)> = parts
            .iter()
            .map(|part| Some((*part, *self.bounds.get(part).filter(|rate| **rate > 0.0)?)))
            .collect::<Option<_>>()?;
        let seconds: f64 = rates.iter().map(|(_, rate)| 1.0 / rate).sum();
        let spelled = rates
            .iter()
            .map(|(part, rate)| format!("{part} {:.0} µs", 1e6 / rate))
            .collect::<Vec<_>>()
            .join(" + ");
        Some((1.0 / seconds, spelled))
    }

    /// The numbers of the last row whose figure starts with `prefix`.
    pub(crate) fn numbers(&self, prefix: &str) -> Option<&Value> {
        self.rows
            .iter()
            .rev()
            .find(|row| row.figure.starts_with(prefix))
            .map(|row| &row.numbers)
    }

    /// Number `key` of [`Self::numbers`].
    pub(crate) fn number(&self, prefix: &str, key: &str) -> Option<f64> {
        self.numbers(prefix)?.get(key)?.as_f64()
    }

    pub(crate) fn add(&mut self, row: Row) {
        println!(
            "{:<52} {:<48} {:<44} {}",
            row.figure,
            row.value,
            row.raw,
            row.ratio
                .map(|r| format!("{:.0} %", r * 100.0))
                .unwrap_or_default()
        );
        self.rows.push(row);
    }

    pub(crate) fn print(&self) {
        println!("\nmachine: {}", self.machine);
        println!("\n| figure | measured | raw limit | ratio |\n|---|---|---|---|");
        for row in &self.rows {
            println!(
                "| {} | {} | {} | {} |",
                row.figure,
                row.value,
                row.raw,
                row.ratio
                    .map(|r| format!("{:.0} %", r * 100.0))
                    .unwrap_or_else(|| "—".to_owned())
            );
        }
    }

    pub(crate) fn write(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|row| {
                json!({
                    "figure": row.figure,
                    "measured": row.value,
                    "raw_limit": row.raw,
                    "ratio": row.ratio,
                    "numbers": row.numbers,
                })
            })
            .collect();
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(
            path,
            serde_json::to_string_pretty(&json!({"machine": self.machine, "rows": rows}))?,
        )?;
        Ok(())
    }
}
