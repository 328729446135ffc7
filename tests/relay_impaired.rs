//! The relay on an impaired path: `livepop edge` → user-space UDP impairment proxy (loss, delay,
//! bandwidth cap) → `livepop core`, ffmpeg publishing a 4 Mbit/s 720p stream, LL-HLS viewers
//! (livepop-loadtest) through the edge. Issue 13's acceptance tests.

mod common;

use common::impair::{Link, UdpImpair, DOWN, UP};
use common::*;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Seconds of media each run publishes.
const SECS: u32 = 20;

/// What one run through the proxy delivered.
#[derive(Debug)]
struct Outcome {
    /// Video and audio frames in the published file.
    sent: (usize, usize),
    /// Video and audio frames the core delivered to its consumers.
    received: (f64, f64),
    /// LL-HLS parts of the source rendition: with media, GAP.
    parts: (f64, f64),
    /// Groups the edge skipped because the path fell behind, and dropped from its buffer.
    skipped: (f64, f64),
    late: f64,
    latency_p50: f64,
    latency_p99: f64,
    stalls: u64,
    viewer_errors: u64,
    /// The publisher's wall time.
    publish_secs: f64,
    /// The edge's peak resident memory (MB).
    edge_peak_mb: f64,
    /// The largest send window the edge used (bytes).
    max_send_window: f64,
    /// Video timestamps of the published file and of the core's recording.
    sent_video: Vec<(i64, bool)>,
    recorded_video: Vec<(i64, bool)>,
    recorded_audio: usize,
    /// The edge's link metrics at the end: RTT (s), loss ratio, throughput (bit/s).
    link: (f64, f64, f64),
    /// QUIC packets the edge declared lost, and datagrams the proxy dropped at random.
    lost: (f64, u64),
}

