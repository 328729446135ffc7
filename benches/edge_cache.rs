//! Edge cache benchmark (issue 4): livepop's edge against nginx (proxy_cache + proxy_cache_lock)
//! and Varnish, each a cache in front of the same core origin, in one run, driven by the same
//! client code at the same concurrency.
//!
//! 1. Cached-hit throughput: `--conns` keep-alive HTTP/1.1 connections fetch one cached object
//!    as fast as they can for `--secs` seconds: a part (~20 KB) and a media playlist (~1.5 KB).
//! 2. Coalesced fan-out: N clients (each `--fanout` value) are blocked on the next part with
//!    `_HLS_msn`/`_HLS_part` through the cache; for each of `--parts` parts, the time from the
//!    part's completion at the core (`livepop-changed-us`, passed through by every cache) to the
//!    last of the N responses.
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
use common::{arg, preload_hint as hint};
use peers::{cpu_of, publish_test_stream, servers};

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
/// `n` responses.
async fn fanout(
    addr: SocketAddr,
    origin: SocketAddr,
    n: usize,
    rounds: usize,
) -> (Vec<f64>, usize) {
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
                let path = format!("/live/demo/src/index.m3u8?_HLS_msn={m}&_HLS_part={p}");
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
    for round in 0..rounds + 2 {
        // Ask for the part after the hinted one, so that every client is surely waiting.
        let pl = fetch_text(origin, "/live/demo/src/index.m3u8").await;
        let (m, p) = hint(&pl).expect("hint");
        target_tx.send(Some((m, p + 1))).unwrap();
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
    (last, errors)
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
    let (core, edge, origin) =
        peers::core_and_edge(&env, "window_segments = 3\npart_target_ms = 333");
    let rtmp = edge.addr("rtmp");
    let edge_http = edge.addr("http");
    let mut ff = publish_test_stream(&format!("rtmp://{rtmp}/live/demo-key"), 450);
    let (peers, children_procs) = servers(env.path(), edge.pid(), edge_http, origin, with_peers);

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
        for &n in &fanouts {
            for p in &peers {
                let (last, errors) = fanout(p.addr, origin, n, rounds).await;
                println!(
                    "  N={n:<6} {:<13} p50 {:>7.1}  p99 {:>7.1}  max {:>7.1}  ({} parts, {errors} errors)",
                    p.name,
                    pct(&last, 0.5),
                    pct(&last, 0.99),
                    pct(&last, 1.0),
                    last.len()
                );
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
