//! Starts tollgate under test, in either host, and stops it when dropped — also when a test
//! fails, since unwinding drops it.
//!
//! Binaries are found through environment variables that `make test` sets, else at their
//! usual places in the workspace: `TOLLGATE_BIN` (target/debug/tollgate), `TOLLGATE_WASM`
//! (target/wasm32-wasip1/release/tollgate_filter.wasm), `ENVOY_BIN` (.venv/bin/envoy).
//! A missing one is a test failure that says how to build it, never a skip; so is one older
//! than the sources it is built from (checked once per process), since `cargo test` alone does
//! not rebuild the filter or, for this crate's tests, the binary.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

/// Which host runs the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host {
    Native,
    /// Real Envoy with this many worker threads.
    Envoy {
        workers: u32,
    },
}

fn workspace() -> PathBuf {
    let tests = Path::new(env!("CARGO_MANIFEST_DIR"));
    tests.parent().unwrap_or(tests).to_path_buf()
}

fn binary(var: &str, default: &str, how: &str) -> PathBuf {
    let path = std::env::var_os(var).map_or_else(|| workspace().join(default), PathBuf::from);
    assert!(
        path.exists(),
        "{} not found (set {var}, or run `{how}`; `make test` does it all)",
        path.display()
    );
    path
}

pub fn tollgate_bin() -> PathBuf {
    const BUILD: &str = "cargo build -p tollgate";
    static FRESH: OnceLock<Result<(), String>> = OnceLock::new();
    let path = binary("TOLLGATE_BIN", "target/debug/tollgate", BUILD);
    if let Err(why) = FRESH.get_or_init(|| check_fresh(&path, &workspace(), BIN_SOURCES, BUILD)) {
        panic!("{why}");
    }
    path
}

pub fn wasm_path() -> PathBuf {
    static FRESH: OnceLock<Result<(), String>> = OnceLock::new();
    filter_module(
        "TOLLGATE_WASM",
        "target/wasm32-wasip1/release/tollgate_filter.wasm",
        "make wasm",
        &FRESH,
    )
}

/// A test build of the filter that crashes its VM on a request with `x-tollgate-test-trap: 1`
/// (feature `test-trap`), never the release module.
pub fn trap_wasm_path() -> PathBuf {
    static FRESH: OnceLock<Result<(), String>> = OnceLock::new();
    filter_module(
        "TOLLGATE_TRAP_WASM",
        "target/wasm32-wasip1/trap-test/tollgate_filter.wasm",
        "make wasm-trap",
        &FRESH,
    )
}

/// A build of the filter, checked once (`fresh`) to be newer than its sources.
fn filter_module(
    env: &str,
    default: &str,
    build: &str,
    fresh: &OnceLock<Result<(), String>>,
) -> PathBuf {
    let path = binary(env, default, build);
    if let Err(why) = fresh.get_or_init(|| check_fresh(&path, &workspace(), WASM_SOURCES, build)) {
        panic!("{why}");
    }
    path
}

/// The workspace crates the native binary is built from.
const BIN_SOURCES: &[&str] = &["core", "native-host"];
/// The workspace crates the filter is built from.
const WASM_SOURCES: &[&str] = &["core", "filter"];

/// The newest file among an artifact's sources: in each of the workspace crates `crates`, its
/// `Cargo.toml`, `build.rs` and every file under `src`; and the workspace's `Cargo.toml` and
/// `Cargo.lock`. Not what a crate does not build into the artifact (its `tests`, `benches`,
/// `target`, a `proptest-regressions` file a failing test wrote): cargo would not rebuild the
/// artifact when that changes, so it would stay "stale". Nor hidden files and editor backups
/// (`.x.rs.swp`, `x.rs~`), which an open editor changes.
fn newest_source(workspace: &Path, crates: &[&str]) -> Option<(PathBuf, SystemTime)> {
    fn walk(dir: &Path, newest: &mut Option<(PathBuf, SystemTime)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') || name.ends_with('~') {
                continue;
            }
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&entry.path(), newest);
            } else {
                consider(&entry.path(), newest);
            }
        }
    }
    fn consider(path: &Path, newest: &mut Option<(PathBuf, SystemTime)>) {
        // `metadata` follows symlinks: a linked source counts with its target's time.
        let Ok(modified) = std::fs::metadata(path).and_then(|m| m.modified()) else {
            return;
        };
        if newest.as_ref().is_none_or(|(_, t)| modified > *t) {
            *newest = Some((path.to_path_buf(), modified));
        }
    }
    let mut newest = None;
    for krate in crates {
        let krate = workspace.join(krate);
        walk(&krate.join("src"), &mut newest);
        for file in ["Cargo.toml", "build.rs"] {
            consider(&krate.join(file), &mut newest);
        }
    }
    for file in ["Cargo.toml", "Cargo.lock"] {
        consider(&workspace.join(file), &mut newest);
    }
    newest
}

