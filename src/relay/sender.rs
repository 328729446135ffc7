//! The edge side of the relay: one QUIC connection per configured core, kept up with backoff,
//! and one sender per publication on the core that rendezvous hashing picks among the cores
//! whose connection is up.
//!
//! A sender announces the stream on the connection's control stream, then writes each group's
//! audio on its own unidirectional stream as soon as the group opens (above all video), and the
//! video group after group, oldest first, skipping whole groups that became stale when the path
//! cannot carry the stream (docs/relay-protocol.md, "Congestion and loss"). When the chosen core
//! changes (it went away, or a preferred one came back) the sender moves: it re-announces on the
//! new connection and resends from the newest keyframe.

use super::publication::{Publication, Publications, Read};
use super::wire::{self, Announce, Control, GroupHeader};
use crate::config::{Congestion, EdgeRelayConfig};
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
pub fn transport(
    keepalive: Option<Duration>,
    idle: Duration,
    congestion: Congestion,
) -> Result<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(keepalive);
    t.max_idle_timeout(Some(quinn::IdleTimeout::try_from(idle)?));
    // Many streams, each with several groups in flight.
    t.max_concurrent_uni_streams(4096u32.into());
    t.max_concurrent_bidi_streams(4u32.into());
    t.stream_receive_window((8u32 * 1024 * 1024).into());
    t.receive_window((64u32 * 1024 * 1024).into());
    // The edge lowers this to follow the congestion window once connected (`watch_link`).
    t.send_window(MAX_SEND_WINDOW);
    match congestion {
        Congestion::Bbr => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
        }
        Congestion::Cubic => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
        }
        Congestion::Newreno => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default()))
        }
    };
    Ok(t)
}

/// Bounds of the send window the edge keeps near twice the congestion window: what QUIC holds
/// unsent is then a fraction of a second, and a backlog stays in the publication's buffer,
/// where the sender can still skip whole groups.
const MIN_SEND_WINDOW: u64 = 64 * 1024;
const MAX_SEND_WINDOW: u64 = 64 * 1024 * 1024;

/// Priority of a group's stream: audio above every video group; within a track older groups
/// first, so that retransmissions of the group the core is waiting for are never queued
/// behind newer data.
fn priority(track: TrackKind, seq: u64) -> i32 {
    let older_first = -((seq % (1 << 29)) as i32);
    match track {
        TrackKind::Audio => older_first + (1 << 30),
        TrackKind::Video => older_first,
    }
}

/// A group pinned for a writer: unpinned when dropped, so a sender aborted (moved to another
/// core) frees its groups at once.
struct Pinned {
    p: Arc<Publication>,
    seq: u64,
}

impl Pinned {
    fn new(p: &Arc<Publication>, seq: u64) -> Option<Self> {
        p.pin(seq).then(|| Pinned { p: p.clone(), seq })
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        self.p.unpin(self.seq);
    }
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
            cfg.congestion,
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
                        _ = self.watch_link(&link.id, &conn) => unreachable!(),
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

