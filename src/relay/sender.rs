//! The edge side of the relay: one QUIC connection per configured core, kept up with backoff,
//! and one sender per publication on the core that rendezvous hashing picks among the cores
//! whose connection is up.
//!
//! A sender announces the stream on the connection's control stream, then writes each group's
//! video and audio on their own unidirectional streams (audio first, newer groups before older
//! ones). When the chosen core changes (it went away, or a preferred one came back) the sender
//! moves: it re-announces on the new connection and resends from the newest keyframe.

use super::publication::{Publication, Publications, Read};
use super::wire::{self, Announce, Control, GroupHeader};
use crate::config::EdgeRelayConfig;
use crate::media::TrackKind;
use crate::shutdown::Shutdown;
use crate::telemetry::EdgeMetrics;
use anyhow::{anyhow, Context, Result};
use bytes::BytesMut;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Mutex};
use tokio::task::JoinSet;
use tracing::{info, warn, Instrument};

/// An established connection to a core.
#[derive(Clone)]
struct LinkConn {
    conn: quinn::Connection,
    control: Arc<Mutex<quinn::SendStream>>,
    next_stream_id: Arc<AtomicU64>,
    generation: u64,
    /// Publications being sent on this connection, by stream id (for the core's Refuse).
    sending: Arc<std::sync::Mutex<HashMap<u64, Arc<Publication>>>>,
}

struct CoreLink {
    id: String,
    addr: SocketAddr,
    server_name: String,
    state: watch::Sender<Option<LinkConn>>,
}

/// The edge relay: core links plus the placement of publications on them.
pub struct EdgeRelay {
    node_id: String,
    cfg: EdgeRelayConfig,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    links: Vec<Arc<CoreLink>>,
    pubs: Arc<Publications>,
    metrics: EdgeMetrics,
    topology: watch::Sender<u64>,
}

/// QUIC transport settings shared by both ends.
pub fn transport(keepalive: Option<Duration>, idle: Duration) -> Result<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(keepalive);
    t.max_idle_timeout(Some(quinn::IdleTimeout::try_from(idle)?));
    // Many streams, each with several groups in flight.
    t.max_concurrent_uni_streams(4096u32.into());
    t.max_concurrent_bidi_streams(4u32.into());
    t.stream_receive_window((8u32 * 1024 * 1024).into());
    t.receive_window((64u32 * 1024 * 1024).into());
    t.send_window(64 * 1024 * 1024);
    Ok(t)
}

impl EdgeRelay {
    /// Builds the QUIC client from the config (certificates are read here).
    pub fn new(
        node_id: &str,
        cfg: &EdgeRelayConfig,
        pubs: Arc<Publications>,
        metrics: EdgeMetrics,
    ) -> Result<Arc<Self>> {
        let tls = crate::certs::relay_client_config(&cfg.cert, &cfg.key, &cfg.ca)?;
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| anyhow!("relay TLS config unusable for QUIC: {e}"))?;
        let mut client = quinn::ClientConfig::new(Arc::new(quic));
        client.transport_config(Arc::new(transport(
            Some(Duration::from_millis(cfg.keepalive_ms)),
            Duration::from_millis(cfg.idle_timeout_ms),
        )?));
        let bind: SocketAddr = if cfg
            .cores
            .first()
            .and_then(|c| c.addr.parse::<SocketAddr>().ok())
            .is_some_and(|a| a.is_ipv6())
        {
            "[::]:0".parse()?
        } else {
            "0.0.0.0:0".parse()?
        };
        let endpoint = quinn::Endpoint::client(bind).context("binding the relay UDP socket")?;
        let links = cfg
            .cores
            .iter()
            .map(|c| {
                Ok(Arc::new(CoreLink {
                    id: c.id.clone(),
                    addr: c.addr.parse()?,
                    server_name: c.server_name.clone(),
                    state: watch::channel(None).0,
                }))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Arc::new(EdgeRelay {
            node_id: node_id.to_string(),
            cfg: cfg.clone(),
            endpoint,
            client,
            links,
            pubs,
            metrics,
            topology: watch::channel(0).0,
        }))
    }

    /// True while at least one core connection is up.
    pub fn any_core_up(&self) -> bool {
        self.links.iter().any(|l| l.state.borrow().is_some())
    }

    /// Ids of the cores whose QUIC connection is up (the healthy set for placement).
    pub fn up_cores(&self) -> Vec<String> {
        self.links
            .iter()
            .filter(|l| l.state.borrow().is_some())
            .map(|l| l.id.clone())
            .collect()
    }

