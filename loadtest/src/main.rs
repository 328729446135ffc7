//! `livepop-loadtest`: load that looks like real viewers and streamers, against any HLS or
//! LL-HLS URL (livepop's, or a peer's for comparison), with a report of what they experienced:
//! latency, stalls, errors, and HdrHistogram percentiles per request kind.

mod hls;
mod http;
mod plot;
mod publisher;
mod stats;
mod viewer;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

// Thousands of simulated players allocate per request and per playlist; mimalloc cut the
// generator's CPU per request (it must stay cheaper than the server it loads).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Load generator for HLS / LL-HLS playback and RTMP publishing.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Simulated players: multivariant playlist, a rendition (fixed or ABR), blocking playlist
    /// reloads and preload-hinted parts for LL-HLS (plain HLS works too), a playback buffer
    /// with stalls, and each part's latency from PROGRAM-DATE-TIME.
    Viewers(ViewersArgs),
    /// Simulated streamers: RTMP publishers each sending an FLV file (H.264/AAC) at real-time
    /// pace in a loop under their own stream key.
    Publishers(PublishersArgs),
}

#[derive(clap::Args)]
struct ViewersArgs {
    /// Multivariant (or media) playlist URL, e.g. http://127.0.0.1:8080/live/demo/master.m3u8.
    #[arg(long)]
    url: String,
    /// Number of viewers.
    #[arg(long, default_value_t = 100)]
    count: usize,
    /// Length of the run in seconds: no request starts after it; requests in flight finish
    /// (within --timeout-ms), so the report counts every request the server saw.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// Seconds over which viewers start, evenly spaced (open loop: on schedule however slowly
    /// the server answers).
    #[arg(long, default_value_t = 0.0)]
    ramp: f64,
    /// Rendition: auto (ABR from measured throughput), highest, lowest, or text contained in
    /// the variant's URI (e.g. 360p).
    #[arg(long, default_value = "auto")]
    rendition: viewer::Choice,
    /// Seconds at the start left out of the summary's latency and stall figures (they stay on
    /// the per-second timeline): joining viewers start behind the live edge.
    #[arg(long, default_value_t = 0.0)]
    warmup: f64,
    /// auto: LL-HLS when the playlist offers parts and blocking reloads; plain: whole segments
    /// and periodic reloads even then.
    #[arg(long, value_enum, default_value = "auto")]
    mode: viewer::Mode,
    /// auto: HTTP/2 over TLS by ALPN (HTTP/1.1 for http://); h1: HTTP/1.1 only.
    #[arg(long, value_enum, default_value = "auto")]
    protocol: http::Protocol,
    /// PEM CA certificate(s) to trust for https:// URLs.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Accept any server certificate (test setups only).
    #[arg(long)]
    insecure: bool,
    /// Per-request timeout in ms (must exceed the server's blocking hold, 3 × target duration).
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Stop all viewers after this many requests.
    #[arg(long, default_value_t = 10_000_000)]
    max_requests: u64,
    /// Write the summary (and the per-second timeline) as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write a latency-over-time plot (SVG) to this file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// No live line per second.
    #[arg(long)]
    quiet: bool,
    /// Allow a target that is not on this machine (loopback); load on other people's servers
    /// must be intended.
    #[arg(long)]
    allow_remote: bool,
}

