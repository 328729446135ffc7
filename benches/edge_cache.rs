//! Edge cache benchmark (issue 4): livepop's edge against nginx (proxy_cache + proxy_cache_lock)
//! and Varnish, each a cache in front of the same core origin, in one run, driven by the same
//! client code at the same concurrency.
//!
//! 1. Cached-hit throughput: `--conns` keep-alive HTTP/1.1 connections fetch one cached object
//!    as fast as they can for `--secs` seconds: a part (~20 KB) and a media playlist (~1.5 KB).
//! 2. Coalesced fan-out: N clients (each `--fanout` value) are blocked on the next part with
//!    `_HLS_msn`/`_HLS_part` through the cache; for each of `--parts` parts, the time from the
//!    part's completion at the core (`livepop-changed-us`, passed through by every cache) to the
//!    last of the N responses. And per part, how many requests for it the core's origin got
//!    (its access log): one when the cache coalesces its viewers into one fill.
//!
//! Run: `bash bench/edge.sh` (installs nginx and Varnish).

use std::net::SocketAddr;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/peers.rs"]
mod peers;
use common::{arg, message_is, preload_hint as hint};
use peers::{cpu_of, publish_test_stream, servers};

/// The media playlist the fan-out blocks on.
const FANOUT_PLAYLIST: &str = "/live/demo/src/index.m3u8";

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// One HTTP/1.1 GET on a kept-alive connection: (status, livepop-changed-us, body length).
/// Handles Content-Length and chunked bodies (nginx and Varnish may stream with either).
async fn get(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    path: &str,
) -> std::io::Result<(u16, u64, usize)> {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n").as_bytes())
        .await?;
    buf.clear();
    let mut tmp = vec![0u8; 65536];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let header = |name: &str| -> Option<String> {
        head.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
    };
    let changed = header("livepop-changed-us:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if let Some(len) = header("content-length:").and_then(|v| v.parse::<usize>().ok()) {
        while buf.len() < head_end + len {
            let n = s.read(&mut tmp).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&tmp[..n]);
        }
        buf.drain(..head_end + len);
        return Ok((status, changed, len));
    }
    // Chunked: read until the terminating chunk.
    let mut body = 0;
    let mut pos = head_end;
    loop {
        let line_end = loop {
            if let Some(i) = buf[pos..].windows(2).position(|w| w == b"\r\n") {
                break pos + i;
            }
            let n = s.read(&mut tmp).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&tmp[..n]);
        };
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&buf[pos..line_end])
                .split(';')
                .next()
                .unwrap_or("0")
                .trim(),
            16,
        )
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))?;
        let need = line_end + 2 + size + 2;
        while buf.len() < need {
            let n = s.read(&mut tmp).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&tmp[..n]);
        }
        body += size;
        pos = need;
        if size == 0 {
            buf.drain(..pos);
            return Ok((status, changed, body));
        }
    }
}

fn pct(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

async fn fetch_text(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut v = vec![];
    s.read_to_end(&mut v).await.unwrap();
    let t = String::from_utf8_lossy(&v).to_string();
    t.split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default()
}

/// `conns` connections fetch `path` in a loop for `secs`: requests per second.
async fn throughput(addr: SocketAddr, path: &str, conns: usize, secs: u64) -> (f64, usize) {
    let count = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs(secs);
    let mut tasks = vec![];
    let mut size = 0;
    for _ in 0..conns {
        let count = count.clone();
        let errors = errors.clone();
        let path = path.to_string();
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.set_nodelay(true).unwrap();
            let mut buf = Vec::with_capacity(65536);
            let mut size = 0;
            while Instant::now() < stop {
                match get(&mut s, &mut buf, &path).await {
                    Ok((200, _, n)) => {
                        size = n;
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        s = TcpStream::connect(addr).await.unwrap();
                    }
                }
            }
            size
        }));
    }
    for t in tasks {
        size = size.max(t.await.unwrap());
    }
    let e = errors.load(Ordering::Relaxed);
    if e > 0 {
        println!("    ({e} errors)");
    }
    (count.load(Ordering::Relaxed) as f64 / secs as f64, size)
}

