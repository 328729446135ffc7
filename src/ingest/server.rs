//! The socket layer of ingest: accepts RTMP (and RTMPS) connections, runs the handshake and the
//! session, authenticates publishers and hands their frames to the edge's publications.
//!
//! Each connection is its own task with its own span; whatever one peer sends can end only its
//! own connection. Limits: connection count in total and per source address, handshake time,
//! a deadline to be publishing with a valid key, idle (stall) time, a write timeout on every
//! write, and the chunk layer's message and buffer sizes.

use super::auth::{AuthError, Authenticator};
use super::chunk::ChunkLimits;
use super::session::{IngestSession, SessionError, SessionEvent};
use crate::config::RtmpConfig;
use crate::limits::{ConnLimiter, Deadlines};
use crate::media::TrackKind;
use crate::relay::publication::{Kick, Publication, Publications, Pushed};
use crate::shutdown::Shutdown;
use crate::telemetry::EdgeMetrics;
use bytes::BytesMut;
use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tracing::{info, warn, Instrument};

/// Shared by every ingest connection of an edge.
pub struct IngestContext {
    /// RTMP settings and limits.
    pub cfg: RtmpConfig,
    /// Stream-key authentication.
    pub auth: Authenticator,
    /// Where publications go.
    pub pubs: Arc<Publications>,
    /// Metrics.
    pub metrics: EdgeMetrics,
    /// Connection caps (total and per source) shared by RTMP and RTMPS.
    pub conn_limit: Arc<ConnLimiter>,
}

impl IngestContext {
    /// A context from config.
    pub fn new(
        cfg: RtmpConfig,
        auth: Authenticator,
        pubs: Arc<Publications>,
        metrics: EdgeMetrics,
    ) -> Arc<Self> {
        let conn_limit = ConnLimiter::new(cfg.max_connections, cfg.max_connections_per_ip);
        Arc::new(IngestContext {
            cfg,
            auth,
            pubs,
            metrics,
            conn_limit,
        })
    }

    fn limits(&self) -> ChunkLimits {
        ChunkLimits {
            max_message_bytes: self.cfg.max_message_bytes,
            max_chunk_size: self.cfg.max_chunk_size,
            max_buffered_bytes: self.cfg.max_buffered_bytes,
        }
    }
}

/// How a connection ended, for the log line and the metric.
#[derive(Debug, thiserror::Error)]
enum End {
    #[error("publisher disconnected")]
    Eof,
    #[error("no data for {0} ms; closing (stalled publisher)")]
    Stalled(u64),
    #[error("handshake failed: {0}")]
    Handshake(String),
    #[error("handshake not completed within {0} ms")]
    HandshakeTimeout(u64),
    #[error("not publishing with a valid key within {0} ms of connecting; closing")]
    PublishTimeout(u64),
    #[error("protocol error: {0}")]
    Session(#[from] SessionError),
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    #[error("replaced by a new publisher of the same stream")]
    Replaced,
    #[error("the core refused the stream: {0}")]
    CoreRefused(String),
    #[error("sending faster than rtmp.max_bitrate_kbps = {0}; closing")]
    Bitrate(u64),
    #[error("publish refused")]
    Refused,
    #[error(
        "a group of pictures reached {bytes} bytes, past relay.max_buffered_bytes = {limit}: \
         keyframe interval too long (or no keyframes); closing"
    )]
    GroupTooLarge { bytes: usize, limit: usize },
    #[error("server shutting down")]
    Shutdown,
}

