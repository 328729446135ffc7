//! Attacks on an internet-facing edge and its core (issue 12). Each test runs against real
//! `livepop core` and `livepop edge` processes while ffmpeg publishes an honest stream, which
//! must reach the core frame for frame, and an honest viewer (livepop-loadtest) plays it through
//! the edge without a single error. The attacked connection must be refused or closed within
//! its configured deadline, and the processes must survive.

mod common;
use common::*;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Deadlines the rig configures (short, so the tests are quick).
const HEADER_MS: u64 = 1000;
const IDLE_MS: u64 = 3000;
const WRITE_MS: u64 = 1500;
const PUBLISH_MS: u64 = 2500;
/// The rig core's relay.max_streams_per_edge.
const STREAMS_PER_EDGE: u64 = 3;
/// Slack for a deadline to be noticed on a busy 2-core machine.
const SLACK: Duration = Duration::from_millis(2500);

struct Rig {
    env: Env,
    core: Proc,
    edge: Proc,
    ff: Child,
    sent: PathBuf,
    viewer: Option<Child>,
    viewer_json: PathBuf,
}

/// Core (origin, recording) and edge (ingest, playback) with short deadlines; the honest
/// publisher runs for `secs`, and the honest viewer plays from the first part until shortly
/// before the publisher stops.
fn rig(secs: u32, extra_rtmp: &str) -> Rig {
    rig_with(
        secs,
        extra_rtmp,
        "",
        &limits_block(HEADER_MS, IDLE_MS, WRITE_MS),
    )
}

/// `rig`, with extra keys for the edge's [relay] section, and its [playback] keys.
fn rig_with(secs: u32, extra_rtmp: &str, extra_relay: &str, playback: &str) -> Rig {
    let env = Env::new();
    let admin_limits = format!("[admin]\n{}", limits_block(HEADER_MS, IDLE_MS, WRITE_MS));
    let core_cfg = core_config(&env, "core-1", "127.0.0.1:0", true);
    let text = std::fs::read_to_string(&core_cfg)
        .unwrap()
        .replacen("[admin]\n", &admin_limits, 1)
        .replacen(
            "[relay]\n",
            &format!("[relay]\nmax_streams_per_edge = {STREAMS_PER_EDGE}\n"),
            1,
        );
    let core_cfg = env.write(
        "core-attack.toml",
        &format!(
            "{text}[origin]\nlisten = \"127.0.0.1:0\"\naccess_log = true\npart_target_ms = 300\n{}",
            limits_block(HEADER_MS, IDLE_MS, WRITE_MS)
        ),
    );
    let core = Proc::start("core", &["core", "--config", core_cfg.to_str().unwrap()]);
    let mut opts = EdgeOpts::new(vec![("core-1".into(), core.addr("relay"))]);
    opts.origins = vec![core.addr("origin")];
    opts.extra_playback = playback.to_string();
    opts.extra_rtmp =
        format!("publish_timeout_ms = {PUBLISH_MS}\nwrite_timeout_ms = {WRITE_MS}\n{extra_rtmp}");
    let cfg = edge_config(&env, &opts);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replacen("[admin]\n", &admin_limits, 1)
        .replacen("[relay]\n", &format!("[relay]\n{extra_relay}\n"), 1);
    std::fs::write(&cfg, text).unwrap();
    let edge = Proc::start("edge", &["edge", "--config", cfg.to_str().unwrap()]);
    let admin = edge.addr("admin");
    wait_for("edge /readyz", Duration::from_secs(10), || {
        (http_get(admin, "/readyz")?.0 == 200).then_some(())
    });
    let sent = env.path().join("sent.flv");
    let url = format!("rtmp://{}/live/demo-key", edge.addr("rtmp"));
    encode_flv_sized(&sent, "640x360", secs);
    let ff = ffmpeg_publish_file(&url, &sent);
    let http = edge.addr("http");
    wait_for(
        "the honest stream playable",
        Duration::from_secs(20),
        || {
            (http_get(http, "/live/demo/src/index.m3u8")?
                .1
                .contains("#EXT-X-PART:"))
            .then_some(())
        },
    );
    let viewer_json = env.path().join("viewer.json");
    let viewer = Command::new(loadtest_bin())
        .args(["viewers", "--url"])
        .arg(format!("http://{http}/live/demo/master.m3u8"))
        .args(["--count", "1", "--duration"])
        .arg(secs.saturating_sub(6).max(3).to_string())
        .arg("--json")
        .arg(&viewer_json)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Rig {
        env,
        core,
        edge,
        ff,
        sent,
        viewer: Some(viewer),
        viewer_json,
    }
}

impl Rig {
    /// The honest viewer saw no error, the honest stream arrived intact, nobody crashed.
    fn check_honest(mut self) {
        let mut v = self.viewer.take().unwrap();
        assert!(wait_child(&mut v, Duration::from_secs(60)), "viewer failed");
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&self.viewer_json).unwrap()).unwrap();
        assert_eq!(
            report["errors"], 0,
            "the honest viewer saw errors: {report}"
        );
        assert!(
            report["kinds"]["part"]["requests"].as_u64().unwrap_or(0) > 5,
            "the honest viewer played nothing: {report}"
        );
        assert!(
            wait_child(&mut self.ff, Duration::from_secs(60)),
            "honest publisher failed"
        );
        let rec = stream_recording(&self.env, "core-1", "demo");
        assert_same_frames(&self.sent, &rec);
        for p in [&mut self.edge, &mut self.core] {
            assert!(p.is_running(), "{} died", p.name);
            assert!(!p.log_text().contains("panicked"), "{} panicked", p.name);
        }
    }

    fn warned(&self, text: &str) {
        self.edge.wait_log(Duration::from_secs(10), |v| {
            v["level"] == "WARN" && v.to_string().contains(text)
        });
    }

    /// Requests the core's origin received for `uri` (its access log).
    fn core_requests(&self, uri: &str) -> usize {
        self.core
            .logs()
            .iter()
            .filter(|v| message_is(v, "origin request") && v["fields"]["uri"] == uri)
            .count()
    }
}

