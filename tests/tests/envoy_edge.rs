//! Envoy as an edge proxy: the limits `tollgate envoy-bootstrap` renders so that clients cannot
//! hold Envoy's resources forever (docs/envoy.md, "Edge limits"), checked on real Envoy with
//! the built filter. Envoy only: the native host applies the same `server` settings itself.
//!
//! Every wait is a hang guard with a generous bound, never a window a result must fall in.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use tollgate_e2e::gateway::{tollgate_bin, Gateway, Host, TempDir};
use tollgate_e2e::scenario::sha256_hex;

const APP_KEY: &str = "tg-test-app-key";
/// Envoy's HTTP connection manager drains a connection whose idle timeout fired before it
/// closes it (`drain_timeout`, 5 s by default), also for HTTP/1.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Added to every bound: what a loaded machine may add to Envoy's timers.
const MARGIN: Duration = Duration::from_secs(15);

/// A config on the built-in mock provider, with `server` settings added.
fn config(server: &str) -> String {
    format!(
        r#"
server:
  listen: 127.0.0.1:0
{server}
consumers:
  - name: app
    keys: [{{ sha256: {app} }}]
    models: ["*"]
providers:
  - name: mock
    kind: mock
models:
  - name: mock-gpt
    provider: mock
"#,
        app = sha256_hex(APP_KEY),
    )
}

fn envoy(server: &str) -> Gateway {
    Gateway::start(Host::Envoy { workers: 1 }, &config(server), &[])
}

fn connect(addr: SocketAddr, guard: Duration) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect to Envoy");
    stream.set_read_timeout(Some(guard)).expect("read timeout");
    stream
}

fn models_request(extra_header: &str) -> String {
    format!(
        "GET /v1/models HTTP/1.1\r\nHost: tollgate\r\nAuthorization: Bearer {APP_KEY}\r\n\
         {extra_header}\r\n"
    )
}

/// Reads one HTTP/1 response with a `content-length` body: (head, body).
fn read_response(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&bytes[..end]).to_string();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or_else(|| panic!("no content-length in {head:?}"));
            while bytes.len() < end + 4 + length {
                let n = stream.read(&mut buf).expect("read the response body");
                assert!(n > 0, "connection closed mid-body after {bytes:?}");
                bytes.extend_from_slice(&buf[..n]);
            }
            return (head, bytes[end + 4..end + 4 + length].to_vec());
        }
        let n = stream.read(&mut buf).expect("read the response head");
        assert!(n > 0, "connection closed before a response head: {bytes:?}");
        bytes.extend_from_slice(&buf[..n]);
    }
}

/// Reads until Envoy closes the connection (EOF or reset): what it sent, and how long it
/// took. A read that times out (the guard) fails the test: the connection was left open.
fn read_until_closed(stream: &mut TcpStream) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (bytes, start.elapsed()),
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (bytes, start.elapsed())
            }
            Err(e) => panic!(
                "Envoy left the connection open ({e} after {:?}); it sent {:?}",
                start.elapsed(),
                String::from_utf8_lossy(&bytes)
            ),
        }
    }
}

fn stat(gateway: &Gateway, name: &str) -> u64 {
    let stats = gateway.envoy_stats(name).expect("Envoy's stats");
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {stats}"))
}

/// A client that sends part of a request head and then nothing (slowloris) gets a 408 and the
/// connection closed, within `server.header_read_timeout_ms`: by default Envoy waits forever.
#[test]
fn a_half_sent_request_head_is_answered_408_and_closed() {
    const TIMEOUT: Duration = Duration::from_millis(500);
    let gateway = envoy(&format!(
        "  header_read_timeout_ms: {}",
        TIMEOUT.as_millis()
    ));
    // After the 408 Envoy waits up to its `delayed_close_timeout` (1 s) for the client to
    // close first.
    let bound = TIMEOUT + Duration::from_secs(1) + MARGIN;
    let mut stream = connect(gateway.addr, bound);
    stream
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: tollgate\r\nAuthorization: Bea")
        .expect("send half a head");
    let (sent, took) = read_until_closed(&mut stream);
    let sent = String::from_utf8_lossy(&sent);
    assert!(sent.starts_with("HTTP/1.1 408 "), "{sent:?}");
    assert!(took < bound, "closed only after {took:?}");
    assert_eq!(
        stat(&gateway, "http.tollgate.downstream_rq_header_timeout"),
        1
    );
}

