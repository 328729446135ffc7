//! Relay benchmark (issue 2): N RTMP publishers at ~4 Mbit/s each publish a real H.264/AAC FLV
//! in real time to a `livepop edge` process, which relays over QUIC to a `livepop core` process,
//! all on loopback. Reports CPU seconds (edge, core) per relayed Gbit, and p50/p99 of the delay
//! from a frame's arrival at the edge to its arrival at the core (from the core's
//! `livepop_relay_delay_seconds` histogram, interpolated like Prometheus' histogram_quantile).
//!
//! Run: `bash bench/relay.sh` (or `cargo bench --bench relay -- --publishers 10 --secs 30`).

use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
use rml_rtmp::sessions::{
    ClientSession, ClientSessionConfig, ClientSessionEvent, ClientSessionResult, PublishRequestType,
};
use rml_rtmp::time::RtmpTimestamp;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[path = "../tests/common/mod.rs"]
mod common;
use common::Proc;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    common::http_get(addr, path)
        .map(|r| r.1)
        .unwrap_or_default()
}

fn sample(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            (k == name).then(|| v.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// histogram_quantile over the cumulative buckets of `metric{track=...}`, all tracks summed.
fn quantile(body: &str, metric: &str, q: f64) -> f64 {
    let mut buckets: Vec<(f64, f64)> = vec![];
    for l in body
        .lines()
        .filter(|l| l.starts_with(&format!("{metric}_bucket{{")))
    {
        let le = l.split("le=\"").nth(1).unwrap().split('"').next().unwrap();
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap()
        };
        let v: f64 = l.rsplit_once(' ').unwrap().1.parse().unwrap();
        match buckets.iter_mut().find(|b| b.0 == le) {
            Some(b) => b.1 += v,
            None => buckets.push((le, v)),
        }
    }
    buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, c) in &buckets {
        if c >= rank {
            if le.is_infinite() {
                return prev.0;
            }
            return prev.0 + (le - prev.0) * (rank - prev.1) / (c - prev.1).max(1e-9);
        }
        prev = (le, c);
    }
    prev.0
}

/// A 4 Mbit/s CBR H.264 + 128 kbit/s AAC FLV of `secs` seconds, made once.
fn media(secs: u64) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-media");
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join(format!("cbr4m-{secs}s.flv"));
    if !f.exists() {
        let ok = Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-y"])
            .args(["-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=30"])
            .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"])
            .args(["-t", &secs.to_string(), "-map", "0:v", "-map", "1:a"])
            .args([
                "-c:v", "libx264", "-preset", "veryfast", "-g", "60", "-bf", "0",
            ])
            .args([
                "-b:v", "3870k", "-minrate", "3870k", "-maxrate", "3870k", "-bufsize", "2M",
            ])
            .args([
                "-x264-params",
                "nal-hrd=cbr:filler=1",
                "-c:a",
                "aac",
                "-b:a",
                "128k",
            ])
            .args(["-f", "flv"])
            .arg(&f)
            .status()
            .unwrap();
        assert!(ok.success(), "ffmpeg could not make the benchmark media");
    }
    f
}

async fn send(s: &mut TcpStream, results: Vec<ClientSessionResult>) -> Vec<ClientSessionEvent> {
    let mut ev = vec![];
    for r in results {
        match r {
            ClientSessionResult::OutboundResponse(p) => s.write_all(&p.bytes).await.unwrap(),
            ClientSessionResult::RaisedEvent(e) => ev.push(e),
            _ => {}
        }
    }
    ev
}

/// One publisher: handshake, connect, publish, then the tags at real-time pace for `secs`.
async fn publish(
    addr: SocketAddr,
    key: String,
    tags: Arc<Vec<(u8, u32, Vec<u8>)>>,
    secs: u64,
) -> u64 {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let mut hs = Handshake::new(PeerType::Client);
    s.write_all(&hs.generate_outbound_p0_and_p1().unwrap())
        .await
        .unwrap();
    let mut buf = vec![0u8; 16384];
    let mut leftover;
    loop {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0);
        match hs.process_bytes(&buf[..n]).unwrap() {
            HandshakeProcessResult::InProgress { response_bytes } => {
                s.write_all(&response_bytes).await.unwrap()
            }
            HandshakeProcessResult::Completed {
                response_bytes,
                remaining_bytes,
            } => {
                s.write_all(&response_bytes).await.unwrap();
                leftover = remaining_bytes;
                break;
            }
        }
    }
    let (mut session, init) = ClientSession::new(ClientSessionConfig::new()).unwrap();
    send(&mut s, init).await;
    let r = session.request_connection("live".into()).unwrap();
    send(&mut s, vec![r]).await;
    let mut connected = false;
    'outer: loop {
        let results = session.handle_input(&leftover).unwrap();
        leftover.clear();
        for e in send(&mut s, results).await {
            match e {
                ClientSessionEvent::ConnectionRequestAccepted if !connected => {
                    connected = true;
                    let r = session
                        .request_publishing(key.clone(), PublishRequestType::Live)
                        .unwrap();
                    send(&mut s, vec![r]).await;
                }
                ClientSessionEvent::PublishRequestAccepted => break 'outer,
                _ => {}
            }
        }
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "edge closed the connection");
        leftover.extend_from_slice(&buf[..n]);
    }
    // Drain what the edge sends (acks) so its writes never block.
    let (mut rd, mut wr) = s.into_split();
    tokio::spawn(async move {
        let mut b = vec![0u8; 4096];
        while matches!(rd.read(&mut b).await, Ok(n) if n > 0) {}
    });
    let start = tokio::time::Instant::now();
    let mut sent = 0u64;
    for (kind, ts, body) in tags.iter() {
        if u64::from(*ts) >= secs * 1000 {
            break;
        }
        tokio::time::sleep_until(start + Duration::from_millis(u64::from(*ts))).await;
        let r = if *kind == 9 {
            session.publish_video_data(body.clone().into(), RtmpTimestamp::new(*ts), false)
        } else {
            session.publish_audio_data(body.clone().into(), RtmpTimestamp::new(*ts), false)
        }
        .unwrap();
        if let ClientSessionResult::OutboundResponse(p) = r {
            wr.write_all(&p.bytes).await.unwrap();
            sent += p.bytes.len() as u64;
        }
    }
    sent
}