/// A blocking TCP connection to `addr` from source address `ip` (any of 127.0.0.0/8).
fn connect_from(ip: &str, addr: SocketAddr) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = rt.block_on(sock.connect(addr)).unwrap().into_std().unwrap();
    s.set_nonblocking(false).unwrap();
    s
}

// ---- 1. AMF0 nesting ----------------------------------------------------------------------

#[test]
fn deeply_nested_amf0_ends_only_that_connection() {
    use livepop::ingest::amf0::nest;
    let r = rig(14, "");
    let addr = r.edge.addr("rtmp");
    // 200,000 levels of each container kind, in command and data messages of every AMF0 type.
    for type_id in [20u8, 18, 17, 15] {
        for make in nest::KINDS {
            let body = if matches!(type_id, 17 | 20) {
                nest::command("connect", &make(200_000))
            } else {
                nest::command("@setDataFrame", &make(200_000))
            };
            assert!(
                send_deep_amf0(addr, type_id, &body),
                "type {type_id}: connection not closed"
            );
        }
    }
    r.warned("nested deeper than 32 levels");
    // After a valid publish too: onMetaData (type 18) nested deep.
    let mut p = RawPublisher::publish(addr, "other-key");
    let deep = nest::command("@setDataFrame", &nest::ecma_arrays(100_000));
    let wire = livepop::ingest::chunk::write::message(4, 0, 18, 1, &deep, RAW_CHUNK);
    let since = Instant::now();
    p.send(&wire);
    assert!(closed_within(&mut p.s, since, Duration::from_secs(5)));
    r.check_honest();
}

// ---- 2 and 3. Silent, dripping and non-reading clients on every listener ------------------

/// A TLS client (the rig's CA) with `alpn`; returns the stream after the handshake.
fn tls_connect(
    env: &Env,
    addr: SocketAddr,
    alpn: &[u8],
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(env.certs().join("public-ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    if !alpn.is_empty() {
        cfg.alpn_protocols = vec![alpn.to_vec()];
    }
    let conn =
        rustls::ClientConnection::new(Arc::new(cfg), "localhost".try_into().unwrap()).unwrap();
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut s = rustls::StreamOwned::new(conn, sock);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).unwrap();
    }
    if !alpn.is_empty() {
        assert_eq!(s.conn.alpn_protocol(), Some(alpn));
    }
    s
}

/// True once the TLS peer closed (EOF, close_notify or reset) within `within` of `since`.
fn tls_closed_within(
    s: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    since: Instant,
    within: Duration,
) -> bool {
    s.sock
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    reads_until_closed(s, since + within)
}

#[test]
fn silent_and_dripping_clients_are_cut_off_on_every_listener() {
    let r = rig(16, "");
    let header = Duration::from_millis(HEADER_MS);
    let plain: Vec<(&str, SocketAddr, Duration)> = vec![
        // RTMP: the handshake deadline (2000 ms in the rig).
        ("rtmp", r.edge.addr("rtmp"), Duration::from_millis(2000)),
        // RTMPS: the TLS handshake deadline.
        ("rtmps", r.edge.addr("rtmps"), Duration::from_millis(2000)),
        ("http", r.edge.addr("http"), header),
        ("https", r.edge.addr("https"), header),
        ("origin", r.core.addr("origin"), header),
        ("edge admin", r.edge.addr("admin"), header),
        ("core admin", r.core.addr("admin"), header),
    ];
    let request = b"GET /live/demo/master.m3u8 HTTP/1.1\r\nHost: x\r\n";
    for (name, addr, deadline) in &plain {
        // Silent: connects and sends nothing.
        let mut s = TcpStream::connect(addr).unwrap();
        let since = Instant::now();
        assert!(
            closed_within(&mut s, since, *deadline + SLACK),
            "{name}: silent client still connected"
        );
        // Dripping: a byte every 150 ms never extends the deadline.
        let mut s = TcpStream::connect(addr).unwrap();
        let since = Instant::now();
        assert!(
            drip(&mut s, request, since, *deadline + SLACK),
            "{name}: dripping client still connected"
        );
        // A partial request line (h2c preface prefix included), then silence.
        for partial in [&b"GET /live/de"[..], b"PRI * HTTP/2.0\r\n"] {
            let mut s = TcpStream::connect(addr).unwrap();
            let since = Instant::now();
            s.write_all(partial).unwrap();
            assert!(
                closed_within(&mut s, since, *deadline + SLACK),
                "{name}: partial request {partial:?} still connected"
            );
        }
    }
    // HTTPS after the TLS handshake: HTTP/1.1 and HTTP/2 by ALPN, silent and dripping.
    let https = r.edge.addr("https");
    for alpn in [&b"http/1.1"[..], b"h2"] {
        let mut s = tls_connect(&r.env, https, alpn);
        let since = Instant::now();
        assert!(
            tls_closed_within(&mut s, since, header + SLACK),
            "https {alpn:?}: silent client still connected"
        );
        let mut s = tls_connect(&r.env, https, alpn);
        let since = Instant::now();
        let bytes: &[u8] = if alpn == b"h2" {
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        } else {
            request
        };
        assert!(
            drip(&mut s, bytes, since, header + SLACK) || tls_closed_within(&mut s, since, SLACK),
            "https {alpn:?}: dripping client still connected"
        );
    }
    // After a request, stray line ends now and then do not keep the connection: they start
    // the next request's header deadline.
    let http = r.edge.addr("http");
    let mut s = TcpStream::connect(http).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let since = Instant::now();
    assert!(
        drip(&mut s, b"\r\n", since, header + SLACK),
        "http: line ends kept a connection open"
    );
    // A request with a body the edge would have to wait for: refused and closed.
    let mut s = TcpStream::connect(http).unwrap();
    s.write_all(
        b"GET /live/demo/master.m3u8 HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n",
    )
    .unwrap();
    let since = Instant::now();
    assert!(
        closed_within(&mut s, since, header + SLACK),
        "http: request with a body still open"
    );
    // A kept-alive connection that goes quiet after a request is closed after the idle time.
    for (name, addr) in [
        ("http", r.edge.addr("http")),
        ("origin", r.core.addr("origin")),
        ("edge admin", r.edge.addr("admin")),
    ] {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let since = Instant::now();
        assert!(
            closed_within(&mut s, since, Duration::from_millis(IDLE_MS) + SLACK),
            "{name}: idle kept-alive connection still open"
        );
    }
    let edge_admin = r.edge.addr("admin");
    assert!(
        metric(
            edge_admin,
            "livepop_edge_refused_total{reason=\"header_timeout\"}"
        ) >= 6.0
    );
    assert!(
        metric(
            edge_admin,
            "livepop_admin_refused_total{reason=\"header_timeout\"}"
        ) >= 3.0
    );
    let core_admin = r.core.addr("admin");
    assert!(
        metric(
            core_admin,
            "livepop_origin_refused_total{reason=\"header_timeout\"}"
        ) >= 3.0
    );
    r.check_honest();
}

