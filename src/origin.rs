//! The core's LL-HLS origin: per-stream live state (one packager per rendition) fed from the
//! relay, and the HTTP server (HTTP/1.1 and h2c) that answers playlist, part and segment
//! requests, holding blocking requests until the media exists.
//!
//! Waiters are woken by a watch channel bumped on every new part (no polling); a rendered
//! playlist is cached per version so that thousands of waiters woken by one part share one
//! rendering. Response headers follow shared/LLHLS.md (appendix B.1 lifetimes, CORS).

use crate::config::{OriginConfig, TranscodeConfig};
use crate::hls::{self, Directives, RenditionReport, Variant};
use crate::media::StreamInfo;
use crate::packager::{Lookup, Packager, PackagerConfig};
use crate::relay::receiver::{LiveStream, StreamEvent, StreamTable};
use crate::shutdown::Shutdown;
use crate::telemetry::CoreMetrics;
use crate::transcode::{self, Ladder};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tracing::{info, warn, Instrument};

/// Name of the source rendition (the stream as published).
pub const SOURCE: &str = "src";

fn now_ms() -> i64 {
    (crate::media::now_unix_us() / 1000) as i64
}

/// What waiters need to know about a rendition, published on every change so that thousands of
/// held requests check it without taking the rendition's lock.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Position {
    /// Increases on every change.
    seq: u64,
    last_complete: Option<u64>,
    last_part: Option<(u64, u64)>,
    ended: bool,
}

impl Position {
    /// §6.2.5.2 (same rule as `MediaPlaylist::satisfies`): segment `msn` complete, or part
    /// `part` of it (an index past its end meaning the next segment's first part); a playlist
    /// with EXT-X-ENDLIST satisfies everything.
    fn satisfies(&self, msn: u64, part: Option<u64>) -> bool {
        if self.ended {
            return true;
        }
        match part {
            None => self.last_complete.is_some_and(|m| m >= msn),
            Some(p) => self
                .last_part
                .is_some_and(|(m, i)| m > msn || (m == msn && i >= p)),
        }
    }
}

/// One rendition's live state.
pub struct Rendition {
    /// Path segment in URLs.
    pub name: String,
    /// The stream's name (for metrics).
    stream: String,
    packager: Mutex<Packager>,
    version: watch::Sender<Position>,
    rendered: Mutex<HashMap<bool, (u64, Bytes)>>,
    /// Wall time (µs) of the last change: sent as `livepop-changed-us` so that the delay from
    /// a part's completion to a blocked viewer's response can be measured end to end.
    changed_us: std::sync::atomic::AtomicU64,
    /// The stream's codec configuration (for CODECS and RESOLUTION).
    info: Mutex<StreamInfo>,
    /// When a bound last dropped frames was logged (unix ms).
    drop_logged_ms: std::sync::atomic::AtomicU64,
}

