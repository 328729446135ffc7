//! Typed configuration for each role, loaded from TOML (examples in edge-config/).
//!
//! Loading is two steps: serde parses the file (unknown keys are errors), then `validate`
//! checks what types cannot (addresses, files that must exist, limits that must be ordered).
//! Every error names the file, the key and the fix. Relative paths are resolved against the
//! directory of the config file, so `edge-config/*.toml` run unchanged from any working directory.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A configuration problem: which file, which key, what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {reason}")]
pub struct ConfigError {
    /// The config file.
    pub file: String,
    /// The key, dotted (`rtmp.listen`), or `-` when the file as a whole is wrong.
    pub key: String,
    /// What is wrong and how to fix it.
    pub reason: String,
}

/// Configuration of an edge process (`livepop edge --config FILE`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// Identity of this node in logs and in the relay handshake.
    #[serde(default = "default_edge_id")]
    pub node_id: String,
    /// Admin HTTP server: /metrics, /healthz, /readyz.
    pub admin: AdminConfig,
    /// Plain RTMP ingest.
    pub rtmp: RtmpConfig,
    /// RTMP over TLS ingest; omit the section to disable it.
    pub rtmps: Option<RtmpsConfig>,
    /// Who may publish, and under which stream name.
    pub auth: AuthConfig,
    /// The QUIC relay to the cores.
    pub relay: EdgeRelayConfig,
    /// Playback for viewers: the caching proxy in front of the cores' origins. Optional, so an
    /// ingest-only edge needs no HTTP port.
    pub playback: Option<PlaybackConfig>,
}

/// Configuration of a core process (`livepop core --config FILE`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoreConfig {
    /// Identity of this node in logs.
    #[serde(default = "default_core_id")]
    pub node_id: String,
    /// Admin HTTP server: /metrics, /healthz, /readyz.
    pub admin: AdminConfig,
    /// The QUIC relay endpoint that edges connect to.
    pub relay: CoreRelayConfig,
    /// The LL-HLS origin that serves the packaged streams; omit to only receive.
    pub origin: Option<OriginConfig>,
    /// ABR ladder: transcoded renditions served next to the source (needs [origin]).
    pub transcode: Option<TranscodeConfig>,
    /// Optional recording of every received stream to a file, for debugging.
    pub record: Option<RecordConfig>,
}

fn default_edge_id() -> String {
    "edge-1".into()
}
fn default_core_id() -> String {
    "core-1".into()
}

/// The admin HTTP listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin HTTP server, e.g. "127.0.0.1:9090".
    pub listen: String,
    /// Admin connections at once; more are closed at once.
    #[serde(default = "default_admin_connections")]
    pub max_connections: usize,
    /// A request's headers must arrive within this time of connecting (ms).
    #[serde(default = "default_admin_header_timeout")]
    pub header_timeout_ms: u64,
    /// A kept-alive admin connection with no request for this long is closed (ms).
    #[serde(default = "default_admin_idle")]
    pub idle_timeout_ms: u64,
    /// A client that accepts no response bytes for this long is dropped (ms).
    #[serde(default = "default_write_timeout")]
    pub write_timeout_ms: u64,
}

fn default_admin_connections() -> usize {
    64
}
fn default_admin_header_timeout() -> u64 {
    5_000
}
fn default_admin_idle() -> u64 {
    30_000
}

impl AdminConfig {
    /// The admin listener's limits (no per-source cap: one Prometheus scrapes many targets).
    pub fn limits(&self) -> crate::httpd::HttpLimits {
        crate::httpd::HttpLimits {
            max_connections: self.max_connections,
            max_connections_per_ip: 0,
            header_timeout: Duration::from_millis(self.header_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            write_timeout: Duration::from_millis(self.write_timeout_ms),
        }
    }
}

/// What happens when a second publisher claims a stream that is already live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DuplicatePolicy {
    /// The newcomer is refused; the live publisher keeps the stream.
    #[default]
    Reject,
    /// The newcomer takes over; the previous publisher is disconnected.
    Replace,
}

/// The QUIC relay's congestion controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    /// Model-based (bottleneck bandwidth and RTT): keeps its rate through random loss, so a
    /// long-haul path with 1–5% loss carries what its capacity allows.
    #[default]
    Bbr,
    /// Loss-based; its rate falls with the square root of the loss rate.
    Cubic,
    /// Loss-based, Reno-style.
    Newreno,
}

