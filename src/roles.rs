//! Wiring of each role: binds the listeners a config names and starts the tasks.
//!
//! Used by `livepop edge`, `livepop core` and (later) `livepop demo`; tests use the binary.

use crate::config::{CoreConfig, EdgeConfig};
use crate::ingest::auth::Authenticator;
use crate::ingest::server::{self as ingest, IngestContext};
use crate::relay::publication::Publications;
use crate::relay::receiver::{CoreRelay, StreamTable};
use crate::relay::sender::EdgeRelay;
use crate::shutdown::Shutdown;
use crate::telemetry::{CoreMetrics, EdgeMetrics};
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinSet;
use tracing::info;

/// A started role: its bound addresses and its tasks.
pub struct Running {
    /// Named addresses ("rtmp", "rtmps", "admin", "relay").
    pub addrs: Vec<(&'static str, SocketAddr)>,
    /// The role's tasks; they end after shutdown is triggered.
    pub tasks: JoinSet<()>,
}

/// Listen backlog of every TCP listener; the kernel caps it at `net.core.somaxconn`. Tokio's
/// default (1024) overflows when a crowd connects at once (a stream going live, players
/// reconnecting after a blip): the kernel then drops handshakes and falls back to SYN cookies
/// and retransmits, which costs those viewers a second or more and can reset a connection.
const LISTEN_BACKLOG: u32 = 65_535;

/// Binds a TCP listener on `addr` (`what` names the config key in errors).
pub(crate) async fn bind(what: &str, addr: &str) -> Result<TcpListener> {
    let ctx = || format!("binding {what} on {addr}");
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await.with_context(ctx)? {
        match listen_on(a) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.map_or_else(|| anyhow::anyhow!("no address"), Into::into)).with_context(ctx)
}

fn listen_on(a: SocketAddr) -> std::io::Result<TcpListener> {
    let s = if a.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As std and tokio do: a restarted server can bind while old connections linger.
    s.set_reuseaddr(true)?;
    s.bind(a)?;
    s.listen(LISTEN_BACKLOG)
}

/// Starts an edge: RTMP(S) ingest, the relay to the cores, the admin server.
pub async fn start_edge(cfg: EdgeConfig, shutdown: Shutdown) -> Result<Running> {
    let metrics = EdgeMetrics::new();
    let pubs = Arc::new(Publications::new(
        cfg.rtmp.on_duplicate,
        cfg.relay.max_buffered_bytes,
    ));
    let relay = EdgeRelay::new(&cfg.node_id, &cfg.relay, pubs.clone(), metrics.clone())?;
    let ctx = IngestContext::new(
        cfg.rtmp.clone(),
        Authenticator::new(&cfg.auth)?,
        pubs,
        metrics.clone(),
    );
    let mut tasks = JoinSet::new();
    let mut addrs = vec![];

    let l = bind("rtmp.listen", &cfg.rtmp.listen).await?;
    addrs.push(("rtmp", l.local_addr()?));
    tasks.spawn(ingest::serve(l, None, ctx.clone(), shutdown.clone()));

    if let Some(t) = &cfg.rtmps {
        let tls = crate::certs::server_config(&t.cert, &t.key, &[])
            .with_context(|| format!("rtmps certificate {}", t.cert.display()))?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let l = bind("rtmps.listen", &t.listen).await?;
        addrs.push(("rtmps", l.local_addr()?));
        tasks.spawn(ingest::serve(
            l,
            Some(acceptor),
            ctx.clone(),
            shutdown.clone(),
        ));
    }

    if let Some(p) = &cfg.playback {
        let r = relay.clone();
        let health: crate::edge::proxy::Health = Arc::new(move || r.up_cores());
        let bound = crate::edge::start(
            p,
            &cfg.relay,
            health,
            metrics.clone(),
            &mut tasks,
            shutdown.clone(),
        )
        .await?;
        addrs.extend(bound);
    }

    let admin = bind("admin.listen", &cfg.admin.listen).await?;
    addrs.push(("admin", admin.local_addr()?));
    let r2 = relay.clone();
    tasks.spawn(crate::admin::serve(
        admin,
        cfg.admin.limits(),
        metrics.registry.clone(),
        Arc::new(move || r2.any_core_up()),
        metrics.admin_refused.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(relay.run(shutdown.clone()));
    for (n, a) in &addrs {
        info!(listener = n, addr = %a, "edge listening");
    }
    Ok(Running { addrs, tasks })
}

/// Starts a core: the relay endpoint, optional recording, the admin server.
pub async fn start_core(cfg: CoreConfig, shutdown: Shutdown) -> Result<Running> {
    let metrics = CoreMetrics::new();
    let table = StreamTable::new(metrics.clone());
    if let Some(rec) = &cfg.record {
        let dir = rec.dir.clone();
        let errors = metrics.record_errors.clone();
        table.on_new_stream(Arc::new(move |s, rx| {
            crate::record::spawn(dir.clone(), s, rx, errors.clone())
        }));
    }
    let origin = cfg.origin.as_ref().map(|o| {
        crate::origin::Origin::new(o.clone(), cfg.transcode.clone(), metrics.clone(), &table)
    });
    let relay = Arc::new(CoreRelay::bind(&cfg.relay, table, metrics.clone())?);
    let mut tasks = JoinSet::new();
    let mut addrs = vec![("relay", relay.local_addr()?)];
    if let (Some(origin), Some(oc)) = (origin, &cfg.origin) {
        let l = bind("origin.listen", &oc.listen).await?;
        addrs.push(("origin", l.local_addr()?));
        tasks.spawn(origin.serve(l, shutdown.clone()));
    }
    let admin = bind("admin.listen", &cfg.admin.listen).await?;
    addrs.push(("admin", admin.local_addr()?));
    tasks.spawn(crate::admin::serve(
        admin,
        cfg.admin.limits(),
        metrics.registry.clone(),
        Arc::new(|| true),
        metrics.admin_refused.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(relay.run(shutdown.clone()));
    for (n, a) in &addrs {
        info!(listener = n, addr = %a, "core listening");
    }
    Ok(Running { addrs, tasks })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The listen backlog the kernel reports for a listening port (`ss`, iproute2).
    fn backlog(port: u16) -> u32 {
        let out = std::process::Command::new("ss")
            .args(["-Hltn", &format!("sport = :{port}")])
            .output()
            .expect("ss (iproute2) runs");
        let text = String::from_utf8_lossy(&out.stdout);
        // State, Recv-Q (queued now), Send-Q (the backlog), local, peer.
        let f: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(f.first(), Some(&"LISTEN"), "ss printed {text:?}");
        f[2].parse().unwrap()
    }

    /// A burst of a thousand viewers fits in the accept queue, so none waits on a SYN retransmit
    /// (a second) or a SYN cookie; the kernel's own cap is the only limit.
    #[tokio::test]
    async fn listeners_queue_what_the_kernel_allows() {
        let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let l = bind("test.listen", "127.0.0.1:0").await.unwrap();
        let got = backlog(l.local_addr().unwrap().port());
        assert_eq!(got, LISTEN_BACKLOG.min(somaxconn));
        // Not implied by the line above, which follows the constant: a thousand-viewer burst
        // needs room whatever the constant says.
        assert!(somaxconn < 4096 || got >= 4096, "backlog {got}");
        let e = bind("test.listen", &l.local_addr().unwrap().to_string())
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains("binding test.listen on 127.0.0.1:"));
    }
}
