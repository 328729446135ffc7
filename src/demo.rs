//! `livepop demo`: a core and an edge in one process, from the example configs in
//! edge-config/ (compiled in), so the demo and `livepop core` + `livepop edge` behave alike.
//! The edge still relays to the core over QUIC with mutual TLS on loopback: the demo runs the
//! production path, not a shortcut.
//!
//! `--source testsrc` also publishes a test pattern with a burnt-in wall clock and a tone
//! through the normal RTMP ingest: the ffmpeg CLI encodes FLV to a pipe and this process
//! publishes it over RTMP (the stream key stays out of the child's command line, which any
//! local user can read), restarted if it exits.

use crate::config::{CoreConfig, EdgeConfig};
use crate::roles::{self, Running};
use crate::shutdown::Shutdown;
use anyhow::{anyhow, Context, Result};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;
use tracing::{info, warn};

const CORE_TOML: &str = include_str!("../edge-config/core.toml");
const EDGE_TOML: &str = include_str!("../edge-config/edge.toml");
/// The demo stream and its key (edge-config/edge.toml).
pub const STREAM: &str = "demo";
const KEY: &str = "demo-key";

/// The synthetic sources `--source` can publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    /// A 720p30 test pattern with the wall clock burnt in, and a tone (ffmpeg CLI).
    Testsrc,
}

/// `livepop demo` options: listen addresses (defaults: the interface contract's ports) and
/// where certificates live.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoOptions {
    /// Also publish a synthetic stream through the RTMP ingest. Without it the demo waits for
    /// OBS or ffmpeg.
    #[arg(long, value_enum)]
    pub source: Option<Source>,
    /// More streams to accept, as NAME=KEY (repeatable); the demo stream is always
    /// demo=demo-key. For load tests with several publishers.
    #[arg(long = "key", value_name = "NAME=KEY")]
    pub keys: Vec<String>,
    /// Where the development certificates are kept (created on first run).
    #[arg(long, default_value_os_t = default_data_dir())]
    pub data_dir: PathBuf,
    /// RTMP ingest address.
    #[arg(long, default_value = "127.0.0.1:1935")]
    pub rtmp: String,
    /// RTMPS ingest address.
    #[arg(long, default_value = "127.0.0.1:1936")]
    pub rtmps: String,
    /// Edge HTTP address: the player page and playback.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http: String,
    /// Edge HTTPS address (HTTP/2).
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub https: String,
    /// Core origin address (HTTP).
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub origin: String,
    /// Core relay address (QUIC, UDP).
    #[arg(long, default_value = "127.0.0.1:4433")]
    pub relay: String,
    /// Edge admin address (/metrics, /healthz, /readyz).
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub edge_admin: String,
    /// Core admin address.
    #[arg(long, default_value = "127.0.0.1:9091")]
    pub core_admin: String,
}

/// Where the demo keeps its certificates when not told: `$XDG_DATA_HOME/livepop/demo`, else
/// `~/.local/share/livepop/demo`, else the temp directory.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("livepop/demo");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h).join(".local/share/livepop/demo");
    }
    std::env::temp_dir().join("livepop-demo")
}

