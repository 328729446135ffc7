//! Stream-key authentication: a static key → name table, then an optional HTTP(S) webhook.
//!
//! Keys are secrets: they never reach a log line, a metric label or an error message. The
//! webhook's answer is read up to `MAX_ANSWER` bytes, within its timeout.

use crate::config::AuthConfig;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::collections::HashMap;
use std::time::Duration;

/// Why a publish was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No rule knows the key.
    #[error("unknown stream key")]
    UnknownKey,
    /// The webhook said no.
    #[error("the authentication webhook denied the key")]
    Denied,
    /// The webhook could not be asked or gave a bad answer.
    #[error("authentication webhook failed: {0}")]
    Webhook(String),
}

/// The longest webhook answer read.
const MAX_ANSWER: usize = 64 * 1024;

type Connector = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// Decides who may publish, and as which stream.
pub struct Authenticator {
    table: HashMap<String, String>,
    webhook: Option<(hyper::Uri, Duration)>,
    client: hyper_util::client::legacy::Client<Connector, Full<Bytes>>,
}

/// The webhook client's TLS: the configured CA, or the system's.
fn webhook_tls(ca: Option<&std::path::Path>) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(ca) => {
            for c in crate::certs::load_certs(ca)? {
                roots.add(c)?;
            }
        }
        None => {
            // Unreadable system certificates leave an https hook unverifiable: it then fails
            // (denying publishers) rather than trusting anything.
            for c in rustls_native_certs::load_native_certs().unwrap_or_default() {
                let _ = roots.add(c);
            }
        }
    }
    Ok(
        rustls::ClientConfig::builder_with_provider(crate::certs::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

impl Authenticator {
    /// From validated config.
    pub fn new(cfg: &AuthConfig) -> anyhow::Result<Self> {
        let webhook = match &cfg.webhook {
            Some(w) => Some((w.url.parse()?, Duration::from_millis(w.timeout_ms))),
            None => None,
        };
        let tls = webhook_tls(cfg.webhook.as_ref().and_then(|w| w.ca.as_deref()))?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Authenticator {
            table: cfg
                .streams
                .iter()
                .map(|s| (s.key.clone(), s.name.clone()))
                .collect(),
            webhook,
            client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .build(connector),
        })
    }

    /// The stream name `key` may publish as.
    pub async fn authenticate(&self, app: &str, key: &str) -> Result<String, AuthError> {
        if let Some(name) = self.table.get(key) {
            return Ok(name.clone());
        }
        let Some((uri, timeout)) = &self.webhook else {
            return Err(AuthError::UnknownKey);
        };
        let body = serde_json::json!({ "app": app, "key": key }).to_string();
        let req = hyper::Request::post(uri.clone())
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| AuthError::Webhook(e.to_string()))?;
        let ask = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| AuthError::Webhook(e.to_string()))?;
            let status = resp.status();
            let body = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| AuthError::Webhook(e.to_string()))?
                .to_bytes();
            if !status.is_success() {
                return Err(AuthError::Denied);
            }
            #[derive(serde::Deserialize)]
            struct Allow {
                name: String,
            }
            let allow: Allow = serde_json::from_slice(&body)
                .map_err(|_| AuthError::Webhook("answer is not {\"name\": ...}".into()))?;
            if !crate::config::valid_stream_name(&allow.name) {
                return Err(AuthError::Webhook("answer names an invalid stream".into()));
            }
            Ok(allow.name)
        };
        tokio::time::timeout(*timeout, ask)
            .await
            .map_err(|_| AuthError::Webhook("timed out".into()))?
    }
}
