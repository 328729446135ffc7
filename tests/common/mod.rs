//! Test harness: real `livepop` processes on port 0, real ffmpeg publishers, log and metric
//! polling with deadlines (never sleeps as synchronization).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub mod impair;
pub mod relay_path;

pub const BIN: &str = env!("CARGO_BIN_EXE_livepop");

/// The value of `--name` on the command line (benchmarks), or `default`.
pub fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

/// (msn, part) of the part an LL-HLS playlist's EXT-X-PRELOAD-HINT names.
pub fn preload_hint(pl: &str) -> Option<(u64, u64)> {
    let uri = pl
        .lines()
        .find_map(|l| l.strip_prefix("#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\""))?
        .trim_end_matches('"');
    let (m, p) = uri
        .trim_start_matches('s')
        .trim_end_matches(".m4s")
        .split_once('.')?;
    Some((m.parse().ok()?, p.parse().ok()?))
}

/// Like `preload_hint`, for tests: the playlist must have one.
pub fn hint(pl: &str) -> (u64, u64) {
    preload_hint(pl).unwrap_or_else(|| panic!("no preload hint in\n{pl}"))
}

/// (EXTINF duration, URI) of each complete segment of a media playlist.
pub fn complete_segments(pl: &str) -> Vec<(f64, String)> {
    let lines: Vec<&str> = pl.lines().collect();
    lines
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let d = l
                .strip_prefix("#EXTINF:")?
                .trim_end_matches(',')
                .parse()
                .ok()?;
            Some((d, lines.get(i + 1)?.to_string()))
        })
        .collect()
}

/// A numeric header of a response head (`name` in lower case, e.g. "livepop-changed-us").
pub fn header_num(head: &str, name: &str) -> Option<u64> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().parse().ok())
            .flatten()
    })
}

/// Polls `f` until it returns Some or the deadline passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A test directory with development certificates.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new(BIN)
            .args(["dev-certs"])
            .arg(dir.path().join("certs"))
            // A second edge identity (node-edge-2.pem), for tests with two edges.
            .args(["--edge", "edge-2"])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success());
        Env { dir }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }
    /// Writes a file into the test directory.
    pub fn write(&self, name: &str, body: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p
    }
}

/// A running livepop process whose JSON log lines are collected.
pub struct Proc {
    pub name: String,
    child: Child,
    lines: Arc<(Mutex<Vec<serde_json::Value>>, Condvar)>,
}

impl Proc {
    pub fn start(name: &str, args: &[&str]) -> Self {
        Self::spawn(name, args, true, "info")
    }

    /// For benchmarks: warnings only, nothing echoed.
    pub fn start_quiet(name: &str, args: &[&str]) -> Self {
        Self::spawn(name, args, false, "warn,livepop=info")
    }

    /// With a RUST_LOG filter of the test's choosing (not echoed).
    pub fn start_logging(name: &str, args: &[&str], filter: &str) -> Self {
        Self::spawn(name, args, false, filter)
    }

    fn spawn(name: &str, args: &[&str], echo: bool, filter: &str) -> Self {
        let mut child = Command::new(BIN)
            .arg("--log-json")
            .args(args)
            .env("RUST_LOG", filter)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines: Arc<(Mutex<Vec<serde_json::Value>>, Condvar)> = Arc::default();
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let lines = lines.clone();
            let name = name.to_string();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if echo {
                        eprintln!("[{name}] {line}");
                    }
                    let v = serde_json::from_str(&line)
                        .unwrap_or_else(|_| serde_json::json!({ "raw": line }));
                    lines.0.lock().unwrap().push(v);
                    lines.1.notify_all();
                }
            });
        }
        Proc {
            name: name.to_string(),
            child,
            lines,
        }
    }

    /// Waits for a log line matching `pred`.
    pub fn wait_log(
        &self,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        let mut g = self.lines.0.lock().unwrap();
        loop {
            if let Some(v) = g.iter().find(|v| pred(v)) {
                return v.clone();
            }
            let now = Instant::now();
            if now > deadline {
                panic!("{}: no matching log line within {timeout:?}", self.name);
            }
            g = self.lines.1.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<serde_json::Value> {
        self.lines.0.lock().unwrap().clone()
    }

    /// The messages of all log lines so far, with their fields, as text.
    pub fn log_text(&self) -> String {
        self.logs()
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The address a listener bound (from the "... listening" log line).
    pub fn addr(&self, listener: &str) -> SocketAddr {
        let v = self.wait_log(Duration::from_secs(20), |v| {
            v["fields"]["listener"] == listener
        });
        v["fields"]["addr"].as_str().unwrap().parse().unwrap()
    }

    /// The process id.
    #[allow(dead_code)]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// User + system CPU seconds so far (/proc, USER_HZ = 100).
    pub fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
            .split_whitespace()
            .collect();
        (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
    }

    /// A memory figure of /proc/PID/status (e.g. "VmRSS:", "VmHWM:") in MB.
    pub fn memory_mb(&self, key: &str) -> f64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        s.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn field<'a>(v: &'a serde_json::Value, k: &str) -> &'a serde_json::Value {
    &v["fields"][k]
}

pub fn message_is(v: &serde_json::Value, m: &str) -> bool {
    v["fields"]["message"]
        .as_str()
        .is_some_and(|s| s.contains(m))
}

/// A plain HTTP/1.0 GET; returns (status, headers, body bytes).
pub fn http_get_full(addr: SocketAddr, path: &str) -> Option<(u16, String, Vec<u8>)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut resp = vec![];
    s.read_to_end(&mut resp).ok()?;
    let split = resp.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&resp[..split]).to_string();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, head, resp[split + 4..].to_vec()))
}