/// Plain RTMP ingest and the limits that apply to every RTMP(S) connection.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RtmpConfig {
    /// Address to listen on, e.g. "127.0.0.1:1935".
    pub listen: String,
    /// The RTMP application name publishers must use (`rtmp://host/APP/KEY`).
    #[serde(default = "default_app")]
    pub app: String,
    /// Maximum concurrent RTMP and RTMPS connections; further connections are closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Maximum concurrent RTMP and RTMPS connections from one source address (IPv6: one /64);
    /// 0 for no cap.
    #[serde(default = "default_rtmp_per_ip")]
    pub max_connections_per_ip: usize,
    /// Maximum bytes one connection may hold in partly received messages.
    #[serde(default = "default_max_buffered")]
    pub max_buffered_bytes: usize,
    /// Largest RTMP message accepted (bytes); larger ones end the connection.
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    /// Largest chunk size a peer may set with Set Chunk Size.
    #[serde(default = "default_max_chunk")]
    pub max_chunk_size: u32,
    /// A connection that sends nothing for this long is closed (milliseconds).
    #[serde(default = "default_stall_ms")]
    pub stall_timeout_ms: u64,
    /// Highest rate a publisher may send, averaged over 10 s (kbit/s; 0: no cap). Everything
    /// downstream (the relay, packagers' windows, recordings) holds a stream for a time, so
    /// this is what bounds their bytes.
    #[serde(default = "default_max_bitrate")]
    pub max_bitrate_kbps: u64,
    /// The RTMP handshake must complete within this time (milliseconds).
    #[serde(default = "default_handshake_ms")]
    pub handshake_timeout_ms: u64,
    /// A connection must be publishing with a valid key within this time of connecting
    /// (milliseconds); otherwise it is closed, however it keeps itself busy.
    #[serde(default = "default_publish_ms")]
    pub publish_timeout_ms: u64,
    /// A publisher that accepts none of our bytes (acknowledgements, status) for this long is
    /// disconnected (milliseconds).
    #[serde(default = "default_write_timeout")]
    pub write_timeout_ms: u64,
    /// What to do when a second publisher claims a live stream: "reject" or "replace".
    #[serde(default)]
    pub on_duplicate: DuplicatePolicy,
}

fn default_app() -> String {
    "live".into()
}
fn default_max_connections() -> usize {
    1000
}
fn default_max_buffered() -> usize {
    16 * 1024 * 1024
}
fn default_max_bitrate() -> u64 {
    100_000
}
fn default_max_message() -> usize {
    8 * 1024 * 1024
}
fn default_max_chunk() -> u32 {
    1024 * 1024
}
fn default_stall_ms() -> u64 {
    10_000
}
fn default_handshake_ms() -> u64 {
    5_000
}
fn default_publish_ms() -> u64 {
    10_000
}
fn default_rtmp_per_ip() -> usize {
    16
}

/// RTMP over TLS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RtmpsConfig {
    /// Address to listen on, e.g. "127.0.0.1:1936".
    pub listen: String,
    /// PEM certificate chain presented to publishers.
    pub cert: PathBuf,
    /// PEM private key of that certificate.
    pub key: PathBuf,
}

/// Stream-key authentication: a static table, a webhook, or both (the table is tried first).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Static stream keys.
    #[serde(default)]
    pub streams: Vec<StreamKeyConfig>,
    /// An HTTP endpoint asked about keys the table does not know.
    pub webhook: Option<WebhookConfig>,
}

/// One static stream key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamKeyConfig {
    /// The public stream name (appears in playback URLs, logs and metrics).
    pub name: String,
    /// The secret key publishers use (never logged).
    pub key: String,
}

/// Webhook authentication: POST {"key": "...", "app": "..."}; 2xx with {"name": "..."} allows.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// https:// (or, on a trusted network, http://) URL of the hook. The request carries the
    /// stream key: use https across any network you do not own.
    pub url: String,
    /// PEM CA certificate(s) the https hook's certificate must chain to; default: the system's.
    pub ca: Option<PathBuf>,
    /// How long to wait for its answer (milliseconds); no answer means deny.
    #[serde(default = "default_webhook_timeout")]
    pub timeout_ms: u64,
}

fn default_webhook_timeout() -> u64 {
    2000
}

/// The edge side of the relay.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeRelayConfig {
    /// PEM client certificate signed by the fleet CA.
    pub cert: PathBuf,
    /// PEM private key of the client certificate.
    pub key: PathBuf,
    /// PEM CA certificate that core certificates must chain to.
    pub ca: PathBuf,
    /// The cores this edge may relay to; one is chosen per stream by rendezvous hashing.
    pub cores: Vec<CoreEndpoint>,
    /// QUIC keep-alive interval (milliseconds).
    #[serde(default = "default_keepalive")]
    pub keepalive_ms: u64,
    /// A connection with no traffic for this long is dead (milliseconds).
    #[serde(default = "default_idle")]
    pub idle_timeout_ms: u64,
    /// First reconnect delay (milliseconds); doubles up to `reconnect_max_ms`.
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay (milliseconds).
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max_ms: u64,
    /// Bytes of not-yet-sent media kept per stream; older groups of pictures are skipped.
    #[serde(default = "default_relay_buffer")]
    pub max_buffered_bytes: usize,
    /// Congestion controller of the connections to cores.
    #[serde(default)]
    pub congestion: Congestion,
    /// A group of pictures whose turn to be sent comes more than this after its keyframe
    /// arrived is skipped whole, unless it is the newest (milliseconds): the live latency the
    /// relay may add when the path cannot carry the stream.
    #[serde(default = "default_skip_after")]
    pub skip_after_ms: u64,
}

