//! A RabbitMQ cluster of its own for one test, made of nodes of the broker
//! installed on this machine: failover, quorum queue membership and
//! partitions can be tested without Docker and without touching the
//! machine's own broker.
//!
//! [`RabbitCluster::start`] runs three nodes (or [`ClusterOptions::nodes`])
//! named `shop-<id>-<i>@localhost`, each from its own folder under a fresh
//! temporary directory, with its own AMQP port and distribution port,
//! configured only through the environment variables and files the
//! broker's scripts read:
//!
//! | variable | value |
//! |---|---|
//! | `RABBITMQ_NODENAME` | `shop-<id>-<i>@localhost` |
//! | `RABBITMQ_NODE_IP_ADDRESS`, `RABBITMQ_NODE_PORT` | `127.0.0.1`, the AMQP port |
//! | `RABBITMQ_DIST_PORT` | the distribution port |
//! | `RABBITMQ_MNESIA_BASE` | `<node>/mnesia` (the database, quorum queue logs and feature flags go under it) |
//! | `RABBITMQ_LOG_BASE` | `<node>/log` (`<node name>.log`) |
//! | `RABBITMQ_CONFIG_FILE`, `RABBITMQ_ADVANCED_CONFIG_FILE` | `<node>/rabbitmq.conf`, `<node>/advanced.config` |
//! | `RABBITMQ_ENABLED_PLUGINS_FILE` | `<node>/enabled_plugins`: `[].`, no plugin at all |
//! | `RABBITMQ_PID_FILE` | `<node>/rabbitmq.pid` |
//! | `RABBITMQ_CONF_ENV_FILE` | an empty file, so `/etc/rabbitmq/rabbitmq-env.conf` (which names the system node) is not read |
//! | `HOME` | `<cluster>/home`, holding the cluster's own `.erlang.cookie` |
//! | `ERL_EPMD_PORT` | the cluster's port mapper (below) |
//! | `ERL_AFLAGS` | `-start_epmd false`: never start a real epmd |
//! | `RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS` | `-kernel inet_dist_use_interface {127,0,0,1}`: distribution on loopback only |
//!
//! The command-line tools (`rabbitmqctl`, `rabbitmq-queues`) get the same
//! `HOME`, `RABBITMQ_CONF_ENV_FILE`, `ERL_EPMD_PORT` and `ERL_AFLAGS`, plus
//! `RABBITMQ_CTL_DIST_PORT_MIN=RABBITMQ_CTL_DIST_PORT_MAX=0` (any free port
//! instead of the eleven shared ones from 35672). Every other `RABBITMQ_*`
//! and `ERL_*` variable of the test process is removed.
//!
//! Ports are picked at random below the kernel's ephemeral range (so no
//! outgoing connection can take them before the node binds them), checked
//! free, and never handed out twice in one process; a node that still loses
//! the race gets new ports and boots again.
//!
//! Once every node has booted, nodes 2… join node 1 the operator's way
//! (`rabbitmqctl stop_app`, `join_cluster`, `start_app`), and `start`
//! returns only when every node's `cluster_status` lists all of them
//! running. That matters: RabbitMQ 3.10 picks a quorum queue's members once,
//! when it is declared, among the nodes running then (up to
//! `quorum_cluster_size`, set to the node count), and has no continuous
//! membership reconciliation (3.13 added it), so a queue declared on a
//! half-formed cluster would stay under-replicated. Nodes pause on the
//! minority side of a partition (`cluster_partition_handling =
//! pause_minority`), as a production cluster with quorum queues should.
//!
//! A node's boot costs about three seconds of CPU, nearly all of it loading
//! the broker's code; with no plugin there is little left to trim (smaller
//! VM tables or a single scheduler made no measurable difference), so the
//! nodes boot in parallel. Forming the cluster took 11 to 23 s on two
//! busy cores: about 9 s of booting, 4 to 5 s of joining, 1 s of checks.
//!
//! The cluster's nodes find each other through a port mapper of its own
//! (the `epmd` module), which answers with a relay in front of each node's
//! distribution port (the node itself listens on `RABBITMQ_DIST_PORT`):
//! [`RabbitCluster::isolate_node`] cuts a node off from the others (a
//! network partition) while the test and the tools still reach it. Cut
//! connections close at once, so both sides notice without waiting for
//! `net_ticktime`; the node alone on its side pauses, the others carry on,
//! and once healed it resumes by itself.
//!
//! Each node runs in its own process group under a small shell that holds a
//! pipe from the test process: if the test process dies without running
//! destructors, the pipe closes and the shell kills the group. Dropping the
//! cluster (a panic included) kills every node, waits until none of their
//! processes is left, and deletes the directory; after a panic it first
//! prints the end of each node's log.

