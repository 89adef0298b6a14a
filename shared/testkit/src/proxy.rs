//! A TCP proxy owned by a test, standing between a service and PostgreSQL or
//! RabbitMQ, so the test can cut live connections, refuse new ones, or
//! freeze the live ones: hold them open and forward nothing, as a NAT or a
//! firewall that forgot the flow, a paused VM or a pulled cable between two
//! switches would, while new connections pass. It can also delay what it
//! forwards ([`TcpProxy::delay`]), as a slow link would.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Default)]
struct State {
    live: Mutex<Vec<Live>>,
    refusing: AtomicBool,
    accepted: AtomicUsize,
    refused: AtomicUsize,
    /// Latency added each way, in microseconds (0: none).
    delay_micros: AtomicU64,
}

/// One forwarded connection.
#[derive(Debug)]
struct Live {
    task: AbortHandle,
    freeze: CancellationToken,
}

/// Forwards every connection to its target until told otherwise.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    state: Arc<State>,
    acceptor: AbortHandle,
}

impl TcpProxy {
    /// A proxy on a free local port forwarding to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let acceptor = tokio::spawn(accept(listener, target, state.clone())).abort_handle();
        Ok(Self {
            addr,
            state,
            acceptor,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `url` (`scheme://user:pass@host:port/rest`) with its host and port
    /// replaced by the proxy's.
    pub fn url_for(&self, url: &str) -> String {
        let Ok(mut parsed) = url::Url::parse(url) else {
            return url.to_owned();
        };
        let moved = parsed.set_host(Some(&self.addr.ip().to_string())).is_ok()
            && parsed.set_port(Some(self.addr.port())).is_ok();
        if moved { parsed.to_string() } else { url.to_owned() }
    }

    /// Drops every live connection, as a network failure or a broker restart
    /// would. New connections are still accepted.
    pub fn cut(&self) {
        let live = std::mem::take(
            &mut *self
                .state
                .live
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for connection in live {
            connection.task.abort();
        }
    }

    /// Freezes every live connection: from now on nothing is forwarded in
    /// either direction and nothing is closed, so both ends see silence, not
    /// an error (their kernels still acknowledge what they send, as a NAT
    /// that forgot the flow would not). New connections are forwarded as
    /// usual. Returns how many were frozen.
    pub fn freeze(&self) -> usize {
        let live = self
            .state
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut frozen = 0;
        for connection in live.iter().filter(|c| !c.task.is_finished()) {
            connection.freeze.cancel();
            frozen += 1;
        }
        frozen
    }

    /// Connections forwarded right now (not finished, not frozen).
    pub fn live(&self) -> usize {
        self.state
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|c| !c.task.is_finished() && !c.freeze.is_cancelled())
            .count()
    }

    /// While `on`, new connections are closed at once (the target "refuses").
    pub fn refuse(&self, on: bool) {
        self.state.refusing.store(on, Ordering::SeqCst);
    }

    /// Delays everything forwarded on connections accepted from now on by
    /// `latency` in each direction (a round trip costs twice that), in
    /// order and without limiting throughput: a slow link, not a narrow
    /// one. `Duration::ZERO` turns it off for new connections.
    pub fn delay(&self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.state.delay_micros.store(micros, Ordering::SeqCst);
    }

    /// Connections accepted and forwarded so far.
    pub fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// Connections refused so far (see [`Self::refuse`]): how often a
    /// client tried while the target was away, a count a test can wait on
    /// instead of sleeping.
    pub fn refused(&self) -> usize {
        self.state.refused.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.cut();
    }
}

async fn accept(listener: TcpListener, target: SocketAddr, state: Arc<State>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        if state.refusing.load(Ordering::SeqCst) {
            state.refused.fetch_add(1, Ordering::SeqCst);
            drop(client);
            continue;
        }
        state.accepted.fetch_add(1, Ordering::SeqCst);
        let freeze = CancellationToken::new();
        let frozen = freeze.clone();
        let delay = Duration::from_micros(state.delay_micros.load(Ordering::SeqCst));
        let handle = tokio::spawn(async move {
            let Ok(mut upstream) = TcpStream::connect(target).await else {
                return;
            };
            let mut client = client;
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let forward = async {
                if delay.is_zero() {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                } else {
                    let (client_in, client_out) = client.split();
                    let (upstream_in, upstream_out) = upstream.split();
                    tokio::join!(
                        forward_late(client_in, upstream_out, delay),
                        forward_late(upstream_in, client_out, delay)
                    );
                }
            };
            tokio::select! {
                () = forward => {}
                () = frozen.cancelled() => {
                    // Hold both sockets open, read nothing, write nothing,
                    // until the test cuts the connection or ends.
                    std::future::pending::<()>().await;
                }
            }
        });
        let mut live = state
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        live.retain(|c| !c.task.is_finished());
        live.push(Live {
            task: handle.abort_handle(),
            freeze,
        });
    }
}

/// Copies `from` to `to`, each chunk written `delay` after it was read.
async fn forward_late(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    delay: Duration,
) {
    let (chunks, mut due) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let read = async move {
        let mut buffer = vec![0_u8; 64 * 1024];
        loop {
            match from.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let chunk = buffer.get(..n).unwrap_or_default().to_vec();
                    if chunks.send((tokio::time::Instant::now() + delay, chunk)).is_err() {
                        break;
                    }
                }
            }
        }
    };
    let write = async move {
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn url_for_points_a_url_at_the_proxy() {
        let proxy = TcpProxy::start("127.0.0.1:9".parse().unwrap()).await.unwrap();
        let port = proxy.addr().port();
        assert_eq!(
            proxy.url_for("amqp://guest:guest@localhost:5672/%2f"),
            format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
        );
        assert_eq!(
            proxy.url_for("postgres://localhost/db"),
            format!("postgres://127.0.0.1:{port}/db")
        );
    }
}