fn default_skip_after() -> u64 {
    1000
}

fn default_keepalive() -> u64 {
    500
}
fn default_idle() -> u64 {
    2000
}
fn default_reconnect_min() -> u64 {
    100
}
fn default_reconnect_max() -> u64 {
    1000
}
fn default_relay_buffer() -> usize {
    32 * 1024 * 1024
}

/// One core as seen from an edge.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoreEndpoint {
    /// Stable identity of the core; the rendezvous hash uses it, so keep it fixed.
    pub id: String,
    /// UDP address of the core's relay endpoint.
    pub addr: String,
    /// Name the core's certificate must carry.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// TCP address of the core's LL-HLS origin (HTTP), where the edge's cache fetches playback
    /// objects. Needed when the edge has a [playback] section.
    pub origin: Option<String>,
}

/// The edge's playback cache (Pingora): viewers fetch playlists, parts and segments here.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlaybackConfig {
    /// Plain HTTP (HTTP/1.1, and HTTP/2 with prior knowledge), e.g. "127.0.0.1:8080".
    pub listen: String,
    /// HTTPS with HTTP/2 and HTTP/1.1 by ALPN, e.g. "127.0.0.1:8443"; needs `cert` and `key`.
    pub tls_listen: Option<String>,
    /// PEM certificate chain presented to viewers.
    pub cert: Option<PathBuf>,
    /// PEM private key of that certificate.
    pub key: Option<PathBuf>,
    /// Bytes of cached objects kept in memory; least recently used objects go first.
    #[serde(default = "default_cache_bytes")]
    pub cache_bytes: u64,
    /// Longest a request waits for the origin's response to begin (ms). Must exceed the
    /// origin's longest blocking hold (3 × target duration); coalesced waiters wait as long.
    #[serde(default = "default_upstream_timeout")]
    pub upstream_timeout_ms: u64,
    /// Viewer connections at once (HTTP and HTTPS together); more are closed at once.
    #[serde(default = "default_max_viewer_connections")]
    pub max_connections: usize,
    /// Viewer connections at once from one source address (IPv6: one /64), HTTP and HTTPS
    /// together; 0 for no cap. Viewers behind one carrier-grade NAT share an address: keep it
    /// well above what one household opens.
    #[serde(default = "default_viewer_per_ip")]
    pub max_connections_per_ip: usize,
    /// A request's headers (and the TLS handshake) must arrive within this time (ms).
    #[serde(default = "default_header_timeout")]
    pub header_timeout_ms: u64,
    /// An idle kept-alive viewer connection is closed after this time (ms).
    #[serde(default = "default_viewer_idle")]
    pub idle_timeout_ms: u64,
    /// A viewer that accepts no response bytes for this long is disconnected (ms).
    #[serde(default = "default_write_timeout")]
    pub write_timeout_ms: u64,
    /// Serve the player page at `/` (and the stream list at `/live/streams.json`).
    #[serde(default = "default_true")]
    pub player: bool,
    /// Which streams need a signed URL, and the keys that sign them.
    #[serde(default)]
    pub access: AccessConfig,
}

/// Viewer access control: `[playback.access]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    /// Streams not listed below: "public" (default) or "signed".
    #[serde(default)]
    pub default: crate::edge::access::Mode,
    /// Streams that need a signed URL: names, or prefixes ending in `*`.
    #[serde(default)]
    pub signed: Vec<String>,
    /// Streams anyone may play: names, or prefixes ending in `*`.
    #[serde(default)]
    pub public: Vec<String>,
    /// Signing keys, by id. Rotate by adding a key, signing new URLs with it, and removing the
    /// old one once its URLs have expired.
    #[serde(default)]
    pub keys: Vec<SigningKey>,
}

/// One HMAC-SHA256 signing key.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigningKey {
    /// Key id, carried in tokens: 1 to 64 of `[A-Za-z0-9_-]`.
    pub id: String,
    /// The secret, hex, at least 32 bytes (`openssl rand -hex 32`).
    pub secret: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl SigningKey {
    /// The secret's bytes (validated at load).
    pub fn secret_bytes(&self) -> Option<Vec<u8>> {
        let h = self.secret.trim().as_bytes();
        if h.len() % 2 != 0 {
            return None;
        }
        h.chunks(2)
            .map(|p| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok())
            .collect()
    }
}

impl AccessConfig {
    /// The checker the proxy uses.
    pub fn build(&self) -> crate::edge::access::Access {
        let keys: Vec<(String, Vec<u8>)> = self
            .keys
            .iter()
            .filter_map(|k| Some((k.id.clone(), k.secret_bytes()?)))
            .collect();
        crate::edge::access::Access::new(
            self.default,
            self.signed.clone(),
            self.public.clone(),
            &keys,
        )
    }

    fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        use crate::edge::access::{valid_key_id, Mode};
        for (i, k) in self.keys.iter().enumerate() {
            let field = format!("playback.access.keys[{i}]");
            if !valid_key_id(&k.id) {
                return Err(err(file, &field, "id must be 1 to 64 of A-Z a-z 0-9 _ -"));
            }
            if self.keys[..i].iter().any(|o| o.id == k.id) {
                return Err(err(file, &field, "duplicate key id"));
            }
            if k.secret_bytes().is_none_or(|b| b.len() < 32) {
                return Err(err(
                    file,
                    &field,
                    "secret must be hex, at least 32 bytes (openssl rand -hex 32)",
                ));
            }
        }
        for (list, name) in [(&self.signed, "signed"), (&self.public, "public")] {
            for p in list {
                let stem = p.strip_suffix('*').unwrap_or(p);
                let ok = p == "*" || valid_stream_name(stem);
                if !ok {
                    return Err(err(
                        file,
                        &format!("playback.access.{name}"),
                        "entries are stream names, or prefixes ending in *",
                    ));
                }
            }
        }
        let any_signed = self.default == Mode::Signed || !self.signed.is_empty();
        if any_signed && self.keys.is_empty() {
            return Err(err(
                file,
                "playback.access.keys",
                "signed streams need at least one key",
            ));
        }
        Ok(())
    }
}

fn default_true() -> bool {
    true
}

fn default_cache_bytes() -> u64 {
    512 * 1024 * 1024
}
fn default_upstream_timeout() -> u64 {
    10_000
}
fn default_max_viewer_connections() -> usize {
    20_000
}
fn default_viewer_per_ip() -> usize {
    256
}
fn default_header_timeout() -> u64 {
    10_000
}
fn default_viewer_idle() -> u64 {
    60_000
}
fn default_write_timeout() -> u64 {
    10_000
}

fn default_server_name() -> String {
    "localhost".into()
}

/// The core side of the relay.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoreRelayConfig {
    /// UDP address to listen on, e.g. "127.0.0.1:4433".
    pub listen: String,
    /// PEM server certificate.
    pub cert: PathBuf,
    /// PEM private key of the server certificate.
    pub key: PathBuf,
    /// PEM CA certificate that edge client certificates must chain to (the fleet CA).
    pub client_ca: PathBuf,
    /// A connection with no traffic for this long is dead (milliseconds).
    #[serde(default = "default_idle")]
    pub idle_timeout_ms: u64,
    /// How long a stream whose edge vanished is kept for the edge to resume it (milliseconds).
    #[serde(default = "default_resume_grace")]
    pub resume_grace_ms: u64,
    /// A stream announced by a second edge while the edge that owns it is connected: refused
    /// (`reject`), or moved to the newcomer (`replace`). An edge replaces its own streams.
    #[serde(default)]
    pub on_duplicate: DuplicatePolicy,
    /// Live streams one edge (node id) may hold at this core; each starts packagers and, with a
    /// ladder, transcoder threads.
    #[serde(default = "default_streams_per_edge")]
    pub max_streams_per_edge: usize,
    /// Relay streams (one per group and track in flight) one edge connection may hold open.
    #[serde(default = "default_open_streams")]
    pub max_open_streams: u32,
    /// How long frames of a newer group wait for an older group still being received, e.g.
    /// its tail being retransmitted on a lossy path (milliseconds). Past it the older group's
    /// rest is given up. The edge sends groups in order, so this is a bound, rarely reached.
    #[serde(default = "default_reorder_wait")]
    pub reorder_wait_ms: u64,
    /// Congestion controller (the core sends little: acknowledgements and control messages).
    #[serde(default)]
    pub congestion: Congestion,
}

fn default_reorder_wait() -> u64 {
    1500
}

fn default_resume_grace() -> u64 {
    10_000
}
fn default_streams_per_edge() -> usize {
    64
}
fn default_open_streams() -> u32 {
    1024
}