impl Rendition {
    fn lock(&self) -> MutexGuard<'_, Packager> {
        self.packager.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed_us.store(
            crate::media::now_unix_us(),
            std::sync::atomic::Ordering::Release,
        );
        let pos = {
            let p = self.lock();
            Position {
                seq: 0,
                last_complete: p.playlist.last_complete_msn(),
                last_part: p.playlist.last_part(),
                ended: p.playlist.ended,
            }
        };
        self.version.send_modify(|v| {
            *v = Position {
                seq: v.seq + 1,
                ..pos
            }
        });
    }

    /// Continues after a discontinuity with the stream's new configuration. A transcoded
    /// rendition forgets its video configuration until its new encoder reports one, so that no
    /// frame (audio arrives first) builds an init segment from the source's.
    fn restart(&self, info: &StreamInfo, epoch: u64) {
        let own = if self.name == SOURCE {
            info.clone()
        } else {
            StreamInfo {
                video: None,
                ..info.clone()
            }
        };
        self.lock().restart(own.clone(), epoch, now_ms());
        *self.info.lock().unwrap_or_else(|p| p.into_inner()) = own;
        self.bump();
    }

    /// Pushes a frame; on a new part, records its delay and wakes waiters.
    fn push(&self, f: crate::media::Frame, metrics: &CoreMetrics) {
        let (changed, dropped) = {
            let mut p = self.lock();
            let changed = p.push(f, now_ms());
            let (media, gap) = p.take_parts();
            for (n, kind) in [(media, "no"), (gap, "yes")] {
                if n > 0 {
                    metrics
                        .parts
                        .with_label_values(&[&self.stream, &self.name, kind])
                        .inc_by(n);
                }
            }
            (changed, p.take_dropped())
        };
        for (reason, n) in dropped {
            metrics.media_dropped.with_label_values(&[reason]).inc_by(n);
            // At most one line per rendition every 10 s: the counter says how many.
            let now = now_ms().max(0) as u64;
            let last = self
                .drop_logged_ms
                .load(std::sync::atomic::Ordering::Relaxed);
            if now >= last + 10_000 {
                self.drop_logged_ms
                    .store(now, std::sync::atomic::Ordering::Relaxed);
                warn!(
                    rendition = %self.name,
                    reason,
                    n,
                    "frames dropped: a per-stream buffer reached its bound"
                );
            }
        }
        if !changed {
            return;
        }
        let arrival = self.lock().take_part_arrival();
        if let Some(a) = arrival {
            let delay = crate::media::now_unix_us().saturating_sub(a) as f64 / 1e6;
            metrics
                .origin_part_delay
                .with_label_values(&[&self.name])
                .observe(delay);
        }
        self.bump();
    }

    fn changed_us(&self) -> u64 {
        self.changed_us.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// One stream's output.
pub struct Output {
    /// Stream name.
    pub name: String,
    /// Renditions (the source only, until the transcoder adds a ladder).
    pub renditions: Vec<Arc<Rendition>>,
    epoch: Mutex<u64>,
}

impl Output {
    fn rendition(&self, name: &str) -> Option<&Arc<Rendition>> {
        self.renditions.iter().find(|r| r.name == name)
    }
}

/// All outputs of a core.
pub struct Origin {
    cfg: OriginConfig,
    transcode: Option<TranscodeConfig>,
    metrics: CoreMetrics,
    outputs: Mutex<HashMap<String, Arc<Output>>>,
}

/// A new output's first media sequence number: wall time in tenths of a second. An earlier
/// output of the stream (on this core before its output expired, or on a core that died and
/// whose edges still cache its objects) has made at most one segment per 100 ms of its life,
/// so it never reached this number and no URI repeats. Wall time / target duration was not
/// enough: segments shorter than the target (GOPs of 1.5 s against 2 s) advance the sequence
/// faster than the clock, and a core taking over after an hour reused names edges still held.
fn first_msn(now_ms: i64) -> u64 {
    (now_ms.max(0) / 100) as u64
}

impl Origin {
    /// An origin that packages every stream of `table` (and transcodes it when `transcode`).
    pub fn new(
        cfg: OriginConfig,
        transcode: Option<TranscodeConfig>,
        metrics: CoreMetrics,
        table: &StreamTable,
    ) -> Arc<Self> {
        let o = Arc::new(Origin {
            cfg,
            transcode,
            metrics,
            outputs: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&o);
        table.on_new_stream(Arc::new(move |s, rx| {
            if let Some(o) = weak.upgrade() {
                let span = tracing::info_span!("package", stream = %s.name);
                tokio::spawn(o.clone().feed(s.clone(), rx).instrument(span));
            }
        }));
        o
    }

    fn packager_config(&self) -> PackagerConfig {
        PackagerConfig {
            part_target_ms: self.cfg.part_target_ms,
            target_duration_s: self.cfg.target_duration_s,
            window_segments: self.cfg.window_segments,
            audio_wait_ms: 150,
            ..PackagerConfig::default()
        }
    }

    /// The output of a stream.
    pub fn output(&self, name: &str) -> Option<Arc<Output>> {
        self.outputs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Consumes one relayed stream into its output.
    async fn feed(
        self: Arc<Self>,
        stream: Arc<LiveStream>,
        mut rx: broadcast::Receiver<StreamEvent>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(25));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut output: Option<Arc<Output>> = None;
        let mut info: StreamInfo;
        // The transcoding ladder, its output channel, and rung index → rendition index.
        let mut ladder: Option<Ladder> = None;
        let mut ladder_rx: Option<tokio::sync::mpsc::Receiver<transcode::Output>> = None;
        let mut rung_to_rendition: Vec<Option<usize>> = vec![];
        // Non-AAC audio (MP3) is converted to AAC for every rendition.
        let mut raw = StreamInfo::default();
        let mut audio_conv: Option<transcode::AudioToAac> = None;
        let mut audio_rx: Option<tokio::sync::mpsc::Receiver<crate::media::Frame>> = None;
        loop {
            let ev = tokio::select! {
                ev = rx.recv() => ev,
                Some(a) = async {
                    match &mut audio_rx {
                        Some(r) => r.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some(o) = &output {
                        for r in &o.renditions {
                            r.push(a.clone(), &self.metrics);
                        }
                    }
                    continue;
                }
                Some(t) = async {
                    match &mut ladder_rx {
                        Some(r) => r.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some(o) = &output {
                        self.transcoded(o, t, &rung_to_rendition);
                    }
                    continue;
                }
                _ = tick.tick() => {
                    if let Some(o) = &output {
                        for r in &o.renditions {
                            if r.lock().tick(now_ms()) {
                                r.bump();
                            }
                        }
                    }
                    continue;
                }
            };
            match ev {
                Ok(StreamEvent::Info { info: i, .. }) => {
                    let changed = i.video != raw.video || i.audio != raw.audio;
                    let audio_changed = i.audio != raw.audio;
                    raw = i.clone();
                    info = i;
                    if audio_changed {
                        audio_conv = None;
                        audio_rx = None;
                        if let Some(a) = info
                            .audio
                            .clone()
                            .filter(|a| a.codec != crate::media::AudioCodec::Aac)
                        {
                            let (tx, arx) = tokio::sync::mpsc::channel(1024);
                            match transcode::AudioToAac::start(&a, tx) {
                                Ok(c) => {
                                    info!(codec = ?a.codec, "converting the audio to AAC");
                                    audio_conv = Some(c);
                                    audio_rx = Some(arx);
                                }
                                Err(e) => {
                                    warn!(error = %e, "audio cannot be converted to AAC; serving video only")
                                }
                            }
                        }
                    }
                    if let Some(c) = &audio_conv {
                        info.audio = Some(c.config.clone());
                    }
                    if info.video.is_none() {
                        continue;
                    }
                    let o = match &output {
                        None => {
                            let o = self.attach(&stream, info.clone());
                            output = Some(o.clone());
                            o
                        }
                        Some(o) if changed => {
                            for r in &o.renditions {
                                r.restart(&info, stream.epoch);
                            }
                            o.clone()
                        }
                        Some(_) => continue,
                    };
                    // (Re)start the ladder for this configuration.
                    ladder = None;
                    ladder_rx = None;
                    if let Some(tc) = &self.transcode {
                        let (tx, lrx) = tokio::sync::mpsc::channel(1024);
                        match Ladder::start(&stream.name, &info, tc, tx, self.metrics.clone()) {
                            Ok(Some(l)) => {
                                rung_to_rendition = l
                                    .rungs
                                    .iter()
                                    .map(|rung| {
                                        o.renditions.iter().position(|r| r.name == rung.name)
                                    })
                                    .collect();
                                ladder = Some(l);
                                ladder_rx = Some(lrx);
                            }
                            Ok(None) => {
                                rung_to_rendition.clear();
                                end_transcoded(&o);
                            }
                            Err(e) => {
                                warn!(error = %e, "transcoding unavailable; serving the source only");
                                rung_to_rendition.clear();
                                end_transcoded(&o);
                            }
                        }
                    }
                }
                Ok(StreamEvent::Frame(f)) => {
                    if let Some(o) = &output {
                        if f.track == crate::media::TrackKind::Video {
                            if let Some(l) = &mut ladder {
                                l.push(&f);
                            }
                            o.renditions[0].push(f, &self.metrics);
                        } else if let Some(c) = &audio_conv {
                            c.push(f);
                        } else {
                            // Audio is passed through into every rendition.
                            for r in &o.renditions {
                                r.push(f.clone(), &self.metrics);
                            }
                        }
                    }
                }
                Ok(StreamEvent::End) | Err(broadcast::error::RecvError::Closed) => break,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    warn!(lost = n, "packager fell behind the relay; frames lost");
                }
            }
        }
        drop(ladder);
        // Encoded frames still in flight belong to the stream's end.
        if let (Some(o), Some(mut lrx)) = (&output, ladder_rx.take()) {
            while let Ok(Some(t)) =
                tokio::time::timeout(Duration::from_millis(500), lrx.recv()).await
            {
                self.transcoded(o, t, &rung_to_rendition);
            }
        }
        let Some(o) = output else { return };
        for r in &o.renditions {
            r.lock().end(now_ms());
            r.bump();
        }
        info!("stream ended; playlist closed with EXT-X-ENDLIST");
        // Keep the ended stream for one window (players finish, the VOD view stays), then free.
        let keep = Duration::from_secs(
            u64::from(self.cfg.target_duration_s) * (self.cfg.window_segments as u64 + 3),
        );
        let epoch = stream.epoch;
        tokio::time::sleep(keep).await;
        let mut m = self.outputs.lock().unwrap_or_else(|p| p.into_inner());
        if m.get(&o.name).is_some_and(|cur| {
            Arc::ptr_eq(cur, &o) && *cur.epoch.lock().unwrap_or_else(|p| p.into_inner()) == epoch
        }) {
            m.remove(&o.name);
            info!("output freed");
        }
    }

    /// Feeds what the ladder produced into the transcoded renditions.
    fn transcoded(&self, o: &Output, t: transcode::Output, map: &[Option<usize>]) {
        let rendition = |i: usize| {
            map.get(i)
                .copied()
                .flatten()
                .and_then(|x| o.renditions.get(x))
        };
        match t {
            transcode::Output::Config(i, vc) => {
                if let Some(r) = rendition(i) {
                    let mut info = r.info.lock().unwrap_or_else(|p| p.into_inner());
                    info.video = Some(vc);
                    r.lock().set_info(info.clone());
                }
            }
            transcode::Output::Frame(i, f) => {
                if let Some(r) = rendition(i) {
                    r.push(f, &self.metrics);
                }
            }
            transcode::Output::Stopped(i) => {
                if let Some(r) = rendition(i) {
                    r.lock().end(now_ms());
                    r.bump();
                }
            }
        }
    }

    /// The output for a new relayed stream: a fresh one, or the previous one of that name
    /// continued with a discontinuity (same stream published again).
    fn attach(&self, stream: &LiveStream, info: StreamInfo) -> Arc<Output> {
        let mut m = self.outputs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(o) = m.get(&stream.name) {
            *o.epoch.lock().unwrap_or_else(|p| p.into_inner()) = stream.epoch;
            for r in &o.renditions {
                r.restart(&info, stream.epoch);
            }
            info!("stream published again: continuing its playlist after a discontinuity");
            return o.clone();
        }
        // Every rendition starts at the same media sequence number, so that the same MSN is
        // the same media time in all of them.
        let msn = first_msn(now_ms());
        let rendition = |name: &str, info: StreamInfo| {
            Arc::new(Rendition {
                name: name.into(),
                stream: stream.name.clone(),
                packager: Mutex::new(Packager::new(
                    self.packager_config(),
                    info.clone(),
                    msn,
                    stream.epoch,
                )),
                version: watch::channel(Position::default()).0,
                rendered: Mutex::new(HashMap::new()),
                changed_us: std::sync::atomic::AtomicU64::new(0),
                info: Mutex::new(info),
                drop_logged_ms: std::sync::atomic::AtomicU64::new(0),
            })
        };
        let mut renditions = vec![rendition(SOURCE, info.clone())];
        if let (Some(tc), Some(size)) = (
            &self.transcode,
            info.video
                .as_ref()
                .and_then(|v| crate::media::avc_dimensions(&v.record)),
        ) {
            for rung in transcode::plan(size, &tc.wanted()) {
                // Video configuration arrives from the encoder before its first frame.
                let ri = StreamInfo {
                    video: None,
                    ..info.clone()
                };
                renditions.push(rendition(&rung.name, ri));
            }
        }
        let o = Arc::new(Output {
            name: stream.name.clone(),
            renditions,
            epoch: Mutex::new(stream.epoch),
        });
        m.insert(stream.name.clone(), o.clone());
        o
    }
}

/// Ends the transcoded renditions of `o` (no ladder for the current configuration).
fn end_transcoded(o: &Output) {
    for r in o.renditions.iter().filter(|r| r.name != SOURCE) {
        r.lock().end(now_ms());
        r.bump();
    }
}

// ---- HTTP ------------------------------------------------------------------------------------

type Resp = Response<Full<Bytes>>;

fn stamped(mut r: Resp, changed_us: u64) -> Resp {
    if let Ok(v) = hyper::header::HeaderValue::from_str(&changed_us.to_string()) {
        r.headers_mut().insert("livepop-changed-us", v);
    }
    r
}

fn resp(status: StatusCode, ctype: &str, cache: &str, body: Bytes) -> Resp {
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .header("cache-control", cache)
        .header("access-control-allow-origin", "*")
        .header(
            "access-control-expose-headers",
            "age, date, content-length, livepop-changed-us",
        )
        .body(Full::new(body))
        .unwrap_or_default()
}

fn error(status: StatusCode, msg: &str) -> Resp {
    // Failures are cached briefly (appendix B.1), so a burst of viewers does not hammer us.
    resp(
        status,
        "text/plain",
        "max-age=1",
        Bytes::from(format!("{msg}\n")),
    )
}

/// A refusal of something that does not exist *yet* (a part or segment past the live edge, a
/// directive too far ahead): never stored by a cache, so one viewer asking ahead cannot turn
/// media that appears a moment later into an error for everyone else.
fn not_yet(status: StatusCode, msg: &str) -> Resp {
    resp(
        status,
        "text/plain",
        "no-store",
        Bytes::from(format!("{msg}\n")),
    )
}

const M3U8: &str = "application/vnd.apple.mpegurl";

impl Origin {
    /// Serves HTTP/1.1 and h2c on `listener` until shutdown, within the configured limits.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: Shutdown) {
        let limits = self.cfg.limits();
        let refused = self.metrics.origin_refused.clone();
        let on_refused: crate::limits::OnTrip =
            Arc::new(move |reason| refused.with_label_values(&[reason]).inc());
        let me = self.clone();
        let handler: crate::httpd::Handler =
            Arc::new(move |req: Request<hyper::body::Incoming>| {
                let me = me.clone();
                Box::pin(async move {
                    let uri = me.cfg.access_log.then(|| req.uri().to_string());
                    let method = req.method().clone();
                    let resp = me.handle(req).await;
                    if let Some(uri) = uri {
                        info!(%method, uri, status = resp.status().as_u16(), "origin request");
                    }
                    resp
                })
            });
        crate::httpd::serve(
            "origin", listener, limits, true, handler, on_refused, shutdown,
        )
        .await
    }

    /// Answers one request.
    pub async fn handle<B>(&self, req: Request<B>) -> Resp {
        if req.method() == Method::OPTIONS {
            return Response::builder()
                .status(StatusCode::NO_CONTENT)
                .header("access-control-allow-origin", "*")
                .header("access-control-allow-methods", "GET, HEAD, OPTIONS")
                .header("access-control-max-age", "86400")
                .body(Full::new(Bytes::new()))
                .unwrap_or_default();
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
        }
        let path = req.uri().path().to_string();
        let query = req.uri().query().map(str::to_string);
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match parts.as_slice() {
            ["live", "streams.json"] => self.streams(),
            ["live", name, "master.m3u8"] => self.master(name).await,
            ["live", name, rend, file] => {
                let Some(o) = self.output(name) else {
                    return error(StatusCode::NOT_FOUND, "no such stream");
                };
                let Some(r) = o.rendition(rend).cloned() else {
                    return error(StatusCode::NOT_FOUND, "no such rendition");
                };
                if *file == "index.m3u8" {
                    self.media_playlist(&o, &r, query.as_deref()).await
                } else {
                    self.media_file(&r, file).await
                }
            }
            _ => error(StatusCode::NOT_FOUND, "not found"),
        }
    }

    fn hold_limit(&self) -> Duration {
        // §6.2.5.2: a blocking request is answered 503 after 3 target durations.
        Duration::from_secs(3 * u64::from(self.cfg.target_duration_s))
    }

    async fn master(&self, name: &str) -> Resp {
        let Some(o) = self.output(name) else {
            return error(StatusCode::NOT_FOUND, "no such stream");
        };
        // Right after a publish starts, wait (bounded) for the first part so that CODECS and
        // RESOLUTION come from the real stream.
        let deadline = tokio::time::Instant::now() + self.hold_limit();
        for r in &o.renditions {
            let mut rx = r.version.subscribe();
            loop {
                let pos = *rx.borrow_and_update();
                if pos.last_part.is_some() || (pos.ended && r.name != SOURCE) {
                    break;
                }
                if tokio::time::timeout_at(deadline, rx.changed())
                    .await
                    .is_err()
                {
                    if r.name == SOURCE {
                        return error(StatusCode::SERVICE_UNAVAILABLE, "stream has no media yet");
                    }
                    break; // a rendition that is late is left out of this answer
                }
            }
        }
        resp(
            StatusCode::OK,
            M3U8,
            "max-age=1",
            Bytes::from(hls::render_multivariant(&offered(&o))),
        )
    }

    /// `/live/streams.json`: the streams this core has output for, with their renditions, for
    /// stream pickers (the player page). Short-lived like a master playlist.
    fn streams(&self) -> Resp {
        let outputs: Vec<Arc<Output>> = {
            let m = self.outputs.lock().unwrap_or_else(|p| p.into_inner());
            m.values().cloned().collect()
        };
        let mut list: Vec<serde_json::Value> = outputs
            .iter()
            .map(|o| {
                let live = !o.renditions[0].lock().playlist.ended;
                let renditions: Vec<serde_json::Value> = offered(o)
                    .iter()
                    .map(|v| {
                        serde_json::json!({
                            "uri": v.uri,
                            "width": v.resolution.map(|r| r.0),
                            "height": v.resolution.map(|r| r.1),
                            "bandwidth": v.bandwidth,
                            "codecs": v.codecs,
                        })
                    })
                    .collect();
                serde_json::json!({
                    "name": o.name,
                    "live": live,
                    "url": format!("/live/{}/master.m3u8", o.name),
                    "renditions": renditions,
                })
            })
            .collect();
        list.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        resp(
            StatusCode::OK,
            "application/json",
            "max-age=1",
            Bytes::from(serde_json::json!({ "streams": list }).to_string()),
        )
    }

    async fn media_playlist(&self, o: &Output, r: &Rendition, query: Option<&str>) -> Resp {
        let d = match Directives::parse(query) {
            Ok(d) => d,
            Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
        };
        let mut rx = r.version.subscribe();
        let blocking = d.msn.is_some();
        if let Some(msn) = d.msn {
            {
                let p = r.lock();
                if !p.playlist.ended {
                    if let Err(e) = too_far_ahead(&p, msn, d.part) {
                        return not_yet(StatusCode::BAD_REQUEST, &e);
                    }
                }
            }
            let deadline = tokio::time::Instant::now() + self.hold_limit();
            loop {
                // §6.2.5.2: a playlist with EXT-X-ENDLIST ignores the directives.
                if rx.borrow_and_update().satisfies(msn, d.part) {
                    break;
                }
                if tokio::time::timeout_at(deadline, rx.changed())
                    .await
                    .is_err()
                {
                    return error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the requested segment or part did not appear within 3 target durations",
                    );
                }
            }
        }
        let body = self.rendered(o, r, d.skip);
        let td = u64::from(self.cfg.target_duration_s);
        let ended = r.lock().playlist.ended;
        let cache = if ended {
            // An ended playlist answers every blocking reload at once; the stream may be
            // published again any moment, continuing the same sequence numbers, and an edge
            // must not keep answering the new session's parts with the old ENDLIST.
            "max-age=1".to_string()
        } else if blocking {
            format!("max-age={}", 6 * td)
        } else {
            // Non-blocking reloads: about half a target duration (at least 1 s).
            format!("max-age={}", (td / 2).max(1))
        };
        stamped(resp(StatusCode::OK, M3U8, &cache, body), r.changed_us())
    }

    /// The playlist rendered for the current version, shared by every waiter of that version.
    fn rendered(&self, o: &Output, r: &Rendition, skip: bool) -> Bytes {
        let version = r.version.borrow().seq;
        if let Some((v, b)) = r
            .rendered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&skip)
        {
            if *v == version {
                return b.clone();
            }
        }
        let reports: Vec<RenditionReport> = o
            .renditions
            .iter()
            .filter(|x| x.name != r.name)
            .filter_map(|x| {
                let (last_msn, last_part) = x.lock().playlist.last_part()?;
                Some(RenditionReport {
                    uri: format!("../{}/index.m3u8", x.name),
                    last_msn,
                    last_part,
                })
            })
            .collect();
        let p = r.lock();
        let version = r.version.borrow().seq;
        let b = Bytes::from(p.playlist.render(skip, &reports));
        drop(p);
        r.rendered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(skip, (version, b.clone()));
        b
    }

    async fn media_file(&self, r: &Rendition, file: &str) -> Resp {
        let td = u64::from(self.cfg.target_duration_s);
        let (msn, part) = match hls::ObjectName::parse(file) {
            Some(hls::ObjectName::Init(_)) => {
                return match r.lock().init_segment(file) {
                    Some(b) => resp(StatusCode::OK, "video/mp4", "max-age=86400", b),
                    None => error(StatusCode::NOT_FOUND, "no such init segment"),
                };
            }
            Some(hls::ObjectName::Segment(m)) => (m, None),
            Some(hls::ObjectName::Part(m, p)) => (m, Some(p)),
            Some(hls::ObjectName::Playlist) | None => {
                return error(StatusCode::NOT_FOUND, "not found");
            }
        };
        let mut rx = r.version.subscribe();
        let deadline = tokio::time::Instant::now() + self.hold_limit();
        loop {
            let found = {
                let p = r.lock();
                match part {
                    Some(i) => p.part(msn, i),
                    None => p.segment(msn),
                }
            };
            match found {
                Lookup::Ready(b) => {
                    // Parts live about 6 target durations at most (appendix B.1); segments long.
                    let cache = match part {
                        Some(_) => format!("max-age={}", 6 * td),
                        None => "max-age=86400".to_string(),
                    };
                    return stamped(resp(StatusCode::OK, "video/mp4", &cache, b), r.changed_us());
                }
                Lookup::Missing => {
                    return if r.lock().is_ahead(msn, part) {
                        not_yet(StatusCode::NOT_FOUND, "part or segment not yet available")
                    } else {
                        error(StatusCode::NOT_FOUND, "no such part or segment")
                    };
                }
                // A preload-hinted part (or an in-progress segment): hold until complete.
                Lookup::Pending => {
                    if tokio::time::timeout_at(deadline, rx.changed())
                        .await
                        .is_err()
                    {
                        return error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "part not completed in time",
                        );
                    }
                }
            }
        }
    }
}