    /// Samples the connection's path: keeps the send window near twice the congestion window
    /// and exports RTT, congestion window, loss and throughput, so that an operator sees why a
    /// link falls behind.
    async fn watch_link(&self, core: &str, conn: &quinn::Connection) {
        let m = &self.metrics;
        let l = [core];
        let (rtt, cwnd, window, loss, rate) = (
            m.relay_link_rtt.with_label_values(&l),
            m.relay_link_cwnd.with_label_values(&l),
            m.relay_link_send_window.with_label_values(&l),
            m.relay_link_loss.with_label_values(&l),
            m.relay_link_throughput.with_label_values(&l),
        );
        let (sent_packets, lost_packets, sent_bytes, events) = (
            m.relay_link_sent_packets.with_label_values(&l),
            m.relay_link_lost_packets.with_label_values(&l),
            m.relay_link_sent_bytes.with_label_values(&l),
            m.relay_link_congestion_events.with_label_values(&l),
        );
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut prev = conn.stats();
        let mut second = (prev, std::time::Instant::now());
        let mut last_rate = 0u64;
        loop {
            tick.tick().await;
            let st = conn.stats();
            // Two congestion windows, or a quarter second at the rate of the last second
            // (BBR's window is small on a short path, where delayed acknowledgements would
            // then throttle the sender; this lets the window grow with what is sent).
            let w = (2 * st.path.cwnd)
                .max(last_rate / 4)
                .clamp(MIN_SEND_WINDOW, MAX_SEND_WINDOW);
            conn.set_send_window(w);
            sent_packets.inc_by(st.path.sent_packets.saturating_sub(prev.path.sent_packets));
            lost_packets.inc_by(st.path.lost_packets.saturating_sub(prev.path.lost_packets));
            sent_bytes.inc_by(st.udp_tx.bytes.saturating_sub(prev.udp_tx.bytes));
            events.inc_by(
                st.path
                    .congestion_events
                    .saturating_sub(prev.path.congestion_events),
            );
            prev = st;
            let dt = second.1.elapsed().as_secs_f64();
            if dt >= 1.0 {
                let (s0, _) = second;
                let sent = st.path.sent_packets.saturating_sub(s0.path.sent_packets);
                let lost = st.path.lost_packets.saturating_sub(s0.path.lost_packets);
                loss.set(if sent == 0 {
                    0.0
                } else {
                    lost as f64 / sent as f64
                });
                let bytes_per_s = st.udp_tx.bytes.saturating_sub(s0.udp_tx.bytes) as f64 / dt;
                last_rate = bytes_per_s as u64;
                rate.set(bytes_per_s * 8.0);
                rtt.set(st.path.rtt.as_secs_f64());
                cwnd.set(st.path.cwnd as i64);
                window.set(w as i64);
                second = (st, std::time::Instant::now());
            }
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
        let (start_seq, unsent) = p.start_seq();
        if unsent > 0 {
            // Groups that arrived while the core was unreachable and were never sent: the
            // stream resumes from the newest keyframe.
            self.metrics
                .relay_groups_skipped
                .with_label_values(&[&p.name, "outage"])
                .inc_by(unsent);
        }
        let mut next_audio = start_seq;
        let mut writers = JoinSet::new();
        // Video goes one group at a time, in order: what the path cannot take yet waits in the
        // publication, where a group can still be skipped whole. Started once the stream is
        // announced.
        let mut video = Some(VideoSender {
            conn: lc.conn.clone(),
            p: p.clone(),
            stream_id,
            skip_after_us: self.cfg.skip_after_ms * 1000,
            metrics: self.metrics.clone(),
            finishing: JoinSet::new(),
            last_warn: None,
            skipped_since_warn: 0,
        });
        loop {
            let snap = p.snapshot();
            // The first Announce waits for the first media (or the end): encoders send every
            // sequence header before it, so the core starts with the whole configuration
            // rather than restarting its output (a discontinuity) when the second one arrives.
            let ready = announced != 0 || snap.groups.is_some() || snap.ended;
            if ready && snap.info_version != announced {
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
            if announced != 0 {
                if let Some(v) = video.take() {
                    writers.spawn(v.run(start_seq));
                }
            }
            // Audio: a stream per group as soon as it opens, above all video.
            if let Some((oldest, newest)) = snap.groups {
                // Groups dropped before their audio writer started still get a stream, so
                // that the core does not wait for them.
                for seq in next_audio.max(oldest.saturating_sub(MAX_SKIP_NOTICES))..oldest {
                    let s = empty_group(&lc.conn, p, stream_id, seq, TrackKind::Audio).await?;
                    writers.spawn(async move {
                        let _ = s.stopped().await;
                        Ok(())
                    });
                }
                next_audio = next_audio.max(oldest);
                while next_audio <= newest {
                    // Pin now, before the task runs, so the group cannot be dropped first.
                    if let Some(pin) = Pinned::new(p, next_audio) {
                        let w = GroupWriter {
                            conn: lc.conn.clone(),
                            p: p.clone(),
                            stream_id,
                            seq: next_audio,
                            track: TrackKind::Audio,
                            metrics: self.metrics.clone(),
                        };
                        writers.spawn(async move {
                            let s = w.write().await;
                            drop(pin);
                            // Wait until the core has everything, so that End follows the data.
                            // (Audio cut short by eviction is counted with its video group.)
                            if let Some(s) = s? {
                                let _ = s.stopped().await;
                            }
                            Ok(())
                        });
                    } else {
                        let s = empty_group(&lc.conn, p, stream_id, next_audio, TrackKind::Audio)
                            .await?;
                        writers.spawn(async move {
                            let _ = s.stopped().await;
                            Ok(())
                        });
                    }
                    next_audio += 1;
                    p.reach(TrackKind::Audio, next_audio);
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

/// Sends a publication's video, group after group. When a group's turn comes more than
/// `skip_after_us` after its keyframe arrived and a newer group exists, it is skipped whole
/// (an empty stream tells the core not to wait for it): the path cannot carry the stream, and
/// the newest group is what viewers need.
struct VideoSender {
    conn: quinn::Connection,
    p: Arc<Publication>,
    stream_id: u64,
    skip_after_us: u64,
    metrics: EdgeMetrics,
    /// Streams written and finished, until the core has acknowledged all of them.
    finishing: JoinSet<()>,
    last_warn: Option<std::time::Instant>,
    skipped_since_warn: u64,
}

/// Groups a sender that fell behind announces as skipped, one empty stream each; further
/// ones are passed over by the core's restart rule.
const MAX_SKIP_NOTICES: u64 = 64;

/// Opens group `seq`'s stream for `track` at its priority and writes the group header.
async fn open_group(
    conn: &quinn::Connection,
    p: &Publication,
    stream_id: u64,
    seq: u64,
    track: TrackKind,
) -> Result<quinn::SendStream> {
    let mut s = conn.open_uni().await?;
    s.set_priority(priority(track, seq))?;
    let mut buf = BytesMut::new();
    GroupHeader {
        stream_id,
        seq,
        track,
        config_version: p.group_config_version(seq).unwrap_or(0),
    }
    .encode(&mut buf);
    s.write_all(&buf).await?;
    Ok(s)
}

/// A group stream with its header and no frames: the core passes the group at once instead
/// of waiting for it.
async fn empty_group(
    conn: &quinn::Connection,
    p: &Publication,
    stream_id: u64,
    seq: u64,
    track: TrackKind,
) -> Result<quinn::SendStream> {
    let mut s = open_group(conn, p, stream_id, seq, track).await?;
    s.finish()?;
    Ok(s)
}

impl VideoSender {
    async fn run(mut self, mut seq: u64) -> Result<()> {
        let mut rx = self.p.subscribe();
        loop {
            // Streams the core has acknowledged in full.
            while self.finishing.try_join_next().is_some() {}
            rx.borrow_and_update();
            let snap = self.p.snapshot();
            if let Some((oldest, newest)) = snap.groups {
                if seq < oldest {
                    // Dropped from the buffer before their turn (the hard bounds of the
                    // publication): told to the core (the last few; past those the core
                    // follows the sender once its current group has stalled), counted.
                    for s in seq.max(oldest.saturating_sub(MAX_SKIP_NOTICES))..oldest {
                        self.skip(s).await?;
                    }
                    self.count_skipped("evicted", oldest - seq);
                    seq = oldest;
                }
                if seq <= newest {
                    let opened = self.p.group_opened_us(seq);
                    let waited =
                        opened.map_or(0, |o| crate::media::now_unix_us().saturating_sub(o));
                    if seq < newest && waited > self.skip_after_us {
                        self.skip(seq).await?;
                        self.count_skipped("behind", 1);
                        self.warn_behind(waited);
                    } else if let Some(pin) = Pinned::new(&self.p, seq) {
                        let w = GroupWriter {
                            conn: self.conn.clone(),
                            p: self.p.clone(),
                            stream_id: self.stream_id,
                            seq,
                            track: TrackKind::Video,
                            metrics: self.metrics.clone(),
                        };
                        let r = w.write().await;
                        drop(pin);
                        match r? {
                            Some(s) => {
                                self.finishing.spawn(async move {
                                    let _ = s.stopped().await;
                                });
                            }
                            None => self.count_skipped("evicted", 1),
                        }
                    } else {
                        self.skip(seq).await?;
                        self.count_skipped("evicted", 1);
                    }
                    seq += 1;
                    self.p.reach(TrackKind::Video, seq);
                    continue;
                }
            }
            if snap.ended {
                while self.finishing.join_next().await.is_some() {}
                return Ok(());
            }
            if rx.changed().await.is_err() {
                return Ok(());
            }
        }
    }

    /// Tells the core group `seq` has no video: a stream with its header and nothing else.
    async fn skip(&mut self, seq: u64) -> Result<()> {
        let s = empty_group(&self.conn, &self.p, self.stream_id, seq, TrackKind::Video).await?;
        self.finishing.spawn(async move {
            let _ = s.stopped().await;
        });
        Ok(())
    }

    fn count_skipped(&self, reason: &str, n: u64) {
        self.metrics
            .relay_groups_skipped
            .with_label_values(&[&self.p.name, reason])
            .inc_by(n);
    }

    fn warn_behind(&mut self, waited_us: u64) {
        self.skipped_since_warn += 1;
        if self
            .last_warn
            .is_some_and(|t| t.elapsed() < Duration::from_secs(10))
        {
            return;
        }
        warn!(
            skipped = self.skipped_since_warn,
            behind_ms = waited_us / 1000,
            "path to the core cannot carry the stream: groups of pictures skipped"
        );
        self.last_warn = Some(std::time::Instant::now());
        self.skipped_since_warn = 0;
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
    /// Writes the group's frames of this track as they arrive, then finishes the stream and
    /// returns it (to wait for the core's acknowledgement). None if the group was dropped
    /// from the buffer before all of it was written: the stream then ends where it got to,
    /// which the core reads as the group's end.
    async fn write(&self) -> Result<Option<quinn::SendStream>> {
        let mut rx = self.p.subscribe();
        let mut sent = 0usize;
        let mut prev_dts = 0i64;
        let counter = self
            .metrics
            .relay_frames_sent
            .with_label_values(&[&self.p.name, self.track.as_str()]);
        // Every group opens a stream per track, even one without frames of that track, so that
        // its end tells the core not to wait for it.
        let mut s = open_group(&self.conn, &self.p, self.stream_id, self.seq, self.track).await?;
        loop {
            rx.borrow_and_update();
            match self.p.read(self.seq, self.track, sent) {
                Read::Evicted => {
                    s.finish()?;
                    return Ok(None);
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
                        return Ok(Some(s));
                    }
                }
            }
            if rx.changed().await.is_err() {
                s.finish()?;
                return Ok(Some(s));
            }
        }
    }
}
