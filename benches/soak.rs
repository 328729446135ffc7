//! Soak benchmark (issue 12): does memory stay flat under honest load and hostile clients?
//!
//! Setup: a core (LL-HLS origin, 200 ms parts, 2 s segments, no ladder, no recording) and an
//! edge, with the short connection deadlines of tests/attack.rs; two ffmpeg publishers (a
//! 640×360 30 fps test pattern at `--kbps` kbit/s, + AAC) through the edge's RTMP ingest,
//! restarted if they exit; `livepop-loadtest viewers` with `--viewers` viewers of one stream
//! through the edge. For the whole run, next to them, attack loops, each with a bounded number
//! of sockets: deeply nested AMF0 (right after the handshake, and in onMetaData after a valid
//! publish); silent, dripping and partial-request clients of the edge's HTTP port, the origin
//! and both admin ports; clients that request a segment and never read (edge and origin);
//! asking ahead (parts and segments not there yet, blocking reloads too far ahead); HEAD floods
//! with zero-padded names and directives; RTMP connections that never publish.
//!
//! Every `--sample` s the RSS (VmRSS) of the edge and of the core is read. At the end the
//! curve goes to rss.csv and rss.svg in `--out` (default target/soak), with first, last, min,
//! max and the least-squares slope after `--warmup` s (viewers joining and caches filling
//! are not a leak), the viewers' errors and stalls, and the attempts per attack kind.
//!
//! Run: `bash bench/soak.sh` (builds livepop-loadtest first; `--secs 120` for a short run).

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use livepop::ingest::amf0::nest;
use livepop::ingest::chunk::write;

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/peers.rs"]
mod peers;
use common::*;
use peers::publish_test_stream;

/// Deadlines the processes get: those of tests/attack.rs, except a longer idle time, since
/// here 1,000 viewers keep connections that are quiet between parts.
const HEADER_MS: u64 = 1000;
const IDLE_MS: u64 = 5000;
const WRITE_MS: u64 = 2000;
const PUBLISH_MS: u64 = 2500;
/// The edge's cache budget (playback.cache_bytes).
const CACHE_BYTES: u64 = 32 << 20;
/// The RTMP handshake deadline `edge_config` writes.
const HANDSHAKE_MS: u64 = 2000;
/// Slack for a deadline to be noticed on a 2-core machine busy with 1,000 viewers.
const SLACK: Duration = Duration::from_millis(3000);
/// The honest streams: name and key (`edge_config`'s table).
const STREAMS: [(&str, &str); 2] = [("demo", "demo-key"), ("other", "other-key")];
/// Workers of the AMF0 attack; each publishes under its own key (`attacker-N-key`) before
/// sending deep onMetaData, so that they never claim a stream another one holds.
const AMF0_WORKERS: usize = 2;
/// HEADs per flood, and requests with a zero-padded `_HLS_msn` after it.
const HEAD_BURST: usize = 50;
const PADDED_BURST: usize = 20;

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// Where the attacks aim.
#[derive(Clone, Copy)]
struct Targets {
    rtmp: SocketAddr,
    http: SocketAddr,
    origin: SocketAddr,
    edge_admin: SocketAddr,
    core_admin: SocketAddr,
}

/// Core and edge with the deadlines above; the edge also takes one key per AMF0 worker.
fn start(env: &Env) -> (Proc, Proc) {
    let admin = format!("[admin]\n{}", limits_block(HEADER_MS, IDLE_MS, WRITE_MS));
    // The origin keeps its default idle time (75 s), above the edge's upstream keep-alive, so
    // that it never closes a pooled connection the edge is about to reuse.
    let origin_extra = format!("header_timeout_ms = {HEADER_MS}\nwrite_timeout_ms = {WRITE_MS}");
    let cfg = core_config_with_origin(env, "core-1", &origin_extra);
    let text = std::fs::read_to_string(cfg)
        .unwrap()
        .replacen("[admin]\n", &admin, 1);
    let cfg = env.write("core-soak.toml", &text);
    let core = Proc::start_quiet("core", &["core", "--config", cfg.to_str().unwrap()]);
    let mut opts = EdgeOpts::new(vec![("core-1".into(), core.addr("relay"))]);
    opts.origins = vec![core.addr("origin")];
    // Segments are cached for a day (max-age=86400) until the LRU budget evicts them: with
    // the default 512 MiB budget the cache would fill for the whole run and its growth would
    // hide (or pass for) a leak. A small budget is reached within the warm-up.
    opts.extra_playback = format!(
        "cache_bytes = {CACHE_BYTES}\n{}",
        limits_block(HEADER_MS, IDLE_MS, WRITE_MS)
    );
    // Every client here comes from 127.0.0.1, so the per-source RTMP cap (tests/attack.rs
    // checks it) is off: the attackers must not lock the honest publishers out.
    opts.extra_rtmp = format!(
        "publish_timeout_ms = {PUBLISH_MS}\nwrite_timeout_ms = {WRITE_MS}\nmax_connections_per_ip = 0\n"
    );
    for i in 0..AMF0_WORKERS {
        opts.extra_auth +=
            &format!("[[auth.streams]]\nname = \"attacker-{i}\"\nkey = \"attacker-{i}-key\"\n");
    }
    let cfg = edge_config(env, &opts);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replacen("[admin]\n", &admin, 1);
    std::fs::write(&cfg, text).unwrap();
    let edge = Proc::start_quiet("edge", &["edge", "--config", cfg.to_str().unwrap()]);
    let admin = edge.addr("admin");
    wait_for("edge /readyz", Duration::from_secs(20), || {
        (http_get(admin, "/readyz")?.0 == 200).then_some(())
    });
    (core, edge)
}

