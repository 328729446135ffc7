//! `livepop-loadtest` (loadtest/, a workspace member) against real servers: `livepop demo` with
//! two of its publishers and 220 of its viewers (LL-HLS over HTTP/1.1, plain HLS over HTTP/2
//! with TLS), checked against the edge's own /metrics; and a deliberately broken origin.
//! The binary is built by `cargo build --workspace` (deploy/test.sh).

mod common;

use common::*;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn loadtest(args: &[&str]) -> Child {
    Command::new(loadtest_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Waits for a loadtest process; returns its stdout (echoed) and asserts it exited 0.
fn finish(mut c: Child, name: &str, timeout: Duration) -> String {
    let out = c.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let ok = wait_child(&mut c, timeout);
    let text = reader.join().unwrap();
    for l in text.lines() {
        eprintln!("[{name}] {l}");
    }
    assert!(ok, "{name} failed");
    text
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

/// The edge's `livepop_edge_responses_total` samples: (kind, status) → count.
fn edge_responses(admin: SocketAddr) -> BTreeMap<(String, String), u64> {
    let (_, body) = http_get(admin, "/metrics").unwrap();
    let mut m = BTreeMap::new();
    for l in body
        .lines()
        .filter(|l| l.starts_with("livepop_edge_responses_total{"))
    {
        let (labels, v) = l.rsplit_once(' ').unwrap();
        let get = |k: &str| {
            let i = labels.find(&format!("{k}=\"")).unwrap() + k.len() + 2;
            labels[i..].split('"').next().unwrap().to_string()
        };
        m.insert(
            (get("kind"), get("status")),
            v.parse::<f64>().unwrap() as u64,
        );
    }
    m
}

fn delta(
    after: &BTreeMap<(String, String), u64>,
    before: &BTreeMap<(String, String), u64>,
) -> BTreeMap<(String, String), u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

/// The report's requests by the edge's kinds (both playlist kinds are "playlist" there).
fn report_by_edge_kind(reports: &[&serde_json::Value]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for r in reports {
        for (k, v) in r["kinds"].as_object().unwrap() {
            let kind = if k == "playlist_hold" {
                "playlist"
            } else {
                k.as_str()
            };
            *m.entry(kind.to_string()).or_default() += v["requests"].as_u64().unwrap();
        }
    }
    m
}

#[test]
fn viewers_and_publishers_against_the_demo_agree_with_the_edge_metrics() {
    let env = Env::new();
    let flv = env.path().join("in.flv");
    // 640×360: below every rung of the demo's ladder, so the core only packages.
    encode_flv_sized(&flv, "640x360", 10);
    // The third key is unknown to the edge: that publisher is refused, the others unharmed.
    let keys = env.write("keys.txt", "load-key-1\nload-key-2\nno-such-key\n");
    let demo = start_demo(
        &env,
        &["--key", "load1=load-key-1", "--key", "load2=load-key-2"],
    );
    let (http, https, rtmp) = (demo.addr("http"), demo.addr("https"), demo.addr("rtmp"));
    let admin = demo_edge_admin(&demo);

    let pubs_json = env.path().join("publishers.json");
    let publishers = loadtest(&[
        "publishers",
        "--url",
        &format!("rtmp://{rtmp}/live"),
        "--keys-file",
        keys.to_str().unwrap(),
        "--count",
        "3",
        "--duration",
        "28",
        "--file",
        flv.to_str().unwrap(),
        "--json",
        pubs_json.to_str().unwrap(),
    ]);
    // Playable, with the three segments a plain HLS player starts behind (RFC 8216 §6.3.3):
    // with fewer it starts at the live edge with nothing buffered and stalls at every segment.
    for s in ["load1", "load2"] {
        wait_for("both streams playable", Duration::from_secs(30), || {
            let (st, pl) = http_get(http, &format!("/live/{s}/src/index.m3u8"))?;
            (st == 200 && complete_segments(&pl).len() >= 3).then_some(())
        });
    }
    let before = edge_responses(admin);

    let (a_json, b_json, plot) = (
        env.path().join("a.json"),
        env.path().join("b.json"),
        env.path().join("a.svg"),
    );
    let ll = loadtest(&[
        "viewers",
        "--url",
        &format!("http://{http}/live/load1/master.m3u8"),
        "--count",
        "200",
        "--duration",
        "15",
        "--ramp",
        "3",
        "--json",
        a_json.to_str().unwrap(),
        "--plot",
        plot.to_str().unwrap(),
    ]);
    let ca = env.path().join("demo/dev-certs/public-ca.pem");
    let plain = loadtest(&[
        "viewers",
        "--url",
        &format!("https://{https}/live/load2/master.m3u8"),
        "--ca",
        ca.to_str().unwrap(),
        "--mode",
        "plain",
        "--count",
        "20",
        "--duration",
        "15",
        "--json",
        b_json.to_str().unwrap(),
        "--quiet",
    ]);
    // 15 s, then requests in flight finish (each within the 10 s timeout).
    let started = Instant::now();
    let ll_out = finish(ll, "ll-viewers", Duration::from_secs(60));
    finish(plain, "plain-viewers", Duration::from_secs(60));
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "{:?}",
        started.elapsed()
    );
    assert!(ll_out.contains("t=   1s"), "a live line per second");
    assert!(ll_out.contains("summary:"));
    let (a, b) = (json(&a_json), json(&b_json));

    // The report agrees with the edge: the same requests, by kind, and no errors on either side.
    let reported = report_by_edge_kind(&[&a, &b]);
    let mut edge = BTreeMap::new();
    wait_for(
        "edge metrics to match the report",
        Duration::from_secs(10),
        || {
            let d = delta(&edge_responses(admin), &before);
            edge = BTreeMap::new();
            for ((kind, _), v) in &d {
                *edge.entry(kind.clone()).or_insert(0u64) += v;
            }
            (edge == reported).then_some(())
        },
    );
    let d = delta(&edge_responses(admin), &before);
    let edge_errors: u64 = d
        .iter()
        .filter(|((_, s), _)| s != "200")
        .map(|(_, v)| v)
        .sum();
    let report_errors = a["errors"].as_u64().unwrap() + b["errors"].as_u64().unwrap();
    assert_eq!(edge_errors, report_errors, "edge {d:?}, report {a} {b}");
    assert_eq!(
        report_errors, 0,
        "a healthy run: {} {}",
        a["errors_by_status"], b["errors_by_status"]
    );
    eprintln!("requests by kind, report = edge: {reported:?}");

    // LL-HLS viewers: parts and blocking reloads, HTTP/1.1, plausible latency, few stalls.
    assert_eq!(a["viewers"], 200);
    assert!(a["kinds"]["part"]["requests"].as_u64().unwrap() > 200 * 15 * 5 / 2);
    assert!(a["kinds"]["playlist_hold"]["requests"].as_u64().unwrap() > 200 * 15);
    let hold = &a["kinds"]["playlist_hold"]["total"];
    assert!(
        hold["p50_ms"].as_f64().unwrap() > 20.0,
        "blocking reloads are held: {hold}"
    );
    let lat = &a["latency"];
    let (p50, p99) = (
        lat["p50_ms"].as_f64().unwrap(),
        lat["p99_ms"].as_f64().unwrap(),
    );
    eprintln!(
        "LL latency p50 {p50} ms, p99 {p99} ms, stalls {}",
        a["stalls"]
    );
    // A part's last byte comes at least its duration (200 ms) after its first sample reached
    // the edge; a healthy run shows p50 ≈ 230 ms, p99 ≈ 1.5 s (the p99 is the viewers' start,
    // which begins a part back) and no stall. Bounds: about 2.5× that for a loaded machine.
    assert!((150.0..600.0).contains(&p50), "latency p50 {p50} ms");
    assert!(p99 < 3000.0 && p99 >= p50, "latency p99 {p99} ms");
    assert!(lat["count"].as_u64().unwrap() > 200 * 15 * 5 / 2);
    // At most a handful of short stalls among 3,000 viewer-seconds.
    let (stalls, stalled) = (
        a["stalls"].as_u64().unwrap(),
        a["stall_seconds"].as_f64().unwrap(),
    );
    assert!(
        stalls <= 10 && stalled < 5.0,
        "{stalls} stalls, {stalled} s"
    );
    assert!(a["http_versions"]["HTTP/1.1"].as_u64().unwrap() > 0);
    assert!(a["timeline"].as_array().unwrap().len() >= 14);
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("<polyline"));

    // Plain HLS viewers over HTTP/2 with TLS: segments, no parts, latency of whole segments.
    assert_eq!(b["viewers"], 20);
    assert!(b["kinds"]["segment"]["requests"].as_u64().unwrap() >= 20 * 3);
    assert!(b["kinds"].get("part").is_none(), "{}", b["kinds"]);
    assert!(
        b["http_versions"]["HTTP/2.0"].as_u64().unwrap() > 0,
        "{}",
        b["http_versions"]
    );
    // A whole 2 s segment: its last byte comes at least 2 s after its first sample.
    let bl = b["latency"]["p50_ms"].as_f64().unwrap();
    eprintln!("plain latency p50 {bl} ms, stalls {}", b["stalls"]);
    assert!(
        (2000.0..4000.0).contains(&bl),
        "segment latency p50 {bl} ms"
    );
    assert_eq!(b["stalls"], 0, "{b}");

    // Publishers: both published the whole time at real-time pace.
    finish(publishers, "publishers", Duration::from_secs(40));
    let p = json(&pubs_json);
    let list = p["publishers"].as_array().unwrap();
    assert_eq!(list.len(), 3);
    let refused = &list[2];
    assert_eq!(refused["sessions"], 0, "{refused}");
    assert!(
        refused["connect_failures"].as_u64().unwrap() >= 2,
        "{refused}"
    );
    assert!(
        refused["last_error"].as_str().unwrap().contains("refused"),
        "{refused}"
    );
    for r in &list[..2] {
        assert_eq!(r["sessions"], 1, "{r}");
        assert_eq!(r["connect_failures"], 0, "{r}");
        assert!(r["frames"].as_u64().unwrap() > 25 * 30, "{r}");
        eprintln!("publisher backlog max {} ms", r["max_backlog_ms"]);
        assert!(r["max_backlog_ms"].as_u64().unwrap() < 500, "{r}");
    }
}

/// A deliberately broken LL-HLS origin: the multivariant and plain media playlists are fine,
/// parts answer 500, and blocking reloads are held open and never answered.
fn broken_origin() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                    }
                    let (status, body) = if path.contains("_HLS_msn") {
                        // Stalled: hold the connection, never answer.
                        std::thread::park_timeout(Duration::from_secs(120));
                        return;
                    } else if path.ends_with("master.m3u8") {
                        ("200 OK", "#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1000000,RESOLUTION=640x360\nsrc/index.m3u8\n".to_string())
                    } else if path.ends_with("index.m3u8") {
                        ("200 OK", "#EXTM3U\n#EXT-X-VERSION:9\n#EXT-X-TARGETDURATION:2\n#EXT-X-PART-INF:PART-TARGET=0.2\n#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK=0.6\n#EXT-X-MEDIA-SEQUENCE:1\n#EXT-X-MAP:URI=\"init.mp4\"\n#EXT-X-PROGRAM-DATE-TIME:2026-11-24T00:00:00.000Z\n#EXT-X-PART:DURATION=0.2,URI=\"s1.0.m4s\",INDEPENDENT=YES\n#EXT-X-PART:DURATION=0.2,URI=\"s1.1.m4s\"\n#EXT-X-PART:DURATION=0.2,URI=\"s1.2.m4s\"\n#EXT-X-PART:DURATION=0.2,URI=\"s1.3.m4s\"\n#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"s1.4.m4s\"\n".to_string())
                    } else if path.ends_with("init.mp4") {
                        ("200 OK", "init".to_string())
                    } else {
                        ("500 Internal Server Error", "broken\n".to_string())
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if s.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn a_broken_origin_is_reported_not_a_crash_or_a_hang() {
    let origin = broken_origin();
    let env = Env::new();
    let out_json = env.path().join("broken.json");
    let started = Instant::now();
    let c = loadtest(&[
        "viewers",
        "--url",
        &format!("http://{origin}/live/x/master.m3u8"),
        "--count",
        "20",
        "--duration",
        "6",
        "--timeout-ms",
        "2000",
        "--json",
        out_json.to_str().unwrap(),
    ]);
    // Bounded: the run, then requests in flight end at their 2 s timeout.
    let text = finish(c, "broken", Duration::from_secs(30));
    let took = started.elapsed();
    assert!(took < Duration::from_secs(6 + 2 * 2 + 3), "took {took:?}");
    let r = json(&out_json);
    let by = &r["errors_by_status"];
    assert!(by["500"].as_u64().unwrap() > 0, "{by}");
    assert!(by["timeout"].as_u64().unwrap() > 0, "{by}");
    assert!(r["kinds"]["part"]["errors"].as_u64().unwrap() > 0);
    assert!(r["kinds"]["playlist_hold"]["errors"].as_u64().unwrap() > 0);
    assert_eq!(
        r["errors"].as_u64().unwrap(),
        by.as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum::<u64>()
    );
    assert!(
        text.contains("errors by status:") && text.contains("500:"),
        "{text}"
    );
    // Nothing played, so nothing counts as a stall or has a latency.
    assert!(r["latency"].is_null());

    // The request cap ends the run early: exactly that many requests.
    let capped = env.path().join("capped.json");
    let c = loadtest(&[
        "viewers",
        "--url",
        &format!("http://{origin}/live/x/master.m3u8"),
        "--count",
        "5",
        "--duration",
        "30",
        "--max-requests",
        "25",
        "--timeout-ms",
        "1000",
        "--json",
        capped.to_str().unwrap(),
        "--quiet",
    ]);
    finish(c, "capped", Duration::from_secs(30));
    assert_eq!(json(&capped)["requests"], 25);

    // A publisher whose server is not there: connect failures reported, no crash, no hang.
    let keys = env.write("keys.txt", "k\n");
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let pubs = env.path().join("pubs.json");
    let c = loadtest(&[
        "publishers",
        "--url",
        &format!("rtmp://{closed}/live"),
        "--keys-file",
        keys.to_str().unwrap(),
        "--duration",
        "3",
        "--json",
        pubs.to_str().unwrap(),
    ]);
    finish(c, "no-server", Duration::from_secs(20));
    let p = &json(&pubs)["publishers"][0];
    assert!(p["connect_failures"].as_u64().unwrap() >= 2, "{p}");
    assert_eq!(p["sessions"], 0);

    // A remote target is refused without --allow-remote, with a clear error.
    let out = Command::new(loadtest_bin())
        .args([
            "viewers",
            "--url",
            "http://192.0.2.1/live/x/master.m3u8",
            "--duration",
            "1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-remote"));
}
