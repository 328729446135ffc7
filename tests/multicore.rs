//! Several cores with playback: each stream is packaged by the core rendezvous hashing picks,
//! viewers reach that core through any edge, every edge lists every core's streams, and when
//! the packaging core dies the stream fails over and plays again through the edges, with
//! nothing of the dead core's output served for the new one.

mod common;
use common::*;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Through the edges, a stream plays again within this long after its core is killed: the
/// relay notices a dead core within 2 s (docs/relay-protocol.md), the surviving core starts
/// at the next keyframe (1 s apart here) and its origin answers with its first part.
const FAILOVER_PLAYBACK: Duration = Duration::from_secs(6);

/// A core with recording and an LL-HLS origin on port 0.
fn core(env: &Env, name: &str) -> Proc {
    let base = std::fs::read_to_string(core_config(env, name, "127.0.0.1:0", true)).unwrap();
    let cfg = env.write(
        &format!("{name}-playback.toml"),
        &format!("{base}[origin]\nlisten = \"127.0.0.1:0\"\n"),
    );
    Proc::start(name, &["core", "--config", cfg.to_str().unwrap()])
}

/// The stream's media playlist with at least one part, or None.
fn media(addr: SocketAddr, stream: &str) -> Option<String> {
    let (st, pl) = http_get(addr, &format!("/live/{stream}/src/index.m3u8"))?;
    (st == 200 && pl.contains("#EXT-X-PART:")).then_some(pl)
}

