//! Helpers the end-to-end suites share: request bodies, SSE splitting, error checks.

use std::sync::OnceLock;

use serde_json::{json, Value};

use crate::gateway::{Gateway, Host};
use sha2::{Digest, Sha256};

/// The SHA-256 hex a config stores for a consumer key.
pub fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A port on 127.0.0.1 that nothing listens on, for as long as this value lives: a socket is
/// bound to it without listening, so connecting to it is refused and nothing else can bind
/// it (nor get it as the source port of a connection).
pub struct ClosedPort {
    pub port: u16,
    _socket: tokio::net::TcpSocket,
}

impl ClosedPort {
    pub fn bind() -> ClosedPort {
        let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
        // Without SO_REUSEADDR nor SO_REUSEPORT no other socket can share the port.
        socket.set_reuseaddr(false).expect("clear SO_REUSEADDR");
        socket
            .bind(([127, 0, 0, 1], 0).into())
            .expect("bind a port");
        let port = socket.local_addr().expect("the bound port").port();
        ClosedPort {
            port,
            _socket: socket,
        }
    }
}

/// A port on 127.0.0.1 that nothing listens on, held for the whole test process (one port,
/// the same for every caller): see `ClosedPort`.
pub fn closed_port() -> u16 {
    static HELD: OnceLock<ClosedPort> = OnceLock::new();
    HELD.get_or_init(ClosedPort::bind).port
}

pub fn user(text: &str) -> Value {
    json!([{ "role": "user", "content": text }])
}

pub fn assert_error(status: u16, body: &Value, want_status: u16, want_code: &str) {
    assert_eq!(status, want_status, "{body}");
    let e = &body["error"];
    assert_eq!(e["code"], want_code, "{body}");
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(e["type"].is_string(), "{body}");
}

/// Splits an SSE body into its events' data, as a client reads the stream: a line ends at
/// CRLF, LF or CR; a blank line ends an event; its `data:` lines are joined with '\n';
/// comments and other fields are skipped, and so is an event without data. An event the
/// body ends in without a blank line still counts.
pub fn sse_data(text: &str) -> Vec<String> {
    let text = text.strip_prefix('\u{FEFF}').unwrap_or(text);
    let mut events = Vec::new();
    let mut data: Option<String> = None;
    let mut rest = text;
    while !rest.is_empty() {
        let end = rest.find(['\r', '\n']).unwrap_or(rest.len());
        let line = &rest[..end];
        rest = &rest[end..];
        rest = rest
            .strip_prefix("\r\n")
            .or_else(|| rest.strip_prefix(['\r', '\n']))
            .unwrap_or(rest);
        if line.is_empty() {
            events.extend(data.take());
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        if field == "data" {
            let value = value.strip_prefix(' ').unwrap_or(value);
            match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => data = Some(value.to_string()),
            }
        }
    }
    events.extend(data);
    events
}

pub fn stream_text(events: &[String]) -> String {
    events
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

/// Generates one test per scenario and host: `native::NAME` and `envoy::NAME` (Envoy with two
/// workers), each calling `NAME(host)` of the invoking module.
#[macro_export]
macro_rules! both_hosts {
    ($($scenario:ident),* $(,)?) => {
        mod native {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario($crate::gateway::Host::Native).await;
                }
            )*
        }
        mod envoy {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario($crate::gateway::Host::Envoy { workers: 2 }).await;
                }
            )*
        }
    };
}

/// What a scenario runs against: a mock provider, a gateway in front of it (stopped when
/// dropped), and an HTTP client.
pub struct Stack {
    pub mock: crate::mock_provider::MockProvider,
    pub gateway: Gateway,
    pub http: reqwest::Client,
}

impl Stack {
    /// Starts a mock provider, then a gateway on the config `config` writes for it.
    pub async fn start(
        host: Host,
        config: impl FnOnce(&crate::mock_provider::MockProvider) -> String,
        env: Vec<(&'static str, &'static str)>,
    ) -> Stack {
        let mock = crate::mock_provider::MockProvider::start().await;
        let gateway = start_gateway(host, config(&mock), env).await;
        Stack {
            mock,
            gateway,
            http: client(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.gateway.base_url())
    }

    /// For Envoy, asserts that every worker has accepted a connection on the tollgate
    /// listener, so that what the test saw was shared by every worker; nothing for the native
    /// host. Send on fresh connections (`fresh_client`) to reach them: the kernel spreads new
    /// connections over the workers by a hash of their addresses and ports.
    pub fn assert_every_worker_served(&self) {
        let Some(counts) = self.gateway.envoy_worker_connections() else {
            return;
        };
        assert!(
            counts.iter().all(|&n| n > 0),
            "not every Envoy worker served: connections accepted per worker {counts:?}"
        );
    }
}

/// The scenarios' HTTP client: generous timeout, so that a hung gateway fails a test rather
/// than hanging it.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .expect("an HTTP client")
}

