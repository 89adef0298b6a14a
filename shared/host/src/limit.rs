//! Admission of gRPC calls: a call is received whole, within a deadline,
//! before it takes one of a bounded number of permits.
//!
//! # Why the body comes first
//!
//! A permit taken when the request headers arrive is held by whoever sent
//! them, for as long as they like: a caller that sends headers (and maybe
//! part of the message) and then stalls holds a permit without costing the
//! service any work, and a few hundred such streams refuse every real call
//! with `RESOURCE_EXHAUSTED`. So [`InFlightLimit`] first reads the request
//! body to its end (`END_STREAM`), then takes a permit, then calls the
//! service. Permits count calls the service is working on, which is what
//! they are for; a stalled caller holds none.
//!
//! # Bounds while a request is received
//!
//! - Size: the body is read into memory up to the largest message
//!   (`GRPC_MAX_MESSAGE_BYTES`) plus the 5-byte gRPC frame header; a larger
//!   one is refused with `OUT_OF_RANGE`, as tonic refuses a message over
//!   `max_decoding_message_size`, before it reaches the handler. tonic
//!   buffers the whole message in its decoder anyway; buffering it here
//!   first costs one more copy of one message while it is decoded.
//! - Time: one deadline (`GRPC_REQUEST_TIMEOUT`) runs from the moment the
//!   headers are in until the response head is out: receiving the body and
//!   handling the call together. A body that is not complete by then ends
//!   the call with `DEADLINE_EXCEEDED` (hyper then resets the stream with
//!   `NO_ERROR`, so the stream is freed too); a handler that is still
//!   working is dropped, and the call ends the same way, releasing its
//!   permit. The answer is given inside the trace layer, so such calls are
//!   counted and traced with their code. (tonic's own `Server::timeout`
//!   answers from outside every layer, with `CANCELLED`, and the call would
//!   be neither counted nor traced; the caller's own `grpc-timeout` is still
//!   enforced by tonic that way.)
//! - Memory: requests being received hold no permit, so their number is
//!   bounded only by the streams per connection
//!   (`GRPC_MAX_STREAMS_PER_CONNECTION`) times the connections (which
//!   nothing here bounds, see [`crate::grpc`]), each at most one message,
//!   each for at most the request timeout. Before, a stalled stream cost a
//!   permit; now it costs the bytes it sent, for a bounded time.
//!
//! # Unary only
//!
//! Every RPC of this system is unary: one request message, one response.
//! Waiting for the end of the request before calling the handler is correct
//! only for those. A client-streaming RPC would run only after its client
//! finished, and a bidirectional one, whose client waits for answers before
//! it sends more, would wait until the deadline. The streaming services the
//! server has, health (`Watch`) and reflection (bidirectional), are exempt:
//! they are neither buffered, limited nor given a deadline (they are cheap,
//! and an overloaded instance must not also look dead). A streaming RPC
//! added to a contract must be exempted here too, and given a bound of its
//! own (a permit per stream, a deadline per message).
//!
//! Past the bound on permits a call is refused at once with
//! `RESOURCE_EXHAUSTED` instead of waiting in an unbounded queue (which
//! only turns overload into timeouts and memory growth); clients retry with
//! backoff.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use tokio::sync::Semaphore;
use tonic::body::Body;

/// Services whose calls are neither buffered, limited nor timed: health
/// checks and reflection (see the module docs).
const EXEMPT: &[&str] = &[
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// The gRPC length-prefixed message header: a compression flag and a
/// 4-byte length.
const GRPC_FRAME_HEADER_BYTES: usize = 5;

/// Admits calls as the module docs say.
#[derive(Debug, Clone)]
pub struct InFlightLimitLayer {
    gate: Arc<Gate>,
}

#[derive(Debug)]
struct Gate {
    permits: Arc<Semaphore>,
    max_request_bytes: usize,
    timeout: Duration,
}

impl InFlightLimitLayer {
    /// At most `max_in_flight` calls handled at once, each request at most
    /// `max_message_bytes` (one message), each call done within `timeout`.
    pub fn new(max_in_flight: usize, max_message_bytes: usize, timeout: Duration) -> Self {
        // Exported from the start at zero: the first shed call is then seen
        // by `increase()`.
        metrics::counter!("grpc_server_shed_total").increment(0);
        Self {
            gate: Arc::new(Gate {
                permits: Arc::new(Semaphore::new(max_in_flight.max(1))),
                max_request_bytes: max_message_bytes.saturating_add(GRPC_FRAME_HEADER_BYTES),
                timeout,
            }),
        }
    }
}

impl<S> tower::Layer<S> for InFlightLimitLayer {
    type Service = InFlightLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InFlightLimit {
            inner,
            gate: self.gate.clone(),
        }
    }
}

