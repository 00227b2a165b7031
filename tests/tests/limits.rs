//! Token-aware limits end to end, in both hosts (Envoy with two workers sharing counters):
//! reserve before the call, settle on the provider's usage, streaming included.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_e2e::both_hosts;
use tollgate_e2e::gateway::{Gateway, Host};
use tollgate_e2e::mock_provider::{Fault, MockProvider, MockUsage};
use tollgate_e2e::scenario::{assert_error, sha256_hex, sse_data, user, Stack};

const APP_KEY: &str = "tg-limits-app-key";
const KEY_A: &str = "sk-limits-provider-a";
const KEY_B: &str = "sk-limits-provider-b";

struct Fixture(Stack);

impl std::ops::Deref for Fixture {
    type Target = Stack;
    fn deref(&self) -> &Stack {
        &self.0
    }
}

/// Starts a gateway whose consumer `app` has `limits` on model `gpt-4o-mini` (priced at
/// $1 per million tokens in and out).
async fn start(host: Host, limits: &str) -> Fixture {
    let config = |mock: &MockProvider| config(mock, limits, "");
    Fixture(Stack::start(host, config, vec![("TG_LIMITS_KEY_A", KEY_A)]).await)
}

fn config(mock: &MockProvider, limits: &str, more_consumers: &str) -> String {
    config_with_keys(
        mock,
        limits,
        more_consumers,
        "[{ id: key-a, secret_env: TG_LIMITS_KEY_A }]",
    )
}

fn config_with_keys(mock: &MockProvider, limits: &str, more_consumers: &str, keys: &str) -> String {
    format!(
        r#"
consumers:
  - name: app
    keys: [{{ sha256: {app} }}]
    models: [gpt-4o-mini]
    limits: {limits}
providers:
  - name: upstream
    kind: openai
    base_url: {base}
    keys: {keys}
models:
  - name: gpt-4o-mini
    provider: upstream
    pricing: {{ input_per_million: 1.0, output_per_million: 1.0 }}
"#,
        app = sha256_hex(APP_KEY),
        base = mock.base_url(),
        keys = keys,
    )
    .replace("providers:", &format!("{more_consumers}providers:"))
}

impl Fixture {
    async fn send(&self, body: Value) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/chat/completions", self.gateway.base_url()))
            .bearer_auth(APP_KEY)
            .json(&body)
            .send()
            .await
            .unwrap()
    }
}

fn header(r: &reqwest::Response, name: &str) -> Option<u64> {
    r.headers().get(name)?.to_str().ok()?.parse().ok()
}

fn chat(max_tokens: u64) -> Value {
    json!({ "model": "gpt-4o-mini", "max_tokens": max_tokens, "messages": user("hi") })
}

