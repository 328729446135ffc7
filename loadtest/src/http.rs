//! HTTP for a simulated player: one client per viewer (its own connection pool, like a browser
//! profile), HTTP/1.1 with keep-alive, and over TLS HTTP/2 or HTTP/1.1 by ALPN. Every request is
//! timed to its first byte (response headers) and its last.

use crate::stats::Outcome;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A viewer's HTTP client.
pub type ViewerClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// How viewers speak HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// HTTP/1.1 (over TLS for https:// URLs).
    H1,
    /// HTTP/2 over TLS for https:// URLs (ALPN), HTTP/1.1 for http://, like a browser.
    Auto,
}

/// TLS settings shared by all viewers.
pub fn tls_config(
    ca: Option<&std::path::Path>,
    insecure: bool,
) -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut cfg = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        if let Some(ca) = ca {
            let pem =
                std::fs::read(ca).map_err(|e| anyhow::anyhow!("--ca {}: {e}", ca.display()))?;
            for c in rustls_pemfile::certs(&mut pem.as_slice()) {
                roots.add(c?)?;
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    // ALPN (h2, http/1.1 or http/1.1 alone) is set by the connector from `protocol`.
    cfg.alpn_protocols.clear();
    Ok(cfg)
}

/// A new client (own pool) for one viewer.
pub fn client(tls: &rustls::ClientConfig, protocol: Protocol) -> ViewerClient {
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls.clone())
        .https_or_http();
    let conn = match protocol {
        Protocol::H1 => b.enable_http1().build(),
        Protocol::Auto => b.enable_http1().enable_http2().build(),
    };
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(conn)
}

/// A finished request.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// Status, timeout or transport failure.
    pub outcome: Outcome,
    /// Until the response headers.
    pub ttfb: Option<Duration>,
    /// Until the last body byte (or the failure).
    pub total: Duration,
    /// The body (empty on failure).
    pub body: Bytes,
    /// Wall time (Unix ms) the last byte arrived.
    pub done_unix_ms: f64,
    /// The HTTP version of the response.
    pub version: Option<http::Version>,
}

impl Fetched {
    /// A 2xx with its whole body.
    pub fn ok(&self) -> bool {
        matches!(self.outcome, Outcome::Status(s) if (200..300).contains(&s))
    }
}

/// Unix time now in ms.
pub fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// GETs `url` within `timeout` (headers and body together).
pub async fn get(client: &ViewerClient, url: &str, timeout: Duration) -> Fetched {
    let start = Instant::now();
    let mut ttfb = None;
    let mut version = None;
    let res = tokio::time::timeout(timeout, async {
        let uri: http::Uri = url.parse().map_err(|_| Outcome::Transport)?;
        let resp = client.get(uri).await.map_err(|_| Outcome::Transport)?;
        ttfb = Some(start.elapsed());
        version = Some(resp.version());
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|_| Outcome::Transport)?
            .to_bytes();
        Ok::<_, Outcome>((status, body))
    })
    .await;
    let (outcome, body) = match res {
        Ok(Ok((status, body))) => (Outcome::Status(status), body),
        Ok(Err(o)) => (o, Bytes::new()),
        Err(_) => (Outcome::Timeout, Bytes::new()),
    };
    Fetched {
        outcome,
        ttfb,
        total: start.elapsed(),
        body,
        done_unix_ms: unix_ms(),
        version,
    }
}

/// Accepts any server certificate (`--insecure`): for test certificates only.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
