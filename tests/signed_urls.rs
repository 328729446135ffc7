//! Signed playback URLs (issue 12): real `livepop core` and two `livepop edge` processes, ffmpeg
//! publishing, URLs made by `livepop sign-url`. A refused request costs the core nothing; the
//! token is in no cache key and never reaches the origin; a player plays a signed URL.

mod common;
use common::*;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

const K1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const K2: &str = "2222222222222222222222222222222222222222222222222222222222222222";

fn access(keys: &[(&str, &str)]) -> String {
    let mut s = String::from("[playback.access]\nsigned = [\"demo\"]\n");
    for (id, secret) in keys {
        s += &format!("[[playback.access.keys]]\nid = \"{id}\"\nsecret = \"{secret}\"\n");
    }
    s
}

/// `livepop sign-url` with `config`; returns the URL's path.
fn sign_url(config: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(["sign-url", "--config", config.to_str().unwrap()])
        .args(args)
        .args(["--base", "http://edge"])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "sign-url {args:?} failed");
    let url = String::from_utf8(out.stdout).unwrap();
    url.trim().strip_prefix("http://edge").unwrap().to_string()
}

/// The token of a signed path.
fn token(path: &str) -> &str {
    path.strip_prefix("/t/").unwrap().split('/').next().unwrap()
}

fn status(addr: SocketAddr, path: &str) -> u16 {
    http_get_full(addr, path).map_or(0, |r| r.0)
}

