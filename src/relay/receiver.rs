//! The core side of the relay: accepts edges (mutual TLS against the fleet CA, the Hello's
//! node id checked against the certificate), reads their control and group streams, drops frames already received (an edge resends from the last
//! keyframe after a reconnect) and publishes each stream's frames to the core's consumers.
//!
//! Ordering policy per track: frames are delivered in (group, index) order. Within a group they
//! must be contiguous; a frame of a group older than the newest one delivered is late and is
//! dropped (counted), so a stalled old group never holds back a newer one.
//!
//! Isolation between edges: a stream belongs to the edge (node id) that announced it. Another
//! edge's announce of a live stream follows `relay.on_duplicate` while the owner is connected;
//! an edge replaces its own streams with a newer epoch. Epochs from the future (past a clock
//! skew allowance) are refused, so no epoch pins a stream; `relay.max_streams_per_edge` bounds
//! what one edge can make the core run.

use super::order::{TrackOrder, Verdict};
use super::wire::{self, Control, GroupDecoder, GroupItem};
use crate::config::{CoreRelayConfig, DuplicatePolicy};
use crate::media::{Frame, StreamInfo, TrackKind};
use crate::shutdown::Shutdown;
use crate::telemetry::CoreMetrics;
use anyhow::{anyhow, Context, Result};
use bytes::BytesMut;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, Notify};
use tracing::{info, warn, Instrument};

/// What consumers of a stream receive.
#[derive(Debug, Clone)]
pub enum StreamEvent {
    /// Codec configuration (first, and again whenever it changes).
    Info {
        /// Version, referenced by frames.
        version: u64,
        /// The configuration.
        info: StreamInfo,
    },
    /// A frame, in order per track.
    Frame(Frame),
    /// The stream ended (publisher stopped, or its edge did not come back in time).
    End,
}

#[derive(Debug, Default)]
struct LiveState {
    infos: BTreeMap<u64, StreamInfo>,
    order: [Option<TrackOrder>; 2],
    attached: u64,
    open_groups: usize,
    ended: bool,
}

/// One stream being received by this core.
pub struct LiveStream {
    /// Public name.
    pub name: String,
    /// Publishing session id from the edge.
    pub epoch: u64,
    /// Node id of the edge that announced it (from its certificate).
    pub owner: String,
    state: Mutex<LiveState>,
    tx: broadcast::Sender<StreamEvent>,
    groups_done: Notify,
    /// Woken when a codec configuration version arrives.
    info_added: Notify,
    reorder_wait_us: u64,
}

/// Bytes of partly received frames one edge connection may hold across its group streams
/// (received data is out of QUIC's flow control once read).
const MAX_CONN_BUFFERED: usize = 256 << 20;
/// Connections one edge (node id) may hold at once: one per core, plus a reconnect overlapping
/// the connection it replaces.
const MAX_CONNS_PER_EDGE: usize = 4;
/// Epochs are microseconds since the Unix epoch at publish time: one further ahead of this
/// core's clock than this is refused.
const MAX_EPOCH_AHEAD_US: u64 = 600_000_000;

/// Who may announce what, at this core.
#[derive(Debug, Clone, Copy)]
pub struct AnnouncePolicy {
    /// A second edge announcing a stream whose owner is connected.
    pub on_duplicate: DuplicatePolicy,
    /// Live streams per edge node id.
    pub max_streams_per_edge: usize,
    /// How long frames of a newer group wait for an older group's stream to finish (µs).
    pub reorder_wait_us: u64,
}

impl Default for AnnouncePolicy {
    fn default() -> Self {
        AnnouncePolicy {
            on_duplicate: DuplicatePolicy::Reject,
            max_streams_per_edge: usize::MAX,
            reorder_wait_us: 1_500_000,
        }
    }
}