/// A plain HTTP/1.0 GET; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status = resp.split_whitespace().nth(1)?.parse().ok()?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    Some((status, body))
}

/// One Prometheus sample, `name` or `name{labels}` exactly as rendered (the prometheus crate
/// sorts labels by name), or None when the process exports no such sample. Panics when
/// /metrics does not answer.
pub fn metric_opt(addr: SocketAddr, sample: &str) -> Option<f64> {
    let body = metrics_text(addr);
    body.lines().find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == sample).then(|| v.parse().ok()).flatten()
    })
}

fn metrics_text(addr: SocketAddr) -> String {
    match http_get(addr, "/metrics") {
        Some((200, body)) => body,
        other => panic!("GET http://{addr}/metrics: {other:?}"),
    }
}

/// The value of a sample that must exist: an absent one fails (a renamed metric or label
/// must not read as 0). Where absence is legitimate, say so with `metric_or_zero`.
pub fn metric(addr: SocketAddr, sample: &str) -> f64 {
    metric_opt(addr, sample).unwrap_or_else(|| {
        let family = sample.split('{').next().unwrap_or(sample);
        let near: Vec<String> = metrics_text(addr)
            .lines()
            .filter(|l| l.starts_with(family))
            .map(String::from)
            .collect();
        panic!("metric sample `{sample}` is absent from http://{addr}/metrics; {family}: {near:?}")
    })
}

/// Where every metric livepop exports is declared.
const TELEMETRY: &str = include_str!("../../src/telemetry.rs");

/// A sample of a labelled family that may legitimately not exist yet: the prometheus crate
/// shows a label set only from its first use, so "never happened" is absence, read as 0 here.
/// The family must be one src/telemetry.rs declares (absence would hide a misspelt name) and
/// the labels must be rendered as the crate does (sorted by name).
pub fn metric_or_zero(addr: SocketAddr, sample: &str) -> f64 {
    let family = sample.split('{').next().unwrap_or(sample);
    let base = ["_bucket", "_count", "_sum"]
        .iter()
        .find_map(|s| family.strip_suffix(*s))
        .unwrap_or(family);
    assert!(
        TELEMETRY.contains(&format!("\"{family}\"")) || TELEMETRY.contains(&format!("\"{base}\"")),
        "metric `{family}` is declared nowhere in src/telemetry.rs: misspelt?"
    );
    if let Some(labels) = sample
        .split_once('{')
        .and_then(|(_, l)| l.strip_suffix('}'))
    {
        let names: Vec<&str> = labels
            .split(',')
            .map(|kv| kv.split('=').next().unwrap_or(""))
            .collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(
            names, sorted,
            "labels of `{sample}` as rendered: sorted by name"
        );
        for n in names {
            assert!(
                n == "le" || TELEMETRY.contains(&format!("\"{n}\"")),
                "label `{n}` of `{sample}` is declared nowhere in src/telemetry.rs: misspelt?"
            );
        }
    }
    metric_opt(addr, sample).unwrap_or(0.0)
}

pub fn frames_metric(stream: &str, track: &str) -> String {
    format!("livepop_relay_frames_received_total{{stream=\"{stream}\",track=\"{track}\"}}")
}

/// Writes a core config; returns its path.
pub fn core_config(env: &Env, name: &str, relay_listen: &str, record: bool) -> PathBuf {
    let rec = if record {
        format!("[record]\ndir = \"rec-{name}\"\n")
    } else {
        String::new()
    };
    env.write(
        &format!("{name}.toml"),
        &format!(
            r#"node_id = "{name}"
[admin]
listen = "127.0.0.1:0"
[relay]
listen = "{relay_listen}"
cert = "certs/core.pem"
key = "certs/core.key"
client_ca = "certs/ca.pem"
{rec}"#
        ),
    )
}

pub struct EdgeOpts {
    pub cores: Vec<(String, SocketAddr)>,
    /// Origin (HTTP) address per core, same order; non-empty enables [playback] on port 0.
    pub origins: Vec<SocketAddr>,
    /// Extra keys for [playback].
    pub extra_playback: String,
    pub stall_ms: u64,
    pub relay_cert: String,
    /// Must be a name `relay_cert` carries (edge.pem: edge-1, node-edge-2.pem: edge-2).
    pub node_id: String,
    pub extra_rtmp: String,
    pub extra_auth: String,
    /// Extra keys for [relay] (before the [[relay.cores]] tables).
    pub extra_relay: String,
}

