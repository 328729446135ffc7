//! The edge's playback cache (issue 4), end to end with real processes: ffmpeg → edge (RTMP) →
//! QUIC → core (LL-HLS origin) → edge cache (Pingora) → HTTP clients. Origin requests are counted
//! on the core side from its access log.

mod common;
use common::*;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Rig {
    env: Env,
    core: Proc,
    edge: Proc,
    http: SocketAddr,
    ff: std::process::Child,
}

/// A core with an origin (access log on), an edge with playback, ffmpeg publishing `demo`.
fn rig(secs: u32, playback_extra: &str) -> Rig {
    let env = Env::new();
    let core = start_core_with_origin(&env, "core-1", "access_log = true");
    let mut opts = EdgeOpts::new(vec![("core-1".into(), core.addr("relay"))]);
    opts.origins = vec![core.addr("origin")];
    opts.extra_playback = playback_extra.into();
    let edge = start_edge(&env, &opts);
    let http = edge.addr("http");
    let url = format!("rtmp://{}/live/demo-key", edge.addr("rtmp"));
    let ff = ffmpeg_publish(&url, secs, "320x240", None);
    wait_for(
        "the stream through the edge",
        Duration::from_secs(20),
        || (http_get(http, "/live/demo/master.m3u8").map(|r| r.0) == Some(200)).then_some(()),
    );
    Rig {
        env,
        core,
        edge,
        http,
        ff,
    }
}

fn text(addr: SocketAddr, path: &str) -> (u16, String) {
    let (s, _, b) = http_get_full(addr, path).unwrap_or_else(|| panic!("GET {path} failed"));
    (s, String::from_utf8_lossy(&b).to_string())
}

/// Requests the core's origin logged for exactly `uri`.
fn origin_requests(core: &Proc, uri: &str) -> usize {
    core.logs()
        .iter()
        .filter(|v| message_is(v, "origin request") && v["fields"]["uri"] == uri)
        .count()
}

struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