#[derive(clap::Args)]
struct PublishersArgs {
    /// RTMP URL up to the application, e.g. rtmp://127.0.0.1:1935/live.
    #[arg(long)]
    url: String,
    /// File with one stream key per line; publisher i uses line i.
    #[arg(long)]
    keys_file: PathBuf,
    /// Number of publishers (at most the number of keys).
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Length of the run in seconds.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// The FLV file (H.264 video, AAC audio) every publisher sends. Without it, a 10 s
    /// 640×360 test pattern with a tone is encoded with the ffmpeg CLI first.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Allow a target that is not on this machine (loopback).
    #[arg(long)]
    allow_remote: bool,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("livepop-loadtest: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let r = rt.block_on(async {
        match cli.command {
            Command::Viewers(a) => viewers(a).await,
            Command::Publishers(a) => publishers(a).await,
        }
    });
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("livepop-loadtest: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Refuses targets that do not resolve to loopback only, unless allowed.
async fn check_target(host_port: &str, allow_remote: bool) -> Result<()> {
    let addrs: Vec<_> = tokio::net::lookup_host(host_port)
        .await
        .with_context(|| format!("resolving {host_port}"))?
        .collect();
    if addrs.is_empty() {
        bail!("{host_port} does not resolve");
    }
    if !allow_remote && addrs.iter().any(|a| !a.ip().is_loopback()) {
        bail!(
            "{host_port} is not on this machine (loopback); pass --allow-remote to load it anyway"
        );
    }
    Ok(())
}

/// `host:port` of an http(s) URL.
fn http_authority(url: &str) -> Result<String> {
    let (scheme, rest) = url
        .split_once("://")
        .with_context(|| format!("{url}: not a URL"))?;
    let port = match scheme {
        "http" => 80,
        "https" => 443,
        _ => bail!("{url}: only http:// and https:// URLs"),
    };
    let auth = rest.split('/').next().unwrap_or("");
    if auth.is_empty() {
        bail!("{url}: no host");
    }
    // [::1]:8080, host:8080, host
    Ok(if auth.ends_with(']') || !auth.contains(':') {
        format!("{auth}:{port}")
    } else {
        auth.to_string()
    })
}

async fn viewers(a: ViewersArgs) -> Result<()> {
    check_target(&http_authority(&a.url)?, a.allow_remote).await?;
    if a.count == 0 {
        bail!("--count must be at least 1");
    }
    let tls = http::tls_config(a.ca.as_deref(), a.insecure)?;
    let stats =
        Arc::new(stats::Stats::new().with_warmup(Duration::from_secs_f64(a.warmup.max(0.0))));
    let start = tokio::time::Instant::from_std(stats.started());
    let deadline = start + Duration::from_secs(a.duration);
    let shared = Arc::new(viewer::Shared {
        stats: stats.clone(),
        budget: AtomicU64::new(a.max_requests),
        deadline,
        timeout: Duration::from_millis(a.timeout_ms),
        choice: a.rendition.clone(),
        mode: a.mode,
    });
    let mut tasks = tokio::task::JoinSet::new();
    // Open loop: viewer i starts at i × ramp / count, whatever the server does.
    let spacing = Duration::from_secs_f64(a.ramp.max(0.0) / a.count as f64);
    let url = a.url.clone();
    let sh = shared.clone();
    let spawner = tokio::spawn(async move {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..a.count {
            let at = start + spacing * i as u32;
            if at >= deadline {
                break;
            }
            tokio::time::sleep_until(at).await;
            let client = http::client(&tls, a.protocol);
            set.spawn(viewer::run(sh.clone(), client, url.clone()));
        }
        while set.join_next().await.is_some() {}
    });
    tasks.spawn(async move {
        let _ = spawner.await;
    });
    // The live line, once a second.
    let quiet = a.quiet;
    let st = stats.clone();
    let ticker = tokio::spawn(async move {
        let zero = tokio::time::Instant::from_std(st.started());
        for t in 1.. {
            tokio::time::sleep_until(zero + Duration::from_secs(t)).await;
            let line = st.tick(t);
            if !quiet {
                println!("{line}");
            }
        }
    });
    // Viewers start no request after the deadline and finish those in flight (each bounded by
    // the request timeout).
    let grace = deadline + Duration::from_millis(a.timeout_ms) * 2 + Duration::from_secs(1);
    while let Ok(Some(_)) = tokio::time::timeout_at(grace, tasks.join_next()).await {}
    ticker.abort();
    let summary = stats.summary();
    print!("{}", stats::render(&summary));
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &a.plot {
        std::fs::write(p, plot::svg(&summary.timeline, &a.url))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

async fn publishers(a: PublishersArgs) -> Result<()> {
    let (addr, _app) = publisher::parse_url(&a.url)?;
    check_target(&addr, a.allow_remote).await?;
    let keys: Vec<String> = std::fs::read_to_string(&a.keys_file)
        .with_context(|| format!("reading {}", a.keys_file.display()))?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    if a.count == 0 || a.count > keys.len() {
        bail!(
            "--count {} but {} holds {} keys",
            a.count,
            a.keys_file.display(),
            keys.len()
        );
    }
    let bytes = match &a.file {
        Some(f) => std::fs::read(f).with_context(|| format!("reading {}", f.display()))?,
        None => test_flv()?,
    };
    let name = a
        .file
        .as_ref()
        .map_or("the test FLV".into(), |f| f.display().to_string());
    let tags = Arc::new(publisher::read_flv(&bytes).with_context(|| name)?);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(a.duration);
    let reports: Vec<Arc<Mutex<publisher::PublisherReport>>> =
        (0..a.count).map(|_| Arc::default()).collect();
    let mut set = tokio::task::JoinSet::new();
    for (i, key) in keys.into_iter().take(a.count).enumerate() {
        set.spawn(publisher::run(
            i,
            a.url.clone(),
            key,
            tags.clone(),
            deadline,
            reports[i].clone(),
        ));
    }
    let st = reports.clone();
    let ticker = tokio::spawn(async move {
        let mut t = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            t += 1;
            let r: Vec<_> = st
                .iter()
                .map(|r| r.lock().unwrap_or_else(|p| p.into_inner()).clone())
                .collect();
            println!(
                "t={t:>4}s publishing={} frames={} connect_failures={} max_backlog={}ms",
                r.iter().filter(|r| r.sessions > r.disconnects).count(),
                r.iter().map(|r| r.frames).sum::<u64>(),
                r.iter().map(|r| r.connect_failures).sum::<u64>(),
                r.iter().map(|r| r.max_backlog_ms).max().unwrap_or(0),
            );
        }
    });
    while set.join_next().await.is_some() {}
    ticker.abort();
    let r: Vec<publisher::PublisherReport> = reports
        .iter()
        .map(|r| r.lock().unwrap_or_else(|p| p.into_inner()).clone())
        .collect();
    println!("\nsummary: {} publishers", r.len());
    for p in &r {
        println!(
            "publisher {}: sessions {}, disconnects {}, connect failures {}, frames {}, {:.1} MB, backlog max {} ms, at end {} ms{}",
            p.index,
            p.sessions,
            p.disconnects,
            p.connect_failures,
            p.frames,
            p.bytes as f64 / 1e6,
            p.max_backlog_ms,
            p.final_backlog_ms,
            p.last_error.as_ref().map_or(String::new(), |e| format!(", last error: {e}"))
        );
    }
    if let Some(p) = &a.json {
        std::fs::write(
            p,
            serde_json::to_vec_pretty(&serde_json::json!({ "publishers": r }))?,
        )
        .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// 10 s of 640×360 30 fps H.264 (2 s GOP, 800 kbit/s) and AAC, encoded by the ffmpeg CLI.
fn test_flv() -> Result<Vec<u8>> {
    let path = std::env::temp_dir().join(format!("livepop-loadtest-{}.flv", std::process::id()));
    let status = std::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-y"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=640x360:rate=30"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"])
        .args(["-t", "10", "-map", "0:v", "-map", "1:a"])
        .args([
            "-c:v", "libx264", "-preset", "veryfast", "-g", "60", "-bf", "0",
        ])
        .args(["-b:v", "800k", "-c:a", "aac", "-b:a", "96k", "-f", "flv"])
        .arg(&path)
        .status()
        .context("no --file given and the ffmpeg command is missing (apt install ffmpeg)")?;
    if !status.success() {
        bail!("ffmpeg could not encode the test FLV");
    }
    let bytes = std::fs::read(&path)?;
    let _ = std::fs::remove_file(&path);
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities() {
        assert_eq!(
            http_authority("http://127.0.0.1:8080/live/x").unwrap(),
            "127.0.0.1:8080"
        );
        assert_eq!(
            http_authority("https://localhost/live").unwrap(),
            "localhost:443"
        );
        assert_eq!(http_authority("http://[::1]/a").unwrap(), "[::1]:80");
        assert!(http_authority("ftp://x/").is_err());
    }

    #[tokio::test]
    async fn remote_targets_are_refused_unless_allowed() {
        assert!(check_target("127.0.0.1:8080", false).await.is_ok());
        assert!(check_target("[::1]:8080", false).await.is_ok());
        let e = check_target("192.0.2.1:80", false).await.unwrap_err();
        assert!(e.to_string().contains("--allow-remote"), "{e}");
        assert!(check_target("192.0.2.1:80", true).await.is_ok());
    }
}