impl EdgeOpts {
    pub fn new(cores: Vec<(String, SocketAddr)>) -> Self {
        EdgeOpts {
            cores,
            origins: vec![],
            extra_playback: String::new(),
            stall_ms: 10_000,
            relay_cert: "certs/edge".into(),
            node_id: "edge-1".into(),
            extra_rtmp: String::new(),
            extra_auth: String::new(),
            extra_relay: String::new(),
        }
    }
}

pub fn edge_config(env: &Env, o: &EdgeOpts) -> PathBuf {
    let mut cores = String::new();
    for (i, (id, a)) in o.cores.iter().enumerate() {
        cores += &format!("[[relay.cores]]\nid = \"{id}\"\naddr = \"{a}\"\n");
        if let Some(origin) = o.origins.get(i) {
            cores += &format!("origin = \"{origin}\"\n");
        }
    }
    let playback = if o.origins.is_empty() {
        String::new()
    } else {
        format!(
            "[playback]\nlisten = \"127.0.0.1:0\"\ntls_listen = \"127.0.0.1:0\"\ncert = \"certs/server.pem\"\nkey = \"certs/server.key\"\n{}{}\n",
            // Crowds in tests and benchmarks come from one address.
            if o.extra_playback.contains("max_connections_per_ip") {
                ""
            } else {
                "max_connections_per_ip = 0\n"
            },
            o.extra_playback
        )
    };
    env.write(
        "edge.toml",
        &format!(
            r#"node_id = "{node}"
[admin]
listen = "127.0.0.1:0"
[rtmp]
listen = "127.0.0.1:0"
stall_timeout_ms = {stall}
handshake_timeout_ms = 2000
{extra}
[rtmps]
listen = "127.0.0.1:0"
cert = "certs/server.pem"
key = "certs/server.key"
[[auth.streams]]
name = "demo"
key = "demo-key"
[[auth.streams]]
name = "other"
key = "other-key"
{auth}
{playback}[relay]
cert = "{rc}.pem"
key = "{rc}.key"
ca = "certs/ca.pem"
{extra_relay}
{cores}"#,
            stall = o.stall_ms,
            extra = o.extra_rtmp,
            rc = o.relay_cert,
            auth = o.extra_auth,
            node = o.node_id,
            extra_relay = o.extra_relay,
        ),
    )
}

/// Starts a core with recording on; returns it and its relay address.
pub fn start_core(env: &Env, name: &str, listen: &str) -> Proc {
    let cfg = core_config(env, name, listen, true);
    Proc::start(name, &["core", "--config", cfg.to_str().unwrap()])
}

/// Writes a core config with an LL-HLS origin on port 0 (`origin_extra` goes into [origin]).
pub fn core_config_with_origin(env: &Env, name: &str, origin_extra: &str) -> PathBuf {
    core_config_with_origin_at(env, name, "127.0.0.1:0", "127.0.0.1:0", origin_extra)
}

/// A core config with the relay and the origin on the given addresses.
pub fn core_config_with_origin_at(
    env: &Env,
    name: &str,
    relay: &str,
    origin: &str,
    origin_extra: &str,
) -> PathBuf {
    let base = std::fs::read_to_string(core_config(env, name, relay, false)).unwrap();
    env.write(
        &format!("{name}-origin.toml"),
        &format!("{base}[origin]\nlisten = \"{origin}\"\n{origin_extra}\n"),
    )
}

/// Starts a core with an LL-HLS origin on port 0 (`origin_extra` goes into [origin]).
pub fn start_core_with_origin(env: &Env, name: &str, origin_extra: &str) -> Proc {
    let cfg = core_config_with_origin(env, name, origin_extra);
    Proc::start(name, &["core", "--config", cfg.to_str().unwrap()])
}

pub fn start_edge(env: &Env, o: &EdgeOpts) -> Proc {
    let cfg = edge_config(env, o);
    let p = Proc::start("edge", &["edge", "--config", cfg.to_str().unwrap()]);
    // Ready once a core link is up.
    let admin = p.addr("admin");
    if !o.cores.is_empty()
        && (o.relay_cert == "certs/edge" || o.relay_cert.starts_with("certs/node-"))
    {
        wait_for("edge /readyz", Duration::from_secs(10), || {
            (http_get(admin, "/readyz")?.0 == 200).then_some(())
        });
    }
    p
}

/// An ffmpeg publisher of testsrc2 + sine, teeing the exact packets it sends into `copy`.
/// (Through the tee muxer x264 writes no global header, so the FLV has no AVC sequence header:
/// good for ingest and relay checks, but the origin cannot package it; see `ffmpeg_publish_file`.)
pub fn ffmpeg_publish(url: &str, secs: u32, size: &str, copy: Option<&Path>) -> Child {
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-hide_banner", "-loglevel", "error", "-nostdin", "-re"])
        .args([
            "-f",
            "lavfi",
            "-i",
            &format!("testsrc2=size={size}:rate=30"),
        ])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"])
        .args(["-t", &secs.to_string()])
        .args([
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-tune",
            "zerolatency",
            "-g",
            "60",
        ])
        .args(["-c:a", "aac", "-b:a", "96k", "-map", "0:v", "-map", "1:a"]);
    match copy {
        // The tee muxer does not ask encoders for global headers (the flv muxer alone does):
        // without them the FLV carries no AVC sequence header and nothing can be packaged.
        Some(p) => cmd
            .args(["-flags:v", "+global_header", "-flags:a", "+global_header"])
            .args([
                "-f",
                "tee",
                &format!("[f=flv:onfail=ignore]{url}|[f=flv]{}", p.display()),
            ]),
        None => cmd.args(["-f", "flv", url]),
    };
    cmd.stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ffmpeg")
}