/// Sends every request at once (one connection each) and returns the answers, and the wall
/// time (Unix µs) by which all of them had been written.
fn fan_out(addr: SocketAddr, paths: Vec<String>) -> (Vec<Answer>, u64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let sent = Arc::new(AtomicUsize::new(0));
        let n = paths.len();
        let mut tasks = vec![];
        for p in paths {
            let sent = sent.clone();
            tasks.push(tokio::spawn(async move {
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                s.write_all(format!("GET {p} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
                sent.fetch_add(1, Ordering::SeqCst);
                let mut resp = vec![];
                s.read_to_end(&mut resp).await.unwrap();
                let split = resp
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .expect("a response");
                let head = String::from_utf8_lossy(&resp[..split]).to_lowercase();
                let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
                Answer {
                    status,
                    head,
                    body: resp[split + 4..].to_vec(),
                }
            }));
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while sent.load(Ordering::SeqCst) < n {
            assert!(Instant::now() < deadline, "requests not sent in time");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let all_sent = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64;
        let mut out = vec![];
        for t in tasks {
            out.push(t.await.unwrap());
        }
        (out, all_sent)
    })
}

fn assert_identical(answers: &[Answer], what: &str) {
    assert!(answers.iter().all(|a| a.status == 200), "{what}: statuses");
    let first = &answers[0].body;
    assert!(!first.is_empty(), "{what}: empty body");
    assert!(
        answers.iter().all(|a| &a.body == first),
        "{what}: bodies differ"
    );
}

/// Appendix B.1 / LLHLS.md caching: 1,000 viewers asking at once for a part that does not
/// exist yet (blocking reload), a preload-hinted part, and a finished segment each cause exactly
/// one origin request, and all get identical bytes; other query parameters share the fetch.
#[test]
fn one_origin_request_per_object_for_1000_viewers() {
    let Rig {
        env: _env,
        core,
        edge,
        http,
        mut ff,
    } = rig(25, "");
    // Wait (blocking reload) for the start of the next segment, so the part awaited below is
    // about two seconds away.
    let (_, pl) = text(http, "/live/demo/src/index.m3u8");
    let (m0, _) = hint(&pl);
    let (s, pl) = text(
        http,
        &format!("/live/demo/src/index.m3u8?_HLS_msn={}&_HLS_part=0", m0 + 1),
    );
    assert_eq!(s, 200);
    let (m, _) = hint(&pl);
    // A blocking playlist reload for part 2 of the next segment.
    let canonical = format!("/live/demo/src/index.m3u8?_HLS_msn={}&_HLS_part=2", m + 1);
    let paths = (0..1000)
        .map(|i| {
            format!(
                "/live/demo/src/index.m3u8?_HLS_part=2&token={i}&_HLS_msn={}",
                m + 1
            )
        })
        .collect();
    let (answers, all_sent) = fan_out(http, paths);
    assert_identical(&answers, "blocking reload");
    // Every request was waiting before the core completed the part.
    let changed = header_num(&answers[0].head, "livepop-changed-us").expect("livepop-changed-us");
    assert!(
        all_sent < changed,
        "the part existed before all requests were in; the test proves nothing"
    );
    assert_eq!(origin_requests(&core, &canonical), 1, "blocking reload");
    let body = String::from_utf8(answers[0].body.clone()).unwrap();
    assert!(body.contains(&format!("URI=\"s{}.2.m4s\"", m + 1)));

    // The preload-hinted part of that playlist, requested by 1,000 viewers.
    let (hm, hp) = hint(&body);
    let part = format!("/live/demo/src/s{hm}.{hp}.m4s");
    let paths = (0..1000).map(|i| format!("{part}?cb={i}")).collect();
    let (answers, _) = fan_out(http, paths);
    assert_identical(&answers, "hinted part");
    assert_eq!(origin_requests(&core, &part), 1, "hinted part");
    assert!(answers
        .iter()
        .any(|a| a.head.contains("livepop-cache: coalesced")
            || a.head.contains("livepop-cache: hit")));

    // A finished segment nobody fetched through this edge yet.
    let seg = format!("/live/demo/src/s{m}.m4s");
    wait_for("segment complete", Duration::from_secs(10), || {
        text(http, "/live/demo/src/index.m3u8")
            .1
            .contains(&format!("\ns{m}.m4s\n"))
            .then_some(())
    });
    let (answers, _) = fan_out(http, vec![seg.clone(); 1000]);
    assert_identical(&answers, "segment");
    assert_eq!(origin_requests(&core, &seg), 1, "segment");
    assert!(answers.iter().filter(|a| a.head.contains("age: ")).count() >= 999);

    // The edge counted what it did.
    let admin = edge.addr("admin");
    let upstream_parts = metric(
        admin,
        "livepop_edge_upstream_requests_total{kind=\"part\",status=\"200\"}",
    );
    assert_eq!(upstream_parts, 1.0);
    let served: f64 = ["hit", "coalesced", "miss"]
        .iter()
        .map(|c| {
            // Hits or coalesced answers may not happen (either serves the waiting viewers).
            metric_or_zero(
                admin,
                &format!("livepop_edge_requests_total{{cache=\"{c}\",kind=\"part\"}}"),
            )
        })
        .sum();
    assert_eq!(served, 1000.0);
    assert!(metric(admin, "livepop_edge_hold_seconds_count{kind=\"part\"}") >= 1000.0);
    let _ = ff.kill();
}

/// HTTPS with HTTP/2 by ALPN for browsers and Apple players; ffmpeg (HTTP/1.1 over TLS,
/// verifying the dev CA) decodes 10 s through the edge.
#[test]
fn https_playback_through_the_edge() {
    let Rig {
        env,
        core: _core,
        edge,
        http,
        mut ff,
    } = rig(30, "");
    let https = edge.addr("https");
    let ca = env.certs().join("public-ca.pem");
    let url = format!("https://{https}/live/demo/master.m3u8");
    let out = std::process::Command::new("curl")
        .args(["-s", "--http2", "--cacert"])
        .arg(&ca)
        .args(["-o", "/dev/null", "-w", "%{http_version} %{http_code}"])
        .arg(&url)
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2 200");
    // A plain HLS player starts 3 segments from the end: wait until they exist.
    wait_for("3 segments", Duration::from_secs(20), || {
        (text(http, "/live/demo/src/index.m3u8")
            .1
            .matches("#EXTINF")
            .count()
            >= 3)
            .then_some(())
    });
    let player = std::process::Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-v",
            "error",
            "-nostdin",
            "-tls_verify",
            "1",
            "-ca_file",
        ])
        .arg(&ca)
        .arg("-i")
        .arg(&url)
        .args(["-t", "10", "-f", "null", "-"])
        .output()
        .unwrap();
    let errors = String::from_utf8_lossy(&player.stderr);
    assert!(player.status.success(), "player failed: {errors}");
    assert!(errors.trim().is_empty(), "player reported: {errors}");
    let _ = ff.kill();
}

