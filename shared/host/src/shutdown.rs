//! Stopping on SIGINT/SIGTERM: a [`CancellationToken`] every long-running
//! part watches, and a [`TaskGroup`] that waits for the parts to finish their
//! current work, bounded by a grace period.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinSet;
pub use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGINT or SIGTERM.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        signal().await;
        tracing::info!("shutdown signal received");
        token.cancel();
    });
}

/// Resolves on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
pub async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// The long-running parts of a service (server, relay, consumers), run until
/// shutdown.
#[derive(Debug)]
pub struct TaskGroup {
    tasks: JoinSet<(&'static str, anyhow::Result<()>)>,
    shutdown: CancellationToken,
}

impl TaskGroup {
    /// An empty group stopped by `shutdown`.
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            tasks: JoinSet::new(),
            shutdown,
        }
    }

    /// Runs `task` in the group. A task is expected to run until the
    /// shutdown token is cancelled and then return promptly.
    pub fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.tasks.spawn(async move { (name, task.await) });
    }

    /// Waits until shutdown is requested or a task ends on its own (which
    /// triggers shutdown of the others), then gives the remaining tasks
    /// `grace` to finish before aborting them. Returns the first failure.
    pub async fn run(mut self, grace: Duration) -> anyhow::Result<()> {
        let mut outcome = Ok(());
        tokio::select! {
            () = self.shutdown.cancelled() => {}
            Some(joined) = self.tasks.join_next() => {
                // The signal may have stopped it just before this select saw
                // the cancellation.
                outcome = Self::outcome(joined, !self.shutdown.is_cancelled());
                self.shutdown.cancel();
            }
        }
        let drain = async {
            while let Some(joined) = self.tasks.join_next().await {
                let result = Self::outcome(joined, false);
                if outcome.is_ok() {
                    outcome = result;
                }
            }
        };
        if tokio::time::timeout(grace, drain).await.is_err() {
            tracing::warn!(
                grace_ms = grace.as_millis() as u64,
                "grace period over, aborting remaining tasks"
            );
            self.tasks.abort_all();
        }
        outcome
    }

    fn outcome(
        joined: Result<(&'static str, anyhow::Result<()>), tokio::task::JoinError>,
        early: bool,
    ) -> anyhow::Result<()> {
        match joined {
            Ok((name, Ok(()))) => {
                if early {
                    tracing::warn!(task = name, "task ended before shutdown was requested");
                } else {
                    tracing::debug!(task = name, "task stopped");
                }
                Ok(())
            }
            Ok((name, Err(error))) => {
                tracing::error!(task = name, error = format!("{error:#}"), "task failed");
                Err(error.context(format!("{name} failed")))
            }
            Err(error) => Err(anyhow::anyhow!("a task panicked or was aborted: {error}")),
        }
    }
}
