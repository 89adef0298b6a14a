//! `amqps://`: the relay reaches RabbitMQ over TLS and verifies the broker's
//! certificate. The local broker speaks plain AMQP, so the test puts a TLS
//! terminator of its own in front of it, with a certificate for `localhost`
//! that only `AMQP_CA_FILE` vouches for.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use shop_messaging::AmqpConfig;
use tokio::net::{TcpListener, TcpStream};

use crate::helpers::spawn_app_with;

/// Accepts TLS on an ephemeral port and forwards the plain bytes to the
/// broker; counts completed handshakes.
struct TlsTerminator {
    addr: SocketAddr,
    handshakes: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsTerminator {
    async fn start(certified: &rcgen::CertifiedKey) -> Self {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
        let config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![certified.cert.der().clone()], key)
                .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let broker = shop_testkit::amqp_addr().await;
        let handshakes = Arc::new(AtomicUsize::new(0));
        let counted = handshakes.clone();
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let counted = counted.clone();
                tokio::spawn(async move {
                    let Ok(mut client) = acceptor.accept(socket).await else {
                        return;
                    };
                    counted.fetch_add(1, Ordering::SeqCst);
                    let Ok(mut upstream) = TcpStream::connect(broker).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
            }
        });
        Self {
            addr,
            handshakes,
            task,
        }
    }

    /// The terminator's URL, as the test identity.
    fn url(&self) -> String {
        let identity = url::Url::parse(&shop_testkit::amqp_url()).expect("TEST_AMQP_URL is a URL");
        format!(
            "amqps://{}:{}@localhost:{}/%2f",
            identity.username(),
            identity.password().unwrap_or_default(),
            self.addr.port()
        )
    }
}

impl Drop for TlsTerminator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn ca_file(certified: &rcgen::CertifiedKey) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("shop-amqp-ca-{}.pem", uuid::Uuid::new_v4().simple()));
    std::fs::write(&path, certified.cert.pem()).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn over_amqps_the_relay_publishes_through_a_verified_tls_connection() {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let terminator = TlsTerminator::start(&certified).await;
    let ca = ca_file(&certified);
    let app = spawn_app_with(|settings| {
        settings.host.amqp = AmqpConfig::new(terminator.url());
        settings.host.amqp.ca_file = Some(ca.clone());
    })
    .await;
    // The probe listens on a plain connection of its own.
    let mut probe = app.broker.probe(&app.exchange, "#").await.unwrap();

    let user = app.create_user("amqps@example.com", "Over TLS").await;

    let delivery = probe
        .next(Duration::from_secs(10))
        .await
        .expect("the event crossed the TLS connection");
    assert_eq!(delivery.routing_key.as_str(), "user.created");
    assert!(
        terminator.handshakes.load(Ordering::SeqCst) >= 1,
        "the relay connected through the terminator"
    );
    assert!(!user.id.is_empty());
    std::fs::remove_file(&ca).ok();
}

#[tokio::test(flavor = "multi_thread")]
async fn over_amqps_a_broker_certificate_nobody_vouches_for_is_refused() {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let terminator = TlsTerminator::start(&certified).await;

    let refused = shop_messaging::connection::connect(&AmqpConfig::new(terminator.url()), "untrusted").await;

    let error = refused.expect_err("an unknown issuer is refused");
    assert_eq!(terminator.handshakes.load(Ordering::SeqCst), 0, "{error:#}");
    let mut trusted = AmqpConfig::new(terminator.url());
    trusted.ca_file = Some(ca_file(&certified));
    let connection = shop_messaging::connection::connect(&trusted, "trusted")
        .await
        .expect("the same broker with its CA trusted");
    assert!(connection.status().connected());
    if let Some(path) = &trusted.ca_file {
        std::fs::remove_file(path).ok();
    }
}