/// The core dies: what the edge cached is still served, live playlists fail fast with 503;
/// the core comes back on the same addresses and playback resumes through the same edge.
#[test]
fn core_outage_serves_cached_media_and_recovers() {
    let Rig {
        env,
        mut core,
        edge,
        http,
        mut ff,
    } = rig(60, "");
    let relay = core.addr("relay");
    let origin = core.addr("origin");
    let pl = wait_for("2 segments", Duration::from_secs(20), || {
        let pl = text(http, "/live/demo/src/index.m3u8").1;
        (pl.matches("#EXTINF").count() >= 2).then_some(pl)
    });
    let lines: Vec<&str> = pl.lines().collect();
    let seg = lines[lines.iter().position(|l| l.starts_with("#EXTINF")).unwrap() + 1].to_string();
    let (s, before) = {
        let (s, _, b) = http_get_full(http, &format!("/live/demo/src/{seg}")).unwrap();
        (s, b)
    };
    assert_eq!(s, 200);

    // A viewer blocked on a part the core will never make.
    let (_, pl) = text(http, "/live/demo/src/index.m3u8");
    let (m, _) = hint(&pl);
    let blocked = std::thread::spawn(move || {
        let r = http_get_full(
            http,
            &format!("/live/demo/src/index.m3u8?_HLS_msn={}", m + 1),
        );
        (r.map(|x| x.0), Instant::now())
    });
    let killed = {
        core.kill();
        Instant::now()
    };
    // Cached media is still served.
    let (s, _, after) = http_get_full(http, &format!("/live/demo/src/{seg}")).unwrap();
    assert_eq!(s, 200);
    assert_eq!(after, before);
    // The blocked viewer is told at once; live playlists fail fast (503), at the latest when
    // their cached copy (max-age 1 s) runs out: never a stale playlist.
    let (status, when) = blocked.join().unwrap();
    assert_eq!(status, Some(503));
    assert!(
        when - killed < Duration::from_secs(1),
        "blocked viewer answered after {:?}",
        when - killed
    );
    wait_for("a 503 for the playlist", Duration::from_secs(3), || {
        let t = Instant::now();
        let (s, _) = text(http, "/live/demo/src/index.m3u8");
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "answer took {:?}",
            t.elapsed()
        );
        (s == 503).then_some(())
    });
    assert!(killed.elapsed() < Duration::from_secs(3));

    // The core returns on the same addresses; the publisher is still connected to the edge.
    let cfg = core_config_with_origin_at(
        &env,
        "core-1",
        &relay.to_string(),
        &origin.to_string(),
        "access_log = true",
    );
    let _back = Proc::start("core-1b", &["core", "--config", cfg.to_str().unwrap()]);
    let pl = wait_for(
        "playback through the same edge",
        Duration::from_secs(20),
        || {
            let (s, pl) = text(http, "/live/demo/src/index.m3u8");
            (s == 200 && pl.contains("#EXT-X-PRELOAD-HINT") && pl.contains("#EXT-X-PART:"))
                .then_some(pl)
        },
    );
    // The publisher never noticed: the same ffmpeg still runs, and the edge saw one publish.
    assert!(
        ff.try_wait().unwrap().is_none(),
        "the publisher was cut off"
    );
    let publishes = edge
        .logs()
        .iter()
        .filter(|v| message_is(v, "publish started"))
        .count();
    assert_eq!(publishes, 1);
    assert_eq!(metric(edge.addr("admin"), "livepop_ingest_streams"), 1.0);
    // What the edge serves now is the new core's, not a cached object of the old one under a
    // name the new core uses again.
    let part = pl
        .lines()
        .filter_map(|l| l.strip_prefix("#EXT-X-PART:"))
        .filter_map(|a| a.split("URI=\"").nth(1)?.split('"').next())
        .next_back()
        .unwrap()
        .to_string();
    let via_edge = http_get_full(http, &format!("/live/demo/src/{part}")).unwrap();
    let direct = http_get_full(origin, &format!("/live/demo/src/{part}")).unwrap();
    assert_eq!((via_edge.0, direct.0), (200, 200), "{part}");
    assert!(via_edge.2 == direct.2, "{part} differs through the edge");
    let _ = ff.kill();
}