/// The core's LL-HLS origin.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginConfig {
    /// Address of the HTTP server (HTTP/1.1 and h2c), e.g. "127.0.0.1:8090".
    pub listen: String,
    /// Wanted part duration (ms); PART-TARGET becomes a whole number of frames near it.
    #[serde(default = "default_part_ms")]
    pub part_target_ms: u32,
    /// Segment target duration (s), EXT-X-TARGETDURATION. Publishers should use a keyframe
    /// interval of this length (longer GOPs are cut at part boundaries).
    #[serde(default = "default_target_duration")]
    pub target_duration_s: u32,
    /// Complete segments listed in live playlists (the live window).
    #[serde(default = "default_window")]
    pub window_segments: usize,
    /// Log every request (method, path and query, status) at info level. For debugging and
    /// tests; a busy origin logs a lot.
    #[serde(default)]
    pub access_log: bool,
    /// Connections at once (edges keep pools of kept-alive connections); more are closed at
    /// once.
    #[serde(default = "default_origin_connections")]
    pub max_connections: usize,
    /// Connections at once from one source address; 0 (the default) for no cap, since all of an
    /// edge's connections come from one address.
    #[serde(default)]
    pub max_connections_per_ip: usize,
    /// The first request's headers must arrive within this time of connecting (ms).
    #[serde(default = "default_origin_header_timeout")]
    pub header_timeout_ms: u64,
    /// A kept-alive connection with no request for this long is closed (ms). Keep it above the
    /// edges' upstream keep-alive (60 s), so that edges close idle connections first.
    #[serde(default = "default_origin_idle")]
    pub idle_timeout_ms: u64,
    /// A client that accepts no response bytes for this long is dropped (ms).
    #[serde(default = "default_write_timeout")]
    pub write_timeout_ms: u64,
}

fn default_origin_connections() -> usize {
    10_000
}
fn default_origin_header_timeout() -> u64 {
    5_000
}
fn default_origin_idle() -> u64 {
    75_000
}

impl OriginConfig {
    /// The origin listener's limits.
    pub fn limits(&self) -> crate::httpd::HttpLimits {
        crate::httpd::HttpLimits {
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            header_timeout: Duration::from_millis(self.header_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            write_timeout: Duration::from_millis(self.write_timeout_ms),
        }
    }
}

/// The transcoding ladder of every stream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TranscodeConfig {
    /// libx264 preset (ultrafast … veryslow); faster presets cost less CPU per rendition.
    #[serde(default = "default_preset")]
    pub preset: String,
    /// Threads per encoder; 0 lets x264 decide.
    #[serde(default)]
    pub threads: u32,
    /// Renditions, by height; those at or above the source's height are skipped (never
    /// upscaled). Empty: 1080p, 720p, 480p and 360p.
    #[serde(default)]
    pub renditions: Vec<RenditionConfig>,
}

/// One transcoded rendition.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenditionConfig {
    /// Name in playback URLs, e.g. "480p".
    pub name: String,
    /// Picture height; the width follows the source's aspect ratio.
    pub height: u32,
    /// Video bitrate in kbit/s.
    pub video_kbps: u32,
}

impl TranscodeConfig {
    /// (name, height, kbit/s) of each wanted rendition.
    pub fn wanted(&self) -> Vec<(String, u32, u32)> {
        if self.renditions.is_empty() {
            return [
                ("1080p", 1080, 5000),
                ("720p", 720, 2800),
                ("480p", 480, 1400),
                ("360p", 360, 800),
            ]
            .iter()
            .map(|(n, h, k)| (n.to_string(), *h, *k))
            .collect();
        }
        self.renditions
            .iter()
            .map(|r| (r.name.clone(), r.height, r.video_kbps))
            .collect()
    }
}

fn default_preset() -> String {
    "veryfast".into()
}

fn default_part_ms() -> u32 {
    200
}
fn default_target_duration() -> u32 {
    2
}
fn default_window() -> usize {
    10
}

/// Debug recording of received streams.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordConfig {
    /// Directory for the files: NAME-EPOCH.flv, written as `.flv.part` until the stream ends.
    pub dir: PathBuf,
}

fn err(file: &Path, key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        file: file.display().to_string(),
        key: key.into(),
        reason: reason.into(),
    }
}

fn read(file: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(file).map_err(|e| err(file, "-", format!("cannot read the file: {e}")))
}

fn parse<T: serde::de::DeserializeOwned>(file: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        // toml reports the key path in its message; add the line for humans.
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        let key = line
            .map(|l| format!("line {l}"))
            .unwrap_or_else(|| "-".into());
        err(file, &key, e.message().trim().to_string())
    })
}

fn check_addr(file: &Path, key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        err(
            file,
            key,
            format!("`{value}` is not an IP:port socket address (e.g. \"127.0.0.1:1935\")"),
        )
    })
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn check_file(file: &Path, key: &str, base: &Path, p: &mut PathBuf) -> Result<(), ConfigError> {
    *p = resolve(base, p);
    if !p.is_file() {
        return Err(err(
            file,
            key,
            format!(
                "file {} does not exist (for development certificates run `livepop dev-certs {}`)",
                p.display(),
                p.parent()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default()
            ),
        ));
    }
    Ok(())
}

fn base_dir(file: &Path) -> PathBuf {
    file.parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                p.to_path_buf()
            }
        })
        .unwrap_or_else(|| PathBuf::from("."))
}

