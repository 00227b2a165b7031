//! Limits and key health shared across native replicas on a real Redis (`store.kind:
//! redis`, docs/redis.md): several gateways enforce one set of exact limits, a key one saw
//! cooling is skipped by all, concurrency slots hold across them and come back after a
//! killed replica's lease, and when Redis stops each `on_failure` mode answers at once as
//! stated, and the gateways go back to Redis by themselves when it returns.
//!
//! Native host only: Envoy with `store.kind: redis` is not built yet (the filter refuses
//! such a config), see docs/redis.md.

mod native_only {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use serde_json::{json, Value};
    use tokio::sync::Notify;
    use tollgate_e2e::gateway::{Gateway, Host};
    use tollgate_e2e::mock_provider::{Fault, MockProvider};
    use tollgate_e2e::redis::Redis;
    use tollgate_e2e::scenario::{fresh_client, sha256_hex, start_gateway, user};

    const APP_KEY: &str = "tg-redis-app-key";
    const KEY_A: &str = "sk-redis-provider-a";
    const KEY_B: &str = "sk-redis-provider-b";

    /// A config on `redis` with `store` settings `store` (a flow mapping's inside) and the
    /// consumer's `limits`.
    fn config(redis: &Redis, mock: &MockProvider, store: &str, limits: &str) -> String {
        format!(
            r#"
server: {{ listen: "127.0.0.1:0", concurrency_lease_ms: 1000 }}
store: {{ kind: redis, url: "{url}", {store} }}
consumers:
  - name: app
    keys: [{{ sha256: {app} }}]
    models: [gpt-4o-mini]
    limits: {limits}
providers:
  - name: upstream
    kind: openai
    base_url: {base}
    strategy: priority
    retry: {{ attempts: 2 }}
    keys:
      - {{ id: key-a, secret_env: TG_REDIS_KEY_A }}
      - {{ id: key-b, secret_env: TG_REDIS_KEY_B }}
models:
  - {{ name: gpt-4o-mini, provider: upstream }}
"#,
            url = redis.url(),
            app = sha256_hex(APP_KEY),
            base = mock.base_url(),
        )
    }