/// Viewer limits: a client dripping its request headers is cut off at the header timeout
/// however it drips; connections beyond the cap are closed at once and counted; neither
/// disturbs a well-behaved viewer.
#[test]
fn slow_headers_are_cut_off_and_connections_are_capped() {
    use std::io::{Read, Write};
    let env = Env::new();
    let core = start_core_with_origin(&env, "core-1", "");
    let mut opts = EdgeOpts::new(vec![("core-1".into(), core.addr("relay"))]);
    opts.origins = vec![core.addr("origin")];
    opts.extra_playback = "header_timeout_ms = 1000\nmax_connections = 2".into();
    let edge = start_edge(&env, &opts);
    let http = edge.addr("http");

    // A well-behaved request works (404: no such stream, answered by the origin).
    assert_eq!(http_get(http, "/live/nosuch/master.m3u8").unwrap().0, 404);

    // Slow headers: one byte every 100 ms never completes a request; the edge hangs up about
    // one header timeout after the connection opened.
    let t = Instant::now();
    let mut slow = std::net::TcpStream::connect(http).unwrap();
    let req = b"GET /live/demo/master.m3u8 HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaa";
    let mut cut = None;
    for b in req.iter().cycle().take(60) {
        if slow.write_all(&[*b]).is_err() {
            cut = Some(t.elapsed());
            break;
        }
        slow.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut x = [0u8; 1];
        match slow.read(&mut x) {
            Ok(0) => {
                cut = Some(t.elapsed());
                break;
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            _ => {
                cut = Some(t.elapsed());
                break;
            }
        }
    }
    let cut = cut.expect("a dripping client was never cut off");
    assert!(
        cut >= Duration::from_millis(900) && cut < Duration::from_millis(2500),
        "cut off after {cut:?}"
    );

    // The cap: two idle connections hold both slots; a third is closed at once.
    let a = std::net::TcpStream::connect(http).unwrap();
    let b = std::net::TcpStream::connect(http).unwrap();
    // Both are accepted (and hold slots) once the edge has seen them: a request on a third
    // connection made after that must be refused.
    wait_for("both slots taken", Duration::from_secs(5), || {
        let mut c = std::net::TcpStream::connect(http).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let _ = c.write_all(b"GET /live/nosuch/master.m3u8 HTTP/1.0\r\n\r\n");
        let mut v = vec![];
        let refused = matches!(c.read_to_end(&mut v), Ok(0)) || v.is_empty();
        refused.then_some(())
    });
    assert!(metric(edge.addr("admin"), "livepop_edge_connections_refused_total") >= 1.0);
    drop((a, b));
    // Slots free again: viewers are served.
    wait_for("a slot", Duration::from_secs(5), || {
        (http_get(http, "/live/nosuch/master.m3u8").map(|r| r.0) == Some(404)).then_some(())
    });
}

/// A TCP relay between the edge and the core's origin that, while armed, cuts each response
/// after `cut` bytes: an origin connection failing partway through a body.
struct CuttingRelay {
    addr: SocketAddr,
    cut: Arc<AtomicUsize>,
}

impl CuttingRelay {
    fn start(to: SocketAddr) -> Self {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let cut = Arc::new(AtomicUsize::new(0));
        let c = cut.clone();
        std::thread::spawn(move || {
            for down in l.incoming().flatten() {
                let Ok(up) = std::net::TcpStream::connect(to) else {
                    continue;
                };
                let limit = c.load(Ordering::SeqCst);
                let (mut d1, mut u1) = (down.try_clone().unwrap(), up.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut d1, &mut u1);
                });
                let (mut u2, mut d2) = (up, down);
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    let mut sent = 0;
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = u2.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let n = if limit > 0 { n.min(limit - sent) } else { n };
                        if d2.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        sent += n;
                        if limit > 0 && sent >= limit {
                            break; // cut: both directions close
                        }
                    }
                    let _ = d2.shutdown(std::net::Shutdown::Both);
                    let _ = u2.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        CuttingRelay { addr, cut }
    }
}

/// pingora issue #932: an origin response that breaks partway must reach viewers as a broken
/// response (never a short body that looks complete) and must not stay in the cache: the next
/// request gets the whole object.
#[test]
fn a_fill_that_fails_partway_is_never_served_as_complete() {
    use std::io::{Read, Write};
    let env = Env::new();
    let core = start_core_with_origin(&env, "core-1", "");
    let relay = CuttingRelay::start(core.addr("origin"));
    let mut opts = EdgeOpts::new(vec![("core-1".into(), core.addr("relay"))]);
    opts.origins = vec![relay.addr];
    let edge = start_edge(&env, &opts);
    let http = edge.addr("http");
    let url = format!("rtmp://{}/live/demo-key", edge.addr("rtmp"));
    let mut ff = ffmpeg_publish(&url, 20, "640x360", None);
    let origin = core.addr("origin");
    let pl = wait_for("a complete segment", Duration::from_secs(20), || {
        let (s, pl) = text(origin, "/live/demo/src/index.m3u8");
        (s == 200 && pl.contains("#EXTINF")).then_some(pl)
    });
    let lines: Vec<&str> = pl.lines().collect();
    let seg = lines[lines.iter().position(|l| l.starts_with("#EXTINF")).unwrap() + 1];
    let path = format!("/live/demo/src/{seg}");
    let (_, _, whole) = http_get_full(origin, &path).unwrap();
    assert!(whole.len() > 20_000, "segment of {} bytes", whole.len());

    // Armed: the edge's origin connection breaks 10,000 bytes into the response. Several
    // viewers ask at once; none may receive a body that passes for complete.
    relay.cut.store(10_000, Ordering::SeqCst);
    let viewers: Vec<_> = (0..5)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut s = std::net::TcpStream::connect(http).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
                write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
                let mut v = vec![];
                let _ = s.read_to_end(&mut v); // ends with the connection
                v
            })
        })
        .collect();
    let mut failed = 0;
    for v in viewers {
        let resp = v.join().unwrap();
        let Some(split) = resp.windows(4).position(|w| w == b"\r\n\r\n") else {
            failed += 1; // no response at all: clearly failed
            continue;
        };
        let head = String::from_utf8_lossy(&resp[..split]).to_lowercase();
        let body = &resp[split + 4..];
        if let Some(len) = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.trim().parse::<usize>().ok())
        {
            // Either way is right: a 503 before any byte, or a 200 whose body stops short of its
            // Content-Length (the fill broke after the headers went out).
            if !head.starts_with("http/1.1 200") || body.len() < len {
                failed += 1;
            }
            assert!(
                !head.starts_with("http/1.1 200") || body.len() < len || body == whole.as_slice(),
                "a truncated body passed for complete: {head}\n{} of {len} bytes",
                body.len()
            );
        } else if head.contains("transfer-encoding: chunked") {
            assert!(
                !body.ends_with(b"0\r\n\r\n"),
                "a truncated chunked body was terminated as complete"
            );
        }
    }
    // The broken fill reached the viewers (the case under test) as a failure.
    assert!(failed > 0, "no viewer saw the fill fail");
    // Disarmed: the next request gets the whole segment, not a cached fragment.
    relay.cut.store(0, Ordering::SeqCst);
    let (s, _, body) = http_get_full(http, &path).unwrap();
    assert_eq!(s, 200);
    assert_eq!(body, whole);
    let _ = ff.kill();
    let _ = ff.wait();
}

