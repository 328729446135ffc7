//! One publication through an impaired relay path, measured: `livepop edge` → the UDP
//! impairment proxy → `livepop core` (with an LL-HLS origin and a recording), ffmpeg publishing
//! a 4 Mbit/s 720p stream, 20 LL-HLS viewers (livepop-loadtest) on the edge. Used by the
//! impaired-path tests and the relay-impaired benchmark.

use super::impair::{Link, UdpImpair, DOWN, UP};
use super::*;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Seconds of media each run publishes.
pub const SECS: u32 = 20;

/// What one run through the proxy delivered.
#[derive(Debug)]
pub struct Outcome {
    /// Video and audio frames in the published file.
    pub sent: (usize, usize),
    /// Video and audio frames the core delivered to its consumers.
    pub received: (f64, f64),
    /// LL-HLS parts of the source rendition: with media, GAP.
    pub parts: (f64, f64),
    /// Groups the edge skipped because the path fell behind, and dropped from its buffer.
    pub skipped: (f64, f64),
    pub late: f64,
    pub latency_p50: f64,
    pub latency_p99: f64,
    pub stalls: u64,
    pub viewer_errors: u64,
    /// The publisher's wall time.
    pub publish_secs: f64,
    /// The edge's peak resident memory (MB).
    pub edge_peak_mb: f64,
    /// The largest send window the edge used (bytes).
    pub max_send_window: f64,
    /// Video timestamps of the published file and of the core's recording.
    pub sent_video: Vec<(i64, bool)>,
    pub recorded_video: Vec<(i64, bool)>,
    pub recorded_audio: usize,
    /// The edge's link metrics at the end: RTT (s), loss ratio, throughput (bit/s),
    /// congestion window (bytes).
    pub link: (f64, f64, f64, f64),
    /// QUIC packets the edge declared lost, and datagrams the proxy dropped at random.
    pub lost: (f64, u64),
}

/// A 4 Mbit/s 1280×720 30 fps stream with a 1 s keyframe interval, as an FLV file.
pub fn stream_file(dir: &Path, secs: u32) -> PathBuf {
    let out = dir.join("in.flv");
    let rate = ["-b:v", "4M", "-maxrate", "4M", "-bufsize", "2M"];
    encode_flv_with(&out, "1280x720", secs, &rate);
    out
}

/// Publishes `flv` through an edge whose only way to its core is the impairment proxy, with
/// 20 LL-HLS viewers on the edge for most of the stream.
pub fn run(name: &str, flv: &Path, secs: u32, up: Link, down: Link) -> Outcome {
    run_with(name, flv, secs, up, down, "")
}

/// `run` with extra keys for the edge's [relay] section (e.g. `congestion = "cubic"`).
pub fn run_with(
    name: &str,
    flv: &Path,
    secs: u32,
    up: Link,
    down: Link,
    extra_relay: &str,
) -> Outcome {
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
    o.extra_relay = extra_relay.to_string();
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
        .args(["--count", "20", "--duration", &(secs - 6).to_string()])
        .args(["--quiet", "--json"])
        .arg(&json)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = viewers.stdout.take().unwrap();
    std::thread::spawn(move || BufReader::new(out).lines().for_each(drop));
    let mut max_send_window = 0f64;
    let ff_done = wait_for("the publisher to finish", Duration::from_secs(90), || {
        if let Some(w) = metric_opt(edge_admin, &link_metric("send_window_bytes")) {
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
        metric(edge_admin, &link_metric("rtt_seconds")),
        metric(edge_admin, &link_metric("loss_ratio")),
        metric(edge_admin, &link_metric("throughput_bits_per_second")),
        metric(edge_admin, &link_metric("cwnd_bytes")),
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    // A case may deliver nothing, skip nothing, or have no GAP: those read 0 when absent.
    let m = metric_or_zero;
    let o = Outcome {
        sent,
        received: (
            m(core_admin, &frames_metric("demo", "video")),
            m(core_admin, &frames_metric("demo", "audio")),
        ),
        parts: (
            metric(
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
                "livepop_relay_groups_skipped_total{reason=\"behind\",stream=\"demo\"}",
            ),
            m(
                edge_admin,
                "livepop_relay_groups_skipped_total{reason=\"evicted\",stream=\"demo\"}",
            ),
        ),
        late: m(
            core_admin,
            "livepop_relay_late_frames_total{stream=\"demo\"}",
        ),
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
            metric(edge_admin, &link_metric("lost_packets_total")),
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
pub fn groups_received(o: &Outcome) -> Vec<(usize, usize)> {
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

/// An edge's link metric for the one core of these runs.
fn link_metric(what: &str) -> String {
    format!("livepop_relay_link_{what}{{core=\"core-1\"}}")
}