/// A 4 Mbit/s 1280×720 30 fps stream with a 1 s keyframe interval, as an FLV file.
fn stream_file(dir: &Path) -> PathBuf {
    let out = dir.join("in.flv");
    let ok = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-y"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=30"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"])
        .args(["-t", &SECS.to_string()])
        .args([
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-g",
            "30",
            "-bf",
            "0",
        ])
        .args(["-b:v", "4M", "-maxrate", "4M", "-bufsize", "2M"])
        .args(["-c:a", "aac", "-map", "0:v", "-map", "1:a", "-f", "flv"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(ok.success());
    out
}

/// The sum of every sample of a metric whose line starts with `prefix`; None if there is none.
fn samples(admin: SocketAddr, prefix: &str) -> Option<f64> {
    let (200, body) = http_get(admin, "/metrics")? else {
        return None;
    };
    let v: Vec<f64> = body
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .collect();
    (!v.is_empty()).then(|| v.iter().sum())
}

/// Publishes `flv` through an edge whose only way to its core is the impairment proxy, with
/// 20 LL-HLS viewers on the edge for most of the stream.
fn run(name: &str, flv: &Path, up: Link, down: Link) -> Outcome {
    let env = Env::new();
    let core_cfg = env.write(
        "core.toml",
        &format!(
            "{}[origin]\nlisten = \"127.0.0.1:0\"\n[transcode]\n\
             renditions = [{{ name = \"1080p\", height = 1080, video_kbps = 5000 }}]\n",
            std::fs::read_to_string(core_config(&env, "core-1", "127.0.0.1:0", true)).unwrap()
        ),
    );
    let core = Proc::start_quiet("core-1", &["core", "--config", core_cfg.to_str().unwrap()]);
    let (relay, origin, core_admin) = (core.addr("relay"), core.addr("origin"), core.addr("admin"));
    let proxy = UdpImpair::start(relay, up, down);
    let mut o = EdgeOpts::new(vec![("core-1".into(), proxy.addr())]);
    o.origins = vec![origin];
    let edge = start_edge(&env, &o);
    let (rtmp, http, edge_admin) = (edge.addr("rtmp"), edge.addr("http"), edge.addr("admin"));
    let started = Instant::now();
    let mut ff = ffmpeg_publish_file(&format!("rtmp://{rtmp}/live/demo-key"), flv);
    wait_for("the stream at the edge", Duration::from_secs(30), || {
        (http_get(http, "/live/demo/master.m3u8")?.0 == 200).then_some(())
    });
    let json = env.path().join("viewers.json");
    let mut viewers = Command::new(loadtest_bin())
        .args([
            "viewers",
            "--url",
            &format!("http://{http}/live/demo/master.m3u8"),
        ])
        .args(["--count", "20", "--duration", &(SECS - 6).to_string()])
        .args(["--quiet", "--json"])
        .arg(&json)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = viewers.stdout.take().unwrap();
    std::thread::spawn(move || BufReader::new(out).lines().for_each(drop));
    let mut max_send_window = 0f64;
    let ff_done = wait_for("the publisher to finish", Duration::from_secs(90), || {
        if let Some(w) = samples(edge_admin, "livepop_relay_link_send_window_bytes") {
            max_send_window = max_send_window.max(w);
        }
        ff.try_wait().unwrap().map(|st| (st, started.elapsed()))
    });
    assert!(ff_done.0.success(), "{name}: ffmpeg failed");
    assert!(wait_child(&mut viewers, Duration::from_secs(60)), "viewers");
    let pk = packets(flv);
    let sent_video = by_track(&pk, "video");
    let sent = (sent_video.len(), by_track(&pk, "audio").len());
    let rec = wait_for(
        "the core's finished recording",
        Duration::from_secs(30),
        || recordings(&env, "core-1").into_iter().next(),
    );
    let rp = packets(&rec);
    let link = (
        samples(edge_admin, "livepop_relay_link_rtt_seconds").unwrap_or(f64::NAN),
        samples(edge_admin, "livepop_relay_link_loss_ratio").unwrap_or(f64::NAN),
        samples(edge_admin, "livepop_relay_link_throughput_bits_per_second").unwrap_or(f64::NAN),
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let m = |admin, s: &str| samples(admin, s).unwrap_or(0.0);
    let o = Outcome {
        sent,
        received: (
            m(core_admin, &frames_metric("demo", "video")),
            m(core_admin, &frames_metric("demo", "audio")),
        ),
        parts: (
            m(
                core_admin,
                "livepop_core_parts_total{gap=\"no\",rendition=\"src\",stream=\"demo\"}",
            ),
            m(
                core_admin,
                "livepop_core_parts_total{gap=\"yes\",rendition=\"src\",stream=\"demo\"}",
            ),
        ),
        skipped: (
            m(
                edge_admin,
                "livepop_relay_groups_skipped_total{reason=\"behind\"",
            ),
            m(
                edge_admin,
                "livepop_relay_groups_skipped_total{reason=\"evicted\"",
            ),
        ),
        late: m(core_admin, "livepop_relay_late_frames_total"),
        latency_p50: v["latency"]["p50_ms"].as_f64().unwrap_or(f64::NAN),
        latency_p99: v["latency"]["p99_ms"].as_f64().unwrap_or(f64::NAN),
        stalls: v["stalls"].as_u64().unwrap(),
        viewer_errors: v["errors"].as_u64().unwrap(),
        publish_secs: ff_done.1.as_secs_f64(),
        edge_peak_mb: edge.memory_mb("VmHWM:"),
        max_send_window,
        sent_video,
        recorded_video: by_track(&rp, "video"),
        recorded_audio: by_track(&rp, "audio").len(),
        link,
        lost: (
            m(edge_admin, "livepop_relay_link_lost_packets_total"),
            proxy.stats(UP).get().1 + proxy.stats(DOWN).get().1,
        ),
    };
    eprintln!(
        "{name}: sent {:?} received {:?} parts {:?} skipped {:?} late {} latency p50 {} p99 {} \
         stalls {} errors {} publish {:.1} s edge peak {:.0} MB send window ≤ {} link {:?} \
         lost {:?}; proxy up {:?} down {:?}",
        o.sent,
        o.received,
        o.parts,
        o.skipped,
        o.late,
        o.latency_p50,
        o.latency_p99,
        o.stalls,
        o.viewer_errors,
        o.publish_secs,
        o.edge_peak_mb,
        o.max_send_window,
        o.link,
        o.lost,
        proxy.stats(UP).get(),
        proxy.stats(DOWN).get()
    );
    o
}

/// Groups of pictures (keyframe to keyframe) of the sent video: how many of each group's
/// frames the recording has. A whole-group rule means each is 0 or all.
fn groups_received(o: &Outcome) -> Vec<(usize, usize)> {
    let got: std::collections::HashSet<i64> = o.recorded_video.iter().map(|v| v.0).collect();
    let mut groups: Vec<(usize, usize)> = vec![];
    for (pts, key) in &o.sent_video {
        if *key || groups.is_empty() {
            groups.push((0, 0));
        }
        let g = groups.last_mut().unwrap();
        g.0 += 1;
        g.1 += usize::from(got.contains(pts));
    }
    groups
}

fn both(a: Link) -> (Link, Link) {
    (a, a)
}

/// Runs two paths at once (so that both see the same machine load) and returns both outcomes.
fn side_by_side(flv: &Path, a: (&str, Link, Link), b: (&str, Link, Link)) -> (Outcome, Outcome) {
    std::thread::scope(|s| {
        let ha = s.spawn(|| run(a.0, flv, a.1, a.2));
        let hb = s.spawn(|| run(b.0, flv, b.1, b.2));
        (ha.join().unwrap(), hb.join().unwrap())
    })
}

#[test]
fn one_percent_loss_at_50ms_rtt_loses_no_frame() {
    let dir = Env::new();
    let flv = stream_file(dir.path());
    let (clean_up, clean_down) = both(Link::delay_ms(25));
    let (lossy_up, lossy_down) = both(Link::delay_ms(25).loss(0.01));
    let (clean, lossy) = side_by_side(
        &flv,
        ("clean", clean_up, clean_down),
        ("1% loss", lossy_up, lossy_down),
    );
    for o in [&clean, &lossy] {
        // Every frame the publisher sent reached the core, in order, with its timestamps.
        assert_eq!(o.received, (o.sent.0 as f64, o.sent.1 as f64));
        assert_eq!(o.recorded_video, o.sent_video);
        assert_eq!(o.recorded_audio, o.sent.1);
        assert_eq!(o.parts.1, 0.0, "no GAP part");
        assert!(o.parts.0 > f64::from(SECS) * 4.0, "{:?}", o.parts);
        assert_eq!(o.skipped, (0.0, 0.0));
        assert_eq!(o.viewer_errors, 0);
    }
    assert!(
        lossy.latency_p99 <= clean.latency_p99 + 300.0,
        "part latency p99 {} ms at 1% loss vs {} ms clean",
        lossy.latency_p99,
        clean.latency_p99
    );
    // The loss was real, and the edge's link metrics show it.
    assert!(lossy.lost.1 > 50, "{:?}", lossy.lost);
    assert!(lossy.lost.0 > 0.0, "{:?}", lossy.lost);
    assert!((0.02..0.2).contains(&lossy.link.0), "RTT {:?}", lossy.link);
    assert!(lossy.link.2 > 1e6, "throughput {:?}", lossy.link);
}

#[test]
fn five_percent_loss_at_50ms_rtt_no_stall_few_gaps() {
    let dir = Env::new();
    let flv = stream_file(dir.path());
    let (up, down) = both(Link::delay_ms(25).loss(0.05));
    let o = run("5% loss", &flv, up, down);
    assert_eq!(o.stalls, 0, "no viewer stalled");
    assert_eq!(o.viewer_errors, 0);
    let (media, gap) = o.parts;
    assert!(media > f64::from(SECS) * 4.0);
    assert!(
        gap < 0.05 * (media + gap),
        "GAP parts {gap} of {}",
        media + gap
    );
    // Every skip is a whole group, and counted.
    let groups = groups_received(&o);
    let missing = groups.iter().filter(|g| g.1 == 0).count();
    assert!(groups.iter().all(|g| g.1 == 0 || g.1 == g.0), "{groups:?}");
    assert_eq!(missing as f64, o.skipped.0 + o.skipped.1, "{groups:?}");
}

#[test]
fn a_path_at_half_the_stream_rate_skips_whole_groups() {
    let dir = Env::new();
    let flv = stream_file(dir.path());
    // 2 Mbit/s towards the core, half the stream's rate; 50 ms RTT.
    let up = Link::delay_ms(25).rate(2_000_000);
    let o = run("2 Mbit/s", &flv, up, Link::delay_ms(25));
    // The publisher was never held back: it finished at its own pace.
    assert!(
        o.publish_secs < f64::from(SECS) + 5.0,
        "publishing took {} s",
        o.publish_secs
    );
    // Whole groups skipped, counted, and marked as GAP parts.
    let groups = groups_received(&o);
    assert!(groups.iter().all(|g| g.1 == 0 || g.1 == g.0), "{groups:?}");
    let missing = groups.iter().filter(|g| g.1 == 0).count();
    assert!(missing >= 3, "{groups:?}");
    assert_eq!(missing as f64, o.skipped.0 + o.skipped.1, "{groups:?}");
    assert!(o.skipped.0 > 0.0, "skipped because the path fell behind");
    assert!(o.parts.1 > 0.0, "GAP parts mark what was skipped");
    // Audio is small and first: all of it arrived.
    assert_eq!(o.recorded_audio, o.sent.1);
    // The live edge stays current: viewers are at most a few seconds behind.
    assert!(o.latency_p99 < 4000.0, "latency p99 {} ms", o.latency_p99);
    // Memory stays bounded: QUIC holds about two congestion windows, the rest waits (or is
    // skipped) in the publication's bounded buffer.
    assert!(
        o.max_send_window <= 1024.0 * 1024.0,
        "{}",
        o.max_send_window
    );
    assert!(
        o.edge_peak_mb < 200.0,
        "edge peak RSS {} MB",
        o.edge_peak_mb
    );
}

/// The test kit's proxy itself: loss, delay and the rate cap are what they are set to.
#[test]
fn impairment_proxy_drops_delays_and_caps_as_configured() {
    let server = UdpSocket::bind("127.0.0.1:0").unwrap();
    let saddr = server.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = server.recv_from(&mut buf) {
            let _ = server.send_to(&buf[..n], from);
        }
    });
    let proxy = UdpImpair::start(saddr, Link::delay_ms(20), Link::delay_ms(20));
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.connect(proxy.addr()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    // Delay: an echo takes at least both one-way delays.
    let t = Instant::now();
    c.send(b"ping").unwrap();
    let mut buf = [0u8; 2048];
    assert_eq!(c.recv(&mut buf).unwrap(), 4);
    let rtt = t.elapsed();
    assert!(rtt >= Duration::from_millis(40), "{rtt:?}");
    assert!(rtt < Duration::from_millis(200), "{rtt:?}");
    // Loss: 10% each way, so about 19% of echoes are lost.
    proxy.set(UP, Link::delay_ms(0).loss(0.1));
    proxy.set(DOWN, Link::delay_ms(0).loss(0.1));
    c.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut back = 0;
    for i in 0..2000u32 {
        c.send(&i.to_be_bytes()).unwrap();
        if i % 50 == 49 {
            while c.recv(&mut buf).is_ok() {
                back += 1;
            }
        }
    }
    while c.recv(&mut buf).is_ok() {
        back += 1;
    }
    let lost = 1.0 - f64::from(back) / 2000.0;
    assert!((0.13..0.26).contains(&lost), "lost {lost}");
    let (passed, dropped, _, _) = proxy.stats(UP).get();
    assert!(passed > 0 && dropped > 100, "{passed} {dropped}");
    // Blackhole: nothing passes.
    proxy.blackhole(true);
    c.send(b"x").unwrap();
    assert!(c.recv(&mut buf).is_err());
    assert_eq!(proxy.stats(UP).get().3, 1);
    proxy.blackhole(false);
    // Rate: 1 Mbit/s with a deep queue: 100 datagrams of 1222 bytes on the wire take ≥ 0.9 s.
    proxy.set(
        UP,
        Link {
            queue: Duration::from_secs(5),
            ..Link::delay_ms(0).rate(1_000_000)
        },
    );
    proxy.set(DOWN, Link::delay_ms(0));
    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let t = Instant::now();
    for _ in 0..100 {
        c.send(&[0u8; 1194]).unwrap();
    }
    for i in 0..100 {
        if c.recv(&mut buf).is_err() {
            panic!(
                "{i} of 100 back; up {:?} down {:?}",
                proxy.stats(UP).get(),
                proxy.stats(DOWN).get()
            );
        }
    }
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert!(took < Duration::from_millis(1500), "{took:?}");
    // A shallow queue drops what does not fit.
    proxy.set(UP, Link::delay_ms(0).rate(1_000_000));
    let before = proxy.stats(UP).get().2;
    for _ in 0..100 {
        c.send(&[0u8; 1194]).unwrap();
    }
    wait_for("queue drops", Duration::from_secs(5), || {
        (proxy.stats(UP).get().2 > before + 50).then_some(())
    });
}