/// A kept-alive connection with no request in flight is closed after
/// `server.idle_timeout_ms` (plus Envoy's drain): by default Envoy keeps it for an hour.
#[test]
fn an_idle_keep_alive_connection_is_closed() {
    const TIMEOUT: Duration = Duration::from_millis(500);
    let gateway = envoy(&format!("  idle_timeout_ms: {}", TIMEOUT.as_millis()));
    let bound = TIMEOUT + DRAIN_TIMEOUT + MARGIN;
    let mut stream = connect(gateway.addr, bound);
    stream
        .write_all(models_request("").as_bytes())
        .expect("send a request");
    let (head, _) = read_response(&mut stream);
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("connection: close"),
        "the connection must be kept alive for the test to mean anything: {head}"
    );
    let (sent, took) = read_until_closed(&mut stream);
    assert!(sent.is_empty(), "{:?}", String::from_utf8_lossy(&sent));
    assert!(took < bound, "closed only after {took:?}");
    assert_eq!(
        stat(&gateway, "http.tollgate.downstream_cx_idle_timeout"),
        1
    );
}

/// `x_api_key` would reach an upstream that reads it as `x-api-key` past the gateway role's
/// header rules: Envoy refuses requests with underscores in header names.
#[test]
fn headers_with_underscores_are_rejected() {
    let gateway = envoy("");
    let guard = Duration::from_secs(30);
    let mut plain = connect(gateway.addr, guard);
    plain
        .write_all(models_request("x-api-key: sk-other\r\n").as_bytes())
        .expect("send a request");
    let (head, _) = read_response(&mut plain);
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");

    let mut underscored = connect(gateway.addr, guard);
    underscored
        .write_all(models_request("x_api_key: sk-other\r\n").as_bytes())
        .expect("send a request");
    let (sent, _) = read_until_closed(&mut underscored);
    let sent = String::from_utf8_lossy(&sent);
    assert!(sent.starts_with("HTTP/1.1 400 "), "{sent:?}");
}

/// Past `server.max_connections` open client connections (over all workers), Envoy closes new
/// ones as it accepts them, without reading a request.
#[test]
fn connections_past_max_connections_are_closed_at_once() {
    let gateway = envoy("  max_connections: 2");
    let guard = Duration::from_secs(30);
    // Each held connection has been served, so Envoy has accepted and counted it.
    let held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut stream = connect(gateway.addr, guard);
            stream
                .write_all(models_request("").as_bytes())
                .expect("send a request");
            let (head, _) = read_response(&mut stream);
            assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
            stream
        })
        .collect();
    let mut third = connect(gateway.addr, guard);
    // The request may meet a closed socket already; only what comes back matters.
    let _ = third.write_all(models_request("").as_bytes());
    let (sent, _) = read_until_closed(&mut third);
    assert!(sent.is_empty(), "{:?}", String::from_utf8_lossy(&sent));
    // The listener's stats are named after its configured address, `127.0.0.1_0`. Read
    // until it shows (a hang guard): the worker may close the socket before its stats merge.
    let overflow = || {
        stat(
            &gateway,
            "listener.127.0.0.1_0.downstream_global_cx_overflow",
        )
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while overflow() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(overflow(), 1);
    // The admin interface ignores the limit: the stats above were read through it.
    drop(held);
}

/// Envoy buffers at most the HTTP/2 stream window for one stream: the best practices' 64 KiB
/// would reset every request whose body the gateway role must buffer past it. A body well
/// over 64 KiB, under `max_body_bytes`, is served over HTTP/2 (cleartext, prior knowledge).
#[tokio::test]
async fn http2_bodies_past_64_kib_are_served() {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let gateway = tokio::task::spawn_blocking(|| envoy("  max_body_bytes: 1048576"))
        .await
        .expect("start Envoy");
    let body = serde_json::json!({
        "model": "mock-gpt",
        "max_tokens": 5,
        "messages": [{ "role": "user", "content": "x".repeat(600 * 1024) }],
    })
    .to_string();
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(gateway.addr)
            .await
            .expect("connect to Envoy");
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .expect("an HTTP/2 handshake");
        tokio::spawn(connection);
        let request = hyper::Request::post(format!("http://{}/v1/chat/completions", gateway.addr))
            .header("authorization", format!("Bearer {APP_KEY}"))
            .header("content-type", "application/json")
            .body(Full::new(bytes::Bytes::from(body)))
            .expect("a request");
        let response = sender.send_request(request).await.expect("a response");
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("the body")
            .to_bytes();
        (status, body)
    };
    let (status, body) = tokio::time::timeout(Duration::from_secs(60), exchange)
        .await
        .expect("an answer (hang guard)");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
}

