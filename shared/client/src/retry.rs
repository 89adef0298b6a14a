//! Calling with a deadline, trace propagation and retries.

use std::future::Future;

use secrecy::ExposeSecret as _;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::{ClientConfig, Error};

/// A channel whose requests carry the current trace context and the
/// credentials.
pub(crate) type TracedChannel = InterceptedService<Channel, CallMetadata>;

/// What every request carries besides its message: the trace context and
/// the bearer token.
#[derive(Clone)]
pub(crate) struct CallMetadata {
    authorization: Option<AsciiMetadataValue>,
}

impl std::fmt::Debug for CallMetadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallMetadata")
            .field("token", &self.authorization.as_ref().map(|_| "***"))
            .finish()
    }
}

impl Interceptor for CallMetadata {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let mut request = shop_telemetry::propagation::inject_grpc(request)?;
        if let Some(value) = &self.authorization {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A lazily connected, traced channel for `config`.
pub(crate) fn channel(config: &ClientConfig) -> Result<TracedChannel, Error> {
    let channel = config.endpoint()?.connect_lazy();
    let authorization = match &config.token {
        None => None,
        Some(token) => {
            let mut value = AsciiMetadataValue::try_from(format!("Bearer {}", token.expose_secret().trim()))
                .map_err(|_| Error::Config("the token is not a valid header value (ASCII)".to_owned()))?;
            // Never kept in HPACK tables, where it could be compressed against.
            value.set_sensitive(true);
            Some(value)
        }
    };
    Ok(InterceptedService::new(channel, CallMetadata { authorization }))
}

/// Whether a call is safe to send again after it timed out (its first
/// attempt may have been applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Repeat {
    /// Reads, and creates carrying a request id.
    Safe,
    /// Calls guarded by an expected version: repeated only when the server
    /// said it was unavailable.
    OnlyWhenUnavailable,
}

/// Runs `call` (given a request builder with the deadline set) until it
/// succeeds, fails for good, or runs out of attempts.
pub(crate) async fn with_retries<M, T, F, Fut>(
    config: &ClientConfig,
    repeat: Repeat,
    message: M,
    mut call: F,
) -> Result<T, Error>
where
    M: Clone,
    F: FnMut(Request<M>) -> Fut,
    Fut: Future<Output = Result<Response<T>, Status>>,
{
    let policy = config.retry;
    let mut backoff = policy.backoff.start();
    let mut attempt = 1;
    loop {
        let mut request = Request::new(message.clone());
        request.set_timeout(config.timeout);
        let status = match call(request).await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status) => status,
        };
        let retryable = match status.code() {
            Code::Unavailable => true,
            Code::DeadlineExceeded | Code::ResourceExhausted => repeat == Repeat::Safe,
            _ => false,
        };
        if !retryable || attempt >= policy.max_attempts.max(1) {
            return Err(Error::from(status));
        }
        attempt += 1;
        tokio::time::sleep(backoff.next_delay()).await;
    }
}
