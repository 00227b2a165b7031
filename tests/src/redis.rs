//! A real Redis (Debian's `redis-server`, installed by `make redis-install`) on a free
//! loopback port, for the suites where several gateways share their state; stopped on drop,
//! and stoppable and restartable on the same port mid-test.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::gateway::TempDir;

/// `redis-server` from `REDIS_SERVER_BIN`, else the one on `PATH`.
pub fn redis_server_bin() -> PathBuf {
    std::env::var_os("REDIS_SERVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("redis-server"))
}

pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: TempDir,
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Redis {
    pub fn start() -> Redis {
        let mut why = String::new();
        // A port picked free can be taken before Redis binds it: try a few.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("a free port");
            let mut redis = Redis {
                child: None,
                port,
                dir: TempDir::new("redis"),
            };
            match redis.launch() {
                Ok(()) => return redis,
                Err(e) => why = e,
            }
        }
        panic!("redis-server did not start (run `make redis-install`): {why}");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn launch(&mut self) -> Result<(), String> {
        let log = self.dir.path().join("redis.log");
        let mut child = Command::new(redis_server_bin())
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", redis_server_bin().display()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!("exited with {status}: {log}"));
            }
            if self.ping() {
                self.child = Some(child);
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        Err("not answering PING within 10 s".into())
    }

    /// Stops it (as a crash would: SIGKILL); `restart` brings it back, empty, on the same
    /// port.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.launch() {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => panic!("redis did not restart: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Whether it answers `PING` now.
    pub fn ping(&self) -> bool {
        self.command("PING").is_some_and(|r| r.starts_with("+PONG"))
    }

    /// Sends one inline command and returns the raw reply.
    pub fn command(&self, command: &str) -> Option<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(s, "{command}\r\n").ok()?;
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).ok()?;
        Some(String::from_utf8_lossy(buf.get(..n)?).to_string())
    }
}

/// A running `tollgate store-server` (Envoy's way to Redis), stopped on drop.
pub struct StoreServer {
    child: Child,
    pub addr: std::net::SocketAddr,
    log: PathBuf,
    _dir: TempDir,
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl StoreServer {
    /// Starts one on `config` (a tollgate config with `store.kind: redis`), on a free port.
    pub fn start(config: &str) -> StoreServer {
        use std::io::{BufRead, BufReader};
        let dir = TempDir::new("store-server");
        let path = dir.path().join("tollgate.yaml");
        std::fs::write(&path, config).expect("write the store-server's config");
        let log = dir.path().join("store-server.log");
        let mut child = Command::new(crate::gateway::tollgate_bin())
            .args(["store-server", "--config"])
            .arg(&path)
            // Overrides `store.server`.
            .args(["--listen", "127.0.0.1:0"])
            .env("TOLLGATE_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("create the store-server's log"))
            .spawn()
            .expect("start tollgate store-server");
        let (tx, rx) = std::sync::mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            std::thread::spawn(move || {
                let mut line = String::new();
                let _ = BufReader::new(stdout).read_line(&mut line);
                let _ = tx.send(line);
            });
        }
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok());
        let Some(addr) = addr else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "store-server did not start (stdout {line:?}); its log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        StoreServer {
            child,
            addr,
            log,
            _dir: dir,
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