/// Pipelines `n` requests for `path` and never reads: the server must drop the connection
/// after its write timeout, counted under `sample`.
fn non_reader(addr: SocketAddr, path: &str, n: usize, counted: Option<(SocketAddr, &str)>) {
    let before = counted.map(|(admin, sample)| metric_or_zero(admin, sample));
    // A tiny receive window, so that the server's writes block instead of filling the kernel's
    // buffers (pingora does not pipeline: one request must be enough at the edge).
    let mut s = connect_small_window(addr);
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    let all: Vec<u8> = req.as_bytes().repeat(n);
    let since = Instant::now();
    // The server may stop reading too once its own buffers are full; that is fine.
    s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let _ = s.write_all(&all);
    let deadline = Duration::from_millis(WRITE_MS + IDLE_MS) + SLACK;
    if let (Some((admin, sample)), Some(before)) = (counted, before) {
        wait_for(sample, deadline, || {
            (metric_or_zero(admin, sample) > before).then_some(())
        });
        assert!(since.elapsed() >= Duration::from_millis(WRITE_MS));
    } else {
        // Not read from until the deadline has passed.
        std::thread::sleep(deadline.saturating_sub(since.elapsed())); // waits out the deadline itself
    }
    // Closed: draining what the kernel still holds ends in EOF or a reset, at once.
    assert!(
        closed_by_peer(&mut s, Duration::from_secs(3)),
        "{addr}{path}: a client that does not read is still connected"
    );
}

#[test]
fn clients_that_stop_reading_are_dropped() {
    let r = rig(16, "");
    let http = r.edge.addr("http");
    let pl = http_get(http, "/live/demo/src/index.m3u8").unwrap().1;
    let seg = wait_for("a complete segment", Duration::from_secs(15), || {
        let pl = http_get(http, "/live/demo/src/index.m3u8")?.1;
        complete_segments(&pl).first().map(|s| s.1.clone())
    });
    drop(pl);
    let path = format!("/live/demo/src/{seg}");
    // The edge does not pipeline, and one segment fits in the kernel's socket buffers (which
    // bound what a non-reader pins): the edge finishes writing, then closes the connection
    // at the idle deadline. (Responses that block are cut by the write timeout, which the
    // origin and admin cases below exercise.)
    non_reader(http, &path, 1, None);
    non_reader(
        r.core.addr("origin"),
        &path,
        400,
        Some((
            r.core.addr("admin"),
            "livepop_origin_refused_total{reason=\"write_timeout\"}",
        )),
    );
    for admin in [r.core.addr("admin"), r.edge.addr("admin")] {
        non_reader(
            admin,
            "/metrics",
            3000,
            Some((
                admin,
                "livepop_admin_refused_total{reason=\"write_timeout\"}",
            )),
        );
    }
    // HTTP/2 (h2c on 8080, and h2 over TLS on 8443): streams whose flow-control window the
    // client never opens and a socket it never reads. Each stalled response is cut by the write
    // timeout, then the connection by the idle deadline.
    let deadline = Duration::from_millis(WRITE_MS + IDLE_MS) + SLACK;
    let edge_admin = r.edge.addr("admin");
    let cut = r#"livepop_edge_refused_total{reason="write_timeout"}"#;
    let before = metric_or_zero(edge_admin, cut);
    let mut h2c = connect_small_window(http);
    h2c.write_all(&h2_requests(&path, 20)).unwrap();
    assert!(closed_by_peer(&mut h2c, deadline), "h2c non-reader kept");
    // Every stream was answered and then cut by the write timeout (not refused as malformed).
    wait_for("20 h2c streams cut", Duration::from_secs(5), || {
        (metric_or_zero(edge_admin, cut) >= before + 20.0).then_some(())
    });
    let mut h2 = tls_connect(&r.env, r.edge.addr("https"), b"h2");
    h2.write_all(&h2_requests(&path, 20)).unwrap();
    h2.flush().unwrap();
    assert!(
        tls_closed_within(&mut h2, Instant::now(), deadline),
        "h2 non-reader kept"
    );
    wait_for("20 h2 streams cut", Duration::from_secs(5), || {
        (metric(edge_admin, cut) >= before + 40.0).then_some(())
    });
    // HTTP/1.1 over TLS: as on 8080.
    let mut h1 = tls_connect(&r.env, r.edge.addr("https"), b"http/1.1");
    h1.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    h1.flush().unwrap();
    assert!(
        tls_closed_within(&mut h1, Instant::now(), deadline),
        "https non-reader kept"
    );
    r.check_honest();
}

