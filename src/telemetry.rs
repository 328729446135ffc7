//! Logging setup and the Prometheus metrics of each role.
//!
//! Metric names follow `livepop_<area>_<what>_<unit>`. Labels carry stream names, never keys.
//! Each role has its own registry so that `livepop demo` can serve both on their own admin ports.

use prometheus::{
    GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

/// Installs the tracing subscriber: human-readable, or one JSON object per line.
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,quinn=warn,rustls=warn"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let _ = if json {
        b.json().with_current_span(true).try_init()
    } else {
        b.try_init()
    };
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}
fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}
fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}
fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}
fn float_gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

/// Latency buckets from 0.1 ms to 10 s, fine enough for percentile estimates in benchmarks.
const DELAY_BUCKETS: [f64; 28] = [
    0.0001, 0.0002, 0.0003, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01,
    0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 3.0, 5.0, 10.0,
];

/// Metrics of an edge process.
#[derive(Clone)]
pub struct EdgeMetrics {
    /// The registry served on /metrics.
    pub registry: Registry,
    /// Open RTMP(S) connections.
    pub ingest_connections: IntGauge,
    /// Connections or publish attempts refused, by reason.
    pub ingest_rejected: IntCounterVec,
    /// Connections ended by a protocol or limit error, by reason.
    pub ingest_errors: IntCounterVec,
    /// Streams being published.
    pub ingest_streams: IntGauge,
    /// Frames received from publishers.
    pub ingest_frames: IntCounterVec,
    /// Bytes received from publishers (all RTMP traffic).
    pub ingest_bytes: IntCounter,
    /// Frames written to a core.
    pub relay_frames_sent: IntCounterVec,
    /// Groups of pictures not relayed whole, by reason (behind, evicted).
    pub relay_groups_skipped: IntCounterVec,
    /// 1 while the QUIC connection to a core is up.
    pub relay_core_up: IntGaugeVec,
    /// Connection attempts to cores that failed.
    pub relay_connect_failures: IntCounterVec,
    /// Per core link, sampled from QUIC: smoothed RTT (s).
    pub relay_link_rtt: GaugeVec,
    /// Per core link: congestion window (bytes).
    pub relay_link_cwnd: IntGaugeVec,
    /// Per core link: bytes the relay may hand QUIC ahead of acknowledgements (the send window,
    /// kept near the congestion window so that a backlog stays where groups can be skipped).
    pub relay_link_send_window: IntGaugeVec,
    /// Per core link: fraction of packets lost over the last sampling interval.
    pub relay_link_loss: GaugeVec,
    /// Per core link: UDP bits per second sent over the last sampling interval.
    pub relay_link_throughput: GaugeVec,
    /// Per core link: packets sent.
    pub relay_link_sent_packets: IntCounterVec,
    /// Per core link: packets declared lost.
    pub relay_link_lost_packets: IntCounterVec,
    /// Per core link: UDP bytes sent.
    pub relay_link_sent_bytes: IntCounterVec,
    /// Per core link: congestion events (window reductions).
    pub relay_link_congestion_events: IntCounterVec,
    /// Playback requests by object kind and how the cache answered them.
    pub http_requests: IntCounterVec,
    /// Requests sent to a core's origin, by object kind and response status.
    pub http_upstream_requests: IntCounterVec,
    /// Body bytes received from cores' origins, by object kind.
    pub http_upstream_bytes: IntCounterVec,
    /// Time from a blocking request's arrival to its response starting, by object kind.
    pub http_hold: HistogramVec,
    /// Viewer connections refused at the connection limit.
    pub http_refused: IntCounter,
    /// Viewer connections and requests refused or cut off, by reason (connection_limit,
    /// per_ip_limit, header_timeout, idle_timeout, write_timeout, token_*).
    pub edge_refused: IntCounterVec,
    /// Admin connections refused or cut off, by reason.
    pub admin_refused: IntCounterVec,
    /// Responses to viewers by object kind ("other" for the page, the stream list and refused
    /// paths) and status ("0": the viewer left before a response was written).
    pub http_responses: IntCounterVec,
}

