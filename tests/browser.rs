//! The player page in a real browser: `livepop demo --source testsrc`, Debian's Chromium driven
//! by playwright-core (web/e2e/play.mjs), hls.js in low-latency mode. Needs `npm ci --prefix web`
//! and the chromium package (deploy/test.sh installs both). Runs alone (.config/nextest.toml):
//! playback in real time is what is measured, so it must not share the CPU with other tests.

mod common;

use common::*;
use std::path::PathBuf;
use std::time::Duration;

const PLAY_SECS: f64 = 20.0;

fn artefacts() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-artefacts");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The player's events (loads, switches, errors, stalls) between two page times, one a line.
fn events_around(r: &serde_json::Value, from: f64, to: f64) -> String {
    let mut out = String::new();
    for e in r["events"].as_array().into_iter().flatten() {
        if e["t"].as_f64().is_some_and(|t| t >= from && t <= to) {
            out.push_str(&format!("  {e}\n"));
        }
    }
    out
}

/// The PROGRAM-DATE-TIME latencies (s) of the samples that have one.
fn latencies(samples: &[serde_json::Value]) -> Vec<f64> {
    samples
        .iter()
        .filter_map(|s| s["latency"].as_f64())
        .collect()
}

/// What went wrong with playback in real time, judged from the browser's report: the video's
/// clock advances with real time and never goes back; after start-up no stall longer than 0.5 s;
/// PROGRAM-DATE-TIME latency known, positive and under 3 s.
fn realtime_problems(r: &serde_json::Value) -> Vec<String> {
    let mut out = vec![];
    let samples = r["samples"].as_array().cloned().unwrap_or_default();
    if (samples.len() as f64) < PLAY_SECS * 2.0 {
        out.push(format!("{} samples", samples.len()));
        return out;
    }
    let times: Vec<f64> = samples
        .iter()
        .map(|s| s["currentTime"].as_f64().unwrap_or(0.0))
        .collect();
    // A stall-free 20 s plays ~20 s.
    let advanced = times.last().unwrap() - times[0];
    if advanced < PLAY_SECS * 0.8 {
        out.push(format!(
            "currentTime advanced {advanced:.2} s in {PLAY_SECS} s"
        ));
    }
    if !times.windows(2).all(|w| w[1] >= w[0]) {
        out.push("currentTime went back".into());
    }

    // Start-up: until the first 3 s of playback, in which hls.js settles at its target latency
    // (it sometimes skips a buffer hole there; the page's watchdog then jumps to the live edge,
    // see the closing note of issue 6).
    let Some(since) = r["playing_since"].as_f64() else {
        out.push("playback never began".into());
        return out;
    };
    for s in r["stalls"].as_array().into_iter().flatten() {
        let (start, d) = (
            s["start"].as_f64().unwrap_or(0.0),
            s["duration"].as_f64().unwrap_or(f64::MAX),
        );
        let startup = start < since + 3.0;
        if startup {
            eprintln!("start-up stall of {d:.3} s");
        }
        let limit = if startup { 3.0 } else { 0.5 };
        if d > limit {
            out.push(format!(
                "stall of {d:.3} s at {start:.3} s (playing since {since:.3} s; limit {limit} s); \
                 player events around it:\n{}",
                events_around(r, start - 3.0, start + d + 1.0)
            ));
        }
    }

    let lat = latencies(&samples);
    if (lat.len() as f64) < samples.len() as f64 * 0.9 {
        out.push(format!(
            "latency known in {} of {} samples",
            lat.len(),
            samples.len()
        ));
    }
    let max = lat.iter().cloned().fold(f64::MIN, f64::max);
    let min = lat.iter().cloned().fold(f64::MAX, f64::min);
    if max >= 3.0 {
        out.push(format!("latency up to {max:.3} s"));
    }
    if min <= 0.0 {
        out.push(format!(
            "latency {min:.3} s: clock or PROGRAM-DATE-TIME wrong"
        ));
    }
    out
}