/// Why an announce was refused: (metric label, message for the edge).
type Refusal = (&'static str, String);

fn track_index(t: TrackKind) -> usize {
    match t {
        TrackKind::Video => 0,
        TrackKind::Audio => 1,
    }
}

impl LiveStream {
    fn lock(&self) -> MutexGuard<'_, LiveState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A receiver of this stream's events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<StreamEvent> {
        self.tx.subscribe()
    }

    /// The newest stream info.
    pub fn info(&self) -> Option<StreamInfo> {
        self.lock().infos.values().next_back().cloned()
    }

    fn add_info(&self, version: u64, info: StreamInfo) {
        let mut s = self.lock();
        if s.infos.contains_key(&version) {
            return;
        }
        s.infos.insert(version, info.clone());
        // Keep a few versions: groups in flight may still reference an older one.
        while s.infos.len() > 4 {
            s.infos.pop_first();
        }
        // Sent under the lock: a group reader that sees this version afterwards delivers its
        // frames after the Info.
        let _ = self.tx.send(StreamEvent::Info { version, info });
        drop(s);
        self.info_added.notify_waiters();
    }

    /// Waits (at most `limit`) until configuration `version` (or a newer one) is known.
    /// Announces travel on the control stream, which QUIC does not order with group streams:
    /// without this wait the first frames after a configuration change (the first keyframe of
    /// a publish, a new sequence header) could reach consumers before the configuration they
    /// need.
    async fn wait_info(&self, version: u64, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let added = self.info_added.notified();
            if self
                .lock()
                .infos
                .keys()
                .next_back()
                .is_some_and(|v| *v >= version)
            {
                return true;
            }
            tokio::select! {
                _ = added => {}
                _ = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }

    /// Sends frames to consumers. Called with the state lock held, so that frames released by
    /// one group's reader and frames delivered by another's reach consumers in order.
    fn send_frames(&self, out: Vec<Frame>) {
        for f in out {
            let _ = self.tx.send(StreamEvent::Frame(f));
        }
    }

    /// A sender (re)starts at group `start` for this stream.
    fn restart(&self, start: u64) {
        let mut s = self.lock();
        let mut out = vec![];
        for (i, track) in [TrackKind::Video, TrackKind::Audio].into_iter().enumerate() {
            match &mut s.order[i] {
                Some(o) => o.restart(start, monotonic_us(), &mut out),
                None => s.order[i] = Some(TrackOrder::new(track, start, self.reorder_wait_us)),
            }
        }
        self.send_frames(out);
    }

    /// Offers frame number `idx` of group `seq`; returns the verdict and how many frames
    /// (this one and any it released) were delivered.
    pub fn offer(&self, seq: u64, idx: u64, frame: Frame, now_us: u64) -> (Verdict, usize) {
        let mut s = self.lock();
        if s.ended {
            return (Verdict::Late, 0);
        }
        let t = track_index(frame.track);
        let track = frame.track;
        let mut out = vec![];
        let wait = self.reorder_wait_us;
        let order = s.order[t].get_or_insert_with(|| TrackOrder::new(track, seq, wait));
        let v = order.offer(seq, idx, frame, now_us, &mut out);
        let n = out.len();
        self.send_frames(out);
        (v, n)
    }

    /// Group `seq` of `track` will bring no more frames.
    pub fn finish_group(&self, track: TrackKind, seq: u64) -> usize {
        let mut s = self.lock();
        let mut out = vec![];
        if let Some(o) = &mut s.order[track_index(track)] {
            o.finish(seq, monotonic_us(), &mut out);
        }
        let n = out.len();
        self.send_frames(out);
        n
    }
}

type NewStreamHook = Arc<dyn Fn(&Arc<LiveStream>, broadcast::Receiver<StreamEvent>) + Send + Sync>;

/// The streams a core is receiving, by name.
pub struct StreamTable {
    map: Mutex<HashMap<String, Arc<LiveStream>>>,
    hooks: Mutex<Vec<NewStreamHook>>,
    metrics: CoreMetrics,
}

impl StreamTable {
    /// An empty table.
    pub fn new(metrics: CoreMetrics) -> Arc<Self> {
        Arc::new(StreamTable {
            map: Mutex::new(HashMap::new()),
            hooks: Mutex::new(vec![]),
            metrics,
        })
    }

    /// Registers a consumer: called for every new stream with a receiver subscribed before
    /// the stream's first event, so nothing is missed.
    pub fn on_new_stream(&self, hook: NewStreamHook) {
        self.hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(hook);
    }

    /// The stream currently received under `name`.
    pub fn get(&self, name: &str) -> Option<Arc<LiveStream>> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Names of the streams being received.
    pub fn names(&self) -> Vec<String> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    fn attach(
        &self,
        name: &str,
        epoch: u64,
        conn: u64,
        edge: &str,
        policy: AnnouncePolicy,
    ) -> Result<Arc<LiveStream>, Refusal> {
        if epoch > crate::media::now_unix_us().saturating_add(MAX_EPOCH_AHEAD_US) {
            return Err(("epoch", "epoch ahead of the core's clock".into()));
        }
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        // A stream replaced here is finished with the map unlocked (its consumers are told);
        // then everything is decided again, against whatever the map holds by then.
        while let Some(cur) = m.get(name) {
            if cur.owner == edge && cur.epoch == epoch {
                cur.lock().attached = conn;
                return Ok(cur.clone());
            }
            if cur.owner == edge && cur.epoch > epoch {
                // A stale announce of an older publishing session.
                return Err(("stale", "a newer publishing session is live".into()));
            }
            let owner_connected = cur.lock().attached != 0;
            if cur.owner != edge
                && owner_connected
                && policy.on_duplicate == DuplicatePolicy::Reject
            {
                return Err((
                    "duplicate",
                    format!("stream {name} is live from another edge"),
                ));
            }
            info!(stream = %name, from = %cur.owner, to = %edge, "stream replaced");
            let old = cur.clone();
            m.remove(name);
            drop(m);
            self.finish(&old);
            m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        }
        let held = m
            .values()
            .filter(|s| s.owner == edge && s.name != name)
            .count();
        if held >= policy.max_streams_per_edge {
            return Err((
                "streams_per_edge",
                format!("this edge already holds {held} streams (relay.max_streams_per_edge)"),
            ));
        }
        let (tx, _) = broadcast::channel(8192);
        let s = Arc::new(LiveStream {
            name: name.to_string(),
            epoch,
            owner: edge.to_string(),
            state: Mutex::new(LiveState {
                attached: conn,
                ..LiveState::default()
            }),
            tx,
            groups_done: Notify::new(),
            info_added: Notify::new(),
            reorder_wait_us: policy.reorder_wait_us,
        });
        m.insert(name.to_string(), s.clone());
        drop(m);
        self.metrics.relay_streams.inc();
        for h in self.hooks.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            h(&s, s.subscribe());
        }
        Ok(s)
    }

    /// Ends a stream: consumers get End, the name is free.
    fn finish(&self, s: &Arc<LiveStream>) {
        let mut st = s.lock();
        if st.ended {
            return;
        }
        st.ended = true;
        drop(st);
        let _ = s.tx.send(StreamEvent::End);
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if m.get(&s.name).is_some_and(|c| Arc::ptr_eq(c, s)) {
            m.remove(&s.name);
        }
        self.metrics.relay_streams.dec();
        info!(stream = %s.name, "stream ended");
    }
}

/// Per-connection bookkeeping.
struct ConnCtx {
    id: u64,
    /// The edge's node id, as its certificate names it.
    edge: String,
    /// Messages to the edge on the control stream.
    control: mpsc::Sender<Control>,
    /// Bytes of partly received frames held by this connection's group streams.
    buffered: AtomicUsize,
    streams: Mutex<HashMap<u64, Arc<LiveStream>>>,
    announced: Notify,
    pending_headers: AtomicUsize,
    header_read: Notify,
}

/// The core's relay endpoint.
pub struct CoreRelay {
    endpoint: quinn::Endpoint,
    table: Arc<StreamTable>,
    metrics: CoreMetrics,
    resume_grace: Duration,
    next_conn: AtomicU64,
    policy: AnnouncePolicy,
    /// Open connections per edge node id.
    edges: Mutex<HashMap<String, usize>>,
}

/// One connection counted against its edge's `MAX_CONNS_PER_EDGE`.
struct EdgeSlot<'a>(&'a CoreRelay, String);