impl EdgeConfig {
    /// Reads, parses and validates an edge config file.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let mut cfg: EdgeConfig = parse(file, &read(file)?)?;
        cfg.validate(file)?;
        Ok(cfg)
    }

    /// Parses and validates TOML text as if it came from `file`.
    pub fn from_str_at(file: &Path, text: &str) -> Result<Self, ConfigError> {
        let mut cfg: EdgeConfig = parse(file, text)?;
        cfg.validate(file)?;
        Ok(cfg)
    }

    fn validate(&mut self, file: &Path) -> Result<(), ConfigError> {
        let base = base_dir(file);
        check_node_id(file, &self.node_id)?;
        check_addr(file, "admin.listen", &self.admin.listen)?;
        check_addr(file, "rtmp.listen", &self.rtmp.listen)?;
        if self.rtmp.max_connections == 0 {
            return Err(err(file, "rtmp.max_connections", "must be at least 1"));
        }
        if self.rtmp.max_message_bytes > 0xFF_FFFF || self.rtmp.max_message_bytes < 1024 {
            return Err(err(
                file,
                "rtmp.max_message_bytes",
                "must be between 1024 and 16777215 (the RTMP limit)",
            ));
        }
        if self.rtmp.max_chunk_size < 128 || self.rtmp.max_chunk_size > 0x7FFF_FFFF {
            return Err(err(
                file,
                "rtmp.max_chunk_size",
                "must be between 128 and 2147483647",
            ));
        }
        if self.rtmp.max_buffered_bytes < self.rtmp.max_message_bytes {
            return Err(err(
                file,
                "rtmp.max_buffered_bytes",
                "must be at least rtmp.max_message_bytes",
            ));
        }
        if let Some(t) = &mut self.rtmps {
            check_addr(file, "rtmps.listen", &t.listen)?;
            check_file(file, "rtmps.cert", &base, &mut t.cert)?;
            check_file(file, "rtmps.key", &base, &mut t.key)?;
        }
        if let Some(p) = &mut self.playback {
            check_addr(file, "playback.listen", &p.listen)?;
            if let Some(l) = &p.tls_listen {
                check_addr(file, "playback.tls_listen", l)?;
                let (Some(cert), Some(key)) = (&mut p.cert, &mut p.key) else {
                    return Err(err(
                        file,
                        "playback.tls_listen",
                        "HTTPS needs playback.cert and playback.key",
                    ));
                };
                check_file(file, "playback.cert", &base, cert)?;
                check_file(file, "playback.key", &base, key)?;
            }
            if p.cache_bytes < 1024 * 1024 {
                return Err(err(
                    file,
                    "playback.cache_bytes",
                    "must be at least 1048576",
                ));
            }
            if p.upstream_timeout_ms < 1000 {
                return Err(err(
                    file,
                    "playback.upstream_timeout_ms",
                    "must be at least 1000, and longer than the origin's longest hold (3 x target duration)",
                ));
            }
            if p.max_connections == 0 {
                return Err(err(file, "playback.max_connections", "must be at least 1"));
            }
            p.access.validate(file)?;
            for (i, c) in self.relay.cores.iter().enumerate() {
                match &c.origin {
                    Some(o) => {
                        check_addr(file, &format!("relay.cores[{i}].origin"), o)?;
                    }
                    None => {
                        return Err(err(
                            file,
                            &format!("relay.cores[{i}].origin"),
                            "playback needs each core's origin address (e.g. \"127.0.0.1:8090\")",
                        ))
                    }
                }
            }
        }
        if self.auth.streams.is_empty() && self.auth.webhook.is_none() {
            return Err(err(
                file,
                "auth",
                "no way to authenticate publishers: add [[auth.streams]] entries or [auth.webhook]",
            ));
        }
        let mut names = std::collections::HashSet::new();
        let mut keys = std::collections::HashSet::new();
        for (i, s) in self.auth.streams.iter().enumerate() {
            if !valid_stream_name(&s.name) {
                return Err(err(
                    file,
                    &format!("auth.streams[{i}].name"),
                    "stream names use only letters, digits, '-', '_' and '.', 1 to 64 characters",
                ));
            }
            if s.key.len() < 4 {
                return Err(err(
                    file,
                    &format!("auth.streams[{i}].key"),
                    "keys must be at least 4 characters",
                ));
            }
            if !names.insert(&s.name) {
                return Err(err(
                    file,
                    &format!("auth.streams[{i}].name"),
                    "duplicate stream name",
                ));
            }
            if !keys.insert(&s.key) {
                return Err(err(
                    file,
                    &format!("auth.streams[{i}].key"),
                    "two streams share one key",
                ));
            }
        }
        if let Some(w) = &mut self.auth.webhook {
            let https = w.url.starts_with("https://");
            if !https && !w.url.starts_with("http://") {
                return Err(err(
                    file,
                    "auth.webhook.url",
                    "must be an https:// (or http://) URL",
                ));
            }
            if w.url.parse::<hyper::Uri>().is_err() {
                return Err(err(file, "auth.webhook.url", "not a valid URL"));
            }
            if let Some(ca) = &mut w.ca {
                if !https {
                    return Err(err(file, "auth.webhook.ca", "only for an https:// URL"));
                }
                check_file(file, "auth.webhook.ca", &base, ca)?;
            }
        }
        let r = &mut self.relay;
        check_file(file, "relay.cert", &base, &mut r.cert)?;
        check_file(file, "relay.key", &base, &mut r.key)?;
        check_file(file, "relay.ca", &base, &mut r.ca)?;
        // A public certificate from the fleet CA would put a key that can pose as a core on an
        // internet-facing host.
        let public = [
            ("rtmps.cert", self.rtmps.as_ref().map(|t| t.cert.clone())),
            (
                "playback.cert",
                self.playback.as_ref().and_then(|p| p.cert.clone()),
            ),
        ];
        for (key, cert) in public {
            if let Some(cert) = cert {
                if crate::certs::chains_to(&cert, &r.ca).unwrap_or(false) {
                    return Err(err(
                        file,
                        key,
                        "signed by the fleet CA (relay.ca): its key, on an internet-facing edge, could pose as a core; use a certificate from another CA",
                    ));
                }
            }
        }
        if r.cores.is_empty() {
            return Err(err(
                file,
                "relay.cores",
                "list at least one core ([[relay.cores]] with id and addr)",
            ));
        }
        let mut ids = std::collections::HashSet::new();
        for (i, c) in r.cores.iter().enumerate() {
            check_addr(file, &format!("relay.cores[{i}].addr"), &c.addr)?;
            if !ids.insert(&c.id) {
                return Err(err(
                    file,
                    &format!("relay.cores[{i}].id"),
                    "duplicate core id",
                ));
            }
        }
        if r.keepalive_ms == 0 || r.keepalive_ms >= r.idle_timeout_ms {
            return Err(err(
                file,
                "relay.keepalive_ms",
                "must be above 0 and below relay.idle_timeout_ms",
            ));
        }
        if r.reconnect_min_ms == 0 || r.reconnect_min_ms > r.reconnect_max_ms {
            return Err(err(
                file,
                "relay.reconnect_min_ms",
                "must be above 0 and at most relay.reconnect_max_ms",
            ));
        }
        // Groups are dropped from the buffer 4 s after they close whatever this says.
        if !(100..=3000).contains(&r.skip_after_ms) {
            return Err(err(file, "relay.skip_after_ms", "must be 100 to 3000"));
        }
        Ok(())
    }
}

