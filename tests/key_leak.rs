//! Stream keys are secrets (issue 12): after publishing with good and bad keys over RTMP and
//! RTMPS, with every log at debug level, no key appears in anything livepop wrote: logs,
//! metrics, HTTP answers, files, or the command lines of its children.

mod common;
use common::*;
use std::path::Path;
use std::time::Duration;

/// Canaries: a valid key and a refused one, unlikely to appear by chance.
const KEY: &str = "Kx7-leak-canary-3f9c2a";
const WRONG: &str = "Kx7-wrong-canary-81d0e4";
/// The demo's own key, which its test source publishes with.
const DEMO_KEY: &str = "demo-key";

fn contains_any(hay: &[u8], needles: &[&str]) -> Option<String> {
    needles
        .iter()
        .find(|n| hay.windows(n.len()).any(|w| w == n.as_bytes()))
        .map(|n| n.to_string())
}

/// Every file under `dir` but the test's own inputs (configs it wrote hold keys by design).
fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_none_or(|x| x != "toml") {
            out.push(p);
        }
    }
}

/// Command lines of the processes whose parent is `pid`.
fn children_cmdlines(pid: u32) -> Vec<String> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let ppid: u32 = rest
            .split(' ')
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if ppid == pid {
            if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
                out.push(String::from_utf8_lossy(&c).replace('\0', " "));
            }
        }
    }
    out
}

/// Every log line of every target (livepop's and its dependencies': pingora, quinn, hyper,
/// rustls) at every level.
const TRACE: &str = "trace";