    /// Runs the links and the placement loop until shutdown.
    pub async fn run(self: Arc<Self>, mut shutdown: Shutdown) {
        let mut tasks = JoinSet::new();
        for (i, link) in self.links.iter().enumerate() {
            let me = self.clone();
            let link = link.clone();
            let sd = shutdown.clone();
            let span = tracing::info_span!("core_link", core = %link.id);
            tasks.spawn(
                async move { me.link_loop(link, sd, i as u64 * 1_000_000).await }.instrument(span),
            );
        }
        tokio::select! {
            _ = self.clone().placement_loop() => {}
            _ = shutdown.wait() => {}
        }
        tasks.abort_all();
        for l in &self.links {
            if let Some(c) = l.state.borrow().as_ref() {
                c.conn.close(0u32.into(), b"edge shutting down");
            }
        }
        self.endpoint.close(0u32.into(), b"edge shutting down");
    }

    fn bump_topology(&self) {
        self.topology.send_modify(|v| *v += 1);
    }

    /// Keeps one connection to `link` up, reconnecting with capped exponential backoff.
    async fn link_loop(self: Arc<Self>, link: Arc<CoreLink>, shutdown: Shutdown, gen_base: u64) {
        let min = Duration::from_millis(self.cfg.reconnect_min_ms);
        let max = Duration::from_millis(self.cfg.reconnect_max_ms);
        let mut delay = min;
        let mut generation = gen_base;
        let up = self.metrics.relay_core_up.with_label_values(&[&link.id]);
        loop {
            if shutdown.is_triggered() {
                return;
            }
            match self.connect(&link).await {
                Ok((conn, control, mut control_recv)) => {
                    generation += 1;
                    info!(addr = %link.addr, "connected to core");
                    delay = min;
                    up.set(1);
                    let sending = Arc::new(std::sync::Mutex::new(HashMap::new()));
                    link.state.send_replace(Some(LinkConn {
                        conn: conn.clone(),
                        control: Arc::new(Mutex::new(control)),
                        next_stream_id: Arc::new(AtomicU64::new(1)),
                        generation,
                        sending: sending.clone(),
                    }));
                    self.bump_topology();
                    // Read what the core sends on the control stream: a refused stream ends
                    // its publication (the publisher is told why).
                    let drain = async move {
                        let mut buf = BytesMut::new();
                        let mut tmp = [0u8; 1024];
                        while let Ok(Some(n)) = control_recv.read(&mut tmp).await {
                            buf.extend_from_slice(&tmp[..n]);
                            while let Ok(Some(m)) = Control::decode(&mut buf) {
                                let Some(Control::Refuse { stream_id, reason }) = m else {
                                    continue;
                                };
                                let p = sending
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .get(&stream_id)
                                    .cloned();
                                if let Some(p) = p {
                                    warn!(stream = %p.name, %reason, "core refused the stream");
                                    p.refuse(reason);
                                }
                            }
                        }
                        std::future::pending::<()>().await
                    };
                    let reason = tokio::select! {
                        e = conn.closed() => e.to_string(),
                        _ = drain => unreachable!(),
                    };
                    warn!(%reason, "connection to core lost");
                    up.set(0);
                    link.state.send_replace(None);
                    self.bump_topology();
                }
                Err(e) => {
                    self.metrics
                        .relay_connect_failures
                        .with_label_values(&[&link.id])
                        .inc();
                    tracing::debug!(error = %format!("{e:#}"), "connecting to core failed");
                }
            }
            // Jitter keeps a fleet of edges from reconnecting in lockstep after a core restart.
            let jitter = rand::random::<f64>() * 0.2 + 0.9;
            tokio::time::sleep(delay.mul_f64(jitter)).await;
            delay = (delay * 2).min(max);
        }
    }

