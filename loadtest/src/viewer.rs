//! One simulated player, behaving like hls.js: multivariant playlist, a rendition (fixed or ABR
//! from measured throughput), then for LL-HLS the live edge minus PART-HOLD-BACK, parts one by
//! one, a blocking playlist reload for the next part together with the preload-hinted part;
//! for plain HLS, segments and a playlist reload every target duration. A simulated playback
//! buffer counts stalls. Errors are counted and the player carries on (after a short pause, at
//! the live edge if it fell out of the window), as a real player would.

use crate::hls::{self, MediaPlaylist};
use crate::http::{self, Fetched, ViewerClient};
use crate::stats::{Kind, Stats};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Which rendition a viewer plays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// Throughput-based ABR (switches at segment boundaries).
    Auto,
    /// The highest bandwidth.
    Highest,
    /// The lowest bandwidth.
    Lowest,
    /// The variant whose URI contains this text (e.g. "360p").
    Named(String),
}

impl std::str::FromStr for Choice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => Choice::Auto,
            "highest" => Choice::Highest,
            "lowest" => Choice::Lowest,
            "" => return Err("empty rendition".into()),
            other => Choice::Named(other.to_string()),
        })
    }
}

/// How viewers follow a playlist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// LL-HLS when the playlist offers parts and blocking reloads, else plain HLS.
    Auto,
    /// Plain HLS even on an LL-HLS playlist: whole segments, reloads every target duration.
    Plain,
}

/// What every viewer shares.
pub struct Shared {
    /// Measurements.
    pub stats: Arc<Stats>,
    /// Requests still allowed (the run's request cap).
    pub budget: AtomicU64,
    /// End of the run.
    pub deadline: tokio::time::Instant,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Rendition choice.
    pub choice: Choice,
    /// Follow mode.
    pub mode: Mode,
}

/// The simulated playback buffer: media seconds ahead of the playhead, drained in real time
/// once playback started; running dry after start-up is a stall, which ends when at least
/// `resume` seconds are buffered again.
#[derive(Debug)]
pub struct Playback {
    started: bool,
    buffered: f64,
    last: Instant,
    stalled_since: Option<Instant>,
    resume: f64,
}

impl Playback {
    /// An empty buffer; playback resumes after a stall once `resume` seconds are buffered.
    pub fn new(now: Instant, resume: f64) -> Self {
        Playback {
            started: false,
            buffered: 0.0,
            last: now,
            stalled_since: None,
            resume,
        }
    }

    fn drain(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        if !self.started || self.stalled_since.is_some() {
            return;
        }
        if elapsed >= self.buffered {
            // Ran dry `buffered` seconds after the previous update.
            self.stalled_since = Some(now - Duration::from_secs_f64(elapsed - self.buffered));
            self.buffered = 0.0;
        } else {
            self.buffered -= elapsed;
        }
    }

    /// Media of `secs` arrived at `now`; returns a stall that just ended.
    pub fn append(&mut self, secs: f64, now: Instant) -> Option<Duration> {
        self.drain(now);
        self.buffered += secs;
        self.started = true;
        if let Some(since) = self.stalled_since {
            if self.buffered >= self.resume {
                self.stalled_since = None;
                return Some(now.saturating_duration_since(since));
            }
        }
        None
    }

    /// At the end of the run: a stall still going on, with its length so far.
    pub fn finish(&mut self, now: Instant) -> Option<Duration> {
        self.drain(now);
        self.stalled_since
            .take()
            .map(|s| now.saturating_duration_since(s))
    }

    /// Seconds buffered ahead of the playhead.
    #[cfg(test)]
    pub fn buffered(&mut self, now: Instant) -> f64 {
        self.drain(now);
        self.buffered
    }
}