impl CoreConfig {
    /// Reads, parses and validates a core config file.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let mut cfg: CoreConfig = parse(file, &read(file)?)?;
        cfg.validate(file)?;
        Ok(cfg)
    }

    /// Parses and validates TOML text as if it came from `file`.
    pub fn from_str_at(file: &Path, text: &str) -> Result<Self, ConfigError> {
        let mut cfg: CoreConfig = parse(file, text)?;
        cfg.validate(file)?;
        Ok(cfg)
    }

    fn validate(&mut self, file: &Path) -> Result<(), ConfigError> {
        let base = base_dir(file);
        check_node_id(file, &self.node_id)?;
        check_addr(file, "admin.listen", &self.admin.listen)?;
        check_addr(file, "relay.listen", &self.relay.listen)?;
        check_file(file, "relay.cert", &base, &mut self.relay.cert)?;
        check_file(file, "relay.key", &base, &mut self.relay.key)?;
        check_file(file, "relay.client_ca", &base, &mut self.relay.client_ca)?;
        if self.relay.idle_timeout_ms < 100 {
            return Err(err(file, "relay.idle_timeout_ms", "must be at least 100"));
        }
        if !(50..=60_000).contains(&self.relay.reorder_wait_ms) {
            return Err(err(file, "relay.reorder_wait_ms", "must be 50 to 60000"));
        }
        if let Some(r) = &mut self.record {
            r.dir = resolve(&base, &r.dir);
        }
        if let Some(t) = &self.transcode {
            if self.origin.is_none() {
                return Err(err(
                    file,
                    "transcode",
                    "transcoding needs an [origin] to serve it",
                ));
            }
            let presets = [
                "ultrafast",
                "superfast",
                "veryfast",
                "faster",
                "fast",
                "medium",
                "slow",
                "slower",
                "veryslow",
            ];
            if !presets.contains(&t.preset.as_str()) {
                return Err(err(
                    file,
                    "transcode.preset",
                    format!("one of {}", presets.join(", ")),
                ));
            }
            let mut names = std::collections::HashSet::new();
            for (i, r) in t.renditions.iter().enumerate() {
                if !valid_stream_name(&r.name) || r.name == "src" || !names.insert(&r.name) {
                    return Err(err(
                        file,
                        &format!("transcode.renditions[{i}].name"),
                        "a unique name of letters, digits, '-', '_', '.' (not \"src\")",
                    ));
                }
                if !(64..=4320).contains(&r.height) {
                    return Err(err(
                        file,
                        &format!("transcode.renditions[{i}].height"),
                        "64 to 4320",
                    ));
                }
                if !(50..=100_000).contains(&r.video_kbps) {
                    return Err(err(
                        file,
                        &format!("transcode.renditions[{i}].video_kbps"),
                        "50 to 100000",
                    ));
                }
            }
        }
        if let Some(o) = &self.origin {
            check_addr(file, "origin.listen", &o.listen)?;
            if !(1..=10).contains(&o.target_duration_s) {
                return Err(err(
                    file,
                    "origin.target_duration_s",
                    "must be 1 to 10 seconds",
                ));
            }
            if o.part_target_ms < 50 || o.part_target_ms * 2 > o.target_duration_s * 1000 {
                return Err(err(
                    file,
                    "origin.part_target_ms",
                    "must be at least 50 and at most half the target duration",
                ));
            }
            if o.window_segments < 3 {
                return Err(err(file, "origin.window_segments", "must be at least 3"));
            }
        }
        Ok(())
    }
}