impl Drop for EdgeSlot<'_> {
    fn drop(&mut self) {
        let mut m = self.0.edges.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// A group stream's share of its connection's `buffered` bytes.
struct Buffered<'a> {
    ctx: &'a ConnCtx,
    held: usize,
}

impl Buffered<'_> {
    /// This stream now holds `n` bytes; an error once the connection holds too much.
    fn set(&mut self, n: usize) -> Result<()> {
        if n >= self.held {
            let total = self
                .ctx
                .buffered
                .fetch_add(n - self.held, Ordering::Relaxed);
            self.held = n;
            if total + n > MAX_CONN_BUFFERED {
                return Err(anyhow!(
                    "edge connection holds over {MAX_CONN_BUFFERED} bytes of partial frames"
                ));
            }
        } else {
            self.ctx
                .buffered
                .fetch_sub(self.held - n, Ordering::Relaxed);
            self.held = n;
        }
        Ok(())
    }
}

impl Drop for Buffered<'_> {
    fn drop(&mut self) {
        self.ctx.buffered.fetch_sub(self.held, Ordering::Relaxed);
    }
}

impl CoreRelay {
    /// Binds the QUIC endpoint (certificates are read here).
    pub fn bind(
        cfg: &CoreRelayConfig,
        table: Arc<StreamTable>,
        metrics: CoreMetrics,
    ) -> Result<Self> {
        let tls = crate::certs::relay_server_config(&cfg.cert, &cfg.key, &cfg.client_ca)?;
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| anyhow!("relay TLS config unusable for QUIC: {e}"))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
        let mut transport = super::sender::transport(
            None,
            Duration::from_millis(cfg.idle_timeout_ms),
            cfg.congestion,
        )?;
        transport.max_concurrent_uni_streams(cfg.max_open_streams.into());
        server.transport_config(Arc::new(transport));
        let addr = cfg.listen.parse().context("relay.listen")?;
        let endpoint = quinn::Endpoint::server(server, addr)
            .with_context(|| format!("binding the relay endpoint on udp {addr}"))?;
        Ok(CoreRelay {
            endpoint,
            table,
            metrics,
            resume_grace: Duration::from_millis(cfg.resume_grace_ms),
            next_conn: AtomicU64::new(1),
            policy: AnnouncePolicy {
                on_duplicate: cfg.on_duplicate,
                max_streams_per_edge: cfg.max_streams_per_edge,
                reorder_wait_us: cfg.reorder_wait_ms * 1000,
            },
            edges: Mutex::new(HashMap::new()),
        })
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> Result<std::net::SocketAddr> {
        Ok(self.endpoint.local_addr()?)
    }