/// The variant to play: by choice, or by throughput (ABR: the highest whose bandwidth is
/// under 80% of the measured throughput, else the lowest; the first listed before any
/// measurement, as hls.js starts).
pub fn choose(variants: &[hls::Variant], choice: &Choice, throughput: Option<f64>) -> usize {
    let by_bw = |rev: bool| {
        let mut idx: Vec<usize> = (0..variants.len()).collect();
        idx.sort_by_key(|i| variants[*i].bandwidth);
        if rev {
            idx.reverse();
        }
        idx
    };
    match choice {
        Choice::Highest => by_bw(true)[0],
        Choice::Lowest => by_bw(false)[0],
        Choice::Named(n) => variants
            .iter()
            .position(|v| v.uri.contains(n.as_str()))
            .unwrap_or(0),
        Choice::Auto => match throughput {
            None => 0,
            Some(t) => by_bw(true)
                .into_iter()
                .find(|i| (variants[*i].bandwidth as f64) < 0.8 * t)
                .unwrap_or_else(|| by_bw(false)[0]),
        },
    }
}

struct Viewer {
    shared: Arc<Shared>,
    client: ViewerClient,
    master_url: String,
    variants: Vec<hls::Variant>,
    current: usize,
    media_url: String,
    playback: Playback,
    init: Option<String>,
    /// Throughput estimate, bits per second (EWMA of part and segment downloads).
    throughput: Option<f64>,
}

/// Runs one viewer until the deadline or the request cap.
pub async fn run(shared: Arc<Shared>, client: ViewerClient, url: String) {
    shared.stats.viewer(1);
    let mut v = Viewer {
        playback: Playback::new(Instant::now(), 0.0),
        shared: shared.clone(),
        client,
        master_url: url.clone(),
        variants: vec![],
        current: 0,
        media_url: url.clone(),
        init: None,
        throughput: None,
    };
    // No request starts after the deadline; those in flight finish (each within the request
    // timeout), so the report counts every request the server saw.
    let _ = tokio::time::timeout_at(shared.deadline + shared.timeout * 2, v.play(url)).await;
    if let Some(d) = v.playback.finish(Instant::now()) {
        shared.stats.stall(d);
    }
    shared.stats.viewer(-1);
}

/// Why a viewer stops early.
struct Stop;

impl Viewer {
    async fn fetch(&self, kind: Kind, url: &str) -> Result<Fetched, Stop> {
        if tokio::time::Instant::now() >= self.shared.deadline {
            return Err(Stop);
        }
        // The cap: every viewer stops once the run made its allowed number of requests.
        if self
            .shared
            .budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
            .is_err()
        {
            return Err(Stop);
        }
        let f = http::get(&self.client, url, self.shared.timeout).await;
        self.shared
            .stats
            .request(kind, &f.outcome, f.ttfb, f.total, f.body.len());
        if let Some(v) = f.version {
            self.shared.stats.version(v);
        }
        Ok(f)
    }

    /// A pause after an error, so that a failing server is not hammered in a loop.
    async fn pause(&self) {
        self.sleep(Duration::from_millis(500)).await;
    }

    /// Sleeps, but not past the end of the run.
    async fn sleep(&self, d: Duration) {
        let until = (tokio::time::Instant::now() + d).min(self.shared.deadline);
        tokio::time::sleep_until(until).await;
    }

    async fn play(&mut self, url: String) -> Result<(), Stop> {
        // The multivariant playlist (or a media playlist given directly).
        let first = loop {
            let f = self.fetch(Kind::Master, &url).await?;
            if f.ok() {
                break f;
            }
            self.pause().await;
        };
        let text = String::from_utf8_lossy(&first.body).to_string();
        match hls::parse_multivariant(&text) {
            Ok(vs) => {
                self.variants = vs;
                self.current = self.pick(None);
                self.media_url = hls::resolve(&url, &self.variants[self.current].uri);
            }
            Err(_) => {
                self.variants = vec![hls::Variant {
                    uri: url.clone(),
                    bandwidth: 0,
                    height: None,
                }];
                self.media_url = url.clone();
            }
        }
        loop {
            let pl = self.playlist(None).await?;
            let ll = pl.low_latency() && self.shared.mode == Mode::Auto;
            if ll {
                self.follow_parts(pl).await?;
            } else {
                self.follow_segments(pl).await?;
            }
        }
    }

