//! `GET /v1/usage`, in both hosts: the calling consumer's own limits and allowances, each with
//! its limit, what remains, when it resets and, for allowances, what the period used — and
//! never another consumer's.

use serde_json::{json, Value};
use tollgate_e2e::both_hosts;
use tollgate_e2e::gateway::Host;
use tollgate_e2e::mock_provider::{MockProvider, MockUsage};
use tollgate_e2e::scenario::{away_from_utc_midnight, sha256_hex, unix_ms, user, Stack};

const APP_KEY: &str = "tg-usage-app-key";
const OTHER_KEY: &str = "tg-usage-other-key";
const KEY: &str = "sk-usage-provider";
const USED: MockUsage = MockUsage {
    prompt_tokens: 400,
    completion_tokens: 600,
};

fn config(mock: &MockProvider) -> String {
    format!(
        r#"
consumers:
  - name: app
    keys: [{{ sha256: {app} }}]
    models: [gpt-4o-mini]
    limits: {{ requests_per_day: 1000, daily_tokens: 100000, monthly_cost_usd: 50, concurrency: 3 }}
    model_limits:
      gpt-4o-mini: {{ tokens_per_day: 20000 }}
  - name: other
    keys: [{{ sha256: {other} }}]
    models: [gpt-4o-mini]
    limits: {{ daily_tokens: 777 }}
providers:
  - name: upstream
    kind: openai
    base_url: {base}
    keys: [{{ id: only, secret_env: TG_USAGE_KEY }}]
models:
  - name: gpt-4o-mini
    provider: upstream
    pricing: {{ input_per_million: 1.0, output_per_million: 2.0 }}
    limits: {{ tokens_per_minute: 1000000 }}
"#,
        app = sha256_hex(APP_KEY),
        other = sha256_hex(OTHER_KEY),
        base = mock.base_url(),
    )
}

async fn usage(f: &Stack, key: &str) -> (u16, Value) {
    let r = f
        .http
        .get(f.url("/v1/usage"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

fn entry<'v>(usage: &'v Value, name: &str) -> &'v Value {
    usage["limits"]
        .as_array()
        .and_then(|l| l.iter().find(|e| e["name"] == name))
        .unwrap_or_else(|| panic!("no `{name}` in {usage}"))
}

/// Before and after one request whose usage the provider reports: each allowance shows what
/// it used and what remains, exactly; rates, concurrency and the consumer's limit on one
/// model appear with their own figures; the day's allowances reset at the next 00:00 UTC.
async fn usage_shows_the_consumers_limits_and_what_it_spent(host: Host) {
    away_from_utc_midnight().await;
    let f = Stack::start(host, config, vec![("TG_USAGE_KEY", KEY)]).await;
    f.mock.set_reply("spent", USED);
    let (status, before) = usage(&f, APP_KEY).await;
    assert_eq!(status, 200, "{before}");
    assert_eq!(before["consumer"], "app");
    let daily = entry(&before, "daily_tokens");
    assert_eq!(
        (
            daily["limit"].as_u64(),
            daily["used"].as_u64(),
            daily["remaining"].as_u64()
        ),
        (Some(100_000), Some(0), Some(100_000)),
        "{daily}"
    );
    assert_eq!(daily["period"], "day");
    let next_midnight = (unix_ms() / 86_400_000 + 1) * 86_400;
    assert_eq!(daily["resets_at"].as_u64(), Some(next_midnight), "{daily}");

    let r = f
        .http
        .post(f.url("/v1/chat/completions"))
        .bearer_auth(APP_KEY)
        .json(&json!({ "model": "gpt-4o-mini", "max_tokens": 1000, "messages": user("hi") }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.text().await;

    let (_, after) = usage(&f, APP_KEY).await;
    let daily = entry(&after, "daily_tokens");
    assert_eq!(daily["used"].as_u64(), Some(USED.total_tokens()), "{daily}");
    assert_eq!(
        daily["remaining"].as_u64(),
        Some(100_000 - USED.total_tokens())
    );
    let cost = entry(&after, "monthly_cost_usd");
    // 400 input tokens at $1/M and 600 output at $2/M.
    let spent = cost["used"].as_f64().unwrap();
    assert!((spent - 0.0016).abs() < 1e-9, "{cost}");
    assert_eq!(cost["unit"], "usd");
    assert_eq!(cost["period"], "month");
    let requests = entry(&after, "requests_per_day");
    assert_eq!(requests["remaining"].as_u64(), Some(999), "{requests}");
    let slots = entry(&after, "concurrency");
    assert_eq!(
        (slots["in_flight"].as_u64(), slots["remaining"].as_u64()),
        (Some(0), Some(3)),
        "{slots}"
    );
    let on_model = entry(&after, "tokens_per_day");
    assert_eq!(on_model["model"], "gpt-4o-mini");
    assert_eq!(
        on_model["remaining"].as_u64(),
        Some(20_000 - USED.total_tokens()),
        "{on_model}"
    );
    // The model's own limit is every consumer's, not this one's.
    assert!(
        after["limits"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["name"] != "tokens_per_minute"),
        "{after}"
    );
}

/// Each consumer sees its own limits only; no key, no usage.
async fn usage_never_shows_another_consumer(host: Host) {
    let f = Stack::start(host, config, vec![("TG_USAGE_KEY", KEY)]).await;
    let (status, other) = usage(&f, OTHER_KEY).await;
    assert_eq!(status, 200);
    assert_eq!(other["consumer"], "other");
    let limits = other["limits"].as_array().unwrap();
    assert_eq!(limits.len(), 1, "{other}");
    assert_eq!(limits[0]["limit"].as_u64(), Some(777));
    let text = other.to_string();
    assert!(!text.contains("app") && !text.contains("100000"), "{text}");
    let (status, error) = usage(&f, "tg-nobody").await;
    assert_eq!(status, 401, "{error}");
    let r = f.http.get(f.url("/v1/usage")).send().await.unwrap();
    assert_eq!(r.status(), 401);
}

both_hosts!(
    usage_shows_the_consumers_limits_and_what_it_spent,
    usage_never_shows_another_consumer,
);
