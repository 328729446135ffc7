//! Glass-to-glass latency minus the publisher (issue 6): from a frame's arrival at the edge to
//! its display in the browser, read from PROGRAM-DATE-TIME (`Date.now() - hls.playingDate` in
//! the player page, sampled every 250 ms), at the demo defaults: `livepop demo --source
//! testsrc` (720p30 source + 480p + 360p ladder, 200 ms parts, 2 s segments), the player page
//! in headless Chromium with hls.js (low-latency mode, automatic ABR).
//!
//! Run: `bash bench/latency.sh` (or `cargo bench --bench player_latency -- --secs 60`).

use std::time::Duration;

#[path = "../tests/common/mod.rs"]
mod common;
use common::*;

fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    let secs: f64 = arg("--secs", "60").parse().expect("--secs");
    let env = Env::new();
    let demo = start_demo(&env, &["--source", "testsrc"]);
    let http = demo.addr("http");
    wait_for("the demo stream", Duration::from_secs(60), || {
        let (s, body) = http_get(http, "/live/streams.json")?;
        (s == 200 && body.contains(r#""live":true"#) && body.contains("360p")).then_some(())
    });
    let cpu0 = demo.cpu_seconds();
    let shot = env.path().join("player.png");
    let r = play_in_browser(&format!("http://{http}/?stream=demo"), secs, &shot);
    let cpu = demo.cpu_seconds() - cpu0;
    assert!(
        r["failure"].is_null(),
        "browser run failed: {}",
        r["failure"]
    );
    let samples = r["samples"].as_array().unwrap();
    let all: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|s| Some((s["t"].as_f64()?, s["latency"].as_f64()?)))
        .collect();
    let t0 = all.first().map_or(0.0, |x| x.0);
    let summary = |from: f64| {
        let mut v: Vec<f64> = all
            .iter()
            .filter(|x| x.0 - t0 >= from)
            .map(|x| x.1)
            .collect();
        v.sort_by(f64::total_cmp);
        (
            v.len(),
            pct(&v, 0.5),
            pct(&v, 0.95),
            v.last().copied().unwrap_or(f64::NAN),
        )
    };
    let levels = r["levels"].as_array().unwrap();
    let mut per_level = vec![0usize; levels.len()];
    for s in samples {
        if let Some(l) = s["level"].as_u64() {
            if let Some(c) = per_level.get_mut(l as usize) {
                *c += 1;
            }
        }
    }
    let stalls = r["stalls"].as_array().unwrap();
    // (max: an empty f64 sum is -0.0)
    let stall_s: f64 = stalls
        .iter()
        .filter_map(|s| s["duration"].as_f64())
        .sum::<f64>()
        .max(0.0);
    println!("player latency, livepop demo --source testsrc, {secs} s in Chromium (hls.js low-latency, auto ABR)");
    println!(
        "start-up (page load to playing): {:.2} s",
        r["startup_s"].as_f64().unwrap_or(f64::NAN)
    );
    for (label, from) in [("whole run", 0.0), ("after the first 10 s", 10.0)] {
        let (n, p50, p95, max) = summary(from);
        println!("latency {label}: n={n} p50 {p50:.3} s, p95 {p95:.3} s, max {max:.3} s");
    }
    let share: Vec<String> = levels
        .iter()
        .zip(&per_level)
        .map(|(l, c)| {
            format!(
                "{}p {:.0}%",
                l["height"],
                100.0 * *c as f64 / samples.len().max(1) as f64
            )
        })
        .collect();
    println!("renditions played: {}", share.join(", "));
    println!(
        "stalls after start-up: {} ({stall_s:.2} s in all)",
        stalls.len()
    );
    println!("livepop demo CPU: {:.0}% of one core (core + edge + transcode; ffmpeg and Chromium not counted)", 100.0 * cpu / secs);
}