/// Appends one HTTP/2 frame.
fn h2_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// The HTTP/2 connection preface, an empty SETTINGS, and `n` GET requests for `path` (each a
/// HEADERS frame with END_STREAM, HPACK literals), as a client that then goes silent.
fn h2_requests(path: &str, n: u32) -> Vec<u8> {
    let frame = h2_frame;
    assert!(path.len() < 127);
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 4, 0, 0, &[]);
    for i in 0..n {
        // :method GET, :scheme http (static table), :path and :authority as literals.
        let mut block = vec![0x82, 0x86, 0x44, path.len() as u8];
        block.extend_from_slice(path.as_bytes());
        block.extend_from_slice(&[0x41, 1, b'x']);
        frame(&mut out, 1, 0x5, 1 + 2 * i, &block);
    }
    out
}

/// RTMP and RTMPS peers that pipeline commands and never read the answers: whether the
/// ingest's writes block first (cut by `rtmp.write_timeout_ms`) or not, the connection is gone
/// by the publish deadline, and counted.
#[test]
fn rtmp_clients_that_stop_reading_are_dropped() {
    let r = rig(14, "");
    let admin = r.edge.addr("admin");
    let ended = || {
        metric_or_zero(
            admin,
            r#"livepop_ingest_errors_total{reason="write_timeout"}"#,
        ) + metric_or_zero(
            admin,
            r#"livepop_ingest_rejected_total{reason="publish_timeout"}"#,
        )
    };
    // connect(1, {app: "live"}): each one answered with window size, bandwidth and _result.
    let mut obj = vec![0x03, 0, 3];
    obj.extend_from_slice(b"app");
    obj.extend_from_slice(&[0x02, 0, 4]);
    obj.extend_from_slice(b"live");
    obj.extend_from_slice(&[0, 0, 9]);
    let connect = livepop::ingest::amf0::nest::command("connect", &obj);
    let one = livepop::ingest::chunk::write::message(3, 0, 20, 0, &connect, 128);
    let wire = one.repeat(20_000);
    for (i, scheme) in ["rtmp", "rtmps"].into_iter().enumerate() {
        let addr = r.edge.addr(scheme);
        let since = Instant::now();
        let closed = if scheme == "rtmp" {
            let mut s = connect_small_window(addr);
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            rtmp_handshake_over(&mut s);
            s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
            let _ = s.write_all(&wire);
            closed_within(&mut s, since, Duration::from_millis(PUBLISH_MS) + SLACK)
        } else {
            let mut s = tls_connect(&r.env, addr, b"");
            rtmp_handshake_over(&mut s);
            s.sock
                .set_write_timeout(Some(Duration::from_secs(3)))
                .unwrap();
            let _ = s.write_all(&wire);
            let _ = s.flush();
            tls_closed_within(&mut s, since, Duration::from_millis(PUBLISH_MS) + SLACK)
        };
        assert!(
            closed,
            "{scheme}: a peer that does not read kept its connection"
        );
        wait_for("the cut counted", Duration::from_secs(5), || {
            (ended() >= (i + 1) as f64).then_some(())
        });
    }
    r.check_honest();
}

// ---- 4. RTMP slots held without publishing ------------------------------------------------

#[test]
fn rtmp_connections_must_publish_in_time_and_share_slots_fairly() {
    let r = rig(14, "max_connections_per_ip = 3");
    let addr = r.edge.addr("rtmp");
    // Keeps itself busy (a tiny message every 500 ms, well inside the stall timer) but never
    // publishes: closed at the publish deadline.
    let (mut s, _) = rtmp_handshake(addr);
    let since = Instant::now();
    let ack = livepop::ingest::chunk::write::message(2, 0, 5, 0, &2_500_000u32.to_be_bytes(), 128);
    let mut closed = false;
    while since.elapsed() < Duration::from_millis(PUBLISH_MS) + SLACK {
        if s.write_all(&ack).is_err() || closed_by_peer(&mut s, Duration::from_millis(500)) {
            closed = true;
            break;
        }
    }
    assert!(closed, "a connection that never publishes kept its slot");
    assert!(since.elapsed() >= Duration::from_millis(PUBLISH_MS) - Duration::from_millis(300));
    r.warned("not publishing with a valid key within 2500 ms");
    let admin = r.edge.addr("admin");
    assert!(
        metric(
            admin,
            "livepop_ingest_rejected_total{reason=\"publish_timeout\"}"
        ) >= 1.0
    );
    // One source holds at most 3 connections; another source still gets in.
    let from = |ip: &str| connect_from(ip, addr);
    let held: Vec<TcpStream> = (0..3).map(|_| from("127.0.0.9")).collect();
    let mut fourth = from("127.0.0.9");
    // Refused at once (the others are still inside their 2 s handshake deadline).
    assert!(closed_by_peer(&mut fourth, Duration::from_secs(1)));
    assert!(
        metric(
            admin,
            "livepop_ingest_rejected_total{reason=\"per_ip_limit\"}"
        ) >= 1.0
    );
    let mut other = from("127.0.0.10");
    assert!(!closed_by_peer(&mut other, Duration::from_millis(300)));
    drop(held);
    r.check_honest();
}

// ---- 5. Asking ahead must not spoil the cache ---------------------------------------------

