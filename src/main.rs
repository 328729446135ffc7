//! The `livepop` command: parses the command line, loads config, wires the role and waits.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use livepop::{certs, config, roles, shutdown};
use std::path::PathBuf;
use std::time::Duration;

// The edge allocates a little per request (Pingora sessions, headers); mimalloc's thread-local
// free lists measured ~10% less CPU per cached hit than glibc malloc (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// livepop: a live-streaming edge PoP (RTMP/RTMPS ingest, QUIC relay) and regional core.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log one JSON object per line instead of human-readable text.
    #[arg(long, global = true, env = "LIVEPOP_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a core and an edge in one process with the example configs (edge-config/) and
    /// print the publish and player URLs. Stream "demo", key "demo-key".
    Demo(Box<livepop::demo::DemoOptions>),
    /// Run an edge: accept RTMP/RTMPS publishers and relay their streams to a core over QUIC.
    Edge {
        /// Edge config file (see edge-config/edge.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a core: receive streams relayed by edges.
    Core {
        /// Core config file (see edge-config/core.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Print a signed playback URL for a stream, with a key from an edge config's
    /// [playback.access] (see README, "Signed playback URLs").
    SignUrl {
        /// Edge config holding the signing keys.
        #[arg(long)]
        config: PathBuf,
        /// Stream name.
        #[arg(long)]
        stream: String,
        /// Key id to sign with (default: the last key listed, the newest by convention).
        #[arg(long)]
        key_id: Option<String>,
        /// Seconds the URL stays valid.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// Path prefix the URL opens (default: /live/STREAM/, every object of the stream).
        #[arg(long)]
        prefix: Option<String>,
        /// Scheme and host viewers reach the edge at.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        base: String,
    },
    /// Validate a config file (edge or core) and exit: 0 if valid, 1 with the problem if not.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Write a development CA and certificates for localhost into DIR (kept if present).
    DevCerts {
        /// Target directory (edge-config/dev-certs for the example configs).
        dir: PathBuf,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
        /// Also write an edge certificate for this node id (node-ID.pem/.key); repeatable.
        /// The default edge.pem names node `edge-1`.
        #[arg(long = "edge", value_name = "NODE_ID")]
        edges: Vec<String>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    livepop::telemetry::init_logging(cli.log_json);
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("livepop: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::CheckConfig { file } => {
            match config::load_any(&file)? {
                config::AnyConfig::Edge(_) => println!("{}: valid edge config", file.display()),
                config::AnyConfig::Core(_) => println!("{}: valid core config", file.display()),
            }
            Ok(())
        }
        Command::DevCerts { dir, force, edges } => {
            if certs::generate(&dir, force)? {
                println!("wrote development CA and certificates to {}", dir.display());
            } else {
                println!(
                    "{} already holds development certificates (use --force to replace)",
                    dir.display()
                );
            }
            for id in edges {
                certs::generate_edge(&dir, &id, force)?;
                println!("edge certificate for node {id}: node-{id}.pem");
            }
            Ok(())
        }
        Command::SignUrl {
            config,
            stream,
            key_id,
            ttl,
            prefix,
            base,
        } => {
            use livepop::edge::access::{sign, valid_prefix, Claims};
            let cfg = config::EdgeConfig::load(&config)?;
            let keys = cfg.playback.map(|p| p.access.keys).unwrap_or_default();
            let key = match &key_id {
                Some(id) => keys.iter().find(|k| &k.id == id),
                None => keys.last(),
            }
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: no signing key {} in [playback.access]",
                    config.display(),
                    key_id.as_deref().unwrap_or("at all")
                )
            })?;
            if !config::valid_stream_name(&stream) {
                anyhow::bail!("{stream:?} is not a valid stream name");
            }
            let prefix = prefix.unwrap_or_else(|| format!("/live/{stream}/"));
            if !valid_prefix(&prefix) || !format!("/live/{stream}/").starts_with(&prefix) {
                anyhow::bail!(
                    "prefix {prefix:?} must be a path under /live/ ending in / that contains the stream"
                );
            }
            let expires = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs()
                .saturating_add(ttl);
            let secret = key.secret_bytes().context("signing key")?;
            let token = sign(
                &Claims {
                    key_id: key.id.clone(),
                    expires,
                    prefix,
                },
                &secret,
            );
            println!(
                "{}/t/{token}/live/{stream}/master.m3u8",
                base.trim_end_matches('/')
            );
            Ok(())
        }
        Command::Demo(opts) => serve(|sd| livepop::demo::start(*opts, sd)),
        Command::Edge { config } => {
            let cfg = config::EdgeConfig::load(&config)?;
            serve(|sd| roles::start_edge(cfg, sd))
        }
        Command::Core { config } => {
            let cfg = config::CoreConfig::load(&config)?;
            serve(|sd| roles::start_core(cfg, sd))
        }
    }
}

fn serve<F, Fut>(start: F) -> Result<()>
where
    F: FnOnce(shutdown::Shutdown) -> Fut,
    Fut: std::future::Future<Output = Result<roles::Running>>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async {
        let (trigger, sd) = shutdown::channel();
        let mut running = start(sd).await?;
        wait_for_signal().await;
        tracing::info!("shutting down");
        trigger.trigger();
        let drain = async { while running.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(5), drain)
            .await
            .is_err()
        {
            tracing::warn!("tasks did not stop within 5 s; exiting anyway");
        }
        Ok(())
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