/// Publishes an FLV file at real-time pace with ffmpeg, packets copied unchanged.
pub fn ffmpeg_publish_file(url: &str, file: &Path) -> Child {
    Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-nostdin",
            "-re",
            "-i",
        ])
        .arg(file)
        .args(["-c", "copy", "-f", "flv", url])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ffmpeg")
}

/// Waits for a child with a deadline; returns its success.
pub fn wait_child(c: &mut Child, timeout: Duration) -> bool {
    let st = wait_for("process exit", timeout, || c.try_wait().ok().flatten());
    st.success()
}

/// ffprobe's CSV output for `entries` (e.g. `packet=codec_type,pts`); fails the test if ffprobe
/// cannot read the file.
pub fn ffprobe(file: &Path, entries: &str) -> String {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-show_entries", entries, "-of", "csv=p=0"])
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ffprobe failed on {} ({} bytes): {}",
        file.display(),
        std::fs::metadata(file).map(|m| m.len()).unwrap_or(0),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Packets of a media file: (codec_type, pts in ms, keyframe).
pub fn packets(file: &Path) -> Vec<(String, i64, bool)> {
    ffprobe(file, "packet=codec_type,pts,flags")
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (
                f[0].to_string(),
                f[1].parse().unwrap_or(-1),
                f[2].contains('K'),
            )
        })
        .collect()
}

/// Container duration in seconds.
pub fn duration(file: &Path) -> f64 {
    ffprobe(file, "format=duration").trim().parse().unwrap()
}

/// The finished recordings (`*.flv`) in a core's record directory.
pub fn recordings(env: &Env, core: &str) -> Vec<PathBuf> {
    let dir = env.path().join(format!("rec-{core}"));
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "flv"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Splits packets into per-track lists of (pts, keyframe).
pub fn by_track(p: &[(String, i64, bool)], kind: &str) -> Vec<(i64, bool)> {
    p.iter()
        .filter(|x| x.0 == kind)
        .map(|x| (x.1, x.2))
        .collect()
}

/// Asserts that `got` holds exactly the packets of `sent`, per track, in order.
pub fn assert_same_frames(sent: &Path, got: &Path) {
    let a = packets(sent);
    let b = packets(got);
    let (av, bv) = (by_track(&a, "video"), by_track(&b, "video"));
    let (aa, ba) = (by_track(&a, "audio"), by_track(&b, "audio"));
    assert!(av.len() > 100, "source has only {} video packets", av.len());
    // On a count mismatch, say where the tracks part (first differing packet).
    let parting = |a: &[(i64, bool)], b: &[(i64, bool)]| {
        let i = a
            .iter()
            .zip(b)
            .position(|(x, y)| x != y)
            .unwrap_or(a.len().min(b.len()));
        format!(
            "parting at packet {i}: sent {:?}, got {:?}",
            &a[i.saturating_sub(2)..(i + 3).min(a.len())],
            &b[i.saturating_sub(2)..(i + 3).min(b.len())]
        )
    };
    assert_eq!(
        av.len(),
        bv.len(),
        "video frame count; {}",
        parting(&av, &bv)
    );
    assert_eq!(
        aa.len(),
        ba.len(),
        "audio frame count; {}",
        parting(&aa, &ba)
    );
    let keys = |v: &[(i64, bool)]| -> Vec<usize> {
        v.iter()
            .enumerate()
            .filter(|x| x.1 .1)
            .map(|x| x.0)
            .collect()
    };
    assert_eq!(keys(&av), keys(&bv), "keyframe positions");
    let first_diff = |a: &[(i64, bool)], b: &[(i64, bool)]| {
        let i = a.iter().zip(b).position(|(x, y)| x != y)?;
        Some(format!(
            "first difference at packet {i}: sent {:?}, got {:?}",
            &a[i.saturating_sub(2)..(i + 3).min(a.len())],
            &b[i.saturating_sub(2)..(i + 3).min(b.len())]
        ))
    };
    if let Some(d) = first_diff(&av, &bv) {
        panic!("video timestamps differ: {d}");
    }
    if let Some(d) = first_diff(&aa, &ba) {
        panic!("audio timestamps differ: {d}");
    }
    let (da, db) = (duration(sent), duration(got));
    assert!(
        (da - db).abs() <= 1.0 / 30.0 + 1e-6,
        "durations {da} vs {db}"
    );
}

// ---- a raw RTMP publisher, for inputs ffmpeg would never send ----------------------------

use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
use rml_rtmp::sessions::{
    ClientSession, ClientSessionConfig, ClientSessionEvent, ClientSessionResult, PublishRequestType,
};

/// Chunk size our raw publisher announces (rml_rtmp's client default).
pub const RAW_CHUNK: usize = 4096;

pub struct RawPublisher {
    pub s: TcpStream,
    session: ClientSession,
}

fn send_results(s: &mut TcpStream, results: Vec<ClientSessionResult>) -> Vec<ClientSessionEvent> {
    let mut events = vec![];
    for r in results {
        match r {
            ClientSessionResult::OutboundResponse(p) => s.write_all(&p.bytes).unwrap(),
            ClientSessionResult::RaisedEvent(e) => events.push(e),
            _ => {}
        }
    }
    events
}

/// Connects and completes the RTMP handshake; returns the socket and bytes read past it.
pub fn rtmp_handshake(addr: SocketAddr) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let rest = rtmp_handshake_over(&mut s);
    (s, rest)
}

