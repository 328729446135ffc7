//! End to end: ffmpeg publishes RTMP(S) to a real `livepop edge`, which relays over QUIC with
//! mutual TLS to real `livepop core` processes. Issue 2's acceptance tests.

mod common;
use common::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn publish_and_compare(scheme: &str) {
    let env = Env::new();
    let core = start_core(&env, "core-1", "127.0.0.1:0");
    let relay = core.addr("relay");
    let core_admin = core.addr("admin");
    let edge = start_edge(&env, &EdgeOpts::new(vec![("core-1".into(), relay)]));
    let ingest = edge.addr(scheme);
    let sent = env.path().join("sent.flv");
    let url = format!("{scheme}://{ingest}/live/demo-key");
    let mut ff = ffmpeg_publish(&url, 10, "1280x720", Some(&sent));
    assert!(
        wait_child(&mut ff, Duration::from_secs(60)),
        "ffmpeg failed"
    );
    let rec = wait_for(
        "the core's finished recording",
        Duration::from_secs(20),
        || recordings(&env, "core-1").into_iter().next(),
    );
    assert_same_frames(&sent, &rec);
    // The metric agrees with the file.
    let sent_video = by_track(&packets(&sent), "video").len() as f64;
    let sent_audio = by_track(&packets(&sent), "audio").len() as f64;
    assert_eq!(
        metric(core_admin, &frames_metric("demo", "video")),
        sent_video
    );
    assert_eq!(
        metric(core_admin, &frames_metric("demo", "audio")),
        sent_audio
    );
    // The key is a secret: it appears in no log line of either process.
    assert!(!edge.log_text().contains("demo-key"));
    assert!(!core.log_text().contains("demo-key"));
}

#[test]
fn rtmp_publish_arrives_frame_for_frame_at_the_core() {
    publish_and_compare("rtmp");
}

#[test]
fn rtmps_publish_arrives_frame_for_frame_at_the_core() {
    publish_and_compare("rtmps");
}

#[test]
fn core_restart_resumes_from_a_keyframe_without_disconnecting_the_publisher() {
    let env = Env::new();
    let mut core = start_core(&env, "core-1", "127.0.0.1:0");
    let relay = core.addr("relay");
    let admin1 = core.addr("admin");
    let edge = start_edge(&env, &EdgeOpts::new(vec![("core-1".into(), relay)]));
    let edge_admin = edge.addr("admin");
    let url = format!("rtmp://{}/live/demo-key", edge.addr("rtmp"));
    let mut ff = ffmpeg_publish(&url, 16, "640x360", None);
    wait_for("frames at the first core", Duration::from_secs(15), || {
        (metric_or_zero(admin1, &frames_metric("demo", "video")) > 30.0).then_some(())
    });
    core.kill();
    // Same port again: the edge's config names it.
    let core2 = start_core(&env, "core-1", &relay.to_string());
    let admin2 = core2.addr("admin");
    let restarted = Instant::now();
    wait_for(
        "frames at the restarted core",
        Duration::from_secs(3),
        || (metric_or_zero(admin2, &frames_metric("demo", "video")) > 0.0).then_some(()),
    );
    let took = restarted.elapsed();
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert!(
        wait_child(&mut ff, Duration::from_secs(40)),
        "publisher failed"
    );
    // The publisher was never disconnected: one publish, ended by the publisher itself.
    let starts = edge
        .logs()
        .iter()
        .filter(|v| message_is(v, "publish started"))
        .count();
    assert_eq!(starts, 1);
    assert_eq!(
        metric_or_zero(edge_admin, "livepop_ingest_errors_total{reason=\"io\"}"),
        0.0
    );
    // The restarted core's recording starts at a keyframe and nothing arrived out of order.
    let rec = wait_for(
        "recording of the restarted core",
        Duration::from_secs(20),
        || {
            // The killed core's file stays `.flv.part`; only the restarted core's is finished.
            recordings(&env, "core-1").into_iter().next()
        },
    );
    let video = by_track(&packets(&rec), "video");
    assert!(
        video[0].1,
        "first video frame after restart is not a keyframe"
    );
    assert_eq!(
        metric_or_zero(admin2, "livepop_relay_late_frames_total{stream=\"demo\"}"),
        0.0
    );
    eprintln!("resumed {took:?} after the core restarted");
}