/// The example configs with the demo's addresses; certificate paths resolve into `data_dir`.
fn configs(o: &DemoOptions) -> Result<(CoreConfig, EdgeConfig)> {
    // Relative paths in the examples ("dev-certs/...") resolve against the config file's
    // directory: pretend the files live in data_dir.
    let mut core = CoreConfig::from_str_at(&o.data_dir.join("core.toml"), CORE_TOML)?;
    let mut edge = EdgeConfig::from_str_at(&o.data_dir.join("edge.toml"), EDGE_TOML)?;
    core.relay.listen = o.relay.clone();
    core.admin.listen = o.core_admin.clone();
    let origin = core
        .origin
        .as_mut()
        .ok_or_else(|| anyhow!("edge-config/core.toml has no [origin]"))?;
    origin.listen = o.origin.clone();
    edge.rtmp.listen = o.rtmp.clone();
    if let Some(r) = edge.rtmps.as_mut() {
        r.listen = o.rtmps.clone();
    }
    edge.admin.listen = o.edge_admin.clone();
    let p = edge
        .playback
        .as_mut()
        .ok_or_else(|| anyhow!("edge-config/edge.toml has no [playback]"))?;
    p.listen = o.http.clone();
    p.tls_listen = Some(o.https.clone());
    p.player = true;
    // The demo runs on loopback, where the load generator's crowds come from one address.
    p.max_connections_per_ip = 0;
    edge.rtmp.max_connections_per_ip = 0;
    for k in &o.keys {
        let (name, key) = k
            .split_once('=')
            .filter(|(n, k)| crate::config::valid_stream_name(n) && !k.is_empty())
            .ok_or_else(|| {
                anyhow!("--key {k:?}: expected NAME=KEY with a valid stream name (a-z, 0-9, - _)")
            })?;
        edge.auth.streams.push(crate::config::StreamKeyConfig {
            name: name.to_string(),
            key: key.to_string(),
        });
    }
    if !edge
        .auth
        .streams
        .iter()
        .any(|s| s.name == STREAM && s.key == KEY)
    {
        return Err(anyhow!("edge-config/edge.toml lost the demo stream key"));
    }
    Ok((core, edge))
}

/// Starts the core, then the edge pointed at the core's bound addresses, then (with
/// `testsrc`) the synthetic publisher.
pub async fn start(o: DemoOptions, shutdown: Shutdown) -> Result<Running> {
    crate::certs::generate(&o.data_dir.join("dev-certs"), false)
        .with_context(|| format!("writing demo certificates to {}", o.data_dir.display()))?;
    let (core_cfg, mut edge_cfg) = configs(&o)?;
    let core = roles::start_core(core_cfg, shutdown.clone()).await?;
    let bound = |what: &str| {
        core.addrs
            .iter()
            .find(|(n, _)| *n == what)
            .map(|(_, a)| *a)
            .ok_or_else(|| anyhow!("the core did not bind its {what}"))
    };
    let (relay, origin) = (bound("relay")?, bound("origin")?);
    let c = edge_cfg
        .relay
        .cores
        .first_mut()
        .ok_or_else(|| anyhow!("edge-config/edge.toml names no core"))?;
    c.addr = relay.to_string();
    c.origin = Some(origin.to_string());
    edge_cfg.relay.cores.truncate(1);
    let edge = roles::start_edge(edge_cfg, shutdown.clone()).await?;

    let mut running = Running {
        addrs: vec![],
        tasks: core.tasks,
    };
    for (n, a) in core.addrs {
        running.addrs.push((core_name(n), a));
    }
    running.addrs.extend(edge.addrs);
    let mut edge_tasks = edge.tasks;
    running
        .tasks
        .spawn(async move { while edge_tasks.join_next().await.is_some() {} });
    let addr = |n: &str| running.addrs.iter().find(|(x, _)| *x == n).map(|(_, a)| *a);
    let (rtmp, http) = (
        addr("rtmp").ok_or_else(|| anyhow!("no rtmp listener"))?,
        addr("http").ok_or_else(|| anyhow!("no http listener"))?,
    );
    if o.source == Some(Source::Testsrc) {
        check_ffmpeg().await?;
        running.tasks.spawn(testsrc(rtmp, shutdown));
    }
    print_banner(&running.addrs, rtmp, http, o.source.is_some(), &o.data_dir);
    Ok(running)
}