/// §6.2.5.2: _HLS_msn more than two past the last segment, or _HLS_part beyond the Advance
/// Part Limit (3 / PART-TARGET parts when PART-TARGET < 1 s, else 3), is refused at once.
fn too_far_ahead(p: &Packager, msn: u64, part: Option<u64>) -> Result<(), String> {
    let last_msn = p.playlist.segments.last().map_or(0, |s| s.msn);
    if p.playlist.segments.is_empty() {
        return Ok(());
    }
    if msn > last_msn.saturating_add(2) {
        return Err(format!(
            "_HLS_msn={msn} is more than two segments past the last ({last_msn})"
        ));
    }
    if let Some(part) = part {
        let pt = p.part_target();
        let limit = if pt < 1.0 {
            (3.0 / pt).floor() as u64
        } else {
            3
        };
        let per_seg = (f64::from(p.playlist.config.target_duration) / pt)
            .round()
            .max(1.0) as u64;
        let (lm, lp) = p.playlist.last_part().unwrap_or((last_msn, 0));
        // Saturating: the directives are the client's numbers (u64::MAX included).
        let want = msn.saturating_mul(per_seg).saturating_add(part);
        let have = lm.saturating_mul(per_seg).saturating_add(lp);
        if want > have.saturating_add(limit) {
            return Err(format!(
                "_HLS_part={part} of segment {msn} is more than {limit} parts past the last part"
            ));
        }
    }
    Ok(())
}