impl EdgeMetrics {
    /// Registers every edge metric in a new registry.
    pub fn new() -> Self {
        let r = Registry::new();
        EdgeMetrics {
            ingest_connections: gauge(&r, "livepop_ingest_connections", "Open RTMP(S) connections"),
            ingest_rejected: counter_vec(
                &r,
                "livepop_ingest_rejected_total",
                "Connections or publish attempts refused",
                &["reason"],
            ),
            ingest_errors: counter_vec(
                &r,
                "livepop_ingest_errors_total",
                "Connections ended by a protocol or limit error",
                &["reason"],
            ),
            ingest_streams: gauge(&r, "livepop_ingest_streams", "Streams being published"),
            ingest_frames: counter_vec(
                &r,
                "livepop_ingest_frames_total",
                "Frames received from publishers",
                &["stream", "track"],
            ),
            ingest_bytes: counter(
                &r,
                "livepop_ingest_received_bytes_total",
                "Bytes received from publishers",
            ),
            relay_frames_sent: counter_vec(
                &r,
                "livepop_relay_frames_sent_total",
                "Frames written to a core",
                &["stream", "track"],
            ),
            relay_groups_skipped: counter_vec(
                &r,
                "livepop_relay_groups_skipped_total",
                "Groups of pictures not relayed whole: skipped because the path to the core fell behind (behind), dropped from the edge's buffer before they were sent (evicted), or never sent because the core was unreachable when they arrived (outage)",
                &["stream", "reason"],
            ),
            relay_core_up: gauge_vec(
                &r,
                "livepop_relay_core_up",
                "1 while the QUIC connection to the core is up",
                &["core"],
            ),
            relay_connect_failures: counter_vec(
                &r,
                "livepop_relay_connect_failures_total",
                "Failed connection attempts to a core",
                &["core"],
            ),
            relay_link_rtt: float_gauge_vec(
                &r,
                "livepop_relay_link_rtt_seconds",
                "Smoothed round-trip time of the QUIC connection to the core",
                &["core"],
            ),
            relay_link_cwnd: gauge_vec(
                &r,
                "livepop_relay_link_cwnd_bytes",
                "Congestion window of the QUIC connection to the core",
                &["core"],
            ),
            relay_link_send_window: gauge_vec(
                &r,
                "livepop_relay_link_send_window_bytes",
                "Bytes the relay may hand QUIC ahead of acknowledgements",
                &["core"],
            ),
            relay_link_loss: float_gauge_vec(
                &r,
                "livepop_relay_link_loss_ratio",
                "Fraction of packets lost to the core over the last second",
                &["core"],
            ),
            relay_link_throughput: float_gauge_vec(
                &r,
                "livepop_relay_link_throughput_bits_per_second",
                "UDP bits per second sent to the core over the last second",
                &["core"],
            ),
            relay_link_sent_packets: counter_vec(
                &r,
                "livepop_relay_link_sent_packets_total",
                "QUIC packets sent to the core",
                &["core"],
            ),
            relay_link_lost_packets: counter_vec(
                &r,
                "livepop_relay_link_lost_packets_total",
                "QUIC packets to the core declared lost",
                &["core"],
            ),
            relay_link_sent_bytes: counter_vec(
                &r,
                "livepop_relay_link_sent_bytes_total",
                "UDP bytes sent to the core",
                &["core"],
            ),
            relay_link_congestion_events: counter_vec(
                &r,
                "livepop_relay_link_congestion_events_total",
                "Congestion events on the QUIC connection to the core",
                &["core"],
            ),
            http_requests: counter_vec(
                &r,
                "livepop_edge_requests_total",
                "Playback requests by object kind and cache outcome (hit, miss, coalesced, uncached, refused)",
                &["kind", "cache"],
            ),
            http_upstream_requests: counter_vec(
                &r,
                "livepop_edge_upstream_requests_total",
                "Requests sent to a core's origin, by object kind and status",
                &["kind", "status"],
            ),
            http_upstream_bytes: counter_vec(
                &r,
                "livepop_edge_upstream_bytes_total",
                "Body bytes received from cores' origins",
                &["kind"],
            ),
            http_hold: {
                let h = HistogramVec::new(
                    HistogramOpts::new(
                        "livepop_edge_hold_seconds",
                        "Time from a blocking request's arrival to its response starting",
                    )
                    .buckets(DELAY_BUCKETS.to_vec()),
                    &["kind"],
                )
                .expect("valid metric");
                r.register(Box::new(h.clone())).expect("unique metric");
                h
            },
            http_responses: counter_vec(
                &r,
                "livepop_edge_responses_total",
                "Responses to viewers by object kind and HTTP status",
                &["kind", "status"],
            ),
            http_refused: counter(
                &r,
                "livepop_edge_connections_refused_total",
                "Viewer connections refused at the connection limit",
            ),
            edge_refused: counter_vec(
                &r,
                "livepop_edge_refused_total",
                "Viewer connections and requests refused or cut off, by reason",
                &["reason"],
            ),
            admin_refused: admin_refused(&r),
            registry: r,
        }
    }
}