/// The service made by [`InFlightLimitLayer`].
#[derive(Debug, Clone)]
pub struct InFlightLimit<S> {
    inner: S,
    gate: Arc<Gate>,
}

impl<S> tower::Service<http::Request<Body>> for InFlightLimit<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The service polled ready is the one to call, later; a clone takes
        // its place for the next call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = request.uri().path();
        if EXEMPT.iter().any(|prefix| path.starts_with(prefix)) {
            return Box::pin(inner.call(request));
        }
        let gate = self.gate.clone();
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + gate.timeout;
            let (parts, body) = request.into_parts();
            let received =
                tokio::time::timeout_at(deadline, Limited::new(body, gate.max_request_bytes).collect()).await;
            let body = match received {
                Ok(Ok(body)) => body,
                Ok(Err(error)) if error.is::<LengthLimitError>() => {
                    let status = tonic::Status::out_of_range(format!(
                        "the request is larger than the largest message, {} bytes",
                        gate.max_request_bytes - GRPC_FRAME_HEADER_BYTES
                    ));
                    return Ok(status.into_http());
                }
                Ok(Err(error)) => {
                    // The caller reset the stream or the connection broke:
                    // nobody reads the answer, but the call is counted.
                    tracing::debug!(error = %shop_telemetry::error_chain(&*error), "request body not received");
                    return Ok(tonic::Status::cancelled("the request was not received whole").into_http());
                }
                Err(_) => {
                    return Ok(
                        tonic::Status::deadline_exceeded("the request was not received in time").into_http(),
                    );
                }
            };
            let Ok(permit) = gate.permits.clone().try_acquire_owned() else {
                metrics::counter!("grpc_server_shed_total").increment(1);
                let status =
                    tonic::Status::resource_exhausted("too many calls in flight; retry with backoff");
                return Ok(status.into_http());
            };
            let handled = tokio::time::timeout_at(
                deadline,
                inner.call(http::Request::from_parts(parts, Body::new(body))),
            )
            .await;
            drop(permit);
            handled.unwrap_or_else(|_| {
                Ok(tonic::Status::deadline_exceeded("the call did not finish in time").into_http())
            })
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http_body_util::Full;
    use tower::{Layer as _, Service as _};

    use super::*;

    const PATH: &str = "/shop.user.v1.UserService/CreateUser";

    /// A service that reads the request and answers OK, or never answers
    /// when the request carries `x-hang`; it counts its calls.
    fn handler(
        calls: Arc<AtomicUsize>,
    ) -> impl tower::Service<
        http::Request<Body>,
        Response = http::Response<Body>,
        Error = Infallible,
        Future = impl Future<Output = Result<http::Response<Body>, Infallible>> + Send,
    > + Clone
    + Send
    + 'static {
        tower::service_fn(move |request: http::Request<Body>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if request.headers().contains_key("x-hang") {
                    std::future::pending::<()>().await;
                }
                let _ = request.into_body().collect().await;
                Ok(http::Response::new(Body::default()))
            }
        })
    }

    fn request(body: Body) -> http::Request<Body> {
        http::Request::post(PATH).body(body).unwrap()
    }

    fn whole(bytes: usize) -> Body {
        Body::new(Full::new(Bytes::from(vec![0_u8; bytes])))
    }

    /// The gRPC code of a response (OK when the head has none, as a unary
    /// success).
    fn code(response: &http::Response<Body>) -> tonic::Code {
        tonic::Status::from_header_map(response.headers()).map_or(tonic::Code::Ok, |status| status.code())
    }

    async fn call<S>(service: &mut InFlightLimit<S>, request: http::Request<Body>) -> http::Response<Body>
    where
        S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        std::future::poll_fn(|cx| service.poll_ready(cx)).await.unwrap();
        let future = service.call(request);
        tokio::time::timeout(Duration::from_secs(10), future)
            .await
            .expect("an answer in time")
            .unwrap()
    }

    #[tokio::test]
    async fn a_request_still_arriving_holds_no_permit() {
        let calls = Arc::new(AtomicUsize::new(0));
        let mut service =
            InFlightLimitLayer::new(1, 1024, Duration::from_secs(60)).layer(handler(calls.clone()));
        let (mut sender, stalled) = http_body_util::channel::Channel::<Bytes, tonic::Status>::new(1);
        sender
            .send_data(Bytes::from_static(&[0, 0, 0, 0, 9]))
            .await
            .unwrap();
        std::future::poll_fn(|cx| service.poll_ready(cx)).await.unwrap();
        let first = tokio::spawn(service.call(request(Body::new(stalled))));

        let second = call(&mut service, request(whole(10))).await;
        sender.send_data(Bytes::from_static(&[1; 9])).await.unwrap();
        drop(sender);
        let first = tokio::time::timeout(Duration::from_secs(10), first)
            .await
            .unwrap()
            .unwrap()
            .unwrap();

        assert_eq!(code(&second), tonic::Code::Ok, "the one permit was free");
        assert_eq!(
            code(&first),
            tonic::Code::Ok,
            "the first call is served once whole"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_request_larger_than_the_largest_message_is_refused_before_the_handler() {
        let calls = Arc::new(AtomicUsize::new(0));
        let mut service =
            InFlightLimitLayer::new(8, 1024, Duration::from_secs(60)).layer(handler(calls.clone()));

        let largest = call(&mut service, request(whole(1024 + GRPC_FRAME_HEADER_BYTES))).await;
        let larger = call(&mut service, request(whole(1024 + GRPC_FRAME_HEADER_BYTES + 1))).await;

        assert_eq!(code(&largest), tonic::Code::Ok);
        assert_eq!(code(&larger), tonic::Code::OutOfRange);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_request_not_received_within_the_deadline_ends_with_deadline_exceeded() {
        let calls = Arc::new(AtomicUsize::new(0));
        let mut service =
            InFlightLimitLayer::new(8, 1024, Duration::from_millis(100)).layer(handler(calls.clone()));
        let (_sender, stalled) = http_body_util::channel::Channel::<Bytes, tonic::Status>::new(1);

        let response = call(&mut service, request(Body::new(stalled))).await;

        assert_eq!(code(&response), tonic::Code::DeadlineExceeded);
        assert_eq!(calls.load(Ordering::SeqCst), 0, "the handler never saw it");
    }

    #[tokio::test]
    async fn a_handler_past_the_deadline_is_dropped_and_its_permit_released() {
        let calls = Arc::new(AtomicUsize::new(0));
        let mut service =
            InFlightLimitLayer::new(1, 1024, Duration::from_millis(100)).layer(handler(calls.clone()));
        let mut hanging = request(whole(10));
        hanging
            .headers_mut()
            .insert("x-hang", http::HeaderValue::from_static("1"));

        let hung = call(&mut service, hanging).await;
        let next = call(&mut service, request(whole(10))).await;

        assert_eq!(code(&hung), tonic::Code::DeadlineExceeded);
        assert_eq!(code(&next), tonic::Code::Ok, "the permit came back");
    }

    #[tokio::test]
    async fn a_caller_that_resets_its_request_is_answered_cancelled_without_reaching_the_handler() {
        let calls = Arc::new(AtomicUsize::new(0));
        let mut service =
            InFlightLimitLayer::new(8, 1024, Duration::from_secs(60)).layer(handler(calls.clone()));
        let (sender, body) = http_body_util::channel::Channel::<Bytes, tonic::Status>::new(1);
        sender.abort(tonic::Status::cancelled("reset by the client"));

        let response = call(&mut service, request(Body::new(body))).await;

        assert_eq!(code(&response), tonic::Code::Cancelled);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn health_checks_are_neither_buffered_nor_limited() {
        let calls = Arc::new(AtomicUsize::new(0));
        let mut service =
            InFlightLimitLayer::new(1, 16, Duration::from_millis(100)).layer(handler(calls.clone()));
        let mut check = http::Request::post("/grpc.health.v1.Health/Check")
            .body(whole(1000))
            .unwrap();
        check
            .headers_mut()
            .insert("x-hang", http::HeaderValue::from_static("1"));

        std::future::poll_fn(|cx| service.poll_ready(cx)).await.unwrap();
        let passed = tokio::time::timeout(Duration::from_millis(500), service.call(check)).await;

        assert!(
            passed.is_err(),
            "no deadline of the layer's: the handler still runs"
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "passed on, not refused as too large"
        );
    }
}
