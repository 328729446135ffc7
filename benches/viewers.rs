//! How many LL-HLS viewers one `livepop edge` holds on this machine (issue 7), against nginx
//! and Varnish in front of the same core, measured with `livepop-loadtest viewers`.
//!
//! Setup: a core (LL-HLS origin, 200 ms parts, 2 s segments, no ladder) and an edge; ffmpeg
//! publishes a 640×360 30 fps test pattern at 800 kbit/s (+ AAC) through the edge's RTMP ingest.
//! nginx (2 workers, proxy_cache_lock) and Varnish (built-in coalescing) cache the same core.
//! For each server: N viewers join over `--ramp` s and play for `--secs` s more (LL-HLS,
//! HTTP/1.1, highest rendition); a run passes when, after the ramp and 5 s, the p99 part
//! latency (last byte − PROGRAM-DATE-TIME of its first sample) is under 1 s, no viewer stalled
//! and no request failed. N doubles from `--start` until a run fails, then one bisection step.
//! Reported per run: p50/p99 latency, stalls, errors, and the CPU of the server (all its
//! processes) and of the load generator, in % of one core. Both share this machine's 2 cores.
//!
//! Run: `bash bench/viewers.sh` (builds livepop-loadtest first).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/peers.rs"]
mod peers;
use common::{arg, loadtest_bin};
use peers::{cpu_of, cpu_of_pid, servers, Server};

struct RunResult {
    n: usize,
    ok: bool,
    p50: f64,
    p99: f64,
    stalls: u64,
    errors: u64,
    requests: u64,
    server_cpu: f64,
    client_cpu: f64,
}

fn run(s: &Server, n: usize, ramp: u64, secs: u64, dir: &Path) -> RunResult {
    let out = dir.join(format!("{}-{n}.json", s.name.replace(' ', "-")));
    let cpu0 = cpu_of(&(s.pids)());
    let started = Instant::now();
    let mut child = Command::new(loadtest_bin())
        .args(["viewers", "--quiet", "--rendition", "highest"])
        .args(["--url", &format!("http://{}/live/demo/master.m3u8", s.addr)])
        .args(["--count", &n.to_string(), "--ramp", &ramp.to_string()])
        .args(["--duration", &(ramp + secs).to_string()])
        .args(["--warmup", &(ramp + 5).to_string()])
        .arg("--json")
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("livepop-loadtest");
    let pid = child.id();
    let mut client_cpu = 0.0;
    let status = loop {
        if let Some(c) = cpu_of_pid(pid) {
            client_cpu = c;
        }
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        // Sampling the client's CPU while it runs; this paces the poll, it synchronizes nothing.
        std::thread::sleep(Duration::from_millis(200));
    };
    let wall = started.elapsed().as_secs_f64();
    let server_cpu = (cpu_of(&(s.pids)()) - cpu0) / wall * 100.0;
    assert!(
        status.success(),
        "livepop-loadtest failed against {}",
        s.name
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let p = |k: &str| r["latency"][k].as_f64().unwrap_or(f64::INFINITY);
    let (p50, p99) = (p("p50_ms"), p("p99_ms"));
    let stalls = r["stalls"].as_u64().unwrap_or(0);
    let errors = r["errors"].as_u64().unwrap_or(0);
    RunResult {
        n,
        ok: p99 < 1000.0 && stalls == 0 && errors == 0,
        p50,
        p99,
        stalls,
        errors,
        requests: r["requests"].as_u64().unwrap_or(0),
        server_cpu,
        client_cpu: client_cpu / wall * 100.0,
    }
}

fn line(s: &str, r: &RunResult) -> String {
    format!(
        "{s:<13} N={:<6} {} latency p50 {:>6.0} ms p99 {:>6.0} ms, stalls {:<5} errors {:<6} requests {:<8} CPU server {:>4.0}% load generator {:>4.0}%",
        r.n,
        if r.ok { "pass" } else { "FAIL" },
        r.p50,
        r.p99,
        r.stalls,
        r.errors,
        r.requests,
        r.server_cpu,
        r.client_cpu
    )
}

fn main() {
    let start: usize = arg("--start", "250").parse().unwrap();
    let max: usize = arg("--max", "8000").parse().unwrap();
    let ramp: u64 = arg("--ramp", "10").parse().unwrap();
    let secs: u64 = arg("--secs", "30").parse().unwrap();
    let with_peers = arg("--peers", "yes") == "yes";
    loadtest_bin();

    let env = common::Env::new();
    let (_core, edge, origin) = peers::core_and_edge(&env, "");
    let rtmp = edge.addr("rtmp");
    let mut ff = peers::publish_test_stream(&format!("rtmp://{rtmp}/live/demo-key"), 800);
    let edge_http = edge.addr("http");
    common::wait_for("the stream on the edge", Duration::from_secs(30), || {
        let (st, _) = common::http_get(edge_http, "/live/demo/master.m3u8")?;
        (st == 200).then_some(())
    });

    let (servers, procs) = servers(env.path(), edge.pid(), edge_http, origin, with_peers);
    for s in &servers {
        common::wait_for(s.name, Duration::from_secs(30), || {
            let (st, _) = common::http_get(s.addr, "/live/demo/master.m3u8")?;
            (st == 200).then_some(())
        });
    }

    println!(
        "LL-HLS viewers per server: ramp {ramp} s + {secs} s, pass = p99 latency < 1 s, no stall, no error (after ramp + 5 s)"
    );
    let mut best = vec![];
    for s in &servers {
        let mut n = start;
        let mut pass: Option<RunResult> = None;
        let mut fail: Option<usize> = None;
        while n <= max {
            let r = run(s, n, ramp, secs, env.path());
            println!("{}", line(s.name, &r));
            if r.ok {
                pass = Some(r);
                n *= 2;
            } else {
                fail = Some(n);
                break;
            }
        }
        if let (Some(p), Some(f)) = (&pass, fail) {
            let mid = (p.n + f) / 2;
            let r = run(s, mid, ramp, secs, env.path());
            println!("{}", line(s.name, &r));
            if r.ok {
                pass = Some(r);
            }
        }
        best.push((s.name, pass));
    }
    println!("\nmost viewers held (p99 latency < 1 s, no stall, no error):");
    for (name, r) in &best {
        match r {
            Some(r) => println!("{}", line(name, r)),
            None => println!("{name:<13} none passed (N={start} failed)"),
        }
    }
    let _ = ff.kill();
    let _ = ff.wait();
    for mut p in procs {
        let _ = p.kill();
        let _ = p.wait();
    }
}