impl Default for EdgeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Metrics of a core process.
#[derive(Clone)]
pub struct CoreMetrics {
    /// The registry served on /metrics.
    pub registry: Registry,
    /// Frames received from edges and accepted (duplicates excluded).
    pub relay_frames_received: IntCounterVec,
    /// Payload bytes received from edges.
    pub relay_bytes_received: IntCounter,
    /// Frames dropped as already received (resends after a reconnect).
    pub relay_duplicate_frames: IntCounterVec,
    /// Frames dropped because a newer group had already started.
    pub relay_late_frames: IntCounterVec,
    /// Open edge connections.
    pub relay_connections: IntGauge,
    /// Edge connections refused (TLS or protocol).
    pub relay_refused: IntCounterVec,
    /// Streams being received.
    pub relay_streams: IntGauge,
    /// Delay from a frame's arrival at the edge to its arrival at the core.
    pub relay_delay: HistogramVec,
    /// Streams whose recording failed.
    pub record_errors: IntCounter,
    /// Size of relayed frames.
    pub relay_frame_bytes: Histogram,
    /// Source video frames into a stream's transcoder.
    pub transcode_frames_in: IntCounterVec,
    /// Encoded frames out, per rendition.
    pub transcode_frames_out: IntCounterVec,
    /// Source frames the transcoder dropped (behind, or undecodable).
    pub transcode_dropped: IntCounterVec,
    /// Renditions stopped to keep up with real time.
    pub transcode_shed: IntCounterVec,
    /// Time a frame spends in an encoder, per rendition.
    pub transcode_latency: HistogramVec,
    /// Frames encoded per second (last second), per stream and rendition.
    pub transcode_fps: prometheus::GaugeVec,
    /// Speed: media time encoded per second of encoder work (ffmpeg's "speed"; < 1 cannot keep
    /// up), per stream and rendition.
    pub transcode_speed: prometheus::GaugeVec,
    /// Time from a part's newest frame reaching the edge to the part's publication, per
    /// rendition (includes the relay and, for transcoded renditions, decoding and encoding).
    pub origin_part_delay: HistogramVec,
    /// Origin connections and requests refused or cut off, by reason.
    pub origin_refused: IntCounterVec,
    /// Admin connections refused or cut off, by reason.
    pub admin_refused: IntCounterVec,
    /// LL-HLS parts made, by stream, rendition and whether they are GAP parts (media lost
    /// upstream).
    pub parts: IntCounterVec,
    /// Media dropped because a per-stream buffer reached its bound, by reason.
    pub media_dropped: IntCounterVec,
}

fn admin_refused(r: &Registry) -> IntCounterVec {
    counter_vec(
        r,
        "livepop_admin_refused_total",
        "Admin connections refused or cut off, by reason",
        &["reason"],
    )
}