#[test]
fn stream_fails_over_to_the_other_core() {
    let env = Env::new();
    let mut a = start_core(&env, "core-a", "127.0.0.1:0");
    let mut b = start_core(&env, "core-b", "127.0.0.1:0");
    let (ra, rb) = (a.addr("relay"), b.addr("relay"));
    let (aa, ab) = (a.addr("admin"), b.addr("admin"));
    let edge = start_edge(
        &env,
        &EdgeOpts::new(vec![("core-a".into(), ra), ("core-b".into(), rb)]),
    );
    let edge_admin = edge.addr("admin");
    wait_for("both cores connected", Duration::from_secs(10), || {
        (metric_or_zero(edge_admin, "livepop_relay_core_up{core=\"core-a\"}") == 1.0
            && metric_or_zero(edge_admin, "livepop_relay_core_up{core=\"core-b\"}") == 1.0)
            .then_some(())
    });
    let url = format!("rtmp://{}/live/demo-key", edge.addr("rtmp"));
    let mut ff = ffmpeg_publish(&url, 14, "640x360", None);
    // Rendezvous hashing picks one core; find which.
    let first_is_a = wait_for("frames at one core", Duration::from_secs(15), || {
        let fa = metric_or_zero(aa, &frames_metric("demo", "video"));
        let fb = metric_or_zero(ab, &frames_metric("demo", "video"));
        if fa > 30.0 {
            Some(true)
        } else if fb > 30.0 {
            Some(false)
        } else {
            None
        }
    });
    let (dead, survivor, survivor_name) = if first_is_a {
        (&mut a, ab, "core-b")
    } else {
        (&mut b, aa, "core-a")
    };
    assert_eq!(metric_opt(survivor, &frames_metric("demo", "video")), None);
    dead.kill();
    let killed = Instant::now();
    wait_for(
        "frames at the surviving core",
        Duration::from_secs(3),
        || (metric_or_zero(survivor, &frames_metric("demo", "video")) > 0.0).then_some(()),
    );
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(3), "failover took {took:?}");
    eprintln!("failed over {took:?} after the core was killed");
    assert!(
        wait_child(&mut ff, Duration::from_secs(40)),
        "publisher failed"
    );
    // The publisher never noticed: one publish, no broken connection.
    let starts = edge
        .logs()
        .iter()
        .filter(|v| message_is(v, "publish started"))
        .count();
    assert_eq!(starts, 1);
    assert_eq!(
        metric_or_zero(edge_admin, "livepop_ingest_errors_total{reason=\"io\"}"),
        0.0
    );
    // The survivor's recording starts at a keyframe, in order, and runs to the publisher's end
    // (14 s of 30 fps, of which at most the failover time is missing).
    let rec = wait_for("the survivor's recording", Duration::from_secs(20), || {
        recordings(&env, survivor_name).into_iter().next()
    });
    let video = by_track(&packets(&rec), "video");
    assert!(
        video[0].1,
        "the survivor's first video frame is not a keyframe"
    );
    assert!(
        video.windows(2).all(|w| w[1].0 > w[0].0),
        "video out of order"
    );
    let after_kill = 14.0 - 1.0 - took.as_secs_f64();
    assert!(
        video.len() as f64 > 30.0 * (after_kill - 2.0),
        "{} frames at the survivor",
        video.len()
    );
    assert_eq!(
        metric_or_zero(survivor, "livepop_relay_late_frames_total{stream=\"demo\"}"),
        0.0
    );
}

