//! A service binary run as a child process, the way an operator runs it:
//! configured by environment variables, logging JSON lines, stopped with
//! SIGTERM (or killed with SIGKILL).

use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

/// A running service binary and everything it has logged.
#[derive(Debug)]
pub struct ServiceProcess {
    child: Child,
    /// Where its gRPC server listens.
    pub addr: SocketAddr,
    /// Where its admin HTTP port (metrics, health) listens.
    pub admin_addr: Option<SocketAddr>,
    lines: Arc<Mutex<Vec<String>>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
    /// The event signing key's files it was given, removed with it.
    _keys: Option<crate::keys::KeyFiles>,
}

impl ServiceProcess {
    /// Starts `binary` with `envs` (plus `GRPC_ADDR` and `ADMIN_ADDR` on free
    /// ports unless given, `LOG_FORMAT=json`, and, unless
    /// `EVENT_SIGNING_KEY_FILE` is given, files of the tests' event signing
    /// key: `EVENT_SIGNING_KEY_FILE`, `EVENT_SIGNING_KEY_ID` and
    /// `USER_EVENTS_KEYS_FILE`), and waits (up to 60 s) for the log line that
    /// says it started, which carries its addresses.
    pub async fn start(binary: &str, envs: &[(&str, String)]) -> anyhow::Result<Self> {
        Self::start_with_args(binary, &[], envs).await
    }

    /// Like [`ServiceProcess::start`], with command-line arguments.
    pub async fn start_with_args(
        binary: &str,
        args: &[&str],
        envs: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        let mut command = Command::new(binary);
        command
            .args(args)
            .env("GRPC_ADDR", "127.0.0.1:0")
            .env("ADMIN_ADDR", "127.0.0.1:0")
            .env("LOG_FORMAT", "json")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let keys = if envs.iter().any(|(key, _)| *key == "EVENT_SIGNING_KEY_FILE") {
            None
        } else {
            let keys = crate::keys::KeyFiles::write()?;
            command.envs(keys.envs());
            Some(keys)
        };
        for (key, value) in envs {
            command.env(key, value);
        }
        let mut child = command.spawn()?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut readers = Vec::new();
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let lines = lines.clone();
            let started_tx = started_tx.clone();
            readers.push(tokio::spawn(async move {
                let mut reader = BufReader::new(stream).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    if let Some(addr) = started_addr(&line) {
                        let _ = started_tx.send(addr);
                    }
                    lines
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(line);
                }
            }));
        }
        let (addr, admin_addr) = match tokio::time::timeout(Duration::from_secs(60), started_rx.recv()).await
        {
            Ok(Some(addrs)) => addrs,
            _ => {
                let _ = child.kill().await;
                let lines = lines
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .join("\n");
                anyhow::bail!("{binary} did not start:\n{lines}");
            }
        };
        Ok(Self {
            child,
            addr,
            admin_addr,
            lines,
            readers,
            _keys: keys,
        })
    }

    /// Every line it has written to stdout and stderr so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Its resident memory (`VmRSS`) in bytes, from `/proc` (Linux).
    pub fn resident_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// Its operating-system process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends SIGTERM and waits (up to 30 s) for it to exit and for its last
    /// lines to be read.
    pub async fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        self.signal("TERM").await?;
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await??;
        for reader in self.readers.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
        }
        Ok(status)
    }

    /// Sends SIGKILL and reaps it: no shutdown, no flush, as a crash.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    async fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| anyhow::anyhow!("process already exited"))?;
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .await?;
        anyhow::ensure!(status.success(), "kill -{signal} {pid} failed");
        Ok(())
    }
}

/// The addresses in a JSON log line `… service started` (`"addr":"…"`, and
/// `"admin":"…"` when it has one).
fn started_addr(line: &str) -> Option<(SocketAddr, Option<SocketAddr>)> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let message = value.get("message")?.as_str()?;
    if !message.ends_with("service started") {
        return None;
    }
    let addr = value.get("addr")?.as_str()?.parse().ok()?;
    let admin = value
        .get("admin")
        .and_then(|a| a.as_str())
        .and_then(|a| a.parse().ok());
    Some((addr, admin))
}

/// The status and text of `GET <path>` on `addr` (the admin port), within
/// ten seconds.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use http_body_util::BodyExt as _;

    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let uri: http::Uri = format!("http://{addr}{path}").parse()?;
    let response = tokio::time::timeout(Duration::from_secs(10), async {
        let response = client.get(uri).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
    })
    .await??;
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::started_addr;

    #[test]
    fn the_started_line_gives_the_address() {
        let line = r#"{"timestamp":"x","level":"INFO","message":"user service started","addr":"127.0.0.1:4321","admin":"127.0.0.1:9101","target":"user_service::app"}"#;
        assert_eq!(
            started_addr(line),
            Some((
                "127.0.0.1:4321".parse().unwrap(),
                Some("127.0.0.1:9101".parse().unwrap())
            ))
        );
        assert_eq!(started_addr(r#"{"message":"other"}"#), None);
        assert_eq!(started_addr("not json"), None);
    }
}
