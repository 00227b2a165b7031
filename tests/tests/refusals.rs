//! Provider refusals told apart, in both hosts: what the provider's answer means (its
//! status, its error body) decides what happens to the key — cooled for one model, out for
//! long, revoked, or left alone — and whether the request goes on to another key. No
//! scenario races a clock: cooldowns and exhaustions are long, and states are read, not
//! waited out.

use std::time::Duration;

use serde_json::{json, Value};
use tollgate_e2e::both_hosts;
use tollgate_e2e::gateway::Host;
use tollgate_e2e::mock_provider::{Fault, MockProvider};
use tollgate_e2e::scenario::{assert_error, fresh_client, sha256_hex, user, Stack};

const APP_KEY: &str = "tg-refusals-app-key";
const KEY_A: &str = "sk-test-refusals-aaaa";
const KEY_B: &str = "sk-test-refusals-bbbb";
const CLAUDE_A: &str = "sk-ant-refusals-aaaa";
const CLAUDE_B: &str = "sk-ant-refusals-bbbb";
const ADMIN_KEY: &str = "tg-refusals-admin-key";

/// Two models on one OpenAI provider with different upstream models, tried in order (key A
/// first: which key a request met says what the gateway thinks of A); a provider that
/// relays its first answer; an Anthropic provider.
fn config(mock: &MockProvider) -> String {
    format!(
        r#"
server:
  listen: 127.0.0.1:0
  upstream_timeout_ms: 5000
consumers:
  - name: app
    keys: [{{ sha256: {app} }}]
    models: [gpt-a, gpt-b, solo-gpt, claude]
providers:
  - name: upstream
    kind: openai
    base_url: {base}
    strategy: priority
    retry: {{ attempts: 3, backoff_ms: 10, max_backoff_ms: 20 }}
    keys:
      - {{ id: key-a, secret_env: TG_REFUSALS_KEY_A }}
      - {{ id: key-b, secret_env: TG_REFUSALS_KEY_B }}
  - name: single
    kind: openai
    base_url: {base}
    retry: {{ attempts: 1 }}
    keys: [{{ id: solo, secret_env: TG_REFUSALS_KEY_A }}]
  - name: claude
    kind: anthropic
    base_url: {base}
    strategy: priority
    retry: {{ attempts: 3, backoff_ms: 10, max_backoff_ms: 20 }}
    keys:
      - {{ id: claude-a, secret_env: TG_REFUSALS_CLAUDE_A }}
      - {{ id: claude-b, secret_env: TG_REFUSALS_CLAUDE_B }}
models:
  - {{ name: gpt-a, provider: upstream, upstream_model: gpt-4o }}
  - {{ name: gpt-b, provider: upstream, upstream_model: gpt-4o-mini }}
  - {{ name: solo-gpt, provider: single, upstream_model: gpt-4o }}
  - {{ name: claude, provider: claude, upstream_model: claude-sonnet-4-5, default_max_tokens: 256 }}
"#,
        app = sha256_hex(APP_KEY),
        base = mock.base_url(),
    )
}

struct Fixture(Stack);

impl std::ops::Deref for Fixture {
    type Target = Stack;
    fn deref(&self) -> &Stack {
        &self.0
    }
}

impl Fixture {
    async fn start(host: Host) -> Fixture {
        let env = vec![
            ("TG_REFUSALS_KEY_A", KEY_A),
            ("TG_REFUSALS_KEY_B", KEY_B),
            ("TG_REFUSALS_CLAUDE_A", CLAUDE_A),
            ("TG_REFUSALS_CLAUDE_B", CLAUDE_B),
            ("TOLLGATE_ADMIN_KEY", ADMIN_KEY),
        ];
        Fixture(Stack::start(host, config, env).await)
    }

    /// A chat request for `model` through `client`: status, `retry-after`, body.
    async fn ask_with(&self, client: &reqwest::Client, model: &str) -> (u16, Option<u64>, Value) {
        let r = client
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(APP_KEY)
            .json(&json!({ "model": model, "messages": user("hi") }))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let retry_after = r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let text = r.text().await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
        (status, retry_after, v)
    }

    async fn ask(&self, model: &str) -> (u16, Value) {
        let (status, _, v) = self.ask_with(&self.http, model).await;
        (status, v)
    }

    /// The provider keys the mock saw, in order.
    fn keys_used(&self) -> Vec<String> {
        self.mock
            .requests()
            .into_iter()
            .filter_map(|r| r.key)
            .collect()
    }