#[test]
fn edge_without_a_fleet_certificate_is_refused() {
    let env = Env::new();
    // A second, unrelated CA issues the edge's client certificate.
    let rogue = env.path().join("rogue");
    assert!(std::process::Command::new(BIN)
        .arg("dev-certs")
        .arg(&rogue)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap()
        .success());
    let core = start_core(&env, "core-1", "127.0.0.1:0");
    let core_admin = core.addr("admin");
    let mut opts = EdgeOpts::new(vec![("core-1".into(), core.addr("relay"))]);
    opts.relay_cert = "rogue/edge".into();
    let edge = start_edge(&env, &opts);
    let edge_admin = edge.addr("admin");
    wait_for("refusals at the core", Duration::from_secs(10), || {
        (metric_or_zero(
            core_admin,
            "livepop_relay_refused_total{reason=\"handshake\"}",
        ) >= 2.0)
            .then_some(())
    });
    assert_eq!(metric(core_admin, "livepop_relay_connections"), 0.0);
    assert!(
        metric(
            edge_admin,
            "livepop_relay_connect_failures_total{core=\"core-1\"}"
        ) >= 1.0
    );
    assert_eq!(
        metric(edge_admin, "livepop_relay_core_up{core=\"core-1\"}"),
        0.0
    );
    assert_eq!(http_get(edge_admin, "/readyz").unwrap().0, 503);
    // And the right certificate is accepted by the same core.
    let ok = start_edge(
        &env,
        &EdgeOpts::new(vec![("core-1".into(), core.addr("relay"))]),
    );
    drop(ok);
}

#[test]
fn unknown_key_is_rejected_without_logging_it() {
    let env = Env::new();
    let core = start_core(&env, "core-1", "127.0.0.1:0");
    let edge = start_edge(
        &env,
        &EdgeOpts::new(vec![("core-1".into(), core.addr("relay"))]),
    );
    let url = format!("rtmp://{}/live/secret-wrong-key", edge.addr("rtmp"));
    let mut ff = ffmpeg_publish(&url, 5, "320x240", None);
    assert!(
        !wait_child(&mut ff, Duration::from_secs(20)),
        "ffmpeg should fail"
    );
    let mut err = String::new();
    std::io::Read::read_to_string(ff.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("unknown stream key"), "ffmpeg said: {err}");
    edge.wait_log(Duration::from_secs(5), |v| message_is(v, "publish refused"));
    assert!(!edge.log_text().contains("secret-wrong-key"));
    assert_eq!(
        metric(
            edge.addr("admin"),
            "livepop_ingest_rejected_total{reason=\"auth\"}"
        ),
        1.0
    );
}

/// The one `onStatus` a refused publish is answered with.
fn refusal(rtmp: std::net::SocketAddr, key: &str) -> ServerCommand {
    let Err(cmds) = RawPublisher::try_publish(rtmp, key) else {
        panic!("publishing with {key:?} was accepted");
    };
    let status: Vec<&ServerCommand> = cmds.iter().filter(|c| c.name == "onStatus").collect();
    assert_eq!(status.len(), 1, "{cmds:?}");
    let s = status[0].clone();
    // As nginx-rtmp and SRS send it, and FFmpeg and librtmp (OBS) read it: on the publish's
    // stream, not the connection's, level "error", no transaction.
    assert_eq!(
        s.info.get("level").map(String::as_str),
        Some("error"),
        "{s:?}"
    );
    assert_ne!(s.stream_id, 0, "{s:?}");
    assert_eq!(s.transaction_id, 0.0, "{s:?}");
    s
}

/// A refused publish carries the status code the README names, not only its text: an unknown
/// key and a stream already live get NetStream.Publish.BadName; the connection then closes.
#[test]
fn refusals_carry_the_rtmp_status_code() {
    let env = Env::new();
    let core = start_core(&env, "core-1", "127.0.0.1:0");
    let edge = start_edge(
        &env,
        &EdgeOpts::new(vec![("core-1".into(), core.addr("relay"))]),
    );
    let rtmp = edge.addr("rtmp");
    let s = refusal(rtmp, "no-such-key");
    assert_eq!(s.info["code"], "NetStream.Publish.BadName");
    assert_eq!(s.info["description"], "unknown stream key");
    let mut live = RawPublisher::publish(rtmp, "demo-key");
    let s = refusal(rtmp, "demo-key");
    assert_eq!(s.info["code"], "NetStream.Publish.BadName");
    assert_eq!(
        s.info["description"],
        "stream demo is already being published"
    );
    assert!(live.send(&[]), "the first publisher is unharmed");
    assert!(!closed_by_peer(&mut live.s, Duration::from_millis(300)));
    let rejected = |r: &str| {
        metric(
            edge.addr("admin"),
            &format!("livepop_ingest_rejected_total{{reason=\"{r}\"}}"),
        )
    };
    assert_eq!((rejected("auth"), rejected("duplicate")), (1.0, 1.0));
}