mod epmd;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// How long one command-line tool call may take.
const TOOL_DEADLINE: Duration = Duration::from_secs(60);
/// How long nodes may take to agree on who is running.
const MEMBERSHIP_DEADLINE: Duration = Duration::from_secs(60);
/// How long a killed or stopped node's processes may take to disappear.
const EXIT_DEADLINE: Duration = Duration::from_secs(30);
/// Pause between two looks at something being awaited.
const POLL: Duration = Duration::from_millis(100);
/// Boot attempts per node when its ports turn out to be taken.
const BOOT_ATTEMPTS: usize = 3;

/// Runs the broker with its stdin (a pipe from the test process) on fd 3,
/// and kills the whole process group once that pipe closes, that is when the
/// test process is gone. `$0` is the `rabbitmq-server` script.
const LIFELINE: &str = "exec 3<&0\n(cat <&3 >/dev/null 2>&1; kill -KILL 0) &\nexec \"$0\"\n";

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// How many nodes (3).
    pub nodes: usize,
    /// The folder with the broker's own `rabbitmq-server`, `rabbitmqctl` and
    /// `rabbitmq-queues` scripts (not a distribution's wrapper, which would
    /// switch user and `HOME`). `None`: found from `rabbitmq-server` on the
    /// `PATH`.
    pub sbin_dir: Option<PathBuf>,
    /// How long one node may take to boot (90 s: three nodes booting at once
    /// on two busy cores are slow).
    pub boot_deadline: Duration,
    /// Broker definitions (JSON) every node loads at boot (`load_definitions`),
    /// e.g. the shipped ones with test passwords ([`shipped_definitions`]).
    /// A node that loads definitions creates no `guest` user.
    pub definitions: Option<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            nodes: 3,
            sbin_dir: None,
            boot_deadline: Duration::from_secs(90),
            definitions: None,
        }
    }
}

/// A running cluster; see the module documentation. Nodes are numbered from
/// 1, as in their names.
#[derive(Debug)]
pub struct RabbitCluster {
    id: String,
    dir: PathBuf,
    sbin: PathBuf,
    boot_deadline: Duration,
    definitions: Option<String>,
    nodes: Vec<Node>,
    mapper: epmd::PortMapper,
}

#[derive(Debug)]
struct Node {
    name: String,
    dir: PathBuf,
    amqp_port: AtomicU16,
    dist_port: AtomicU16,
    runtime: Mutex<Runtime>,
}

#[derive(Debug, Default)]
struct Runtime {
    process: Option<NodeProcess>,
    /// Whether the `rabbit` application should be running (booted and not
    /// stopped with `stop_node`).
    app_running: bool,
    isolated: bool,
}

#[derive(Debug)]
struct NodeProcess {
    child: Child,
    /// The write end of the lifeline pipe; the node's group is killed when it
    /// closes.
    lifeline: Option<ChildStdin>,
}

impl NodeProcess {
    /// Lets the lifeline's watcher go (it kills what is left of the group).
    fn close_lifeline(&mut self) {
        drop(self.lifeline.take());
    }
}

impl Node {
    fn runtime(&self) -> MutexGuard<'_, Runtime> {
        self.runtime
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn log_file(&self) -> PathBuf {
        self.dir.join("log").join(format!("{}.log", self.name))
    }

    fn console_file(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    fn log_len(&self) -> u64 {
        std::fs::metadata(self.log_file()).map_or(0, |m| m.len())
    }

    /// What the node wrote to its log since byte `offset`.
    fn log_since(&self, offset: u64) -> String {
        let log = std::fs::read(self.log_file()).unwrap_or_default();
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(log.len());
        String::from_utf8_lossy(&log[start..]).into_owned()
    }

    /// The last `count` lines of its log and of its console output, for
    /// error messages.
    fn tail(&self, count: usize) -> String {
        let mut out = String::new();
        for file in [self.log_file(), self.console_file()] {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let _ = writeln!(out, "--- {} (last {count} lines)", file.display());
            for line in &lines[lines.len().saturating_sub(count)..] {
                let _ = writeln!(out, "{line}");
            }
        }
        out
    }
}

impl RabbitCluster {
    /// Starts and clusters three nodes.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(ClusterOptions::default()).await
    }