/// `Err` saying what to run when a source of `artifact` (see `newest_source`) changed after
/// it was built.
fn check_fresh(
    artifact: &Path,
    workspace: &Path,
    crates: &[&str],
    rebuild: &str,
) -> Result<(), String> {
    let built = std::fs::metadata(artifact)
        .and_then(|m| m.modified())
        .map_err(|e| format!("{}: {e}", artifact.display()))?;
    let Some((source, changed)) = newest_source(workspace, crates) else {
        return Ok(());
    };
    let Ok(after) = changed.duration_since(built) else {
        return Ok(());
    };
    if after.is_zero() {
        return Ok(());
    }
    let source = source.strip_prefix(workspace).unwrap_or(&source);
    Err(format!(
        "{} is stale: {} changed {:.1} s after it was built. Rebuild it with `{rebuild}` \
         (`make test` rebuilds everything and runs every test). If cargo finds nothing to \
         rebuild (a manifest change that does not affect it), `touch {}`.",
        artifact.display(),
        source.display(),
        after.as_secs_f64(),
        artifact.display(),
    ))
}

pub fn envoy_bin() -> PathBuf {
    binary("ENVOY_BIN", ".venv/bin/envoy", "make envoy-install")
}

/// A scratch directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("tollgate-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running gateway process. Dropping it kills the process and waits for it.
pub struct Gateway {
    pub host: Host,
    pub addr: SocketAddr,
    child: Child,
    log_path: PathBuf,
    config_path: PathBuf,
    /// Envoy serving its listener and clusters from files (see `start_envoy_with_xds`).
    xds: Option<Xds>,
    /// Envoy's admin address.
    envoy_admin: Option<String>,
    /// The address Envoy's listener was configured with (`127.0.0.1:0` unless it has a fixed
    /// port), which its stats are named after.
    envoy_listen: Option<String>,
    /// The native host's metrics listener (`GET /metrics`).
    metrics_addr: Option<SocketAddr>,
    _dir: TempDir,
}

struct Xds {
    dir: PathBuf,
    admin: String,
}

impl Gateway {
    /// Starts the gateway on `config` (YAML text), with `env` added to its environment.
    pub fn start(host: Host, config: &str, env: &[(&str, &str)]) -> Gateway {
        Self::try_start(host, config, env).unwrap_or_else(|why| panic!("{why}"))
    }