fn main() {
    let n = arg("--publishers", 10) as usize;
    let secs = arg("--secs", 30);
    let media = media(secs + 2);
    let tags: Arc<Vec<(u8, u32, Vec<u8>)>> = Arc::new(
        common::flv_tags(&media)
            .into_iter()
            .filter(|t| t.0 == 8 || t.0 == 9)
            .collect(),
    );
    let env = common::Env::new();
    let core_cfg = common::core_config(&env, "core-1", "127.0.0.1:0", false);
    let core = Proc::start_quiet("core", &["core", "--config", core_cfg.to_str().unwrap()]);
    let relay = core.addr("relay");
    let core_admin = core.addr("admin");
    let mut opts = common::EdgeOpts::new(vec![("core-1".into(), relay)]);
    opts.extra_auth = (0..n)
        .map(|i| format!("[[auth.streams]]\nname = \"bench-{i}\"\nkey = \"key-{i}\"\n"))
        .collect();
    let edge_cfg = common::edge_config(&env, &opts);
    let edge = Proc::start_quiet("edge", &["edge", "--config", edge_cfg.to_str().unwrap()]);
    let rtmp = edge.addr("rtmp");
    let edge_admin = edge.addr("admin");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !http_get(edge_admin, "/metrics").contains("livepop_relay_core_up{core=\"core-1\"} 1") {
        assert!(
            Instant::now() < deadline,
            "edge never connected to the core"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let (e0, c0) = (edge.cpu_seconds(), core.cpu_seconds());
    let wall = Instant::now();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sent: u64 = rt.block_on(async {
        let mut tasks = vec![];
        for i in 0..n {
            tasks.push(tokio::spawn(publish(
                rtmp,
                format!("key-{i}"),
                tags.clone(),
                secs,
            )));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        total
    });
    // Let the relay deliver what is in flight: wait until the core's byte count settles.
    let mut last = -1.0;
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let b = sample(
            &http_get(core_admin, "/metrics"),
            "livepop_relay_received_bytes_total",
        );
        if b == last {
            break;
        }
        last = b;
    }
    let wall = wall.elapsed().as_secs_f64();
    let (e1, c1) = (edge.cpu_seconds(), core.cpu_seconds());
    let body = http_get(core_admin, "/metrics");
    let relayed_bytes = sample(&body, "livepop_relay_received_bytes_total");
    let gbit = relayed_bytes * 8.0 / 1e9;
    let p50 = quantile(&body, "livepop_relay_delay_seconds", 0.50) * 1000.0;
    let p99 = quantile(&body, "livepop_relay_delay_seconds", 0.99) * 1000.0;
    let late: f64 = body
        .lines()
        .filter(|l| l.starts_with("livepop_relay_late_frames_total"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>()
        + 0.0;
    let skipped: f64 = http_get(edge_admin, "/metrics")
        .lines()
        .filter(|l| l.starts_with("livepop_relay_groups_skipped_total"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>()
        + 0.0;
    let (ecpu, ccpu) = (e1 - e0, c1 - c0);
    println!("relay benchmark: {n} publishers x {secs} s, wall {wall:.1} s");
    println!(
        "  RTMP bytes sent by publishers: {:.1} MB ({:.2} Mbit/s per publisher)",
        sent as f64 / 1e6,
        sent as f64 * 8.0 / 1e6 / secs as f64 / n as f64
    );
    println!("  relayed payload: {:.3} Gbit", gbit);
    println!("  CPU: edge {ecpu:.2} s, core {ccpu:.2} s -> {:.2} edge + {:.2} core = {:.2} CPU s per relayed Gbit", ecpu / gbit, ccpu / gbit, (ecpu + ccpu) / gbit);
    println!("  edge->core delay: p50 {p50:.2} ms, p99 {p99:.2} ms");
    println!(
        "  peak RSS: edge {:.0} MB, core {:.0} MB; late frames {late}, skipped groups {skipped}",
        edge.memory_mb("VmHWM:"),
        core.memory_mb("VmHWM:")
    );
    println!(
        "| {n} | {secs} | {:.2} | {:.2} | {:.2} | {:.2} | {p50:.2} | {p99:.2} | {late} | {skipped} |",
        gbit, ecpu / gbit, ccpu / gbit, (ecpu + ccpu) / gbit
    );
}