#[test]
fn the_player_page_plays_the_demo_with_low_latency_in_chromium() {
    let env = Env::new();
    let demo = start_demo(&env, &["--source", "testsrc"]);
    let http = demo.addr("http");
    let rtmp = demo.addr("rtmp");
    // The demo prints where to publish and where to watch.
    for (what, url) in [
        ("Publish:", format!("rtmp://{rtmp}/live/demo-key")),
        ("Player:", format!("http://{http}/")),
    ] {
        demo.wait_log(Duration::from_secs(10), |v| {
            v["raw"]
                .as_str()
                .is_some_and(|l| l.contains(what) && l.contains(&url))
        });
    }

    // The page is served by the edge and the demo stream is live with its ladder.
    let (status, page) = http_get(http, "/").expect("page");
    assert_eq!(status, 200);
    assert!(page.contains("/vendor/hls.min.js"), "{page}");
    let (status, _) = http_get(http, "/vendor/hls.min.js").expect("hls.js");
    assert_eq!(
        status, 200,
        "hls.js was not compiled in: npm ci --prefix web, then rebuild"
    );
    wait_for(
        "the demo stream with two renditions",
        Duration::from_secs(60),
        || {
            let (s, body) = http_get(http, "/live/streams.json")?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let demo = v["streams"]
                .as_array()?
                .iter()
                .find(|s| s["name"] == "demo")?
                .clone();
            (s == 200 && demo["live"] == true && demo["renditions"].as_array()?.len() >= 2)
                .then_some(())
        },
    );

    // Open the page once the stream has a few segments, as a viewer arriving a few seconds
    // after the start would: the very first segments' bitrates (keyframe-heavy) make hls.js
    // start low and switch up seconds into playback, which can stall (see the closing note of
    // issue 6).
    wait_for("three complete segments", Duration::from_secs(60), || {
        let (s, pl) = http_get(http, "/live/demo/src/index.m3u8")?;
        (s == 200 && complete_segments(&pl).len() >= 3).then_some(())
    });

    let shot = artefacts().join("browser-player.png");
    let url = format!("http://{http}/?stream=demo");
    let mut retried = false;
    let r = loop {
        let _ = std::fs::remove_file(&shot);
        let watch = MachineWatch::start();
        let r = play_in_browser(&url, PLAY_SECS, &shot);
        let machine = watch.finish();
        std::fs::write(artefacts().join("browser-player.json"), r.to_string()).unwrap();
        assert!(
            r["failure"].is_null(),
            "browser run failed: {}",
            r["failure"]
        );
        eprintln!(
            "start-up {} s, errors {}, console {}\nmachine during the run: {machine}",
            r["startup_s"], r["errors"], r["console"]
        );
        let problems = realtime_problems(&r);
        if problems.is_empty() {
            break r;
        }
        // Playback in real time says nothing about livepop when the machine itself stopped
        // running it: then (and only then) the run is repeated, once.
        if machine.starved() && !retried {
            eprintln!(
                "the machine was starved during playback ({machine}); repeating the run once. \
                 It failed with: {}",
                problems.join("; ")
            );
            retried = true;
            continue;
        }
        panic!("{}\nmachine during the run: {machine}", problems.join("\n"));
    };

    let samples = r["samples"].as_array().unwrap();
    let lat = latencies(samples);
    eprintln!(
        "latency {:.3}..{:.3} s over {} samples",
        lat.iter().cloned().fold(f64::MAX, f64::min),
        lat.iter().cloned().fold(f64::MIN, f64::max),
        lat.len()
    );

    // At least two renditions offered (source and the ladder), and hls.js chose one.
    let levels = r["levels"].as_array().unwrap();
    assert!(levels.len() >= 2, "levels {levels:?}");
    assert!(samples
        .iter()
        .any(|s| s["level"].as_i64().unwrap_or(-1) >= 0));

    let png = std::fs::metadata(&shot).expect("screenshot saved");
    assert!(png.len() > 10_000, "screenshot of {} bytes", png.len());
    eprintln!("screenshot: {}", shot.display());
}

