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
    common::arg(name, &default.to_string())
        .parse()
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

/// A free loopback TCP port (nginx cannot bind port 0 and report it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One nginx-rtmp instance (master + 1 worker) in its own prefix directory.
struct Nginx {
    child: std::process::Child,
    prefix: PathBuf,
}

impl Nginx {
    fn start(dir: &Path, name: &str, port: u16, push: Option<u16>) -> Nginx {
        let prefix = dir.join(name);
        std::fs::create_dir_all(prefix.join("logs")).unwrap();
        let push = push
            .map(|p| format!("push rtmp://127.0.0.1:{p}/live;"))
            .unwrap_or_default();
        let conf = format!(
            "load_module /usr/lib/nginx/modules/ngx_rtmp_module.so;\n\
             daemon off; master_process on; worker_processes 1;\n\
             error_log logs/error.log warn; pid logs/nginx.pid;\n\
             events {{ worker_connections 4096; }}\n\
             rtmp {{ server {{ listen 127.0.0.1:{port}; chunk_size 4096;\n\
             application live {{ live on; {push} }} }} }}\n"
        );
        std::fs::write(prefix.join("nginx.conf"), conf).unwrap();
        let child = Command::new("/usr/sbin/nginx")
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(prefix.join("nginx.conf"))
            .spawn()
            .expect("nginx (apt-get install libnginx-mod-rtmp)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx { child, prefix }
    }

    /// CPU seconds of the master and its workers.
    fn cpu_seconds(&self) -> f64 {
        let pid = self.child.id();
        let mut pids = vec![pid];
        if let Ok(c) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
            pids.extend(c.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
        pids.iter()
            .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
            .map(|stat| {
                let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
                    .split_whitespace()
                    .collect();
                (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
            })
            .sum()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // A graceful stop takes the workers down with the master (SIGKILL would orphan them).
        let _ = Command::new("/usr/sbin/nginx")
            .arg("-p")
            .arg(&self.prefix)
            .arg("-c")
            .arg(self.prefix.join("nginx.conf"))
            .args(["-s", "stop"])
            .status();
        let _ = self.child.wait();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The same publishers against nginx-rtmp: an edge nginx that `push`es every stream to a core
/// nginx. Returns (edge CPU s, core CPU s, RTMP bytes sent).
fn nginx_peer(n: usize, secs: u64, tags: &Arc<Vec<(u8, u32, Vec<u8>)>>) -> (f64, f64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let core_port = free_port();
    let edge_port = free_port();
    let core = Nginx::start(dir.path(), "core", core_port, None);
    let edge = Nginx::start(dir.path(), "edge", edge_port, Some(core_port));
    let rtmp: SocketAddr = format!("127.0.0.1:{edge_port}").parse().unwrap();
    let (e0, c0) = (edge.cpu_seconds(), core.cpu_seconds());
    let sent = run_publishers(rtmp, n, tags, secs);
    // nginx relays as it receives; give the push a moment to drain, then read the counters.
    std::thread::sleep(Duration::from_millis(500));
    (edge.cpu_seconds() - e0, core.cpu_seconds() - c0, sent)
}

/// Runs `n` publishers (keys key-0..) against `rtmp` for `secs`; returns the RTMP bytes sent.
fn run_publishers(
    rtmp: SocketAddr,
    n: usize,
    tags: &Arc<Vec<(u8, u32, Vec<u8>)>>,
    secs: u64,
) -> u64 {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let tasks: Vec<_> = (0..n)
            .map(|i| tokio::spawn(publish(rtmp, format!("key-{i}"), tags.clone(), secs)))
            .collect();
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        total
    })
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
    let sent = run_publishers(rtmp, n, &tags, secs);
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
    let ingest_gbit = sent as f64 * 8.0 / 1e9;
    println!(
        "  per ingested Gbit (RTMP bytes sent by the publishers): {:.2} CPU s",
        (ecpu + ccpu) / ingest_gbit
    );
    println!(
        "| {n} | {secs} | {:.2} | {:.2} | {:.2} | {:.2} | {p50:.2} | {p99:.2} | {late} | {skipped} |",
        gbit, ecpu / gbit, ccpu / gbit, (ecpu + ccpu) / gbit
    );
    if std::env::args().any(|a| a == "--peer-nginx") {
        drop(edge);
        drop(core);
        let (pe, pc, psent) = nginx_peer(n, secs, &tags);
        let pg = psent as f64 * 8.0 / 1e9;
        println!(
            "  peer nginx-rtmp (edge push to core, RTMP/TCP): edge {pe:.2} s, core {pc:.2} s -> {:.2} CPU s per ingested Gbit; livepop / nginx = {:.2}",
            (pe + pc) / pg,
            ((ecpu + ccpu) / ingest_gbit) / ((pe + pc) / pg)
        );
    }
}