    /// Accepts edges until shutdown.
    pub async fn run(self: Arc<Self>, mut shutdown: Shutdown) {
        loop {
            let incoming = tokio::select! {
                i = self.endpoint.accept() => match i { Some(i) => i, None => return },
                _ = shutdown.wait() => {
                    self.endpoint.close(0u32.into(), b"core shutting down");
                    return;
                }
            };
            let me = self.clone();
            let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
            let remote = incoming.remote_address();
            let span = tracing::info_span!("edge_conn", conn = id, %remote);
            tokio::spawn(
                async move {
                    let conn = match incoming.await {
                        Ok(c) => c,
                        Err(e) => {
                            // rustls rejects edges whose certificate is not from the fleet CA.
                            warn!(error = %e, "edge connection refused");
                            me.metrics
                                .relay_refused
                                .with_label_values(&["handshake"])
                                .inc();
                            return;
                        }
                    };
                    me.metrics.relay_connections.inc();
                    if let Err(e) = me.clone().serve(conn, id).await {
                        info!(error = %format!("{e:#}"), "edge connection ended");
                    }
                    me.metrics.relay_connections.dec();
                }
                .instrument(span),
            );
        }
    }

    async fn serve(self: Arc<Self>, conn: quinn::Connection, id: u64) -> Result<()> {
        let (mut ctl_send, mut ctl_recv) = conn.accept_bi().await?;
        let mut buf = BytesMut::new();
        let hello = read_control(&mut ctl_recv, &mut buf).await?;
        let edge = match hello {
            Some(Control::Hello { version, node_id }) if version == wire::VERSION => node_id,
            other => {
                conn.close(1u32.into(), b"expected Hello");
                return Err(anyhow!("bad first control message: {other:?}"));
            }
        };
        // The node id is what streams are owned by: it must be one the certificate names.
        let named = conn
            .peer_identity()
            .and_then(|i| {
                i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .is_some_and(|certs| {
                certs
                    .first()
                    .is_some_and(|c| crate::certs::names_node(c, &edge))
            });
        if !named {
            self.metrics
                .relay_refused
                .with_label_values(&["identity"])
                .inc();
            conn.close(2u32.into(), b"node id not named by the certificate");
            return Err(anyhow!(
                "edge {:?} refused: its certificate does not name that node id",
                edge.escape_debug().to_string()
            ));
        }
        let _slot = {
            let mut m = self.edges.lock().unwrap_or_else(|p| p.into_inner());
            let n = m.entry(edge.clone()).or_default();
            if *n >= MAX_CONNS_PER_EDGE {
                drop(m);
                self.metrics
                    .relay_refused
                    .with_label_values(&["connections_per_edge"])
                    .inc();
                conn.close(3u32.into(), b"too many connections from this edge");
                return Err(anyhow!(
                    "edge {edge} already holds {MAX_CONNS_PER_EDGE} connections"
                ));
            }
            *n += 1;
            EdgeSlot(&self, edge.clone())
        };
        info!(%edge, "edge connected");
        let mut out = BytesMut::new();
        Control::HelloAck {
            version: wire::VERSION,
            node_id: "core".into(),
        }
        .encode(&mut out);
        ctl_send.write_all(&out).await?;
        // One writer owns the control stream; refusals are queued to it (bounded: an edge that
        // does not read its control stream loses refusals, never the core's memory).
        let (control, mut control_rx) = mpsc::channel::<Control>(64);
        tokio::spawn(async move {
            while let Some(m) = control_rx.recv().await {
                let mut out = BytesMut::new();
                m.encode(&mut out);
                if ctl_send.write_all(&out).await.is_err() {
                    return;
                }
            }
        });

        let ctx = Arc::new(ConnCtx {
            id,
            edge: edge.clone(),
            control,
            buffered: AtomicUsize::new(0),
            streams: Mutex::new(HashMap::new()),
            announced: Notify::new(),
            pending_headers: AtomicUsize::new(0),
            header_read: Notify::new(),
        });
        let result = self
            .clone()
            .conn_loop(&conn, &ctx, &mut ctl_recv, &mut buf)
            .await;
        // The edge is gone: keep its streams for the resume grace period.
        let streams: Vec<_> = ctx
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for s in streams {
            {
                // Only streams still attached here: the edge may already have resumed one on
                // a new connection.
                let mut st = s.lock();
                if st.attached != id {
                    continue;
                }
                st.attached = 0;
            }
            let me = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(me.resume_grace).await;
                if s.lock().attached == 0 {
                    info!(stream = %s.name, "edge did not resume the stream in time");
                    me.table.finish(&s);
                }
            });
        }
        result
    }

