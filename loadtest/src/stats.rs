//! What the simulated viewers and publishers measured: HdrHistogram per request kind, part
//! latency, errors by status, stalls, and a per-second timeline for the live line and the plot.
//! One lock around plain counters: recording is a few adds, far cheaper than the request.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

/// Request kinds, as in the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Multivariant playlist.
    Master,
    /// Media playlist without directives (first load, plain HLS reloads).
    Playlist,
    /// Blocking playlist reload (`_HLS_msn`/`_HLS_part`): the time the server held it.
    PlaylistHold,
    /// A part (LL-HLS), including preload-hinted ones.
    Part,
    /// A whole segment (plain HLS).
    Segment,
    /// An init segment.
    Init,
}

impl Kind {
    /// Every kind, in report order.
    pub const ALL: [Kind; 6] = [
        Kind::Master,
        Kind::Playlist,
        Kind::PlaylistHold,
        Kind::Part,
        Kind::Segment,
        Kind::Init,
    ];

    /// Name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Master => "master",
            Kind::Playlist => "playlist",
            Kind::PlaylistHold => "playlist_hold",
            Kind::Part => "part",
            Kind::Segment => "segment",
            Kind::Init => "init",
        }
    }
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// An HTTP status (2xx is success, anything else an error).
    Status(u16),
    /// No answer within the request timeout.
    Timeout,
    /// Connection refused, reset, TLS failure, a body cut short...
    Transport,
}

impl Outcome {
    /// The error label, or None for success.
    pub fn error_label(&self) -> Option<String> {
        match self {
            Outcome::Status(s) if (200..300).contains(s) => None,
            Outcome::Status(s) => Some(s.to_string()),
            Outcome::Timeout => Some("timeout".into()),
            Outcome::Transport => Some("transport".into()),
        }
    }
}

fn hist() -> Histogram<u64> {
    // µs from 1 µs to 1 h, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

#[derive(Default)]
struct Second {
    requests: u64,
    errors: u64,
    latency: Option<Histogram<u64>>,
    stalls: u64,
}

struct Inner {
    total: BTreeMap<Kind, Histogram<u64>>,
    ttfb: BTreeMap<Kind, Histogram<u64>>,
    requests: BTreeMap<Kind, u64>,
    errors: BTreeMap<String, u64>,
    errors_by_kind: BTreeMap<(Kind, String), u64>,
    bytes: u64,
    latency: Histogram<u64>,
    stalls: u64,
    stall_time: Duration,
    stall_hist: Histogram<u64>,
    viewers_started: u64,
    viewers_active: i64,
    resyncs: u64,
    switches: u64,
    versions: BTreeMap<String, u64>,
    seconds: Vec<Second>,
    timeline: Vec<TimelinePoint>,
}

/// Shared measurements.
pub struct Stats {
    inner: Mutex<Inner>,
    start: std::time::Instant,
    /// Latency samples and stalls that begin earlier are left out of the summary (they stay
    /// on the timeline): viewers joining start behind the live edge.
    warmup: Duration,
}

/// One second of the run.
#[derive(Debug, Clone, Serialize)]
pub struct TimelinePoint {
    /// Seconds since the start.
    pub t: u64,
    /// Viewers running.
    pub viewers: i64,
    /// Requests finished in this second.
    pub requests: u64,
    /// Errors in this second.
    pub errors: u64,
    /// Part latency p50 / p99 in this second (ms), if any part arrived.
    pub latency_p50_ms: Option<f64>,
    /// See `latency_p50_ms`.
    pub latency_p99_ms: Option<f64>,
    /// Stalls that began in this second.
    pub stalls: u64,
}

/// Percentiles of one distribution, in ms.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Milliseconds.
    pub p50_ms: f64,
    /// Milliseconds.
    pub p90_ms: f64,
    /// Milliseconds.
    pub p99_ms: f64,
    /// Milliseconds.
    pub p999_ms: f64,
    /// Milliseconds.
    pub max_ms: f64,
}

fn percentiles(h: &Histogram<u64>) -> Percentiles {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Percentiles {
        count: h.len(),
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: h.max() as f64 / 1000.0,
    }
}