    /// Sends at least `n` requests for `model`, each on a connection of its own, until every
    /// Envoy worker has served at least one; each must succeed. The provider keys they
    /// reached, in order.
    async fn keys_on_every_worker(&self, model: &str, n: usize) -> Vec<String> {
        let fresh = fresh_client();
        let before_keys = self.keys_used().len();
        let before = self.gateway.envoy_worker_connections();
        let every_worker_served = || match (&before, self.gateway.envoy_worker_connections()) {
            (Some(before), Some(now)) => now.iter().zip(before).all(|(now, then)| now > then),
            _ => true,
        };
        let mut sent = 0;
        while sent < n || !every_worker_served() {
            assert!(sent < 64, "not every Envoy worker served");
            let (status, _, v) = self.ask_with(&fresh, model).await;
            assert_eq!(status, 200, "{v}");
            sent += 1;
        }
        self.keys_used().split_off(before_keys)
    }

    /// A key's figures as an operator sees them: the native host's `GET /admin/keys` entry.
    async fn admin_key(&self, provider: &str, key: &str) -> Value {
        let r = self
            .http
            .get(self.url("/admin/keys"))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        let pool = v["providers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["provider"] == provider)
            .unwrap_or_else(|| panic!("no pool {provider}: {v}"));
        pool["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == key)
            .unwrap_or_else(|| panic!("no key {key}: {pool}"))
            .clone()
    }

    /// A key's figure in the gateway's metrics: `state` (`tollgate_key_state`), `until_ms`
    /// (from `tollgate_key_until_seconds`), `models.<upstream model>.until_ms` (from
    /// `tollgate_key_model_until_seconds`), or an attempt outcome's count
    /// (`tollgate_key_attempts_total`).
    fn stat(&self, provider: &str, key: &str, figure: &str) -> Option<u64> {
        let at = [("provider", provider), ("key", key)];
        let value = match figure {
            "state" => self.gateway.metric("tollgate_key_state", &at)?,
            "until_ms" => self.gateway.metric("tollgate_key_until_seconds", &at)? * 1_000.0,
            f => match f
                .strip_prefix("models.")
                .and_then(|m| m.strip_suffix(".until_ms"))
            {
                Some(model) => {
                    let at = [
                        ("provider", provider),
                        ("key", key),
                        ("upstream_model", model),
                    ];
                    self.gateway
                        .metric("tollgate_key_model_until_seconds", &at)?
                        * 1_000.0
                }
                None => {
                    let at = [("provider", provider), ("key", key), ("outcome", f)];
                    self.gateway.metric("tollgate_key_attempts_total", &at)?
                }
            },
        };
        Some(value as u64)
    }

    /// Asserts a key's state as an operator sees it: `state` in the admin view (native), the
    /// `state` gauge (Envoy, which publishes it every second: read until it shows), and, if
    /// given, the counter `counter` at `count`.
    async fn assert_key_state(
        &self,
        provider: &str,
        key: &str,
        state: &str,
        counter: Option<(&str, u64)>,
    ) -> Value {
        match self.gateway.host {
            Host::Native => {
                let k = self.admin_key(provider, key).await;
                assert_eq!(k["state"], state, "{k}");
                if let Some((name, count)) = counter {
                    assert_eq!(k["counters"][name], count, "{k}");
                }
                k
            }
            Host::Envoy { .. } => {
                let gauge = match state {
                    "healthy" => 0,
                    "cooling" => 1,
                    "revoked" => 2,
                    "exhausted" => 3,
                    other => panic!("no gauge for {other}"),
                };
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while self.stat(provider, key, "state") != Some(gauge)
                    && std::time::Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                assert_eq!(
                    self.stat(provider, key, "state"),
                    Some(gauge),
                    "{provider}/{key} is not {state}"
                );
                if let Some((name, count)) = counter {
                    assert_eq!(self.stat(provider, key, name).unwrap_or(0), count, "{name}");
                }
                json!({ "until_ms": self.stat(provider, key, "until_ms") })
            }
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

// ---- scenarios ------------------------------------------------------------------------------

/// OpenAI's limits are per model: a rate limit on model A's upstream model cools key A for
/// that model only. Every worker then sends model A to key B and model B still to key A.
async fn a_rate_limit_cools_the_key_for_that_model_only(host: Host) {
    let f = Fixture::start(host).await;
    f.mock.set_fault(
        KEY_A,
        Fault::TooManyRequests {
            retry_after_secs: Some(600),
        },
    );
    let (status, v) = f.ask("gpt-a").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(f.keys_used(), [KEY_A, KEY_B], "retried on B");
    // A would answer again; it is the gateway that keeps it from model A.
    f.mock.clear_fault(KEY_A);
    let b_model = f.keys_on_every_worker("gpt-b", 6).await;
    assert!(b_model.iter().all(|k| k == KEY_A), "{b_model:?}");
    let a_model = f.keys_on_every_worker("gpt-a", 6).await;
    assert!(a_model.iter().all(|k| k == KEY_B), "{a_model:?}");
    f.assert_every_worker_served();
    let k = f
        .assert_key_state("upstream", "key-a", "cooling", Some(("rate_limited", 1)))
        .await;
    match host {
        Host::Native => {
            let until = k["cooling_models"]["gpt-4o"].as_u64().unwrap();
            assert!(until > now_ms() + 500_000, "{k}");
            assert!(k["cooling_models"].get("gpt-4o-mini").is_none(), "{k}");
        }
        Host::Envoy { .. } => {
            let until = f
                .stat("upstream", "key-a", "models.gpt-4o.until_ms")
                .unwrap();
            assert!(until > now_ms() + 500_000, "{until}");
            assert_eq!(
                f.stat("upstream", "key-a", "models.gpt-4o-mini.until_ms"),
                Some(0)
            );
        }
    }
}

/// An account out of credit (`insufficient_quota`) takes its key out for long, in its own
/// state: the request that met it succeeds on key B, and every worker skips A afterwards,
/// for every model.
async fn an_exhausted_quota_takes_the_key_out_and_the_request_goes_on(host: Host) {
    let f = Fixture::start(host).await;
    f.mock.set_fault(KEY_A, Fault::QuotaExhausted);
    let (status, v) = f.ask("gpt-a").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(f.keys_used(), [KEY_A, KEY_B], "retried on B");
    f.mock.clear_fault(KEY_A);
    let k = f
        .assert_key_state("upstream", "key-a", "exhausted", Some(("exhausted", 1)))
        .await;
    // Out for `key_health.exhausted_ms` (an hour by default).
    let until = k["until_ms"].as_u64().unwrap();
    assert!(
        (now_ms() + 3_500_000..=now_ms() + 3_600_000).contains(&until),
        "{k}"
    );
    if host == Host::Native {
        assert_eq!(k["counters"]["rate_limited"], 0, "{k}");
    }
    for model in ["gpt-a", "gpt-b"] {
        let after = f.keys_on_every_worker(model, 6).await;
        assert!(after.iter().all(|k| k == KEY_B), "{model}: {after:?}");
    }
    f.assert_every_worker_served();
}

/// When every key is exhausted the client gets 503 `provider_keys_exhausted`, with when the
/// first is back; later requests get it at once, without a call upstream.
async fn when_every_key_is_exhausted_the_client_gets_503(host: Host) {
    let f = Fixture::start(host).await;
    for key in [KEY_A, KEY_B] {
        f.mock.set_fault(key, Fault::QuotaExhausted);
    }
    for _ in 0..2 {
        let (status, retry_after, v) = f.ask_with(&fresh_client(), "gpt-a").await;
        assert_error(status, &v, 503, "provider_keys_exhausted");
        let retry_after = retry_after.expect("a retry-after");
        assert!((3_500..=3_600).contains(&retry_after), "{retry_after}");
        assert!(!v.to_string().contains("org-"), "{v}");
    }
    assert_eq!(f.keys_used(), [KEY_A, KEY_B], "no blind call upstream");
}

/// A request larger than the key's per-minute limit ("Request too large", a 429 from
/// OpenAI) is the request's fault: the client gets 400 `request_too_large_for_provider`
/// with the provider's reason (no account id), no other key is tried, and key A is not
/// cooled: the next request uses it.
async fn a_request_too_large_for_the_key_is_refused_without_cooling_it(host: Host) {
    let f = Fixture::start(host).await;
    f.mock.set_fault(
        KEY_A,
        Fault::RequestTooLarge {
            limit: 100,
            requested: 5_000,
        },
    );
    let (status, v) = f.ask("gpt-a").await;
    assert_error(status, &v, 400, "request_too_large_for_provider");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("Request too large"), "{message}");
    assert!(message.contains("Requested 5000"), "{message}");
    assert!(!v.to_string().contains("org-"), "{v}");
    assert_eq!(f.keys_used(), [KEY_A], "not retried on B");
    f.mock.clear_fault(KEY_A);
    let after = f.keys_on_every_worker("gpt-a", 6).await;
    assert!(after.iter().all(|k| k == KEY_A), "{after:?}");
    f.assert_every_worker_served();
    f.assert_key_state("upstream", "key-a", "healthy", Some(("rate_limited", 0)))
        .await;
}

/// An overloaded provider (503) is its fault, not the key's: the request is retried (on B),
/// and key A's health is untouched: every worker keeps using it.
async fn an_overloaded_provider_is_retried_and_the_key_left_alone(host: Host) {
    let f = Fixture::start(host).await;
    f.mock.set_fault(KEY_A, Fault::Overloaded);
    let (status, v) = f.ask("gpt-a").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(f.keys_used(), [KEY_A, KEY_B], "retried");
    f.mock.clear_fault(KEY_A);
    let after = f.keys_on_every_worker("gpt-a", 6).await;
    assert!(after.iter().all(|k| k == KEY_A), "{after:?}");
    f.assert_every_worker_served();
    f.assert_key_state("upstream", "key-a", "healthy", Some(("server_errors", 1)))
        .await;
}

/// A provider's refusal relayed to the client never names the account behind the key
/// (OpenAI writes `organization org-…` in its rate-limit messages).
async fn a_relayed_refusal_names_no_account(host: Host) {
    let f = Fixture::start(host).await;
    f.mock.set_fault(
        KEY_A,
        Fault::TooManyRequests {
            retry_after_secs: Some(600),
        },
    );
    let (status, v) = f.ask("solo-gpt").await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("Rate limit reached for gpt-4o in organization on"),
        "{message}"
    );
    assert!(!v.to_string().contains("org-"), "{v}");
}

/// Anthropic: an account out of credit answers 400 "credit balance is too low": the key is
/// exhausted and the request goes on to key B (in Envoy, though the router does not retry a
/// 400); an overloaded API (529) is retried and leaves the key alone; a request over the
/// size limit (413) is refused as too large, on one attempt.
async fn anthropic_refusals_are_told_apart(host: Host) {
    let f = Fixture::start(host).await;
    f.mock.set_fault(CLAUDE_A, Fault::Overloaded);
    let (status, v) = f.ask("claude").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(f.keys_used(), [CLAUDE_A, CLAUDE_B], "overloaded: retried");
    f.mock.clear_fault(CLAUDE_A);
    f.assert_key_state("claude", "claude-a", "healthy", Some(("server_errors", 1)))
        .await;

    f.mock.clear_requests();
    f.mock.set_fault(
        CLAUDE_A,
        Fault::RequestTooLarge {
            limit: 0,
            requested: 0,
        },
    );
    let (status, v) = f.ask("claude").await;
    assert_error(status, &v, 400, "request_too_large_for_provider");
    assert_eq!(f.keys_used(), [CLAUDE_A], "too large: not retried");
    f.mock.clear_fault(CLAUDE_A);
    f.assert_key_state("claude", "claude-a", "healthy", None)
        .await;

    f.mock.clear_requests();
    f.mock.set_fault(CLAUDE_A, Fault::QuotaExhausted);
    let (status, v) = f.ask("claude").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(f.keys_used(), [CLAUDE_A, CLAUDE_B], "exhausted: retried");
    f.mock.clear_fault(CLAUDE_A);
    f.assert_key_state("claude", "claude-a", "exhausted", Some(("exhausted", 1)))
        .await;
    let after = f.keys_on_every_worker("claude", 4).await;
    assert!(after.iter().all(|k| k == CLAUDE_B), "{after:?}");

    // Every key out of credit: 503 once B is out too.
    f.mock.set_fault(CLAUDE_B, Fault::QuotaExhausted);
    let (status, v) = f.ask("claude").await;
    assert_error(status, &v, 503, "provider_keys_exhausted");
}

both_hosts!(
    a_rate_limit_cools_the_key_for_that_model_only,
    an_exhausted_quota_takes_the_key_out_and_the_request_goes_on,
    when_every_key_is_exhausted_the_client_gets_503,
    a_request_too_large_for_the_key_is_refused_without_cooling_it,
    an_overloaded_provider_is_retried_and_the_key_left_alone,
    a_relayed_refusal_names_no_account,
    anthropic_refusals_are_told_apart,
);