/// Like `client`, but every request goes on a connection of its own (none is kept for
/// reuse), so that sequential requests to Envoy are spread over its workers rather than all
/// reaching the worker that accepted one kept-alive connection.
pub fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .pool_max_idle_per_host(0)
        .build()
        .expect("an HTTP client")
}

/// Starts a gateway from an async test (the start itself blocks while the process comes up).
pub async fn start_gateway(
    host: Host,
    config: String,
    env: Vec<(&'static str, &'static str)>,
) -> Gateway {
    tokio::task::spawn_blocking(move || Gateway::start(host, &config, &env))
        .await
        .expect("the gateway start panicked")
}

/// Now, in Unix milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Daily allowances reset at 00:00 UTC: a test that counts on one waits out the last minute
/// of the day rather than straddle the reset.
pub async fn away_from_utc_midnight() {
    let to_midnight = 86_400_000 - unix_ms() % 86_400_000;
    if to_midnight < 60_000 {
        tokio::time::sleep(std::time::Duration::from_millis(to_midnight + 1_000)).await;
    }
}

/// Runs one of the SDK scripts in `tests/sdk/` (with the virtualenv's Python, `SDK_PYTHON`
/// under `make test`) with `args`, and returns the JSON object it prints; a failing script
/// fails the test with its stderr.
pub async fn run_sdk_script(script: &str, args: &[&str]) -> Value {
    let python = std::env::var("SDK_PYTHON").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python").to_string()
    });
    let path = format!("{}/sdk/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::process::Command::new(&python)
        .arg(&path)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("{python}: {e} (`make sdk-install` installs the SDKs)"));
    assert!(
        out.status.success(),
        "{script} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{script} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn sse_data_reads_any_framing() {
        let lf = "data: a\n\n: keep-alive\n\ndata: {\"x\":1}\n\ndata: [DONE]\n\n";
        let want = ["a", "{\"x\":1}", "[DONE]"];
        assert_eq!(sse_data(lf), want);
        assert_eq!(sse_data(&lf.replace('\n', "\r\n")), want);
        assert_eq!(sse_data(&lf.replace('\n', "\r")), want);
        assert_eq!(
            sse_data("\u{FEFF}: hi\nevent: e\ndata:a\ndata:  b\nid: 1\n\n\n\ndata: end"),
            ["a\n b", "end"]
        );
        assert_eq!(sse_data("event: e\n\n: c\n"), Vec::<String>::new());
    }

    #[test]
    fn a_closed_port_refuses_connections_and_cannot_be_taken() {
        let closed = ClosedPort::bind();
        let err = std::net::TcpStream::connect(("127.0.0.1", closed.port)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
        // std sets SO_REUSEADDR on listeners; that is not enough to share the port.
        let err = std::net::TcpListener::bind(("127.0.0.1", closed.port)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AddrInUse, "{err}");
    }

    #[test]
    fn the_shared_closed_port_stays_closed() {
        let port = closed_port();
        assert_eq!(closed_port(), port);
        let err = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
        let err = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AddrInUse, "{err}");
    }

    /// An HTTP/1.1 server that answers every request on a connection with a keep-alive 200;
    /// it counts the connections it accepted.
    async fn counting_server() -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if conn.write_all(reply).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (url, accepted)
    }

    #[tokio::test]
    async fn a_fresh_client_opens_a_connection_per_request() {
        for (http, want) in [(client(), 1), (fresh_client(), 5)] {
            let (url, accepted) = counting_server().await;
            for _ in 0..5 {
                let r = http.get(&url).send().await.unwrap();
                assert_eq!(r.text().await.unwrap(), "ok");
            }
            assert_eq!(accepted.load(Ordering::SeqCst), want);
        }
    }
}