impl End {
    /// The `ingest_rejected` reason, for ends that are a refusal of what the publisher did.
    fn rejected(&self) -> Option<&'static str> {
        match self {
            End::PublishTimeout(_) => Some("publish_timeout"),
            End::GroupTooLarge { .. } => Some("group_too_large"),
            End::CoreRefused(_) => Some("core_refused"),
            End::Bitrate(_) => Some("bitrate"),
            _ => None,
        }
    }

    /// The `ingest_errors` reason, for ends that are errors.
    fn reason(&self) -> Option<&'static str> {
        match self {
            End::Eof
            | End::Replaced
            | End::Shutdown
            | End::Refused
            | End::PublishTimeout(_)
            | End::GroupTooLarge { .. }
            | End::CoreRefused(_)
            | End::Bitrate(_) => None,
            End::Stalled(_) => Some("stall"),
            End::Handshake(_) | End::HandshakeTimeout(_) => Some("handshake"),
            End::Session(SessionError::Chunk(_)) => Some("chunk"),
            End::Session(SessionError::Rtmp(_)) => Some("rtmp"),
            End::Session(SessionError::Flv(_)) => Some("media"),
            End::Io(e) if e.kind() == std::io::ErrorKind::TimedOut => Some("write_timeout"),
            End::Io(_) => Some("io"),
        }
    }
}

/// Bytes a publisher sent in the current 10-second window, against `rtmp.max_bitrate_kbps`.
struct RateWindow {
    kbps: u64,
    start: Option<Instant>,
    bytes: u64,
}

impl RateWindow {
    const WINDOW: Duration = Duration::from_secs(10);

    fn new(kbps: u64) -> Self {
        RateWindow {
            kbps,
            start: None,
            bytes: 0,
        }
    }

    fn add(&mut self, n: usize, now: Instant) -> Result<(), End> {
        if self.kbps == 0 {
            return Ok(());
        }
        let start = *self.start.get_or_insert(now);
        if now.duration_since(start) >= Self::WINDOW {
            self.start = Some(now);
            self.bytes = 0;
        }
        self.bytes += n as u64;
        // kbit/s × 10 s = kbps × 1250 bytes.
        if self.bytes > self.kbps.saturating_mul(1250) {
            return Err(End::Bitrate(self.kbps));
        }
        Ok(())
    }
}

/// Accepts connections on `listener` until shutdown; `tls` makes it RTMPS.
pub async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    ctx: Arc<IngestContext>,
    mut shutdown: Shutdown,
) {
    let scheme = if tls.is_some() { "rtmps" } else { "rtmp" };
    loop {
        let (sock, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    crate::limits::accept_backoff(scheme, &e).await;
                    continue;
                }
            },
            _ = shutdown.wait() => return,
        };
        let accepted = Instant::now();
        let permit = match ctx.conn_limit.try_admit(peer.ip()) {
            Ok(p) => p,
            Err(r) => {
                ctx.metrics
                    .ingest_rejected
                    .with_label_values(&[r.label()])
                    .inc();
                let what = match r {
                    crate::limits::Refusal::ConnectionLimit => "connection limit reached",
                    crate::limits::Refusal::PerIpLimit => "per-address connection limit reached",
                };
                warn!(%peer, "connection refused: {what}");
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        // Every write to the publisher (handshake, TLS, acknowledgements) is bounded: a peer
        // that stops reading cannot park this task.
        let sock = Deadlines::new(sock, Duration::from_millis(ctx.cfg.write_timeout_ms));
        let ctx = ctx.clone();
        let tls = tls.clone();
        let sd = shutdown.clone();
        let span = tracing::info_span!("rtmp_conn", %peer, scheme, stream = tracing::field::Empty);
        tokio::spawn(
            async move {
                let _permit = permit;
                ctx.metrics.ingest_connections.inc();
                let result = match tls {
                    None => handle(sock, &ctx, accepted, sd).await,
                    Some(acceptor) => {
                        let limit = Duration::from_millis(ctx.cfg.handshake_timeout_ms);
                        match tokio::time::timeout(limit, acceptor.accept(sock)).await {
                            Ok(Ok(s)) => handle(s, &ctx, accepted, sd).await,
                            Ok(Err(e)) => Err(End::Handshake(format!("TLS: {e}"))),
                            Err(_) => Err(End::HandshakeTimeout(ctx.cfg.handshake_timeout_ms)),
                        }
                    }
                };
                ctx.metrics.ingest_connections.dec();
                match result {
                    Ok(()) => info!("connection closed"),
                    Err(e) if e.rejected().is_some() => {
                        let r = e.rejected().unwrap_or_default();
                        ctx.metrics.ingest_rejected.with_label_values(&[r]).inc();
                        warn!("{e}");
                    }
                    Err(e) => {
                        if let Some(r) = e.reason() {
                            ctx.metrics.ingest_errors.with_label_values(&[r]).inc();
                            warn!("{e}");
                        } else {
                            info!("{e}");
                        }
                    }
                }
            }
            .instrument(span),
        );
    }
}

