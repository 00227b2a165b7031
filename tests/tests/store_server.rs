//! `tollgate store-server` on a real Redis: Envoy's way to commit shared state
//! (docs/redis.md). A commit is all or nothing: written when every key holds what its op
//! expects, else nothing is written and every key's current value is answered; calendar
//! allowances expire; 64-bit values round-trip exactly; with Redis down it answers 503
//! within its timeout, and uses Redis again by itself when it returns.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_e2e::redis::Redis;

/// A store-server on `redis` with `timeout_ms`, and the requests the tests make of it.
struct StoreServer(tollgate_e2e::redis::StoreServer);

impl StoreServer {
    fn start(redis: &Redis, timeout_ms: u64) -> StoreServer {
        let config = format!(
            r#"
store: {{ kind: redis, url: "{url}", timeout_ms: {timeout_ms}, server: "127.0.0.1:1" }}
consumers:
  - name: app
    keys: [{{ sha256: "{hash}" }}]
    models: [m]
providers:
  - {{ name: p, kind: mock }}
models:
  - {{ name: m, provider: p }}
"#,
            url = redis.url(),
            hash = "0".repeat(64),
        );
        StoreServer(tollgate_e2e::redis::StoreServer::start(&config))
    }

    fn logs(&self) -> String {
        self.0.logs()
    }

