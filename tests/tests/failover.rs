//! Failover across providers and models (`models[].fallbacks`): a request for `smart`
//! (OpenAI) that its own pool cannot serve is served by `claude-sonnet` (Anthropic),
//! translated both ways, transparently to the client, before any byte reached it.
//!
//! Both hosts; Envoy with 2 workers, its router's retries moved to the fallback's cluster
//! (docs/envoy.md, "Failover").

use serde_json::{json, Value};
use tollgate_e2e::both_hosts;
use tollgate_e2e::gateway::Host;
use tollgate_e2e::mock_provider::{Fault, MockProvider};
use tollgate_e2e::scenario::{fresh_client, sha256_hex, sse_data, stream_text, user, Stack};

const APP_KEY: &str = "tg-failover-app-key";
const NARROW_KEY: &str = "tg-failover-narrow-key";
const OPENAI_KEY: &str = "sk-failover-openai";
const CLAUDE_KEY: &str = "sk-ant-failover-claude";
const POOL_KEYS: [&str; 2] = ["sk-failover-pool-1", "sk-failover-pool-2"];
const CLAUDE_POOL_KEYS: [&str; 2] = ["sk-ant-failover-pool-1", "sk-ant-failover-pool-2"];
/// `smart`'s own daily token allowance: its reservations show in `x-ratelimit-*`.
const SMART_DAILY: u64 = 1_000_000;

fn config(mock: &MockProvider) -> String {
    format!(
        r#"
consumers:
  - name: app
    keys: [{{ sha256: {app} }}]
    models: ["*"]
  - name: narrow
    keys: [{{ sha256: {narrow} }}]
    models: [smart]
providers:
  - name: openai
    kind: openai
    base_url: {base}
    retry: {{ attempts: 3, backoff_ms: 10, max_backoff_ms: 20 }}
    keys: [{{ id: primary, secret_env: TG_FO_OPENAI }}]
  - name: anthropic
    kind: anthropic
    base_url: {base}
    keys: [{{ id: claude, secret_env: TG_FO_CLAUDE }}]
  - name: pooled
    kind: openai
    base_url: {base}
    strategy: priority
    keys: [{{ id: p1, secret_env: TG_FO_P1 }}, {{ id: p2, secret_env: TG_FO_P2 }}]
  - name: anthropic-pool
    kind: anthropic
    base_url: {base}
    strategy: priority
    keys: [{{ id: cp1, secret_env: TG_FO_CP1 }}, {{ id: cp2, secret_env: TG_FO_CP2 }}]
models:
  - {{ name: solo, provider: pooled }}
  - {{ name: smart2, provider: openai, fallbacks: [claude-pool] }}
  - {{ name: claude-pool, provider: anthropic-pool, upstream_model: claude-pool-up }}
  - name: smart
    provider: openai
    upstream_model: gpt-4o
    fallbacks: [claude-sonnet]
    limits: {{ daily_tokens: {SMART_DAILY} }}
  - name: claude-sonnet
    provider: anthropic
    upstream_model: claude-sonnet-4-5
    limits: {{ requests_per_day: 1000 }}
    pricing: {{ input_per_million: 3.0, output_per_million: 15.0 }}
"#,
        app = sha256_hex(APP_KEY),
        narrow = sha256_hex(NARROW_KEY),
        base = mock.base_url(),
    )
}

async fn start(host: Host) -> Stack {
    Stack::start(
        host,
        config,
        vec![
            ("TG_FO_OPENAI", OPENAI_KEY),
            ("TG_FO_CLAUDE", CLAUDE_KEY),
            ("TG_FO_P1", POOL_KEYS[0]),
            ("TG_FO_P2", POOL_KEYS[1]),
            ("TG_FO_CP1", CLAUDE_POOL_KEYS[0]),
            ("TG_FO_CP2", CLAUDE_POOL_KEYS[1]),
        ],
    )
    .await
}