/// LLHLS.md §6.2.6 (a part never hinted that does not exist: 404) with appendix B.1 (failures
/// cached briefly): a 404 for something not there *yet* must not be cached, or it outlives the
/// moment the part or segment appears.
#[test]
fn asking_ahead_never_makes_media_unavailable() {
    let r = rig(16, "");
    let http = r.edge.addr("http");
    let origin = r.core.addr("origin");
    let pl_path = "/live/demo/src/index.m3u8";
    let mut rounds = 0;
    while rounds < 6 {
        // Two parts past the hinted one, and the segment after the open one: not there yet.
        let (m, p) = hint(&http_get(origin, pl_path).unwrap().1);
        if p > 2 {
            // Too near the segment's end for part p+2 to be sure to exist: next segment.
            wait_for("the next segment", Duration::from_secs(5), || {
                (hint(&http_get(origin, pl_path)?.1).0 > m).then_some(())
            });
            continue;
        }
        let name = format!("s{m}.{}.m4s", p + 2);
        let ahead_part = format!("/live/demo/src/{name}");
        let ahead_seg = format!("/live/demo/src/s{}.m4s", m + 1);
        for path in [&ahead_part, &ahead_seg] {
            let (st, head, _) = http_get_full(http, path).unwrap();
            assert_eq!(st, 404, "{path}: {head}");
        }
        // Once the part is hinted (or done), through the edge it is served, not a cached 404.
        let pl = wait_for("the hint to move on", Duration::from_secs(5), || {
            let pl = http_get(origin, pl_path)?.1;
            (hint(&pl) >= (m, p + 2)).then_some(pl)
        });
        if !pl.contains(&format!("\"{name}\"")) {
            continue; // the segment ended before that part: nothing to check this round
        }
        let (st, head, body) = http_get_full(http, &ahead_part).unwrap();
        assert_eq!(
            st, 200,
            "round {rounds}: {ahead_part} once it existed: {head}"
        );
        assert!(!body.is_empty());
        rounds += 1;
    }
    // And the segment asked for early is served once complete.
    let m = hint(&http_get(origin, pl_path).unwrap().1).0;
    let seg = format!("/live/demo/src/s{}.m4s", m + 1);
    assert_eq!(http_get_full(http, &seg).unwrap().0, 404);
    wait_for("that segment complete", Duration::from_secs(10), || {
        let pl = http_get(origin, pl_path)?.1;
        complete_segments(&pl)
            .iter()
            .any(|s| s.1 == format!("s{}.m4s", m + 1))
            .then_some(())
    });
    assert_eq!(http_get_full(http, &seg).unwrap().0, 200);
    r.check_honest();
}

// ---- 6. One object, one key, one core request -------------------------------------------

/// LLHLS.md caching (appendix B.1): one request per object, whatever the method or spelling;
/// the cache key keeps `_HLS_msn` in canonical form.
#[test]
fn head_requests_and_odd_names_cost_one_core_request() {
    let r = rig(16, "");
    let http = r.edge.addr("http");
    let origin = r.core.addr("origin");
    let pl_path = "/live/demo/src/index.m3u8";
    // 100 HEADs and one GET for the hinted part: held together, one core request.
    let (m, p) = hint(&http_get(origin, pl_path).unwrap().1);
    let part = format!("/live/demo/src/s{m}.{p}.m4s");
    let heads = std::thread::spawn({
        let part = part.clone();
        move || burst(http, "HEAD", &part, 100)
    });
    let (st, _, body) = http_get_full(http, &part).unwrap();
    assert_eq!(st, 200);
    for (st, head, b) in heads.join().unwrap() {
        assert_eq!(st, 200, "{head}");
        assert!(b.is_empty(), "HEAD answered with a body");
        assert_eq!(header_num(&head, "content-length"), Some(body.len() as u64));
    }
    assert_eq!(r.core_requests(&part), 1, "core requests for {part}");
    // Non-canonical names of every object kind: refused at the edge, never sent to the core.
    let init = http_get(origin, pl_path)
        .unwrap()
        .1
        .lines()
        .find_map(|l| l.strip_prefix("#EXT-X-MAP:URI=\""))
        .unwrap()
        .trim_end_matches('"')
        .to_string();
    let seg = wait_for("a complete segment", Duration::from_secs(10), || {
        complete_segments(&http_get(origin, pl_path)?.1)
            .first()
            .map(|s| s.1.clone())
    });
    let odd = [
        format!("/live/demo/src/s0{m}.{p}.m4s"),
        format!("/live/demo/src/s{m}.0{p}.m4s"),
        format!("/live/demo/src/{}", seg.replacen('s', "s00", 1)),
        format!("/live/demo/src/{}", init.replacen("init-", "init-0", 1)),
        "/live/demo/src/s+1.m4s".to_string(),
    ];
    for path in &odd {
        let (st, head, _) = http_get_full(http, path).unwrap();
        assert_eq!(st, 404, "{path}: {head}");
        assert_eq!(r.core_requests(path), 0, "{path} reached the core");
    }
    // Zero-padded directives are the canonical key: one core request.
    let m = hint(&http_get(origin, pl_path).unwrap().1).0;
    let padded = format!("{pl_path}?_HLS_msn=00{m}");
    let canonical = format!("{pl_path}?_HLS_msn={m}");
    let padded_answers = std::thread::spawn(move || burst(http, "GET", &padded, 20));
    let (st, _, _) = http_get_full(http, &canonical).unwrap();
    assert_eq!(st, 200);
    assert!(padded_answers.join().unwrap().iter().all(|x| x.0 == 200));
    assert_eq!(r.core_requests(&canonical), 1);
    // A part that just completed, fetched by 200 viewers at once: one core request, five
    // times over (the race between a late lookup and a finished fill).
    for _ in 0..5 {
        let (m, p) = hint(&http_get(origin, pl_path).unwrap().1);
        wait_for(
            "the hinted part to complete",
            Duration::from_secs(5),
            || (hint(&http_get(origin, pl_path)?.1) > (m, p)).then_some(()),
        );
        let part = format!("/live/demo/src/s{m}.{p}.m4s");
        let answers = burst(http, "GET", &part, 200);
        assert!(answers.iter().all(|a| a.0 == 200));
        assert!(answers.windows(2).all(|w| w[0].2 == w[1].2));
        assert_eq!(r.core_requests(&part), 1, "core requests for {part}");
    }
    r.check_honest();
}

// ---- 7. Memory grown by a key holder ------------------------------------------------------

/// The relay budget the memory test gives the edge.
const RELAY_BUDGET: usize = 4 << 20;

/// The AVC and AAC sequence headers and one keyframe of a real encode, as FLV tag bodies.
fn real_headers(env: &Env) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let src = env.path().join("headers.flv");
    encode_flv(&src, 1);
    let tags = flv_tags(&src);
    let find = |kind: u8, first: u8, second: u8| {
        tags.iter()
            .find(|t| t.0 == kind && t.2.len() > 5 && t.2[0] >> 4 == first && t.2[1] == second)
            .map(|t| t.2.clone())
            .expect("tag in the encode")
    };
    (find(9, 1, 0), find(8, 0xA, 0), find(9, 1, 1))
}