/// Cached answers never outlive a change of the stream's state: a 404 cached before the stream
/// goes live clears within its lifetime (1 s); when the publisher leaves and publishes again,
/// the ended session's playlist (which answers every blocking reload at once, §6.2.5.2) is not
/// served for the new session's parts past that lifetime, and the new parts are the new ones.
#[test]
fn cached_answers_follow_the_stream_going_live_ending_and_coming_back() {
    let env = Env::new();
    let core = start_core_with_origin(&env, "core-1", "access_log = true");
    let origin = core.addr("origin");
    let mut opts = EdgeOpts::new(vec![("core-1".into(), core.addr("relay"))]);
    opts.origins = vec![origin];
    let edge = start_edge(&env, &opts);
    let (http, rtmp) = (edge.addr("http"), edge.addr("rtmp"));
    let master = "/live/demo/master.m3u8";
    let media = "/live/demo/src/index.m3u8";
    // Before the stream: a 404 the edge keeps for its lifetime.
    let (s, head, _) = http_get_full(http, master).unwrap();
    assert_eq!(s, 404, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("cache-control: max-age=1"),
        "{head}"
    );
    let url = format!("rtmp://{rtmp}/live/demo-key");
    let mut ff = ffmpeg_publish(&url, 6, "320x240", None);
    // The edge answers 200 within the 404's lifetime of the origin doing so.
    let mut origin_live = None;
    let edge_live = wait_for(
        "the stream through the edge",
        Duration::from_secs(20),
        || {
            if origin_live.is_none() && http_get(origin, master)?.0 == 200 {
                origin_live = Some(Instant::now());
            }
            (http_get(http, master)?.0 == 200).then(Instant::now)
        },
    );
    let lag = edge_live.saturating_duration_since(origin_live.unwrap_or(edge_live));
    assert!(
        lag < Duration::from_millis(1500),
        "the cached 404 lasted {lag:?}"
    );

    // The publisher leaves: the playlist ends; a blocking reload for the next segment is
    // answered at once with the ended playlist, and the edge caches that answer.
    assert!(wait_child(&mut ff, Duration::from_secs(30)));
    let ended = wait_for("the ended playlist", Duration::from_secs(10), || {
        let (s, pl) = http_get(http, media)?;
        (s == 200 && pl.contains("#EXT-X-ENDLIST")).then_some(pl)
    });
    let last = attr(&ended, "#EXT-X-MEDIA-SEQUENCE:") + complete_segments(&ended).len() as u64 - 1;
    let next = format!("{media}?_HLS_msn={}&_HLS_part=0", last + 1);
    let (s, pl) = text(http, &next);
    assert_eq!(s, 200);
    assert!(pl.contains("#EXT-X-ENDLIST"), "{pl}");

    // Published again: the playlist continues after a discontinuity, with msn last + 1.
    let mut ff = ffmpeg_publish(&url, 12, "320x240", None);
    let mut origin_next = None;
    let edge_next = wait_for(
        "the next session through the edge",
        Duration::from_secs(30),
        || {
            if origin_next.is_none() {
                let (s, pl) = http_get(origin, &next)?;
                if s == 200 && !pl.contains("#EXT-X-ENDLIST") {
                    origin_next = Some(Instant::now());
                }
            }
            let (s, pl) = http_get(http, &next)?;
            (s == 200 && !pl.contains("#EXT-X-ENDLIST")).then(|| (Instant::now(), pl))
        },
    );
    let lag = edge_next
        .0
        .saturating_duration_since(origin_next.unwrap_or(edge_next.0));
    assert!(
        lag < Duration::from_millis(1500),
        "the ended playlist was served {lag:?} into the next session"
    );
    assert!(
        edge_next.1.contains("#EXT-X-DISCONTINUITY"),
        "{}",
        edge_next.1
    );
    // Its first part through the edge is the origin's.
    let part = format!("/live/demo/src/s{}.0.m4s", last + 1);
    let via_edge = http_get_full(http, &part).unwrap();
    let direct = http_get_full(origin, &part).unwrap();
    assert_eq!((via_edge.0, direct.0), (200, 200), "{part}");
    assert!(via_edge.2 == direct.2, "{part} differs through the edge");
    let _ = ff.kill();
    let _ = ff.wait();
}

