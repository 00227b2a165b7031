//! Limits and key health shared across replicas on a real Redis (`store.kind: redis`,
//! docs/redis.md): native gateways and Envoys (each with two workers, through `tollgate
//! store-server`) enforce one set of exact limits, a key one saw cooling is skipped by all,
//! concurrency slots hold across them and come back after a killed replica's lease, and when
//! Redis stops each `on_failure` mode answers at once as stated, and the gateways go back to
//! Redis by themselves when it returns.

mod fleet {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use serde_json::{json, Value};
    use tokio::sync::Notify;
    use tollgate_e2e::gateway::{Gateway, Host};
    use tollgate_e2e::mock_provider::{Fault, MockProvider};
    use tollgate_e2e::redis::{Redis, StoreServer};
    use tollgate_e2e::scenario::{fresh_client, sha256_hex, start_gateway, user};

    const APP_KEY: &str = "tg-redis-app-key";
    const KEY_A: &str = "sk-redis-provider-a";
    const KEY_B: &str = "sk-redis-provider-b";

    /// Three native gateways and two Envoys of two workers each.
    const MIXED: [Host; 5] = [Host::Native, Host::Native, Host::Native, ENVOY, ENVOY];
    const ENVOY: Host = Host::Envoy { workers: 2 };

    /// A config on `redis` with `store` settings `store` (a flow mapping's inside) and the
    /// consumer's `limits`; Envoys reach Redis through the store-server at `server`.
    fn config(
        redis: &Redis,
        mock: &MockProvider,
        store: &str,
        limits: &str,
        server: &str,
    ) -> String {
        format!(
            r#"
server: {{ listen: "127.0.0.1:0", concurrency_lease_ms: 1000 }}
store: {{ kind: redis, url: "{url}", server: "{server}", {store} }}
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

    /// Gateways of `hosts` on one Redis, and the store-server the Envoys among them use.
    struct Fleet {
        gateways: Vec<Gateway>,
        store_server: StoreServer,
    }

    async fn fleet(
        hosts: &[Host],
        redis: &Redis,
        mock: &MockProvider,
        store: &str,
        limits: &str,
    ) -> Fleet {
        let store_server = StoreServer::start(&config(redis, mock, store, limits, "127.0.0.1:1"));
        let config = config(redis, mock, store, limits, &store_server.addr.to_string());
        let mut gateways = Vec::new();
        for host in hosts {
            gateways.push(
                start_gateway(
                    *host,
                    config.clone(),
                    vec![("TG_REDIS_KEY_A", KEY_A), ("TG_REDIS_KEY_B", KEY_B)],
                )
                .await,
            );
        }
        Fleet {
            gateways,
            store_server,
        }
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

    /// 50 concurrent clients, half of them streaming, spread over three native replicas and
    /// two Envoys on one Redis, the consumer under `limits`: their answers, the provider
    /// that served them, and how long it took in seconds.
    async fn fifty_clients(limits: &str) -> (Vec<(u16, Value)>, MockProvider, f64) {
        let redis = Redis::start();
        let mock = MockProvider::start().await;
        let fleet = fleet(&MIXED, &redis, &mock, "timeout_ms: 1000", limits).await;
        let gateways = Arc::new(fleet.gateways);
        let started = Instant::now();
        let clients: Vec<_> = (0..50)
            .map(|i| {
                let gateways = Arc::clone(&gateways);
                tokio::spawn(async move { chat(&gateways[i % 5], i % 2 == 0).await })
            })
            .collect();
        let mut answers = Vec::new();
        for c in clients {
            answers.push(c.await.unwrap());
        }
        (answers, mock, started.elapsed().as_secs_f64())
    }

    /// Served and refused among `answers`; anything but 200 and a rate limit fails.
    fn served_and_limited(answers: &[(u16, Value)]) -> (u64, u64) {
        let (mut served, mut limited) = (0, 0);
        for (status, body) in answers {
            match status {
                200 => served += 1,
                429 => {
                    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
                    limited += 1;
                }
                _ => panic!("{status}: {body}"),
            }
        }
        (served, limited)
    }

    /// Against one limit of 20 requests a minute: exactly 20 are served, as by one process
    /// (each replica alone would let 20 through, 100 in all).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_enforce_one_limit_exactly() {
        let (answers, mock, _) = fifty_clients("{ requests_per_minute: 20 }").await;
        assert_eq!(served_and_limited(&answers), (20, 30));
        assert_eq!(
            mock.requests().len(),
            20,
            "only admitted requests went upstream"
        );
    }

    /// Against one limit of 300 tokens a minute: what the provider used for the admitted
    /// requests (15 tokens each, reported) stays within the limit plus one reservation (and
    /// what refilled while the test ran); each replica alone would admit them all.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_enforce_one_token_limit() {
        let (answers, mock, elapsed) = fifty_clients("{ tokens_per_minute: 300 }").await;
        let (served, _) = served_and_limited(&answers);
        // A reservation: the prompt's estimate and `max_tokens` (20).
        let one_reservation = 40.0;
        let refilled = (elapsed * 300.0 / 60.0).ceil();
        let used = served as f64 * 15.0;
        eprintln!("token limit over 5 replicas: {served} admitted, {used} tokens used of 300 (+{refilled} refilled in {elapsed:.2} s)");
        assert!(
            used <= 300.0 + one_reservation + refilled,
            "{served} requests used {used} tokens of 300 (+{refilled} refilled in {elapsed:.1} s)"
        );
        assert!(served >= 7, "only {served} admitted");
        assert_eq!(mock.requests().len() as u64, served);
    }

    /// A key answering 429 behind one replica (an Envoy) is skipped by every replica, native
    /// or Envoy, on any worker: the key's health is in Redis before the router retries.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_one_replica_saw_cooling_is_skipped_by_all() {
        let redis = Redis::start();
        let mock = MockProvider::start().await;
        let hosts = [ENVOY, Host::Native, ENVOY];
        let fleet = fleet(&hosts, &redis, &mock, "timeout_ms: 1000", "{}").await;
        let gateways = &fleet.gateways;
        mock.set_fault(
            KEY_A,
            Fault::TooManyRequests {
                retry_after_secs: Some(60),
            },
        );
        // Priority: key A first; it answers 429, the request is retried on B.
        let (status, body) = chat(&gateways[0], false).await;
        assert_eq!(status, 200, "{body}\n{}", fleet.store_server.logs());
        let keys = |mock: &MockProvider| -> Vec<String> {
            mock.requests()
                .into_iter()
                .map(|r| r.key.unwrap_or_default())
                .collect()
        };
        assert_eq!(keys(&mock), [KEY_A, KEY_B]);
        mock.clear_requests();
        for g in gateways.iter().chain(gateways.iter()) {
            let (status, body) = chat(g, false).await;
            assert_eq!(status, 200, "{body}");
        }
        assert_eq!(
            keys(&mock),
            [KEY_B; 6],
            "a replica called the key another saw cooling"
        );
    }