/// An RTMP message of `kind` (8 audio, 9 video) on the publish stream.
fn media_message(kind: u8, ts: u32, body: &[u8]) -> Vec<u8> {
    let csid = if kind == 8 { 4 } else { 6 };
    livepop::ingest::chunk::write::message(csid, ts, kind, 1, body, RAW_CHUNK)
}

#[test]
fn publishers_cannot_grow_memory_past_the_bounds() {
    let r = rig_with(
        34,
        "",
        &format!("max_buffered_bytes = {RELAY_BUDGET}"),
        &limits_block(HEADER_MS, IDLE_MS, WRITE_MS),
    );
    let addr = r.edge.addr("rtmp");
    let (avc, aac, key) = real_headers(&r.env);
    let headers = [media_message(9, 0, &avc), media_message(8, 0, &aac)].concat();

    // The edge: one keyframe, then only inter frames (an encoder at -g 100000000), as fast as
    // the socket takes them: 64 MiB offered against a 4 MiB budget.
    let mut p = RawPublisher::publish(addr, "other-key");
    assert!(p.send(&headers) && p.send(&media_message(9, 0, &key)));
    let mut inter = vec![0x27, 1, 0, 0, 0];
    let nal = 64 * 1024 - 4;
    inter.extend_from_slice(&(nal as u32).to_be_bytes());
    inter.push(0x41);
    inter.extend((1..nal).map(|i| (i * 7) as u8));
    let edge_rss = r.edge.memory_mb("VmRSS:");
    let since = Instant::now();
    for i in 1..=1024u32 {
        if !p.send(&media_message(9, i * 33, &inter)) {
            break;
        }
    }
    assert!(
        closed_within(&mut p.s, since, Duration::from_secs(10)),
        "a group past relay.max_buffered_bytes must end the publication"
    );
    r.warned("keyframe interval too long");
    let admin = r.edge.addr("admin");
    assert_eq!(
        metric(
            admin,
            r#"livepop_ingest_rejected_total{reason="group_too_large"}"#
        ),
        1.0
    );
    // Unbounded, the group held all 64 MiB; bounded, 4 MiB plus what passing through leaves
    // in the allocator (about 18 MB, measured).
    let grown = r.edge.memory_mb("VmRSS:") - edge_rss;
    eprintln!("edge grew by {grown:.1} MB");
    assert!(grown < 40.0, "edge grew by {grown:.1} MB");

    // The core: audio 60 s ahead of its video (video keeps coming, so every edge group closes
    // and the edge's bound holds): the packager's audio queue must stay bounded. 64 MiB.
    let mut p = RawPublisher::publish(addr, "other-key");
    assert!(p.send(&headers));
    let mut audio = vec![0xAF, 1];
    audio.extend((0..32 * 1024).map(|i| (i * 13) as u8));
    let core_rss = r.core.memory_mb("VmRSS:");
    let paced: Vec<(u32, Vec<u8>)> = (0..2000u32)
        .map(|i| {
            let ts = i * 33;
            let wire = [
                media_message(9, ts, &key),
                media_message(8, 60_000 + ts, &audio),
            ]
            .concat();
            (ts, wire)
        })
        .collect();
    send_paced(&mut p, &paced, 8);
    let core_admin = r.core.addr("admin");
    let dropped = r#"livepop_core_media_dropped_total{reason="audio_ahead"}"#;
    wait_for(
        "audio dropped by its bound",
        Duration::from_secs(15),
        || (metric_or_zero(core_admin, dropped) > 100.0).then_some(()),
    );
    r.core.wait_log(Duration::from_secs(10), |v| {
        v["level"] == "WARN" && v.to_string().contains("reached its bound")
    });
    // Unbounded, the queue held all 64 MiB (180 MB of RSS, measured); bounded, the growth is
    // the 4 MiB queue plus what passing through leaves in the allocator (about 30 MB).
    let grown = r.core.memory_mb("VmRSS:") - core_rss;
    eprintln!("core grew by {grown:.1} MB");
    assert!(grown < 48.0, "core grew by {grown:.1} MB");
    drop(p);
    r.check_honest();
}

// ---- 8. Edges isolated at the core ----------------------------------------------------------

/// An edge speaking the relay protocol itself, with a real fleet certificate: Hello as
/// `node_id`, then `announces`; returns the core's Refuse reasons by stream id (waiting until
/// `refusals` arrived), or why the core closed the connection.
fn relay_client(
    env: &Env,
    core: SocketAddr,
    cert: &str,
    node_id: &str,
    announces: Vec<livepop::relay::wire::Announce>,
    refusals: usize,
) -> Result<std::collections::HashMap<u64, String>, String> {
    use livepop::relay::wire::{Control, VERSION};
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = env.certs();
        let tls = livepop::certs::relay_client_config(
            &c.join(format!("{cert}.pem")),
            &c.join(format!("{cert}.key")),
            &c.join("ca.pem"),
        )
        .unwrap();
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let client = quinn::ClientConfig::new(Arc::new(quic));
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let conn = ep
            .connect_with(client, core, "localhost")
            .unwrap()
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let mut out = bytes::BytesMut::new();
        Control::Hello {
            version: VERSION,
            node_id: node_id.into(),
        }
        .encode(&mut out);
        for a in announces {
            Control::Announce(a).encode(&mut out);
        }
        send.write_all(&out).await.map_err(|e| e.to_string())?;
        let mut got = std::collections::HashMap::new();
        let mut buf = bytes::BytesMut::new();
        let mut acked = false;
        let read = async {
            while !acked || got.len() < refusals {
                let mut tmp = [0u8; 1024];
                match recv.read(&mut tmp).await {
                    Ok(Some(n)) => buf.extend_from_slice(&tmp[..n]),
                    Ok(None) => return Err("control stream closed".to_string()),
                    Err(e) => return Err(e.to_string()),
                }
                while let Some(m) = Control::decode(&mut buf).unwrap() {
                    match m {
                        Some(Control::HelloAck { .. }) => acked = true,
                        Some(Control::Refuse { stream_id, reason }) => {
                            got.insert(stream_id, reason);
                        }
                        _ => {}
                    }
                }
            }
            Ok(())
        };
        match tokio::time::timeout(Duration::from_secs(10), read).await {
            Ok(r) => r?,
            Err(_) => return Err(format!("timed out; refusals so far: {got:?}")),
        }
        conn.close(0u32.into(), b"done");
        Ok(got)
    })
}