/// The `#TAG:value` number of a playlist.
fn attr(pl: &str, tag: &str) -> u64 {
    pl.lines()
        .find_map(|l| l.strip_prefix(tag)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {tag} in {pl}"))
}

/// HTTP/2 viewers are coalesced as HTTP/1.1 ones are: 300 requests multiplexed on one h2c
/// connection and 300 on one h2 connection over TLS (curl), all waiting for the same part,
/// cost the core one request for the blocking reload and one for the part.
#[test]
fn http2_viewers_are_coalesced_like_http1_ones() {
    let Rig {
        env,
        core,
        edge,
        http,
        mut ff,
    } = rig(25, "");
    let https = edge.addr("https");
    // At the start of a segment, so that part 2 of the next one is about 2.4 s away.
    let (_, pl) = text(http, "/live/demo/src/index.m3u8");
    let (m0, _) = hint(&pl);
    let (_, pl) = text(
        http,
        &format!("/live/demo/src/index.m3u8?_HLS_msn={}&_HLS_part=0", m0 + 1),
    );
    let (m, _) = hint(&pl);
    let canonical = format!("/live/demo/src/index.m3u8?_HLS_msn={}&_HLS_part=2", m + 1);
    let part = format!("/live/demo/src/s{}.2.m4s", m + 1);
    let ca = env.certs().join("public-ca.pem");
    // Each curl multiplexes its transfers on one connection (--parallel).
    let curl = |base: String, h2: &[&str], paths: Vec<String>| {
        let mut c = std::process::Command::new("curl");
        c.args(["-sS", "--parallel", "--parallel-max", "300", "--cacert"])
            .arg(&ca)
            .args(h2)
            .args(["-w", "%{http_code} %{http_version} %{time_total}\\n"]);
        for p in paths {
            c.args(["-o", "/dev/null", &format!("{base}{p}")]);
        }
        c.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // h2 over TLS from curl, h2c from hyper's client (curl 7.88 breaks its own h2c
    // connection at the second request, against hyper's server too), at the same time.
    let both = |paths: &dyn Fn(usize) -> String| {
        let tls = curl(
            format!("https://{https}"),
            &["--http2"],
            (300..600).map(paths).collect(),
        );
        let mut out = h2c_requests(http, (0..300).map(paths).collect());
        {
            let c = tls;
            let o = c.wait_with_output().unwrap();
            assert!(
                o.status.success(),
                "curl: {} {}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            );
            out += &String::from_utf8_lossy(&o.stdout);
        }
        out
    };
    let m1 = m + 1;
    let out = both(&|i| format!("/live/demo/src/index.m3u8?_HLS_part=2&v={i}&_HLS_msn={m1}"));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 600, "{out}");
    // All answered over HTTP/2, and they waited for the part (not hits of something older).
    assert!(lines.iter().all(|l| l.starts_with("200 2 ")), "{out}");
    let waited = lines
        .iter()
        .filter_map(|l| l.split(' ').nth(2)?.parse::<f64>().ok())
        .fold(f64::MAX, f64::min);
    assert!(
        waited > 0.5,
        "the fastest answer took {waited} s: nothing waited"
    );
    assert_eq!(origin_requests(&core, &canonical), 1, "blocking reload");
    // The part itself, now cached or being filled: one core request in all.
    let out = both(&|i| format!("{part}?cb={i}"));
    assert_eq!(
        out.lines().filter(|l| l.starts_with("200 2 ")).count(),
        600,
        "{out}"
    );
    assert_eq!(origin_requests(&core, &part), 1, "part");
    let _ = ff.kill();
}

/// GETs `paths` at once as streams of one h2c connection (hyper's client); one line per
/// answer as curl's `-w` above writes it: status, "2", seconds.
fn h2c_requests(addr: SocketAddr, paths: Vec<String>) -> String {
    use http_body_util::{BodyExt, Empty};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let mut tasks = tokio::task::JoinSet::new();
        for p in paths {
            let mut send = send.clone();
            tasks.spawn(async move {
                let t = Instant::now();
                let req = hyper::Request::get(format!("http://{addr}{p}"))
                    .body(Empty::<bytes::Bytes>::new())
                    .unwrap();
                let r = tokio::time::timeout(Duration::from_secs(20), async {
                    let resp = send.send_request(req).await.ok()?;
                    let status = resp.status().as_u16();
                    let v = resp.version();
                    resp.into_body().collect().await.ok()?;
                    Some((status, v))
                })
                .await
                .ok()
                .flatten();
                match r {
                    Some((st, v)) if v == hyper::Version::HTTP_2 => {
                        format!("{st} 2 {}\n", t.elapsed().as_secs_f64())
                    }
                    other => format!("failed {other:?}\n"),
                }
            });
        }
        let mut out = String::new();
        while let Some(line) = tasks.join_next().await {
            out += &line.unwrap();
        }
        out
    })
}