    async fn post(&self, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let r = reqwest::Client::new()
            .post(format!("http://{}/v1/store/commit", self.0.addr))
            .header("content-type", "application/json")
            .body(body)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Commits `ops` and answers the reply; anything but 200 fails the test.
    async fn commit(&self, ops: Value) -> Value {
        let (status, body) = self.post(json!({ "ops": ops }).to_string()).await;
        assert_eq!(status, 200, "{body}\n{}", self.logs());
        body
    }

    async fn health(&self) -> u16 {
        reqwest::Client::new()
            .get(format!("http://{}/healthz", self.0.addr))
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }
}

/// A 503 `shared_state_unavailable`, answered within `within` of `started`.
fn assert_unavailable((status, reply): (u16, Value), started: Instant, within: Duration) {
    assert_eq!(status, 503, "{reply}");
    assert_eq!(
        reply["error"]["code"], "shared_state_unavailable",
        "{reply}"
    );
    assert!(
        started.elapsed() < within,
        "answered in {:?}",
        started.elapsed()
    );
}

/// The value at the core's `key` on Redis, read directly (`None`: absent).
fn get(redis: &Redis, key: &str) -> Option<String> {
    let reply = redis.command(&format!("GET {{tollgate}}:{key}")).unwrap();
    if reply.starts_with("$-1") {
        return None;
    }
    let mut lines = reply.lines();
    assert!(lines.next().unwrap().starts_with('$'), "{reply}");
    Some(lines.next().unwrap().to_string())
}

fn pttl(redis: &Redis, key: &str) -> i64 {
    let reply = redis.command(&format!("PTTL {{tollgate}}:{key}")).unwrap();
    reply
        .trim()
        .strip_prefix(':')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{reply}"))
}

#[tokio::test]
async fn a_commit_is_all_or_nothing() {
    let redis = Redis::start();
    let server = StoreServer::start(&redis, 1000);
    assert_eq!(server.health().await, 200);

    // Fresh keys, read as absent: written.
    let reply = server
        .commit(json!([
            { "key": "t/a", "expect": null, "write": 5 },
            { "key": "t/b", "expect": null, "write": 7 },
        ]))
        .await;
    assert_eq!(reply, json!({ "committed": true }));
    assert_eq!(get(&redis, "t/a").as_deref(), Some("5"));
    assert_eq!(get(&redis, "t/b").as_deref(), Some("7"));

    // One stale expectation: nothing is written, every key's value is answered.
    let reply = server
        .commit(json!([
            { "key": "t/a", "expect": 5, "write": 6 },
            { "key": "t/b", "expect": 6, "write": 8 },
            { "key": "t/c", "expect": null, "write": 1 },
        ]))
        .await;
    assert_eq!(
        reply,
        json!({ "committed": false, "current": [5, 7, null] })
    );
    assert_eq!(get(&redis, "t/a").as_deref(), Some("5"), "not written");
    assert_eq!(get(&redis, "t/b").as_deref(), Some("7"));
    assert_eq!(get(&redis, "t/c"), None);

    // Decided again on the current values: written.
    let reply = server
        .commit(json!([
            { "key": "t/a", "expect": 5, "write": 6 },
            { "key": "t/b", "expect": 7, "write": 8 },
            { "key": "t/c", "expect": null, "write": 1 },
        ]))
        .await;
    assert_eq!(reply, json!({ "committed": true }));
    assert_eq!(get(&redis, "t/a").as_deref(), Some("6"));
    assert_eq!(get(&redis, "t/b").as_deref(), Some("8"));
    assert_eq!(get(&redis, "t/c").as_deref(), Some("1"));

    // A read-only op (no write) the decision depended on: if it moved, nothing is written.
    let reply = server
        .commit(json!([
            { "key": "t/a", "expect": 6, "write": 100 },
            { "key": "t/health", "expect": 3 },
        ]))
        .await;
    assert_eq!(reply, json!({ "committed": false, "current": [6, null] }));
    assert_eq!(get(&redis, "t/a").as_deref(), Some("6"));
    assert_eq!(
        get(&redis, "t/health"),
        None,
        "a read-only op writes nothing"
    );
    // Still as read: the other writes are made, the read-only key is left as it is.
    let reply = server
        .commit(json!([
            { "key": "t/a", "expect": 6, "write": 100 },
            { "key": "t/health", "expect": null },
        ]))
        .await;
    assert_eq!(reply, json!({ "committed": true }));
    assert_eq!(get(&redis, "t/a").as_deref(), Some("100"));
    assert_eq!(get(&redis, "t/health"), None);

    // Nothing to do: committed.
    assert_eq!(server.commit(json!([])).await, json!({ "committed": true }));
}

#[tokio::test]
async fn allowances_expire_and_64_bit_values_round_trip() {
    let redis = Redis::start();
    let server = StoreServer::start(&redis, 1000);
    let daily = "tollgate/limit/c/app/daily_tokens/1000";
    let rate = "tollgate/limit/c/app/requests_per_minute/20";
    let reply = server
        .commit(json!([
            { "key": daily, "expect": null, "write": 42 },
            { "key": rate, "expect": null, "write": 1 },
        ]))
        .await;
    assert_eq!(reply, json!({ "committed": true }));
    let ttl = pttl(&redis, daily);
    assert!(
        ttl > 86_400_000 && ttl <= 2 * 86_400_000,
        "a daily allowance expires two days after its last write: {ttl}"
    );
    assert_eq!(
        pttl(&redis, rate),
        -1,
        "a rate lives as long as the config names it"
    );

    // GCRA states and packed leases use all 64 bits: a double would round these.
    let big = u64::MAX;
    let near = u64::MAX - 1;
    let reply = server
        .commit(json!([{ "key": "t/big", "expect": null, "write": near }]))
        .await;
    assert_eq!(reply, json!({ "committed": true }));
    assert_eq!(get(&redis, "t/big"), Some(near.to_string()));
    // An expectation off by one is stale, and the current value comes back exactly.
    let reply = server
        .commit(json!([{ "key": "t/big", "expect": big, "write": 1 }]))
        .await;
    assert_eq!(reply, json!({ "committed": false, "current": [near] }));
    let reply = server
        .commit(json!([{ "key": "t/big", "expect": near, "write": big }]))
        .await;
    assert_eq!(reply, json!({ "committed": true }));
    assert_eq!(get(&redis, "t/big"), Some(big.to_string()));
    let reply = server
        .commit(json!([{ "key": "t/big", "expect": 0 }]))
        .await;
    assert_eq!(reply, json!({ "committed": false, "current": [big] }));
}

#[tokio::test]
async fn a_bad_request_is_refused() {
    let redis = Redis::start();
    let server = StoreServer::start(&redis, 1000);
    for body in [
        "{",
        "[]",
        r#"{"ops":[{"key":"k","expect":-1}]}"#,
        r#"{"ops":[{"expect":1}]}"#,
    ] {
        let (status, reply) = server.post(body).await;
        assert_eq!(status, 400, "{body}: {reply}");
        assert_eq!(reply["error"]["type"], "invalid_request_error", "{reply}");
        assert_eq!(reply["error"]["code"], "invalid_json", "{reply}");
    }
    let (status, reply) = server.post(vec![b' '; 2 * 1024 * 1024]).await;
    assert_eq!(status, 413, "{reply}");
    assert_eq!(reply["error"]["type"], "invalid_request_error", "{reply}");

    let get = reqwest::Client::new()
        .get(format!("http://{}/v1/store/commit", server.0.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status().as_u16(), 405);
    let other = reqwest::Client::new()
        .post(format!("http://{}/v1/chat/completions", server.0.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status().as_u16(), 404);
}

#[tokio::test]
async fn redis_down_is_503_in_time_and_its_return_is_used() {
    let mut redis = Redis::start();
    let server = StoreServer::start(&redis, 200);
    let ops =
        |expect: Value, write: u64| json!([{ "key": "t/k", "expect": expect, "write": write }]);
    assert_eq!(
        server.commit(ops(Value::Null, 1)).await,
        json!({ "committed": true })
    );

    redis.stop();
    for _ in 0..3 {
        let started = Instant::now();
        let answer = server
            .post(json!({ "ops": ops(json!(1), 2) }).to_string())
            .await;
        assert_unavailable(answer, started, Duration::from_secs(5));
    }
    assert_eq!(server.health().await, 503);

    // Back, empty (a restart): used again without restarting the store-server.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    let reply = loop {
        let (status, reply) = server
            .post(json!({ "ops": ops(Value::Null, 3) }).to_string())
            .await;
        if status == 200 || Instant::now() > deadline {
            assert_eq!(status, 200, "{reply}\n{}", server.logs());
            break reply;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(reply, json!({ "committed": true }));
    assert_eq!(get(&redis, "t/k").as_deref(), Some("3"));
    assert_eq!(server.health().await, 200);
    let logs = server.logs();
    assert!(logs.contains("redis is unavailable"), "{logs}");
    assert!(logs.contains("redis is back"), "{logs}");
}

#[tokio::test]
async fn a_redis_slower_than_the_timeout_is_503_in_time() {
    let redis = Redis::start();
    let server = StoreServer::start(&redis, 200);
    let ops = json!([{ "key": "t/slow", "expect": null, "write": 1 }]);
    assert_eq!(
        server.commit(ops.clone()).await,
        json!({ "committed": true })
    );
    // Redis holds every command for 3 s: connected, but not answering.
    let paused = redis.command("CLIENT PAUSE 3000 ALL").unwrap();
    assert!(paused.starts_with("+OK"), "{paused}");
    let started = Instant::now();
    let answer = server
        .post(json!({ "ops": [{ "key": "t/slow", "expect": 1, "write": 2 }] }).to_string())
        .await;
    // Redis is paused for 3 s.
    assert_unavailable(answer, started, Duration::from_secs(2));
    // Answering again: used again (whether the paused commit ran after all is not known
    // to the client, which reads the current value from a refusal).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, reply) = server
            .post(json!({ "ops": [{ "key": "t/slow", "expect": 9 }] }).to_string())
            .await;
        if status == 200 {
            assert_eq!(reply["committed"], false, "{reply}");
            break;
        }
        assert!(Instant::now() < deadline, "{reply}\n{}", server.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An op that says how its write is made (`redo`) is redone on the value its key holds, by
/// the core's math, rather than handed back: concurrent additions to one counter all land.
/// An op without one still hands the commit back.
#[tokio::test]
async fn a_counters_write_is_redone_on_the_value_it_finds() {
    let redis = Redis::start();
    let server = StoreServer::start(&redis, 1000);
    let add = |expect: Value, write: u64| json!([{ "key": "t/n", "expect": expect, "write": write, "redo": { "op": "add", "n": 1 } }]);
    assert_eq!(
        server.commit(add(Value::Null, 1)).await,
        json!({ "committed": true })
    );
    // Two more, each decided on the stale view that the counter is absent.
    for now in [2, 3] {
        assert_eq!(
            server.commit(add(Value::Null, 1)).await,
            json!({ "committed": true, "current": [now] })
        );
    }
    assert_eq!(get(&redis, "t/n").as_deref(), Some("3"));
    // Without a redo, a stale expectation is handed back.
    let reply = server
        .commit(json!([{ "key": "t/n", "expect": 1, "write": 2 }]))
        .await;
    assert_eq!(reply, json!({ "committed": false, "current": [3] }));
}