/// Per request kind.
#[derive(Debug, Clone, Serialize)]
pub struct KindReport {
    /// Requests.
    pub requests: u64,
    /// Of which errors (any status but 2xx, timeouts, transport failures).
    pub errors: u64,
    /// Time to first byte (response headers).
    pub ttfb: Option<Percentiles>,
    /// Time to the last byte.
    pub total: Option<Percentiles>,
}

/// The summary (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Seconds the run lasted.
    pub duration_s: f64,
    /// Seconds at the start left out of `latency` and the stall figures.
    pub warmup_s: f64,
    /// Viewers started.
    pub viewers: u64,
    /// Requests finished.
    pub requests: u64,
    /// Errors (non-2xx, timeouts, transport).
    pub errors: u64,
    /// Errors by label: HTTP status, "timeout", "transport".
    pub errors_by_status: BTreeMap<String, u64>,
    /// Per kind.
    pub kinds: BTreeMap<String, KindReport>,
    /// Body bytes received.
    pub bytes: u64,
    /// Part (or segment) latency: arrival of its last byte minus PROGRAM-DATE-TIME of its
    /// first sample.
    pub latency: Option<Percentiles>,
    /// Playback stalls after start-up.
    pub stalls: u64,
    /// Seconds stalled, all viewers together.
    pub stall_seconds: f64,
    /// Stall durations.
    pub stall_durations: Option<Percentiles>,
    /// Viewers that fell out of the playlist window and started again at the live edge.
    pub resyncs: u64,
    /// ABR rendition switches.
    pub switches: u64,
    /// Responses by HTTP version ("HTTP/1.1", "HTTP/2.0").
    pub http_versions: BTreeMap<String, u64>,
    /// Per second.
    pub timeline: Vec<TimelinePoint>,
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl Stats {
    /// Empty measurements; time starts now.
    pub fn new() -> Self {
        Stats {
            inner: Mutex::new(Inner {
                total: Kind::ALL.iter().map(|k| (*k, hist())).collect(),
                ttfb: Kind::ALL.iter().map(|k| (*k, hist())).collect(),
                requests: BTreeMap::new(),
                errors: BTreeMap::new(),
                errors_by_kind: BTreeMap::new(),
                bytes: 0,
                latency: hist(),
                stalls: 0,
                stall_time: Duration::ZERO,
                stall_hist: hist(),
                viewers_started: 0,
                viewers_active: 0,
                resyncs: 0,
                switches: 0,
                versions: BTreeMap::new(),
                seconds: vec![],
                timeline: vec![],
            }),
            start: std::time::Instant::now(),
            warmup: Duration::ZERO,
        }
    }

    /// Leaves the first `d` of the run out of the summary's latency and stalls.
    pub fn with_warmup(mut self, d: Duration) -> Self {
        self.warmup = d;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn second(&self, g: &mut Inner) -> usize {
        let s = self.start.elapsed().as_secs() as usize;
        if g.seconds.len() <= s {
            g.seconds.resize_with(s + 1, Second::default);
        }
        s
    }

    /// Records one finished request.
    pub fn request(
        &self,
        kind: Kind,
        outcome: &Outcome,
        ttfb: Option<Duration>,
        total: Duration,
        bytes: usize,
    ) {
        let mut g = self.lock();
        *g.requests.entry(kind).or_default() += 1;
        g.bytes += bytes as u64;
        let s = self.second(&mut g);
        g.seconds[s].requests += 1;
        match outcome.error_label() {
            None => {
                let us = |d: Duration| (d.as_micros() as u64).clamp(1, 3_600_000_000);
                if let Some(t) = ttfb {
                    let _ = g.ttfb.get_mut(&kind).map(|h| h.record(us(t)));
                }
                let _ = g.total.get_mut(&kind).map(|h| h.record(us(total)));
            }
            Some(label) => {
                g.seconds[s].errors += 1;
                *g.errors_by_kind.entry((kind, label.clone())).or_default() += 1;
                *g.errors.entry(label).or_default() += 1;
            }
        }
    }

    /// Records a part's (or segment's) latency.
    pub fn latency(&self, ms: f64) {
        let us = (ms * 1000.0).clamp(1.0, 3.6e9) as u64;
        let mut g = self.lock();
        if self.start.elapsed() >= self.warmup {
            let _ = g.latency.record(us);
        }
        let s = self.second(&mut g);
        let _ = g.seconds[s].latency.get_or_insert_with(hist).record(us);
    }

    /// Records a stall (after start-up) that lasted `d`.
    pub fn stall(&self, d: Duration) {
        let mut g = self.lock();
        if self.start.elapsed().saturating_sub(d) >= self.warmup {
            g.stalls += 1;
            g.stall_time += d;
            let _ = g
                .stall_hist
                .record((d.as_micros() as u64).clamp(1, 3_600_000_000));
        }
        let s = self.second(&mut g);
        g.seconds[s].stalls += 1;
    }

    /// A viewer started (+1) or ended (-1).
    pub fn viewer(&self, delta: i64) {
        let mut g = self.lock();
        if delta > 0 {
            g.viewers_started += delta as u64;
        }
        g.viewers_active += delta;
    }

    /// A viewer fell out of the window and started again at the live edge.
    pub fn resync(&self) {
        self.lock().resyncs += 1;
    }

    /// A response arrived over HTTP version `v`.
    pub fn version(&self, v: http::Version) {
        *self.lock().versions.entry(format!("{v:?}")).or_default() += 1;
    }

    /// A viewer switched rendition.
    pub fn switch(&self) {
        self.lock().switches += 1;
    }

    /// When time started (second 0 begins here).
    pub fn started(&self) -> std::time::Instant {
        self.start
    }

    /// Closes second `t - 1` (call at `started() + t` s): one live line, and a point on the
    /// timeline.
    pub fn tick(&self, t: u64) -> String {
        let mut g = self.lock();
        let idx = t.saturating_sub(1) as usize;
        if g.seconds.len() <= idx {
            g.seconds.resize_with(idx + 1, Second::default);
        }
        let sec = std::mem::take(&mut g.seconds[idx]);
        let (p50, p99) = match &sec.latency {
            Some(h) => (
                Some(h.value_at_quantile(0.5) as f64 / 1000.0),
                Some(h.value_at_quantile(0.99) as f64 / 1000.0),
            ),
            None => (None, None),
        };
        let point = TimelinePoint {
            t,
            viewers: g.viewers_active,
            requests: sec.requests,
            errors: sec.errors,
            latency_p50_ms: p50,
            latency_p99_ms: p99,
            stalls: sec.stalls,
        };
        let line = format!(
            "t={:>4}s viewers={:<6} req/s={:<7} errors={:<5} latency p50={} p99={} stalls={} (total {})",
            t,
            point.viewers,
            point.requests,
            point.errors,
            p50.map_or("-".into(), |v| format!("{v:.0}ms")),
            p99.map_or("-".into(), |v| format!("{v:.0}ms")),
            point.stalls,
            g.stalls,
        );
        g.timeline.push(point);
        line
    }

    /// The summary so far.
    pub fn summary(&self) -> Summary {
        let g = self.lock();
        let kinds = Kind::ALL
            .iter()
            .filter(|k| g.requests.get(k).copied().unwrap_or(0) > 0)
            .map(|k| {
                let errors = g
                    .errors_by_kind
                    .iter()
                    .filter(|((kk, _), _)| kk == k)
                    .map(|(_, n)| n)
                    .sum();
                let nonempty =
                    |h: Option<&Histogram<u64>>| h.filter(|h| !h.is_empty()).map(percentiles);
                (
                    k.name().to_string(),
                    KindReport {
                        requests: g.requests[k],
                        errors,
                        ttfb: nonempty(g.ttfb.get(k)),
                        total: nonempty(g.total.get(k)),
                    },
                )
            })
            .collect();
        Summary {
            duration_s: self.start.elapsed().as_secs_f64(),
            warmup_s: self.warmup.as_secs_f64(),
            viewers: g.viewers_started,
            requests: g.requests.values().sum(),
            errors: g.errors.values().sum(),
            errors_by_status: g.errors.clone(),
            kinds,
            bytes: g.bytes,
            latency: (!g.latency.is_empty()).then(|| percentiles(&g.latency)),
            stalls: g.stalls,
            stall_seconds: g.stall_time.as_secs_f64(),
            stall_durations: (!g.stall_hist.is_empty()).then(|| percentiles(&g.stall_hist)),
            resyncs: g.resyncs,
            switches: g.switches,
            http_versions: g.versions.clone(),
            timeline: g.timeline.clone(),
        }
    }
}

/// The human summary.
pub fn render(s: &Summary) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "\nsummary: {:.1} s, {} viewers, {} requests ({:.0}/s), {} errors, {:.1} MB received",
        s.duration_s,
        s.viewers,
        s.requests,
        s.requests as f64 / s.duration_s.max(0.001),
        s.errors,
        s.bytes as f64 / 1e6
    );
    let p = |p: &Option<Percentiles>| match p {
        Some(p) => format!(
            "p50 {:>8.1}  p90 {:>8.1}  p99 {:>8.1}  p99.9 {:>8.1}  max {:>8.1}",
            p.p50_ms, p.p90_ms, p.p99_ms, p.p999_ms, p.max_ms
        ),
        None => "-".into(),
    };
    let _ = writeln!(o, "{:<22} {:>9} {:>7}  (ms)", "kind", "requests", "errors");
    for (k, r) in &s.kinds {
        let _ = writeln!(
            o,
            "{:<22} {:>9} {:>7}  total {}",
            k,
            r.requests,
            r.errors,
            p(&r.total)
        );
        if k == "part" || k == "segment" {
            let _ = writeln!(o, "{:<22} {:>9} {:>7}  ttfb  {}", "", "", "", p(&r.ttfb));
        }
    }
    let after = if s.warmup_s > 0.0 {
        format!(" after the first {:.0} s", s.warmup_s)
    } else {
        String::new()
    };
    let _ = writeln!(
        o,
        "latency (arrival - PROGRAM-DATE-TIME){after}: {}",
        p(&s.latency)
    );
    let _ = writeln!(
        o,
        "stalls{after}: {} ({:.2} s in all), durations {}",
        s.stalls,
        s.stall_seconds,
        p(&s.stall_durations)
    );
    if !s.errors_by_status.is_empty() {
        let list: Vec<String> = s
            .errors_by_status
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        let _ = writeln!(o, "errors by status: {}", list.join(", "));
    }
    let versions: Vec<String> = s
        .http_versions
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    let _ = writeln!(
        o,
        "resyncs: {}, rendition switches: {}, responses by version: {}",
        s.resyncs,
        s.switches,
        versions.join(", ")
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_percentiles() {
        let s = Stats::new();
        for i in 1..=100u64 {
            s.request(
                Kind::Part,
                &Outcome::Status(200),
                Some(Duration::from_millis(i)),
                Duration::from_millis(2 * i),
                10,
            );
        }
        s.request(
            Kind::Part,
            &Outcome::Status(500),
            None,
            Duration::from_millis(1),
            0,
        );
        s.request(
            Kind::PlaylistHold,
            &Outcome::Timeout,
            None,
            Duration::from_secs(10),
            0,
        );
        s.latency(800.0);
        s.stall(Duration::from_millis(300));
        let sum = s.summary();
        assert_eq!(sum.requests, 102);
        assert_eq!(sum.errors, 2);
        assert_eq!(sum.errors_by_status.get("500"), Some(&1));
        assert_eq!(sum.errors_by_status.get("timeout"), Some(&1));
        let part = &sum.kinds["part"];
        assert_eq!((part.requests, part.errors), (101, 1));
        let ttfb = part.ttfb.as_ref().unwrap();
        assert!((ttfb.p50_ms - 50.0).abs() < 0.1, "{ttfb:?}");
        assert!((part.total.as_ref().unwrap().max_ms - 200.0).abs() < 0.2);
        assert_eq!(sum.kinds["playlist_hold"].errors, 1);
        assert!(sum.kinds["playlist_hold"].total.is_none());
        assert!((sum.latency.unwrap().p50_ms - 800.0).abs() < 1.0);
        assert_eq!(sum.stalls, 1);
        assert_eq!(sum.bytes, 1000);
        let text = render(&s.summary());
        assert!(text.contains("500: 1"), "{text}");
    }
}