/// Renders a bootstrap (never started) for `config(server)` plus a provider with an upstream,
/// so that it has a provider cluster: (bootstrap, what the renderer wrote to stderr).
fn render(server: &str, admin: Option<&str>) -> (String, String) {
    let dir = TempDir::new("edge-render");
    let config_path = dir.path().join("tollgate.yaml");
    let upstream = "
  - name: upstream
    kind: openai
    base_url: http://127.0.0.1:9
    keys: [{ id: a, secret_env: TG_EDGE_TEST_KEY }]
";
    let text = config(server).replace("\nmodels:", &format!("{upstream}models:"));
    std::fs::write(&config_path, text).expect("write config");
    let mut cmd = Command::new(tollgate_bin());
    cmd.args(["envoy-bootstrap", "--config"])
        .arg(&config_path)
        .args(["--wasm", "/etc/tollgate/tollgate_filter.wasm"]);
    if let Some(admin) = admin {
        cmd.args(["--admin", admin]);
    }
    let out = cmd.output().expect("run tollgate envoy-bootstrap");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    (String::from_utf8_lossy(&out.stdout).to_string(), stderr)
}

/// The rendered bootstrap puts the admin interface on loopback unless told otherwise, and says
/// so loudly when told otherwise; and it carries the edge limits, by default and from the
/// config's `server` settings.
#[test]
fn the_rendered_bootstrap_keeps_the_admin_on_loopback_and_sets_the_edge_limits() {
    let (bootstrap, stderr) = render("", None);
    // `admin: { address: { socket_address: { address: IP, ... } } }`
    let admin = bootstrap
        .lines()
        .skip_while(|l| *l != "admin:")
        .find_map(|l| l.trim().strip_prefix("address: "))
        .unwrap_or_else(|| panic!("no admin address in:\n{bootstrap}"));
    assert_eq!(admin, "127.0.0.1", "{bootstrap}");
    assert!(stderr.is_empty(), "{stderr}");
    assert!(!bootstrap.contains("WARNING"), "{bootstrap}");
    for setting in [
        "envoy.resource_monitors.global_downstream_max_connections",
        "max_active_downstream_connections: ",
        "ignore_global_conn_limit: true",
        "request_headers_timeout: ",
        "idle_timeout: ",
        "headers_with_underscores_action: REJECT_REQUEST",
        "max_concurrent_streams: ",
        "failure_policy: FAIL_RELOAD",
    ] {
        assert!(
            bootstrap.contains(setting),
            "no `{setting}` in:\n{bootstrap}"
        );
    }
    assert!(!bootstrap.contains("fail_open"), "{bootstrap}");

    let (bootstrap, _) = render(
        "  max_connections: 1234\n  header_read_timeout_ms: 4500\n  idle_timeout_ms: 7000\n  \
         http2_max_concurrent_streams: 50\n  max_body_bytes: 100000",
        None,
    );
    for setting in [
        "max_active_downstream_connections: 1234",
        "max_connections: 1234",
        "max_pending_requests: 1234",
        "max_requests: 1234",
        "request_headers_timeout: 4.5s",
        "idle_timeout: 7s",
        "max_concurrent_streams: 50",
        "per_connection_buffer_limit_bytes: 165536",
        "initial_stream_window_size: 165536",
        "initial_connection_window_size: 1048576",
    ] {
        assert!(
            bootstrap.contains(setting),
            "no `{setting}` in:\n{bootstrap}"
        );
    }

    let (bootstrap, stderr) = render("", Some("0.0.0.0:9901"));
    assert!(stderr.contains("0.0.0.0:9901"), "{stderr}");
    assert!(
        bootstrap.contains("# WARNING: Envoy's admin interface listens on 0.0.0.0:9901"),
        "{bootstrap}"
    );
}