    /// Two slots for the consumer across an Envoy, a native replica and another Envoy: two
    /// held streams on the first two, and the third refuses a third. The Envoy, killed while
    /// it holds a slot, gives it back once its lease (1 s here) has passed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrency_holds_across_replicas_and_a_dead_replicas_slot_comes_back() {
        let redis = Redis::start();
        let mock = MockProvider::start().await;
        let hosts = [ENVOY, Host::Native, ENVOY];
        let fleet = fleet(
            &hosts,
            &redis,
            &mock,
            "timeout_ms: 1000",
            "{ concurrency: 2 }",
        )
        .await;
        let store_server = fleet.store_server;
        let mut gateways = fleet.gateways;
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
            assert_eq!(r.status(), 200, "{}\n{}", g.logs(), store_server.logs());
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
        let hosts = [Host::Native, ENVOY];
        let fleet = fleet(
            &hosts,
            &redis,
            &mock,
            "timeout_ms: 100, on_failure: closed",
            "{ requests_per_minute: 3 }",
        )
        .await;
        let gateways = &fleet.gateways;
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
        // Each replica goes back to Redis by itself (in Envoy, each worker: the first
        // request a moment after a failure tries Redis again).
        let started = Instant::now();
        for g in gateways {
            loop {
                let (status, body) = chat(g, false).await;
                if status == 200 {
                    break;
                }
                assert_eq!(status, 503, "{body}");
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "a replica did not go back to Redis: {body}\n{}\n{}",
                    g.logs(),
                    fleet.store_server.logs()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // Redis came back empty: one more of the minute's three, then none, from either.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(chat(&gateways[0], false).await.0, 200);
        for g in gateways.iter().chain(gateways.iter()) {
            assert_eq!(chat(g, false).await.0, 429);
        }
    }

    /// A daily allowance's counter expires once its day is over (two days after its last
    /// write); a rate's lives on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calendar_allowances_expire_on_redis() {
        let redis = Redis::start();
        let mock = MockProvider::start().await;
        let gateways = fleet(
            &[Host::Native],
            &redis,
            &mock,
            "timeout_ms: 1000",
            "{ daily_tokens: 100000, requests_per_minute: 100 }",
        )
        .await
        .gateways;
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

    /// `on_failure: open`: with Redis stopped, requests are admitted unchecked, in both
    /// hosts.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_down_open_admits_unchecked() {
        let mut redis = Redis::start();
        let mock = MockProvider::start().await;
        let hosts = [Host::Native, ENVOY];
        let fleet = fleet(
            &hosts,
            &redis,
            &mock,
            "timeout_ms: 100, on_failure: open",
            "{ requests_per_minute: 2 }",
        )
        .await;
        redis.stop();
        for g in &fleet.gateways {
            for _ in 0..5 {
                let (status, body) = chat(g, false).await;
                assert_eq!(status, 200, "{body}");
            }
        }
        // The store-server said why.
        assert!(
            fleet.store_server.logs().contains("redis"),
            "{}",
            fleet.store_server.logs()
        );
    }

    /// `on_failure: local` with `replicas: 2`: with Redis stopped, each replica enforces half
    /// of the limit in its own memory.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_down_local_enforces_each_replicas_share() {
        let mut redis = Redis::start();
        let mock = MockProvider::start().await;
        let hosts = [Host::Native, ENVOY];
        let gateways = fleet(
            &hosts,
            &redis,
            &mock,
            "timeout_ms: 100, on_failure: local, replicas: 2",
            "{ requests_per_minute: 6 }",
        )
        .await
        .gateways;
        redis.stop();
        for (g, host) in gateways.iter().zip(hosts) {
            let mut served = 0;
            for _ in 0..7 {
                match chat(g, false).await {
                    (200, _) => served += 1,
                    (429, _) => {}
                    (status, body) => panic!("{status}: {body}"),
                }
            }
            // The native host's first request finds Redis down midway and is admitted on
            // the whole limit; Envoy decides it again on its share. From then on each
            // replica admits its share, 3.
            let first = u32::from(host == Host::Native);
            assert_eq!(
                served,
                3 + first,
                "{host:?}: each replica's share of 6 over 2 replicas"
            );
        }
    }
}
