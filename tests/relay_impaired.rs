//! The relay on an impaired path: `livepop edge` → user-space UDP impairment proxy (loss, delay,
//! bandwidth cap) → `livepop core`, ffmpeg publishing a 4 Mbit/s 720p stream, LL-HLS viewers
//! (livepop-loadtest) through the edge. Issue 13's acceptance tests.

mod common;

use common::impair::{Link, UdpImpair, DOWN, UP};
use common::relay_path::{groups_received, run, stream_file, Outcome, SECS};
use common::*;
use std::net::UdpSocket;
use std::path::Path;
use std::time::{Duration, Instant};

fn both(a: Link) -> (Link, Link) {
    (a, a)
}

/// Runs two paths at once (so that both see the same machine load) and returns both outcomes.
fn side_by_side(flv: &Path, a: (&str, Link, Link), b: (&str, Link, Link)) -> (Outcome, Outcome) {
    std::thread::scope(|s| {
        let ha = s.spawn(|| run(a.0, flv, SECS, a.1, a.2));
        let hb = s.spawn(|| run(b.0, flv, SECS, b.1, b.2));
        (ha.join().unwrap(), hb.join().unwrap())
    })
}

#[test]
fn one_percent_loss_at_50ms_rtt_loses_no_frame() {
    let dir = Env::new();
    let flv = stream_file(dir.path(), SECS);
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
    // At least the initial window of QUIC (RFC 9002 §7.2: ten datagrams).
    assert!(lossy.link.3 >= 12_000.0, "cwnd {:?}", lossy.link);
}