/// Completes the RTMP handshake (client side) over `s`; returns the bytes read past it.
pub fn rtmp_handshake_over(s: &mut (impl Read + Write)) -> Vec<u8> {
    let mut hs = Handshake::new(PeerType::Client);
    s.write_all(&hs.generate_outbound_p0_and_p1().unwrap())
        .unwrap();
    s.flush().unwrap();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "server closed during handshake");
        match hs.process_bytes(&buf[..n]).unwrap() {
            HandshakeProcessResult::InProgress { response_bytes } => {
                s.write_all(&response_bytes).unwrap();
                s.flush().unwrap();
            }
            HandshakeProcessResult::Completed {
                response_bytes,
                remaining_bytes,
            } => {
                s.write_all(&response_bytes).unwrap();
                s.flush().unwrap();
                return remaining_bytes;
            }
        }
    }
}

/// A command the server sent after a publish request (e.g. the refusal's `onStatus`), decoded
/// by rml_rtmp's own chunk deserializer and AMF0 decoder, independently of livepop's reader.
#[derive(Debug, Clone)]
pub struct ServerCommand {
    pub name: String,
    pub transaction_id: f64,
    /// The message stream it came on.
    pub stream_id: u32,
    /// The string properties of its info object (`level`, `code`, `description`).
    pub info: std::collections::HashMap<String, String>,
}

/// Decodes every AMF0 command in the server's bytes, applying its Set Chunk Size.
struct CommandTap(rml_rtmp::chunk_io::ChunkDeserializer);

impl CommandTap {
    fn feed(&mut self, mut bytes: &[u8], out: &mut Vec<ServerCommand>) {
        use rml_rtmp::messages::RtmpMessage;
        while let Ok(Some(m)) = self.0.get_next_message(bytes) {
            bytes = &[];
            match m.to_rtmp_message() {
                Ok(RtmpMessage::SetChunkSize { size }) => {
                    self.0.set_max_chunk_size(size as usize).unwrap();
                }
                Ok(RtmpMessage::Amf0Command {
                    command_name,
                    transaction_id,
                    additional_arguments,
                    ..
                }) => {
                    let mut info = std::collections::HashMap::new();
                    for a in additional_arguments {
                        if let rml_amf0::Amf0Value::Object(props) = a {
                            for (k, v) in props {
                                if let rml_amf0::Amf0Value::Utf8String(v) = v {
                                    info.insert(k, v);
                                }
                            }
                        }
                    }
                    out.push(ServerCommand {
                        name: command_name,
                        transaction_id,
                        stream_id: m.message_stream_id,
                        info,
                    });
                }
                _ => {}
            }
        }
    }
}

impl RawPublisher {
    /// Connects to app `live` and publishes with `key`; panics unless accepted.
    pub fn publish(addr: SocketAddr, key: &str) -> Self {
        match Self::try_publish(addr, key) {
            Ok(p) => p,
            Err(cmds) => panic!("publish refused: {cmds:?}"),
        }
    }

    /// Connects to app `live` and publishes with `key`. Refused: the commands the server sent
    /// after the publish request, up to its closing the connection.
    pub fn try_publish(addr: SocketAddr, key: &str) -> Result<Self, Vec<ServerCommand>> {
        let (mut s, leftover) = rtmp_handshake(addr);
        let (mut session, initial) = ClientSession::new(ClientSessionConfig::new()).unwrap();
        send_results(&mut s, initial);
        let r = session.request_connection("live".into()).unwrap();
        send_results(&mut s, vec![r]);
        let mut tap = CommandTap(rml_rtmp::chunk_io::ChunkDeserializer::new());
        let mut commands = vec![];
        let mut after_publish = None;
        let mut pending = leftover;
        let mut connected = false;
        let mut buf = [0u8; 8192];
        loop {
            tap.feed(&pending, &mut commands);
            // The client session may not understand a refusal; the tap decodes it anyway.
            let results = session.handle_input(&pending).unwrap_or_default();
            pending.clear();
            for e in send_results(&mut s, results) {
                match e {
                    ClientSessionEvent::ConnectionRequestAccepted if !connected => {
                        connected = true;
                        let r = session
                            .request_publishing(key.into(), PublishRequestType::Live)
                            .unwrap();
                        send_results(&mut s, vec![r]);
                        after_publish = Some(commands.len());
                    }
                    ClientSessionEvent::PublishRequestAccepted => {
                        return Ok(RawPublisher { s, session });
                    }
                    ClientSessionEvent::ConnectionRequestRejected { description } => {
                        panic!("connect rejected: {description}")
                    }
                    _ => {}
                }
            }
            let n = s.read(&mut buf).unwrap_or(0);
            if n == 0 {
                let from = after_publish.expect("server closed before the publish request");
                return Err(commands.split_off(from.min(commands.len())));
            }
            pending.extend_from_slice(&buf[..n]);
        }
    }