fn announce(stream_id: u64, name: &str, epoch: u64) -> livepop::relay::wire::Announce {
    livepop::relay::wire::Announce {
        stream_id,
        name: name.into(),
        epoch,
        config_version: 1,
        start_seq: 0,
        info: Default::default(),
    }
}

#[test]
fn edges_cannot_take_pin_or_flood_streams_at_the_core() {
    let r = rig(30, "");
    let core = r.core.addr("relay");
    let core_admin = r.core.addr("admin");
    let refused = |reason: &str| {
        metric(
            core_admin,
            &format!("livepop_relay_refused_total{{reason=\"{reason}\"}}"),
        )
    };
    // A fleet certificate for node edge-2 claiming to be edge-1 (the honest stream's edge).
    let spoof = relay_client(&r.env, core, "node-edge-2", "edge-1", vec![], 0);
    assert!(
        spoof.is_err(),
        "a node id the certificate does not name must be refused"
    );
    assert_eq!(refused("identity"), 1.0);

    // Edge-2 announces the honest stream: with an epoch that would pin it, and with one just
    // newer than the live one. Both refused; the stream stays with edge-1.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let got = relay_client(
        &r.env,
        core,
        "node-edge-2",
        "edge-2",
        vec![
            announce(1, "demo", u64::MAX),
            announce(2, "demo", now),
            // Just past the 10 minutes ahead of the core's clock an epoch may be.
            announce(3, "later", now + 11 * 60 * 1_000_000),
        ],
        3,
    )
    .unwrap();
    assert!(got[&1].contains("clock"), "{got:?}");
    assert!(got[&2].contains("another edge"), "{got:?}");
    assert!(got[&3].contains("clock"), "{got:?}");
    assert_eq!((refused("epoch"), refused("duplicate")), (2.0, 1.0));

    // One edge, more streams than relay.max_streams_per_edge.
    let n = STREAMS_PER_EDGE + 2;
    let many = (1..=n)
        .map(|i| announce(i, &format!("flood{i}"), now))
        .collect();
    let got = relay_client(&r.env, core, "node-edge-2", "edge-2", many, 2).unwrap();
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got.values().all(|r| r.contains("max_streams_per_edge")));
    assert_eq!(refused("streams_per_edge"), 2.0);

    // A real second edge, and a publisher with the honest stream's key: the edge accepts the
    // publish, the core refuses the stream, the edge disconnects the publisher.
    let mut opts = EdgeOpts::new(vec![("core-1".into(), core)]);
    opts.relay_cert = "certs/node-edge-2".into();
    opts.node_id = "edge-2".into();
    let cfg = edge_config(&r.env, &opts);
    let cfg = r
        .env
        .write("edge-2.toml", &std::fs::read_to_string(cfg).unwrap());
    let edge2 = Proc::start("edge-2", &["edge", "--config", cfg.to_str().unwrap()]);
    wait_for("edge-2 /readyz", Duration::from_secs(10), || {
        (http_get(edge2.addr("admin"), "/readyz")?.0 == 200).then_some(())
    });
    let mut p = RawPublisher::publish(edge2.addr("rtmp"), "demo-key");
    let (avc, aac, key) = real_headers(&r.env);
    let since = Instant::now();
    p.send(
        &[
            media_message(9, 0, &avc),
            media_message(8, 0, &aac),
            media_message(9, 0, &key),
        ]
        .concat(),
    );
    assert!(
        closed_within(&mut p.s, since, Duration::from_secs(10)),
        "the second edge's publisher of a live stream must be disconnected"
    );
    assert_eq!(refused("duplicate"), 2.0);
    let rejected = r#"livepop_ingest_rejected_total{reason="core_refused"}"#;
    // Counted after the publisher's socket is dropped: wait for it, then exactly once.
    wait_for("the refusal counted", Duration::from_secs(5), || {
        (metric_or_zero(edge2.addr("admin"), rejected) >= 1.0).then_some(())
    });
    assert_eq!(metric(edge2.addr("admin"), rejected), 1.0);
    edge2.wait_log(Duration::from_secs(5), |v| {
        v["level"] == "WARN" && v.to_string().contains("is live from another edge")
    });
    r.check_honest();
}

// ---- 9. The public certificate ----------------------------------------------------------------

#[test]
fn a_fleet_signed_public_certificate_is_refused() {
    let env = Env::new();
    let mut opts = EdgeOpts::new(vec![("core-1".into(), "127.0.0.1:4433".parse().unwrap())]);
    opts.origins = vec!["127.0.0.1:8090".parse().unwrap()];
    let good = edge_config(&env, &opts);
    let check = |cfg: &std::path::Path| {
        Command::new(BIN)
            .args(["check-config", cfg.to_str().unwrap()])
            .output()
            .unwrap()
    };
    assert!(check(&good).status.success());
    // The core's certificate (fleet CA) as the RTMPS or HTTPS certificate.
    let text = std::fs::read_to_string(&good).unwrap();
    for (from, to) in [
        ("[rtmps]\nlisten = \"127.0.0.1:0\"\ncert = \"certs/server.pem\"\nkey = \"certs/server.key\"", "[rtmps]\nlisten = \"127.0.0.1:0\"\ncert = \"certs/core.pem\"\nkey = \"certs/core.key\""),
        ("tls_listen = \"127.0.0.1:0\"\ncert = \"certs/server.pem\"\nkey = \"certs/server.key\"", "tls_listen = \"127.0.0.1:0\"\ncert = \"certs/core.pem\"\nkey = \"certs/core.key\""),
    ] {
        assert!(text.contains(from), "{text}");
        let bad = env.write("fleet-signed.toml", &text.replacen(from, to, 1));
        let out = check(&bad);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("signed by the fleet CA"), "{err}");
    }
}

