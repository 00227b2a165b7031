//! Client connections of the native host (docs/hardening.md): idle connections are closed,
//! in HTTP/1 and HTTP/2, before a first request and after the last; the number of open
//! connections is capped; HTTP/2 streams per connection are capped; request bodies share a
//! memory budget; and thousands of idle or slowloris connections neither keep a real client
//! from being served nor stay open past the idle timeout. Envoy has its own listener
//! settings, so these run against the native host only.
//!
//! Timeouts are configured short (hundreds of milliseconds) and every check waits up to a
//! generous bound, so a loaded machine is slower, never a failure: closure is asserted to
//! happen within the bound, and never before the timeout (timers do not fire early).

mod native_only {
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use serde_json::{json, Value};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tollgate_e2e::gateway::{Gateway, Host};
    use tollgate_e2e::mock_provider::{Fault, MockProvider};
    use tollgate_e2e::scenario::{client, sha256_hex, sse_data, start_gateway, user};

    const APP_KEY: &str = "tg-connections-app-key";
    const PROVIDER_KEY: &str = "sk-connections-provider";
    /// How long any closure may take past its timeout on a loaded machine.
    const BOUND: Duration = Duration::from_secs(15);
    const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    /// A gateway with `server` settings `server` (a YAML flow mapping's inside), serving
    /// `mock-gpt` (answered by the gateway itself) and `gpt-4o-mini` (by `mock`).
    async fn start(server: &str, mock: &MockProvider) -> Gateway {
        let config = format!(
            r#"
server: {{ listen: "127.0.0.1:0", {server} }}
consumers:
  - name: app
    keys: [{{ sha256: {app} }}]
    models: [mock-gpt, gpt-4o-mini]
providers:
  - name: mock
    kind: mock
  - name: upstream
    kind: openai
    base_url: {base}
    retry: {{ attempts: 1 }}
    keys: [{{ id: key-a, secret_env: TG_CONNECTIONS_KEY }}]
models:
  - {{ name: mock-gpt, provider: mock }}
  - {{ name: gpt-4o-mini, provider: upstream }}
"#,
            app = sha256_hex(APP_KEY),
            base = mock.base_url(),
        );
        start_gateway(
            Host::Native,
            config,
            vec![("TG_CONNECTIONS_KEY", PROVIDER_KEY)],
        )
        .await
    }

    fn chat_body() -> String {
        json!({ "model": "mock-gpt", "messages": user("hi") }).to_string()
    }

    fn chat_request(addr: SocketAddr) -> hyper::Request<Full<Bytes>> {
        hyper::Request::post(format!("http://{addr}/v1/chat/completions"))
            .header("authorization", format!("Bearer {APP_KEY}"))
            .header("content-type", "application/json")
            .header("host", addr.to_string())
            .body(Full::new(Bytes::from(chat_body())))
            .unwrap()
    }

    /// A real client's request on a connection of its own: 200 with the mock's answer.
    async fn assert_served(gateway: &Gateway) {
        let r = client()
            .post(format!("{}/v1/chat/completions", gateway.base_url()))
            .bearer_auth(APP_KEY)
            .header("content-type", "application/json")
            .header("connection", "close")
            .body(chat_body())
            .send()
            .await
            .expect("the gateway answers");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        assert_eq!(status, 200, "{text}\n{}", gateway.logs());
        assert!(text.contains("You said: hi"), "{text}");
    }