/// The core's listener names, told apart from the edge's.
fn core_name(n: &'static str) -> &'static str {
    match n {
        "admin" => "core-admin",
        "relay" => "core-relay",
        other => other,
    }
}

fn print_banner(
    addrs: &[(&'static str, SocketAddr)],
    rtmp: SocketAddr,
    http: SocketAddr,
    testsrc: bool,
    data_dir: &Path,
) {
    let a = |n: &str| {
        addrs
            .iter()
            .find(|(x, _)| *x == n)
            .map_or("-".to_string(), |(_, a)| a.to_string())
    };
    let source = if testsrc {
        "publishing a test pattern (ffmpeg) as stream \"demo\""
    } else {
        "waiting for a publisher (OBS or ffmpeg) on the URL above"
    };
    let hls = if crate::edge::web::has_hls_js() {
        String::new()
    } else {
        "\n  Note:     hls.js was not installed when livepop was built; the page cannot play \
         (npm ci --prefix web, then rebuild)."
            .to_string()
    };
    // stdout, not the log: this is what a newcomer reads.
    println!(
        "\nlivepop demo: a core and an edge in one process, {source}.\n\
         \n  Publish:  rtmp://{rtmp}/live/{KEY}   (or rtmps://{}/live/{KEY})\
         \n  Player:   http://{http}/\
         \n  Playlist: http://{http}/live/{STREAM}/master.m3u8   (or https://{}/live/{STREAM}/master.m3u8)\
         \n  Metrics:  http://{}/metrics (edge), http://{}/metrics (core)\
         \n  Certificates: {} (HTTPS/RTMPS signed by public-ca.pem){hls}\
         \n  Stop with Ctrl-C.\n",
        a("rtmps"),
        a("https"),
        a("admin"),
        a("core-admin"),
        data_dir.join("dev-certs").display(),
    );
}

async fn check_ffmpeg() -> Result<()> {
    let ok = tokio::process::Command::new("ffmpeg")
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if ok {
        Ok(())
    } else {
        Err(anyhow!(
            "--source testsrc needs the ffmpeg command (Debian: apt install ffmpeg)"
        ))
    }
}

/// The ffmpeg arguments of the synthetic stream: 1280×720 30 fps test pattern with the wall
/// clock (UTC, ms) burnt in, a 440 Hz tone that beeps each second, H.264 with a keyframe every
/// 2 s (the origin's target duration) and AAC, at real-time pace. x264's ultrafast preset: a
/// synthetic pattern needs no compression effort, and the demo then leaves a third more CPU to
/// the ladder and the player on a small machine.
fn testsrc_args(start_unix_ms: u128) -> Vec<String> {
    // The clock is the stream's pts plus the wall time at start: with -re they advance together.
    let day_s = (start_unix_ms % 86_400_000) as f64 / 1000.0;
    let clock = format!(
        "drawtext=font=Mono:fontsize=56:fontcolor=white:box=1:boxcolor=black@0.6:boxborderw=12:\
         x=(w-tw)/2:y=h-th-60:text='%{{pts\\:hms\\:{day_s:.3}}} UTC'"
    );
    [
        "-hide_banner",
        "-loglevel",
        "error",
        "-nostdin",
        "-re",
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=1280x720:rate=30",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:beep_factor=2:sample_rate=48000",
        "-vf",
        &clock,
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-tune",
        "zerolatency",
        "-pix_fmt",
        "yuv420p",
        "-g",
        "60",
        "-keyint_min",
        "60",
        "-sc_threshold",
        "0",
        "-b:v",
        "2500k",
        "-maxrate",
        "2500k",
        "-bufsize",
        "2500k",
        "-c:a",
        "aac",
        "-b:a",
        "128k",
        "-f",
        "flv",
        "pipe:1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Runs the synthetic publisher until shutdown, restarting it (with backoff) when it exits.
async fn testsrc(rtmp: SocketAddr, mut shutdown: Shutdown) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let child = tokio::process::Command::new("ffmpeg")
            .args(testsrc_args(start))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cannot start ffmpeg for the test source");
                return;
            }
        };
        info!("test source publishing");
        // Keep ffmpeg's last error lines for the warning if it exits.
        let stderr = child.stderr.take();
        let last = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let l2 = last.clone();
        tokio::spawn(async move {
            let Some(s) = stderr else { return };
            let mut lines = tokio::io::BufReader::new(s).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                *l2.lock().unwrap_or_else(|p| p.into_inner()) = line;
            }
        });
        let began = std::time::Instant::now();
        let Some(flv) = child.stdout.take() else {
            return;
        };
        tokio::select! {
            _ = shutdown.wait() => {
                let _ = child.kill().await;
                return;
            }
            r = publish_flv(rtmp, KEY, flv) => {
                let _ = child.kill().await;
                let status = child.wait().await;
                let last = last.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let error = r.err().map(|e| format!("{e:#}")).unwrap_or_default();
                warn!(status = ?status.ok(), last_error = %last, %error, "test source exited; restarting");
            }
        }
        if began.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_secs(1);
        }
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Publishes the FLV stream `flv` (ffmpeg's output) to the RTMP ingest at `addr` as `key`,
/// tag by tag as it arrives, until `flv` ends or the connection fails.
async fn publish_flv(
    addr: SocketAddr,
    key: &str,
    flv: impl tokio::io::AsyncRead + Unpin,
) -> Result<()> {
    use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
    use rml_rtmp::sessions::{
        ClientSession, ClientSessionConfig, ClientSessionEvent, ClientSessionResult,
        PublishRequestType,
    };
    use rml_rtmp::time::RtmpTimestamp;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let limit = Duration::from_secs(5);
    let sock = tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr))
        .await
        .context("connecting to the RTMP ingest")??;
    let _ = sock.set_nodelay(true);
    let (mut rd, mut wr) = sock.into_split();
    let mut hs = Handshake::new(PeerType::Client);
    let p0p1 = hs
        .generate_outbound_p0_and_p1()
        .map_err(|e| anyhow!("handshake: {e:?}"))?;
    wr.write_all(&p0p1).await?;
    let mut buf = vec![0u8; 16 * 1024];
    let mut pending = loop {
        let n = tokio::time::timeout(limit, rd.read(&mut buf))
            .await
            .context("RTMP handshake")??;
        if n == 0 {
            return Err(anyhow!("ingest closed during the handshake"));
        }
        match hs
            .process_bytes(&buf[..n])
            .map_err(|e| anyhow!("handshake: {e:?}"))?
        {
            HandshakeProcessResult::InProgress { response_bytes } => {
                wr.write_all(&response_bytes).await?
            }
            HandshakeProcessResult::Completed {
                response_bytes,
                remaining_bytes,
            } => {
                wr.write_all(&response_bytes).await?;
                break remaining_bytes;
            }
        }
    };
    let (mut session, initial) =
        ClientSession::new(ClientSessionConfig::new()).map_err(|e| anyhow!("{e:?}"))?;
    let mut out = initial;
    out.push(
        session
            .request_connection("live".into())
            .map_err(|e| anyhow!("{e:?}"))?,
    );
    // connect, then publish once connected; what the ingest sends back is answered in order.
    let mut publishing = false;
    let mut requested = false;
    while !publishing {
        for r in out.drain(..) {
            match r {
                ClientSessionResult::OutboundResponse(p) => wr.write_all(&p.bytes).await?,
                ClientSessionResult::RaisedEvent(ClientSessionEvent::ConnectionRequestAccepted)
                    if !requested =>
                {
                    requested = true;
                    let r = session
                        .request_publishing(key.into(), PublishRequestType::Live)
                        .map_err(|e| anyhow!("{e:?}"))?;
                    if let ClientSessionResult::OutboundResponse(p) = r {
                        wr.write_all(&p.bytes).await?;
                    }
                }
                ClientSessionResult::RaisedEvent(ClientSessionEvent::PublishRequestAccepted) => {
                    publishing = true
                }
                _ => {}
            }
        }
        if publishing {
            break;
        }
        if pending.is_empty() {
            let n = tokio::time::timeout(limit, rd.read(&mut buf))
                .await
                .context("waiting for the ingest to accept the publish")??;
            if n == 0 {
                return Err(anyhow!("ingest closed before accepting the publish"));
            }
            pending.extend_from_slice(&buf[..n]);
        }
        out = session
            .handle_input(&pending)
            .map_err(|e| anyhow!("{e:?}"))?;
        pending.clear();
    }
    // From here the ingest only acknowledges: read and drop, so its writes never stall.
    let drain = async move {
        let mut buf = vec![0u8; 4096];
        while rd.read(&mut buf).await.is_ok_and(|n| n > 0) {}
    };
    let send = async move {
        let mut flv = tokio::io::BufReader::new(flv);
        let mut header = [0u8; 13]; // FLV header and the first PreviousTagSize
        flv.read_exact(&mut header).await.context("FLV header")?;
        loop {
            let mut tag = [0u8; 11];
            if flv.read_exact(&mut tag).await.is_err() {
                return Ok(()); // ffmpeg stopped
            }
            let size = u32::from_be_bytes([0, tag[1], tag[2], tag[3]]) as usize;
            let ts = u32::from_be_bytes([tag[7], tag[4], tag[5], tag[6]]);
            let mut body = vec![0u8; size + 4]; // the tag and its PreviousTagSize
            flv.read_exact(&mut body).await.context("FLV tag")?;
            body.truncate(size);
            let data = bytes::Bytes::from(body);
            let r = match tag[0] {
                9 => session.publish_video_data(data, RtmpTimestamp::new(ts), false),
                8 => session.publish_audio_data(data, RtmpTimestamp::new(ts), false),
                _ => continue, // script data: the ingest reads the codec headers instead
            }
            .map_err(|e| anyhow!("{e:?}"))?;
            if let ClientSessionResult::OutboundResponse(p) = r {
                wr.write_all(&p.bytes).await.context("RTMP write")?;
            }
        }
    };
    tokio::select! {
        r = send => r,
        _ = drain => Err(anyhow!("ingest closed the connection")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(dir: &Path) -> DemoOptions {
        DemoOptions {
            source: None,
            keys: vec!["load1=secret-1".into()],
            data_dir: dir.to_path_buf(),
            rtmp: "127.0.0.1:1935".into(),
            rtmps: "127.0.0.1:1936".into(),
            http: "127.0.0.1:8080".into(),
            https: "127.0.0.1:8443".into(),
            origin: "127.0.0.1:8090".into(),
            relay: "127.0.0.1:4433".into(),
            edge_admin: "127.0.0.1:9090".into(),
            core_admin: "127.0.0.1:9091".into(),
        }
    }

    #[test]
    fn the_demo_uses_the_example_configs_with_its_addresses() {
        let dir = std::env::temp_dir().join(format!("livepop-demo-unit-{}", std::process::id()));
        crate::certs::generate(&dir.join("dev-certs"), false).unwrap();
        let mut o = opts(&dir);
        o.http = "127.0.0.1:0".into();
        let (core, edge) = configs(&o).unwrap();
        assert_eq!(core.relay.listen, "127.0.0.1:4433");
        assert_eq!(core.origin.unwrap().listen, "127.0.0.1:8090");
        assert!(core.transcode.is_some(), "the demo offers a ladder");
        let p = edge.playback.unwrap();
        assert_eq!(p.listen, "127.0.0.1:0");
        assert!(p.player);
        assert_eq!(edge.relay.cert, dir.join("dev-certs/edge.pem"));
        assert!(edge
            .auth
            .streams
            .iter()
            .any(|s| s.name == "load1" && s.key == "secret-1"));
        o.keys = vec!["bad name=x".into()];
        assert!(configs(&o).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_test_source_clock_starts_at_the_wall_time() {
        // 2026-11-24 10:20:30.250 UTC
        let ms = 1_795_861_230_250u128;
        let args = testsrc_args(ms);
        let vf = &args[args.iter().position(|a| a == "-vf").unwrap() + 1];
        assert!(vf.contains("hms\\:37230.250"), "{vf}");
        // FLV to a pipe: the key never is on ffmpeg's command line.
        assert_eq!(args.last().unwrap(), "pipe:1");
        assert!(!args.iter().any(|a| a.contains(KEY) || a.contains("rtmp")));
    }
}