/// 50 clients at once against a TPM limit: what is admitted, counted at the provider's
/// reported usage, stays within the limit plus one reservation (plus what refilled while
/// the test ran).
async fn concurrent_clients_stay_within_the_token_limit(host: Host) {
    const LIMIT: u64 = 1_000;
    const USAGE: u64 = 100;
    let f = start(host, &format!("{{ tokens_per_minute: {LIMIT} }}")).await;
    f.mock.set_reply(
        "ok",
        MockUsage {
            prompt_tokens: 40,
            completion_tokens: USAGE - 40,
        },
    );
    let started = Instant::now();
    let f = Arc::new(f);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let f = Arc::clone(&f);
            tokio::spawn(async move { f.send(chat(80)).await.status().as_u16() })
        })
        .collect();
    let mut admitted = 0;
    let mut limited = 0;
    for t in tasks {
        match t.await.unwrap() {
            200 => admitted += 1,
            429 => limited += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let refill = LIMIT * elapsed_ms / 60_000 + 1;
    let reservation = 100; // 80 max_tokens + the prompt estimate, rounded up
    assert_eq!(admitted + limited, 50);
    assert_eq!(
        f.mock.requests().len() as u64,
        admitted,
        "every admitted request went upstream"
    );
    assert!(
        admitted * USAGE <= LIMIT + reservation + refill,
        "{admitted} requests of {USAGE} tokens admitted against {LIMIT}/min"
    );
    assert!(admitted >= 8, "the limiter admitted too few: {admitted}");
    assert!(limited > 0);
}

/// A stream is charged the usage the provider reports at its end, which the gateway asks
/// for and hides from a client that did not.
async fn streams_are_charged_their_real_usage(host: Host) {
    const LIMIT: u64 = 100_000;
    let f = start(host, &format!("{{ tokens_per_minute: {LIMIT} }}")).await;
    f.mock.set_reply(
        "one two three",
        MockUsage {
            prompt_tokens: 1_000,
            completion_tokens: 2_000,
        },
    );
    let r = f.send(json!({ "model": "gpt-4o-mini", "stream": true, "max_tokens": 10, "messages": user("hi") })).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let events = sse_data(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(
        !text.contains("\"usage\":{"),
        "usage chunk not asked for, yet delivered: {text}"
    );
    let upstream = f.mock.requests()[0].json();
    assert_eq!(upstream["stream_options"]["include_usage"], true);
    // The next request sees the stream's 3,000 tokens gone, not just the ~20 reserved (the
    // bucket refills ~1.7 tokens a millisecond meanwhile).
    let r = f.send(chat(10)).await;
    let remaining = header(&r, "x-ratelimit-remaining-tokens").unwrap();
    assert!(
        (LIMIT - 3_100..=LIMIT - 2_500).contains(&remaining),
        "remaining {remaining}"
    );
}

/// A client that goes away mid-stream frees its concurrency slot, and is charged what was
/// streamed (an estimate), not its whole reservation.
async fn a_client_that_disconnects_frees_its_slot_and_is_charged_what_was_streamed(host: Host) {
    let f = start(host, "{ concurrency: 1, tokens_per_minute: 100000 }").await;
    let release = Arc::new(tokio::sync::Notify::new());
    f.mock.set_fault(
        KEY_A,
        Fault::HoldStream {
            release: Arc::clone(&release),
        },
    );
    let mut r = f
        .send(json!({ "model": "gpt-4o-mini", "stream": true, "max_tokens": 5000, "messages": user("hi") }))
        .await;
    assert_eq!(r.status(), 200);
    r.chunk().await.unwrap().unwrap();
    // The slot is taken while the stream is open.
    f.mock.clear_fault(KEY_A);
    let busy = f.send(chat(10)).await;
    assert_error(
        busy.status().as_u16(),
        &busy.json().await.unwrap(),
        429,
        "rate_limit_exceeded",
    );
    drop(r);
    // Let the provider go on, so that a host that only notices a gone client when it
    // writes does notice.
    release.notify_one();
    let deadline = Instant::now() + Duration::from_secs(15);
    let admitted = loop {
        let r = f.send(chat(10)).await;
        if r.status() == 200 {
            break r;
        }
        assert!(Instant::now() < deadline, "the slot was never freed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let remaining = header(&admitted, "x-ratelimit-remaining-tokens").unwrap();
    let charged = 100_000 - remaining;
    assert!(
        charged < 1_000,
        "charged {charged}: the 5000-token reservation was not refunded"
    );
    assert!(
        charged > 10,
        "the streamed text was not charged ({charged})"
    );
}

/// A client that gives up while the provider is still thinking frees its slot too.
async fn a_client_that_leaves_before_the_answer_frees_its_slot(host: Host) {
    let f = start(host, "{ concurrency: 1 }").await;
    f.mock.set_fault(KEY_A, Fault::Slow { delay_ms: 1_500 });
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let gave_up = impatient
        .post(format!("{}/v1/chat/completions", f.gateway.base_url()))
        .bearer_auth(APP_KEY)
        .json(&chat(10))
        .send()
        .await;
    assert!(gave_up.is_err(), "the client should have timed out");
    f.mock.clear_fault(KEY_A);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if f.send(chat(10)).await.status() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slot of the client that left was never freed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A 429 says when to come back, from the bucket's state; a request sent after that delay
/// is admitted.
async fn the_429_retry_after_is_honest(host: Host) {
    let f = start(host, "{ requests_per_second: 2 }").await;
    let mut retry_after_ms = None;
    for _ in 0..10 {
        let r = f.send(chat(10)).await;
        if r.status() == 429 {
            let ms = header(&r, "retry-after-ms").unwrap();
            let secs = header(&r, "retry-after").unwrap();
            assert_eq!(secs, ms.div_ceil(1_000));
            assert!(ms > 0 && ms <= 500, "{ms}");
            let v: Value = r.json().await.unwrap();
            assert!(
                v["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("requests_per_second"),
                "{v}"
            );
            retry_after_ms = Some(ms);
            break;
        }
    }
    let wait = retry_after_ms.expect("2 requests a second were never exceeded");
    tokio::time::sleep(Duration::from_millis(wait)).await;
    assert_eq!(f.send(chat(10)).await.status(), 200);
}

/// Every response says how much is left, and it goes down.
async fn headers_show_the_remaining_budget_decreasing(host: Host) {
    let f = start(
        host,
        "{ tokens_per_minute: 100000, requests_per_minute: 1000 }",
    )
    .await;
    // Large enough that what refills between two requests (~1.7 tokens a millisecond) does
    // not hide it.
    f.mock.set_reply(
        "ok",
        MockUsage {
            prompt_tokens: 500,
            completion_tokens: 500,
        },
    );
    let mut last = (u64::MAX, u64::MAX);
    for _ in 0..3 {
        let r = f.send(chat(100)).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-ratelimit-limit-tokens"), Some(100_000));
        assert_eq!(header(&r, "x-ratelimit-limit-requests"), Some(1_000));
        assert!(r.headers().contains_key("x-ratelimit-reset-tokens"));
        let now = (
            header(&r, "x-ratelimit-remaining-tokens").unwrap(),
            header(&r, "x-ratelimit-remaining-requests").unwrap(),
        );
        assert!(now.0 < last.0 && now.1 < last.1, "{now:?} after {last:?}");
        last = now;
    }
}

/// A daily cost budget runs out at the request that would overspend it, with a 429 whose
/// retry time is the next UTC midnight.
async fn a_daily_cost_budget_runs_out_at_the_right_request(host: Host) {
    // $1 per million tokens: 2,000 tokens a request cost $0.002; $0.01 pays for five.
    let f = start(host, "{ daily_cost_usd: 0.01 }").await;
    f.mock.set_reply(
        "ok",
        MockUsage {
            prompt_tokens: 1_000,
            completion_tokens: 1_000,
        },
    );
    for i in 0..5 {
        let r = f.send(chat(10)).await;
        assert_eq!(r.status(), 200, "request {i}");
    }
    let r = f.send(chat(10)).await;
    let retry_ms = header(&r, "retry-after-ms").unwrap();
    assert_error(
        r.status().as_u16(),
        &r.json().await.unwrap(),
        429,
        "quota_exhausted",
    );
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let to_midnight = 86_400_000 - now_ms % 86_400_000;
    assert!(
        retry_ms.abs_diff(to_midnight) < 10_000,
        "{retry_ms} vs {to_midnight}"
    );
    assert_eq!(f.mock.requests().len(), 5);
}

async fn start_with_keys(host: Host, keys: &str) -> Fixture {
    let config = |mock: &MockProvider| config_with_keys(mock, "{}", "", keys);
    let env = vec![("TG_LIMITS_KEY_A", KEY_A), ("TG_LIMITS_KEY_B", KEY_B)];
    Fixture(Stack::start(host, config, env).await)
}

/// A key is never sent more than its own limit: its turn goes to a key with room.
async fn a_key_at_its_own_limit_is_skipped(host: Host) {
    let f = start_with_keys(
        host,
        "[{ id: key-a, secret_env: TG_LIMITS_KEY_A, limits: { requests_per_minute: 2 } }, { id: key-b, secret_env: TG_LIMITS_KEY_B }]",
    )
    .await;
    for _ in 0..6 {
        assert_eq!(f.send(chat(10)).await.status(), 200);
    }
    let used = |key: &str| {
        f.mock
            .requests()
            .iter()
            .filter(|r| r.key.as_deref() == Some(key))
            .count()
    };
    assert_eq!((used(KEY_A), used(KEY_B)), (2, 4));
}

/// A failed attempt gives the tokens it reserved on its key back (the provider used none):
/// after two failures on key A (each retried on B), A still has room for a request that
/// would not fit if those reservations had stayed.
async fn a_failed_attempt_gives_its_key_reservation_back(host: Host) {
    let f = start_with_keys(
        host,
        "[{ id: key-a, secret_env: TG_LIMITS_KEY_A, limits: { tokens_per_minute: 1000 } }, \
          { id: key-b, secret_env: TG_LIMITS_KEY_B }]\n    strategy: priority",
    )
    .await;
    f.mock.set_fault(KEY_A, Fault::ServerError { status: 500 });
    for i in 0..2 {
        assert_eq!(f.send(chat(600)).await.status(), 200, "request {i}");
    }
    f.mock.clear_fault(KEY_A);
    assert_eq!(f.send(chat(600)).await.status(), 200);
    let keys: Vec<String> = f
        .mock
        .requests()
        .into_iter()
        .filter_map(|r| r.key)
        .collect();
    assert_eq!(keys, [KEY_A, KEY_B, KEY_A, KEY_B, KEY_A], "{keys:?}");
}

/// A key's token limit is settled on the provider's reported usage (in Envoy the key role
/// hands its reservation to the gateway role, which sees the usage); when every key is full,
/// the client gets 429 naming the provider's pool, and no call goes out.
async fn key_token_limits_settle_on_usage_and_a_full_pool_is_429(host: Host) {
    let f = start_with_keys(
        host,
        "[{ id: key-a, secret_env: TG_LIMITS_KEY_A, limits: { tokens_per_minute: 250 } }]",
    )
    .await;
    f.mock.set_reply(
        "ok",
        MockUsage {
            prompt_tokens: 50,
            completion_tokens: 50,
        },
    );
    // Each request reserves ~20 tokens and is charged 100: three fit in 250 (the third
    // goes into debt), the fourth does not. Charged only its reservations, the key would
    // take a dozen.
    for i in 0..3 {
        assert_eq!(f.send(chat(10)).await.status(), 200, "request {i}");
    }
    let r = f.send(chat(10)).await;
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    assert_error(status, &v, 429, "rate_limit_exceeded");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("every key of provider `upstream`"),
        "{v}"
    );
    assert_eq!(f.mock.requests().len(), 3);
}

/// A reload (SIGHUP to the native host; new xDS files for Envoy) keeps the counters of
/// limits that did not change, starts a changed limit afresh, and refuses an invalid file
/// with the running config kept.
async fn reload_keeps_the_counters_of_unchanged_limits(host: Host) {
    let f = match host {
        Host::Native => start(host, "{ requests_per_minute: 2 }").await,
        Host::Envoy { workers } => {
            let mock = MockProvider::start().await;
            let config = config(&mock, "{ requests_per_minute: 2 }", "");
            let gateway = tokio::task::spawn_blocking(move || {
                Gateway::start_envoy_with_xds(&config, &[("TG_LIMITS_KEY_A", KEY_A)], workers)
            })
            .await
            .unwrap();
            // No pooled connections: after a reload, new connections meet the new config.
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .pool_max_idle_per_host(0)
                .build()
                .unwrap();
            Fixture(Stack {
                mock,
                gateway,
                http,
            })
        }
    };
    for _ in 0..2 {
        assert_eq!(f.send(chat(10)).await.status(), 200);
    }
    assert_eq!(f.send(chat(10)).await.status(), 429);
    let other = format!(
        "  - {{ name: other, keys: [{{ sha256: {} }}], models: [\"*\"] }}\n",
        sha256_hex("tg-other")
    );
    let unchanged = config(&f.mock, "{ requests_per_minute: 2 }", &other);
    let gw = &f.gateway;
    assert!(tokio::task::block_in_place(|| gw.reload(&unchanged)));
    assert_eq!(
        f.send(chat(10)).await.status(),
        429,
        "an unchanged limit lost its counter"
    );
    assert!(!tokio::task::block_in_place(|| gw.reload("consumers: [")));
    assert_eq!(
        f.send(chat(10)).await.status(),
        429,
        "the running config was dropped"
    );
    let raised = config(&f.mock, "{ requests_per_minute: 5 }", &other);
    assert!(tokio::task::block_in_place(|| gw.reload(&raised)));
    assert_eq!(
        f.send(chat(10)).await.status(),
        200,
        "a changed limit kept the old counter"
    );
}

mod native_only {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reload_keeps_the_counters_of_unchanged_limits() {
        super::reload_keeps_the_counters_of_unchanged_limits(tollgate_e2e::gateway::Host::Native)
            .await;
    }
}

both_hosts!(
    concurrent_clients_stay_within_the_token_limit,
    streams_are_charged_their_real_usage,
    a_client_that_disconnects_frees_its_slot_and_is_charged_what_was_streamed,
    a_client_that_leaves_before_the_answer_frees_its_slot,
    a_key_at_its_own_limit_is_skipped,
    a_failed_attempt_gives_its_key_reservation_back,
    key_token_limits_settle_on_usage_and_a_full_pool_is_429,
    reload_keeps_the_counters_of_unchanged_limits,
    the_429_retry_after_is_honest,
    headers_show_the_remaining_budget_decreasing,
    a_daily_cost_budget_runs_out_at_the_right_request,
);