    /// Reads until the peer closes (end of stream or reset), within `bound`: what was read,
    /// and how long it took.
    async fn until_closed(stream: &mut TcpStream, bound: Duration) -> (Vec<u8>, Duration) {
        let started = Instant::now();
        let mut seen = Vec::new();
        let read_all = async {
            let mut buf = [0u8; 4096];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
        };
        if tokio::time::timeout(bound, read_all).await.is_err() {
            panic!("the connection is still open after {bound:?}");
        }
        (seen, started.elapsed())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_that_sends_nothing_is_closed_after_the_idle_timeout() {
        let mock = MockProvider::start().await;
        let gateway = start("idle_timeout_ms: 500", &mock).await;
        let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
        let (seen, took) = until_closed(&mut stream, BOUND).await;
        assert!(seen.is_empty(), "{}", String::from_utf8_lossy(&seen));
        assert!(took >= Duration::from_millis(450), "closed after {took:?}");
        assert_served(&gateway).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_http2_preface_is_closed_after_the_idle_timeout() {
        let mock = MockProvider::start().await;
        let gateway = start("idle_timeout_ms: 500", &mock).await;
        // The preface alone, and the preface with the client's SETTINGS: neither is a
        // request, and neither client answers the GOAWAY's ping.
        for hello in [
            H2_PREFACE.to_vec(),
            [H2_PREFACE, &[0, 0, 0, 4, 0, 0, 0, 0, 0]].concat(),
        ] {
            let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
            stream.write_all(&hello).await.unwrap();
            let (_, took) = until_closed(&mut stream, BOUND).await;
            assert!(took >= Duration::from_millis(450), "closed after {took:?}");
        }
        assert_served(&gateway).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn half_a_request_head_is_closed_after_the_header_read_timeout() {
        let mock = MockProvider::start().await;
        let gateway = start("idle_timeout_ms: 60000, header_read_timeout_ms: 500", &mock).await;
        let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
        stream
            .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let (_, took) = until_closed(&mut stream, BOUND).await;
        assert!(took >= Duration::from_millis(450), "closed after {took:?}");
        // A head trickled byte by byte is no request either: the idle timeout closes it.
        let gateway = start("idle_timeout_ms: 500, header_read_timeout_ms: 60000", &mock).await;
        let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
        let started = Instant::now();
        let head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaa";
        let mut closed = false;
        for byte in head.iter().cycle().take(10_000) {
            if stream.write_all(&[*byte]).await.is_err() {
                closed = true;
                break;
            }
            let mut buf = [0u8; 64];
            let read = tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf));
            if let Ok(Ok(0) | Err(_)) = read.await {
                closed = true;
                break;
            }
            assert!(started.elapsed() < BOUND, "still open after {BOUND:?}");
        }
        assert!(closed);
        assert!(started.elapsed() >= Duration::from_millis(450));
        assert_served(&gateway).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_kept_alive_http1_connection_is_closed_after_the_idle_timeout() {
        let mock = MockProvider::start().await;
        let gateway = start("idle_timeout_ms: 500, header_read_timeout_ms: 60000", &mock).await;
        let stream = TcpStream::connect(gateway.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        for _ in 0..2 {
            // hyper's sender takes a second request only once the first has fully ended.
            sender.ready().await.unwrap();
            let r = sender
                .send_request(chat_request(gateway.addr))
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let body = r.into_body().collect().await.unwrap().to_bytes();
            assert!(String::from_utf8_lossy(&body).contains("You said: hi"));
        }
        let idle_from = Instant::now();
        tokio::time::timeout(BOUND, conn)
            .await
            .expect("the kept-alive connection was not closed")
            .unwrap()
            .expect("closed cleanly");
        assert!(idle_from.elapsed() >= Duration::from_millis(450));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_http2_connection_is_closed_after_the_idle_timeout() {
        let mock = MockProvider::start().await;
        let gateway = start("idle_timeout_ms: 500", &mock).await;
        let stream = TcpStream::connect(gateway.addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        let conn = tokio::spawn(conn);
        let r = sender
            .send_request(chat_request(gateway.addr))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("You said: hi"));
        let idle_from = Instant::now();
        tokio::time::timeout(BOUND, conn)
            .await
            .expect("the idle HTTP/2 connection was not closed")
            .unwrap()
            .expect("closed cleanly, with GOAWAY");
        assert!(idle_from.elapsed() >= Duration::from_millis(450));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_in_flight_are_never_cut_by_the_idle_timeout() {
        let mock = MockProvider::start().await;
        let gateway = start("idle_timeout_ms: 300", &mock).await;
        let http = client();
        let post = |body: Value| {
            http.post(format!("{}/v1/chat/completions", gateway.base_url()))
                .bearer_auth(APP_KEY)
                .json(&body)
                .send()
        };
        // The provider thinks for five idle timeouts before answering.
        mock.set_fault(
            PROVIDER_KEY,
            Fault::Slow {
                delay_ms: 1_500,
                gap_ms: 0,
            },
        );
        let r = post(json!({ "model": "gpt-4o-mini", "messages": user("hi") }))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.text().await.unwrap().contains("choices"));
        // A stream whose events come more than an idle timeout apart.
        mock.set_fault(
            PROVIDER_KEY,
            Fault::Slow {
                delay_ms: 0,
                gap_ms: 400,
            },
        );
        let started = Instant::now();
        let r = post(json!({ "model": "gpt-4o-mini", "stream": true, "messages": user("hi") }))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        let events = sse_data(&text);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
        assert!(started.elapsed() > Duration::from_millis(1_000));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_over_the_cap_are_closed_at_once_and_those_open_keep_working() {
        let mock = MockProvider::start().await;
        let gateway = start(
            "max_connections: 20, idle_timeout_ms: 3000, header_read_timeout_ms: 60000",
            &mock,
        )
        .await;
        let mut held = Vec::new();
        for _ in 0..20 {
            let stream = TcpStream::connect(gateway.addr).await.unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            let conn = tokio::spawn(conn);
            let r = sender
                .send_request(chat_request(gateway.addr))
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.into_body().collect().await.unwrap();
            held.push((sender, conn));
        }
        // The 21st sends a whole request at once: at the cap it is closed unanswered.
        let mut extra = TcpStream::connect(gateway.addr).await.unwrap();
        let body = chat_body();
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {APP_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let _ = extra.write_all(request.as_bytes()).await;
        let (seen, _) = until_closed(&mut extra, BOUND).await;
        assert!(
            seen.is_empty(),
            "answered over the cap: {}",
            String::from_utf8_lossy(&seen)
        );
        // Those open are still served.
        let (sender, _) = &mut held[0];
        sender.ready().await.unwrap();
        let r = sender
            .send_request(chat_request(gateway.addr))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.into_body().collect().await.unwrap();
        assert!(gateway.logs().contains("connection limit reached"));
        // Once they idle out (their clients still holding them), new clients are served.
        let (_senders, conns): (Vec<_>, Vec<_>) = held.into_iter().unzip();
        for conn in conns {
            tokio::time::timeout(BOUND, conn)
                .await
                .expect("a held connection was not closed")
                .unwrap()
                .expect("closed cleanly");
        }
        assert_served(&gateway).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http2_streams_per_connection_are_capped() {
        let mock = MockProvider::start().await;
        let gateway = start("http2_max_concurrent_streams: 7", &mock).await;
        let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
        stream.write_all(H2_PREFACE).await.unwrap();
        stream
            .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
            .await
            .unwrap();
        // The server's first frame is its SETTINGS.
        let mut head = [0u8; 9];
        tokio::time::timeout(BOUND, stream.read_exact(&mut head))
            .await
            .expect("no SETTINGS")
            .unwrap();
        assert_eq!(head[3], 4, "not a SETTINGS frame: {head:?}");
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).await.unwrap();
        let settings: Vec<(u16, u32)> = payload
            .chunks_exact(6)
            .map(|s| {
                (
                    u16::from_be_bytes([s[0], s[1]]),
                    u32::from_be_bytes([s[2], s[3], s[4], s[5]]),
                )
            })
            .collect();
        // SETTINGS_MAX_CONCURRENT_STREAMS is 0x3.
        assert!(settings.contains(&(3, 7)), "{settings:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn request_bodies_beyond_the_memory_budget_get_503_at_once() {
        let mock = MockProvider::start().await;
        let gateway = start("max_body_bytes: 1000, max_body_memory_bytes: 1000", &mock).await;
        // A client declares a 1000-byte body, then waits: the gateway takes the whole budget
        // for it before asking for it (`100 Continue`).
        let mut slow = TcpStream::connect(gateway.addr).await.unwrap();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {APP_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: 1000\r\nExpect: 100-continue\r\n\r\n"
        );
        slow.write_all(head.as_bytes()).await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&seen).contains("100 Continue") {
            let n = tokio::time::timeout(BOUND, slow.read(&mut buf))
                .await
                .expect("no 100 Continue")
                .unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        // Meanwhile another request's body has no room: 503, retry in a second.
        let r = client()
            .post(format!("{}/v1/chat/completions", gateway.base_url()))
            .bearer_auth(APP_KEY)
            .header("content-type", "application/json")
            .body(chat_body())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(
            r.headers().get("retry-after").and_then(|v| v.to_str().ok()),
            Some("1")
        );
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "gateway_busy", "{v}");
        // The first client sends its body and is answered; then the budget is free again.
        let mut body = chat_body().into_bytes();
        body.resize(1000, b' ');
        slow.write_all(&body).await.unwrap();
        seen.clear();
        while !String::from_utf8_lossy(&seen).contains("You said: hi") {
            let n = tokio::time::timeout(BOUND, slow.read(&mut buf))
                .await
                .expect("no answer")
                .unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
        assert_served(&gateway).await;
        // A body over max_body_bytes is still 413, not 503.
        let r = client()
            .post(format!("{}/v1/chat/completions", gateway.base_url()))
            .bearer_auth(APP_KEY)
            .header("content-type", "application/json")
            .body(vec![b' '; 1001])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 413);
    }

    /// 2,000 connections that never make a request — silent, trickling a request head a
    /// byte at a time, or silent after the HTTP/2 preface — do not keep a real client from
    /// being served, and are all closed once idle for the timeout. (The 10,000 of the issue
    /// are measured by hand: docs/hardening.md.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn thousands_of_idle_and_slowloris_connections_do_not_stop_real_clients() {
        const N: usize = 2_000;
        const IDLE_MS: u64 = 6_000;
        let mock = MockProvider::start().await;
        let gateway = start(
            &format!(
                "max_connections: 5000, idle_timeout_ms: {IDLE_MS}, header_read_timeout_ms: 60000"
            ),
            &mock,
        )
        .await;
        let opened = Instant::now();
        let mut tasks = Vec::with_capacity(N);
        for i in 0..N {
            let stream = TcpStream::connect(gateway.addr)
                .await
                .unwrap_or_else(|e| panic!("connection {i}: {e}"));
            tasks.push(tokio::spawn(slowloris(stream, i % 3)));
        }
        let all_open = opened.elapsed();
        // A real client, on a fresh connection, while they are all open.
        let asked = Instant::now();
        assert_served(&gateway).await;
        let served = Instant::now();
        let mut first_closed = None::<Instant>;
        for task in tasks {
            let closed = tokio::time::timeout(BOUND + Duration::from_millis(IDLE_MS), task)
                .await
                .expect("a slowloris connection is still open")
                .unwrap();
            first_closed = Some(first_closed.map_or(closed, |f: Instant| f.min(closed)));
        }
        let first_closed = first_closed.unwrap();
        eprintln!(
            "{N} connections opened in {all_open:?}; real request answered in {:?}; all closed \
             {:?} after the first was opened",
            served - asked,
            opened.elapsed()
        );
        assert!(
            served < first_closed,
            "the real client was served only after slowloris connections were closed \
             (opening them took {all_open:?})"
        );
    }

    /// Holds `stream` without ever completing a request, in one of three ways; when the
    /// gateway closed it.
    async fn slowloris(stream: TcpStream, style: usize) -> Instant {
        let (mut reader, mut writer) = stream.into_split();
        let hold = async move {
            match style {
                0 => std::future::pending::<()>().await,
                1 => {
                    let head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ";
                    if writer.write_all(head).await.is_err() {
                        return;
                    }
                    while writer.write_all(b"a").await.is_ok() {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
                _ => {
                    let _ = writer.write_all(H2_PREFACE).await;
                    std::future::pending::<()>().await
                }
            }
            std::future::pending::<()>().await
        };
        let closed = async move {
            let mut buf = [0u8; 1024];
            loop {
                match reader.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        };
        tokio::select! {
            () = hold => unreachable!(),
            () = closed => {}
        }
        Instant::now()
    }
}
