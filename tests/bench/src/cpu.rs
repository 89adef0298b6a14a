//! CPU time of the processes a stage involves, read from `/proc`: the
//! services, PostgreSQL's postmaster with its backends, the RabbitMQ node,
//! and this process's own threads (the load generator, or the plain client
//! of a raw stage).
//!
//! Times are clock ticks of `/proc/<pid>/stat` (`utime + stime`, 100 a
//! second): a measured part must run for seconds, not milliseconds, for its
//! figure to mean something.

use std::collections::BTreeMap;

/// Clock ticks a second (`getconf CLK_TCK`; 100 on Linux).
pub(crate) const TICKS_PER_SECOND: f64 = 100.0;

/// The CPU time of a process, in clock ticks: its own, and its waited-for
/// children's; and its parent.
fn ticks(pid: u32) -> Option<(u64, u64, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields are counted
    // after its closing parenthesis (field 3 is then the first).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let number = |field: usize| fields.get(field - 3)?.parse::<u64>().ok();
    let ppid = u32::try_from(number(4)?).ok()?;
    Some((number(14)? + number(15)?, number(16)? + number(17)?, ppid))
}

/// The CPU of `pid` alone (all its threads), in ticks: not its children's.
pub(crate) fn own_ticks(pid: u32) -> u64 {
    ticks(pid).map_or(0, |(own, _, _)| own)
}

/// The CPU of `pid`, its live children and its exited children, in ticks,
/// leaving out the children in `apart` (counted under their own names: the
/// services are children of the load generator's process).
fn tree_ticks(pid: u32, apart: &[u32]) -> u64 {
    let Some((own, exited, _)) = ticks(pid) else {
        return 0;
    };
    let children: u64 = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| !apart.contains(child))
        .filter_map(ticks)
        .filter(|(_, _, ppid)| *ppid == pid)
        .map(|(cpu, _, _)| cpu)
        .sum();
    own + exited + children
}

/// The process listening on TCP `port` (from `/proc/net/tcp*` and the
/// processes' descriptors).
pub(crate) fn listener(port: u16) -> Option<u32> {
    let port = format!(":{port:04X}");
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|table| table.lines().skip(1).map(str::to_owned).collect::<Vec<_>>())
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let listening = fields.get(3) == Some(&"0A");
            (listening && fields.get(1)?.ends_with(&port))
                .then(|| fields.get(9).map(|inode| (*inode).to_owned()))?
        })?;
    let socket = format!("socket:[{inode}]");
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|fd| {
                    std::fs::read_link(fd.path()).is_ok_and(|target| target.to_string_lossy() == socket)
                })
        })
}

/// The port of a URL (`scheme://…host:port/…`), or `default`.
pub(crate) fn port_of(url: &str, default: u16) -> u16 {
    url.split_once("://")
        .map(|(_, rest)| rest.split('/').next().unwrap_or_default())
        .and_then(|authority| authority.rsplit('@').next())
        .and_then(|host| host.rsplit_once(':'))
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or(default)
}

/// PostgreSQL's postmaster (whose tree holds every backend) and the
/// RabbitMQ node, found by the ports of the benchmark's URLs.
pub(crate) fn servers(options: &crate::Options) -> Vec<(&'static str, u32)> {
    let mut servers = Vec::new();
    if let Some(pid) = listener(port_of(&options.database_url, 5432)) {
        servers.push((POSTGRESQL, pid));
    }
    if let Some(pid) = listener(port_of(&options.amqp_url, 5672)) {
        servers.push((RABBITMQ, pid));
    }
    servers
}

/// The name PostgreSQL's CPU goes under.
pub(crate) const POSTGRESQL: &str = "postgresql";
/// The name the RabbitMQ node's CPU goes under.
pub(crate) const RABBITMQ: &str = "rabbitmq";
/// The name this process's own CPU goes under in a raw stage.
pub(crate) const CLIENT: &str = "client";

/// How a process's CPU is counted.
#[derive(Debug, Clone, Copy)]
enum Scope {
    /// With its children (live and exited), except the other processes
    /// counted: PostgreSQL's backends are the postmaster's children.
    Tree,
    /// Its own threads only (this process: the services and the no-op
    /// server are its children, and are counted under their own names).
    Own,
}