    async fn conn_loop(
        self: Arc<Self>,
        conn: &quinn::Connection,
        ctx: &Arc<ConnCtx>,
        ctl_recv: &mut quinn::RecvStream,
        buf: &mut BytesMut,
    ) -> Result<()> {
        loop {
            tokio::select! {
                // Accept group streams before reading further control messages, so that an End
                // never overtakes the groups that were sent before it.
                biased;
                uni = conn.accept_uni() => {
                    let recv = uni?;
                    ctx.pending_headers.fetch_add(1, Ordering::SeqCst);
                    let me = self.clone();
                    let ctx = ctx.clone();
                    tokio::spawn(async move {
                        if let Err(e) = me.read_group(&ctx, recv).await {
                            tracing::debug!(error = %format!("{e:#}"), "group stream ended early");
                        }
                    }.in_current_span());
                }
                msg = read_control(ctl_recv, buf) => {
                    match msg? {
                        None => return Err(anyhow!("edge closed the control stream")),
                        Some(m) => self.on_control(ctx, m),
                    }
                }
            }
        }
    }

    /// A connection-local stream id names one publishing session: an Announce may repeat it
    /// (a codec change) but not rebind it, nor announce one session under several ids; the
    /// connection's table stays bounded.
    fn check_stream_id(&self, ctx: &ConnCtx, a: &wire::Announce) -> Result<(), Refusal> {
        let mut streams = ctx.streams.lock().unwrap_or_else(|p| p.into_inner());
        // Streams replaced or finished meanwhile leave the table.
        streams.retain(|_, s| !s.lock().ended);
        match streams.get(&a.stream_id) {
            Some(s) if s.name != a.name || s.epoch != a.epoch => {
                Err(("stream_id", "stream id bound to another stream".into()))
            }
            Some(_) => Ok(()),
            None if streams
                .values()
                .any(|s| s.name == a.name && s.epoch == a.epoch) =>
            {
                Err(("stream_id", "stream announced under another id".into()))
            }
            None if streams.len() >= self.policy.max_streams_per_edge.saturating_mul(2) => Err((
                "streams_per_edge",
                "too many streams on this connection".into(),
            )),
            None => Ok(()),
        }
    }