    /// Starts and clusters `options.nodes` nodes; returns once every node
    /// sees all of them running.
    pub async fn start_with(options: ClusterOptions) -> anyhow::Result<Self> {
        anyhow::ensure!(options.nodes >= 1, "a cluster needs at least one node");
        let sbin = match options.sbin_dir {
            Some(dir) => dir,
            None => find_sbin_dir()?,
        };
        let id = crate::short_id()[..8].to_owned();
        let dir = std::env::temp_dir().join(format!("shop-rabbit-{id}"));
        std::fs::create_dir_all(dir.join("home"))
            .with_context(|| format!("failed to create {}", dir.display()))?;
        let mapper = epmd::PortMapper::start().context("failed to start the cluster's port mapper")?;
        // From here on, dropping `cluster` cleans up whatever was started.
        let mut cluster = Self {
            id,
            dir,
            sbin,
            boot_deadline: options.boot_deadline,
            definitions: options.definitions,
            nodes: Vec::new(),
            mapper,
        };
        cluster.write_shared_files()?;
        for index in 1..=options.nodes {
            let node = cluster.prepare_node(index, options.nodes)?;
            cluster.nodes.push(node);
        }

        let started = Instant::now();
        let all: Vec<usize> = (1..=options.nodes).collect();
        futures::future::try_join_all(all.iter().map(|&i| cluster.boot_fresh(i))).await?;
        tracing::debug!(cluster = %cluster.id, elapsed = ?started.elapsed(), "nodes booted");
        if options.nodes > 1 {
            cluster.join_first_node().await?;
            tracing::debug!(cluster = %cluster.id, elapsed = ?started.elapsed(), "nodes joined node 1");
        }
        cluster.await_membership(&all).await?;
        tracing::debug!(cluster = %cluster.id, elapsed = ?started.elapsed(), "cluster formed");
        Ok(cluster)
    }

    /// How many nodes the cluster has.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether it has no node (never: `start` needs one).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The directory holding every node's files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Node `i`'s Erlang name, `shop-<id>-<i>@localhost`.
    ///
    /// # Panics
    /// If there is no node `i` (they are numbered from 1).
    pub fn node_name(&self, i: usize) -> &str {
        &self.node(i).name
    }

