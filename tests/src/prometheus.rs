//! A real Prometheus (Debian's `prometheus`, installed by `make prometheus-install`) bound to
//! loopback, scraping gateways every second, and queried through its HTTP API: the suites
//! check what an operator's Prometheus would hold, not only what a scrape shows.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::gateway::TempDir;

/// `prometheus` from `PROMETHEUS_BIN`, else the one on `PATH`.
pub fn prometheus_bin() -> PathBuf {
    std::env::var_os("PROMETHEUS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("prometheus"))
}

/// `promtool` from `PROMTOOL_BIN`, else the one on `PATH`.
pub fn promtool_bin() -> PathBuf {
    std::env::var_os("PROMTOOL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("promtool"))
}

pub struct Prometheus {
    child: Child,
    pub addr: String,
    http: reqwest::Client,
    _dir: TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One series of a query's answer.
#[derive(Debug, Clone)]
pub struct Series {
    pub labels: serde_json::Map<String, Value>,
    pub value: f64,
}

impl Prometheus {
    /// Starts Prometheus scraping each `(host:port, path)` every second.
    pub fn start(targets: &[(String, &str)]) -> Prometheus {
        let mut why = String::new();
        // A port picked free can be taken before Prometheus binds it: try a few.
        for _ in 0..5 {
            match Self::try_start(targets) {
                Ok(p) => return p,
                Err(e) => why = e,
            }
        }
        panic!("Prometheus did not start (run `make prometheus-install`): {why}");
    }

    fn try_start(targets: &[(String, &str)]) -> Result<Prometheus, String> {
        let dir = TempDir::new("prometheus");
        let jobs: Vec<String> = targets
            .iter()
            .enumerate()
            .map(|(i, (addr, path))| {
                format!(
                    "  - job_name: gateway{i}\n    metrics_path: {path}\n    static_configs:\n      - targets: ['{addr}']\n"
                )
            })
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n{}",
            jobs.concat()
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let log =
            std::fs::File::create(dir.path().join("prometheus.log")).map_err(|e| e.to_string())?;
        let mut child = Command::new(prometheus_bin())
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("{}: {e}", prometheus_bin().display()))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                let log =
                    std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
                return Err(format!("exited with {status}: {log}"));
            }
            if ready(&addr) {
                return Ok(Prometheus {
                    child,
                    addr,
                    http: crate::scenario::client(),
                    _dir: dir,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        Err("not ready within 30 s".into())
    }

    /// An instant query's series.
    pub async fn query(&self, expr: &str) -> Vec<Series> {
        let r = self
            .http
            .get(format!("http://{}/api/v1/query", self.addr))
            .query(&[("query", expr)])
            .send()
            .await
            .expect("Prometheus answers");
        let v: Value = r.json().await.expect("Prometheus answers JSON");
        assert_eq!(v["status"], "success", "{expr}: {v}");
        v["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|s| Series {
                labels: s["metric"].as_object().cloned().unwrap_or_default(),
                value: s["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN),
            })
            .collect()
    }

    /// The value of a query that yields one series (a `sum(…)`, say); `None` for none.
    pub async fn value(&self, expr: &str) -> Option<f64> {
        let series = self.query(expr).await;
        assert!(
            series.len() <= 1,
            "{expr} yields several series: {series:?}"
        );
        series.first().map(|s| s.value)
    }

    /// Waits until the query's value is `want` (Prometheus scrapes every second, Envoy
    /// publishes gauges every second and histograms every five), and fails with the last
    /// value seen after `within`.
    pub async fn assert_eventually(&self, expr: &str, want: f64, within: Duration) {
        let deadline = Instant::now() + within;
        let mut last = None;
        while Instant::now() < deadline {
            last = self.value(expr).await;
            if last.is_some_and(|v| (v - want).abs() <= want.abs() * 1e-9 + 1e-12) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("{expr}: wanted {want}, Prometheus has {last:?}");
    }
}

fn ready(addr: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(
        s,
        "GET /-/ready HTTP/1.1\r\nHost: prometheus\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200")
}
