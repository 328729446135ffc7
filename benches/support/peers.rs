//! Peers for benchmarks: nginx and Varnish set up as caching proxies in front of a livepop
//! core's origin, as an operator would (cache lock on, the LL-HLS directives in the key), and
//! CPU sampling of process trees. Shared by the edge_cache and viewers benches (each uses a
//! part).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// CPU seconds (user + system) of the processes `pids`.
pub fn cpu_of(pids: &[u32]) -> f64 {
    let tck = 100.0;
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .map(|s| {
            let f: Vec<&str> = s
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect();
            let u: f64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0.0);
            let k: f64 = f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0.0);
            (u + k) / tck
        })
        .sum()
}

/// `pid` and all its descendants.
pub fn children(pid: u32) -> Vec<u32> {
    let mut v = vec![pid];
    if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        for c in s.split_whitespace().filter_map(|x| x.parse::<u32>().ok()) {
            v.extend(children(c));
        }
    }
    v
}

/// A free loopback port (for servers that cannot report the port they bound).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// nginx (2 workers) caching `origin` with proxy_cache_lock; its listen address.
pub fn start_nginx(dir: &Path, origin: SocketAddr) -> (Child, SocketAddr) {
    let port = free_port();
    std::fs::create_dir_all(dir.join("nginx/cache")).unwrap();
    let conf = format!(
        r#"daemon off;
master_process on;
worker_processes 2;
worker_rlimit_nofile 65536;
error_log {d}/nginx/error.log warn;
pid {d}/nginx/nginx.pid;
user root;
events {{ worker_connections 30000; }}
http {{
  access_log off;
  client_body_temp_path {d}/nginx/body;
  proxy_temp_path {d}/nginx/proxy;
  fastcgi_temp_path {d}/nginx/fastcgi;
  uwsgi_temp_path {d}/nginx/uwsgi;
  scgi_temp_path {d}/nginx/scgi;
  keepalive_requests 1000000;
  proxy_cache_path {d}/nginx/cache levels=1:2 keys_zone=hls:64m max_size=1g inactive=60s use_temp_path=off;
  upstream origin {{ server {origin}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{port} backlog=16384;
    location /live/ {{
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache hls;
      proxy_cache_key "$uri?$arg__HLS_msn&$arg__HLS_part&$arg__HLS_skip";
      proxy_cache_lock on;
      proxy_cache_lock_timeout 10s;
      proxy_cache_lock_age 10s;
      proxy_read_timeout 10s;
    }}
  }}
}}
"#,
        d = dir.display()
    );
    let path = dir.join("nginx/nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let child = Command::new("nginx")
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("nginx (install it, or run bench/edge.sh)");
    (child, format!("127.0.0.1:{port}").parse().unwrap())
}

/// Varnish caching `origin` (request coalescing is built in); its listen address.
pub fn start_varnish(dir: &Path, origin: SocketAddr) -> (Child, SocketAddr) {
    let port = free_port();
    let vdir = dir.join("varnish");
    std::fs::create_dir_all(&vdir).unwrap();
    let vcl = vdir.join("edge.vcl");
    // The URL with its query sorted is the key (the benchmark sends no other parameters).
    std::fs::write(
        &vcl,
        format!(
            r#"vcl 4.1;
import std;
backend origin {{ .host = "{}"; .port = "{}"; .first_byte_timeout = 10s; }}
sub vcl_recv {{
  set req.url = std.querysort(req.url);
}}
"#,
            origin.ip(),
            origin.port()
        ),
    )
    .unwrap();
    let child = Command::new("varnishd")
        .args(["-F", "-a", &format!("127.0.0.1:{port}"), "-f"])
        .arg(&vcl)
        .args(["-s", "malloc,512m", "-n"])
        .arg(&vdir)
        .args(["-p", "thread_pool_max=5000", "-p", "thread_pools=2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("varnishd (install varnish, or run bench/edge.sh)");
    (child, format!("127.0.0.1:{port}").parse().unwrap())
}

/// CPU seconds of one process, readable until it is reaped.
pub fn cpu_of_pid(pid: u32) -> Option<f64> {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .map(|_| cpu_of(&[pid]))
}

/// A server under test: a name for the report, where viewers connect, its processes for CPU.
pub struct Server {
    /// Name in the report.
    pub name: &'static str,
    /// HTTP address.
    pub addr: SocketAddr,
    /// Its processes now (multi-process servers: the master and its children).
    pub pids: Box<dyn Fn() -> Vec<u32>>,
}

/// The livepop edge (process `edge_pid` at `edge_http`) and, with `with_peers`, nginx and
/// Varnish caching `origin`; the peers' processes are returned to be killed at the end.
pub fn servers(
    dir: &Path,
    edge_pid: u32,
    edge_http: SocketAddr,
    origin: SocketAddr,
    with_peers: bool,
) -> (Vec<Server>, Vec<Child>) {
    let mut servers = vec![Server {
        name: "livepop edge",
        addr: edge_http,
        pids: Box::new(move || vec![edge_pid]),
    }];
    let mut procs = vec![];
    if with_peers {
        type Start = fn(&Path, SocketAddr) -> (Child, SocketAddr);
        for (name, start) in [
            ("nginx", start_nginx as Start),
            ("varnish", start_varnish as Start),
        ] {
            let (c, addr) = start(dir, origin);
            let pid = c.id();
            procs.push(c);
            servers.push(Server {
                name,
                addr,
                pids: Box::new(move || children(pid)),
            });
        }
    }
    (servers, procs)
}

/// ffmpeg publishing a 640×360 30 fps test pattern at `video_kbps` (2 s GOP, zerolatency) with
/// AAC to `url`, until killed.
pub fn publish_test_stream(url: &str, video_kbps: u32) -> Child {
    let rate = format!("{video_kbps}k");
    Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-re"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=640x360:rate=30"])
        .args(["-f", "lavfi", "-i", "sine"])
        .args(["-t", "7200", "-map", "0:v", "-map", "1:a"])
        .args([
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-tune",
            "zerolatency",
        ])
        .args(["-b:v", &rate, "-maxrate", &rate, "-bufsize", &rate])
        .args(["-g", "60", "-c:a", "aac", "-b:a", "64k"])
        .args(["-f", "flv", url])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ffmpeg")
}

/// A core with an LL-HLS origin (`origin_extra` goes into [origin]) and an edge in front of it,
/// both quiet; returns them and the origin's address.
pub fn core_and_edge(
    env: &crate::common::Env,
    origin_extra: &str,
) -> (crate::common::Proc, crate::common::Proc, SocketAddr) {
    use crate::common::{self, Proc};
    let core_cfg = common::core_config_with_origin(env, "core-1", origin_extra);
    let core = Proc::start_quiet("core", &["core", "--config", core_cfg.to_str().unwrap()]);
    let (relay, origin) = (core.addr("relay"), core.addr("origin"));
    let mut opts = common::EdgeOpts::new(vec![("core-1".into(), relay)]);
    opts.origins = vec![origin];
    let edge_cfg = common::edge_config(env, &opts);
    let edge = Proc::start_quiet("edge", &["edge", "--config", edge_cfg.to_str().unwrap()]);
    (core, edge, origin)
}