    /// Writes raw bytes; false once the server has closed the connection.
    pub fn send(&mut self, bytes: &[u8]) -> bool {
        self.s.write_all(bytes).is_ok() && self.s.flush().is_ok()
    }

    /// Sends metadata through the session (normal chunking).
    pub fn session_video(&mut self, data: Vec<u8>, ts: u32) {
        let r = self
            .session
            .publish_video_data(data.into(), rml_rtmp::time::RtmpTimestamp::new(ts), false)
            .unwrap();
        send_results(&mut self.s, vec![r]);
    }
}

/// Paces `chunks` (media timestamp in ms, bytes) at `speed` × real time, like an encoder
/// catching up (the relay sends newer groups first, so an instant burst of many seconds would
/// rightly lose its oldest groups). Sleeps here shape traffic; they synchronize nothing.
pub fn send_paced(p: &mut RawPublisher, chunks: &[(u32, Vec<u8>)], speed: u32) {
    let start = Instant::now();
    for (ts, bytes) in chunks {
        let due = Duration::from_millis(u64::from(*ts / speed.max(1)));
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        assert!(p.send(bytes), "edge closed the connection");
    }
}

/// True once the peer closed `s` (EOF or reset) within `timeout`.
pub fn closed_by_peer(s: &mut TcpStream, timeout: Duration) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    reads_until_closed(s, Instant::now() + timeout)
}

/// Reads (and drops) what `s` delivers until the peer closes (EOF or an error): true, or
/// `deadline` passes: false. The caller gives the underlying socket a short read timeout.
pub fn reads_until_closed(s: &mut impl Read, deadline: Instant) -> bool {
    let mut buf = [0u8; 65536];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}

// ---- hostile clients (tests/attack.rs and the soak benchmark) -----------------------------

/// The connection-deadline keys of an HTTP listener's section ([admin], [playback], [origin]).
pub fn limits_block(header: u64, idle: u64, write: u64) -> String {
    format!("header_timeout_ms = {header}\nidle_timeout_ms = {idle}\nwrite_timeout_ms = {write}\n")
}

/// A connection closed by the server within `within` of `since`.
pub fn closed_within(s: &mut TcpStream, since: Instant, within: Duration) -> bool {
    let left = (since + within).saturating_duration_since(Instant::now());
    closed_by_peer(s, left)
}

/// One deeply nested AMF0 message of `type_id` right after the handshake (no connect, no key),
/// with the chunk size raised so it arrives as one chunk; true once the server has ended that
/// connection (within 5 s).
pub fn send_deep_amf0(addr: SocketAddr, type_id: u8, body: &[u8]) -> bool {
    use livepop::ingest::chunk::write;
    let (mut s, _) = rtmp_handshake(addr);
    let chunk = 1u32 << 20;
    let mut wire = write::message(2, 0, 1, 0, &chunk.to_be_bytes(), 128);
    let mut payload = if type_id == 17 { vec![0u8] } else { vec![] };
    payload.extend_from_slice(body);
    wire.extend(write::message(3, 0, type_id, 0, &payload, chunk as usize));
    let since = Instant::now();
    let _ = s.write_all(&wire);
    closed_within(&mut s, since, Duration::from_secs(5))
}

/// Sends `bytes` one at a time every 150 ms until the server closes or `within` passes; true
/// if it closed in time.
pub fn drip(s: &mut impl Write, bytes: &[u8], since: Instant, within: Duration) -> bool {
    for b in bytes.iter().cycle() {
        if Instant::now() > since + within {
            return false;
        }
        if s.write_all(&[*b]).and_then(|_| s.flush()).is_err() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(150)); // shapes the drip; synchronizes nothing
    }
    unreachable!()
}

/// A connection with a tiny receive window, so that a server's writes to a client that does
/// not read block instead of filling the kernel's buffers.
pub fn connect_small_window(addr: SocketAddr) -> TcpStream {
    let s = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.set_recv_buffer_size(4096).unwrap();
            sock.connect(addr).await.unwrap().into_std().unwrap()
        });
    s.set_nonblocking(false).unwrap();
    s
}