/// The renditions a multivariant playlist offers: those with media (a stopped or not yet
/// started one is left out).
fn offered(o: &Output) -> Vec<Variant> {
    o.renditions
        .iter()
        .filter_map(|r| {
            let info = r.info.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let p = r.lock();
            if info.video.is_none()
                || p.playlist.last_part().is_none()
                || (r.name != SOURCE && p.playlist.ended && !o.renditions[0].lock().playlist.ended)
            {
                return None;
            }
            Some(variant(&r.name, &info, &p))
        })
        .collect()
}

fn variant(name: &str, info: &StreamInfo, p: &Packager) -> Variant {
    let mut codecs = vec![];
    if let Some(v) = &info.video {
        codecs.push(crate::cmaf::video_codec_string(v));
    }
    if let Some(a) = &info.audio {
        if a.codec == crate::media::AudioCodec::Aac {
            codecs.push(crate::cmaf::audio_codec_string(a));
        }
    }
    let resolution = info
        .video
        .as_ref()
        .and_then(|v| crate::media::avc_dimensions(&v.record))
        .or_else(|| Some((info.metadata.width?, info.metadata.height?)));
    let (avg, peak) = p.bitrates();
    Variant {
        uri: format!("{name}/index.m3u8"),
        bandwidth: peak.max(avg).max(1),
        average_bandwidth: avg.max(1),
        codecs: codecs.join(","),
        resolution,
        // The publisher's declared rate when the measured one agrees with it (the measurement
        // is coarse early in a stream); otherwise what was measured.
        frame_rate: match (p.frame_rate(), info.metadata.frame_rate.map(f64::from)) {
            (Some(m), Some(d)) if d > 0.0 && (m - d).abs() / d < 0.02 => Some(d),
            (m, d) => m.or(d),
        },
    }
}