/// Coalesced fan-out through `addr`: per part, ms from completion at the core to the last of
/// `n` responses; the errors; the (msn, part) asked for in each round, warm-up included.
async fn fanout(
    addr: SocketAddr,
    origin: SocketAddr,
    n: usize,
    rounds: usize,
) -> (Vec<f64>, usize, Vec<(u64, u64)>) {
    let (target_tx, target_rx) = watch::channel::<Option<(u64, u64)>>(None);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(u64, u64)>();
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let c = TcpStream::connect(addr).await.expect("connect");
        c.set_nodelay(true).unwrap();
        conns.push(c);
        if i % 500 == 499 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let mut tasks = vec![];
    for mut c in conns {
        let mut rx = target_rx.clone();
        let tx = done_tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut buf = Vec::with_capacity(8192);
            loop {
                if rx.changed().await.is_err() {
                    return;
                }
                let Some((m, p)) = *rx.borrow_and_update() else {
                    return;
                };
                let path = format!("{FANOUT_PLAYLIST}?_HLS_msn={m}&_HLS_part={p}");
                match get(&mut c, &mut buf, &path).await {
                    Ok((200, changed, _)) => {
                        let _ = tx.send((changed, now_us()));
                    }
                    _ => {
                        let _ = tx.send((0, 0));
                        if let Ok(s) = TcpStream::connect(addr).await {
                            c = s;
                        }
                    }
                }
            }
        }));
    }
    let mut last = vec![];
    let mut errors = 0;
    let mut targets = vec![];
    for round in 0..rounds + 2 {
        // Ask for the part after the hinted one, so that every client is surely waiting.
        let pl = fetch_text(origin, FANOUT_PLAYLIST).await;
        let (m, p) = hint(&pl).expect("hint");
        target_tx.send(Some((m, p + 1))).unwrap();
        targets.push((m, p + 1));
        let mut completed = u64::MAX;
        let mut latest = 0;
        for _ in 0..n {
            let (changed, at) = done_rx.recv().await.unwrap();
            if at == 0 {
                errors += 1;
                continue;
            }
            completed = completed.min(changed);
            latest = latest.max(at);
        }
        if round >= 2 && completed != u64::MAX && latest > 0 {
            last.push(latest.saturating_sub(completed) as f64 / 1000.0);
        }
    }
    target_tx.send(None).unwrap();
    drop(target_tx);
    for t in tasks {
        t.abort();
    }
    (last, errors, targets)
}

/// Path, `_HLS_msn` and `_HLS_part` of a request URI as the core's origin logged it. Parsed,
/// not compared as text: nginx passes the query as the client sent it, Varnish sorts it, the
/// livepop edge puts it in canonical order.
fn blocking_key(uri: &str) -> Option<(&str, u64, u64)> {
    // An absolute URI (h2c) carries the scheme and authority before the path.
    let uri = match uri.split_once("://") {
        Some((_, rest)) => &rest[rest.find('/').unwrap_or(rest.len())..],
        None => uri,
    };
    let (path, query) = uri.split_once('?')?;
    let (mut msn, mut part) = (None, None);
    for kv in query.split('&') {
        match kv.split_once('=') {
            Some(("_HLS_msn", v)) => msn = v.parse().ok(),
            Some(("_HLS_part", v)) => part = v.parse().ok(),
            _ => {}
        }
    }
    Some((path, msn?, part?))
}

/// For each of `targets`, the origin requests among the core's log `lines` for the fan-out
/// playlist at that (msn, part). The bench's own origin fetches carry no `_HLS_msn`, so only
/// the caches' fills count.
fn origin_requests(lines: &[serde_json::Value], targets: &[(u64, u64)]) -> Vec<usize> {
    let mut counts = vec![0; targets.len()];
    for v in lines.iter().filter(|v| message_is(v, "origin request")) {
        let Some((path, m, p)) = v["fields"]["uri"].as_str().and_then(blocking_key) else {
            continue;
        };
        if path != FANOUT_PLAYLIST {
            continue;
        }
        for (c, t) in counts.iter_mut().zip(targets) {
            if *t == (m, p) {
                *c += 1;
            }
        }
    }
    counts
}

/// How many lines the core has logged so far, all of them read: the origin logs a request
/// before answering it and its log comes through one pipe in order, so once a marker request
/// sent now has been read, so have the fills of every object already answered.
async fn core_log_synced(core: &common::Proc, origin: SocketAddr) -> usize {
    let marker = format!("/bench-log-marker/{}", now_us());
    fetch_text(origin, &marker).await;
    core.wait_log(Duration::from_secs(10), |v| {
        v["fields"]["uri"] == marker.as_str()
    });
    core.logs().len()
}

/// Per-round core requests for one object, as text: the count when every round had the same,
/// else the spread; rounds where the core got more than one request (no coalescing) or none
/// (not found in its log) are called out.
fn describe(counts: &[usize]) -> String {
    let Some(&first) = counts.first() else {
        return "no rounds".into();
    };
    let total = counts.len();
    let mut s = if counts.iter().all(|&c| c == first) {
        format!("{first} (all {total} rounds)")
    } else {
        let mut v = counts.to_vec();
        v.sort_unstable();
        format!("min {} median {} max {}", v[0], v[total / 2], v[total - 1])
    };
    let over = counts.iter().filter(|&&c| c > 1).count();
    if over > 0 {
        s += &format!(", {over} of {total} rounds >1 (MORE THAN ONE ORIGIN REQUEST PER PART)");
    }
    let none = counts.iter().filter(|&&c| c == 0).count();
    if none > 0 {
        s += &format!(", {none} of {total} rounds with none logged");
    }
    s
}

