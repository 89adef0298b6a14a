//! How a client connects and retries.

use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretBox, SecretString};
pub use shop_backoff::Backoff;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::Error;

/// Where a service is and how to call it.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `http://host:port`, or `https://host:port` for TLS (with
    /// [`ClientConfig::tls`], or its defaults).
    pub endpoint: String,
    /// TLS settings; `None` for plaintext.
    pub tls: Option<TlsConfig>,
    /// Deadline of each call (each attempt, when retried).
    pub timeout: Duration,
    /// How long establishing the connection may take.
    pub connect_timeout: Duration,
    /// When and how often to retry.
    pub retry: RetryPolicy,
    /// A bearer token sent with every call (`authorization: Bearer …`).
    pub token: Option<SecretString>,
    /// Send the token over plaintext (`http://`) to a host that is not
    /// this machine: off, since anyone on the path could read and replay
    /// it. Loopback addresses (`localhost`, `127.0.0.0/8`, `::1`) never need
    /// it.
    pub allow_plaintext_token: bool,
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
            token: None,
            allow_plaintext_token: false,
        }
    }

    /// The same, calling with the bearer `token`.
    #[must_use]
    pub fn with_token(mut self, token: SecretString) -> Self {
        self.token = Some(token);
        self
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
        let https = endpoint.uri().scheme_str() == Some("https");
        if !https && self.tls.is_some() {
            return Err(Error::Config(format!(
                "endpoint {:?}: TLS settings need an https:// endpoint",
                self.endpoint
            )));
        }
        if self.token.is_some()
            && !https
            && !self.allow_plaintext_token
            && !is_loopback(endpoint.uri().host().unwrap_or_default())
        {
            return Err(Error::Config(format!(
                "a bearer token is sent over TLS (https://) or to this machine only, not in plaintext to {:?}; \
                 allow it explicitly if the network is trusted",
                self.endpoint
            )));
        }
        // An https:// endpoint without settings: TLS with the defaults.
        let default_tls = TlsConfig::default();
        let tls = self.tls.as_ref().or(https.then_some(&default_tls));
        if let Some(tls) = tls {
            // Mozilla's roots (webpki-roots, built in) unless a CA is given.
            let mut config = ClientTlsConfig::new();
            match &tls.ca_certificate_pem {
                Some(pem) => config = config.ca_certificate(Certificate::from_pem(pem)),
                None => config = config.with_webpki_roots(),
            }
            if let Some(domain) = &tls.domain {
                config = config.domain_name(domain.clone());
            }
            if let Some(identity) = &tls.client_identity {
                config = config.identity(Identity::from_pem(
                    &identity.certificate_pem,
                    identity.key_pem.expose_secret(),
                ));
            }
            endpoint = endpoint
                .tls_config(config)
                .map_err(|error| Error::Config(format!("invalid TLS settings: {error}")))?;
        }
        Ok(endpoint)
    }
}

/// Whether `host` (an endpoint's host: a name, an IPv4 address or a
/// bracketed IPv6 address) is this machine.
pub(crate) fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|address| address.is_loopback())
}

/// TLS for a client.
#[derive(Debug, Clone, Default)]
pub struct TlsConfig {
    /// The CA certificates (PEM) that sign the server's certificate, e.g.
    /// a private CA; unset, Mozilla's root certificates (built in) are
    /// trusted.
    pub ca_certificate_pem: Option<Vec<u8>>,
    /// The name to check the server's certificate against, when it differs
    /// from the endpoint's host.
    pub domain: Option<String>,
    /// A client certificate and its key, for a server that authenticates
    /// callers by certificate (mTLS).
    pub client_identity: Option<ClientIdentity>,
}

/// A client certificate (PEM chain) and its private key (PEM).
#[derive(Clone)]
pub struct ClientIdentity {
    /// The certificate chain, the client's certificate first.
    pub certificate_pem: Vec<u8>,
    /// Its private key; never printed.
    pub key_pem: std::sync::Arc<SecretBox<Vec<u8>>>,
}

impl ClientIdentity {
    /// The certificate `certificate_pem` with its key `key_pem`.
    pub fn new(certificate_pem: Vec<u8>, key_pem: Vec<u8>) -> Self {
        Self {
            certificate_pem,
            key_pem: std::sync::Arc::new(SecretBox::new(Box::new(key_pem))),
        }
    }
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity").finish_non_exhaustive()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_this_machine_and_others_are_not() {
        for host in [
            "localhost",
            "LOCALHOST",
            "127.0.0.1",
            "127.8.9.10",
            "[::1]",
            "::1",
        ] {
            assert!(is_loopback(host), "{host}");
        }
        for host in ["example.com", "10.0.0.1", "[::2]", "localhost.example.com", ""] {
            assert!(!is_loopback(host), "{host}");
        }
    }

    #[test]
    fn a_token_is_not_sent_in_plaintext_to_another_host_unless_allowed() {
        let token = || SecretString::from("t0ken".to_owned());
        let remote = ClientConfig::new("http://users.example.com:50051").with_token(token());
        let local = ClientConfig::new("http://localhost:50051").with_token(token());
        let mut allowed = remote.clone();
        allowed.allow_plaintext_token = true;

        let refused = remote.endpoint().unwrap_err();

        assert!(matches!(refused, Error::Config(_)), "{refused:?}");
        assert!(!refused.to_string().contains("t0ken"));
        assert!(local.endpoint().is_ok());
        assert!(allowed.endpoint().is_ok());
        assert!(
            ClientConfig::new("https://users.example.com:50051")
                .with_token(token())
                .endpoint()
                .is_ok()
        );
    }
}