    async fn connect(
        &self,
        link: &CoreLink,
    ) -> Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream)> {
        let connecting =
            self.endpoint
                .connect_with(self.client.clone(), link.addr, &link.server_name)?;
        let idle = Duration::from_millis(self.cfg.idle_timeout_ms);
        let conn = tokio::time::timeout(idle, connecting)
            .await
            .map_err(|_| anyhow!("handshake timed out"))??;
        let (mut send, mut recv) = conn.open_bi().await?;
        let mut buf = BytesMut::new();
        Control::Hello {
            version: wire::VERSION,
            node_id: self.node_id.clone(),
        }
        .encode(&mut buf);
        send.write_all(&buf).await?;
        // The core answers HelloAck; waiting for it proves mutual TLS succeeded end to end.
        let mut rbuf = BytesMut::new();
        let ack = tokio::time::timeout(idle, async {
            loop {
                if let Some(m) = Control::decode(&mut rbuf)? {
                    return Ok::<_, anyhow::Error>(m);
                }
                let mut tmp = [0u8; 512];
                match recv.read(&mut tmp).await? {
                    Some(n) => rbuf.extend_from_slice(&tmp[..n]),
                    None => return Err(anyhow!("core closed the control stream")),
                }
            }
        })
        .await
        .map_err(|_| anyhow!("no HelloAck from core"))??;
        match ack {
            Some(Control::HelloAck { version, .. }) if version == wire::VERSION => {
                Ok((conn, send, recv))
            }
            other => Err(anyhow!("unexpected answer to Hello: {other:?}")),
        }
    }

    /// Assigns each publication to the core rendezvous hashing picks among the up links, and
    /// moves senders when that changes.
    async fn placement_loop(self: Arc<Self>) {
        let mut pubs_rx = self.pubs.subscribe();
        let mut topo_rx = self.topology.subscribe();
        // name → (publication epoch, core id, link generation, sender task)
        let mut assigned: HashMap<String, (u64, String, u64, tokio::task::JoinHandle<()>)> =
            HashMap::new();
        loop {
            let up: Vec<(String, LinkConn)> = self
                .links
                .iter()
                .filter_map(|l| l.state.borrow().clone().map(|c| (l.id.clone(), c)))
                .collect();
            let live = self.pubs.list();
            for p in &live {
                let want = crate::fleet::pick(&p.name, up.iter().map(|(id, _)| id.as_str()));
                let want = want.and_then(|id| up.iter().find(|(i, _)| i == id));
                let current = assigned.get(&p.name);
                let keep = match (current, want) {
                    (Some((epoch, core, gen, task)), Some((id, lc))) => {
                        *epoch == p.epoch
                            && core == id
                            && *gen == lc.generation
                            && !task.is_finished()
                    }
                    _ => false,
                };
                if keep {
                    continue;
                }
                if let Some((epoch, _, _, task)) = assigned.remove(&p.name) {
                    // A finished sender of the same epoch has delivered its stream completely.
                    if epoch == p.epoch && task.is_finished() && p.snapshot().ended {
                        assigned.insert(p.name.clone(), (epoch, String::new(), 0, task));
                        continue;
                    }
                    task.abort();
                }
                if let Some((id, lc)) = want {
                    info!(stream = %p.name, core = %id, "relaying stream to core");
                    let me = self.clone();
                    let generation = lc.generation;
                    let lc = lc.clone();
                    let p2 = p.clone();
                    let span = tracing::info_span!("relay_send", stream = %p.name, core = %id);
                    let task = tokio::spawn(
                        async move {
                            if let Err(e) = me.send_publication(lc, p2).await {
                                tracing::debug!(error = %format!("{e:#}"), "sender stopped");
                            }
                            me.bump_topology();
                        }
                        .instrument(span),
                    );
                    assigned.insert(p.name.clone(), (p.epoch, id.clone(), generation, task));
                }
            }
            assigned.retain(|name, (epoch, _, _, task)| {
                let still = live.iter().any(|p| &p.name == name && p.epoch == *epoch);
                // Let senders of ended publications finish delivering; drop the bookkeeping
                // once they are done.
                still || !task.is_finished()
            });
            tokio::select! {
                r = pubs_rx.changed() => if r.is_err() { return },
                r = topo_rx.changed() => if r.is_err() { return },
            }
        }
    }

    async fn control_send(&self, lc: &LinkConn, msg: Control) -> Result<()> {
        let mut buf = BytesMut::new();
        msg.encode(&mut buf);
        lc.control.lock().await.write_all(&buf).await?;
        Ok(())
    }

    /// Relays one publication over one connection until it ends or the connection fails.
    async fn send_publication(&self, lc: LinkConn, p: Arc<Publication>) -> Result<()> {
        let stream_id = lc.next_stream_id.fetch_add(1, Ordering::Relaxed);
        // Registered while this sender runs, aborted (moved to another core) or not.
        struct Registered<'a>(&'a LinkConn, u64);
        impl Drop for Registered<'_> {
            fn drop(&mut self) {
                self.0
                    .sending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&self.1);
            }
        }
        lc.sending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(stream_id, p.clone());
        let _registered = Registered(&lc, stream_id);
        self.relay_publication(&lc, &p, stream_id).await
    }

    async fn relay_publication(
        &self,
        lc: &LinkConn,
        p: &Arc<Publication>,
        stream_id: u64,
    ) -> Result<()> {
        let mut rx = p.subscribe();
        let mut announced = 0;
        let start_seq = p.start_seq();
        let mut next_seq = start_seq;
        let mut writers = JoinSet::new();
        loop {
            let snap = p.snapshot();
            if snap.info_version != announced {
                self.control_send(
                    lc,
                    Control::Announce(Announce {
                        stream_id,
                        name: p.name.clone(),
                        epoch: p.epoch,
                        config_version: snap.info_version,
                        start_seq,
                        info: snap.info.clone(),
                    }),
                )
                .await?;
                announced = snap.info_version;
            }
            if let Some((oldest, newest)) = snap.groups {
                // Groups evicted before this sender reached them are skipped.
                next_seq = next_seq.max(oldest);
                while next_seq <= newest {
                    for track in [TrackKind::Audio, TrackKind::Video] {
                        // Pin now, before the task runs, so the group cannot be dropped first.
                        if !p.pin(next_seq) {
                            continue;
                        }
                        let w = GroupWriter {
                            conn: lc.conn.clone(),
                            p: p.clone(),
                            stream_id,
                            seq: next_seq,
                            track,
                            metrics: self.metrics.clone(),
                        };
                        writers.spawn(w.run());
                    }
                    next_seq += 1;
                }
            }
            // Reap finished writers; a connection error ends this sender.
            while let Some(r) = writers.try_join_next() {
                r.map_err(|e| anyhow!("group writer panicked: {e}"))??;
            }
            if snap.ended {
                while let Some(r) = writers.join_next().await {
                    r.map_err(|e| anyhow!("group writer panicked: {e}"))??;
                }
                self.control_send(lc, Control::End { stream_id }).await?;
                info!("stream ended; relay finished");
                return Ok(());
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return Ok(()) },
                e = lc.conn.closed() => return Err(anyhow!("connection closed: {e}")),
                Some(r) = writers.join_next(), if !writers.is_empty() => {
                    r.map_err(|e| anyhow!("group writer panicked: {e}"))??;
                }
            }
        }
    }
}