    /// The rendition to play (see `choose`).
    fn pick(&self, throughput: Option<f64>) -> usize {
        choose(&self.variants, &self.shared.choice, throughput)
    }

    fn measure(&mut self, f: &Fetched, media_secs: f64) {
        // Only downloads that were not held by the server say something about bandwidth: use
        // the time after the first byte, for objects big enough to measure.
        let Some(ttfb) = f.ttfb else { return };
        let xfer = f.total.saturating_sub(ttfb).as_secs_f64();
        if f.body.len() < 16 * 1024 || xfer <= 0.0 || media_secs <= 0.0 {
            return;
        }
        let bps = f.body.len() as f64 * 8.0 / xfer;
        self.throughput = Some(match self.throughput {
            None => bps,
            Some(t) => 0.7 * t + 0.3 * bps,
        });
    }

    /// ABR at a segment boundary: maybe switch rendition.
    fn maybe_switch(&mut self) -> bool {
        if self.shared.choice != Choice::Auto || self.variants.len() < 2 {
            return false;
        }
        let want = self.pick(self.throughput);
        if want == self.current {
            return false;
        }
        self.current = want;
        self.media_url = hls::resolve(&self.master_url, &self.variants[want].uri);
        self.init = None;
        self.shared.stats.switch();
        true
    }

    async fn playlist(&mut self, directive: Option<(u64, usize)>) -> Result<MediaPlaylist, Stop> {
        let mut directive = directive;
        loop {
            let (kind, url) = match directive {
                Some(pos) => (Kind::PlaylistHold, self.hold_url(pos)),
                None => (Kind::Playlist, self.media_url.clone()),
            };
            let f = self.fetch(kind, &url).await?;
            if f.ok() {
                match hls::parse_media(&String::from_utf8_lossy(&f.body)) {
                    Ok(pl) => return Ok(pl),
                    Err(_) => self.shared.stats.request(
                        kind,
                        &crate::stats::Outcome::Transport,
                        None,
                        Duration::ZERO,
                        0,
                    ),
                }
            }
            self.pause().await;
            // After a failed blocking reload, carry on with plain reloads.
            directive = None;
        }
    }

    async fn ensure_init(&mut self, map: &Option<String>) -> Result<(), Stop> {
        let Some(m) = map else { return Ok(()) };
        let url = hls::resolve(&self.media_url, m);
        if self.init.as_deref() == Some(url.as_str()) {
            return Ok(());
        }
        let f = self.fetch(Kind::Init, &url).await?;
        if f.ok() {
            self.init = Some(url);
        }
        Ok(())
    }

    fn arrived(&mut self, secs: f64, latency_ms: Option<f64>, at: Instant) {
        if let Some(l) = latency_ms {
            self.shared.stats.latency(l);
        }
        if let Some(stall) = self.playback.append(secs, at) {
            self.shared.stats.stall(stall);
        }
    }

