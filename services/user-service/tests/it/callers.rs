//! Hostile or broken callers: made-up methods, streams that stall mid-request
//! and clients that stop answering, against the real service.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use secrecy::ExposeSecret as _;
use shop_contracts::user as pb;
use shop_testkit::{AuthChannel, ServiceProcess, TestBroker, TestKeys, http_get, metric};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tonic::Code;

use crate::helpers::{spawn_app_with, test_database};

/// A deadline for anything the test itself waits on over the network.
const NETWORK: Duration = Duration::from_secs(10);

/// Calls `path` with an empty message over `channel` and returns the status.
async fn call_made_up(channel: AuthChannel, path: String) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::try_from(path).unwrap();
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    tokio::time::timeout(NETWORK, grpc.unary(tonic::Request::new(()), path, codec))
        .await
        .expect("an answer in time")
        .expect_err("no such method")
}

/// The series of the gRPC server metrics in a scrape: each sample line up to
/// its value.
fn grpc_series(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|line| line.starts_with("grpc_server_"))
        .filter_map(|line| line.rsplit_once(' ').map(|(series, _)| series.to_owned()))
        .collect()
}

fn samples(scrape: &str) -> usize {
    scrape.lines().filter(|line| !line.starts_with('#')).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn thousands_of_calls_to_made_up_methods_add_no_metric_series() {
    // Its own process: the metrics registry is per process, and the other
    // tests of this binary record into this one's.
    let db = test_database().await;
    let broker = TestBroker::new();
    let exchange = broker.exchange("user.events");
    let _consumer = broker.probe(&exchange, "#").await.unwrap();
    let mut service = ServiceProcess::start(
        env!("CARGO_BIN_EXE_user-service"),
        &[
            ("DATABASE_URL", db.url().to_owned()),
            ("AMQP_URL", broker.config().url.expose_secret().to_owned()),
            ("USER_EVENTS_EXCHANGE", exchange.clone()),
        ]
        .into_iter()
        .chain(TestKeys::shared().env())
        .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    let admin = service.admin_addr.expect("admin address logged");
    // An authenticated caller: made-up methods are answered UNIMPLEMENTED
    // once the caller is known (unknown callers get UNAUTHENTICATED).
    let channel = shop_testkit::auth::with_token(
        tonic::transport::Endpoint::from_shared(format!("http://{}", service.addr))
            .unwrap()
            .connect_timeout(NETWORK)
            .connect()
            .await
            .unwrap(),
        &TestKeys::shared().service_token(),
    );
    let made_up = |i: usize| match i % 3 {
        0 => format!("/shop.user.v1.UserService/Bogus{i}"),
        1 => format!("/made.up.v{i}.Service/Method{i}"),
        _ => format!("/{i}"),
    };
    // One known call and one made-up call first, and the relay's metrics of
    // the user's event: every series there will be exists before the count.
    create_one_user(&channel).await;
    assert_eq!(
        call_made_up(channel.clone(), made_up(0)).await.code(),
        Code::Unimplemented
    );
    let exchange_label = [("exchange", exchange.as_str())];
    let before = shop_testkit::eventually("the event published and the outbox sampled", NETWORK, || async {
        let scrape = http_get(admin, "/metrics").await.ok()?.1;
        (metric(&scrape, "outbox_events_published_total", &exchange_label) == Some(1.0)
            && metric(&scrape, "outbox_pending_events", &exchange_label).is_some())
        .then_some(scrape)
    })
    .await;

    let calls = 2000;
    let statuses = futures::future::join_all((1..=calls).map(|i| {
        let channel = channel.clone();
        let path = made_up(i);
        tokio::spawn(async move { call_made_up(channel, path).await.code() })
    }))
    .await;
    let after = http_get(admin, "/metrics").await.unwrap().1;
    service.terminate().await.unwrap();

    assert!(
        statuses
            .iter()
            .all(|status| matches!(status, Ok(Code::Unimplemented))),
        "every made-up method is UNIMPLEMENTED"
    );
    eprintln!(
        "{calls} made-up calls: {} gRPC series before, {} after; the scrape {} lines ({} samples) before, {} lines ({} samples) after",
        grpc_series(&before).len(),
        grpc_series(&after).len(),
        before.lines().count(),
        samples(&before),
        after.lines().count(),
        samples(&after),
    );
    let added: Vec<String> = grpc_series(&after)
        .difference(&grpc_series(&before))
        .cloned()
        .collect();
    assert!(
        added.is_empty(),
        "{} new series, such as {:?}",
        added.len(),
        added.first()
    );
    assert_eq!(
        after.lines().count(),
        before.lines().count(),
        "the scrape did not grow"
    );
    assert!(
        !after.contains("Bogus") && !after.contains("made.up"),
        "a made-up name reached the scrape"
    );
    let unknown = [("service", "unknown"), ("method", "unknown")];
    assert_eq!(
        metric(
            &after,
            "grpc_server_requests_total",
            &[unknown[0], unknown[1], ("code", "UNIMPLEMENTED")]
        ),
        Some((calls + 1) as f64)
    );
    assert_eq!(
        metric(&after, "grpc_server_request_duration_seconds_count", &unknown),
        Some((calls + 1) as f64)
    );
    assert_eq!(
        metric(
            &after,
            "grpc_server_requests_total",
            &[
                ("service", "shop.user.v1.UserService"),
                ("method", "CreateUser"),
                ("code", "OK")
            ]
        ),
        Some(1.0),
        "known methods keep their names"
    );
}

/// One CreateUser over `channel`, so the known series exist.
async fn create_one_user(channel: &AuthChannel) {
    pb::user_service_client::UserServiceClient::new(channel.clone())
        .create_user(pb::CreateUserRequest {
            email: "known@example.com".to_owned(),
            name: "Known".to_owned(),
            request_id: String::new(),
        })
        .await
        .unwrap();
}

/// A stream that sent its headers (and, for every other one, the first
/// bytes of a message) and then nothing more.
struct StalledStream {
    opened: Instant,
    response: h2::client::ResponseFuture,
    _body: h2::SendStream<Bytes>,
}

/// Opens `per_connection` stalled CreateUser streams on each of
/// `connections` HTTP/2 connections to `addr`, and returns them once the
/// server has read them all (a PING sent after them came back).
async fn open_stalled_streams(
    addr: SocketAddr,
    connections: usize,
    per_connection: usize,
) -> (Vec<StalledStream>, Vec<tokio::task::JoinHandle<()>>) {
    let authorization = format!("Bearer {}", TestKeys::shared().service_token());
    let mut streams = Vec::new();
    let mut drivers = Vec::new();
    for _ in 0..connections {
        let tcp = tokio::time::timeout(NETWORK, TcpStream::connect(addr))
            .await
            .unwrap()
            .unwrap();
        let (mut sender, mut connection) = tokio::time::timeout(NETWORK, h2::client::handshake(tcp))
            .await
            .unwrap()
            .unwrap();
        let mut ping_pong = connection.ping_pong().expect("the first ping_pong");
        drivers.push(tokio::spawn(async move {
            // Ends when the test drops the streams or the server closes.
            let _ = connection.await;
        }));
        for i in 0..per_connection {
            sender = tokio::time::timeout(NETWORK, sender.ready())
                .await
                .unwrap()
                .unwrap();
            let request = http::Request::post(format!("http://{addr}/shop.user.v1.UserService/CreateUser"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .header("authorization", &authorization)
                .body(())
                .unwrap();
            let (response, mut body) = sender.send_request(request, false).unwrap();
            if i % 2 == 0 {
                // A message of 100 bytes announced, 3 sent.
                body.send_data(Bytes::from_static(&[0, 0, 0, 0, 100, 10, 1, b'a']), false)
                    .unwrap();
            }
            streams.push(StalledStream {
                opened: Instant::now(),
                response,
                _body: body,
            });
        }
        tokio::time::timeout(NETWORK, ping_pong.ping(h2::Ping::opaque()))
            .await
            .expect("the server answers the ping")
            .unwrap();
    }
    (streams, drivers)
}

#[tokio::test(flavor = "multi_thread")]
async fn while_600_streams_stall_real_calls_are_served_promptly_and_the_stalled_streams_end_at_the_request_timeout()
 {
    let request_timeout = Duration::from_secs(5);
    // The default bound of 512 calls in flight: the 600 stalled streams
    // would hold all of it if a permit were taken with the headers.
    let app = spawn_app_with(|settings| {
        settings.host.grpc.request_timeout = request_timeout;
    })
    .await;
    // Below the server's cap on streams per connection.
    let (stalled, drivers) = open_stalled_streams(app.addr, 8, 75).await;
    let stalled_since = stalled.iter().map(|stream| stream.opened).min().unwrap();

    let mut latencies = Vec::new();
    for i in 0..20 {
        let started = Instant::now();
        let created = tokio::time::timeout(
            NETWORK,
            app.client.clone().create_user(pb::CreateUserRequest {
                email: format!("real{i}@example.com"),
                name: "Real".to_owned(),
                request_id: String::new(),
            }),
        )
        .await
        .expect("an answer in time");
        latencies.push(started.elapsed());
        created.expect("a real call is served while streams stall");
    }
    let served_at = Instant::now();
    let mut ended = Vec::new();
    for stream in stalled {
        let response = tokio::time::timeout(request_timeout + NETWORK, stream.response)
            .await
            .expect("the server ends the stalled stream")
            .expect("with an answer");
        let status = response
            .headers()
            .get("grpc-status")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        ended.push((stream.opened.elapsed(), status));
    }
    for driver in drivers {
        driver.abort();
    }

    latencies.sort();
    let slowest_end = ended.iter().map(|(elapsed, _)| *elapsed).max().unwrap();
    let soonest_end = ended.iter().map(|(elapsed, _)| *elapsed).min().unwrap();
    eprintln!(
        "20 CreateUser during 600 stalled streams: median {:?}, slowest {:?}; stalled streams ended after {:?} to {:?} (request timeout {:?})",
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1],
        soonest_end,
        slowest_end,
        request_timeout,
    );
    assert!(
        served_at < stalled_since + request_timeout,
        "the real calls were served while the streams stalled"
    );
    assert!(
        latencies[latencies.len() - 1] < Duration::from_secs(2),
        "promptly: {latencies:?}"
    );
    assert_eq!(ended.len(), 600);
    assert!(
        ended.iter().all(|(_, status)| status.as_deref() == Some("4")),
        "every stalled stream ends with DEADLINE_EXCEEDED: {:?}",
        ended.iter().find(|(_, status)| status.as_deref() != Some("4"))
    );
    assert!(
        slowest_end < request_timeout + Duration::from_secs(2),
        "ended at the request timeout, not later: {slowest_end:?}"
    );
    assert_eq!(app.user_count().await, 20, "the stalled calls did nothing");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_whose_client_stops_answering_pings_is_closed_by_the_server() {
    let (interval, timeout) = (Duration::from_secs(1), Duration::from_secs(1));
    let app = spawn_app_with(|settings| {
        settings.host.grpc.keepalive_interval = interval;
        settings.host.grpc.keepalive_timeout = timeout;
    })
    .await;
    // An HTTP/2 client that says hello and then never reads or answers: a
    // peer that hung or vanished behind a network that keeps the socket.
    let mut tcp = tokio::time::timeout(NETWORK, TcpStream::connect(app.addr))
        .await
        .unwrap()
        .unwrap();
    let opened = Instant::now();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    // An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
    tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();

    // Read what the server sends, frame by frame, answering nothing, until
    // it closes the connection.
    let mut frame_types = Vec::new();
    let closed = tokio::time::timeout(NETWORK, async {
        let mut header = [0_u8; 9];
        loop {
            if tcp.read_exact(&mut header).await.is_err() {
                return;
            }
            frame_types.push(header[3]);
            let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            let mut payload = vec![0_u8; length];
            if tcp.read_exact(&mut payload).await.is_err() {
                return;
            }
        }
    })
    .await;
    let lasted = opened.elapsed();

    eprintln!(
        "a client answering no ping was disconnected after {lasted:?}; frames received {frame_types:?}"
    );
    assert!(
        closed.is_ok(),
        "the server keeps a connection whose client does not answer"
    );
    assert!(frame_types.contains(&6), "the server pinged: {frame_types:?}");
    assert!(
        lasted >= interval && lasted < interval + timeout + Duration::from_secs(3),
        "closed after the ping went unanswered: {lasted:?}"
    );
    // The server still serves everyone else.
    app.client
        .clone()
        .create_user(pb::CreateUserRequest {
            email: "alive@example.com".to_owned(),
            name: "Alive".to_owned(),
            request_id: String::new(),
        })
        .await
        .unwrap();
}