/// Writes one track of one group on its own unidirectional stream.
struct GroupWriter {
    conn: quinn::Connection,
    p: Arc<Publication>,
    stream_id: u64,
    seq: u64,
    track: TrackKind,
    metrics: EdgeMetrics,
}

impl GroupWriter {
    async fn run(self) -> Result<()> {
        let r = self.write().await;
        self.p.unpin(self.seq);
        r
    }

    async fn write(&self) -> Result<()> {
        let mut rx = self.p.subscribe();
        let mut sent = 0usize;
        let mut prev_dts = 0i64;
        let counter = self
            .metrics
            .relay_frames_sent
            .with_label_values(&[&self.p.name, self.track.as_str()]);
        // Every group opens a stream per track, even one without frames of that track, so that
        // its end tells the core not to wait for it.
        let mut s = self.conn.open_uni().await?;
        // Newer groups first; audio above every video group.
        let base = (self.seq % (1 << 29)) as i32;
        s.set_priority(match self.track {
            TrackKind::Audio => base + (1 << 30),
            TrackKind::Video => base,
        })?;
        let mut buf = BytesMut::new();
        GroupHeader {
            stream_id: self.stream_id,
            seq: self.seq,
            track: self.track,
            config_version: self.p.group_config_version(self.seq).unwrap_or(0),
        }
        .encode(&mut buf);
        s.write_all(&buf).await?;
        loop {
            rx.borrow_and_update();
            match self.p.read(self.seq, self.track, sent) {
                Read::Evicted => {
                    let _ = s.reset(1u32.into());
                    self.metrics
                        .relay_groups_skipped
                        .with_label_values(&[&self.p.name])
                        .inc();
                    return Ok(());
                }
                Read::Frames { frames, closed } => {
                    if !frames.is_empty() {
                        let mut buf = BytesMut::new();
                        for f in &frames {
                            wire::encode_frame(&mut buf, f, prev_dts);
                            prev_dts = f.dts;
                        }
                        s.write_all(&buf).await?;
                        sent += frames.len();
                        counter.inc_by(frames.len() as u64);
                        continue;
                    }
                    if closed {
                        s.finish()?;
                        // Wait until the core has everything, so that End follows the data.
                        let _ = s.stopped().await;
                        return Ok(());
                    }
                }
            }
            if rx.changed().await.is_err() {
                return Ok(());
            }
        }
    }
}