    fn on_control(self: &Arc<Self>, ctx: &Arc<ConnCtx>, m: Control) {
        match m {
            Control::Announce(a) => {
                if !crate::config::valid_stream_name(&a.name) {
                    warn!(name = %a.name.escape_debug(), "announce with an invalid stream name ignored");
                    return;
                }
                let known = self.check_stream_id(ctx, &a);
                match known.and_then(|()| {
                    self.table
                        .attach(&a.name, a.epoch, ctx.id, &ctx.edge, self.policy)
                }) {
                    Ok(s) => {
                        s.add_info(a.config_version, a.info);
                        let mut streams = ctx.streams.lock().unwrap_or_else(|p| p.into_inner());
                        if let std::collections::hash_map::Entry::Vacant(e) =
                            streams.entry(a.stream_id)
                        {
                            info!(stream = %a.name, epoch = a.epoch, start = a.start_seq, "stream announced");
                            // Before group readers can find the stream: a reader offering a
                            // later group first would otherwise start the order there, and the
                            // start group's frames would be late.
                            s.restart(a.start_seq);
                            e.insert(s.clone());
                        }
                        drop(streams);
                        ctx.announced.notify_waiters();
                    }
                    Err((label, reason)) => {
                        self.metrics.relay_refused.with_label_values(&[label]).inc();
                        warn!(stream = %a.name, edge = %ctx.edge, %reason, "announce refused");
                        let _ = ctx.control.try_send(Control::Refuse {
                            stream_id: a.stream_id,
                            reason,
                        });
                    }
                }
            }
            Control::End { stream_id } => {
                let s = ctx
                    .streams
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&stream_id);
                if let Some(s) = s {
                    let me = self.clone();
                    let ctx = ctx.clone();
                    tokio::spawn(async move {
                        // Let group streams already accepted deliver their frames first.
                        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                        loop {
                            let hr = ctx.header_read.notified();
                            let gd = s.groups_done.notified();
                            if ctx.pending_headers.load(Ordering::SeqCst) == 0
                                && s.lock().open_groups == 0
                            {
                                break;
                            }
                            tokio::select! {
                                _ = hr => {}
                                _ = gd => {}
                                _ = tokio::time::sleep_until(deadline) => break,
                            }
                        }
                        me.table.finish(&s);
                    });
                }
            }
            Control::Hello { .. } | Control::HelloAck { .. } | Control::Refuse { .. } => {}
        }
    }

    async fn read_group(&self, ctx: &ConnCtx, mut recv: quinn::RecvStream) -> Result<()> {
        let mut dec = GroupDecoder::new();
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let mut budget = Buffered { ctx, held: 0 };
        let header = loop {
            match dec.decode(&mut buf) {
                Ok(Some(GroupItem::Header(h))) => break Ok(h),
                Ok(Some(GroupItem::Frame(_))) => break Err(anyhow!("frame before header")),
                Ok(None) => {}
                Err(e) => break Err(e.into()),
            }
            match recv.read_chunk(64 * 1024, true).await {
                Ok(Some(c)) => {
                    buf.extend_from_slice(&c.bytes);
                    if let Err(e) = budget.set(buf.len()) {
                        break Err(e);
                    }
                }
                Ok(None) => break Err(anyhow!("stream ended before its header")),
                Err(e) => break Err(e.into()),
            }
        };
        // Resolve the stream before declaring the header read, so End waits for this group.
        let stream = match &header {
            Ok(h) => self.lookup(ctx, h.stream_id).await,
            Err(_) => None,
        };
        if let Some(s) = &stream {
            s.lock().open_groups += 1;
        }
        ctx.pending_headers.fetch_sub(1, Ordering::SeqCst);
        ctx.header_read.notify_waiters();
        let header = header?;
        let stream =
            stream.ok_or_else(|| anyhow!("group for unannounced stream {}", header.stream_id))?;
        if !stream
            .wait_info(header.config_version, Duration::from_secs(2))
            .await
        {
            tracing::debug!(
                version = header.config_version,
                "group's codec configuration not announced in time"
            );
        }
        let result = self
            .read_frames(&stream, header, &mut dec, &mut buf, &mut recv, &mut budget)
            .await;
        if result
            .as_ref()
            .is_err_and(|e| e.to_string().contains("partial frames"))
        {
            self.metrics
                .relay_refused
                .with_label_values(&["buffer"])
                .inc();
        }
        let released = stream.finish_group(header.track, header.seq);
        self.count_delivered(&stream, header.track, released);
        stream.lock().open_groups -= 1;
        stream.groups_done.notify_waiters();
        result
    }

    fn count_delivered(&self, stream: &LiveStream, track: TrackKind, n: usize) {
        if n > 0 {
            self.metrics
                .relay_frames_received
                .with_label_values(&[&stream.name, track.as_str()])
                .inc_by(n as u64);
        }
    }

    async fn lookup(&self, ctx: &ConnCtx, stream_id: u64) -> Option<Arc<LiveStream>> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            // QUIC does not order streams: a group may arrive before its Announce.
            let wait = ctx.announced.notified();
            if let Some(s) = ctx
                .streams
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&stream_id)
            {
                return Some(s.clone());
            }
            tokio::select! {
                _ = wait => {}
                _ = tokio::time::sleep_until(deadline) => return None,
            }
        }
    }

    async fn read_frames(
        &self,
        stream: &Arc<LiveStream>,
        header: wire::GroupHeader,
        dec: &mut GroupDecoder,
        buf: &mut BytesMut,
        recv: &mut quinn::RecvStream,
        budget: &mut Buffered<'_>,
    ) -> Result<()> {
        let track = header.track.as_str();
        let delay = self.metrics.relay_delay.with_label_values(&[track]);
        let mut idx = 0u64;
        loop {
            while let Some(item) = dec.decode(buf)? {
                let GroupItem::Frame(frame) = item else {
                    return Err(anyhow!("second header"));
                };
                let now = crate::media::now_unix_us();
                self.metrics
                    .relay_bytes_received
                    .inc_by(frame.data.len() as u64);
                self.metrics
                    .relay_frame_bytes
                    .observe(frame.data.len() as f64);
                delay.observe(now.saturating_sub(frame.arrival_us) as f64 / 1e6);
                let (verdict, delivered) = stream.offer(header.seq, idx, frame, monotonic_us());
                self.count_delivered(stream, header.track, delivered);
                match verdict {
                    Verdict::Duplicate => self
                        .metrics
                        .relay_duplicate_frames
                        .with_label_values(&[&stream.name])
                        .inc(),
                    Verdict::Late => self
                        .metrics
                        .relay_late_frames
                        .with_label_values(&[&stream.name])
                        .inc(),
                    Verdict::Delivered | Verdict::Held => {}
                }
                idx += 1;
            }
            budget.set(buf.len())?;
            match recv.read_chunk(256 * 1024, true).await? {
                Some(c) => {
                    buf.extend_from_slice(&c.bytes);
                    budget.set(buf.len())?;
                }
                None => {
                    if !buf.is_empty() {
                        return Err(anyhow!("group stream ended mid-frame"));
                    }
                    return Ok(());
                }
            }
        }
    }
}