/// An authentication webhook that cannot be reached: NetStream.Publish.Failed (the key may be
/// good; the publisher should retry), not BadName.
#[test]
fn a_failing_auth_webhook_answers_publish_failed() {
    let env = Env::new();
    let core = start_core(&env, "core-1", "127.0.0.1:0");
    // A port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut opts = EdgeOpts::new(vec![("core-1".into(), core.addr("relay"))]);
    opts.extra_auth = format!("[auth.webhook]\nurl = \"http://{dead}/auth\"\ntimeout_ms = 1000\n");
    let edge = start_edge(&env, &opts);
    let s = refusal(edge.addr("rtmp"), "some-key");
    assert_eq!(s.info["code"], "NetStream.Publish.Failed");
    assert!(
        s.info["description"].starts_with("authentication webhook failed"),
        "{s:?}"
    );
    assert!(!edge.log_text().contains("some-key"));
}

#[test]
fn second_publisher_is_rejected_while_the_first_continues() {
    let env = Env::new();
    let core = start_core(&env, "core-1", "127.0.0.1:0");
    let edge = start_edge(
        &env,
        &EdgeOpts::new(vec![("core-1".into(), core.addr("relay"))]),
    );
    let url = format!("rtmp://{}/live/demo-key", edge.addr("rtmp"));
    let sent = env.path().join("sent.flv");
    let mut first = ffmpeg_publish(&url, 8, "320x240", Some(&sent));
    edge.wait_log(Duration::from_secs(10), |v| {
        message_is(v, "publish started")
    });
    let mut second = ffmpeg_publish(&url, 3, "320x240", None);
    assert!(!wait_child(&mut second, Duration::from_secs(20)));
    assert!(wait_child(&mut first, Duration::from_secs(30)));
    let rec = wait_for("recording", Duration::from_secs(20), || {
        recordings(&env, "core-1").into_iter().next()
    });
    assert_same_frames(&sent, &rec);
    assert_eq!(
        metric(
            edge.addr("admin"),
            "livepop_ingest_rejected_total{reason=\"duplicate\"}"
        ),
        1.0
    );
}

/// A real HTTP(S) server on port 0 answering the auth webhook: "good-key" → stream "hooked";
/// with `tls`, HTTPS with the development server certificate.
fn webhook_server(
    tls: Option<Arc<rustls::ServerConfig>>,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::io::{BufRead, BufReader, Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c2 = calls.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut s: Box<dyn ReadWrite> = match &tls {
                Some(cfg) => Box::new(rustls::StreamOwned::new(
                    rustls::ServerConnection::new(cfg.clone()).unwrap(),
                    s,
                )),
                None => Box::new(s),
            };
            c2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut r = BufReader::new(&mut s);
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; len];
            let _ = r.read_exact(&mut body);
            drop(r);
            let req: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let resp = if req["key"] == "good-key" && req["app"] == "live" {
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 17\r\nconnection: close\r\n\r\n{\"name\":\"hooked\"}"
                    .to_string()
            } else {
                "HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    .to_string()
            };
            let _ = s.write_all(resp.as_bytes());
            let _ = s.flush();
        }
    });
    (addr, calls)
}

trait ReadWrite: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> ReadWrite for T {}

#[test]
fn webhook_allows_with_a_name_and_denies() {
    webhook_case(false);
}

#[test]
fn https_webhook_allows_with_a_name_and_denies() {
    webhook_case(true);
}

