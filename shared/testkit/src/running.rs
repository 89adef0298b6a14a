//! A service (or any long-running part) running in the test process until
//! the test ends.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A task started with its own shutdown token; dropping it requests shutdown
/// and waits (up to 10 s) for the task, so nothing it does outlives the
/// test's database and broker names.
#[derive(Debug)]
pub struct Running {
    shutdown: CancellationToken,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    /// Spawns `run(token)`.
    pub fn spawn<F, Fut>(run: F) -> Self
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let shutdown = CancellationToken::new();
        let handle = Some(tokio::spawn(run(shutdown.clone())));
        Self { shutdown, handle }
    }

    /// The token the task watches.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Requests shutdown and returns what the task returned (an error if it
    /// took more than 10 s).
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let handle = self
            .handle
            .take()
            .ok_or_else(|| anyhow::anyhow!("already stopped"))?;
        tokio::time::timeout(Duration::from_secs(10), handle).await??
    }

    /// Whether the task has ended.
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let Some(handle) = self.handle.take() else { return };
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(10), handle).await;
            });
        });
    }
}
