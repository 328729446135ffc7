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