async fn post_as(f: &Stack, key: &str, body: Value) -> reqwest::Response {
    f.http
        .post(f.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .expect("an answer")
}

fn chat() -> Value {
    json!({ "model": "smart", "max_tokens": 50, "messages": user("hello") })
}

fn served_by(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-tollgate-model")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string()
}

/// (path, key) of each request the mock received, in order.
fn calls(mock: &MockProvider) -> Vec<(String, String)> {
    mock.requests()
        .into_iter()
        .map(|r| (r.path, r.key.unwrap_or_default()))
        .collect()
}

fn to_openai() -> (String, String) {
    ("/v1/chat/completions".into(), OPENAI_KEY.into())
}

fn to_claude() -> (String, String) {
    ("/v1/messages".into(), CLAUDE_KEY.into())
}

/// The primary's only key answers 429: the request is served by the Anthropic fallback, in
/// OpenAI's shape, saying who answered. The key now cools: the next request goes straight
/// to the fallback, without calling the primary.
async fn a_rate_limited_primary_is_served_by_its_fallback(host: Host) {
    let f = start(host).await;
    f.mock.set_fault(
        OPENAI_KEY,
        Fault::TooManyRequests {
            retry_after_secs: Some(60),
        },
    );
    let r = post_as(&f, APP_KEY, chat()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(served_by(&r), "claude-sonnet");
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["object"], "chat.completion", "{answer}");
    assert!(
        answer["choices"][0]["message"]["content"].is_string(),
        "{answer}"
    );
    assert_eq!(calls(&f.mock), [to_openai(), to_claude()]);
    // The Anthropic request is Anthropic's: its model, its key alone — the OpenAI key of
    // the first attempt never goes to another provider.
    let sent = f.mock.requests().pop().unwrap();
    assert_eq!(sent.json()["model"], "claude-sonnet-4-5");
    assert_eq!(sent.header("authorization"), None, "{:?}", sent.headers);
    assert_eq!(sent.header("x-api-key"), Some(CLAUDE_KEY));
    assert!(
        !String::from_utf8_lossy(&sent.body).contains(OPENAI_KEY),
        "the OpenAI key reached Anthropic"
    );

    // Every worker knows the primary's key cools: on fresh connections, spread over Envoy's
    // workers, none calls it.
    let fresh = fresh_client();
    let mut served = 1;
    for _ in 0..40 {
        served += 1;
        f.mock.clear_requests();
        let r = fresh
            .post(f.url("/v1/chat/completions"))
            .bearer_auth(APP_KEY)
            .json(&chat())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(served_by(&r), "claude-sonnet");
        assert_eq!(
            calls(&f.mock),
            [to_claude()],
            "the cooling primary was called"
        );
        if f.gateway
            .envoy_worker_connections()
            .is_none_or(|counts| counts.iter().all(|&n| n > 1))
        {
            break;
        }
    }
    f.assert_every_worker_served();
    // The metrics carry both models: the one asked for and the one that served.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let failovers = loop {
        let n = f.gateway.metric(
            "tollgate_failovers_total",
            &[
                ("consumer", "app"),
                ("requested_model", "smart"),
                ("model", "claude-sonnet"),
            ],
        );
        if n == Some(served as f64) || std::time::Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(failovers, Some(served as f64));
    let answered = f.gateway.metric(
        "tollgate_requests_total",
        &[
            ("model", "claude-sonnet"),
            ("provider", "anthropic"),
            ("code", "2xx"),
        ],
    );
    assert_eq!(answered, Some(served as f64));
}

/// A primary that is overloaded (503) or failing (500) fails over; a request the provider
/// refuses as invalid (400) does not: another provider would refuse it too.
async fn server_errors_fail_over_and_invalid_requests_do_not(host: Host) {
    let f = start(host).await;
    for fault in [Fault::Overloaded, Fault::ServerError { status: 500 }] {
        f.mock.clear_requests();
        f.mock.set_fault(OPENAI_KEY, fault);
        let r = post_as(&f, APP_KEY, chat()).await;
        assert_eq!(r.status(), 200);
        assert_eq!(served_by(&r), "claude-sonnet");
        assert_eq!(calls(&f.mock), [to_openai(), to_claude()]);
    }
    f.mock.clear_requests();
    f.mock
        .set_fault(OPENAI_KEY, Fault::HtmlError { status: 400 });
    let r = post_as(&f, APP_KEY, chat()).await;
    assert_eq!(r.status(), 400);
    assert_eq!(served_by(&r), "smart");
    assert_eq!(calls(&f.mock), [to_openai()], "a 400 failed over");
}

/// A stream fails over before its first byte (the client gets Claude's answer as OpenAI
/// chunks) and never after it: a primary that cuts its stream midway leaves the client with
/// the cut stream, and the fallback is not called.
async fn a_stream_fails_over_before_its_first_byte_and_never_after(host: Host) {
    let f = start(host).await;
    let mut stream = chat();
    stream["stream"] = json!(true);
    f.mock.set_fault(
        OPENAI_KEY,
        Fault::TooManyRequests {
            retry_after_secs: Some(1),
        },
    );
    let r = post_as(&f, APP_KEY, stream.clone()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(served_by(&r), "claude-sonnet");
    let text = r.text().await.unwrap();
    assert!(text.contains("chat.completion.chunk"), "{text}");
    assert!(!stream_text(&sse_data(&text)).is_empty(), "{text}");
    assert_eq!(calls(&f.mock), [to_openai(), to_claude()]);

    // Past the primary's cooldown, it streams two events and breaks.
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
    f.mock.clear_requests();
    f.mock
        .set_fault(OPENAI_KEY, Fault::CutStreamAfter { chunks: 2 });
    let mut r = post_as(&f, APP_KEY, stream).await;
    assert_eq!(r.status(), 200);
    assert_eq!(served_by(&r), "smart");
    while let Ok(Some(_)) = r.chunk().await {}
    assert_eq!(
        calls(&f.mock),
        [to_openai()],
        "failed over after the first byte"
    );
}

/// Limits and cost go to the model that served: the primary's model limits get back what it
/// reserved (a later request sees the same allowance left), the fallback's are charged, and
/// the access log names both models and the fallback's price.
async fn limits_and_cost_are_charged_to_the_serving_model(host: Host) {
    let f = start(host).await;
    f.mock
        .set_fault(OPENAI_KEY, Fault::ServerError { status: 500 });
    let remaining = |r: &reqwest::Response| -> u64 {
        r.headers()
            .get("x-ratelimit-remaining-tokens")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .expect("x-ratelimit-remaining-tokens")
    };
    let failed_over = post_as(&f, APP_KEY, chat()).await;
    assert_eq!(served_by(&failed_over), "claude-sonnet");
    let reserved = SMART_DAILY - remaining(&failed_over);
    assert!(reserved > 0);
    let _ = failed_over.text().await;
    f.mock.clear_fault(OPENAI_KEY);
    let served = post_as(&f, APP_KEY, chat()).await;
    assert_eq!(served_by(&served), "smart");
    assert_eq!(
        remaining(&served),
        SMART_DAILY - reserved,
        "the failed-over request kept tokens of smart's allowance"
    );
    let _ = served.text().await;
    // The fallback's own limits counted the request it served: a request straight to it is
    // its second of the day.
    let direct = post_as(
        &f,
        APP_KEY,
        json!({ "model": "claude-sonnet", "max_tokens": 50, "messages": user("hello") }),
    )
    .await;
    assert_eq!(direct.status(), 200);
    let remaining_requests = direct
        .headers()
        .get("x-ratelimit-remaining-requests")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    assert_eq!(
        remaining_requests.as_deref(),
        Some("998"),
        "claude-sonnet's requests_per_day did not count the failed-over request"
    );
    let _ = direct.text().await;
    if host != Host::Native {
        // Envoy's access log is its own (docs/envoy.md); the tollgate line is debug-level.
        return;
    }
    let logs = f.gateway.logs();
    let line = logs
        .lines()
        .find(|l| {
            l.contains(r#" model="claude-sonnet""#) && l.contains(r#"requested_model="smart""#)
        })
        .unwrap_or_else(|| panic!("no access log line of the failover: {logs}"));
    let cost: u64 = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("cost_micro_usd="))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(cost > 0, "the fallback's price was not charged: {line}");
}

/// A consumer who may not use the fallback gets the primary's own error, and the fallback is
/// never called.
async fn a_fallback_the_consumer_may_not_use_is_skipped(host: Host) {
    let f = start(host).await;
    f.mock
        .set_fault(OPENAI_KEY, Fault::ServerError { status: 500 });
    let r = post_as(&f, NARROW_KEY, chat()).await;
    assert_eq!(r.status(), 500);
    assert_eq!(served_by(&r), "smart");
    // Its only key tried again while attempts last, as without a chain.
    let calls = calls(&f.mock);
    assert!(calls.iter().all(|c| *c == to_openai()), "{calls:?}");
}

/// The chain spent: the last model's error. When every model's keys are cooling, 429 with
/// the soonest retry, and no call at all.
async fn a_spent_chain_answers_its_last_error(host: Host) {
    let f = start(host).await;
    for key in [OPENAI_KEY, CLAUDE_KEY] {
        f.mock.set_fault(
            key,
            Fault::TooManyRequests {
                retry_after_secs: Some(60),
            },
        );
    }
    let r = post_as(&f, APP_KEY, chat()).await;
    assert_eq!(r.status(), 429);
    assert_eq!(served_by(&r), "claude-sonnet");
    assert_eq!(calls(&f.mock), [to_openai(), to_claude()]);

    f.mock.clear_requests();
    let r = post_as(&f, APP_KEY, chat()).await;
    assert_eq!(r.status(), 429);
    let retry_after: u64 = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("retry-after");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let error: Value = r.json().await.unwrap();
    assert_eq!(error["error"]["code"], "provider_keys_cooling", "{error}");
    assert!(calls(&f.mock).is_empty(), "a cooling key was called");
}

/// With chains in the config, a model without one still retries on its pool's other key
/// (in Envoy its route picks the cluster per attempt: the retry must stay on this one).
async fn a_model_without_a_chain_still_retries_on_its_other_key(host: Host) {
    let f = start(host).await;
    f.mock
        .set_fault(POOL_KEYS[0], Fault::ServerError { status: 500 });
    let r = post_as(
        &f,
        APP_KEY,
        json!({ "model": "solo", "max_tokens": 50, "messages": user("hello") }),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(served_by(&r), "solo");
    let chat = |k: &str| ("/v1/chat/completions".to_string(), k.to_string());
    assert_eq!(calls(&f.mock), [chat(POOL_KEYS[0]), chat(POOL_KEYS[1])]);
}

/// A fallback with two keys: its first refuses, its second serves — with the fallback's own
/// request (the router replays the first model's body on every retry), read as its answer.
async fn a_fallback_retries_on_its_own_pool(host: Host) {
    let f = start(host).await;
    for key in [OPENAI_KEY, CLAUDE_POOL_KEYS[0]] {
        f.mock.set_fault(
            key,
            Fault::TooManyRequests {
                retry_after_secs: Some(60),
            },
        );
    }
    let r = post_as(
        &f,
        APP_KEY,
        json!({ "model": "smart2", "max_tokens": 50, "messages": user("hello") }),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(served_by(&r), "claude-pool");
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["object"], "chat.completion", "{answer}");
    let messages = |k: &str| ("/v1/messages".to_string(), k.to_string());
    assert_eq!(
        calls(&f.mock),
        [
            to_openai(),
            messages(CLAUDE_POOL_KEYS[0]),
            messages(CLAUDE_POOL_KEYS[1])
        ]
    );
    let last = f.mock.requests().pop().unwrap();
    assert_eq!(last.json()["model"], "claude-pool-up");
    assert_eq!(last.header("authorization"), None);
}

both_hosts!(
    a_model_without_a_chain_still_retries_on_its_other_key,
    a_fallback_retries_on_its_own_pool,
    a_rate_limited_primary_is_served_by_its_fallback,
    server_errors_fail_over_and_invalid_requests_do_not,
    a_stream_fails_over_before_its_first_byte_and_never_after,
    limits_and_cost_are_charged_to_the_serving_model,
    a_fallback_the_consumer_may_not_use_is_skipped,
    a_spent_chain_answers_its_last_error,
);
