//! The edge's playback cache: a Pingora caching proxy in front of the cores' LL-HLS origins.
//!
//! `policy` decides (object kinds, cache key, lifetimes), `storage` keeps objects (moka, with
//! streaming partial writes), `proxy` wires them into Pingora's phases, `server` accepts viewer
//! connections (HTTP/1.1, h2c, and HTTPS with HTTP/2 by ALPN) with limits.

pub mod access;
pub mod policy;
pub mod proxy;
pub mod server;
pub mod storage;
pub mod web;

use crate::config::{EdgeRelayConfig, PlaybackConfig};
use crate::shutdown::Shutdown;
use crate::telemetry::EdgeMetrics;
use anyhow::{anyhow, Context, Result};
use pingora::apps::HttpServerOptions;
use pingora::listeners::tls::Acceptor;
use pingora::server::configuration::ServerConf;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;

/// Binds the playback listeners and starts serving; returns the bound addresses
/// ("http", "https").
pub async fn start(
    cfg: &PlaybackConfig,
    relay: &EdgeRelayConfig,
    health: proxy::Health,
    metrics: EdgeMetrics,
    tasks: &mut JoinSet<()>,
    shutdown: Shutdown,
) -> Result<Vec<(&'static str, SocketAddr)>> {
    let cores = relay
        .cores
        .iter()
        .map(|c| {
            let o = c
                .origin
                .as_deref()
                .ok_or_else(|| anyhow!("core {} has no origin address", c.id))?;
            Ok((c.id.clone(), o.parse()?))
        })
        .collect::<Result<Vec<_>>>()?;
    let storage: &'static storage::MokaStorage =
        Box::leak(Box::new(storage::MokaStorage::new(cfg.cache_bytes)));
    let settings = proxy::ProxySettings {
        cores,
        upstream_timeout: Duration::from_millis(cfg.upstream_timeout_ms),
        write_timeout: Duration::from_millis(cfg.write_timeout_ms),
        idle_timeout: Duration::from_millis(cfg.idle_timeout_ms),
        player: cfg.player,
        access: Arc::new(cfg.access.build()),
    };
    let conf = Arc::new(ServerConf {
        // Kept-alive connections to the origins, enough for many streams' blocking requests.
        upstream_keepalive_pool_size: 1024,
        ..ServerConf::default()
    });
    let mut app = pingora::proxy::http_proxy(
        &conf,
        proxy::EdgeProxy::new(storage, settings, health, metrics.clone()),
    );
    let mut opts = HttpServerOptions::default();
    opts.h2c = true;
    opts.h2_idle_timeout = Some(Duration::from_millis(cfg.idle_timeout_ms));
    app.server_options = Some(opts);
    let app = Arc::new(app);
    let slots = crate::limits::ConnLimiter::new(cfg.max_connections, cfg.max_connections_per_ip);
    let limits = server::Limits {
        header_timeout: Duration::from_millis(cfg.header_timeout_ms),
        idle_timeout: Duration::from_millis(cfg.idle_timeout_ms),
        write_timeout: Duration::from_millis(cfg.write_timeout_ms),
    };
    let refused: crate::limits::OnTrip = {
        let m = metrics.clone();
        Arc::new(move |reason| {
            if reason == "connection_limit" {
                m.http_refused.inc();
            }
            m.edge_refused.with_label_values(&[reason]).inc();
        })
    };
    let mut addrs = vec![];
    let l = crate::roles::bind("playback.listen", &cfg.listen).await?;
    addrs.push(("http", l.local_addr()?));
    tasks.spawn(server::serve(
        l,
        None,
        app.clone(),
        slots.clone(),
        limits,
        refused.clone(),
        shutdown.clone(),
    ));
    if let Some(listen) = &cfg.tls_listen {
        let (Some(cert), Some(key)) = (&cfg.cert, &cfg.key) else {
            return Err(anyhow!(
                "playback.tls_listen needs playback.cert and playback.key"
            ));
        };
        let tls = crate::certs::server_config(cert, key, &[b"h2", b"http/1.1"])
            .with_context(|| format!("playback certificate {}", cert.display()))?;
        let acceptor = Arc::new(Acceptor::from_server_config(Arc::new(tls)));
        let l = crate::roles::bind("playback.tls_listen", listen).await?;
        addrs.push(("https", l.local_addr()?));
        tasks.spawn(server::serve(
            l,
            Some(acceptor),
            app,
            slots,
            limits,
            refused,
            shutdown,
        ));
    }
    Ok(addrs)
}
