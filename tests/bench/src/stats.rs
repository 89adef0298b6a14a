//! Throughput and latency percentiles.

use std::time::Duration;

/// What a load produced.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sample {
    /// Latency of each operation.
    pub(crate) latencies: Vec<Duration>,
    /// Wall time of the whole load.
    pub(crate) elapsed: Duration,
    /// Operations that failed.
    pub(crate) errors: usize,
}

impl Sample {
    pub(crate) fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `q` quantile (0.0 to 1.0) in milliseconds.
    pub(crate) fn quantile_ms(&self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
        sorted[index.min(sorted.len() - 1)].as_secs_f64() * 1000.0
    }

    pub(crate) fn merge(samples: Vec<Sample>, elapsed: Duration) -> Sample {
        let mut merged = Sample {
            elapsed,
            ..Sample::default()
        };
        for sample in samples {
            merged.latencies.extend(sample.latencies);
            merged.errors += sample.errors;
        }
        merged
    }

    /// `rate/s (p50 / p99 / p99.9 ms)`.
    pub(crate) fn describe(&self) -> String {
        format!(
            "{:.0}/s (p50 {:.2} / p99 {:.2} / p99.9 {:.2} ms)",
            self.rate(),
            self.quantile_ms(0.5),
            self.quantile_ms(0.99),
            self.quantile_ms(0.999)
        )
    }
}

/// The median of `(measured, raw)` rounds by their ratio.
pub(crate) fn median_by_ratio<T: Clone>(rounds: &[T], ratio: impl Fn(&T) -> f64) -> Option<T> {
    let mut sorted = rounds.to_vec();
    sorted.sort_by(|a, b| ratio(a).total_cmp(&ratio(b)));
    sorted.get(sorted.len() / 2).cloned()
}