#[test]
fn stream_keys_appear_nowhere_livepop_writes() {
    let env = Env::new();
    // A core and an edge from config files, logging everything.
    let core_cfg = core_config_with_origin(&env, "core-1", "access_log = true");
    let text = std::fs::read_to_string(&core_cfg).unwrap() + "[record]\ndir = \"rec\"\n";
    let core_cfg = env.write("core-leak.toml", &text);
    let core = Proc::start_logging(
        "core",
        &["core", "--config", core_cfg.to_str().unwrap()],
        TRACE,
    );
    let mut opts = EdgeOpts::new(vec![("core-1".into(), core.addr("relay"))]);
    opts.origins = vec![core.addr("origin")];
    opts.extra_auth = format!("[[auth.streams]]\nname = \"leaky\"\nkey = \"{KEY}\"\n");
    let edge_cfg = edge_config(&env, &opts);
    let edge = Proc::start_logging(
        "edge",
        &["edge", "--config", edge_cfg.to_str().unwrap()],
        TRACE,
    );
    wait_for("edge /readyz", Duration::from_secs(10), || {
        (http_get(edge.addr("admin"), "/readyz")?.0 == 200).then_some(())
    });
    // The demo, publishing its test source through its own ingest.
    let args = demo_args(&env, &["--source", "testsrc"]);
    let demo = Proc::start_logging(
        "demo",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        TRACE,
    );

    // Good keys over RTMP and RTMPS, a refused key, a viewer. While the stream is live, what a
    // viewer is given: the multivariant and media playlists (their URIs), and the stream list.
    let http = edge.addr("http");
    let mut answers = vec![];
    for scheme in ["rtmp", "rtmps"] {
        let url = format!("{scheme}://{}/live/{KEY}", edge.addr(scheme));
        let flv = env.path().join("leaky.flv");
        if !flv.exists() {
            encode_flv_sized(&flv, "320x240", 4);
        }
        let mut ok = ffmpeg_publish_file(&url, &flv);
        if scheme == "rtmp" {
            let media = wait_for(
                "the stream through the edge",
                Duration::from_secs(20),
                || {
                    let (s, pl) = http_get(http, "/live/leaky/src/index.m3u8")?;
                    (s == 200 && pl.contains("#EXT-X-PART:")).then_some(pl)
                },
            );
            answers.push(("the media playlist".to_string(), media));
            for path in ["/live/leaky/master.m3u8", "/live/streams.json"] {
                let (s, body) = http_get(http, path).unwrap();
                assert_eq!(s, 200, "{path}");
                answers.push((path.to_string(), body));
            }
        }
        assert!(
            wait_child(&mut ok, Duration::from_secs(30)),
            "{scheme} publish failed"
        );
    }
    let mut bad = ffmpeg_publish(
        &format!("rtmp://{}/live/{WRONG}", edge.addr("rtmp")),
        2,
        "320x240",
        None,
    );
    assert!(
        !wait_child(&mut bad, Duration::from_secs(30)),
        "a wrong key was accepted"
    );
    edge.wait_log(Duration::from_secs(10), |v| {
        message_is(v, "publish finished")
    });
    // The demo's test source reaches its stream.
    let demo_admin = demo_edge_admin(&demo);
    wait_for(
        "the demo's test source publishing",
        Duration::from_secs(30),
        || {
            (metric_or_zero(
                demo_admin,
                r#"livepop_ingest_frames_total{stream="demo",track="video"}"#,
            ) > 30.0)
                .then_some(())
        },
    );
    let demo_children = children_cmdlines(demo.pid());
    assert!(
        demo_children.iter().any(|c| c.contains("ffmpeg")),
        "the demo's ffmpeg child was not found: {demo_children:?}"
    );

    let needles = [KEY, WRONG, DEMO_KEY];
    // Logs, at trace level.
    for p in [&core, &edge, &demo] {
        let logs = p.log_text();
        assert!(logs.len() > 1000, "{} logged almost nothing", p.name);
        assert!(
            logs.contains("\"level\":\"TRACE\""),
            "{} logged nothing at trace level",
            p.name
        );
        if let Some(k) = contains_any(logs.as_bytes(), &[KEY, WRONG]) {
            panic!("{} logged the key {k}", p.name);
        }
    }
    // The demo prints its own (documented) key on its banner for the newcomer: only there.
    let demo_lines: Vec<String> = demo
        .logs()
        .iter()
        .map(|v| v.to_string())
        .filter(|l| l.contains(DEMO_KEY))
        .collect();
    assert!(
        demo_lines.iter().all(|l| l.contains("Publish:")),
        "the demo key in a log line: {demo_lines:?}"
    );
    // Metrics and HTTP answers.
    let demo_http = demo.addr("http");
    let demo_media = wait_for("the demo's playlist", Duration::from_secs(20), || {
        let (s, pl) = http_get(demo_http, "/live/demo/src/index.m3u8")?;
        (s == 200).then_some(pl)
    });
    answers.push(("the demo's media playlist".into(), demo_media));
    for (addr, path) in [
        (edge.addr("admin"), "/metrics"),
        (core.addr("admin"), "/metrics"),
        (demo_admin, "/metrics"),
        (demo_core_admin(&demo), "/metrics"),
        (http, "/live/streams.json"),
        (core.addr("origin"), "/live/streams.json"),
        (demo_http, "/live/demo/master.m3u8"),
        (demo_http, "/live/streams.json"),
    ] {
        let (s, body) = http_get(addr, path).unwrap();
        assert_eq!(s, 200, "{path}");
        answers.push((format!("{addr}{path}"), body));
    }
    for (what, body) in &answers {
        assert!(
            contains_any(body.as_bytes(), &needles).is_none(),
            "{what} holds a key"
        );
    }
    // Files (recordings, certificates, the demo's data directory).
    let mut all = vec![];
    files(env.path(), &mut all);
    assert!(
        all.iter()
            .any(|p| p.extension().is_some_and(|x| x == "flv")),
        "no recording"
    );
    for f in &all {
        if let Some(k) = contains_any(&std::fs::read(f).unwrap(), &needles) {
            panic!("{} holds the key {k}", f.display());
        }
    }
    // Command lines of every child of every livepop process.
    for p in [&core, &edge, &demo] {
        for c in children_cmdlines(p.pid()) {
            assert!(
                contains_any(c.as_bytes(), &needles).is_none(),
                "child of {}: {c}",
                p.name
            );
        }
    }
}