    /// Every node's name, node 1 first.
    pub fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|node| node.name.clone()).collect()
    }

    /// The number of the node named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes
            .iter()
            .position(|node| node.name == name)
            .map(|at| at + 1)
    }

    /// The AMQP URL of node `i` (user guest, vhost `/`).
    ///
    /// # Panics
    /// If there is no node `i`.
    pub fn amqp_url(&self, i: usize) -> String {
        let port = self.node(i).amqp_port.load(Ordering::SeqCst);
        format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
    }

    /// The AMQP URL of node `i` as `user` with `password` (vhost `/`).
    ///
    /// # Panics
    /// If there is no node `i`.
    pub fn amqp_url_as(&self, i: usize, user: &str, password: &str) -> String {
        let port = self.node(i).amqp_port.load(Ordering::SeqCst);
        format!("amqp://{user}:{password}@127.0.0.1:{port}/%2f")
    }

    /// Every node's AMQP URL, node 1 first.
    pub fn amqp_urls(&self) -> Vec<String> {
        (1..=self.len()).map(|i| self.amqp_url(i)).collect()
    }

    /// Stops the `rabbit` application on node `i` (`rabbitmqctl stop_app`):
    /// its clients are disconnected and its queue replicas stop, while its
    /// Erlang VM stays up.
    pub async fn stop_node(&self, i: usize) -> anyhow::Result<()> {
        self.tool("rabbitmqctl", i, &["stop_app"]).await?;
        self.node(i).runtime().app_running = false;
        Ok(())
    }

    /// Starts the `rabbit` application on node `i` again
    /// (`rabbitmqctl start_app`) and waits until the running nodes see it.
    pub async fn start_node(&self, i: usize) -> anyhow::Result<()> {
        self.tool("rabbitmqctl", i, &["start_app"]).await?;
        self.node(i).runtime().app_running = true;
        self.await_membership(&self.reachable()).await
    }

    /// Kills node `i`'s operating-system processes (SIGKILL to its process
    /// group), as a crash or a lost machine would, and waits until they are
    /// gone.
    pub async fn kill_node(&self, i: usize) -> anyhow::Result<()> {
        let node = self.node(i);
        let process = {
            let mut runtime = node.runtime();
            runtime.app_running = false;
            runtime.process.take()
        };
        let Some(mut process) = process else {
            bail!("node {} is not running", node.name);
        };
        kill_group(&mut process).with_context(|| format!("failed to kill node {}", node.name))?;
        self.await_gone(i, &mut process).await
    }

    /// Stops node `i` cleanly (`rabbitmqctl stop`: the broker, then its
    /// VM) and waits until its processes are gone.
    pub async fn shutdown_node(&self, i: usize) -> anyhow::Result<()> {
        self.tool("rabbitmqctl", i, &["stop"]).await?;
        let node = self.node(i);
        let process = {
            let mut runtime = node.runtime();
            runtime.app_running = false;
            runtime.process.take()
        };
        let Some(mut process) = process else {
            return Ok(());
        };
        self.await_gone(i, &mut process).await
    }

    /// Starts node `i`'s operating-system process again after
    /// [`RabbitCluster::kill_node`] or [`RabbitCluster::shutdown_node`]: it
    /// boots from its database, rejoins the cluster by itself, and this
    /// returns once the running nodes see it.
    pub async fn boot_node(&self, i: usize) -> anyhow::Result<()> {
        let node = self.node(i);
        anyhow::ensure!(
            node.runtime().process.is_none(),
            "node {} is still running",
            node.name
        );
        let offset = node.log_len();
        self.spawn(i)?;
        self.await_booted(i, offset).await?;
        self.await_membership(&self.reachable()).await
    }

    /// Cuts node `i` off from the other nodes (a network partition): their
    /// distribution connections are closed and new ones refused, while the
    /// test and the command-line tools still reach every node. Returns once
    /// the other nodes no longer count it as running; with `pause_minority`
    /// a node alone on its side also stops its broker until it is healed.
    pub async fn isolate_node(&self, i: usize) -> anyhow::Result<()> {
        let node = self.node(i);
        self.mapper.isolate(epmd::short_name(&node.name));
        node.runtime().isolated = true;
        self.await_membership(&self.reachable()).await
    }

    /// Ends node `i`'s partition and waits until every running node
    /// (node `i` included, once it has resumed) sees all of them.
    pub async fn heal_node(&self, i: usize) -> anyhow::Result<()> {
        let node = self.node(i);
        self.mapper.heal(epmd::short_name(&node.name));
        node.runtime().isolated = false;
        self.await_membership(&self.reachable()).await
    }

    /// Where every member of quorum queue `queue` (vhost `/`) stands, as
    /// `rabbitmq-queues quorum_status` reports it, asked of the first node
    /// that is running and not isolated.
    pub async fn quorum_status(&self, queue: &str) -> anyhow::Result<Vec<QuorumMember>> {
        let args = ["quorum_status", queue, "--vhost", "/", "--formatter", "json"];
        let mut last_error = None;
        for i in self.reachable() {
            match self.tool("rabbitmq-queues", i, &args).await {
                Ok(output) => {
                    return parse_quorum_status(&output)
                        .with_context(|| format!("unexpected quorum_status output for {queue}: {output}"));
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no node is running to ask about {queue}")))
    }

    /// The nodes holding a replica of quorum queue `queue`: its membership,
    /// whether or not each member is up.
    pub async fn quorum_members(&self, queue: &str) -> anyhow::Result<Vec<String>> {
        Ok(self
            .quorum_status(queue)
            .await?
            .into_iter()
            .map(|member| member.node)
            .collect())
    }

    /// The node whose replica of `queue` leads, if one does now.
    pub async fn quorum_leader(&self, queue: &str) -> anyhow::Result<Option<String>> {
        Ok(leader_of(&self.quorum_status(queue).await?))
    }

    /// Runs `rabbitmqctl -n <node i> <args>` with the cluster's environment
    /// and returns its standard output.
    pub async fn rabbitmqctl(&self, i: usize, args: &[&str]) -> anyhow::Result<String> {
        self.tool("rabbitmqctl", i, args).await
    }

    fn node(&self, i: usize) -> &Node {
        assert!(
            (1..=self.nodes.len()).contains(&i),
            "no node {i}: nodes are numbered 1 to {}",
            self.nodes.len()
        );
        &self.nodes[i - 1]
    }

    /// The nodes that are up, running the broker and not cut off.
    fn reachable(&self) -> Vec<usize> {
        (1..=self.len())
            .filter(|&i| {
                let runtime = self.node(i).runtime();
                runtime.process.is_some() && runtime.app_running && !runtime.isolated
            })
            .collect()
    }

    fn write_shared_files(&self) -> anyhow::Result<()> {
        let cookie = format!("SHOP{}", uuid::Uuid::new_v4().simple()).to_uppercase();
        let cookie_file = self.dir.join("home").join(".erlang.cookie");
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(&cookie_file)
            .and_then(|mut file| file.write_all(cookie.as_bytes()))
            .with_context(|| format!("failed to write {}", cookie_file.display()))?;
        write_file(&self.dir.join("rabbitmq-env.conf"), "")
    }

    /// Creates node `index`'s folder and configuration files and its relay.
    fn prepare_node(&self, index: usize, nodes: usize) -> anyhow::Result<Node> {
        let name = format!("shop-{}-{index}@localhost", self.id);
        let dir = self.dir.join(format!("node-{index}"));
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("failed to create {}", dir.join(sub).display()))?;
        }
        let mut conf = "# A node of a test cluster (shop-testkit).\n\
             # Nodes on the minority side of a partition pause, as production\n\
             # clusters of three or more nodes with quorum queues should.\n\
             cluster_partition_handling = pause_minority\n\
             log.file.level = info\n\
             log.console = false\n"
            .to_owned();
        if let Some(definitions) = &self.definitions {
            let path = dir.join("definitions.json");
            write_file(&path, definitions)?;
            let _ = writeln!(conf, "load_definitions = {}", path.display());
        }
        write_file(&dir.join("rabbitmq.conf"), &conf)?;
        write_file(
            &dir.join("advanced.config"),
            &format!(
                "%% Quorum queues get a replica on every node (3.10 picks the members\n\
                 %% once, at declaration, among the running nodes).\n\
                 [{{rabbit, [{{quorum_cluster_size, {nodes}}}]}}].\n"
            ),
        )?;
        write_file(&dir.join("enabled_plugins"), "[].\n")?;
        self.mapper
            .add_relay(epmd::short_name(&name))
            .with_context(|| format!("failed to start the distribution relay of {name}"))?;
        Ok(Node {
            name,
            dir,
            amqp_port: AtomicU16::new(free_port()?),
            dist_port: AtomicU16::new(free_port()?),
            runtime: Mutex::new(Runtime::default()),
        })
    }

    /// Environment shared by the nodes and the command-line tools.
    fn apply_env(&self, command: &mut std::process::Command) {
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("RABBITMQ_") || key.starts_with("ERL_") {
                command.env_remove(key.as_ref());
            }
        }
        command
            .env("HOME", self.dir.join("home"))
            .env("RABBITMQ_CONF_ENV_FILE", self.dir.join("rabbitmq-env.conf"))
            .env("ERL_EPMD_PORT", self.mapper.port().to_string())
            .env("ERL_AFLAGS", "-start_epmd false")
            .env("RABBITMQ_CTL_DIST_PORT_MIN", "0")
            .env("RABBITMQ_CTL_DIST_PORT_MAX", "0");
    }

    /// Starts node `i`'s process (not waiting for it to boot).
    fn spawn(&self, i: usize) -> anyhow::Result<()> {
        let node = self.node(i);
        let console = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.console_file())
            .with_context(|| format!("failed to open {}", node.console_file().display()))?;
        let mut command = std::process::Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(LIFELINE)
            .arg(self.sbin.join("rabbitmq-server"))
            .current_dir(&node.dir);
        self.apply_env(&mut command);
        command
            .env("RABBITMQ_NODENAME", &node.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env(
                "RABBITMQ_NODE_PORT",
                node.amqp_port.load(Ordering::SeqCst).to_string(),
            )
            .env(
                "RABBITMQ_DIST_PORT",
                node.dist_port.load(Ordering::SeqCst).to_string(),
            )
            .env("RABBITMQ_MNESIA_BASE", node.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", node.dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", node.dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", node.dir.join("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", node.dir.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", node.dir.join("rabbitmq.pid"))
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .env("ERL_CRASH_DUMP", node.dir.join("erl_crash.dump"))
            .stdin(Stdio::piped())
            .stdout(console.try_clone().context("failed to share the console file")?)
            .stderr(console)
            .process_group(0);
        let mut child = command
            .spawn()
            .with_context(|| format!("failed to start {} for {}", self.sbin.display(), node.name))?;
        let lifeline = child.stdin.take();
        let mut runtime = node.runtime();
        runtime.process = Some(NodeProcess { child, lifeline });
        runtime.app_running = true;
        Ok(())
    }

    /// Boots node `i` from an empty database, with new ports when the ones
    /// it had turn out to be taken.
    async fn boot_fresh(&self, i: usize) -> anyhow::Result<()> {
        let node = self.node(i);
        for attempt in 1..=BOOT_ATTEMPTS {
            self.spawn(i)?;
            let Err(error) = self.await_booted(i, 0).await else {
                return Ok(());
            };
            let output = format!(
                "{}{}",
                node.log_since(0),
                std::fs::read_to_string(node.console_file()).unwrap_or_default()
            );
            let lost_a_port = output.contains("eaddrinuse") || output.contains("dist_port_already_used");
            if !lost_a_port || attempt == BOOT_ATTEMPTS {
                return Err(error);
            }
            tracing::debug!(node = %node.name, attempt, "a port was taken, booting again on new ports");
            let process = node.runtime().process.take();
            if let Some(mut process) = process {
                let _ = kill_group(&mut process);
                self.await_gone(i, &mut process).await?;
            }
            for sub in ["mnesia", "log"] {
                let path = node.dir.join(sub);
                std::fs::remove_dir_all(&path)
                    .and_then(|()| std::fs::create_dir_all(&path))
                    .with_context(|| format!("failed to empty {}", path.display()))?;
            }
            let _ = std::fs::remove_file(node.console_file());
            for port in [&node.amqp_port, &node.dist_port] {
                let old = port.swap(free_port()?, Ordering::SeqCst);
                taken_ports().remove(&old);
            }
        }
        bail!("node {} did not boot", node.name)
    }

    /// Waits until node `i` has logged that it started (after byte
    /// `offset` of its log) and accepts AMQP connections.
    async fn await_booted(&self, i: usize, offset: u64) -> anyhow::Result<()> {
        let node = self.node(i);
        let until = Instant::now() + self.boot_deadline;
        loop {
            let exited = {
                let mut runtime = node.runtime();
                match runtime.process.as_mut() {
                    Some(process) => process.child.try_wait().ok().flatten(),
                    None => bail!("node {} is not running", node.name),
                }
            };
            if let Some(status) = exited {
                node.runtime().process = None;
                bail!(
                    "node {} exited while booting ({status}):\n{}",
                    node.name,
                    node.tail(30)
                );
            }
            if node.log_since(offset).contains("Server startup complete") {
                let port = node.amqp_port.load(Ordering::SeqCst);
                if tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
                    .await
                    .is_ok()
                {
                    return Ok(());
                }
            }
            if Instant::now() >= until {
                bail!(
                    "node {} did not boot within {:?}:\n{}",
                    node.name,
                    self.boot_deadline,
                    node.tail(30)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Nodes 2… join node 1: all stop their broker, join one after the
    /// other (each join changes the cluster's schema), then start again
    /// together.
    async fn join_first_node(&self) -> anyhow::Result<()> {
        let first = self.node(1).name.clone();
        let others: Vec<usize> = (2..=self.len()).collect();
        futures::future::try_join_all(others.iter().map(|&i| self.tool("rabbitmqctl", i, &["stop_app"])))
            .await?;
        for &i in &others {
            self.tool("rabbitmqctl", i, &["join_cluster", &first]).await?;
        }
        futures::future::try_join_all(
            others
                .iter()
                .map(|&i| self.tool("rabbitmqctl", i, &["start_app"])),
        )
        .await?;
        Ok(())
    }

    /// Waits until each of `nodes` lists exactly `nodes` as its running
    /// cluster members (`rabbitmqctl cluster_status`).
    async fn await_membership(&self, nodes: &[usize]) -> anyhow::Result<()> {
        let expected: BTreeSet<String> = nodes.iter().map(|&i| self.node(i).name.clone()).collect();
        let until = Instant::now() + MEMBERSHIP_DEADLINE;
        futures::future::try_join_all(
            nodes
                .iter()
                .map(|&i| self.await_running_nodes(i, &expected, until)),
        )
        .await?;
        Ok(())
    }

    async fn await_running_nodes(
        &self,
        i: usize,
        expected: &BTreeSet<String>,
        until: Instant,
    ) -> anyhow::Result<()> {
        loop {
            let seen = self
                .tool("rabbitmqctl", i, &["cluster_status", "--formatter", "json"])
                .await
                .and_then(|output| parse_running_nodes(&output));
            let last = match seen {
                Ok(running) if running == *expected => return Ok(()),
                Ok(running) => format!("it lists {running:?} as running"),
                Err(error) => format!("{error:#}"),
            };
            if Instant::now() >= until {
                bail!(
                    "node {} did not see {expected:?} running within {MEMBERSHIP_DEADLINE:?}; last: {last}",
                    self.node(i).name
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until the process of node `i` has exited, nothing is left in
    /// its process group, and its name is free in the port mapper again (so
    /// booting it next cannot find its old self still registered).
    async fn await_gone(&self, i: usize, process: &mut NodeProcess) -> anyhow::Result<()> {
        let node = self.node(i);
        let until = Instant::now() + EXIT_DEADLINE;
        loop {
            let exited = process
                .child
                .try_wait()
                .map(|status| status.is_some())
                .unwrap_or(true);
            if exited {
                // The lifeline's watcher is still in the group: close its
                // pipe (and kill it) so it goes too.
                process.close_lifeline();
                let _ = kill_group(process);
                if !group_alive(process.child.id())
                    && !self.mapper.is_registered(epmd::short_name(&node.name))
                {
                    return Ok(());
                }
            }
            if Instant::now() >= until {
                bail!(
                    "node {}'s processes were still there after {EXIT_DEADLINE:?}:\n{}",
                    node.name,
                    node.tail(10)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Runs `<tool> -n <node i> <args>` and returns its standard output;
    /// fails with everything it printed if it fails or outlives
    /// [`TOOL_DEADLINE`].
    async fn tool(&self, tool: &str, i: usize, args: &[&str]) -> anyhow::Result<String> {
        let node = self.node(i);
        let mut command = std::process::Command::new(self.sbin.join(tool));
        command
            .arg("-q")
            .arg("-n")
            .arg(&node.name)
            .args(args)
            .current_dir(&self.dir);
        self.apply_env(&mut command);
        let mut command = tokio::process::Command::from(command);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let shown = format!("{tool} -n {} {}", node.name, args.join(" "));
        let output = tokio::time::timeout(TOOL_DEADLINE, command.output())
            .await
            .map_err(|_| anyhow::anyhow!("`{shown}` did not finish within {TOOL_DEADLINE:?}"))?
            .with_context(|| format!("failed to run `{shown}`"))?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            bail!(
                "`{shown}` failed ({}): {}{}",
                output.status,
                stdout.trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(stdout)
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for node in &self.nodes {
                eprintln!("node {}:\n{}", node.name, node.tail(40));
            }
        }
        for node in &self.nodes {
            let process = node.runtime().process.take();
            let Some(mut process) = process else { continue };
            let _ = kill_group(&mut process);
            let _ = process.child.wait();
            let until = Instant::now() + EXIT_DEADLINE;
            while group_alive(process.child.id()) && Instant::now() < until {
                std::thread::sleep(POLL);
            }
        }
        let mut taken = taken_ports();
        for node in &self.nodes {
            taken.remove(&node.amqp_port.load(Ordering::SeqCst));
            taken.remove(&node.dist_port.load(Ordering::SeqCst));
        }
        drop(taken);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One member of a quorum queue as `quorum_status` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuorumMember {
    /// The node holding this replica.
    pub node: String,
    /// `leader`, `follower`, `candidate`…, or why the replica could not be
    /// asked (`noproc` when its node's broker is stopped, `nodedown`…).
    pub raft_state: String,
    /// The last entry of its log, when it answered.
    pub log_index: Option<u64>,
    /// The last entry it knows committed, when it answered.
    pub commit_index: Option<u64>,
    /// Its Raft term, when it answered.
    pub term: Option<u64>,
}

impl QuorumMember {
    /// Whether the replica is up and part of the queue's Raft cluster.
    pub fn is_online(&self) -> bool {
        matches!(self.raft_state.as_str(), "leader" | "follower")
    }
}

/// Parses `rabbitmq-queues quorum_status --formatter json`: an array of
/// objects with "Node Name", "Raft State", "Log Index", "Commit Index" and
/// "Term" (empty strings when the member did not answer).
fn parse_quorum_status(output: &str) -> anyhow::Result<Vec<QuorumMember>> {
    let value = json_in(output)?;
    let rows = value
        .as_array()
        .context("quorum_status did not print a JSON array")?;
    rows.iter()
        .map(|row| {
            let text = |key: &str| {
                row.get(key)
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_owned)
            };
            let number = |key: &str| row.get(key).and_then(serde_json::Value::as_u64);
            Ok(QuorumMember {
                node: text("Node Name").context("a member without \"Node Name\"")?,
                raft_state: text("Raft State").unwrap_or_default(),
                log_index: number("Log Index"),
                commit_index: number("Commit Index"),
                term: number("Term"),
            })
        })
        .collect()
}

/// The leader among `members`: the one that says it leads, in the highest
/// term if a cut-off former leader still believes it does.
fn leader_of(members: &[QuorumMember]) -> Option<String> {
    members
        .iter()
        .filter(|member| member.raft_state == "leader")
        .max_by_key(|member| member.term)
        .map(|member| member.node.clone())
}

/// The `running_nodes` of `rabbitmqctl cluster_status --formatter json`.
fn parse_running_nodes(output: &str) -> anyhow::Result<BTreeSet<String>> {
    let value = json_in(output)?;
    let running = value
        .get("running_nodes")
        .and_then(serde_json::Value::as_array)
        .context("cluster_status printed no running_nodes")?;
    Ok(running
        .iter()
        .filter_map(serde_json::Value::as_str)
        .map(str::to_owned)
        .collect())
}

/// The JSON document in a tool's output (anything printed before it, such as
/// a banner, is skipped).
fn json_in(output: &str) -> anyhow::Result<serde_json::Value> {
    let start = output
        .find(['[', '{'])
        .with_context(|| format!("no JSON in {output:?}"))?;
    serde_json::from_str(output[start..].trim()).with_context(|| format!("invalid JSON in {output:?}"))
}

fn write_file(path: &Path, contents: &str) -> anyhow::Result<()> {
    std::fs::write(path, contents).with_context(|| format!("failed to write {}", path.display()))
}

/// The folder of the broker's own scripts, from `rabbitmq-server` on the
/// `PATH`: distribution packages put a wrapper there (Debian's switches to
/// the `rabbitmq` user), whose folder holds the real script.
/// The shipped broker definitions (`shared/messaging/broker/definitions.json`:
/// users, permissions, topic permissions, the event exchanges), with each
/// user of `passwords` given its password; a user left out cannot log in.
pub fn shipped_definitions(passwords: &[(&str, &str)]) -> anyhow::Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../messaging/broker/definitions.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("failed to read {}", path.display()))?;
    let mut definitions: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let users = definitions["users"]
        .as_array_mut()
        .context("the definitions have no users")?;
    for user in users {
        let name = user["name"].as_str().unwrap_or_default().to_owned();
        if let Some((_, password)) = passwords.iter().find(|(user, _)| *user == name)
            && let Some(fields) = user.as_object_mut()
        {
            // A plain password is hashed by the broker as it imports it.
            fields.remove("password_hash");
            fields.insert("password".to_owned(), serde_json::Value::from(*password));
        }
    }
    Ok(definitions.to_string())
}

fn find_sbin_dir() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .map(|dir| dir.join("rabbitmq-server"))
        .find(|candidate| candidate.is_file())
        .context("rabbitmq-server is not on the PATH; is RabbitMQ installed?")?;
    let mut script =
        std::fs::canonicalize(&found).with_context(|| format!("failed to resolve {}", found.display()))?;
    if script.file_name().is_some_and(|name| name != "rabbitmq-server") {
        let sibling = script.with_file_name("rabbitmq-server");
        script = std::fs::canonicalize(&sibling).with_context(|| {
            format!(
                "{} is a wrapper with no rabbitmq-server beside it",
                found.display()
            )
        })?;
    }
    let dir = script
        .parent()
        .context("rabbitmq-server has no folder")?
        .to_path_buf();
    anyhow::ensure!(
        dir.join("rabbitmqctl").is_file() && dir.join("rabbitmq-queues").is_file(),
        "{} lacks rabbitmqctl or rabbitmq-queues",
        dir.display()
    );
    Ok(dir)
}

fn taken_ports() -> MutexGuard<'static, BTreeSet<u16>> {
    static TAKEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    TAKEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A port free now, below the kernel's ephemeral range and not handed out
/// before by this process.
fn free_port() -> anyhow::Result<u16> {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let range = 10_000..ephemeral_start.max(10_100);
    let mut taken = taken_ports();
    for _ in 0..1000 {
        let port = rand::random_range(range.clone());
        if taken.contains(&port) || TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_err() {
            continue;
        }
        taken.insert(port);
        return Ok(port);
    }
    bail!("found no free port in {range:?}")
}

/// Sends SIGKILL to the node's whole process group (its shell, VM and the
/// VM's helpers).
fn kill_group(process: &mut NodeProcess) -> anyhow::Result<()> {
    let group = format!("-{}", process.child.id());
    let status = std::process::Command::new("kill")
        .args(["-s", "KILL", "--", &group])
        .stderr(Stdio::null())
        .status()
        .context("failed to run kill")?;
    // Failing means nothing was left in the group.
    let _ = status;
    let _ = process.child.try_wait();
    Ok(())
}

/// Whether any live (not zombie) process is left in process group `group`,
/// from `/proc`.
fn group_alive(group: u32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.filter_map(Result::ok).any(|entry| {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            return false;
        };
        // `pid (comm) state ppid pgrp …`; comm may hold spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return false;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let pgrp = fields.nth(1).and_then(|field| field.parse::<u32>().ok());
        pgrp == Some(group) && state != Some("Z")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorum_status_output_gives_members_and_leader() {
        let output = r#"[
{"Node Name":"a@localhost","Raft State":"follower","Log Index":7,"Commit Index":7,"Snapshot Index":"undefined","Term":2,"Machine Version":2}
,{"Node Name":"b@localhost","Raft State":"leader","Log Index":7,"Commit Index":7,"Snapshot Index":"undefined","Term":2,"Machine Version":2}
,{"Node Name":"c@localhost","Raft State":"noproc","Log Index":"","Commit Index":"","Snapshot Index":"","Term":"","Machine Version":""}
]"#;
        let members = parse_quorum_status(output).unwrap();
        assert_eq!(
            members.iter().map(|m| m.node.as_str()).collect::<Vec<_>>(),
            ["a@localhost", "b@localhost", "c@localhost"]
        );
        assert_eq!(leader_of(&members).as_deref(), Some("b@localhost"));
        assert_eq!(members[2].commit_index, None);
        assert!(!members[2].is_online());
        assert!(members[0].is_online());
    }

    #[test]
    fn a_cut_off_former_leader_loses_to_the_leader_of_a_later_term() {
        let member = |node: &str, term| QuorumMember {
            node: node.to_owned(),
            raft_state: "leader".to_owned(),
            log_index: None,
            commit_index: None,
            term: Some(term),
        };
        assert_eq!(
            leader_of(&[member("old", 1), member("new", 2)]).as_deref(),
            Some("new")
        );
        assert_eq!(leader_of(&[]), None);
    }

    #[test]
    fn cluster_status_output_gives_the_running_nodes() {
        let output = r#"{"alarms":[],"disk_nodes":["a@localhost","b@localhost"],"running_nodes":["b@localhost","a@localhost"]}"#;
        assert_eq!(
            parse_running_nodes(output).unwrap(),
            BTreeSet::from(["a@localhost".to_owned(), "b@localhost".to_owned()])
        );
        assert!(parse_running_nodes("Error: unable to perform an operation").is_err());
    }

    #[test]
    fn free_ports_are_never_handed_out_twice() {
        let ports: BTreeSet<u16> = (0..50).map(|_| free_port().unwrap()).collect();
        assert_eq!(ports.len(), 50);
        let mut taken = taken_ports();
        for port in ports {
            taken.remove(&port);
        }
    }
}