/// `n` concurrent requests with `method` for `path` through the edge; returns their
/// (status, head, body).
pub fn burst(addr: SocketAddr, method: &str, path: &str, n: usize) -> Vec<(u16, String, Vec<u8>)> {
    // Connected before any thread starts: a failed connect then cannot leave the others
    // waiting at the barrier forever.
    let socks: Vec<TcpStream> = (0..n)
        .map(|_| {
            let s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            s
        })
        .collect();
    let barrier = Arc::new(std::sync::Barrier::new(n));
    let threads: Vec<_> = socks
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            let barrier = barrier.clone();
            let sep = if path.contains('?') { '&' } else { '?' };
            let req = format!(
                "{method} {path}{sep}viewer={i} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            );
            std::thread::spawn(move || {
                barrier.wait();
                s.write_all(req.as_bytes()).unwrap();
                let mut resp = vec![];
                s.read_to_end(&mut resp).unwrap();
                let split = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
                let head = String::from_utf8_lossy(&resp[..split]).to_string();
                let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
                (status, head, resp[split + 4..].to_vec())
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// The finished recording of stream `name` in a core's record directory, waited for.
pub fn stream_recording(env: &Env, core: &str, name: &str) -> PathBuf {
    let prefix = format!("{name}-");
    wait_for(
        &format!("recording of stream {name}"),
        Duration::from_secs(20),
        || {
            recordings(env, core).into_iter().find(|p| {
                p.file_name()
                    .and_then(|f| f.to_str())
                    .is_some_and(|f| f.starts_with(&prefix))
            })
        },
    )
}

/// Tags of an FLV file: (type, timestamp, body).
pub fn flv_tags(file: &Path) -> Vec<(u8, u32, Vec<u8>)> {
    let b = std::fs::read(file).unwrap();
    assert_eq!(&b[..3], b"FLV");
    let mut pos = u32::from_be_bytes([b[5], b[6], b[7], b[8]]) as usize + 4;
    let mut out = vec![];
    while pos + 11 <= b.len() {
        let kind = b[pos];
        let size = u32::from_be_bytes([0, b[pos + 1], b[pos + 2], b[pos + 3]]) as usize;
        let ts = u32::from_be_bytes([b[pos + 7], b[pos + 4], b[pos + 5], b[pos + 6]]);
        if pos + 11 + size > b.len() {
            break;
        }
        let body = b[pos + 11..pos + 11 + size].to_vec();
        out.push((kind, ts, body));
        pos += 11 + size + 4;
    }
    out
}

/// Encodes a small real H.264/AAC FLV file with ffmpeg (no network).
pub fn encode_flv(out: &Path, secs: u32) {
    encode_flv_sized(out, "320x240", secs);
}

/// Encodes `secs` of testsrc2 at `size` (30 fps, 1 s GOP, no B-frames) and a sine in AAC to FLV.
pub fn encode_flv_sized(out: &Path, size: &str, secs: u32) {
    encode_flv_with(out, size, secs, &[]);
}

/// `encode_flv_sized` with extra video encoder options (e.g. a bitrate).
pub fn encode_flv_with(out: &Path, size: &str, secs: u32, video_opts: &[&str]) {
    let ok = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-y"])
        .args([
            "-f",
            "lavfi",
            "-i",
            &format!("testsrc2=size={size}:rate=30"),
        ])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"])
        .args(["-t", &secs.to_string()])
        .args([
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-g",
            "30",
            "-bf",
            "0",
        ])
        .args(video_opts)
        .args(["-c:a", "aac", "-map", "0:v", "-map", "1:a", "-f", "flv"])
        .arg(out)
        .status()
        .unwrap();
    assert!(ok.success());
}

/// `livepop demo` with every listener on port 0 and its certificates in the test directory,
/// plus `extra` arguments (e.g. `--source testsrc`, `--key NAME=KEY`).
pub fn start_demo(env: &Env, extra: &[&str]) -> Proc {
    let args = demo_args(env, extra);
    Proc::start("demo", &args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// The address of a `livepop demo`'s edge admin port (the demo has two admin listeners, so
/// `Proc::addr` cannot tell them apart), waited for in its log.
pub fn demo_edge_admin(demo: &Proc) -> SocketAddr {
    demo.wait_log(Duration::from_secs(20), |v| {
        v["fields"]["listener"] == "admin" && message_is(v, "edge listening")
    })["fields"]["addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// The address of a `livepop demo`'s core admin port, waited for in its log.
pub fn demo_core_admin(demo: &Proc) -> SocketAddr {
    demo.wait_log(Duration::from_secs(20), |v| {
        v["fields"]["listener"] == "admin" && message_is(v, "core listening")
    })["fields"]["addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// `livepop demo` arguments: every listener on port 0, data in the test directory.
pub fn demo_args(env: &Env, extra: &[&str]) -> Vec<String> {
    let dir = env.path().join("demo");
    let mut args = vec![
        "demo".to_string(),
        "--data-dir".into(),
        dir.display().to_string(),
    ];
    for flag in [
        "--rtmp",
        "--rtmps",
        "--http",
        "--https",
        "--origin",
        "--relay",
        "--edge-admin",
        "--core-admin",
    ] {
        args.extend([flag.to_string(), "127.0.0.1:0".into()]);
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// Plays `url` (the player page) for `secs` in headless Chromium with web/e2e/play.mjs and
/// returns its report (samples of currentTime, latency, buffer, level; stalls; levels; errors).
/// Needs `npm ci --prefix web` and Debian's chromium (deploy/test.sh installs both).
pub fn play_in_browser(url: &str, secs: f64, screenshot: &Path) -> serde_json::Value {
    let web = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("web");
    assert!(
        web.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed: run `npm ci --prefix web` (deploy/test.sh does)"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).is_file(),
        "{chromium} missing: apt install chromium (deploy/test.sh does)"
    );
    let out = Command::new("node")
        .arg(web.join("e2e/play.mjs"))
        .arg(url)
        .arg(secs.to_string())
        .arg(screenshot)
        .env("CHROMIUM", &chromium)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .expect("node (apt install nodejs)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "play.mjs failed: {text}");
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("play.mjs output {e}: {text}"))
}

/// The livepop-loadtest binary next to livepop's (the same profile's target directory); built
/// by `cargo build --workspace` (deploy/test.sh) or `--release` (bench/viewers.sh).
pub fn loadtest_bin() -> PathBuf {
    let p = Path::new(BIN).with_file_name("livepop-loadtest");
    assert!(
        p.is_file(),
        "{} missing: cargo build --workspace (deploy/test.sh does; bench/viewers.sh builds it with --release)",
        p.display()
    );
    p
}

/// Whether the machine ran us during a real-time measurement: CPU time the hypervisor stole
/// (/proc/stat) and how late a thread that sleeps 10 ms at a time woke up. Playback in real time
/// cannot be judged on a machine that was not running it.
pub struct MachineWatch {
    start: Instant,
    stat0: Vec<u64>,
    pressure0: Option<u64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    lateness: Arc<Mutex<Vec<(f64, f64)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What a `MachineWatch` saw.
#[derive(Debug)]
pub struct MachineReport {
    pub secs: f64,
    /// Share of all CPU time stolen by the hypervisor.
    pub steal: f64,
    /// Share of all CPU time idle.
    pub idle: f64,
    /// Share of the time some runnable task waited for a CPU (/proc/pressure/cpu), if known.
    pub cpu_pressure: Option<f64>,
    /// (seconds since the watch began, how late) for wake-ups over 100 ms late.
    pub late_wakeups: Vec<(f64, f64)>,
}

fn cpu_stat() -> Vec<u64> {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines().next().map(|l| {
                l.split_whitespace()
                    .skip(1)
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// Microseconds some task waited for a CPU since boot (PSI).
fn cpu_pressure_us() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/pressure/cpu").ok()?;
    let some = s.lines().find(|l| l.starts_with("some "))?;
    some.split_whitespace()
        .find_map(|kv| kv.strip_prefix("total="))?
        .parse()
        .ok()
}

impl MachineWatch {
    pub fn start() -> Self {
        let start = Instant::now();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let lateness = Arc::new(Mutex::new(vec![]));
        let (s, l) = (stop.clone(), lateness.clone());
        let thread = std::thread::spawn(move || {
            let tick = Duration::from_millis(10);
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                std::thread::sleep(tick);
                let late = t.elapsed().saturating_sub(tick).as_secs_f64();
                if late > 0.1 {
                    l.lock()
                        .unwrap()
                        .push((t.duration_since(start).as_secs_f64(), late));
                }
            }
        });
        MachineWatch {
            start,
            stat0: cpu_stat(),
            pressure0: cpu_pressure_us(),
            stop,
            lateness,
            thread: Some(thread),
        }
    }

    pub fn finish(mut self) -> MachineReport {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let stat1 = cpu_stat();
        let d: Vec<u64> = stat1
            .iter()
            .zip(&self.stat0)
            .map(|(b, a)| b.saturating_sub(*a))
            .collect();
        // user nice system idle iowait irq softirq steal guest guest_nice; guest time is
        // already counted in user.
        let total: u64 = d.iter().take(8).sum::<u64>().max(1);
        let share = |i: usize| d.get(i).copied().unwrap_or(0) as f64 / total as f64;
        let secs = self.start.elapsed().as_secs_f64();
        let cpu_pressure = self
            .pressure0
            .zip(cpu_pressure_us())
            .map(|(a, b)| b.saturating_sub(a) as f64 / 1e6 / secs);
        MachineReport {
            secs,
            cpu_pressure,
            steal: share(7),
            idle: share(3),
            late_wakeups: self.lateness.lock().unwrap().clone(),
        }
    }
}

impl MachineReport {
    /// The machine did not run us for a noticeable time: over 5% of CPU time stolen, a sleeping
    /// thread woken over 250 ms late, or every CPU busy with tasks waiting for one most of the
    /// time (the browser test alone leaves about half the machine idle).
    pub fn starved(&self) -> bool {
        self.steal > 0.05
            || self.late_wakeups.iter().any(|&(_, late)| late > 0.25)
            || (self.idle < 0.05 && self.cpu_pressure.is_some_and(|p| p > 0.5))
    }
}

impl std::fmt::Display for MachineReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let worst = self.late_wakeups.iter().map(|w| w.1).fold(0.0, f64::max);
        write!(
            f,
            "{:.1} s: {:.1}% CPU stolen by the hypervisor, {:.1}% idle, tasks waiting for a CPU {}, \
             {} wake-ups over 100 ms late (worst {:.3} s)",
            self.secs,
            self.steal * 100.0,
            self.idle * 100.0,
            self.cpu_pressure
                .map_or("(unknown)".into(), |p| format!("{:.1}% of the time", p * 100.0)),
            self.late_wakeups.len(),
            worst
        )
    }
}
