//! The player page in a real browser: `livepop demo --source testsrc`, Debian's Chromium driven
//! by playwright-core (web/e2e/play.mjs), hls.js in low-latency mode. Needs `npm ci --prefix web`
//! and the chromium package (deploy/test.sh installs both). Runs alone (.config/nextest.toml):
//! playback in real time is what is measured, so it must not share the CPU with other tests.

mod common;

use common::*;
use std::path::PathBuf;
use std::time::Duration;

const PLAY_SECS: f64 = 20.0;

/// Latency is judged after the first 10 s of playback, as docs/benchmarks.md reports it: playback
/// starts ~0.4 s behind the steady latency and the page lets hls.js catch up only from 4 s in.
const WARMUP_SECS: f64 = 10.0;
/// The median PROGRAM-DATE-TIME latency after warm-up. docs/benchmarks.md (hls.js, 200 ms parts)
/// measures p50 1.08 s there; allowed on top: 0.5 s, what a stall the judge lets pass after
/// start-up leaves in the latency (hls.js never wins it back: each stall it sees raises its
/// target latency by 1 s, liveSyncOnStallIncrease), and one part (0.2 s) for fetches and appends
/// on a loaded 2-core machine.
const LATENCY_MEDIAN_MAX: f64 = 1.8;
/// The latency anywhere in the run. docs/benchmarks.md measures at most 1.51 s (playback starts
/// at ~1.4 s); allowed on top: 1 s, a start-up stall short of the page's watchdog (a longer one
/// sets it off, which fails on its own).
const LATENCY_MAX: f64 = 2.5;

/// hls.js errors a normal low-latency run raises, each allowed only when not fatal; any other
/// error, or one of these when fatal, fails the test.
const ALLOWED_HLS_ERRORS: &[&str] = &[
    // hls.js's report of a stall, once per stall (a `waiting` after the playhead moved): the
    // stall itself is judged by its length in realtime_problems.
    "bufferStalledError",
];

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