/// Which role a config file is for, decided by its keys (for `check-config`).
#[derive(Debug)]
pub enum AnyConfig {
    /// An edge config.
    Edge(Box<EdgeConfig>),
    /// A core config.
    Core(Box<CoreConfig>),
}

/// Loads a config of either role: a file with an `[rtmp]` table is an edge config.
pub fn load_any(file: &Path) -> Result<AnyConfig, ConfigError> {
    let text = read(file)?;
    let table: toml::Table = parse(file, &text)?;
    if table.contains_key("rtmp") {
        Ok(AnyConfig::Edge(Box::new(EdgeConfig::from_str_at(
            file, &text,
        )?)))
    } else if table.contains_key("relay") {
        Ok(AnyConfig::Core(Box::new(CoreConfig::from_str_at(
            file, &text,
        )?)))
    } else {
        Err(err(
            file,
            "-",
            "neither an edge config (has [rtmp]) nor a core config (has [relay] without [rtmp])",
        ))
    }
}

/// A node id in its one spelling: lowercase DNS labels (`a-z`, `0-9`, `-`) joined by dots, no
/// trailing dot. An edge's certificate names it exactly (SAN dNSName); one spelling per node is
/// what lets the core tell edges apart.
pub fn valid_node_id(id: &str) -> bool {
    id.len() <= 253
        && id.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

fn check_node_id(file: &Path, id: &str) -> Result<(), ConfigError> {
    if valid_node_id(id) {
        Ok(())
    } else {
        Err(err(
            file,
            "node_id",
            "must be lowercase DNS labels (a-z, 0-9, -) joined by dots, as the node's certificate names it",
        ))
    }
}

/// Stream names go into URLs, file names and metric labels: keep them tame.
pub fn valid_stream_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with('.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_names_file_and_line() {
        let e = CoreConfig::from_str_at(
            Path::new("x/core.toml"),
            "[admin]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n",
        )
        .unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("x/core.toml: line 3"), "{s}");
        assert!(s.contains("lisen"), "{s}");
    }

    #[test]
    fn bad_address_names_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("core.toml");
        for n in ["a.pem", "a.key", "ca.pem"] {
            std::fs::write(dir.path().join(n), "x").unwrap();
        }
        let e = CoreConfig::from_str_at(
            &f,
            "[admin]\nlisten = \"nope\"\n[relay]\nlisten = \"127.0.0.1:4433\"\ncert = \"a.pem\"\nkey = \"a.key\"\nclient_ca = \"ca.pem\"\n",
        )
        .unwrap_err();
        assert_eq!(e.key, "admin.listen");
        assert!(e.reason.contains("nope"));
        let ok = CoreConfig::from_str_at(
            &f,
            "[admin]\nlisten = \"127.0.0.1:0\"\n[relay]\nlisten = \"127.0.0.1:4433\"\ncert = \"a.pem\"\nkey = \"a.key\"\nclient_ca = \"ca.pem\"\n",
        )
        .unwrap();
        assert_eq!(ok.relay.cert, dir.path().join("a.pem"));
    }

    #[test]
    fn missing_cert_suggests_dev_certs() {
        let e = CoreConfig::from_str_at(
            Path::new("/nonexistent/core.toml"),
            "[admin]\nlisten = \"127.0.0.1:0\"\n[relay]\nlisten = \"127.0.0.1:4433\"\ncert = \"a.pem\"\nkey = \"a.key\"\nclient_ca = \"ca.pem\"\n",
        )
        .unwrap_err();
        assert_eq!(e.key, "relay.cert");
        assert!(e.reason.contains("livepop dev-certs"), "{}", e.reason);
    }

    #[test]
    fn stream_names() {
        assert!(valid_stream_name("demo"));
        assert!(valid_stream_name("a-b_c.1"));
        assert!(!valid_stream_name(""));
        assert!(!valid_stream_name("../x"));
        assert!(!valid_stream_name("a b"));
        assert!(!valid_stream_name(".hidden"));
    }
}