/// `[playback] player = false` turns the player page off (the stream list stays); the edge
/// asks the cores for their stream lists at most once per second however many viewers ask.
#[test]
fn the_stream_list_is_merged_once_per_second_and_the_page_can_be_off() {
    let env = Env::new();
    let core = start_core_with_origin(&env, "core-1", "access_log = true");
    let mut opts = EdgeOpts::new(vec![("core-1".into(), core.addr("relay"))]);
    opts.origins = vec![core.addr("origin")];
    opts.extra_playback = "player = false\n".into();
    let edge = start_edge(&env, &opts);
    let http = edge.addr("http");
    for page in ["/", "/index.html", "/player.js"] {
        assert_eq!(http_get(http, page).map(|r| r.0), Some(404), "{page}");
    }
    // 300 viewers at once, then again: within about a second, one or two merges.
    let started = Instant::now();
    let answers = burst(http, "GET", "/live/streams.json", 300);
    assert!(answers.iter().all(|a| a.0 == 200));
    assert!(
        answers.iter().all(|a| a.2 == answers[0].2),
        "one list for all"
    );
    let answers = burst(http, "GET", "/live/streams.json", 300);
    assert!(answers.iter().all(|a| a.0 == 200));
    let elapsed = started.elapsed().as_secs_f64();
    let merges = origin_requests(&core, "/live/streams.json");
    assert!(
        merges >= 1 && merges as f64 <= elapsed.ceil() + 1.0,
        "{merges} requests to the core in {elapsed:.2} s"
    );
}