/// Microseconds on a monotonic clock, for reorder timeouts.
fn monotonic_us() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_micros() as u64
}

async fn read_control(recv: &mut quinn::RecvStream, buf: &mut BytesMut) -> Result<Option<Control>> {
    loop {
        match Control::decode(buf)? {
            Some(Some(m)) => return Ok(Some(m)),
            Some(None) => continue, // unknown message type, skipped
            None => {}
        }
        match recv.read_chunk(64 * 1024, true).await? {
            Some(c) => buf.extend_from_slice(&c.bytes),
            None => return Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn frame(track: TrackKind, dts: i64, key: bool) -> Frame {
        Frame {
            track,
            dts,
            pts: dts,
            keyframe: key,
            arrival_us: 0,
            data: Bytes::from_static(b"x"),
        }
    }

    #[test]
    fn dedup_after_resume_and_held_groups() {
        let table = StreamTable::new(CoreMetrics::new());
        let s = table
            .attach("s", 1, 1, "e", AnnouncePolicy::default())
            .unwrap();
        let mut rx = s.subscribe();
        s.restart(0);
        let v = TrackKind::Video;
        assert_eq!(s.offer(0, 0, frame(v, 0, true), 0), (Verdict::Delivered, 1));
        assert_eq!(
            s.offer(0, 1, frame(v, 33, false), 0),
            (Verdict::Delivered, 1)
        );
        // The edge reconnects and resends group 0 from its keyframe.
        s.restart(0);
        assert_eq!(s.offer(0, 0, frame(v, 0, true), 0).0, Verdict::Duplicate);
        assert_eq!(
            s.offer(0, 2, frame(v, 66, false), 0),
            (Verdict::Delivered, 1)
        );
        // Group 1 arrives before group 0 finished: held, then released in order.
        assert_eq!(s.offer(1, 0, frame(v, 2000, true), 0), (Verdict::Held, 0));
        assert_eq!(s.finish_group(v, 0), 1);
        let mut dts = vec![];
        while let Ok(StreamEvent::Frame(f)) = rx.try_recv() {
            dts.push(f.dts);
        }
        assert_eq!(dts, vec![0, 33, 66, 2000]);
    }

    #[test]
    fn newer_epoch_replaces_older_is_refused() {
        let table = StreamTable::new(CoreMetrics::new());
        let p = AnnouncePolicy::default();
        let a = table.attach("s", 10, 1, "e", p).unwrap();
        let mut rx = a.subscribe();
        let b = table.attach("s", 11, 2, "e", p).unwrap();
        assert!(matches!(rx.try_recv(), Ok(StreamEvent::End)));
        assert_eq!(table.attach("s", 9, 3, "e", p).err().unwrap().0, "stale");
        assert!(Arc::ptr_eq(&table.get("s").unwrap(), &b));
        let same = table.attach("s", 11, 4, "e", p).unwrap();
        assert!(Arc::ptr_eq(&same, &b));
    }

    #[test]
    fn edges_cannot_take_or_pin_each_others_streams() {
        let table = StreamTable::new(CoreMetrics::new());
        let reject = AnnouncePolicy {
            max_streams_per_edge: 2,
            ..AnnouncePolicy::default()
        };
        let now = crate::media::now_unix_us();
        let a = table.attach("s", now, 1, "edge-a", reject).unwrap();
        // Another edge, whatever its epoch, while the owner is connected.
        for epoch in [now - 1, now, now + 1] {
            let e = table.attach("s", epoch, 2, "edge-b", reject).err().unwrap();
            assert_eq!(e.0, "duplicate");
        }
        // No epoch from the future, so none can pin a stream.
        let e = table
            .attach("t", u64::MAX, 2, "edge-b", reject)
            .err()
            .unwrap();
        assert_eq!(e.0, "epoch");
        assert!(Arc::ptr_eq(&table.get("s").unwrap(), &a));
        // "replace" lets the second edge take it.
        let replace = AnnouncePolicy {
            on_duplicate: DuplicatePolicy::Replace,
            ..reject
        };
        let b = table.attach("s", now, 2, "edge-b", replace).unwrap();
        assert_eq!(b.owner, "edge-b");
        // The owner gone (resume grace), another edge may take over even under "reject".
        b.lock().attached = 0;
        let c = table.attach("s", now, 3, "edge-c", reject).unwrap();
        assert_eq!(c.owner, "edge-c");
        // Streams per edge.
        table.attach("u", now, 3, "edge-c", reject).unwrap();
        let e = table.attach("v", now, 3, "edge-c", reject).err().unwrap();
        assert_eq!(e.0, "streams_per_edge");
        table.attach("v", now, 1, "edge-a", reject).unwrap();
    }
}
