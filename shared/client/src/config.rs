//! How a client connects and retries.

use std::time::Duration;

pub use shop_backoff::Backoff;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::Error;

/// Where a service is and how to call it.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `http://host:port`, or `https://host:port` with [`ClientConfig::tls`].
    pub endpoint: String,
    /// TLS settings; `None` for plaintext.
    pub tls: Option<TlsConfig>,
    /// Deadline of each call (each attempt, when retried).
    pub timeout: Duration,
    /// How long establishing the connection may take.
    pub connect_timeout: Duration,
    /// When and how often to retry.
    pub retry: RetryPolicy,
}

impl ClientConfig {
    /// Plaintext to `endpoint`, 10 s deadline, the default retry policy.
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            tls: None,
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
        }
    }

    /// The same with TLS.
    #[must_use]
    pub fn with_tls(mut self, tls: TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The same with another per-call deadline.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The same with another retry policy.
    #[must_use]
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub(crate) fn endpoint(&self) -> Result<Endpoint, Error> {
        let mut endpoint = Endpoint::from_shared(self.endpoint.clone())
            .map_err(|error| Error::Config(format!("invalid endpoint {:?}: {error}", self.endpoint)))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true);
        if let Some(tls) = &self.tls {
            let mut config = ClientTlsConfig::new().with_enabled_roots();
            if let Some(pem) = &tls.ca_certificate_pem {
                config = config.ca_certificate(Certificate::from_pem(pem));
            }
            if let Some(domain) = &tls.domain {
                config = config.domain_name(domain.clone());
            }
            endpoint = endpoint
                .tls_config(config)
                .map_err(|error| Error::Config(format!("invalid TLS settings: {error}")))?;
        }
        Ok(endpoint)
    }
}

/// TLS for a client.
#[derive(Debug, Clone, Default)]
pub struct TlsConfig {
    /// A CA certificate (PEM) to trust besides the system's roots, e.g. the
    /// one that signed a self-signed server certificate.
    pub ca_certificate_pem: Option<Vec<u8>>,
    /// The name to check the server's certificate against, when it differs
    /// from the endpoint's host.
    pub domain: Option<String>,
}

/// How often to try a call, and how long to wait between attempts.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all (1 = no retry).
    pub max_attempts: u32,
    /// The waits between attempts: exponential with jitter.
    pub backoff: Backoff,
}

impl Default for RetryPolicy {
    /// 4 attempts, waiting about 100 ms, 200 ms, 400 ms.
    fn default() -> Self {
        Self {
            max_attempts: 4,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(2)),
        }
    }
}

impl RetryPolicy {
    /// No retries.
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }
}