/// Out of file descriptors, a listener pauses 100 ms after a failed accept instead of spinning
/// on it, and serves again once descriptors are free.
#[test]
fn out_of_file_descriptors_a_listener_pauses_and_recovers() {
    let env = Env::new();
    let core = start_core_with_origin(&env, "core-1", "");
    let mut opts = EdgeOpts::new(vec![("core-1".into(), core.addr("relay"))]);
    opts.origins = vec![core.addr("origin")];
    let edge = start_edge(&env, &opts);
    let (http, pid) = (edge.addr("http"), edge.pid());
    // A few descriptors to spare, then none (prlimit, util-linux).
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let limit = format!("--nofile={}:{}", open + 4, open + 4);
    let st = std::process::Command::new("prlimit")
        .args([format!("--pid={pid}"), limit])
        .status()
        .unwrap();
    assert!(st.success());
    let conns: Vec<TcpStream> = (0..32).map(|_| TcpStream::connect(http).unwrap()).collect();
    let failures = |edge: &Proc| -> Vec<f64> {
        edge.logs()
            .iter()
            .filter(|v| message_is(v, "accept failed; pausing this listener"))
            .filter_map(|v| {
                let t = v["timestamp"].as_str()?;
                // Seconds within the minute are enough to measure a second or so.
                let secs = t.rsplit(':').next()?.trim_end_matches('Z');
                secs.parse::<f64>().ok().map(|s| s + 60.0 * minute(t))
            })
            .collect()
    };
    let times = wait_for("eight failed accepts", Duration::from_secs(10), || {
        let t = failures(&edge);
        (t.len() >= 8).then_some(t)
    });
    // Spinning would log thousands in a millisecond; paused, eight take at least 0.7 s.
    let span = times[7] - times[0];
    assert!(span >= 0.65, "eight failed accepts within {span:.3} s");
    drop(conns);
    wait_for("served again", Duration::from_secs(10), || {
        (http_get(http, "/live/streams.json")?.0 == 200).then_some(())
    });
}

/// The minute of an RFC 3339 timestamp (`...THH:MM:SS...`), as a number.
fn minute(t: &str) -> f64 {
    t.split(':')
        .nth(1)
        .and_then(|m| m.parse().ok())
        .unwrap_or(0.0)
}