    /// LL-HLS: part by part from the live edge minus PART-HOLD-BACK.
    async fn follow_parts(&mut self, mut pl: MediaPlaylist) -> Result<(), Stop> {
        self.playback.resume = pl.part_target.unwrap_or(0.2);
        let Some(mut pos) = pl.start_part() else {
            self.pause().await;
            return Ok(());
        };
        // Parts fetched ahead through the preload hint, by URL.
        let mut ahead: HashMap<String, Fetched> = HashMap::new();
        loop {
            let first = pl.segments.first().map_or(0, |s| s.msn);
            if pos.0 < first {
                // Fell out of the window: start again at the live edge.
                self.shared.stats.resync();
                return Ok(());
            }
            let listed = pl.segment(pos.0);
            match listed {
                Some(seg) if pos.1 < seg.parts.len() => {
                    self.ensure_init(&seg.map).await?;
                    let part = &seg.parts[pos.1];
                    let offset: f64 = seg.parts[..pos.1].iter().map(|p| p.duration).sum();
                    if part.gap {
                        // Nothing to fetch; a player skips over it.
                        self.arrived(part.duration, None, Instant::now());
                    } else {
                        let url = hls::resolve(&self.media_url, &part.uri);
                        let f = match ahead.remove(&url) {
                            Some(f) => f,
                            None => self.fetch(Kind::Part, &url).await?,
                        };
                        if f.ok() {
                            let lat = seg.pdt_ms.map(|p| f.done_unix_ms - (p + offset * 1000.0));
                            self.measure(&f, part.duration);
                            self.arrived(part.duration, lat, Instant::now());
                        } else {
                            // Like a player whose retries ran out: skip the part (the buffer
                            // runs dry for its duration) and carry on from a fresh playlist.
                            self.pause().await;
                            pos.1 += 1;
                            pl = self.playlist(None).await?;
                            continue;
                        }
                    }
                    pos.1 += 1;
                }
                Some(seg) if seg.complete.is_some() => {
                    // A segment whose parts already left the playlist (the viewer is behind):
                    // fetched whole, as hls.js does.
                    if seg.parts.is_empty() && pos.1 == 0 && !seg.gap {
                        if let Some((uri, dur)) = &seg.complete {
                            self.ensure_init(&seg.map).await?;
                            let f = self
                                .fetch(Kind::Segment, &hls::resolve(&self.media_url, uri))
                                .await?;
                            if f.ok() {
                                let lat = seg.pdt_ms.map(|p| f.done_unix_ms - p);
                                self.measure(&f, *dur);
                                self.arrived(*dur, lat, Instant::now());
                            }
                        }
                    }
                    pos = (pos.0 + 1, 0);
                    ahead.clear();
                    if self.maybe_switch() {
                        pl = self.playlist(Some(pos)).await?;
                    }
                }
                _ => {
                    if pl.ended {
                        return Err(Stop);
                    }
                    // Not listed yet: a blocking reload for it, and the hinted part at once.
                    let hinted = pl
                        .preload_hint
                        .as_ref()
                        .filter(|_| pl.next_part() == Some(pos))
                        .map(|h| hls::resolve(&self.media_url, h));
                    let (new_pl, part) = match hinted {
                        Some(url) => {
                            let (a, b) =
                                tokio::join!(self.playlist_hold(pos), self.fetch_hint(url.clone()));
                            (a?, b?.map(|f| (url, f)))
                        }
                        None => (self.playlist_hold(pos).await?, None),
                    };
                    if let Some((url, f)) = part {
                        ahead.insert(url, f);
                    }
                    pl = match new_pl {
                        Some(p) => p,
                        None => {
                            self.pause().await;
                            self.playlist(None).await?
                        }
                    };
                }
            }
        }
    }

    /// The blocking reload (§6.2.5.2) for part `pos.1` of segment `pos.0`.
    fn hold_url(&self, pos: (u64, usize)) -> String {
        format!("{}?_HLS_msn={}&_HLS_part={}", self.media_url, pos.0, pos.1)
    }

    async fn playlist_hold(&self, pos: (u64, usize)) -> Result<Option<MediaPlaylist>, Stop> {
        let url = self.hold_url(pos);
        let f = self.fetch(Kind::PlaylistHold, &url).await?;
        Ok(f.ok()
            .then(|| hls::parse_media(&String::from_utf8_lossy(&f.body)).ok())
            .flatten())
    }

    async fn fetch_hint(&self, url: String) -> Result<Option<Fetched>, Stop> {
        let f = self.fetch(Kind::Part, &url).await?;
        Ok(f.ok().then_some(f))
    }
}