/// The judge itself: it flags what the browser test must fail on, and only that.
#[test]
fn realtime_problems_flags_late_stalls_and_high_latency() {
    let report = |stalls: serde_json::Value, latency: f64| {
        let samples: Vec<_> = (0..(PLAY_SECS * 4.0) as usize)
            .map(|i| serde_json::json!({ "currentTime": 10.0 + i as f64 * 0.25, "latency": latency }))
            .collect();
        serde_json::json!({ "samples": samples, "playing_since": 1.0, "stalls": stalls, "events": [] })
    };
    assert!(realtime_problems(&report(serde_json::json!([]), 1.1)).is_empty());
    // A start-up stall (first 3 s of playback) up to 3 s is allowed; after it, up to 0.5 s.
    let ok =
        serde_json::json!([{ "start": 2.0, "duration": 2.5 }, { "start": 9.0, "duration": 0.4 }]);
    assert!(realtime_problems(&report(ok, 1.1)).is_empty());
    let late = serde_json::json!([{ "start": 9.0, "duration": 0.6 }]);
    let p = realtime_problems(&report(late, 1.1));
    assert!(
        p.len() == 1 && p[0].starts_with("stall of 0.600 s"),
        "{p:?}"
    );
    let p = realtime_problems(&report(serde_json::json!([]), 3.2));
    assert!(
        p.len() == 1 && p[0].contains("latency up to 3.200 s"),
        "{p:?}"
    );
    let p = realtime_problems(&report(serde_json::json!([]), -0.1));
    assert!(p.len() == 1 && p[0].contains("clock"), "{p:?}");
}

/// The player page plays a signed URL (`/?url=/t/<token>/live/NAME/master.m3u8`, as
/// `livepop sign-url` prints it) of a stream that needs one: every object through the token.
#[test]
fn the_player_page_plays_a_signed_url() {
    let env = Env::new();
    let core = start_core_with_origin(&env, "core-1", "");
    let mut opts = EdgeOpts::new(vec![("core-1".into(), core.addr("relay"))]);
    opts.origins = vec![core.addr("origin")];
    let cfg = edge_config(&env, &opts);
    let secret = "ab".repeat(32);
    let access = format!(
        "[playback.access]\nsigned = [\"demo\"]\n[[playback.access.keys]]\nid = \"k1\"\nsecret = \"{secret}\"\n"
    );
    let text = std::fs::read_to_string(&cfg).unwrap().replacen(
        "[relay]\n",
        &format!("{access}[relay]\n"),
        1,
    );
    let cfg = env.write("edge-signed.toml", &text);
    let edge = Proc::start("edge", &["edge", "--config", cfg.to_str().unwrap()]);
    wait_for("edge /readyz", Duration::from_secs(10), || {
        (http_get(edge.addr("admin"), "/readyz")?.0 == 200).then_some(())
    });
    let mut ff = ffmpeg_publish(
        &format!("rtmp://{}/live/demo-key", edge.addr("rtmp")),
        40,
        "640x360",
        None,
    );
    let out = std::process::Command::new(BIN)
        .args([
            "sign-url",
            "--config",
            cfg.to_str().unwrap(),
            "--stream",
            "demo",
        ])
        .args(["--base", "http://x"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let signed = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .replace("http://x", "");
    let http = edge.addr("http");
    wait_for("three complete segments", Duration::from_secs(60), || {
        let path = signed.replace("master.m3u8", "src/index.m3u8");
        let (s, pl) = http_get(http, &path)?;
        (s == 200 && complete_segments(&pl).len() >= 3).then_some(())
    });
    // Without the token the same stream is refused.
    assert_eq!(http_get(http, "/live/demo/master.m3u8").unwrap().0, 403);
    let shot = artefacts().join("browser-signed.png");
    let r = play_in_browser(&format!("http://{http}/?url={signed}"), 5.0, &shot);
    assert!(r["failure"].is_null(), "the signed URL did not play: {r}");
    let t: Vec<f64> = r["samples"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["currentTime"].as_f64())
        .collect();
    assert!(
        t.last().unwrap_or(&0.0) - t.first().unwrap_or(&0.0) > 2.0,
        "playback did not advance: {t:?}"
    );
    let _ = ff.kill();
    let _ = ff.wait();
}
