//! Transcoding benchmark (issue 5): the livepop ladder against the ffmpeg CLI on the same input
//! file, back to back, with identical x264 settings; then the live delay from a frame's
//! arrival to its part's publication, per rendition.
//!
//! 1. Input: 20 s of 1280×720 30 fps testsrc2 (libx264 superfast, B-frames, 2 s GOP) + AAC, FLV.
//! 2. Throughput: `livepop::transcode::Ladder` (decode once, scale and encode 480p and 360p)
//!    fed the file's frames as fast as it takes them, vs `ffmpeg -i in.flv -filter_complex
//!    split,scale ... libx264` with the same preset, tune, bitrates, GOP and x264 params: source
//!    frames per second through the whole ladder, and the ratio.
//! 3. Live delay: a core with the ladder and an edge; ffmpeg publishes the file at real time
//!    (`-re -c copy`); the core's `livepop_origin_part_delay_seconds` histogram (edge arrival of
//!    a part's newest frame → part published), p50/p99 per rendition.
//!
//! Run: `bash bench/transcode.sh` (or `cargo bench --bench transcode -- --preset veryfast`).

use bytes::Bytes;
use livepop::config::TranscodeConfig;
use livepop::ingest::flv::{parse_audio, parse_video, AudioTag, VideoTag};
use livepop::media::{Frame, StreamInfo, TrackKind};
use livepop::transcode::{Ladder, Output};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../tests/common/mod.rs"]
mod common;
use common::arg;

const RUNGS: [(&str, u32, u32, u32); 2] = [("480p", 854, 480, 1000), ("360p", 640, 360, 600)];

fn ladder_toml(preset: &str) -> String {
    let mut t = format!("[transcode]\npreset = \"{preset}\"\n");
    for (n, _, h, k) in RUNGS {
        t += &format!("[[transcode.renditions]]\nname = \"{n}\"\nheight = {h}\nvideo_kbps = {k}\n");
    }
    t
}

fn histogram_quantile(metrics: &str, name: &str, rendition: &str, q: f64) -> f64 {
    let mut buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter(|l| {
            l.starts_with(&format!("{name}_bucket{{"))
                && l.contains(&format!("rendition=\"{rendition}\""))
        })
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let v: f64 = l.rsplit(' ').next()?.parse().ok()?;
            Some((le, v))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map_or(0.0, |b| b.1);
    if total == 0.0 {
        return f64::NAN;
    }
    let want = q * total;
    let mut prev = (0.0, 0.0);
    for (le, c) in buckets {
        if c >= want {
            if le.is_infinite() {
                return prev.0;
            }
            // Linear within the bucket, as Prometheus' histogram_quantile does.
            return prev.0 + (le - prev.0) * (want - prev.1) / (c - prev.1).max(1e-9);
        }
        prev = (le, c);
    }
    f64::NAN
}