impl Viewer {
    /// Plain HLS: segments from three target durations behind the end, reloading the playlist
    /// every target duration (half of it when nothing new came, as RFC 8216 §6.3.4 says).
    async fn follow_segments(&mut self, mut pl: MediaPlaylist) -> Result<(), Stop> {
        let complete: Vec<u64> = pl
            .segments
            .iter()
            .filter(|s| s.complete.is_some())
            .map(|s| s.msn)
            .collect();
        let Some(mut msn) = complete.iter().rev().nth(2).or(complete.first()).copied() else {
            self.pause().await;
            return Ok(());
        };
        loop {
            let first = pl.segments.first().map_or(0, |s| s.msn);
            if msn < first {
                self.shared.stats.resync();
                return Ok(());
            }
            match pl.segment(msn).cloned() {
                Some(seg) if seg.complete.is_some() => {
                    let (uri, dur) = seg.complete.clone().unwrap_or_default();
                    self.ensure_init(&seg.map).await?;
                    if seg.gap {
                        self.arrived(dur, None, Instant::now());
                    } else {
                        let url = hls::resolve(&self.media_url, &uri);
                        let f = self.fetch(Kind::Segment, &url).await?;
                        if f.ok() {
                            let lat = seg.pdt_ms.map(|p| f.done_unix_ms - p);
                            self.measure(&f, dur);
                            self.arrived(dur, lat, Instant::now());
                        } else {
                            self.pause().await;
                        }
                    }
                    msn += 1;
                    if self.maybe_switch() {
                        pl = self.playlist(None).await?;
                    }
                }
                _ => {
                    if pl.ended {
                        return Err(Stop);
                    }
                    let wait = Duration::from_secs_f64((pl.target_duration / 2.0).max(0.1));
                    self.sleep(wait).await;
                    pl = self.playlist(None).await?;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn playback_counts_stalls_after_start_up_only() {
        let t0 = Instant::now();
        let mut p = Playback::new(t0, 0.2);
        // Nothing before start-up counts.
        assert_eq!(p.finish(t0 + Duration::from_secs(5)), None);
        let mut p = Playback::new(t0, 0.2);
        assert_eq!(p.append(1.0, t0), None);
        // 0.5 s later half a second is left.
        assert!((p.buffered(t0 + Duration::from_millis(500)) - 0.5).abs() < 1e-6);
        // Dry at t0+1 s; data at t0+1.3 s (0.1 s, below the resume mark), more at t0+1.4 s.
        assert_eq!(p.append(0.1, t0 + Duration::from_millis(1300)), None);
        let stall = p.append(0.2, t0 + Duration::from_millis(1400)).unwrap();
        assert!((stall.as_secs_f64() - 0.4).abs() < 1e-6, "{stall:?}");
        // Playing again: 0.3 s buffered, dry 0.3 s later, still stalled at the end.
        let end = p.finish(t0 + Duration::from_millis(2000)).unwrap();
        assert!((end.as_secs_f64() - 0.3).abs() < 1e-6, "{end:?}");
    }

    #[test]
    fn abr_takes_the_best_rendition_the_throughput_carries() {
        let v = |uri: &str, bandwidth| hls::Variant {
            uri: uri.into(),
            bandwidth,
            height: None,
        };
        let vs = [
            v("src", 3_000_000),
            v("360p", 800_000),
            v("480p", 1_500_000),
        ];
        assert_eq!(choose(&vs, &Choice::Auto, None), 0);
        assert_eq!(choose(&vs, &Choice::Auto, Some(10e6)), 0);
        assert_eq!(choose(&vs, &Choice::Auto, Some(2.5e6)), 2); // 1.5 < 0.8 × 2.5
        assert_eq!(choose(&vs, &Choice::Auto, Some(1.5e6)), 1);
        assert_eq!(choose(&vs, &Choice::Auto, Some(0.1e6)), 1); // nothing fits: the lowest
        assert_eq!(choose(&vs, &Choice::Highest, None), 0);
        assert_eq!(choose(&vs, &Choice::Lowest, None), 1);
        assert_eq!(choose(&vs, &Choice::Named("480".into()), None), 2);
    }

    #[test]
    fn choices_parse() {
        assert_eq!("auto".parse::<Choice>(), Ok(Choice::Auto));
        assert_eq!("360p".parse::<Choice>(), Ok(Choice::Named("360p".into())));
        assert!("".parse::<Choice>().is_err());
    }
}
