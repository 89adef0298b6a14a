//! A TCP proxy owned by a test, standing between a service and PostgreSQL or
//! RabbitMQ, so the test can cut live connections or refuse new ones.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

#[derive(Debug, Default)]
struct State {
    live: Mutex<Vec<AbortHandle>>,
    refusing: AtomicBool,
    accepted: AtomicUsize,
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
            connection.abort();
        }
    }

    /// While `on`, new connections are closed at once (the target "refuses").
    pub fn refuse(&self, on: bool) {
        self.state.refusing.store(on, Ordering::SeqCst);
    }

    /// Connections accepted and forwarded so far.
    pub fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
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
            drop(client);
            continue;
        }
        state.accepted.fetch_add(1, Ordering::SeqCst);
        let handle = tokio::spawn(async move {
            let Ok(mut upstream) = TcpStream::connect(target).await else {
                return;
            };
            let mut client = client;
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        });
        let mut live = state
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        live.retain(|handle| !handle.is_finished());
        live.push(handle.abort_handle());
    }
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
