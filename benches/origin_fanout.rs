//! Origin fan-out benchmark (issue 3): N concurrent blocked playlist requests on one core
//! process. ffmpeg publishes a live stream (edge → QUIC → core); N keep-alive HTTP/1.1 clients
//! all ask for the next part with `_HLS_msn`/`_HLS_part`, are held, and are answered when the
//! part completes. For each part: the time from its completion at the core (the origin's
//! `livepop-changed-us` header) to each client's full response, in particular to the last of
//! the N. Reports p50/p99 over many parts, and the core's RSS before and during.
//!
//! Run: `bash bench/origin.sh` (or `cargo bench --bench origin_fanout -- --clients 10000 --parts 40`).

use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

#[path = "../tests/common/mod.rs"]
mod common;
use common::{arg, preload_hint as hint, Proc};

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// One HTTP/1.1 GET on a kept-alive connection: (status, livepop-changed-us, body).
async fn get(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    path: &str,
) -> std::io::Result<(u16, u64, Vec<u8>)> {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n").as_bytes())
        .await?;
    buf.clear();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut tmp = [0u8; 8192];
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
    let header = |name: &str| -> Option<u64> {
        head.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    let len = header("content-length:").unwrap_or(0) as usize;
    let changed = header("livepop-changed-us:").unwrap_or(0);
    while buf.len() < head_end + len {
        let mut tmp = [0u8; 16384];
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    Ok((status, changed, buf[head_end..head_end + len].to_vec()))
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

fn main() {
    let clients: usize = arg("--clients", "10000").parse().unwrap();
    let rounds: usize = arg("--parts", "40").parse().unwrap();
    let env = common::Env::new();
    let core_cfg = common::core_config_with_origin(&env, "core-1", "");
    let core = Proc::start_quiet("core", &["core", "--config", core_cfg.to_str().unwrap()]);
    let relay = core.addr("relay");
    let origin = core.addr("origin");
    let edge_cfg =
        common::edge_config(&env, &common::EdgeOpts::new(vec![("core-1".into(), relay)]));
    let edge = Proc::start_quiet("edge", &["edge", "--config", edge_cfg.to_str().unwrap()]);
    let rtmp = edge.addr("rtmp");
    let secs = rounds as u64 / 4 + 40;
    let mut ff = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-re"])
        .args([
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=640x360:rate=30",
            "-f",
            "lavfi",
            "-i",
            "sine",
        ])
        .args(["-t", &secs.to_string(), "-map", "0:v", "-map", "1:a"])
        .args([
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-tune",
            "zerolatency",
            "-g",
            "60",
            "-c:a",
            "aac",
        ])
        .args(["-f", "flv", &format!("rtmp://{rtmp}/live/demo-key")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ffmpeg");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        // Wait for the stream.
        let mut s = loop {
            if let Ok(mut s) = TcpStream::connect(origin).await {
                let mut b = vec![];
                if let Ok((200, _, _)) = get(&mut s, &mut b, "/live/demo/master.m3u8").await {
                    break s;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut b = vec![];
        let rss_before = core.memory_mb("VmRSS:");
        // Open the clients, ramped so the listen backlog never overflows.
        let (target_tx, target_rx) = watch::channel::<Option<(u64, u64)>>(None);
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(u64, u64, u64, u64)>();
        let mut conns = Vec::with_capacity(clients);
        for i in 0..clients {
            let c = TcpStream::connect(origin).await.expect("connect");
            c.set_nodelay(true).unwrap();
            conns.push(c);
            if i % 500 == 499 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        for mut c in conns {
            let mut rx = target_rx.clone();
            let tx = done_tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::with_capacity(8192);
                loop {
                    if rx.changed().await.is_err() {
                        return;
                    }
                    let Some((m, p)) = *rx.borrow_and_update() else { return };
                    let path = format!("/live/demo/src/index.m3u8?_HLS_msn={m}&_HLS_part={p}");
                    match get(&mut c, &mut buf, &path).await {
                        Ok((200, changed, _)) => {
                            let _ = tx.send((m, p, changed, now_us()));
                        }
                        _ => {
                            let _ = tx.send((m, p, 0, 0));
                        }
                    }
                }
            });
        }
        let cpu0 = core.cpu_seconds();
        let mut last_of_n = vec![];
        let mut all = vec![];
        let mut rss_during: f64 = 0.0;
        let mut errors = 0;
        let (_, _, pl) = get(&mut s, &mut b, "/live/demo/src/index.m3u8").await.unwrap();
        let (mut m, mut p) = hint(&String::from_utf8_lossy(&pl)).unwrap();
        for round in 0..rounds + 2 {
            target_tx.send(Some((m, p))).unwrap();
            // Sample memory while everyone is held.
            tokio::time::sleep(Duration::from_millis(50)).await;
            rss_during = rss_during.max(core.memory_mb("VmRSS:"));
            let mut got = 0;
            let mut latest = 0u64;
            // The part's completion: the earliest change any response was released by (later
            // responses may carry a later change, rendered after another update).
            let mut completed = u64::MAX;
            let mut arrivals = Vec::with_capacity(clients);
            while got < clients {
                let (_, _, changed, at) = done_rx.recv().await.unwrap();
                got += 1;
                if at == 0 {
                    errors += 1;
                    continue;
                }
                completed = completed.min(changed);
                latest = latest.max(at);
                arrivals.push(at);
            }
            // The first two rounds warm up (connections, first responses).
            if round >= 2 && completed != u64::MAX {
                last_of_n.push(latest.saturating_sub(completed) as f64 / 1000.0);
                all.extend(arrivals.iter().map(|a| a.saturating_sub(completed) as f64 / 1000.0));
            }
            // Next: the part the playlist now hints.
            let (_, _, pl) = get(&mut s, &mut b, "/live/demo/src/index.m3u8").await.unwrap();
            (m, p) = hint(&String::from_utf8_lossy(&pl)).unwrap();
        }
        let cpu = core.cpu_seconds() - cpu0;
        target_tx.send(None).unwrap();
        println!("origin fan-out: {clients} blocked clients, {rounds} parts (0.2 s parts, HTTP/1.1 keep-alive)");
        println!("  core RSS: {rss_before:.0} MB before, {rss_during:.0} MB during");
        println!(
            "  part completion -> last of {clients} responses: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            pct(&mut last_of_n.clone(), 0.5),
            pct(&mut last_of_n.clone(), 0.99),
            pct(&mut last_of_n, 1.0)
        );
        println!(
            "  part completion -> each response: p50 {:.1} ms, p99 {:.1} ms ({} responses, {errors} errors)",
            pct(&mut all.clone(), 0.5),
            pct(&mut all.clone(), 0.99),
            all.len()
        );
        println!("  core CPU during the rounds: {cpu:.1} s");
    });
    let _ = ff.kill();
    let _ = ff.wait();
}
