//! `<service> healthcheck [--service NAME]`: asks the gRPC health service of
//! the server at `GRPC_ADDR` whether it (or the named part, such as
//! `order-service.consumer`) is SERVING; exit 0 if so. It is the container
//! and Kubernetes probe, with no extra binary in the image.
//!
//! With gRPC TLS on (`GRPC_TLS_CERT`), the probe speaks TLS to the server on
//! loopback, where the certificate's name cannot match `127.0.0.1`. Instead
//! of the name, it checks that the server presents exactly the certificate
//! in `GRPC_TLS_CERT` (pinning): the probe runs beside the server and reads
//! the same file. After the file is rotated, a server still serving the old
//! certificate fails the probe, and the orchestrator restarts it onto the
//! new one.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::grpc::GrpcConfig;

/// How long the whole check may take.
const DEADLINE: Duration = Duration::from_secs(3);

/// Checks that `service` (`""` for the server as a whole) is SERVING at the
/// server `config` describes.
pub async fn check(config: &GrpcConfig, service: &str) -> anyhow::Result<()> {
    let addr = if config.addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], config.addr.port()))
    } else {
        config.addr
    };
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(DEADLINE)
        .timeout(DEADLINE);
    let channel = match &config.tls_cert {
        None => endpoint.connect().await?,
        Some(certificate) => {
            let tls = tokio_rustls::TlsConnector::from(Arc::new(pinned_client(certificate)?));
            let connector = tower::service_fn(move |_: http::Uri| {
                let tls = tls.clone();
                async move {
                    let tcp = tokio::net::TcpStream::connect(addr).await?;
                    let name = ServerName::from(addr.ip());
                    let stream = tls.connect(name, tcp).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            });
            endpoint.connect_with_connector(connector).await?
        }
    };
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?
        .into_inner()
        .status;
    anyhow::ensure!(
        status == ServingStatus::Serving as i32,
        "{} is not serving (status {status})",
        if service.is_empty() { "the server" } else { service }
    );
    Ok(())
}

/// Checks that `service` is SERVING at the plaintext server at `addr`.
pub async fn check_at(addr: SocketAddr, service: &str) -> anyhow::Result<()> {
    let mut config: GrpcConfig = shop_config::defaults();
    config.addr = addr;
    check(&config, service).await
}

/// A TLS client (HTTP/2) that accepts exactly the first certificate of the
/// PEM file `certificate`.
fn pinned_client(certificate: &Path) -> anyhow::Result<rustls::ClientConfig> {
    let expected = CertificateDer::pem_file_iter(certificate)
        .with_context(|| format!("cannot read {}", certificate.display()))?
        .next()
        .with_context(|| format!("{} holds no certificate", certificate.display()))?
        .with_context(|| format!("{} holds an invalid certificate", certificate.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(Pinned {
        expected: expected.into_owned(),
        provider: provider.clone(),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("no TLS protocol version available")?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Accepts the one certificate it was given, and checks the handshake's
/// signatures as usual.
#[derive(Debug)]
struct Pinned {
    expected: CertificateDer<'static>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.expected.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the server does not present the certificate in GRPC_TLS_CERT".to_owned(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
