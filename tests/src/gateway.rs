//! Starts tollgate under test, in either host, and stops it when dropped — also when a test
//! fails, since unwinding drops it.
//!
//! Binaries are found through environment variables that `make test` sets, else at their
//! usual places in the workspace: `TOLLGATE_BIN` (target/debug/tollgate), `TOLLGATE_WASM`
//! (target/wasm32-wasip1/release/tollgate_filter.wasm), `ENVOY_BIN` (.venv/bin/envoy).
//! A missing one is a test failure that says how to build it, never a skip.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

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
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
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
    binary(
        "TOLLGATE_BIN",
        "target/debug/tollgate",
        "cargo build -p tollgate",
    )
}

pub fn wasm_path() -> PathBuf {
    binary(
        "TOLLGATE_WASM",
        "target/wasm32-wasip1/release/tollgate_filter.wasm",
        "make wasm",
    )
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
            Host::Envoy { workers } => start_envoy(dir, &config_path, env, workers, false),
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Envoy's stats whose names contain `filter`, as `name: value` lines (`None` for the
    /// native host).
    pub fn envoy_stats(&self, filter: &str) -> Option<String> {
        admin_get(
            self.envoy_admin.as_deref()?,
            &format!("/stats?filter={filter}"),
        )
    }

    /// Everything the process logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Starts Envoy with its listener and clusters in watched files (file-based xDS), so that
    /// `reload` can change the config of the running process.
    pub fn start_envoy_with_xds(config: &str, env: &[(&str, &str)], workers: u32) -> Gateway {
        let dir = TempDir::new("envoy-xds");
        let config_path = dir.path().join("tollgate.yaml");
        std::fs::write(&config_path, config).expect("write config");
        start_envoy(dir, &config_path, env, workers, true).unwrap_or_else(|why| panic!("{why}"))
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
        .args(["--listen", "127.0.0.1:0"])
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("start tollgate");
    // The first stdout line says where it listens; read it on a thread so that a gateway
    // that never prints cannot hang the suite.
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send((read.map_err(|e| e.to_string()), line));
    });
    let (read, line) = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| (Err("timed out".into()), String::new()));
    let addr = line
        .trim()
        .strip_prefix("listening on ")
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
        _dir: dir,
    })
}

/// Runs `tollgate envoy-bootstrap`; with `xds_dir` it also (re)writes the resource files.
fn render(
    config: &Path,
    listen: &str,
    admin: &str,
    xds_dir: Option<&Path>,
) -> Result<Vec<u8>, String> {
    let mut cmd = Command::new(tollgate_bin());
    cmd.args(["envoy-bootstrap", "--config"])
        .arg(config)
        .arg("--wasm")
        .arg(wasm_path())
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
) -> Result<Gateway, String> {
    let bootstrap = dir.path().join("envoy.yaml");
    // A listener served over xDS keeps its address across updates: give it a fixed port.
    let listen = if xds {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("probe a port");
        probe.local_addr().expect("probed port").to_string()
    } else {
        "127.0.0.1:0".to_string()
    };
    let xds_dir = dir.path().join("xds");
    if xds {
        std::fs::create_dir_all(&xds_dir).expect("create xds dir");
    }
    let rendered = render(
        config,
        &listen,
        "127.0.0.1:0",
        xds.then_some(xds_dir.as_path()),
    )?;
    std::fs::write(&bootstrap, &rendered).expect("write bootstrap");

    let admin_path = dir.path().join("admin-address");
    let log_path = dir.path().join("envoy.log");
    let log = std::fs::File::create(&log_path).expect("create log");
    let child = Command::new(envoy_bin())
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
    let mut gateway = Gateway {
        host: Host::Envoy { workers },
        addr: "127.0.0.1:0".parse().expect("addr"),
        child,
        log_path,
        config_path: config.to_path_buf(),
        xds: None,
        envoy_admin: None,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let fail = |gateway: &Gateway, why: &str| {
        Err(format!(
            "envoy did not start: {why}; its log:\n{}",
            gateway.logs()
        ))
    };
    // Envoy writes its admin address once it listens; the listener's port comes from the
    // admin API once the server is live.
    loop {
        if Instant::now() > deadline {
            return fail(&gateway, "timed out");
        }
        if let Ok(Some(status)) = gateway.child.try_wait() {
            return fail(&gateway, &format!("it exited with {status}"));
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
            match addr {
                Some(addr) => {
                    gateway.addr = addr;
                    gateway.envoy_admin = Some(admin.to_string());
                    if xds {
                        gateway.xds = Some(Xds {
                            dir: xds_dir,
                            admin: admin.to_string(),
                        });
                    }
                    return Ok(gateway);
                }
                None => return fail(&gateway, &format!("no tollgate listener in {listeners:?}")),
            }
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