// ---- 2. Viewer connections per source address ---------------------------------------------

#[test]
fn one_viewer_address_cannot_take_every_slot() {
    let r = rig_with(
        14,
        "",
        "",
        &format!(
            "max_connections_per_ip = 4\n{}",
            limits_block(HEADER_MS, IDLE_MS, WRITE_MS)
        ),
    );
    let http = r.edge.addr("http");
    // Four kept-alive connections from one address, each after a real request (so only the
    // idle deadline, 3 s, would close them)...
    let held: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = connect_from("127.0.0.5", http);
            s.write_all(b"GET /live/demo/master.m3u8 HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            s
        })
        .collect();
    // ...and a fifth from it is closed at once, over HTTP or HTTPS (one budget for both).
    for port in [http, r.edge.addr("https")] {
        let mut fifth = connect_from("127.0.0.5", port);
        assert!(closed_by_peer(&mut fifth, Duration::from_secs(1)), "{port}");
    }
    let refused = r#"livepop_edge_refused_total{reason="per_ip_limit"}"#;
    assert_eq!(metric(r.edge.addr("admin"), refused), 2.0);
    // Another address is served meanwhile.
    let mut other = connect_from("127.0.0.6", http);
    other
        .write_all(b"GET /live/demo/master.m3u8 HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    other
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = std::io::Read::read_to_string(&mut other, &mut answer);
    assert!(
        answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"),
        "{answer}"
    );
    drop(held);
    r.check_honest();
}

/// An h2c connection to the origin that made one request and then only sends PINGs: closed at
/// the idle deadline, since only requests count as activity.
#[test]
fn http2_pings_do_not_keep_an_origin_connection_open() {
    let r = rig(14, "");
    let mut s = TcpStream::connect(r.core.addr("origin")).unwrap();
    s.write_all(&h2_requests("/live/streams.json", 1)).unwrap();
    let since = Instant::now();
    let mut ping = vec![];
    h2_frame(&mut ping, 6, 0, 0, &[0; 8]);
    let mut closed = false;
    while since.elapsed() < Duration::from_millis(IDLE_MS) + SLACK {
        if s.write_all(&ping).is_err() || closed_by_peer(&mut s, Duration::from_millis(300)) {
            closed = true;
            break;
        }
    }
    assert!(closed, "PINGs kept an idle h2 connection open");
    assert!(since.elapsed() >= Duration::from_millis(IDLE_MS) - Duration::from_millis(300));
    let idle = r#"livepop_origin_refused_total{reason="idle_timeout"}"#;
    assert!(metric(r.core.addr("admin"), idle) >= 1.0);
    r.check_honest();
}

/// One node id holds at most 4 relay connections at a core (an edge needs one per core; a few
/// during reconnects): a fifth is closed and counted, and a slot frees when one closes.
#[test]
fn an_edge_holds_at_most_four_relay_connections() {
    use livepop::relay::wire::{Control, VERSION};
    let env = Env::new();
    let core = start_core(&env, "core-1", "127.0.0.1:0");
    let (relay, admin) = (core.addr("relay"), core.addr("admin"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = env.certs();
        let tls = livepop::certs::relay_client_config(
            &c.join("node-edge-2.pem"),
            &c.join("node-edge-2.key"),
            &c.join("ca.pem"),
        )
        .unwrap();
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let client = quinn::ClientConfig::new(Arc::new(quic));
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        // A connection that said Hello: Ok once acknowledged, Err with the close reason.
        let hello = || async {
            let conn = ep
                .connect_with(client.clone(), relay, "localhost")
                .unwrap()
                .await
                .map_err(|e| e.to_string())?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            let mut out = bytes::BytesMut::new();
            Control::Hello {
                version: VERSION,
                node_id: "edge-2".into(),
            }
            .encode(&mut out);
            send.write_all(&out).await.map_err(|e| e.to_string())?;
            let mut buf = bytes::BytesMut::new();
            let acked = async {
                loop {
                    let mut tmp = [0u8; 512];
                    match recv.read(&mut tmp).await {
                        Ok(Some(n)) => buf.extend_from_slice(&tmp[..n]),
                        Ok(None) => return Err("control stream closed".to_string()),
                        Err(e) => return Err(e.to_string()),
                    }
                    if let Some(Some(Control::HelloAck { .. })) = Control::decode(&mut buf).unwrap()
                    {
                        return Ok(());
                    }
                }
            };
            match tokio::time::timeout(Duration::from_secs(10), acked).await {
                Ok(Ok(())) => Ok::<_, String>((conn, send)),
                // Why the core closed it, if it did.
                Ok(Err(e)) => Err(conn.close_reason().map_or(e, |r| r.to_string())),
                Err(_) => Err("no answer".to_string()),
            }
        };
        let mut held = vec![];
        for i in 0..4 {
            held.push(
                hello()
                    .await
                    .unwrap_or_else(|e| panic!("connection {i}: {e}")),
            );
        }
        let fifth = match hello().await {
            Ok(_) => panic!("a fifth connection was accepted"),
            Err(e) => e,
        };
        assert!(fifth.contains("too many connections"), "{fifth}");
        assert_eq!(
            metric(
                admin,
                r#"livepop_relay_refused_total{reason="connections_per_edge"}"#
            ),
            1.0
        );
        // One closes: its slot is free again.
        let (conn, _) = held.pop().unwrap();
        conn.close(0u32.into(), b"bye");
        let again = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match hello().await {
                    Ok(c) => return c,
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        })
        .await;
        assert!(again.is_ok(), "the freed slot was not given back");
    });
}
