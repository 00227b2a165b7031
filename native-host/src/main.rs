//! `tollgate`: the native gateway server and its command-line tools.

mod access_log;
mod admin;
mod body;
mod envoy;
mod metrics;
mod proxy;
mod redis_store;
mod request_body;
mod server;
mod shards;
mod store;
mod store_server;
mod upstream;

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

// mimalloc: each thread allocates from pages of its own, as the per-core workers run (glibc's
// malloc took 7 % of a streamed request's CPU).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tollgate_core::auth::KeyHash;
use tollgate_core::config::store::{OnFailure, StoreSettings};
use tollgate_core::Config;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "An LLM API gateway: key injection, token-aware limits, prompt endpoints"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the gateway.
    Run {
        /// Config file (YAML or JSON).
        #[arg(long, short)]
        config: PathBuf,
        /// Listen here instead of `server.listen` (port 0 picks a free port).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Serve `GET /metrics` here instead of `server.metrics_listen` (port 0 picks a free
        /// port; "" serves none).
        #[arg(long)]
        metrics_listen: Option<String>,
    },
    /// Check a config file; prints every problem with its path and exits non-zero if any.
    Check { config: PathBuf },
    /// Print the SHA-256 to put in `consumers[].keys[].sha256` for a consumer key read from
    /// standard input (or given as an argument, which leaves it in your shell history).
    HashKey { key: Option<String> },
    /// Generate a new random consumer key and print it with its hash.
    NewKey,
    /// Serve Envoy's commits of shared state on Redis (`store.kind: redis`): `POST
    /// /v1/store/commit`, one Lua script per commit, and `GET /healthz`.
    StoreServer {
        /// Config file (YAML or JSON); its `store` section must be `kind: redis`.
        #[arg(long, short)]
        config: PathBuf,
        /// Listen here instead of `store.server` (port 0 picks a free port).
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Print an Envoy bootstrap that runs the tollgate filter with this config.
    EnvoyBootstrap {
        #[arg(long, short)]
        config: PathBuf,
        /// Path of tollgate_filter.wasm as Envoy will see it.
        #[arg(long)]
        wasm: String,
        #[arg(long, default_value = "127.0.0.1:10000")]
        listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: SocketAddr,
        /// Put the listener and clusters in DIR/lds.yaml and DIR/cds.yaml (file-based xDS)
        /// instead of the bootstrap. Running the command again with a changed config
        /// rewrites them, and a running Envoy reloads them: counters of unchanged limits
        /// are kept.
        #[arg(long, value_name = "DIR")]
        xds_dir: Option<PathBuf>,
    },
}

/// Milliseconds since the Unix epoch: the `now` the core is given.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// `text`'s local share of its limits, for a process whose store is `store` (the running
/// one: a store change takes effect on restart), when Redis is down under `on_failure: local`.
fn local_share(text: &str, store: &StoreSettings) -> Option<Config> {
    let StoreSettings::Redis(redis) = store else {
        return None;
    };
    if redis.on_failure != OnFailure::Local {
        return None;
    }
    let mut share = Config::load(text, &env).ok()?;
    share.divide_limits(redis.replicas);
    Some(share)
}