    /// Like `start`, but a gateway that refuses to start is an `Err` with the reason and the
    /// process's log.
    pub fn try_start(host: Host, config: &str, env: &[(&str, &str)]) -> Result<Gateway, String> {
        let dir = TempDir::new(match host {
            Host::Native => "native",
            Host::Envoy { .. } => "envoy",
        });
        let config_path = dir.path().join("tollgate.yaml");
        std::fs::write(&config_path, config).expect("write config");
        match host {
            Host::Native => start_native(dir, &config_path, env),
            Host::Envoy { workers } => {
                start_envoy(dir, &config_path, env, workers, false, &wasm_path())
            }
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Where Prometheus scrapes this gateway: `(host:port, path)` — the native host's metrics
    /// listener, or Envoy's admin interface.
    pub fn metrics_target(&self) -> Option<(String, &'static str)> {
        match (&self.metrics_addr, &self.envoy_admin) {
            (Some(addr), _) => Some((addr.to_string(), "/metrics")),
            (None, Some(admin)) => Some((admin.clone(), "/stats/prometheus")),
            (None, None) => None,
        }
    }

    /// The gateway's metrics in Prometheus' text format, as Prometheus scrapes them.
    pub fn scrape(&self) -> Option<String> {
        let (addr, path) = self.metrics_target()?;
        admin_get(&addr, path)
    }

    /// The sum of the series of metric `name` whose labels include `labels`, from a scrape
    /// now (`None` when no series matches).
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        crate::prom::sum(&self.scrape()?, name, labels)
    }

    /// Envoy's stats whose names contain `filter`, as `name: value` lines (`None` for the
    /// native host).
    pub fn envoy_stats(&self, filter: &str) -> Option<String> {
        admin_get(
            self.envoy_admin.as_deref()?,
            &format!("/stats?filter={filter}"),
        )
    }

    /// How many connections each Envoy worker has accepted on the tollgate listener so far
    /// (`listener.<address>.worker_<N>.downstream_cx_total`), indexed by worker; `None` for
    /// the native host. Sequential requests on one kept-alive connection all reach one worker:
    /// a test that means to reach every worker sends on fresh connections
    /// (`scenario::fresh_client`).
    pub fn envoy_worker_connections(&self) -> Option<Vec<u64>> {
        let Host::Envoy { workers } = self.host else {
            return None;
        };
        let listen = self.envoy_listen.as_deref()?;
        let prefix = format!("listener.{}.worker_", listen.replace(':', "_"));
        let stats = self.envoy_stats(&prefix).unwrap_or_else(|| {
            panic!(
                "Envoy's admin API did not answer for stats:\n{}",
                self.logs()
            )
        });
        let mut counts = vec![None; workers as usize];
        for line in stats.lines() {
            let Some((worker, stat)) = line.strip_prefix(&prefix).and_then(|l| l.split_once('.'))
            else {
                continue;
            };
            let Some(value) = stat.strip_prefix("downstream_cx_total: ") else {
                continue;
            };
            if let (Ok(worker), Ok(value)) = (worker.parse::<usize>(), value.trim().parse()) {
                if let Some(count) = counts.get_mut(worker) {
                    *count = Some(value);
                }
            }
        }
        let counts: Option<Vec<u64>> = counts.into_iter().collect();
        Some(counts.unwrap_or_else(|| {
            panic!("no {prefix}<N>.downstream_cx_total for each of {workers} workers in:\n{stats}")
        }))
    }

    /// Everything the process logged so far.
    /// The gateway process's id (Envoy's, for Envoy).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The gateway process's resident memory now, from `/proc` (Linux).
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Starts Envoy with its listener and clusters in watched files (file-based xDS), so that
    /// `reload` can change the config of the running process.
    pub fn start_envoy_with_xds(config: &str, env: &[(&str, &str)], workers: u32) -> Gateway {
        let dir = TempDir::new("envoy-xds");
        let config_path = dir.path().join("tollgate.yaml");
        std::fs::write(&config_path, config).expect("write config");
        start_envoy(dir, &config_path, env, workers, true, &wasm_path())
            .unwrap_or_else(|why| panic!("{why}"))
    }

    /// Starts Envoy with another build of the filter than the release one (e.g.
    /// `trap_wasm_path`).
    pub fn start_envoy_with_module(
        config: &str,
        env: &[(&str, &str)],
        workers: u32,
        wasm: &Path,
    ) -> Gateway {
        let dir = TempDir::new("envoy-module");
        let config_path = dir.path().join("tollgate.yaml");
        std::fs::write(&config_path, config).expect("write config");
        start_envoy(dir, &config_path, env, workers, false, wasm)
            .unwrap_or_else(|why| panic!("{why}"))
    }

    /// Writes a new config and has the running gateway load it: SIGHUP for the native host,
    /// new xDS files for Envoy. Returns once the gateway says whether it took the config
    /// (`true`) or refused it (`false`).
    pub fn reload(&self, config: &str) -> bool {
        if let Some(xds) = &self.xds {
            return self.reload_envoy(xds, config);
        }
        assert_eq!(
            self.host,
            Host::Native,
            "Envoy reloads only when started with start_envoy_with_xds"
        );
        let count = |logs: &str, what: &str| logs.matches(what).count();
        let before = self.logs();
        let (ok0, err0) = (
            count(&before, "config reloaded"),
            count(&before, "config not reloaded"),
        );
        std::fs::write(&self.config_path, config).expect("write config");
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-HUP", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let logs = self.logs();
            if count(&logs, "config reloaded") > ok0 {
                return true;
            }
            if count(&logs, "config not reloaded") > err0 {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("no reload logged after SIGHUP:\n{}", self.logs());
    }

    fn reload_envoy(&self, xds: &Xds, config: &str) -> bool {
        let stat = |name: &str| -> u64 {
            admin_get(&xds.admin, &format!("/stats?filter={name}"))
                .and_then(|b| {
                    b.lines().find_map(|l| {
                        l.strip_prefix(&format!("{name}: "))
                            .and_then(|v| v.trim().parse().ok())
                    })
                })
                .unwrap_or(0)
        };
        let (ok0, bad0) = (
            stat("listener_manager.lds.update_success"),
            stat("listener_manager.lds.update_rejected"),
        );
        std::fs::write(&self.config_path, config).expect("write config");
        if render(
            &self.config_path,
            &self.addr.to_string(),
            "127.0.0.1:0",
            Some(&xds.dir),
            &wasm_path(),
        )
        .is_err()
        {
            return false;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if stat("listener_manager.lds.update_rejected") > bad0 {
                return false;
            }
            if stat("listener_manager.lds.update_success") > ok0
                && stat("listener_manager.total_listeners_warming") == 0
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("Envoy did not take the new listener:\n{}", self.logs());
    }

    /// Sends SIGTERM and waits (bounded) for a clean exit; returns whether it exited 0.
    pub fn terminate(mut self) -> bool {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_native(dir: TempDir, config: &Path, env: &[(&str, &str)]) -> Result<Gateway, String> {
    let log_path = dir.path().join("tollgate.log");
    let log = std::fs::File::create(&log_path).expect("create log");
    let mut child = Command::new(tollgate_bin())
        .args(["run", "--config"])
        .arg(config)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("start tollgate");
    // The first stdout lines say where it listens and serves metrics; read them on a thread
    // so that a gateway that never prints cannot hang the suite.
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let read = reader.read_line(&mut line);
        let mut metrics = String::new();
        if read.is_ok() {
            let _ = reader.read_line(&mut metrics);
        }
        line.push_str(&metrics);
        let _ = tx.send((read.map_err(|e| e.to_string()), line));
    });
    let (read, line) = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| (Err("timed out".into()), String::new()));
    let mut lines = line.lines();
    let addr = lines
        .next()
        .unwrap_or_default()
        .trim()
        .strip_prefix("listening on ")
        .and_then(|a| a.parse().ok());
    let metrics_addr = lines
        .next()
        .unwrap_or_default()
        .trim()
        .strip_prefix("metrics on ")
        .and_then(|a| a.parse().ok());
    let Some(addr) = addr else {
        let _ = child.kill();
        let _ = child.wait();
        let logs = std::fs::read_to_string(&log_path).unwrap_or_default();
        return Err(format!(
            "tollgate did not start ({read:?}, stdout {line:?}); its log:\n{logs}"
        ));
    };
    Ok(Gateway {
        host: Host::Native,
        addr,
        child,
        log_path,
        config_path: config.to_path_buf(),
        xds: None,
        envoy_admin: None,
        envoy_listen: None,
        metrics_addr,
        _dir: dir,
    })
}

/// Runs `tollgate envoy-bootstrap`; with `xds_dir` it also (re)writes the resource files.
fn render(
    config: &Path,
    listen: &str,
    admin: &str,
    xds_dir: Option<&Path>,
    wasm: &Path,
) -> Result<Vec<u8>, String> {
    let mut cmd = Command::new(tollgate_bin());
    cmd.args(["envoy-bootstrap", "--config"])
        .arg(config)
        .arg("--wasm")
        .arg(wasm)
        .args(["--listen", listen, "--admin", admin]);
    if let Some(dir) = xds_dir {
        cmd.arg("--xds-dir").arg(dir);
    }
    let rendered = cmd.output().expect("run tollgate envoy-bootstrap");
    if rendered.status.success() {
        Ok(rendered.stdout)
    } else {
        Err(format!(
            "envoy-bootstrap failed: {}",
            String::from_utf8_lossy(&rendered.stderr)
        ))
    }
}

fn start_envoy(
    dir: TempDir,
    config: &Path,
    env: &[(&str, &str)],
    workers: u32,
    xds: bool,
    wasm: &Path,
) -> Result<Gateway, String> {
    // A listener served over xDS keeps its address across updates: give it a fixed port,
    // probed by binding then releasing it. Another process may take it meanwhile; then Envoy
    // cannot bind it, and another port is tried.
    const ATTEMPTS: usize = 3;
    let mut attempt = 1;
    loop {
        let listen = if xds {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("probe a port");
            probe.local_addr().expect("probed port").to_string()
        } else {
            "127.0.0.1:0".to_string()
        };
        match launch_envoy(dir.path(), config, env, workers, xds, &listen, wasm) {
            Ok(started) => {
                return Ok(Gateway {
                    host: Host::Envoy { workers },
                    addr: started.addr,
                    child: started.child,
                    log_path: started.log_path,
                    config_path: config.to_path_buf(),
                    xds: xds.then(|| Xds {
                        dir: dir.path().join("xds"),
                        admin: started.admin.clone(),
                    }),
                    envoy_admin: Some(started.admin),
                    envoy_listen: Some(listen),
                    metrics_addr: None,
                    _dir: dir,
                })
            }
            Err(failed) if failed.address_in_use && xds && attempt < ATTEMPTS => attempt += 1,
            Err(failed) if failed.address_in_use && xds => {
                return Err(format!("{attempt} ports tried, each taken: {}", failed.why))
            }
            Err(failed) => return Err(failed.why),
        }
    }
}

/// An Envoy that is live, with the tollgate listener.
struct EnvoyStarted {
    child: Child,
    addr: SocketAddr,
    admin: String,
    log_path: PathBuf,
}

/// Why Envoy did not start (with its log), and whether it was because its listener's address
/// was taken.
struct EnvoyFailed {
    why: String,
    address_in_use: bool,
}

/// One attempt at starting Envoy in `dir` with its listener on `listen`; a failed one is
/// stopped before this returns.
fn launch_envoy(
    dir: &Path,
    config: &Path,
    env: &[(&str, &str)],
    workers: u32,
    xds: bool,
    listen: &str,
    wasm: &Path,
) -> Result<EnvoyStarted, EnvoyFailed> {
    let bootstrap = dir.join("envoy.yaml");
    let xds_dir = dir.join("xds");
    if xds {
        std::fs::create_dir_all(&xds_dir).expect("create xds dir");
    }
    let rendered = render(
        config,
        listen,
        "127.0.0.1:0",
        xds.then_some(xds_dir.as_path()),
        wasm,
    )
    .map_err(|why| EnvoyFailed {
        why,
        address_in_use: false,
    })?;
    std::fs::write(&bootstrap, &rendered).expect("write bootstrap");

    let admin_path = dir.join("admin-address");
    // Left from an earlier attempt, it would name that Envoy's admin.
    let _ = std::fs::remove_file(&admin_path);
    let log_path = dir.join("envoy.log");
    let log = std::fs::File::create(&log_path).expect("create log");
    let mut child = Command::new(envoy_bin())
        .arg("-c")
        .arg(&bootstrap)
        .args([
            "--concurrency",
            &workers.to_string(),
            "--disable-hot-restart",
        ])
        .args([
            "--log-level",
            "warning",
            "--component-log-level",
            "wasm:info",
        ])
        .arg("--admin-address-path")
        .arg(&admin_path)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start envoy");
    let deadline = Instant::now() + Duration::from_secs(60);
    let fail = |mut child: Child, why: &str| {
        let _ = child.kill();
        let _ = child.wait();
        let logs = std::fs::read_to_string(&log_path).unwrap_or_default();
        Err(EnvoyFailed {
            address_in_use: logs.contains("Address already in use"),
            why: format!("envoy did not start: {why}; its log:\n{logs}"),
        })
    };
    // Envoy writes its admin address once it listens; the listener's port comes from the
    // admin API once the server is live.
    loop {
        if Instant::now() > deadline {
            return fail(child, "timed out");
        }
        if let Ok(Some(status)) = child.try_wait() {
            return fail(child, &format!("it exited with {status}"));
        }
        let admin = std::fs::read_to_string(&admin_path).unwrap_or_default();
        let admin = admin.trim();
        if !admin.is_empty()
            && admin_get(admin, "/ready").is_some_and(|b| b.lines().any(|l| l.trim() == "LIVE"))
        {
            let listeners = admin_get(admin, "/listeners").unwrap_or_default();
            // Format: `tollgate::127.0.0.1:PORT`.
            let addr = listeners
                .lines()
                .find_map(|l| l.strip_prefix("tollgate::"))
                .and_then(|a| a.trim().parse().ok());
            let Some(addr) = addr else {
                return fail(child, &format!("no tollgate listener in {listeners:?}"));
            };
            let admin = admin.to_string();
            return Ok(EnvoyStarted {
                child,
                addr,
                admin,
                log_path,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A minimal blocking GET to Envoy's admin API. The body may come chunked: callers look for
/// lines in it rather than parse it whole.
fn admin_get(addr: &str, path: &str) -> Option<String> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A workspace with an artifact built at `t(0)` and sources at `t(-10)`.
    fn workspace_at(dir: &Path, t: impl Fn(i64) -> SystemTime) -> PathBuf {
        let files = [
            "Cargo.toml",
            "Cargo.lock",
            "core/Cargo.toml",
            "core/src/lib.rs",
            "core/src/limits/gcra.rs",
            "native-host/src/main.rs",
            "filter/src/lib.rs",
        ];
        for file in files {
            touch(&dir.join(file), t(-10));
        }
        let artifact = dir.join("target/debug/tollgate");
        touch(&artifact, t(0));
        artifact
    }

    fn touch(path: &Path, at: SystemTime) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let file = std::fs::File::create(path).unwrap();
        file.set_modified(at).unwrap();
    }

    fn times() -> impl Fn(i64) -> SystemTime {
        let base = SystemTime::now() - Duration::from_secs(3_600);
        move |s| {
            if s < 0 {
                base - Duration::from_secs(s.unsigned_abs())
            } else {
                base + Duration::from_secs(s.unsigned_abs())
            }
        }
    }

    #[test]
    fn an_artifact_newer_than_its_sources_is_fresh() {
        let dir = TempDir::new("fresh");
        let t = times();
        let artifact = workspace_at(dir.path(), &t);
        assert_eq!(check_fresh(&artifact, dir.path(), BIN_SOURCES, "b"), Ok(()));
        let (newest, at) = newest_source(dir.path(), BIN_SOURCES).unwrap();
        assert_eq!(at, t(-10));
        assert!(newest.starts_with(dir.path()));
    }

    #[test]
    fn a_newer_source_makes_it_stale_and_is_named() {
        let t = times();
        for (changed, crates) in [
            ("core/src/limits/gcra.rs", BIN_SOURCES),
            ("native-host/src/main.rs", BIN_SOURCES),
            ("filter/src/lib.rs", WASM_SOURCES),
            ("core/Cargo.toml", WASM_SOURCES),
            ("Cargo.toml", BIN_SOURCES),
            ("Cargo.lock", WASM_SOURCES),
        ] {
            let dir = TempDir::new("stale");
            let artifact = workspace_at(dir.path(), &t);
            touch(&dir.path().join("core/src/other.rs"), t(-1));
            touch(&dir.path().join(changed), t(5));
            let why = check_fresh(&artifact, dir.path(), crates, "make wasm").unwrap_err();
            assert!(
                why.contains(&format!(" {changed} changed 5.0 s after")),
                "{why}"
            );
            assert!(why.contains("`make wasm`"), "{why}");
            assert!(why.contains(&artifact.display().to_string()), "{why}");
        }
    }

    #[test]
    fn what_is_not_built_into_the_artifact_does_not_count() {
        let t = times();
        let dir = TempDir::new("unrelated");
        let artifact = workspace_at(dir.path(), &t);
        for file in [
            "filter/src/lib.rs", // not a source of the binary
            "tests/src/gateway.rs",
            "core/target/debug/x",
            "native-host/tests/cli.rs",
            "core/benches/b.rs",
            "core/examples/e.rs",
            "core/src/.gcra.rs.swp",
            "core/src/gcra.rs~",
            "core/clippy.toml",
            "core/proptest-regressions/limits/gcra.txt",
            "README.md",
        ] {
            touch(&dir.path().join(file), t(60));
        }
        assert_eq!(check_fresh(&artifact, dir.path(), BIN_SOURCES, "b"), Ok(()));
        // A `tests` directory under `src` is a module like any other; so is a build script.
        for file in ["core/src/exchange/tests/mod.rs", "native-host/build.rs"] {
            touch(&dir.path().join(file), t(1));
            let why = check_fresh(&artifact, dir.path(), BIN_SOURCES, "b").unwrap_err();
            assert!(why.contains(file), "{why}");
            touch(&dir.path().join(file), t(-1));
        }
    }

    #[test]
    fn a_missing_artifact_is_an_error() {
        let dir = TempDir::new("missing");
        let why = check_fresh(&dir.path().join("nope"), dir.path(), BIN_SOURCES, "b");
        assert!(why.is_err());
    }
}