fn main() {
    let conns: usize = arg("--conns", "64").parse().unwrap();
    let secs: u64 = arg("--secs", "10").parse().unwrap();
    let rounds: usize = arg("--parts", "20").parse().unwrap();
    let fanouts: Vec<usize> = arg("--fanout", "1000,10000")
        .split(',')
        .map(|x| x.parse().unwrap())
        .filter(|n| *n > 0)
        .collect();
    let with_peers = arg("--peers", "yes") == "yes";

    let env = common::Env::new();
    // 1/3 s parts and a short window keep the media playlist near 1.5 KB; at 450 kbit/s video
    // a part is about 20 KB.
    // The access log counts the core's requests per fanned-out part.
    let (core, edge, origin) = peers::core_and_edge(
        &env,
        "window_segments = 3\npart_target_ms = 333\naccess_log = true",
    );
    let rtmp = edge.addr("rtmp");
    let edge_http = edge.addr("http");
    let mut ff = publish_test_stream(&format!("rtmp://{rtmp}/live/demo-key"), 450);
    let (peers, children_procs) = servers(env.path(), edge.pid(), edge_http, origin, with_peers);
    let core_log = &core;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        // Wait for the stream and the peers.
        let deadline = Instant::now() + Duration::from_secs(30);
        for p in &peers {
            loop {
                if TcpStream::connect(p.addr).await.is_ok()
                    && fetch_text(p.addr, "/live/demo/master.m3u8").await.contains("#EXTM3U")
                {
                    break;
                }
                assert!(Instant::now() < deadline, "{} did not come up", p.name);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        // Let the window fill so the playlist has its steady size.
        tokio::time::sleep(Duration::from_secs(8)).await;
        println!(
            "edge cache benchmark: {conns} connections x {secs} s per object; fan-out {fanouts:?} clients x {rounds} parts"
        );
        println!("cached-hit throughput (requests/s, HTTP/1.1 keep-alive, same client for every cache):");
        let mut rows: Vec<(String, Vec<f64>)> = vec![];
        for p in &peers {
            let mut row = vec![];
            // A part that exists now (the newest complete one), and the media playlist.
            let pl = fetch_text(origin, "/live/demo/src/index.m3u8").await;
            let (m, pi) = hint(&pl).expect("hint");
            let part = if pi > 0 {
                format!("/live/demo/src/s{m}.{}.m4s", pi - 1)
            } else {
                format!("/live/demo/src/s{}.0.m4s", m - 1)
            };
            for (what, path) in [("part", part.as_str()), ("playlist", "/live/demo/src/index.m3u8")] {
                let pids = (p.pids)();
                let cpu0 = cpu_of(&pids);
                let (rps, size) = throughput(p.addr, path, conns, secs).await;
                let cpu = cpu_of(&(p.pids)()) - cpu0;
                println!(
                    "  {:<13} {what:<8} ({size:>5} B): {rps:>9.0} req/s, {:.1} CPU s, {:.1} µs CPU/request",
                    p.name,
                    cpu,
                    cpu * 1e6 / (rps * secs as f64)
                );
                row.push(rps);
            }
            rows.push((p.name.to_string(), row));
        }
        if rows.len() > 1 {
            for (name, r) in &rows[1..] {
                println!(
                    "  livepop / {name}: part {:.2}x, playlist {:.2}x",
                    rows[0].1[0] / r[0],
                    rows[0].1[1] / r[1]
                );
            }
        }
        println!("coalesced fan-out: part completion at the core -> last of N responses through the cache (ms):");
        let mut requests: Vec<(usize, &str, Vec<usize>)> = vec![];
        for &n in &fanouts {
            for p in &peers {
                let from = core_log_synced(core_log, origin).await;
                let (last, errors, targets) = fanout(p.addr, origin, n, rounds).await;
                println!(
                    "  N={n:<6} {:<13} p50 {:>7.1}  p99 {:>7.1}  max {:>7.1}  ({} parts, {errors} errors)",
                    p.name,
                    pct(&last, 0.5),
                    pct(&last, 0.99),
                    pct(&last, 1.0),
                    last.len()
                );
                let to = core_log_synced(core_log, origin).await;
                let counts = origin_requests(&core_log.logs()[from..to], &targets);
                println!(
                    "  N={n:<6} {:<13} core requests per part: {}",
                    p.name,
                    describe(&counts)
                );
                requests.push((n, p.name, counts));
            }
        }
        if !requests.is_empty() {
            // As a Markdown table, for docs/benchmarks.md.
            println!(
                "core requests per fanned-out part (the core's access log, warm-ups included):"
            );
            let head: String = fanouts.iter().map(|n| format!(" N={n} |")).collect();
            println!("| cache |{head}");
            println!("| --- |{}", " --- |".repeat(fanouts.len()));
            for p in &peers {
                let cells: String = fanouts
                    .iter()
                    .map(|&n| {
                        let r = requests.iter().find(|r| r.0 == n && r.1 == p.name);
                        format!(" {} |", r.map(|r| describe(&r.2)).unwrap_or_default())
                    })
                    .collect();
                println!("| {} |{cells}", p.name);
            }
        }
    });
    let _ = ff.kill();
    let _ = ff.wait();
    for mut c in children_procs {
        let _ = c.kill();
        let _ = c.wait();
    }
    drop(core);
    drop(edge);
}