/// The latencies of the samples after the first WARMUP_SECS of playback (sampling begins when
/// the video plays).
fn settled_latencies(samples: &[serde_json::Value]) -> Vec<f64> {
    let Some(t0) = samples.first().and_then(|s| s["t"].as_f64()) else {
        return vec![];
    };
    samples
        .iter()
        .filter(|s| s["t"].as_f64().is_some_and(|t| t >= t0 + WARMUP_SECS))
        .filter_map(|s| s["latency"].as_f64())
        .collect()
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// What went wrong with the player itself, judged from the browser's report: any error (hls.js's,
/// fatal or not, unless allowed above; a refused play(); the media element's), any rescue of
/// playback by the page (watchdog jump, media-error recovery, reload) and any console error.
fn player_problems(r: &serde_json::Value) -> Vec<String> {
    let mut out = vec![];
    // A report without them (an older page) would pass unjudged.
    for list in ["errors", "recoveries", "console"] {
        if !r[list].is_array() {
            out.push(format!("the report has no {list} list"));
        }
    }
    for e in r["errors"].as_array().into_iter().flatten() {
        let allowed = e["source"] == "hls.js"
            && e["fatal"] == false
            && ALLOWED_HLS_ERRORS.iter().any(|&d| e["details"] == d);
        if !allowed {
            out.push(format!("player error: {e}"));
        }
    }
    for rescue in r["recoveries"].as_array().into_iter().flatten() {
        let t = rescue["t"].as_f64().unwrap_or(0.0);
        out.push(format!(
            "player recovery: {rescue}; player events around it:\n{}",
            events_around(r, t - 3.0, t + 1.0)
        ));
    }
    for c in r["console"].as_array().into_iter().flatten() {
        out.push(format!("console error: {c}"));
    }
    out
}

/// What went wrong with playback in real time, judged from the browser's report: the video's
/// clock advances with real time and never goes back; no stall longer than 0.5 s after start-up,
/// over the whole run (the page keeps its stalls across its own reloads); PROGRAM-DATE-TIME
/// latency known and positive, its median after warm-up and its maximum near what
/// docs/benchmarks.md claims (LATENCY_MEDIAN_MAX, LATENCY_MAX).
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
    // (it sometimes skipped a buffer hole there; see the closing note of issue 6). A stall over
    // 1 s sets off the page's watchdog, which player_problems fails on.
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
    if max > LATENCY_MAX {
        out.push(format!("latency up to {max:.3} s (limit {LATENCY_MAX} s)"));
    }
    if min <= 0.0 {
        out.push(format!(
            "latency {min:.3} s: clock or PROGRAM-DATE-TIME wrong"
        ));
    }
    match median(&settled_latencies(&samples)) {
        None => out.push(format!("no latency after the first {WARMUP_SECS} s")),
        Some(m) if m > LATENCY_MEDIAN_MAX => out.push(format!(
            "median latency {m:.3} s after the first {WARMUP_SECS} s (limit {LATENCY_MEDIAN_MAX} s)"
        )),
        Some(_) => {}
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
            "start-up {} s, errors {}, recoveries {}, console {}\n\
             machine during the run: {machine}",
            r["startup_s"], r["errors"], r["recoveries"], r["console"]
        );
        // Errors and rescues are not a matter of timing: they fail at once, starved or not.
        let broken = player_problems(&r);
        assert!(
            broken.is_empty(),
            "{}\nmachine during the run: {machine}",
            broken.join("\n")
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
        "latency {:.3}..{:.3} s over {} samples, median {:.3} s after the first {WARMUP_SECS} s",
        lat.iter().cloned().fold(f64::MAX, f64::min),
        lat.iter().cloned().fold(f64::MIN, f64::max),
        lat.len(),
        median(&settled_latencies(samples)).unwrap_or(f64::NAN)
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

/// The judges themselves: they flag what the browser test must fail on, and only that.
#[test]
fn realtime_problems_flags_late_stalls_and_high_latency() {
    use serde_json::{json, Value};
    // A clean 20 s report, sampled every 250 ms; latency by seconds since playback began.
    fn report(stalls: Value, latency: impl Fn(f64) -> f64) -> Value {
        let samples: Vec<_> = (0..(PLAY_SECS * 4.0) as usize)
            .map(|i| {
                let s = i as f64 * 0.25;
                json!({ "t": 1.0 + s, "currentTime": 10.0 + s, "latency": latency(s) })
            })
            .collect();
        json!({
            "samples": samples, "playing_since": 1.0, "stalls": stalls, "events": [],
            "errors": [], "recoveries": [], "console": []
        })
    }
    let steady = |_: f64| 1.1;
    let clean = report(json!([]), steady);
    assert!(realtime_problems(&clean).is_empty());
    assert!(player_problems(&clean).is_empty());

    // A start-up stall (first 3 s of playback) up to 3 s is allowed; after it, up to 0.5 s.
    let ok = json!([{ "start": 2.0, "duration": 2.5 }, { "start": 9.0, "duration": 0.4 }]);
    assert!(realtime_problems(&report(ok, steady)).is_empty());
    let late = json!([{ "start": 9.0, "duration": 0.6 }]);
    let p = realtime_problems(&report(late, steady));
    assert!(
        p.len() == 1 && p[0].starts_with("stall of 0.600 s"),
        "{p:?}"
    );

    // A higher start is allowed (hls.js catches up from 4 s in) up to LATENCY_MAX; after
    // warm-up the median must stay near the documented figure, and no sample may peak.
    let start_high = |s: f64| if s < 8.0 { 2.4 } else { 1.1 };
    assert!(realtime_problems(&report(json!([]), start_high)).is_empty());
    let p = realtime_problems(&report(json!([]), |_| 1.9));
    assert!(
        p.len() == 1 && p[0].starts_with("median latency 1.900 s"),
        "{p:?}"
    );
    let peak = |s: f64| if (15.0..15.5).contains(&s) { 2.6 } else { 1.1 };
    let p = realtime_problems(&report(json!([]), peak));
    assert!(
        p.len() == 1 && p[0].contains("latency up to 2.600 s"),
        "{p:?}"
    );
    let p = realtime_problems(&report(json!([]), |_| 3.2));
    assert!(
        p.len() == 2
            && p[0].contains("latency up to 3.200 s")
            && p[1].starts_with("median latency 3.200 s"),
        "{p:?}"
    );
    let p = realtime_problems(&report(json!([]), |_| -0.1));
    assert!(p.len() == 1 && p[0].contains("clock"), "{p:?}");

    // Player errors: hls.js's non-fatal stall report is allowed; the same fatal, any other
    // hls.js error (even non-fatal), a refused play() and the media element's errors are not.
    let with = |list: &str, v: Value| {
        let mut r = clean.clone();
        r[list] = v;
        r
    };
    let stalled = json!({
        "t": 5.0, "source": "hls.js", "type": "mediaError", "details": "bufferStalledError",
        "fatal": false
    });
    assert!(player_problems(&with("errors", json!([stalled]))).is_empty());
    let mut fatal = stalled.clone();
    fatal["fatal"] = json!(true);
    let mut hole = stalled.clone();
    hole["details"] = json!("bufferSeekOverHole");
    let play = json!({ "t": 2.0, "source": "play", "details": "AbortError" });
    let video = json!({ "t": 2.0, "source": "video", "details": 3 });
    for e in [fatal, hole, play, video] {
        let p = player_problems(&with("errors", json!([e])));
        assert!(p.len() == 1 && p[0].starts_with("player error"), "{p:?}");
    }
    // Every rescue by the page fails (with the player's events around it), as does any console
    // error, and a report that lacks one of the lists.
    let jump = json!([{ "t": 5.0, "kind": "jump", "from": 3.0, "to": 4.2, "stalled_s": 1.0 }]);
    let p = player_problems(&with("recoveries", jump));
    assert!(p.len() == 1 && p[0].starts_with("player recovery"), "{p:?}");
    let console = json!([{ "t": 3.0, "text": "Failed to load resource", "url": "/live/x.m4s" }]);
    let p = player_problems(&with("console", console));
    assert!(p.len() == 1 && p[0].starts_with("console error"), "{p:?}");
    let p = player_problems(&with("recoveries", json!(0)));
    assert!(p.len() == 1 && p[0].contains("no recoveries list"), "{p:?}");
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
    // Among them any object refused without the token (an error, a console error).
    let broken = player_problems(&r);
    assert!(broken.is_empty(), "{}", broken.join("\n"));
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
