//! Key selection: strategies, per-model pools, allow-lists, retries on another key, and what
//! an answer records, with a fake clock and an in-memory store.

use super::report::{self, KeyState};
use super::*;
use crate::config::Config;
use crate::store::tests::CellStore;

const NOW: u64 = 1_795_341_600_000;

fn config(provider_extra: &str, keys: &str, models: &str) -> Config {
    let text = format!(
        r#"
providers:
  - {{ name: openai, kind: openai, base_url: "http://127.0.0.1:9/v1", {provider_extra} keys: [{keys}] }}
models: [{models}]
"#
    );
    Config::load(&text, &|_| Some(SECRET.into())).unwrap()
}

const SECRET: &str = "sk-test-secret-4f9a1c";

fn ticket(model: &str) -> Ticket {
    Ticket {
        provider: "openai".into(),
        model: model.into(),
        tokens: 10,
        started_ms: NOW,
        tried: Vec::new(),
        attempts_before: 0,
        chain: Vec::new(),
        current: None,
        first_provider: None,
    }
}

/// Records an answer of `key` to a request for `model`: classified from `status` and
/// `body` as the hosts do, observed and counted.
#[allow(clippy::too_many_arguments)]
fn answer(
    c: &Config,
    store: &CellStore,
    key: &str,
    model: &str,
    status: Option<u16>,
    body: &str,
    h: &[(String, String)],
    now: u64,
) {
    let class = status.and_then(|s| classify(c, "openai", s, body.as_bytes()));
    let who = Attempted {
        provider: "openai",
        key,
        model,
    };
    observe(c, &who, status, class, h, now, store).unwrap();
    count(c, &who, status, class, store).unwrap();
}

fn picks(c: &Config, t: &Ticket, store: &CellStore, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            attempt_key(c, t, store, NOW)
                .unwrap()
                .key_id()
                .unwrap()
                .to_string()
        })
        .collect()
}

const ABC: &str = "{ id: a, secret_env: A }, { id: b, secret_env: B }, { id: c, secret_env: C }";
const ONE_MODEL: &str = "{ name: m, provider: openai }";

#[test]
fn round_robin_takes_turns_shared_through_the_store() {
    let c = config("strategy: round-robin,", ABC, ONE_MODEL);
    let store = CellStore::default();
    assert_eq!(
        picks(&c, &ticket("m"), &store, 6),
        ["a", "b", "c", "a", "b", "c"]
    );
}

#[test]
fn weighted_gives_each_key_its_share() {
    let keys = "{ id: a, secret_env: A, weight: 3 }, { id: b, secret_env: B }";
    let c = config("strategy: weighted,", keys, ONE_MODEL);
    let store = CellStore::default();
    let got = picks(&c, &ticket("m"), &store, 400);
    let a = got.iter().filter(|k| *k == "a").count();
    assert_eq!(a, 300, "3 of every 4 turns");
}

#[test]
fn priority_uses_the_first_usable_key_and_fails_over_in_order() {
    let c = config("strategy: priority,", ABC, ONE_MODEL);
    let store = CellStore::default();
    assert_eq!(picks(&c, &ticket("m"), &store, 3), ["a", "a", "a"]);
    // a is rate limited: b takes over until a cools down.
    let h = crate::http::test_headers(&[("retry-after", "2")]);
    answer(&c, &store, "a", "m", Some(429), "", &h, NOW);
    assert_eq!(picks(&c, &ticket("m"), &store, 2), ["b", "b"]);
    let later = attempt_key(&c, &ticket("m"), &store, NOW + 2_000).unwrap();
    assert_eq!(later.key_id(), Some("a"));
}

#[test]
fn most_headroom_is_the_default_and_prefers_the_roomiest_key() {
    let c = config("", ABC, ONE_MODEL);
    assert_eq!(
        c.provider_by_name("openai").unwrap().strategy,
        Strategy::MostHeadroom
    );
    let store = CellStore::default();
    for (key, remaining) in [("a", "100"), ("b", "5000"), ("c", "700")] {
        let h = crate::http::test_headers(&[
            ("x-ratelimit-remaining-tokens", remaining),
            ("x-ratelimit-reset-tokens", "30s"),
        ]);
        answer(&c, &store, key, "m", Some(200), "", &h, NOW);
    }
    assert_eq!(picks(&c, &ticket("m"), &store, 3), ["b", "b", "b"]);
}