/// The URIs of the init sections, parts and complete segments a media playlist lists (not GAP
/// ones).
fn media_uris(pl: &str) -> Vec<String> {
    let mut out = vec![];
    for l in pl.lines() {
        if let Some(attrs) = l.strip_prefix("#EXT-X-MAP:") {
            out.extend(
                attrs
                    .split("URI=\"")
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .map(String::from),
            );
        } else if let Some(attrs) = l.strip_prefix("#EXT-X-PART:") {
            if attrs.contains("GAP=YES") {
                continue;
            }
            if let Some(u) = attrs
                .split("URI=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
            {
                out.push(u.to_string());
            }
        } else if !l.starts_with('#') && !l.is_empty() {
            out.push(l.to_string());
        }
    }
    out
}

#[test]
fn viewers_reach_each_streams_core_through_any_edge_and_follow_its_failover() {
    let env = Env::new();
    let flv = env.path().join("in.flv");
    encode_flv_sized(&flv, "320x240", 40);
    let mut cores = [core(&env, "core-a"), core(&env, "core-b")];
    let ids = ["core-a", "core-b"];
    // "demo" hashes to core-b and "s1" to core-a (the placement table of src/fleet.rs).
    assert_eq!(livepop::fleet::pick("demo", ids), Some("core-b"));
    assert_eq!(livepop::fleet::pick("s1", ids), Some("core-a"));
    let relays: Vec<(String, SocketAddr)> = ids
        .iter()
        .zip(&cores)
        .map(|(id, c)| (id.to_string(), c.addr("relay")))
        .collect();
    let origins: Vec<SocketAddr> = cores.iter().map(|c| c.addr("origin")).collect();
    let edges: Vec<Proc> = [("edge-1", "certs/edge"), ("edge-2", "certs/node-edge-2")]
        .iter()
        .map(|(node, cert)| {
            let mut o = EdgeOpts::new(relays.clone());
            o.origins = origins.clone();
            o.node_id = node.to_string();
            o.relay_cert = cert.to_string();
            o.extra_auth = "[[auth.streams]]\nname = \"s1\"\nkey = \"s1-key\"\n".into();
            start_edge(&env, &o)
        })
        .collect();
    for e in &edges {
        for id in ids {
            let up = format!("livepop_relay_core_up{{core=\"{id}\"}}");
            wait_for("both cores linked", Duration::from_secs(10), || {
                (metric_or_zero(e.addr("admin"), &up) == 1.0).then_some(())
            });
        }
    }
    // Streamers at different edges.
    let rtmp = |e: &Proc, key: &str| format!("rtmp://{}/live/{key}", e.addr("rtmp"));
    let mut demo_pub = ffmpeg_publish_file(&rtmp(&edges[0], "demo-key"), &flv);
    let mut s1_pub = ffmpeg_publish_file(&rtmp(&edges[1], "s1-key"), &flv);

    // Every edge plays both streams.
    for (i, e) in edges.iter().enumerate() {
        for s in ["demo", "s1"] {
            wait_for(
                &format!("{s} through edge {i}"),
                Duration::from_secs(20),
                || media(e.addr("http"), s),
            );
        }
    }
    // Each from the core that packages it: the other core's origin does not know it.
    let origin_status = |core: usize, s: &str| {
        http_get(origins[core], &format!("/live/{s}/master.m3u8")).map(|r| r.0)
    };
    assert_eq!(origin_status(1, "demo"), Some(200));
    assert_eq!(origin_status(0, "demo"), Some(404));
    assert_eq!(origin_status(0, "s1"), Some(200));
    assert_eq!(origin_status(1, "s1"), Some(404));
    // Every edge lists both cores' streams.
    for e in &edges {
        let (st, body) = http_get(e.addr("http"), "/live/streams.json").unwrap();
        assert_eq!(st, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let mut live: Vec<&str> = v["streams"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["live"] == true)
            .filter_map(|s| s["name"].as_str())
            .collect();
        live.sort_unstable();
        assert_eq!(live, ["demo", "s1"], "{body}");
    }
    // Viewers on both edges fetch what the dead core made (so the edges hold it in cache).
    let before: Vec<String> = edges
        .iter()
        .flat_map(|e| {
            let pl = media(e.addr("http"), "demo").unwrap();
            for u in media_uris(&pl) {
                let got = http_get_full(e.addr("http"), &format!("/live/demo/src/{u}"));
                assert_eq!(got.map(|g| g.0), Some(200), "{u}");
            }
            media_uris(&pl)
        })
        .collect();

    // The core packaging "demo" dies.
    cores[1].kill();
    let killed = Instant::now();
    let http2 = edges[1].addr("http");
    // Through the edge the streamer is not on: the playlist is the survivor's.
    let pl = wait_for(
        "demo plays again through the other edge",
        FAILOVER_PLAYBACK * 2,
        || {
            let pl = media(http2, "demo")?;
            let direct = media(origins[0], "demo")?;
            // The survivor's, not a cached playlist of the dead core.
            let last = |p: &str| media_uris(p).last().cloned();
            (last(&pl).is_some() && media_uris(&direct).contains(&last(&pl)?)).then_some(pl)
        },
    );
    let took = killed.elapsed();
    eprintln!("playback through the edges resumed {took:?} after the core was killed");
    assert!(took < FAILOVER_PLAYBACK, "took {took:?}");
    // Every object of the new playlist, through both edges, is the survivor's: none of the
    // dead core's cached objects is served under a name the survivor uses again.
    wait_for(
        "two complete segments after failover",
        Duration::from_secs(10),
        || (complete_segments(&media(origins[0], "demo")?).len() >= 2).then_some(()),
    );
    let pl = media(origins[0], "demo").unwrap_or(pl);
    let reused: Vec<String> = media_uris(&pl)
        .into_iter()
        .filter(|u| before.contains(u))
        .collect();
    eprintln!(
        "before: {before:?}\nafter: {:?}\nreused: {reused:?}",
        media_uris(&pl)
    );
    for e in &edges {
        for u in media_uris(&pl) {
            let path = format!("/live/demo/src/{u}");
            let via_edge = http_get_full(e.addr("http"), &path).unwrap();
            let direct = http_get_full(origins[0], &path).unwrap();
            assert_eq!((via_edge.0, direct.0), (200, 200), "{path}");
            assert!(
                via_edge.2 == direct.2,
                "{path} through the edge differs from the survivor's (names reused: {reused:?})"
            );
        }
    }
    // And a player gets through it: ffmpeg reads 3 s of the stream through the other edge.
    let out = std::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-nostdin"])
        .args(["-i", &format!("http://{http2}/live/demo/master.m3u8")])
        .args(["-t", "3", "-f", "null", "-"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ffmpeg: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The stream on the surviving core was not disturbed; both publishers finish normally.
    assert_eq!(origin_status(0, "s1"), Some(200));
    assert!(media(edges[0].addr("http"), "s1").is_some());
    assert!(
        wait_child(&mut demo_pub, Duration::from_secs(60)),
        "demo publisher"
    );
    assert!(
        wait_child(&mut s1_pub, Duration::from_secs(60)),
        "s1 publisher"
    );
}