#[test]
fn five_percent_loss_at_50ms_rtt_no_stall_few_gaps() {
    let dir = Env::new();
    let flv = stream_file(dir.path(), SECS);
    let (up, down) = both(Link::delay_ms(25).loss(0.05));
    let o = run("5% loss", &flv, SECS, up, down);
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
    let flv = stream_file(dir.path(), SECS);
    // 2 Mbit/s towards the core, half the stream's rate; 50 ms RTT.
    let up = Link::delay_ms(25).rate(2_000_000);
    let o = run("2 Mbit/s", &flv, SECS, up, Link::delay_ms(25));
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

/// A path that drops everything for 3 s (past the 2 s idle timeout): the publisher is never
/// held back, the edge reconnects, and the stream goes on at the core from a keyframe.
#[test]
fn a_blackholed_path_resumes_without_holding_the_publisher() {
    let env = Env::new();
    let core = start_core(&env, "core-1", "127.0.0.1:0");
    let (relay, core_admin) = (core.addr("relay"), core.addr("admin"));
    let proxy = UdpImpair::start(relay, Link::delay_ms(10), Link::delay_ms(10));
    let edge = start_edge(&env, &EdgeOpts::new(vec![("core-1".into(), proxy.addr())]));
    let sent = env.path().join("sent.flv");
    let started = Instant::now();
    let mut ff = ffmpeg_publish(
        &format!("rtmp://{}/live/demo-key", edge.addr("rtmp")),
        14,
        "640x360",
        Some(&sent),
    );
    let video = frames_metric("demo", "video");
    wait_for("frames at the core", Duration::from_secs(20), || {
        (metric_or_zero(core_admin, &video) > 60.0).then_some(())
    });
    proxy.blackhole(true);
    edge.wait_log(Duration::from_secs(10), |v| {
        message_is(v, "connection to core lost")
    });
    let before = metric(core_admin, &video);
    proxy.blackhole(false);
    // Back: frames flow again, the resumed stream starts at a keyframe.
    wait_for(
        "frames after the blackhole",
        Duration::from_secs(15),
        || (metric(core_admin, &video) > before + 60.0).then_some(()),
    );
    assert!(
        wait_child(&mut ff, Duration::from_secs(60)),
        "ffmpeg failed"
    );
    // The publisher ran at its own pace throughout (14 s of media).
    assert!(
        started.elapsed() < Duration::from_secs(14 + 8),
        "{:?}",
        started.elapsed()
    );
    let rec = wait_for("the core's recording", Duration::from_secs(20), || {
        recordings(&env, "core-1").into_iter().next()
    });
    let got = by_track(&packets(&rec), "video");
    let all = by_track(&packets(&sent), "video");
    assert!(got.len() < all.len(), "the blackhole cost frames");
    // Every frame the core has is a sent frame, in order, and each run after a gap starts at
    // a keyframe.
    let index: std::collections::HashMap<i64, usize> =
        all.iter().enumerate().map(|(i, v)| (v.0, i)).collect();
    let mut prev: Option<usize> = None;
    for (pts, key) in &got {
        let i = index[pts];
        if let Some(p) = prev {
            assert!(i > p, "out of order at {pts}");
            if i != p + 1 {
                assert!(key, "a run after a gap starts at a keyframe: {pts}");
            }
        }
        prev = Some(i);
    }
    // The link came back up.
    assert_eq!(
        metric(edge.addr("admin"), "livepop_relay_core_up{core=\"core-1\"}"),
        1.0
    );
}

/// A lossy long-haul path (5 % loss, 50 ms RTT) that then goes dark for 4 s (past the 2 s idle
/// timeout) and comes back, while a viewer plays through the edge: the publisher is never held
/// back or cut off, the edge's memory stays bounded, the groups the outage cost are counted as
/// skipped, the core marks the hole with GAP parts, and the stream plays on through the edge.
#[test]
fn a_lossy_path_that_goes_dark_costs_counted_groups_and_gap_parts_and_plays_on() {
    let env = Env::new();
    let secs = 24;
    let flv = stream_file(env.path(), secs);
    let core_cfg = env.write(
        "core.toml",
        &format!(
            "{}[origin]\nlisten = \"127.0.0.1:0\"\n",
            std::fs::read_to_string(core_config(&env, "core-1", "127.0.0.1:0", true)).unwrap()
        ),
    );
    let core = Proc::start("core-1", &["core", "--config", core_cfg.to_str().unwrap()]);
    let (core_admin, origin) = (core.addr("admin"), core.addr("origin"));
    let lossy = Link::delay_ms(25).loss(0.05);
    let proxy = UdpImpair::start(core.addr("relay"), lossy, lossy);
    let mut o = EdgeOpts::new(vec![("core-1".into(), proxy.addr())]);
    o.origins = vec![origin];
    let edge = start_edge(&env, &o);
    let (http, edge_admin) = (edge.addr("http"), edge.addr("admin"));
    let started = Instant::now();
    let mut ff = ffmpeg_publish_file(&format!("rtmp://{}/live/demo-key", edge.addr("rtmp")), &flv);
    let media = "/live/demo/src/index.m3u8";
    wait_for(
        "the stream through the edge",
        Duration::from_secs(20),
        || {
            let (s, pl) = http_get(http, media)?;
            (s == 200 && complete_segments(&pl).len() >= 2).then_some(())
        },
    );
    let skipped = || {
        ["behind", "evicted", "outage"]
            .iter()
            .map(|r| {
                metric_or_zero(
                    edge_admin,
                    &format!(
                        "livepop_relay_groups_skipped_total{{reason=\"{r}\",stream=\"demo\"}}"
                    ),
                )
            })
            .sum::<f64>()
    };
    let skipped_before = skipped();

    // Dark for 4 s.
    proxy.blackhole(true);
    edge.wait_log(Duration::from_secs(10), |v| {
        message_is(v, "connection to core lost")
    });
    let dark = Instant::now();
    let video = frames_metric("demo", "video");
    let frames_dark = metric(core_admin, &video);
    wait_for("4 s of darkness", Duration::from_secs(6), || {
        (dark.elapsed() >= Duration::from_secs(3)).then_some(())
    });
    proxy.blackhole(false);
    wait_for("frames after the outage", Duration::from_secs(15), || {
        (metric(core_admin, &video) > frames_dark + 60.0).then_some(())
    });
    // A viewer plays on through the edge: 3 s of the stream, decoded.
    let play = std::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-nostdin"])
        .args(["-i", &format!("http://{http}/live/demo/master.m3u8")])
        .args(["-t", "3", "-f", "null", "-"])
        .output()
        .unwrap();
    assert!(
        play.status.success(),
        "playback after the outage: {}",
        String::from_utf8_lossy(&play.stderr)
    );
    // The hole is marked in the playlist the viewers get.
    let pl = http_get(http, media).unwrap().1;
    assert!(
        pl.contains("GAP=YES"),
        "no GAP part after the outage:\n{pl}"
    );
    let gap_parts = metric(
        core_admin,
        r#"livepop_core_parts_total{gap="yes",rendition="src",stream="demo"}"#,
    );
    // At least the 4 s of darkness less a part: 200 ms parts.
    assert!(gap_parts >= 15.0, "{gap_parts} GAP parts");

    assert!(
        wait_child(&mut ff, Duration::from_secs(60)),
        "ffmpeg failed"
    );
    // The publisher was never held back (its own pace, 24 s of media) nor cut off.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(u64::from(secs) + 6), "{took:?}");
    let publishes = edge
        .logs()
        .iter()
        .filter(|v| message_is(v, "publish started"))
        .count();
    assert_eq!(publishes, 1);
    // What the outage cost is counted: about 4 groups of 1 s (and any the lossy path skipped).
    let counted = skipped() - skipped_before;
    assert!(counted >= 3.0, "{counted} groups counted as skipped");
    // Bounded memory: the edge buffered at most its byte budget, not the outage's 2 MB/s.
    let peak = edge.memory_mb("VmHWM:");
    assert!(peak < 200.0, "edge peak RSS {peak} MB");
    eprintln!(
        "outage: {counted} groups skipped, {gap_parts} GAP parts, edge peak {peak:.0} MB, \
         publish {took:?}"
    );
}