/// An honest ffmpeg publisher, started again whenever it exits; killed when dropped.
struct Publisher {
    url: String,
    kbps: u32,
    child: Child,
    started: Instant,
    restarts: u32,
}

impl Publisher {
    fn start(url: String, kbps: u32) -> Self {
        let child = publish_test_stream(&url, kbps);
        Publisher {
            url,
            kbps,
            child,
            started: Instant::now(),
            restarts: 0,
        }
    }

    /// Restarts ffmpeg if it has exited (at most every 2 s, should the edge refuse it).
    fn keep_alive(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) || self.started.elapsed() < ms(2000) {
            return;
        }
        println!("publisher {} exited; starting it again", self.url);
        self.child = publish_test_stream(&self.url, self.kbps);
        self.started = Instant::now();
        self.restarts += 1;
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process killed when dropped, so that a panic leaves nothing running.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---- attack loops ---------------------------------------------------------------------------

/// Per attack kind: attempts, attack sockets opened, attempts whose outcome was not the
/// defence expected, and attempts our client gave up on (it panicked: a refused connection,
/// a response it could not read).
struct Tally {
    name: String,
    workers: usize,
    attempts: AtomicU64,
    sockets: AtomicU64,
    unexpected: AtomicU64,
    errors: AtomicU64,
}

struct Attacks {
    stop: Arc<AtomicBool>,
    tallies: Vec<Arc<Tally>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Attacks {
    /// `workers` threads call `f(worker, attempt)` in a loop until stopped, each at most once
    /// per `pace`; `f` returns (outcome as expected, sockets opened). A worker runs one attempt
    /// at a time, so `workers` bounds the kind's open sockets (a burst by its size).
    fn spawn(
        &mut self,
        name: &str,
        workers: usize,
        pace: Duration,
        f: impl Fn(usize, u64) -> (bool, u64) + Send + Sync + 'static,
    ) {
        let tally = Arc::new(Tally {
            name: name.to_string(),
            workers,
            attempts: AtomicU64::new(0),
            sockets: AtomicU64::new(0),
            unexpected: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        });
        let f = Arc::new(f);
        for w in 0..workers {
            let (tally, f, stop) = (tally.clone(), f.clone(), self.stop.clone());
            let thread = std::thread::Builder::new()
                .name(format!("attack {name} {w}"))
                .spawn(move || {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let began = Instant::now();
                        match std::panic::catch_unwind(AssertUnwindSafe(|| f(w, i))) {
                            Ok((ok, sockets)) => {
                                tally.sockets.fetch_add(sockets, Ordering::Relaxed);
                                if !ok {
                                    tally.unexpected.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Err(_) => {
                                tally.errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        tally.attempts.fetch_add(1, Ordering::Relaxed);
                        i += 1;
                        // Paces the attack (and one that fails at once); synchronizes nothing.
                        std::thread::sleep(pace.saturating_sub(began.elapsed()));
                    }
                })
                .expect("attack thread");
            self.threads.push(thread);
        }
        self.tallies.push(tally);
    }

    fn attempts(&self) -> u64 {
        self.tallies
            .iter()
            .map(|t| t.attempts.load(Ordering::Relaxed))
            .sum()
    }
}

/// Our attack clients use the tests' helpers, which panic on a refused or broken connection;
/// each such attempt is counted, so only the first few panics are printed.
fn quiet_attack_panics() {
    static SHOWN: AtomicU64 = AtomicU64::new(0);
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // Unnamed threads are the request threads of `burst`.
        let attack = std::thread::current()
            .name()
            .is_none_or(|n| n.starts_with("attack"));
        if !attack || SHOWN.fetch_add(1, Ordering::Relaxed) < 5 {
            default(info);
        }
    }));
}

/// The media playlist of a stream's source rendition.
fn playlist_path(stream: &str) -> String {
    format!("/live/{stream}/src/index.m3u8")
}

/// A client that never completes a request's headers: silent, dripping a byte every 150 ms,
/// or a partial request line (the h2c preface's included) and then silence. True if the
/// server closed it within its header deadline.
fn slow_client(addr: SocketAddr, i: u64) -> bool {
    let within = ms(HEADER_MS) + SLACK;
    let mut s = TcpStream::connect_timeout(&addr, ms(2000)).expect("connect");
    let since = Instant::now();
    let partial: &[u8] = match i % 4 {
        0 => return closed_within(&mut s, since, within),
        1 => {
            return drip(
                &mut s,
                b"GET /live/demo/master.m3u8 HTTP/1.1\r\nHost: x\r\n",
                since,
                within,
            )
        }
        2 => b"GET /live/de",
        _ => b"PRI * HTTP/2.0\r\n",
    };
    let _ = s.write_all(partial);
    closed_within(&mut s, since, within)
}

/// Requests a complete segment on a connection with a tiny receive window and never reads:
/// at the edge once (it does not pipeline), at the origin 400 times pipelined. True if the
/// server has dropped the connection once its write and idle deadlines have passed.
fn non_reader(tg: Targets, i: u64) -> bool {
    let (stream, _) = STREAMS[((i / 2) % 2) as usize];
    let (addr, n) = match i % 2 {
        0 => (tg.http, 1),
        _ => (tg.origin, 400),
    };
    let pl = http_get(tg.origin, &playlist_path(stream))
        .expect("playlist")
        .1;
    let seg = complete_segments(&pl)
        .last()
        .map(|s| s.1.clone())
        .expect("a complete segment");
    let req = format!("GET /live/{stream}/src/{seg} HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut s = connect_small_window(addr);
    // The server may stop reading too once its own buffers are full; that is fine.
    s.set_write_timeout(Some(ms(2000))).unwrap();
    let since = Instant::now();
    let _ = s.write_all(req.repeat(n).as_bytes());
    // Not read from until the server's deadlines have passed: this wait is the attack.
    std::thread::sleep((ms(WRITE_MS + IDLE_MS) + SLACK).saturating_sub(since.elapsed()));
    closed_by_peer(&mut s, ms(3000))
}

/// Asks the edge for what does not exist yet: two parts past the preload hint and the segment
/// after the open one (404, or 200 if it appeared meanwhile; a cached 404 would show up as
/// errors of the viewers, who watch demo), and blocking reloads too far ahead (LLHLS.md
/// §6.2.5.2: refused at once with a 4xx).
fn ask_ahead(tg: Targets, i: u64) -> (bool, u64) {
    let (stream, _) = STREAMS[(i % 2) as usize];
    let pl_path = playlist_path(stream);
    let (m, p) = hint(&http_get(tg.origin, &pl_path).expect("playlist").1);
    let objects = [
        format!("/live/{stream}/src/s{m}.{}.m4s", p + 2),
        format!("/live/{stream}/src/s{}.m4s", m + 1),
    ];
    let directives = [
        format!("{pl_path}?_HLS_msn={}", m + 3),
        format!("{pl_path}?_HLS_msn={m}&_HLS_part={}", p + 100),
        format!("{pl_path}?_HLS_msn={}&_HLS_part=0", u64::MAX),
    ];
    let status = |path: &String| http_get_full(tg.http, path).map_or(0, |r| r.0);
    let refused = |st: u16| (400..500).contains(&st);
    let ok = objects.iter().all(|path| {
        let st = status(path);
        st == 200 || refused(st)
    }) && directives.iter().all(|path| refused(status(path)));
    (ok, (objects.len() + directives.len()) as u64)
}

/// HEADs for the hinted part all at once (held until it completes, one core request, answered
/// without a body), names with zero-padded numbers (404 at the edge), and blocking reloads
/// with a zero-padded `_HLS_msn` (the canonical key: answered 200).
fn head_flood(tg: Targets, i: u64) -> (bool, u64) {
    let (stream, _) = STREAMS[(i % 2) as usize];
    let pl_path = playlist_path(stream);
    let pl = http_get(tg.origin, &pl_path).expect("playlist").1;
    let (m, p) = hint(&pl);
    let part = format!("/live/{stream}/src/s{m}.{p}.m4s");
    let mut ok = burst(tg.http, "HEAD", &part, HEAD_BURST)
        .iter()
        .all(|(st, _, body)| *st == 200 && body.is_empty());
    let init = pl
        .lines()
        .find_map(|l| l.strip_prefix("#EXT-X-MAP:URI=\""))
        .expect("EXT-X-MAP")
        .trim_end_matches('"');
    let seg = complete_segments(&pl)
        .last()
        .map(|s| s.1.clone())
        .expect("a complete segment");
    let odd = [
        format!("/live/{stream}/src/s0{m}.{p}.m4s"),
        format!("/live/{stream}/src/s{m}.0{p}.m4s"),
        format!("/live/{stream}/src/{}", seg.replacen('s', "s00", 1)),
        format!("/live/{stream}/src/{}", init.replacen("init-", "init-0", 1)),
        format!("/live/{stream}/src/s+1.m4s"),
    ];
    for path in &odd {
        ok &= http_get_full(tg.http, path).map(|r| r.0) == Some(404);
    }
    let padded = format!("{pl_path}?_HLS_msn=00{m}");
    ok &= burst(tg.http, "GET", &padded, PADDED_BURST)
        .iter()
        .all(|r| r.0 == 200);
    (ok, (HEAD_BURST + odd.len() + PADDED_BURST) as u64)
}

/// An RTMP connection that never publishes: silent before the handshake (closed at the
/// handshake deadline), or after it busy with a Window Acknowledgement Size every 500 ms
/// (closed at the publish deadline all the same). True if the edge closed it in time.
fn never_publishes(rtmp: SocketAddr, i: u64) -> bool {
    match i % 2 {
        0 => {
            let mut s = TcpStream::connect_timeout(&rtmp, ms(2000)).expect("connect");
            closed_by_peer(&mut s, ms(HANDSHAKE_MS) + SLACK)
        }
        _ => {
            let (mut s, _) = rtmp_handshake(rtmp);
            let since = Instant::now();
            let ack = write::message(2, 0, 5, 0, &2_500_000u32.to_be_bytes(), 128);
            while since.elapsed() < ms(PUBLISH_MS) + SLACK {
                if s.write_all(&ack).is_err() || closed_by_peer(&mut s, ms(500)) {
                    return true;
                }
            }
            false
        }
    }
}

/// Starts every attack loop.
fn start_attacks(tg: Targets, stop: &Arc<AtomicBool>) -> Attacks {
    let mut a = Attacks {
        stop: stop.clone(),
        tallies: vec![],
        threads: vec![],
    };

    // (a) 200,000 levels of each container kind, in command and data messages of every AMF0
    // type, right after the handshake; and, after a valid publish, onMetaData 100,000 deep.
    let mut bodies: Vec<(u8, Vec<u8>)> = vec![];
    for type_id in [20u8, 18, 17, 15] {
        for make in nest::KINDS {
            let name = if matches!(type_id, 17 | 20) {
                "connect"
            } else {
                "@setDataFrame"
            };
            bodies.push((type_id, nest::command(name, &make(200_000))));
        }
    }
    let deep_metadata = write::message(
        4,
        0,
        18,
        1,
        &nest::command("@setDataFrame", &nest::ecma_arrays(100_000)),
        RAW_CHUNK,
    );
    a.spawn("deep AMF0", AMF0_WORKERS, ms(200), move |w, i| {
        let n = bodies.len() as u64 + 1;
        if let Some((type_id, body)) = bodies.get((i % n) as usize) {
            return (send_deep_amf0(tg.rtmp, *type_id, body), 1);
        }
        let mut p = RawPublisher::publish(tg.rtmp, &format!("attacker-{w}-key"));
        let since = Instant::now();
        p.send(&deep_metadata);
        (closed_within(&mut p.s, since, ms(5000)), 1)
    });

    // (b) Slow clients on every HTTP listener: 48 sockets in all, fewer on the admin ports
    // (64 connections each).
    for (label, addr, workers) in [
        ("edge HTTP", tg.http, 16),
        ("origin", tg.origin, 16),
        ("edge admin", tg.edge_admin, 8),
        ("core admin", tg.core_admin, 8),
    ] {
        a.spawn(
            &format!("slow client, {label}"),
            workers,
            ms(100),
            move |_, i| (slow_client(addr, i), 1),
        );
    }

    // (c) Clients that request a segment and never read.
    a.spawn("non-reading client", 8, ms(100), move |_, i| {
        (non_reader(tg, i), 1)
    });

    // (d) Asking ahead.
    a.spawn("asking ahead", 2, ms(250), move |_, i| ask_ahead(tg, i));

    // (e) HEAD floods and zero-padded names.
    a.spawn("HEAD flood, padded names", 1, ms(1000), move |_, i| {
        head_flood(tg, i)
    });

    // (f) RTMP connections that never publish.
    a.spawn("RTMP, never publishes", 16, ms(100), move |_, i| {
        (never_publishes(tg.rtmp, i), 1)
    });
    a
}

// ---- figures ----------------------------------------------------------------------------------

/// One RSS sample: seconds since the start, edge and core RSS in MiB.
#[derive(Clone, Copy)]
struct Sample {
    t: f64,
    edge: f64,
    core: f64,
}

struct Trend {
    first: f64,
    last: f64,
    min: f64,
    max: f64,
    /// Least-squares slope, MiB per minute.
    slope: f64,
}

/// The trend of (seconds, MiB) points; None without points.
fn trend(pts: &[(f64, f64)]) -> Option<Trend> {
    let first = pts.first()?.1;
    let last = pts.last()?.1;
    let n = pts.len() as f64;
    let mt = pts.iter().map(|p| p.0).sum::<f64>() / n;
    let my = pts.iter().map(|p| p.1).sum::<f64>() / n;
    let num: f64 = pts.iter().map(|p| (p.0 - mt) * (p.1 - my)).sum();
    let den: f64 = pts.iter().map(|p| (p.0 - mt) * (p.0 - mt)).sum();
    Some(Trend {
        first,
        last,
        min: pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min),
        max: pts.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max),
        slope: if den > 0.0 {
            num / den * 60.0
        } else {
            f64::NAN
        },
    })
}

/// A step of 1, 2 or 5 × 10^k that cuts `range` into about `ticks` intervals.
fn nice_step(range: f64, ticks: f64) -> f64 {
    let raw = (range / ticks).max(1e-9);
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let m = if norm < 1.5 {
        1.0
    } else if norm < 3.0 {
        2.0
    } else if norm < 7.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

/// A tick label with as many decimals as the step needs.
fn tick_label(v: f64, step: f64) -> String {
    let d = if step >= 1.0 {
        0
    } else {
        (-step.log10()).ceil() as usize
    };
    format!("{v:.d$}")
}

/// The RSS curves as an SVG line chart: time on x, MiB on y from 0 (so that flat looks flat),
/// the warm-up shaded, a legend.
fn svg(samples: &[Sample], warmup: f64, title: &str, note: &str) -> String {
    const W: f64 = 900.0;
    const H: f64 = 480.0;
    let (left, right, top, bottom) = (70.0, 30.0, 60.0, 55.0);
    let (pw, ph) = (W - left - right, H - top - bottom);
    let tmax = samples.last().map_or(1.0, |s| s.t).max(1.0);
    let ydata = samples
        .iter()
        .map(|s| s.edge.max(s.core))
        .fold(1.0, f64::max)
        * 1.1;
    let (xstep, ystep) = (nice_step(tmax, 8.0), nice_step(ydata, 6.0));
    let xmax = (tmax / xstep).ceil() * xstep;
    let ymax = (ydata / ystep).ceil() * ystep;
    let x = |v: f64| left + v / xmax * pw;
    let y = |v: f64| top + ph - v / ymax * ph;
    let (x0, x1, y0, y1) = (x(0.0), x(xmax), y(0.0), y(ymax));

    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">\n"
    );
    s += &format!("<rect width=\"{W}\" height=\"{H}\" fill=\"white\"/>\n");
    s += &format!(
        "<text x=\"{left}\" y=\"24\" font-size=\"15\" font-weight=\"bold\">{title}</text>\n"
    );
    s += &format!("<text x=\"{left}\" y=\"42\" fill=\"#555\">{note}</text>\n");
    // The warm-up, left out of the figures.
    let xw = x(warmup.clamp(0.0, xmax));
    if xw > x0 {
        s += &format!(
            "<rect x=\"{x0:.1}\" y=\"{y1:.1}\" width=\"{:.1}\" height=\"{ph:.1}\" fill=\"#f0f0f0\"/>\n",
            xw - x0
        );
        s += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"#888\">warm-up</text>\n",
            x0 + 4.0,
            y1 + 14.0
        );
    }
    // Grid, ticks and labels.
    let nx = (xmax / xstep).round() as usize;
    for k in 0..=nx {
        let v = k as f64 * xstep;
        let px = x(v);
        s += &format!(
            "<line x1=\"{px:.1}\" y1=\"{y1:.1}\" x2=\"{px:.1}\" y2=\"{y0:.1}\" stroke=\"#e2e2e2\"/>\n"
        );
        s += &format!(
            "<line x1=\"{px:.1}\" y1=\"{y0:.1}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"#333\"/>\n",
            y0 + 5.0
        );
        s += &format!(
            "<text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            y0 + 19.0,
            tick_label(v, xstep)
        );
    }
    let ny = (ymax / ystep).round() as usize;
    for k in 0..=ny {
        let v = k as f64 * ystep;
        let py = y(v);
        s += &format!(
            "<line x1=\"{x0:.1}\" y1=\"{py:.1}\" x2=\"{x1:.1}\" y2=\"{py:.1}\" stroke=\"#e2e2e2\"/>\n"
        );
        s += &format!(
            "<line x1=\"{:.1}\" y1=\"{py:.1}\" x2=\"{x0:.1}\" y2=\"{py:.1}\" stroke=\"#333\"/>\n",
            x0 - 5.0
        );
        s += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            x0 - 8.0,
            py + 4.0,
            tick_label(v, ystep)
        );
    }
    // Axes and their names.
    s += &format!(
        "<line x1=\"{x0:.1}\" y1=\"{y0:.1}\" x2=\"{x1:.1}\" y2=\"{y0:.1}\" stroke=\"#333\"/>\n"
    );
    s += &format!(
        "<line x1=\"{x0:.1}\" y1=\"{y0:.1}\" x2=\"{x0:.1}\" y2=\"{y1:.1}\" stroke=\"#333\"/>\n"
    );
    s += &format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">time (s)</text>\n",
        left + pw * 0.5,
        H - 12.0
    );
    let ylab = top + ph * 0.5;
    s += &format!(
        "<text x=\"18\" y=\"{ylab:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 18 {ylab:.1})\">RSS (MiB)</text>\n"
    );
    // The curves.
    type Pick = fn(&Sample) -> f64;
    let lines: [(&str, &str, Pick); 2] = [
        ("edge", "#1f77b4", |s| s.edge),
        ("core", "#d62728", |s| s.core),
    ];
    for (_, color, pick) in lines {
        let pts: Vec<String> = samples
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.t), y(pick(p))))
            .collect();
        s += &format!(
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"/>\n",
            pts.join(" ")
        );
        for p in samples {
            s += &format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"{color}\"/>\n",
                x(p.t),
                y(pick(p))
            );
        }
    }
    // The legend, top right inside the plot.
    let (lx, ly) = (x1 - 110.0, y1 + 10.0);
    s += &format!(
        "<rect x=\"{lx:.1}\" y=\"{ly:.1}\" width=\"100\" height=\"46\" fill=\"white\" stroke=\"#999\"/>\n"
    );
    for (k, (name, color, _)) in lines.iter().enumerate() {
        let yy = ly + 15.0 + k as f64 * 18.0;
        s += &format!(
            "<line x1=\"{:.1}\" y1=\"{yy:.1}\" x2=\"{:.1}\" y2=\"{yy:.1}\" stroke=\"{color}\" stroke-width=\"2\"/>\n",
            lx + 10.0,
            lx + 36.0
        );
        s += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\">{name}</text>\n",
            lx + 44.0,
            yy + 4.0
        );
    }
    s += "</svg>\n";
    s
}

