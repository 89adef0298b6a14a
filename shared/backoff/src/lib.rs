//! The one backoff of the workspace: how long to wait before trying again.
//!
//! A [`Backoff`] is a policy (first wait, longest wait), cheap to copy into
//! settings; [`Backoff::start`] gives the [`Delays`] of one run of failures.
//! Each step doubles up to the cap, and each delay is the step jittered to
//! 50–100 %, so replicas that lost the same dependency at the same moment do
//! not come back in lockstep. Connections (the relay, the consumer, the
//! `LISTEN` session), the client SDK's retries and the consumer's hold while
//! the database is away all use it.
#![forbid(unsafe_code)]

use std::time::Duration;

/// Capped exponential backoff with jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first step.
    pub initial: Duration,
    /// The longest step.
    pub max: Duration,
}

impl Backoff {
    /// Steps from `initial`, doubling up to `max`.
    pub const fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max }
    }

    /// The delays of a new run of failures.
    pub fn start(&self) -> Delays {
        Delays {
            policy: *self,
            step: self.initial.min(self.max),
            failures: 0,
        }
    }
}

impl Default for Backoff {
    /// 100 ms, doubling up to 10 s: for reconnecting to a dependency.
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(10))
    }
}

/// The delays of one run of failures; see [`Backoff`].
#[derive(Debug, Clone)]
pub struct Delays {
    policy: Backoff,
    step: Duration,
    failures: u32,
}

impl Delays {
    /// The wait before the next attempt (the current step, jittered to
    /// 50–100 %); the step then doubles, up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = step.saturating_mul(2).min(self.policy.max);
        self.failures = self.failures.saturating_add(1);
        step.mul_f64(rand::random_range(0.5..=1.0))
    }

    /// Back to the first step, after a success.
    pub fn reset(&mut self) {
        *self = self.policy.start();
    }

    /// How many delays were handed out since the last reset: the failures
    /// in a row.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Whether a failure is worth a log line: the first, then every power of
    /// two, so a dependency away for an hour does not flood the log.
    pub fn worth_logging(&self) -> bool {
        self.failures <= 1 || self.failures.is_power_of_two()
    }
}

impl Iterator for Delays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(self.next_delay())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn delays_grow_within_their_step_up_to_the_cap_and_reset(
            initial_ms in 1u64..5_000,
            max_ms in 1u64..120_000,
            count in 1usize..40,
        ) {
            let policy = Backoff::new(Duration::from_millis(initial_ms), Duration::from_millis(max_ms));
            let mut delays = policy.start();
            let mut step = policy.initial.min(policy.max);
            for _ in 0..count {
                let delay = delays.next_delay();
                prop_assert!(delay <= step, "{delay:?} above its step {step:?}");
                prop_assert!(delay >= step / 2 - Duration::from_nanos(1), "{delay:?} below half of {step:?}");
                prop_assert!(delay <= policy.max);
                step = (step * 2).min(policy.max);
            }
            prop_assert_eq!(delays.failures() as usize, count);
            delays.reset();
            prop_assert_eq!(delays.failures(), 0);
            prop_assert!(delays.next_delay() <= policy.initial);
        }
    }

    #[test]
    fn a_long_outage_is_logged_sparsely() {
        let mut delays = Backoff::default().start();
        let mut logged = Vec::new();
        for n in 1..=20 {
            delays.next_delay();
            if delays.worth_logging() {
                logged.push(n);
            }
        }
        assert_eq!(logged, [1, 2, 4, 8, 16]);
    }
}