fn webhook_case(https: bool) {
    let env = Env::new();
    let tls = https.then(|| {
        let c = env.certs();
        Arc::new(
            livepop::certs::server_config(&c.join("server.pem"), &c.join("server.key"), &[])
                .unwrap(),
        )
    });
    let (hook, calls) = webhook_server(tls);
    let core = start_core(&env, "core-1", "127.0.0.1:0");
    let core_admin = core.addr("admin");
    let mut opts = EdgeOpts::new(vec![("core-1".into(), core.addr("relay"))]);
    opts.extra_auth = if https {
        // The hook's certificate is checked: by name (localhost) and against the CA named.
        let port = hook.port();
        format!("[auth.webhook]\nurl = \"https://localhost:{port}/auth\"\nca = \"certs/public-ca.pem\"\ntimeout_ms = 2000\n")
    } else {
        format!("[auth.webhook]\nurl = \"http://{hook}/auth\"\ntimeout_ms = 2000\n")
    };
    // Every log line at every level (the webhook client's included): no key may appear.
    let cfg = edge_config(&env, &opts);
    let edge = Proc::start_logging(
        "edge",
        &["edge", "--config", cfg.to_str().unwrap()],
        "trace",
    );
    wait_for("edge /readyz", Duration::from_secs(10), || {
        (http_get(edge.addr("admin"), "/readyz")?.0 == 200).then_some(())
    });
    let rtmp = edge.addr("rtmp");
    let mut ok = ffmpeg_publish(&format!("rtmp://{rtmp}/live/good-key"), 3, "320x240", None);
    assert!(wait_child(&mut ok, Duration::from_secs(30)));
    wait_for(
        "frames of the hooked stream",
        Duration::from_secs(10),
        || (metric_or_zero(core_admin, &frames_metric("hooked", "video")) > 30.0).then_some(()),
    );
    let mut bad = ffmpeg_publish(&format!("rtmp://{rtmp}/live/bad-key"), 3, "320x240", None);
    assert!(!wait_child(&mut bad, Duration::from_secs(30)));
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(
        metric(
            edge.addr("admin"),
            "livepop_ingest_rejected_total{reason=\"auth\"}"
        ),
        1.0
    );
    // The static table still answers without asking the hook.
    let mut table = ffmpeg_publish(&format!("rtmp://{rtmp}/live/demo-key"), 2, "320x240", None);
    assert!(wait_child(&mut table, Duration::from_secs(30)));
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    let logs = edge.log_text();
    assert!(
        logs.contains("\"level\":\"TRACE\""),
        "nothing logged at trace"
    );
    assert!(!logs.contains("good-key") && !logs.contains("bad-key"));
}

#[test]
fn replace_policy_hands_the_stream_to_the_newcomer() {
    let env = Env::new();
    let core = start_core(&env, "core-1", "127.0.0.1:0");
    let core_admin = core.addr("admin");
    let mut opts = EdgeOpts::new(vec![("core-1".into(), core.addr("relay"))]);
    opts.extra_rtmp = "on_duplicate = \"replace\"".into();
    let edge = start_edge(&env, &opts);
    let url = format!("rtmp://{}/live/demo-key", edge.addr("rtmp"));
    let mut first = ffmpeg_publish(&url, 20, "320x240", None);
    edge.wait_log(Duration::from_secs(10), |v| {
        message_is(v, "publish started")
    });
    let sent = env.path().join("second.flv");
    let mut second = ffmpeg_publish(&url, 4, "320x240", Some(&sent));
    // The first publisher is disconnected; the second one's stream reaches the core whole.
    assert!(
        !wait_child(&mut first, Duration::from_secs(15)),
        "first publisher kept going"
    );
    edge.wait_log(Duration::from_secs(5), |v| {
        message_is(v, "replaced by a new publisher")
    });
    assert!(wait_child(&mut second, Duration::from_secs(30)));
    let rec = wait_for("two recordings", Duration::from_secs(20), || {
        let r = recordings(&env, "core-1");
        (r.len() == 2).then_some(r)
    });
    // Epochs increase, so the newer file sorts last.
    assert_same_frames(&sent, &rec[1]);
    assert_eq!(metric(core_admin, "livepop_relay_streams"), 0.0);
}