fn main() {
    let preset = arg("--preset", "veryfast");
    let secs: u32 = arg("--secs", "20").parse().unwrap();
    let env = common::Env::new();
    let input = env.path().join("in.flv");
    let ok = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-y"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=30"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"])
        .args(["-t", &secs.to_string(), "-map", "0:v", "-map", "1:a"])
        .args([
            "-c:v",
            "libx264",
            "-preset",
            "superfast",
            "-bf",
            "2",
            "-g",
            "60",
            "-b:v",
            "3000k",
        ])
        .args(["-c:a", "aac", "-f", "flv"])
        .arg(&input)
        .status()
        .unwrap();
    assert!(ok.success());

    // Frames and configuration from the file, as the core would receive them.
    let mut info = StreamInfo::default();
    info.metadata.frame_rate = Some(30.0);
    let mut frames = vec![];
    for (kind, ts, body) in common::flv_tags(&input) {
        let body = Bytes::from(body);
        if kind == 9 {
            match parse_video(&body).unwrap() {
                VideoTag::Config(c) => info.video = Some(c),
                VideoTag::Frame {
                    keyframe,
                    cts,
                    data,
                } => frames.push(Frame {
                    track: TrackKind::Video,
                    dts: i64::from(ts),
                    pts: i64::from(ts) + i64::from(cts),
                    keyframe,
                    arrival_us: livepop::media::now_unix_us(),
                    data,
                }),
                VideoTag::Nothing => {}
            }
        } else if kind == 8 {
            if let Ok(AudioTag::Config(c)) = parse_audio(&body) {
                info.audio = Some(c);
            }
        }
    }
    let n = frames.len();
    let cfg: TranscodeConfig = toml::from_str::<toml::Table>(&ladder_toml(&preset))
        .unwrap()
        .get("transcode")
        .unwrap()
        .clone()
        .try_into()
        .unwrap();

    println!("transcoding benchmark: {n} frames of 1280x720 30 fps (B-frames, 2 s GOP) -> 480p + 360p, libx264 preset {preset}, tune zerolatency");
    // livepop ladder, as fast as it goes.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let livepop_secs = rt.block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::channel(4096);
        let metrics = livepop::telemetry::CoreMetrics::new();
        let t = Instant::now();
        let ladder = Ladder::start("bench", &info, &cfg, tx, metrics)
            .unwrap()
            .unwrap();
        let feeder = std::thread::spawn(move || {
            for f in &frames {
                // Arrival is now: the ladder sheds renditions when frames are old.
                let mut f = f.clone();
                f.arrival_us = livepop::media::now_unix_us();
                ladder.push_wait(&f);
            }
            drop(ladder); // end of input: the ladder drains
        });
        let mut out = [0usize; 2];
        while let Some(o) = rx.recv().await {
            if let Output::Frame(i, _) = o {
                out[i] += 1;
            }
        }
        feeder.join().unwrap();
        let s = t.elapsed().as_secs_f64();
        assert_eq!(out, [n, n], "frames out per rendition");
        s
    });
    let livepop_fps = n as f64 / livepop_secs;
    println!(
        "  livepop ladder: {livepop_secs:.2} s, {livepop_fps:.1} source fps ({:.2}x real time)",
        livepop_fps / 30.0
    );

    // The ffmpeg CLI: decode once, split, scale, encode with the same settings.
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-hide_banner", "-loglevel", "error", "-nostdin", "-i"])
        .arg(&input);
    let mut graph = format!("[0:v]split={}", RUNGS.len());
    for i in 0..RUNGS.len() {
        graph += &format!("[s{i}]");
    }
    for (i, (_, w, h, _)) in RUNGS.iter().enumerate() {
        graph += &format!(";[s{i}]scale={w}:{h}:flags=bilinear[o{i}]");
    }
    cmd.args(["-filter_complex", &graph]);
    for (i, (_, _, _, k)) in RUNGS.iter().enumerate() {
        cmd.args([
            "-map",
            &format!("[o{i}]"),
            "-c:v",
            "libx264",
            "-preset",
            &preset,
        ])
        .args(["-tune", "zerolatency", "-forced-idr", "1", "-g", "100000"])
        .args(["-x264-params", "scenecut=0:open-gop=0:bframes=0"])
        .args([
            "-b:v",
            &format!("{k}k"),
            "-maxrate",
            &format!("{}k", k * 11 / 10),
        ])
        .args(["-bufsize", &format!("{k}k"), "-f", "null", "-"]);
    }
    let t = Instant::now();
    let ok = cmd.stdout(Stdio::null()).status().unwrap();
    assert!(ok.success());
    let ffmpeg_secs = t.elapsed().as_secs_f64();
    let ffmpeg_fps = n as f64 / ffmpeg_secs;
    println!(
        "  ffmpeg CLI:     {ffmpeg_secs:.2} s, {ffmpeg_fps:.1} source fps ({:.2}x real time)",
        ffmpeg_fps / 30.0
    );
    println!(
        "  throughput ratio livepop / ffmpeg: {:.2}",
        livepop_fps / ffmpeg_fps
    );

    // Live: frame arrival -> part published, per rendition.
    let core_cfg = common::core_config_with_origin(&env, "core-1", &ladder_toml(&preset));
    let core = common::Proc::start_quiet("core", &["core", "--config", core_cfg.to_str().unwrap()]);
    let edge_cfg = common::edge_config(
        &env,
        &common::EdgeOpts::new(vec![("core-1".into(), core.addr("relay"))]),
    );
    let edge = common::Proc::start_quiet("edge", &["edge", "--config", edge_cfg.to_str().unwrap()]);
    let url = format!("rtmp://{}/live/demo-key", edge.addr("rtmp"));
    let ok = common::ffmpeg_publish_file(&url, &input).wait().unwrap();
    assert!(ok.success());
    std::thread::sleep(Duration::from_secs(1)); // let the last parts out
    let (_, metrics) = common::http_get(core.addr("admin"), "/metrics").unwrap();
    println!("  live, edge arrival of a part's newest frame -> part published (ms):");
    for r in ["src", "480p", "360p"] {
        println!(
            "    {r:<5} p50 {:>6.1}  p99 {:>6.1}",
            histogram_quantile(&metrics, "livepop_origin_part_delay_seconds", r, 0.5) * 1000.0,
            histogram_quantile(&metrics, "livepop_origin_part_delay_seconds", r, 0.99) * 1000.0
        );
    }
    let speed: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("livepop_transcode_dropped") || l.starts_with("livepop_transcode_shed")
        })
        .collect();
    println!("  drops/sheds during the live run: {speed:?}");
}