async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    timeout_ms: u64,
) -> Result<Vec<u8>, End> {
    let run = async {
        let mut hs = Handshake::new(PeerType::Server);
        let mut buf = vec![0u8; 4096];
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return Err(End::Handshake("peer closed during the handshake".into()));
            }
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                hs.process_bytes(&buf[..n])
            }))
            .map_err(|_| End::Handshake("malformed handshake".into()))?
            .map_err(|e| End::Handshake(e.to_string()))?;
            match r {
                HandshakeProcessResult::InProgress { response_bytes } => {
                    s.write_all(&response_bytes).await?;
                }
                HandshakeProcessResult::Completed {
                    response_bytes,
                    remaining_bytes,
                } => {
                    s.write_all(&response_bytes).await?;
                    return Ok(remaining_bytes);
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_millis(timeout_ms), run)
        .await
        .map_err(|_| End::HandshakeTimeout(timeout_ms))?
}

/// The publication a connection feeds, released however the connection ends.
struct Publishing {
    pubs: Arc<Publications>,
    p: Arc<Publication>,
    metrics: EdgeMetrics,
}

impl Drop for Publishing {
    fn drop(&mut self) {
        self.pubs.release(&self.p);
        self.metrics.ingest_streams.dec();
    }
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    ctx: &IngestContext,
    accepted: Instant,
    mut shutdown: Shutdown,
) -> Result<(), End> {
    // Connect and publish with a valid key are due within publish_timeout of connecting (again
    // after an unpublish): a connection that keeps itself busy without publishing cannot hold
    // a slot, however little it sends.
    let publish_timeout = Duration::from_millis(ctx.cfg.publish_timeout_ms);
    let mut publish_by = Some(accepted + publish_timeout);
    let leftover = handshake(&mut s, ctx.cfg.handshake_timeout_ms).await?;
    let (mut session, initial) = IngestSession::new(&ctx.cfg.app, ctx.limits())?;
    for b in initial {
        s.write_all(&b).await?;
    }
    let mut publishing: Option<Publishing> = None;
    let mut kicked: Option<tokio::sync::watch::Receiver<Option<Kick>>> = None;
    let stall = Duration::from_millis(ctx.cfg.stall_timeout_ms);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    buf.extend_from_slice(&leftover);
    let mut rate = RateWindow::new(ctx.cfg.max_bitrate_kbps);
    loop {
        if !buf.is_empty() {
            ctx.metrics.ingest_bytes.inc_by(buf.len() as u64);
            rate.add(buf.len(), Instant::now())?;
            let events = session.handle_input(&buf, crate::media::now_unix_us())?;
            buf.clear();
            let work = handle_events(
                &mut s,
                ctx,
                &mut session,
                events,
                &mut publishing,
                &mut kicked,
            );
            // Answering commands is inside the publish deadline too: a peer that pipelines
            // commands and reads the answers slowly must not stretch it.
            match publish_by {
                Some(t) => tokio::time::timeout_at(t, work)
                    .await
                    .map_err(|_| End::PublishTimeout(ctx.cfg.publish_timeout_ms))??,
                None => work.await?,
            }
            publish_by = match (&publishing, publish_by) {
                (Some(_), _) => None,
                (None, None) => Some(Instant::now() + publish_timeout),
                (None, due) => due,
            };
        }
        let publish_due = async {
            match publish_by {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending::<()>().await,
            }
        };
        let kick = async {
            match kicked.as_mut() {
                Some(k) => {
                    let why = k
                        .wait_for(|v| v.is_some())
                        .await
                        .ok()
                        .and_then(|v| v.clone());
                    match why {
                        Some(why) => why,
                        None => std::future::pending().await,
                    }
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = tokio::time::timeout(stall, s.read_buf(&mut buf)) => match r {
                Err(_) => return Err(End::Stalled(ctx.cfg.stall_timeout_ms)),
                Ok(Ok(0)) => return Err(End::Eof),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(End::Io(e)),
            },
            k = kick => return Err(match k {
                Kick::Replaced => End::Replaced,
                Kick::Refused(reason) => End::CoreRefused(reason),
            }),
            _ = publish_due => return Err(End::PublishTimeout(ctx.cfg.publish_timeout_ms)),
            _ = shutdown.wait() => return Err(End::Shutdown),
        }
    }
}

async fn handle_events<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    ctx: &IngestContext,
    session: &mut IngestSession,
    events: Vec<SessionEvent>,
    publishing: &mut Option<Publishing>,
    kicked: &mut Option<tokio::sync::watch::Receiver<Option<Kick>>>,
) -> Result<(), End> {
    let mut queue: std::collections::VecDeque<SessionEvent> = events.into();
    while let Some(ev) = queue.pop_front() {
        match ev {
            SessionEvent::Send(b) => s.write_all(&b).await?,
            SessionEvent::PublishRequested { request_id, key } => {
                let (code, desc, reason) = if publishing.is_some() {
                    (
                        "NetStream.Publish.BadName",
                        "this connection is already publishing".to_string(),
                        "already_publishing",
                    )
                } else {
                    match ctx.auth.authenticate(&ctx.cfg.app, &key).await {
                        Ok(name) => match ctx.pubs.claim(&name) {
                            Ok(p) => {
                                tracing::Span::current().record("stream", name.as_str());
                                info!(stream = %name, "publish started");
                                ctx.metrics.ingest_streams.inc();
                                *kicked = Some(p.kicked());
                                *publishing = Some(Publishing {
                                    pubs: ctx.pubs.clone(),
                                    p,
                                    metrics: ctx.metrics.clone(),
                                });
                                queue.extend(session.accept_publish(request_id)?);
                                continue;
                            }
                            Err(e) => ("NetStream.Publish.BadName", e.to_string(), "duplicate"),
                        },
                        Err(e @ (AuthError::UnknownKey | AuthError::Denied)) => {
                            ("NetStream.Publish.BadName", e.to_string(), "auth")
                        }
                        Err(e @ AuthError::Webhook(_)) => {
                            ("NetStream.Publish.Failed", e.to_string(), "auth_error")
                        }
                    }
                };
                ctx.metrics
                    .ingest_rejected
                    .with_label_values(&[reason])
                    .inc();
                warn!(reason = %desc, "publish refused");
                for ev in session.reject_publish(request_id, code, &desc)? {
                    if let SessionEvent::Send(b) = ev {
                        s.write_all(&b).await?;
                    }
                }
                s.flush().await?;
                return Err(End::Refused);
            }
            SessionEvent::Metadata(m) => {
                if let Some(p) = publishing {
                    p.p.set_metadata(m);
                }
            }
            SessionEvent::VideoConfig(c) => {
                if let Some(p) = publishing {
                    p.p.set_video_config(c);
                }
            }
            SessionEvent::AudioConfig(c) => {
                if let Some(p) = publishing {
                    p.p.set_audio_config(c);
                }
            }
            SessionEvent::Frame(f) => {
                if let Some(p) = publishing {
                    let track = f.track;
                    match p.p.push(f) {
                        Pushed::Added => ctx
                            .metrics
                            .ingest_frames
                            .with_label_values(&[&p.p.name, track.as_str()])
                            .inc(),
                        Pushed::Dropped => {
                            if track == TrackKind::Video {
                                tracing::debug!("video frame before the first keyframe dropped");
                            }
                        }
                        Pushed::GroupTooLarge { bytes, limit } => {
                            return Err(End::GroupTooLarge { bytes, limit })
                        }
                    }
                }
            }
            SessionEvent::PublishFinished => {
                if let Some(p) = publishing.take() {
                    info!(stream = %p.p.name, "publish finished");
                }
                *kicked = None;
            }
        }
    }
    Ok(())
}