#[test]
fn a_retry_takes_a_key_the_request_has_not_tried() {
    let c = config("strategy: priority,", ABC, ONE_MODEL);
    let store = CellStore::default();
    let mut t = ticket("m");
    t.tried = vec!["a".into()];
    assert_eq!(picks(&c, &t, &store, 1), ["b"]);
    t.tried = vec!["a".into(), "b".into()];
    assert_eq!(picks(&c, &t, &store, 1), ["c"]);
    // All tried (5xx everywhere): the least recently tried goes again.
    t.tried = vec!["a".into(), "b".into(), "c".into()];
    assert_eq!(picks(&c, &t, &store, 1), ["a"]);
    t.tried = vec!["a".into(), "b".into(), "c".into(), "a".into()];
    assert_eq!(picks(&c, &t, &store, 1), ["b"]);
    assert_eq!(t.next_attempt(), 5);
}

#[test]
fn per_model_pools_and_per_key_allow_lists() {
    let keys = "{ id: a, secret_env: A, models: [big] }, \
                { id: b, secret_env: B, models: [\"small*\"] }, \
                { id: c, secret_env: C }";
    let models = "{ name: big, provider: openai }, { name: small-1, provider: openai }, \
                  { name: pinned, provider: openai, keys: [c] }";
    let c = config("strategy: round-robin,", keys, models);
    let store = CellStore::default();
    // Interleaved traffic: each model still takes turns over its whole pool.
    let (mut big, mut small) = (Vec::new(), Vec::new());
    for _ in 0..4 {
        big.extend(picks(&c, &ticket("big"), &store, 1));
        small.extend(picks(&c, &ticket("small-1"), &store, 1));
    }
    big.sort();
    small.sort();
    assert_eq!(big, ["a", "a", "c", "c"]);
    assert_eq!(small, ["b", "b", "c", "c"]);
    assert_eq!(picks(&c, &ticket("pinned"), &store, 2), ["c", "c"]);
    // A ticket for a model of another provider is not this pool's business.
    assert!(matches!(
        attempt_key(&c, &ticket("nope"), &store, NOW),
        Err(GatewayError::UnknownModel { .. })
    ));
}

#[test]
fn pool_config_errors_name_their_path() {
    let text = r#"
providers:
  - name: openai
    kind: openai
    base_url: "http://127.0.0.1:9"
    strategy: fastest
    retry: { attempts: 0, backoff_ms: 100, max_backoff_ms: 10 }
    keys:
      - { id: a, secret_env: A, weight: 0, models: [gpt-5] }
      - { id: b, secret_env: B, models: [m] }
models:
  - { name: m, provider: openai, keys: [zz] }
  - { name: n, provider: openai, keys: [a] }
"#;
    let errors = Config::load(text, &|_| Some("sk".into())).unwrap_err();
    let text = errors.to_string();
    for expected in [
        "providers[0].strategy",
        "providers[0].retry.attempts",
        "providers[0].retry.max_backoff_ms",
        "providers[0].keys[0].weight",
        "providers[0].keys[0].models[0]: `gpt-5` matches no model",
        "models[0].keys[0]: provider `openai` has no key `zz`",
        "models[1].keys: no key of provider `openai` serves model `n`",
    ] {
        assert!(text.contains(expected), "{expected} missing from:\n{text}");
    }
}

#[test]
fn observe_counts_attempts_and_the_report_shows_state_without_secrets() {
    let c = config("", ABC, ONE_MODEL);
    let store = CellStore::default();
    let none = crate::http::test_headers(&[]);
    let seen = |key: &str, status: Option<u16>, h: &Vec<(String, String)>| {
        answer(&c, &store, key, "m", status, "", h, NOW);
    };
    seen("a", Some(200), &none);
    seen("a", Some(500), &none);
    let h = crate::http::test_headers(&[
        ("retry-after-ms", "1500"),
        ("x-ratelimit-remaining-requests", "0"),
    ]);
    seen("b", Some(429), &h);
    seen("c", Some(401), &none);
    seen("c", None, &none);
    let pools = report::pools(&c, &store, NOW + 1);
    let keys = &pools[0].keys;
    assert_eq!(pools[0].strategy, "most-headroom");
    assert_eq!(keys[0].state, KeyState::Healthy);
    assert_eq!(keys[0].counters["attempts"], 2);
    assert_eq!(keys[0].counters["succeeded"], 1);
    assert_eq!(keys[0].counters["server_errors"], 1);
    assert_eq!(keys[1].state, KeyState::Cooling);
    assert_eq!(keys[1].until_ms, Some(NOW + 1_500));
    assert_eq!(keys[1].learned_remaining, Some(0));
    assert_eq!(keys[1].counters["rate_limited"], 1);
    assert_eq!(keys[2].state, KeyState::Revoked);
    assert_eq!(keys[2].counters["refused"], 1);
    assert_eq!(keys[2].counters["unreachable"], 1);
    assert_eq!(keys[2].counters["attempts"], 2);
    // Cooled down later.
    assert_eq!(
        report::pools(&c, &store, NOW + 1_500)[0].keys[1].state,
        KeyState::Healthy
    );
    let json = serde_json::to_string(&pools).unwrap();
    assert!(!json.contains(SECRET), "{json}");
}