impl CoreMetrics {
    /// Registers every core metric in a new registry.
    pub fn new() -> Self {
        let r = Registry::new();
        let relay_delay = HistogramVec::new(
            HistogramOpts::new(
                "livepop_relay_delay_seconds",
                "Delay from arrival at the edge to arrival at the core",
            )
            .buckets(DELAY_BUCKETS.to_vec()),
            &["track"],
        )
        .expect("valid metric");
        r.register(Box::new(relay_delay.clone()))
            .expect("unique metric");
        let relay_frame_bytes = Histogram::with_opts(
            HistogramOpts::new("livepop_relay_frame_size_bytes", "Size of relayed frames")
                .buckets(prometheus::exponential_buckets(64.0, 4.0, 10).expect("buckets")),
        )
        .expect("valid metric");
        r.register(Box::new(relay_frame_bytes.clone()))
            .expect("unique metric");
        CoreMetrics {
            relay_frames_received: counter_vec(
                &r,
                "livepop_relay_frames_received_total",
                "Frames received from edges",
                &["stream", "track"],
            ),
            relay_bytes_received: counter(
                &r,
                "livepop_relay_received_bytes_total",
                "Payload bytes received from edges",
            ),
            relay_duplicate_frames: counter_vec(
                &r,
                "livepop_relay_duplicate_frames_total",
                "Frames dropped as already received",
                &["stream"],
            ),
            relay_late_frames: counter_vec(
                &r,
                "livepop_relay_late_frames_total",
                "Frames dropped because a newer group had started",
                &["stream"],
            ),
            relay_connections: gauge(&r, "livepop_relay_connections", "Open edge connections"),
            relay_refused: counter_vec(
                &r,
                "livepop_relay_refused_total",
                "Edge connections refused",
                &["reason"],
            ),
            relay_streams: gauge(&r, "livepop_relay_streams", "Streams being received"),
            transcode_frames_in: counter_vec(
                &r,
                "livepop_transcode_frames_in_total",
                "Source video frames into the transcoder",
                &["stream"],
            ),
            transcode_frames_out: counter_vec(
                &r,
                "livepop_transcode_frames_out_total",
                "Encoded video frames out of the transcoder",
                &["stream", "rendition"],
            ),
            transcode_dropped: counter_vec(
                &r,
                "livepop_transcode_dropped_frames_total",
                "Source frames the transcoder dropped (behind real time, or undecodable)",
                &["stream"],
            ),
            transcode_shed: counter_vec(
                &r,
                "livepop_transcode_shed_total",
                "Renditions stopped to keep up with real time",
                &["stream", "rendition"],
            ),
            transcode_fps: {
                let g = prometheus::GaugeVec::new(
                    Opts::new("livepop_transcode_fps", "Frames encoded in the last second"),
                    &["stream", "rendition"],
                )
                .expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            transcode_speed: {
                let g = prometheus::GaugeVec::new(
                    Opts::new(
                        "livepop_transcode_speed",
                        "Media seconds encoded per second of encoder work (below 1: cannot keep up)",
                    ),
                    &["stream", "rendition"],
                )
                .expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            origin_part_delay: {
                let h = HistogramVec::new(
                    HistogramOpts::new(
                        "livepop_origin_part_delay_seconds",
                        "From a part's newest frame reaching the edge to the part's publication",
                    )
                    .buckets(DELAY_BUCKETS.to_vec()),
                    &["rendition"],
                )
                .expect("valid metric");
                r.register(Box::new(h.clone())).expect("unique metric");
                h
            },
            origin_refused: counter_vec(
                &r,
                "livepop_origin_refused_total",
                "Origin connections and requests refused or cut off, by reason",
                &["reason"],
            ),
            admin_refused: admin_refused(&r),
            parts: counter_vec(
                &r,
                "livepop_core_parts_total",
                "LL-HLS parts made, by stream, rendition and gap (yes: a GAP part standing for media that never arrived)",
                &["stream", "rendition", "gap"],
            ),
            media_dropped: counter_vec(
                &r,
                "livepop_core_media_dropped_total",
                "Frames dropped because a per-stream buffer reached its bound, by reason",
                &["reason"],
            ),
            transcode_latency: {
                let h = HistogramVec::new(
                    HistogramOpts::new(
                        "livepop_transcode_encode_seconds",
                        "Time from a frame entering an encoder to its packet leaving it",
                    )
                    .buckets(DELAY_BUCKETS.to_vec()),
                    &["rendition"],
                )
                .expect("valid metric");
                r.register(Box::new(h.clone())).expect("unique metric");
                h
            },
            relay_delay,
            record_errors: counter(&r, "livepop_record_errors_total", "Recordings that failed"),
            relay_frame_bytes,
            registry: r,
        }
    }
}

impl Default for CoreMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Renders a registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    use prometheus::Encoder;
    let mut buf = vec![];
    let _ = prometheus::TextEncoder::new().encode(&registry.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}