fn load(path: &Path) -> Result<(String, Config), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let config = Config::load(&text, &env).map_err(|errors| {
        let n = errors.0.len();
        format!(
            "{}: {n} problem{}:\n{errors}",
            path.display(),
            if n == 1 { "" } else { "s" }
        )
    })?;
    Ok((text, config))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            config,
            listen,
            metrics_listen,
        } => run(&config, listen, metrics_listen),
        Command::Check { config } => load(&config).map(|(_, c)| {
            println!(
                "{}: ok ({} consumers, {} providers, {} models, {} prompts)",
                config.display(),
                c.consumers().len(),
                c.providers().len(),
                c.models().len(),
                c.prompts().len()
            );
        }),
        Command::StoreServer { config, listen } => store_server(&config, listen),
        Command::HashKey { key } => hash_key(key),
        Command::NewKey => new_key(),
        Command::EnvoyBootstrap {
            config,
            wasm,
            listen,
            admin,
            xds_dir,
        } => {
            // Rendering needs the names of the secrets' env vars, not their values.
            std::fs::read_to_string(&config)
                .map_err(|e| format!("{}: {e}", config.display()))
                .and_then(|text| {
                    let placeholder = |_: &str| Some("unused".to_string());
                    let c = Config::load(&text, &placeholder)
                        .map_err(|e| format!("{}:\n{e}", config.display()))?;
                    if let StoreSettings::Redis(redis) = &c.store {
                        if redis.server.is_none() {
                            return Err(format!(
                                "{}: `store.kind: redis` in Envoy needs `store.server`: the \
                                 host:port of `tollgate store-server`, through which Envoy \
                                 commits its shared state (docs/redis.md)",
                                config.display()
                            ));
                        }
                    }
                    let rendered = envoy::render(&envoy::BootstrapOptions {
                        config_text: &text,
                        config: &c,
                        wasm_path: &wasm,
                        listen,
                        admin,
                        xds_dir: xds_dir.as_deref(),
                    });
                    if let (Some(dir), Some((lds, cds))) = (&xds_dir, &rendered.xds) {
                        // Clusters first, so a new listener never routes to a missing one.
                        write_atomically(&dir.join(envoy::CDS_FILE), cds)?;
                        write_atomically(&dir.join(envoy::LDS_FILE), lds)?;
                    }
                    print!("{}", rendered.bootstrap);
                    Ok(())
                })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("{message}");
            ExitCode::FAILURE
        }
    }
}

/// Envoy reloads a watched file when it is moved into place, never half-written.
fn write_atomically(path: &Path, content: &str) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

fn hash_key(key: Option<String>) -> Result<(), String> {
    let key = match key {
        Some(k) => k,
        None => {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .map_err(|e| e.to_string())?;
            line
        }
    };
    let key = key.trim();
    if key.is_empty() {
        return Err("no key given: pass it on standard input".into());
    }
    println!("{}", KeyHash::of(key).to_hex());
    Ok(())
}

fn new_key() -> Result<(), String> {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(|e| e.to_string())?;
    let key = format!(
        "tg-{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    println!("key:    {key}\nsha256: {}", KeyHash::of(&key).to_hex());
    Ok(())
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("TOLLGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if std::env::var("TOLLGATE_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn run(
    path: &Path,
    listen: Option<SocketAddr>,
    metrics_listen: Option<String>,
) -> Result<(), String> {
    init_logging();
    let (text, config) = load(path)?;
    let share = local_share(&text, &config.store);
    let addr: SocketAddr = match listen {
        Some(a) => a,
        None => config
            .server
            .listen
            .parse()
            .map_err(|e| format!("server.listen: {e}"))?,
    };
    serve_on(addr, |listener, local| async move {
        let store = match &config.store {
            StoreSettings::Local => store::Store::Local(store::MemoryStore::default()),
            StoreSettings::Redis(settings) => {
                let redis = redis_store::RedisStore::new(settings, &config)?;
                Arc::clone(&redis).probe(std::time::Duration::from_millis(250));
                Arc::clone(&redis).send_queued();
                store::Store::Redis {
                    redis,
                    fallback: store::MemoryStore::default(),
                }
            }
        };
        let gateway = Arc::new(
            proxy::Gateway::new(Arc::new(config), share, store)
                .map_err(|e| format!("TLS setup: {e}"))?,
        );
        warn_if_too_few_file_descriptors(gateway.config().server.max_connections);
        reload_on_sighup(Arc::clone(&gateway), path.to_path_buf());
        let metrics_addr =
            metrics_listen.unwrap_or_else(|| gateway.config().server.metrics_listen.clone());
        let metrics = metrics::bind(&metrics_addr).await;
        let metrics_local = metrics.as_ref().and_then(|l| l.local_addr().ok());
        if let Some(l) = metrics {
            tokio::spawn(metrics::serve(Arc::clone(&gateway), l));
        }
        tracing::info!(address = %local, "tollgate listening");
        // Lines on stdout, for scripts and tests that started us on port 0: where requests
        // go, then where metrics are scraped ("metrics off" when nowhere).
        println!("listening on {local}");
        match metrics_local {
            Some(m) => println!("metrics on {m}"),
            None => println!("metrics off"),
        }
        let _ = std::io::stdout().flush();
        server::serve(gateway, listener, server::shutdown_signal()).await;
        Ok(())
    })
}

/// Starts the runtime, binds `addr` and runs `serve` on the listener and its address.
fn serve_on<F, Fut>(addr: SocketAddr, serve: F) -> Result<(), String>
where
    F: FnOnce(tokio::net::TcpListener, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("listening on {addr}: {e}"))?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        serve(listener, local).await
    })
}