#[test]
fn signed_urls_are_checked_at_the_edge() {
    let env = Env::new();
    let core = start_core_with_origin(&env, "core-1", "access_log = true");
    let origin = core.addr("origin");
    let config = |name: &str, keys: &[(&str, &str)]| {
        let mut opts = EdgeOpts::new(vec![("core-1".into(), core.addr("relay"))]);
        opts.origins = vec![origin];
        let cfg = edge_config(&env, &opts);
        let text = std::fs::read_to_string(&cfg).unwrap().replacen(
            "[relay]\n",
            &format!("{}[relay]\n", access(keys)),
            1,
        );
        env.write(&format!("{name}.toml"), &text)
    };
    let edge_at = |name: &str, keys: &[(&str, &str)]| {
        let cfg = config(name, keys);
        let p = Proc::start(name, &["edge", "--config", cfg.to_str().unwrap()]);
        wait_for("edge /readyz", Duration::from_secs(10), || {
            (http_get(p.addr("admin"), "/readyz")?.0 == 200).then_some(())
        });
        (p, cfg)
    };
    // Edge A holds k1 and k2; edge B has rotated k1 out.
    let (a, a_cfg) = edge_at("edge-a", &[("k1", K1), ("k2", K2)]);
    let (b, _) = edge_at("edge-b", &[("k2", K2)]);
    // A config with a key no edge holds, to sign a URL with an unknown key id.
    let rogue_cfg = config("edge-rogue", &[("k9", K1)]);
    let mut ff = ffmpeg_publish(
        &format!("rtmp://{}/live/demo-key", a.addr("rtmp")),
        30,
        "320x240",
        None,
    );
    let (ha, hb) = (a.addr("http"), b.addr("http"));
    let core_requests = |uri: &str| {
        core.logs()
            .iter()
            .filter(|v| message_is(v, "origin request") && v["fields"]["uri"] == uri)
            .count()
    };

    let k1 = sign_url(
        &a_cfg,
        &["--stream", "demo", "--key-id", "k1", "--ttl", "120"],
    );
    let k2 = sign_url(&a_cfg, &["--stream", "demo", "--ttl", "120"]); // the last key: k2
    assert!(k2.contains("/k2."), "{k2}");
    let media = |signed: &str| signed.replace("master.m3u8", "src/index.m3u8");
    // Valid: the stream plays through its token.
    let pl = wait_for(
        "the signed stream playable",
        Duration::from_secs(30),
        || {
            let (s, body) = http_get(ha, &media(&k1))?;
            (s == 200 && !complete_segments(&body).is_empty()).then_some(body)
        },
    );
    assert_eq!(status(ha, &k1), 200);
    let (_, seg) = complete_segments(&pl).remove(0);
    let seg_path = |signed: &str| signed.replace("master.m3u8", &format!("src/{seg}"));
    let seg_uri = format!("/live/demo/src/{seg}");

    // The token is in no cache key: k1 and k2 URLs of one segment, on edge A, cost one request,
    // and the origin never sees a token.
    let before = core_requests(&seg_uri);
    assert_eq!(status(ha, &seg_path(&k1)), 200);
    assert_eq!(status(ha, &seg_path(&k2)), 200);
    wait_for(
        "the segment request at the core",
        Duration::from_secs(5),
        || (core_requests(&seg_uri) >= 1).then_some(()),
    );
    assert_eq!(core_requests(&seg_uri), before.max(1));
    assert!(!core
        .logs()
        .iter()
        .any(|v| message_is(v, "origin request") && v.to_string().contains("/t/")));

    // Refused with 403, each without a core request (the segment is cached, so ask for a
    // playlist object never requested before: the master on edge B).
    let master_uri = "/live/demo/master.m3u8";
    // Edge A's request for it (above) is in the core's log before counting starts.
    wait_for(
        "edge A's master request at the core",
        Duration::from_secs(5),
        || (core_requests(master_uri) >= 1).then_some(()),
    );
    let before = core_requests(master_uri);
    let expired = sign_url(&a_cfg, &["--stream", "demo", "--ttl", "0"]);
    let wrong_prefix = {
        let other = sign_url(&a_cfg, &["--stream", "other", "--key-id", "k2"]);
        k2.replace(token(&k2), token(&other))
    };
    let tampered = {
        let t = token(&k2);
        let f: Vec<&str> = t.split('.').collect();
        let later: u64 = f[1].parse::<u64>().unwrap() + 86_400;
        k2.replace(t, &format!("{}.{later}.{}.{}", f[0], f[2], f[3]))
    };
    let unknown_key = sign_url(&rogue_cfg, &["--stream", "demo", "--key-id", "k9"]);
    let cases = [
        (
            "no token",
            "/live/demo/master.m3u8".to_string(),
            "token_missing",
        ),
        ("expired", expired, "token_expired"),
        ("tampered", tampered, "token_signature"),
        ("wrong prefix", wrong_prefix, "token_prefix"),
        ("unknown key id", unknown_key, "token_unknown_key"),
        ("rotated out", k1.clone(), "token_unknown_key"),
    ];
    for (what, path, reason) in &cases {
        let (s, body) = http_get(hb, path).unwrap();
        assert_eq!(s, 403, "{what}: {body}");
        let m = format!("livepop_edge_refused_total{{reason=\"{reason}\"}}");
        assert!(metric(b.addr("admin"), &m) >= 1.0, "{what}: {m}");
    }
    assert_eq!(
        core_requests(master_uri),
        before,
        "a refused request reached the core"
    );
    // Signed streams are not listed for everyone (the core's own list has it).
    let listed = |a: SocketAddr| http_get(a, "/live/streams.json").unwrap().1;
    assert!(listed(origin).contains("\"demo\""));
    assert!(!listed(hb).contains("\"demo\""), "{}", listed(hb));
    // The rotated-in key still plays on B.
    assert_eq!(status(hb, &k2), 200);
    wait_for(
        "the master request at the core",
        Duration::from_secs(5),
        || (core_requests(master_uri) == before + 1).then_some(()),
    );

    // A player (livepop-loadtest) plays the signed URL: every object through the token.
    let json = env.path().join("viewer.json");
    let ok = Command::new(loadtest_bin())
        .args(["viewers", "--url"])
        .arg(format!("http://{hb}{k2}"))
        .args(["--count", "2", "--duration", "6", "--json"])
        .arg(&json)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success());
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["errors"], 0, "{report}");
    assert!(
        report["kinds"]["part"]["requests"].as_u64().unwrap_or(0) > 5,
        "{report}"
    );
    let _ = ff.kill();
    let _ = ff.wait();
}