const RPM_429: &str = r#"{"error":{"message":"Rate limit reached for gpt-4o in organization org-abc on requests per min (RPM): Limit 3, Used 3, Requested 1.","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
const QUOTA_429: &str = r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
const TOO_LARGE_429: &str = r#"{"error":{"message":"Request too large for gpt-4o in organization org-abc on tokens per min (TPM): Limit 100, Requested 5000.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#;

#[test]
fn an_openai_rate_limit_cools_the_key_for_its_upstream_model_only() {
    let models = "{ name: m, provider: openai, upstream_model: gpt-4o }, \
                  { name: m2, provider: openai, upstream_model: gpt-4o }, \
                  { name: other, provider: openai, upstream_model: gpt-4o-mini }";
    let c = config("strategy: priority,", ABC, models);
    let store = CellStore::default();
    let h = crate::http::test_headers(&[("retry-after", "30")]);
    answer(&c, &store, "a", "m", Some(429), RPM_429, &h, NOW);
    // Every model with the same upstream model skips a; the others keep it.
    assert_eq!(picks(&c, &ticket("m"), &store, 1), ["b"]);
    assert_eq!(picks(&c, &ticket("m2"), &store, 1), ["b"]);
    assert_eq!(picks(&c, &ticket("other"), &store, 2), ["a", "a"]);
    // The record is its own store key, created with the others.
    let record = "tollgate/health/openai/a/m/gpt-4o";
    assert!(c.pool_store_keys().any(|k| k == record));
    assert!(c
        .pool_store_keys()
        .any(|k| k == "tollgate/health/openai/c/m/gpt-4o-mini"));
    // Every key cooling for the model: 429 until the first is back.
    answer(&c, &store, "b", "m", Some(429), RPM_429, &h, NOW);
    answer(&c, &store, "c", "m", Some(429), RPM_429, &h, NOW);
    match attempt_key(&c, &ticket("m"), &store, NOW + 1_000) {
        Err(GatewayError::KeysCooling { retry_after_ms, .. }) => assert_eq!(retry_after_ms, 29_000),
        other => panic!("{other:?}"),
    }
    assert_eq!(picks(&c, &ticket("other"), &store, 1), ["a"]);
    // The admin view: cooling, for that model.
    let pools = report::pools(&c, &store, NOW + 1);
    let a = &pools[0].keys[0];
    assert_eq!(a.state, KeyState::Cooling);
    assert_eq!(a.cooling_models.get("gpt-4o"), Some(&(NOW + 30_000)));
    assert_eq!(a.cooling_models.len(), 1);
    assert_eq!(a.counters["rate_limited"], 1);
    // A 429 nothing is known of cools key-wide.
    answer(&c, &store, "a", "other", Some(429), "", &h, NOW);
    assert_eq!(picks(&c, &ticket("other"), &store, 1), ["b"]);
}