/// `tollgate store-server`: Envoy's way to Redis (docs/redis.md).
fn store_server(path: &Path, listen: Option<SocketAddr>) -> Result<(), String> {
    init_logging();
    // The store section as `run` reads it; the rest for its limits' math only: the
    // store-server needs no provider secrets.
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let store = Config::load_store(&text, &env)
        .map_err(|errors| format!("{}: {errors}", path.display()))?;
    let no_secrets = |name: &str| env(name).or_else(|| Some("(not needed here)".to_string()));
    let config = Config::load(&text, &no_secrets)
        .map_err(|errors| format!("{}: {errors}", path.display()))?;
    let StoreSettings::Redis(settings) = &store else {
        return Err(format!(
            "{}: `tollgate store-server` commits to Redis: the config needs `store.kind: redis` \
             (with its url)",
            path.display()
        ));
    };
    let addr = store_server::listen_address(listen, settings)?;
    let server = Arc::new(store_server::StoreServer::new(settings, &config)?);
    serve_on(addr, |listener, local| async move {
        tracing::info!(
            address = %local,
            redis = settings.url.as_str(),
            timeout_ms = settings.timeout_ms,
            "tollgate store-server listening"
        );
        // For scripts and tests that started us on port 0.
        println!("listening on {local}");
        let _ = std::io::stdout().flush();
        store_server::serve(server, listener, server::shutdown_signal()).await;
        Ok(())
    })
}

/// Each connection takes a file descriptor: a limit below `server.max_connections` would
/// make accepting fail before the cap is reached (Linux: read from /proc/self/limits).
fn warn_if_too_few_file_descriptors(max_connections: u64) {
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else {
        return;
    };
    let soft = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok());
    // Room for the listener, logs and connections to providers.
    const SPARE: u64 = 256;
    if let Some(soft) = soft {
        if soft < max_connections.saturating_add(SPARE) {
            tracing::warn!(
                open_files_limit = soft,
                max_connections,
                "the open files limit (ulimit -n) is below server.max_connections plus {SPARE}: \
                 raise it, or accepting connections will fail before the cap is reached"
            );
        }
    }
}

/// On SIGHUP, loads the config file again and, if it is valid, serves new requests with it.
/// Counters are keyed by each limit's scope, name and value, so limits that did not change
/// keep their state. An invalid file is reported and the running config kept.
fn reload_on_sighup(gateway: Arc<proxy::Gateway>, path: PathBuf) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            tracing::warn!("SIGHUP cannot be handled: config reload is off");
            return;
        };
        while hangups.recv().await.is_some() {
            match load(&path) {
                Ok((text, config)) => {
                    let running = gateway.config();
                    for (setting, was, now) in [
                        (
                            "server.max_connections",
                            running.server.max_connections,
                            config.server.max_connections,
                        ),
                        (
                            "server.max_body_memory_bytes",
                            running.server.max_body_memory_bytes,
                            config.server.max_body_memory_bytes,
                        ),
                    ] {
                        if was != now {
                            tracing::warn!(
                                setting,
                                running = was,
                                new = now,
                                "this setting takes effect on restart; the running value is kept"
                            );
                        }
                    }
                    if config.store != running.store {
                        tracing::warn!(
                            "the store section takes effect on restart; the running store is kept"
                        );
                    }
                    let share = local_share(&text, &running.store);
                    if let Some(redis) = gateway.store.redis() {
                        redis.set_limits(&config);
                    }
                    gateway.replace_config(config, share);
                    tracing::info!(config = %path.display(), "config reloaded");
                }
                Err(errors) => {
                    tracing::error!("config not reloaded, keeping the running one: {errors}")
                }
            }
        }
    });
    #[cfg(not(unix))]
    let _ = (gateway, path);
}