/// Warns when the open-file limit, which the edge inherits, cannot hold the viewers.
fn check_fd_limit(viewers: usize) {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse::<usize>().ok())
        });
    if let Some(soft) = soft.filter(|s| *s < viewers * 2 + 1000) {
        eprintln!(
            "warning: the open-file limit is {soft}; {viewers} viewers need more (ulimit -n 65536; bench/soak.sh does)"
        );
    }
}

/// The refusal counters of a process's /metrics (what its defences counted).
fn refusals(admin: SocketAddr) -> Vec<String> {
    let Some((200, body)) = http_get(admin, "/metrics") else {
        return vec!["(metrics unavailable)".into()];
    };
    body.lines()
        .filter(|l| !l.starts_with('#') && (l.contains("refused") || l.contains("rejected")))
        .map(str::to_string)
        .collect()
}

fn write_file(path: &Path, body: &str) {
    std::fs::write(path, body).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

fn main() {
    let viewers: usize = arg("--viewers", "1000").parse().expect("--viewers N");
    let secs: u64 = arg("--secs", "600").parse().expect("--secs S");
    let sample: u64 = arg("--sample", "10")
        .parse::<u64>()
        .expect("--sample S")
        .max(1);
    let warmup: f64 = arg("--warmup", "60").parse().expect("--warmup S");
    let ramp: u64 = arg("--ramp", "20").parse().expect("--ramp S");
    let kbps: u32 = arg("--kbps", "400").parse().expect("--kbps N");
    let out = PathBuf::from(arg(
        "--out",
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/soak"),
    ));
    loadtest_bin();
    check_fd_limit(viewers);
    quiet_attack_panics();
    std::fs::create_dir_all(&out).unwrap();

    let env = Env::new();
    let (mut core, mut edge) = start(&env);
    let tg = Targets {
        rtmp: edge.addr("rtmp"),
        http: edge.addr("http"),
        origin: core.addr("origin"),
        edge_admin: edge.addr("admin"),
        core_admin: core.addr("admin"),
    };
    let mut publishers: Vec<Publisher> = STREAMS
        .iter()
        .map(|(_, key)| Publisher::start(format!("rtmp://{}/live/{key}", tg.rtmp), kbps))
        .collect();
    // Attacks and viewers need both streams with parts and a complete segment.
    for (stream, _) in STREAMS {
        wait_for(
            &format!("stream {stream} with a complete segment"),
            Duration::from_secs(60),
            || {
                let pl = http_get(tg.http, &playlist_path(stream))?.1;
                (pl.contains("#EXT-X-PART:") && !complete_segments(&pl).is_empty()).then_some(())
            },
        );
    }

    println!(
        "soak: {secs} s, {viewers} viewers (ramp {ramp} s), {} publishers at {kbps} kbit/s, attack loops; RSS every {sample} s",
        STREAMS.len()
    );
    let viewer_json = out.join("viewers.json");
    let _ = std::fs::remove_file(&viewer_json);
    let mut loadtest = Reaped(
        Command::new(loadtest_bin())
            .args(["viewers", "--quiet", "--rendition", "highest"])
            .args([
                "--url",
                &format!("http://{}/live/demo/master.m3u8", tg.http),
            ])
            .args(["--count", &viewers.to_string(), "--ramp", &ramp.to_string()])
            .args(["--duration", &secs.to_string()])
            .args(["--warmup", &(ramp + 5).to_string()])
            .arg("--json")
            .arg(&viewer_json)
            .arg("--plot")
            .arg(out.join("viewers.svg"))
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("livepop-loadtest"),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let attacks = start_attacks(tg, &stop);

    let t0 = Instant::now();
    let mut samples: Vec<Sample> = vec![];
    let mut died: Option<String> = None;
    for k in 0..=secs / sample {
        let due = t0 + Duration::from_secs(k * sample);
        loop {
            for p in &mut publishers {
                p.keep_alive();
            }
            let now = Instant::now();
            if now >= due {
                break;
            }
            // Paces the publisher check until the next sample; synchronizes nothing.
            std::thread::sleep((due - now).min(ms(500)));
        }
        if !edge.is_running() || !core.is_running() {
            died = Some(format!(
                "after {:.0} s: edge running {}, core running {}",
                t0.elapsed().as_secs_f64(),
                edge.is_running(),
                core.is_running()
            ));
            break;
        }
        let s = Sample {
            t: t0.elapsed().as_secs_f64(),
            edge: edge.memory_mb("VmRSS:"),
            core: core.memory_mb("VmRSS:"),
        };
        println!(
            "t {:>5.0} s  edge {:>7.1} MiB  core {:>7.1} MiB  attack attempts {}",
            s.t,
            s.edge,
            s.core,
            attacks.attempts()
        );
        samples.push(s);
    }

    // Wind down: the viewers stop at --duration and finish their requests in flight (each
    // within the loadtest's 10 s timeout); every attack attempt ends within its own deadline.
    stop.store(true, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(60);
    let viewers_exit = loop {
        match loadtest.0.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(ms(200)),
            _ => break None,
        }
    };
    while attacks.threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
        std::thread::sleep(ms(200));
    }
    let stuck = attacks.threads.iter().filter(|t| !t.is_finished()).count();
    let edge_refusals = refusals(tg.edge_admin);
    let core_refusals = refusals(tg.core_admin);
    let peaks = if died.is_none() {
        Some((edge.memory_mb("VmHWM:"), core.memory_mb("VmHWM:")))
    } else {
        None
    };
    let panicked: Vec<String> = [&edge, &core]
        .iter()
        .filter(|p| p.log_text().contains("panicked"))
        .map(|p| p.name.clone())
        .collect();
    let restarts: Vec<String> = publishers
        .iter()
        .map(|p| format!("{} {}", p.url, p.restarts))
        .collect();
    drop(publishers);
    drop(loadtest);
    edge.kill();
    core.kill();

    // The curve and the figures.
    let mut csv = String::from("t_s,edge_rss_mib,core_rss_mib\n");
    for s in &samples {
        csv += &format!("{:.1},{:.2},{:.2}\n", s.t, s.edge, s.core);
    }
    write_file(&out.join("rss.csv"), &csv);
    let steady: Vec<Sample> = samples.iter().copied().filter(|s| s.t >= warmup).collect();
    let (steady, span) = if steady.len() >= 2 {
        (steady, format!("after the first {warmup:.0} s"))
    } else {
        (
            samples.clone(),
            "whole run (too short for the warm-up)".to_string(),
        )
    };
    let edge_trend = trend(&steady.iter().map(|s| (s.t, s.edge)).collect::<Vec<_>>());
    let core_trend = trend(&steady.iter().map(|s| (s.t, s.core)).collect::<Vec<_>>());
    let slope = |t: &Option<Trend>| t.as_ref().map_or(f64::NAN, |t| t.slope);
    let note = format!(
        "{viewers} viewers, {} publishers, attack loops; slope {span}: edge {:+.3}, core {:+.3} MiB/min",
        STREAMS.len(),
        slope(&edge_trend),
        slope(&core_trend)
    );
    let title =
        format!("livepop soak: RSS of edge and core over {secs} s, sampled every {sample} s");
    write_file(&out.join("rss.svg"), &svg(&samples, warmup, &title, &note));

    println!(
        "\nsoak summary ({} samples; figures {span}):",
        samples.len()
    );
    for (name, t, peak) in [
        ("edge", &edge_trend, peaks.map(|p| p.0)),
        ("core", &core_trend, peaks.map(|p| p.1)),
    ] {
        let peak = peak.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
        match t {
            Some(t) => println!(
                "  {name} RSS: first {:.1} MiB, last {:.1}, min {:.1}, max {:.1}; slope {:+.3} MiB/min; peak (VmHWM) {peak} MiB",
                t.first, t.last, t.min, t.max, t.slope
            ),
            None => println!("  {name} RSS: no samples"),
        }
    }
    match std::fs::read(&viewer_json)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    {
        Some(r) => {
            let p = |k: &str| r["latency"][k].as_f64().unwrap_or(f64::NAN);
            println!(
                "  viewers: {} started, {} requests, {} errors {}, {} stalls ({:.1} s stalled), {} resyncs; part latency p50 {:.0} ms, p99 {:.0} ms (after {} s)",
                r["viewers"],
                r["requests"],
                r["errors"],
                r["errors_by_status"],
                r["stalls"],
                r["stall_seconds"].as_f64().unwrap_or(f64::NAN),
                r["resyncs"],
                p("p50_ms"),
                p("p99_ms"),
                ramp + 5
            );
        }
        None => println!("  viewers: no report ({})", viewer_json.display()),
    }
    match viewers_exit {
        Some(st) if st.success() => {}
        Some(st) => println!("  livepop-loadtest exited with {st}"),
        None => println!("  livepop-loadtest did not finish in time; killed"),
    }
    println!("  publisher restarts: {}", restarts.join(", "));
    println!(
        "  attacks (attempts, attack sockets, outcome not the defence expected, client gave up):"
    );
    for t in &attacks.tallies {
        println!(
            "    {:<28} {:>3} workers  attempts {:>7}  sockets {:>8}  unexpected {:>5}  gave up {:>5}",
            t.name,
            t.workers,
            t.attempts.load(Ordering::Relaxed),
            t.sockets.load(Ordering::Relaxed),
            t.unexpected.load(Ordering::Relaxed),
            t.errors.load(Ordering::Relaxed)
        );
    }
    if stuck > 0 {
        println!("  {stuck} attack workers still inside an attempt at the end");
    }
    for (name, lines) in [("edge", &edge_refusals), ("core", &core_refusals)] {
        println!("  {name} refusals and rejections:");
        for l in lines {
            println!("    {l}");
        }
    }
    println!(
        "  wrote {}, {} and {}",
        out.join("rss.csv").display(),
        out.join("rss.svg").display(),
        out.join("viewers.svg").display()
    );
    assert!(panicked.is_empty(), "panicked: {panicked:?}");
    if let Some(d) = died {
        panic!("a process died {d}");
    }
}