#[test]
fn an_exhausted_key_is_out_for_long_and_too_large_requests_leave_keys_alone() {
    let c = config(
        "strategy: priority, key_health: { exhausted_ms: 600000 },",
        ABC,
        ONE_MODEL,
    );
    let store = CellStore::default();
    let none = crate::http::test_headers(&[]);
    answer(&c, &store, "a", "m", Some(429), TOO_LARGE_429, &none, NOW);
    assert_eq!(
        picks(&c, &ticket("m"), &store, 1),
        ["a"],
        "too large: a untouched"
    );
    answer(&c, &store, "a", "m", Some(503), "", &none, NOW);
    assert_eq!(
        picks(&c, &ticket("m"), &store, 1),
        ["a"],
        "overloaded: a untouched"
    );
    answer(&c, &store, "a", "m", Some(429), QUOTA_429, &none, NOW);
    assert_eq!(picks(&c, &ticket("m"), &store, 1), ["b"]);
    let pools = report::pools(&c, &store, NOW + 1);
    let a = &pools[0].keys[0];
    assert_eq!(a.state, KeyState::Exhausted);
    assert_eq!(a.until_ms, Some(NOW + 600_000));
    assert_eq!(a.counters["exhausted"], 1);
    assert_eq!(a.counters["rate_limited"], 0);
    assert_eq!(a.counters["server_errors"], 1);
    assert_eq!(KeyState::Exhausted.gauge(), 3);
    // Every key exhausted: 503 until the first is back.
    answer(&c, &store, "b", "m", Some(429), QUOTA_429, &none, NOW + 5);
    answer(&c, &store, "c", "m", Some(429), QUOTA_429, &none, NOW + 9);
    match attempt_key(&c, &ticket("m"), &store, NOW + 100) {
        Err(e @ GatewayError::KeysExhausted { retry_after_ms, .. }) => {
            assert_eq!(retry_after_ms, 599_900);
            assert_eq!((e.status(), e.code()), (503, "provider_keys_exhausted"));
        }
        other => panic!("{other:?}"),
    }
    // Past its time, the first key is back.
    assert_eq!(
        attempt_key(&c, &ticket("m"), &store, NOW + 600_000)
            .unwrap()
            .key_id(),
        Some("a")
    );
    // A mix of exhausted, cooling and revoked keys: the soonest back wins.
    let mix = |cooling_s: &str| {
        let store = CellStore::default();
        let h = crate::http::test_headers(&[("retry-after", cooling_s)]);
        answer(&c, &store, "a", "m", Some(429), QUOTA_429, &none, NOW);
        answer(&c, &store, "b", "m", Some(429), "", &h, NOW);
        answer(&c, &store, "c", "m", Some(401), "", &none, NOW);
        attempt_key(&c, &ticket("m"), &store, NOW)
    };
    assert!(matches!(
        mix("30"),
        Err(GatewayError::KeysCooling {
            retry_after_ms: 30_000,
            ..
        })
    ));
    assert!(matches!(
        mix("3000"),
        Err(GatewayError::KeysExhausted {
            retry_after_ms: 600_000,
            ..
        })
    ));
}

#[test]
fn a_ticket_fails_over_to_the_chain_step_of_the_cluster_it_reached() {
    let step = |provider: &str, model: &str| ChainStep {
        provider: provider.into(),
        model: model.into(),
        authority: format!("{provider}.example"),
        path: "/v1/messages".into(),
        body: "{\"messages\":[{\"content\":\"two\\nlines \\\"quoted\\\"\"}]}\n".into(),
        default_headers: vec![("anthropic-version".into(), "2023-06-01".into())],
        tokens: 7,
    };
    let steps = [step("anthropic", "claude"), step("mistral", "small")];
    let mut t = ticket("gpt-4o-mini");
    t.tried = vec!["a".into(), "b".into()];
    t.chain = ChainLink::to(&steps);
    // A step the attempt cannot read, or another provider's, leaves the ticket as it was.
    assert_eq!(t.fail_over_to("mistral", |_| None), None);
    assert_eq!(t.fail_over_to("mistral", |_| steps.first().cloned()), None);
    assert_eq!(t.chain.len(), 2);
    // A retry that reached mistral's cluster skips the anthropic step.
    let s = t
        .fail_over_to("mistral", |n| steps.get(n).cloned())
        .unwrap();
    assert_eq!(s.model, "small");
    assert_eq!(t.current, Some(1), "the step every further attempt sends");
    assert_eq!(
        (t.provider.as_str(), t.model.as_str()),
        ("mistral", "small")
    );
    assert!(t.chain.is_empty() && t.tried.is_empty());
    assert_eq!((t.tokens, t.attempts_made(), t.next_attempt()), (7, 2, 3));
    assert_eq!(
        t.retry_provider(),
        "openai",
        "the requested model's policy bounds the chain"
    );
    assert_eq!(
        t.fail_over_to("anthropic", |n| steps.get(n).cloned()),
        None,
        "spent"
    );
    // The chain survives the trip through Envoy's filter state: the ticket names the steps,
    // each step travels apart, its body as it is.
    let mut t = ticket("gpt-4o-mini");
    t.chain = ChainLink::to(&steps);
    assert_eq!(Ticket::decode(t.encode().as_bytes()), Some(t.clone()));
    assert!(
        !t.encode().contains("/v1/messages"),
        "no step in the ticket"
    );
    assert!(!ticket("x").encode().contains("chain"), "absent when empty");
    let encoded = steps[0].encode();
    assert!(encoded.ends_with(steps[0].body.as_bytes()));
    assert_eq!(ChainStep::decode(&encoded), Some(steps[0].clone()));
    assert_eq!(ChainStep::decode(b"{}"), None, "no head");
}