    async fn replicas(n: usize, config: &str) -> Vec<Gateway> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(
                start_gateway(
                    Host::Native,
                    config.to_string(),
                    vec![("TG_REDIS_KEY_A", KEY_A), ("TG_REDIS_KEY_B", KEY_B)],
                )
                .await,
            );
        }
        out
    }

    async fn chat(gateway: &Gateway, stream: bool) -> (u16, Value) {
        let r = fresh_client()
            .post(format!("{}/v1/chat/completions", gateway.base_url()))
            .bearer_auth(APP_KEY)
            .json(&json!({
                "model": "gpt-4o-mini",
                "max_tokens": 20,
                "stream": stream,
                "messages": user("hi"),
            }))
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

    /// 50 concurrent clients spread over three replicas against one limit of 20 requests a
    /// minute: exactly 20 are served, as by one process (each replica alone would let 20
    /// through, 60 in all).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_enforce_one_limit_exactly() {
        let redis = Redis::start();
        let mock = MockProvider::start().await;
        let config = config(
            &redis,
            &mock,
            "timeout_ms: 1000",
            "{ requests_per_minute: 20 }",
        );
        let gateways = Arc::new(replicas(3, &config).await);
        let clients: Vec<_> = (0..50)
            .map(|i| {
                let gateways = Arc::clone(&gateways);
                tokio::spawn(async move { chat(&gateways[i % 3], false).await })
            })
            .collect();
        let mut served = 0;
        let mut limited = 0;
        for c in clients {
            match c.await.unwrap() {
                (200, _) => served += 1,
                (429, body) => {
                    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
                    limited += 1;
                }
                (status, body) => panic!("{status}: {body}"),
            }
        }
        assert_eq!((served, limited), (20, 30));
        assert_eq!(
            mock.requests().len(),
            20,
            "only admitted requests went upstream"
        );
    }

    /// A key answering 429 behind one replica is skipped by every replica: the key's health
    /// is in Redis.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_one_replica_saw_cooling_is_skipped_by_all() {
        let redis = Redis::start();
        let mock = MockProvider::start().await;
        let config = config(&redis, &mock, "timeout_ms: 1000", "{}");
        let gateways = replicas(3, &config).await;
        mock.set_fault(
            KEY_A,
            Fault::TooManyRequests {
                retry_after_secs: Some(60),
            },
        );
        // Priority: key A first; it answers 429, the request is retried on B.
        let (status, body) = chat(&gateways[0], false).await;
        assert_eq!(status, 200, "{body}");
        let keys = |mock: &MockProvider| -> Vec<String> {
            mock.requests()
                .into_iter()
                .map(|r| r.key.unwrap_or_default())
                .collect()
        };
        assert_eq!(keys(&mock), [KEY_A, KEY_B]);
        mock.clear_requests();
        for g in gateways.iter().skip(1).chain(gateways.iter().skip(1)) {
            let (status, body) = chat(g, false).await;
            assert_eq!(status, 200, "{body}");
        }
        assert_eq!(
            keys(&mock),
            [KEY_B; 4],
            "a replica called the key another saw cooling"
        );
    }

    /// Two slots for the consumer across three replicas: two held streams on two replicas,
    /// and the third replica refuses a third. A replica killed while it holds a slot gives
    /// it back once its lease (1 s here) has passed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrency_holds_across_replicas_and_a_dead_replicas_slot_comes_back() {
        let redis = Redis::start();
        let mock = MockProvider::start().await;
        let config = config(&redis, &mock, "timeout_ms: 1000", "{ concurrency: 2 }");
        let mut gateways = replicas(3, &config).await;
        let release = Arc::new(Notify::new());
        mock.set_fault(
            KEY_A,
            Fault::HoldStream {
                release: Arc::clone(&release),
            },
        );
        // Two streams held open, on replicas 0 and 1, each holding a slot.
        let mut held = Vec::new();
        for g in gateways.iter().take(2) {
            let r = fresh_client()
                .post(format!("{}/v1/chat/completions", g.base_url()))
                .bearer_auth(APP_KEY)
                .json(&json!({ "model": "gpt-4o-mini", "stream": true, "messages": user("hi") }))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            held.push(r);
        }
        let (status, body) = chat(&gateways[2], false).await;
        assert_eq!(status, 429, "{body}");
        assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
        // New requests are answered at once from here on; the held stream stays held.
        mock.clear_fault(KEY_A);
        // Replica 0 dies holding its slot; its client's stream breaks.
        let dead = gateways.remove(0);
        drop(dead);
        drop(held.remove(0));
        let started = Instant::now();
        loop {
            let (status, body) = chat(&gateways[1], false).await;
            if status == 200 {
                break;
            }
            assert_eq!(status, 429, "{body}");
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the dead replica's slot never came back"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Not before its lease could have lapsed.
        assert!(started.elapsed() >= Duration::from_millis(500));
        release.notify_waiters();
    }

    /// `on_failure: closed`: with Redis stopped, requests get 503 `shared_state_unavailable`
    /// at once, never waiting on Redis; when it is back (empty) the replicas use it again by
    /// themselves and the limit is exact again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_down_closed_refuses_at_once_and_recovers() {
        let mut redis = Redis::start();
        let mock = MockProvider::start().await;
        let config = config(
            &redis,
            &mock,
            "timeout_ms: 100, on_failure: closed",
            "{ requests_per_minute: 3 }",
        );
        let gateways = replicas(2, &config).await;
        assert_eq!(chat(&gateways[0], false).await.0, 200);
        redis.stop();
        for g in gateways.iter().chain(gateways.iter()) {
            let asked = Instant::now();
            let (status, body) = chat(g, false).await;
            assert_eq!(status, 503, "{body}");
            assert_eq!(body["error"]["code"], "shared_state_unavailable", "{body}");
            assert!(
                asked.elapsed() < Duration::from_secs(2),
                "waited {:?}",
                asked.elapsed()
            );
        }
        redis.restart();
        let started = Instant::now();
        while chat(&gateways[1], false).await.0 != 200 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the replicas did not go back to Redis"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Redis came back empty: two more of the minute's three, over both replicas.
        assert_eq!(chat(&gateways[0], false).await.0, 200);
        assert_eq!(chat(&gateways[1], false).await.0, 200);
        assert_eq!(chat(&gateways[0], false).await.0, 429);
    }

    /// A daily allowance's counter expires once its day is over (two days after its last
    /// write); a rate's lives on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calendar_allowances_expire_on_redis() {
        let redis = Redis::start();
        let mock = MockProvider::start().await;
        let config = config(
            &redis,
            &mock,
            "timeout_ms: 1000",
            "{ daily_tokens: 100000, requests_per_minute: 100 }",
        );
        let gateways = replicas(1, &config).await;
        assert_eq!(chat(&gateways[0], false).await.0, 200);
        let key = |pattern: &str| -> String {
            let reply = redis.command(&format!("KEYS *{pattern}*")).unwrap();
            // `*1`, `$<len>`, the key.
            reply.lines().nth(2).unwrap_or_default().to_string()
        };
        let ttl = |key: &str| -> i64 {
            let reply = redis.command(&format!("PTTL {key}")).unwrap();
            reply.trim().trim_start_matches(':').parse().unwrap()
        };
        let daily = key("daily_tokens");
        assert!(daily.contains("daily_tokens"), "{daily:?}");
        let left = ttl(&daily);
        assert!(
            (2 * 86_400_000 - 60_000..=2 * 86_400_000).contains(&left),
            "{daily} expires in {left} ms"
        );
        let rate = key("requests_per_minute");
        assert_eq!(ttl(&rate), -1, "{rate} must not expire");
    }

    /// `on_failure: open`: with Redis stopped, requests are admitted unchecked.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_down_open_admits_unchecked() {
        let mut redis = Redis::start();
        let mock = MockProvider::start().await;
        let config = config(
            &redis,
            &mock,
            "timeout_ms: 100, on_failure: open",
            "{ requests_per_minute: 2 }",
        );
        let gateways = replicas(1, &config).await;
        redis.stop();
        for _ in 0..5 {
            let (status, body) = chat(&gateways[0], false).await;
            assert_eq!(status, 200, "{body}");
        }
    }

    /// `on_failure: local` with `replicas: 2`: with Redis stopped, each replica enforces half
    /// of the limit in its own memory.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_down_local_enforces_each_replicas_share() {
        let mut redis = Redis::start();
        let mock = MockProvider::start().await;
        let config = config(
            &redis,
            &mock,
            "timeout_ms: 100, on_failure: local, replicas: 2",
            "{ requests_per_minute: 6 }",
        );
        let gateways = replicas(2, &config).await;
        redis.stop();
        for g in &gateways {
            // The first request finds Redis down (it was admitted on the whole limit);
            // from then on each replica admits its share, 3.
            let (status, body) = chat(g, false).await;
            assert_eq!(status, 200, "{body}");
            let mut served = 0;
            for _ in 0..6 {
                match chat(g, false).await {
                    (200, _) => served += 1,
                    (429, _) => {}
                    (status, body) => panic!("{status}: {body}"),
                }
            }
            assert_eq!(served, 3, "each replica's share of 6 over 2 replicas");
        }
    }
}