/// The processes whose CPU a measurement counts, by name.
pub(crate) struct Processes(Vec<(&'static str, u32, Scope)>);

impl Processes {
    /// `named` counted with their children (but not each other).
    pub(crate) fn new(named: Vec<(&'static str, u32)>) -> Self {
        Self(
            named
                .into_iter()
                .map(|(name, pid)| (name, pid, Scope::Tree))
                .collect(),
        )
    }

    /// Adds this process's own threads as `name`.
    pub(crate) fn with_own(mut self, name: &'static str) -> Self {
        self.0.push((name, std::process::id(), Scope::Own));
        self
    }

    /// Ticks so far, by name.
    pub(crate) fn cpu(&self) -> BTreeMap<&'static str, u64> {
        let pids: Vec<u32> = self.0.iter().map(|(_, pid, _)| *pid).collect();
        self.0
            .iter()
            .map(|(name, pid, scope)| {
                let ticks = match scope {
                    Scope::Tree => tree_ticks(*pid, &pids),
                    Scope::Own => own_ticks(*pid),
                };
                (*name, ticks)
            })
            .collect()
    }
}

/// The ticks of the whole machine: busy and all (from `/proc/stat`).
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let numbers: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|n| n.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is in user).
    let all: u64 = numbers.iter().take(8).sum();
    let idle = numbers.get(3)? + numbers.get(4)?;
    Some((all - idle, all))
}

/// A measurement under way: the ticks of every process when it began.
pub(crate) struct Meter<'a> {
    processes: &'a Processes,
    before: BTreeMap<&'static str, u64>,
    machine: Option<(u64, u64)>,
}

/// What a measurement spent, per event.
#[derive(Debug, Clone, Default)]
pub(crate) struct Spent {
    /// CPU µs per event, by process.
    pub(crate) us_per_event: BTreeMap<&'static str, f64>,
    /// How busy the machine's CPUs were meanwhile, 0 to 1 (every process,
    /// also those not counted).
    pub(crate) machine_busy: f64,
}

impl Spent {
    /// The sum over every process counted.
    pub(crate) fn total(&self) -> f64 {
        self.us_per_event.values().sum()
    }

    /// The sum over every process but `left_out`.
    pub(crate) fn total_without(&self, left_out: &str) -> f64 {
        self.us_per_event
            .iter()
            .filter(|(name, _)| **name != left_out)
            .map(|(_, us)| us)
            .sum()
    }

    /// `name a, name b, …` in µs.
    pub(crate) fn spelled(&self) -> String {
        self.us_per_event
            .iter()
            .map(|(name, us)| format!("{name} {us:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl<'a> Meter<'a> {
    pub(crate) fn start(processes: &'a Processes) -> Self {
        Self {
            processes,
            before: processes.cpu(),
            machine: machine_ticks(),
        }
    }

    /// The CPU spent since [`Meter::start`], per one of `events`.
    pub(crate) fn per_event(&self, events: usize) -> Spent {
        let after = self.processes.cpu();
        let per_event = |name: &&'static str| {
            let ticks = after
                .get(name)
                .copied()
                .unwrap_or(0)
                .saturating_sub(self.before.get(name).copied().unwrap_or(0));
            ticks as f64 / TICKS_PER_SECOND * 1e6 / events.max(1) as f64
        };
        let machine_busy = match (self.machine, machine_ticks()) {
            (Some((busy, all)), Some((busy_after, all_after))) if all_after > all => {
                busy_after.saturating_sub(busy) as f64 / (all_after - all) as f64
            }
            _ => f64::NAN,
        };
        Spent {
            us_per_event: after.keys().map(|name| (*name, per_event(name))).collect(),
            machine_busy,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::port_of;

    #[test]
    fn ports_come_from_the_url_or_the_default() {
        assert_eq!(
            port_of("postgres://postgres:postgres@localhost:5433/postgres", 5432),
            5433
        );
        assert_eq!(port_of("postgres://localhost/postgres", 5432), 5432);
        assert_eq!(port_of("amqp://guest:guest@localhost:5672/%2f", 1), 5672);
    }
}
