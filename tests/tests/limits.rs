//! Token-aware limits end to end, in both hosts (Envoy with two workers sharing counters):
//! reserve before the call, settle on the provider's usage, streaming included.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_e2e::both_hosts;
use tollgate_e2e::gateway::{Gateway, Host};
use tollgate_e2e::mock_provider::{
    Fault, LineEnding, MockProvider, MockUsage, StreamStyle, Writes,
};
use tollgate_e2e::scenario::{
    assert_error, away_from_utc_midnight, fresh_client, sha256_hex, sse_data, unix_ms, user, Stack,
};

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
        self.send_with(&self.http, body).await
    }

    /// Like `send`, on a connection of its own.
    async fn send_fresh(&self, body: Value) -> reqwest::Response {
        self.send_with(&fresh_client(), body).await
    }

    async fn send_with(&self, client: &reqwest::Client, body: Value) -> reqwest::Response {
        client
            .post(format!("{}/v1/chat/completions", self.gateway.base_url()))
            .bearer_auth(APP_KEY)
            .json(&body)
            .send()
            .await
            .unwrap()
    }
}

/// A reply the provider charges nothing for: a request's settlement then gives back all it
/// reserved, so the headers show what it reserves.
const FREE: MockUsage = MockUsage {
    prompt_tokens: 0,
    completion_tokens: 0,
};

fn header(r: &reqwest::Response, name: &str) -> Option<u64> {
    r.headers().get(name)?.to_str().ok()?.parse().ok()
}

fn chat(max_tokens: u64) -> Value {
    json!({ "model": "gpt-4o-mini", "max_tokens": max_tokens, "messages": user("hi") })
}

/// 50 clients at once, each on its own connection (so both Envoy workers serve them),
/// against a token limit that does not refill while the test runs (1,000 a day: under one
/// token a minute): what is admitted, counted at the provider's reported usage, stays within
/// the limit plus one reservation.
async fn concurrent_clients_stay_within_the_token_limit(host: Host) {
    const LIMIT: u64 = 1_000;
    const USAGE: u64 = 100;
    let f = start(host, &format!("{{ tokens_per_day: {LIMIT} }}")).await;
    f.mock.set_reply(
        "ok",
        MockUsage {
            prompt_tokens: 40,
            completion_tokens: USAGE - 40,
        },
    );
    let f = Arc::new(f);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let f = Arc::clone(&f);
            tokio::spawn(async move { f.send_fresh(chat(80)).await.status().as_u16() })
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
    // 80 max_tokens + the prompt estimate: what one request reserves at most.
    let reservation = 100;
    assert_eq!(admitted + limited, 50);
    assert_eq!(
        f.mock.requests().len() as u64,
        admitted,
        "every admitted request went upstream"
    );
    assert!(
        admitted * USAGE <= LIMIT + reservation,
        "{admitted} requests of {USAGE} tokens admitted against {LIMIT}"
    );
    // Each reserves at least 80 and is charged 100: at least 1,000 / 100 fit.
    assert!(
        admitted >= LIMIT / USAGE,
        "the limiter admitted too few: {admitted}"
    );
    f.assert_every_worker_served();
}

/// A stream is charged the usage the provider reports at its end, which the gateway asks
/// for and hides from a client that did not. On a daily allowance (which does not refill),
/// exactly.
async fn streams_are_charged_their_real_usage(host: Host) {
    const LIMIT: u64 = 100_000;
    away_from_utc_midnight().await;
    let f = start(host, &format!("{{ daily_tokens: {LIMIT} }}")).await;
    // What a request reserves, seen on one the provider charges nothing for.
    f.mock.set_reply("free", FREE);
    let before = tokens_left(&f.send(chat(10)).await);
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
    let upstream = f.mock.requests()[1].json();
    assert_eq!(upstream["stream_options"]["include_usage"], true);
    // The next request (reserving what the first did) sees the stream's 3,000 tokens gone,
    // not the ~20 it reserved.
    let after = tokens_left(&f.send(chat(10)).await);
    assert_eq!(before - after, 3_000, "{before} then {after}");
}

/// However a provider frames its stream (CRLF, keep-alive comments, one event split over
/// many reads or many in one, no `[DONE]`), the usage in its last chunk is what is charged.
async fn streams_in_any_framing_are_charged_their_real_usage(host: Host) {
    const LIMIT: u64 = 1_000_000;
    away_from_utc_midnight().await;
    let f = start(host, &format!("{{ daily_tokens: {LIMIT} }}")).await;
    f.mock.set_reply("free", FREE);
    let mut left = tokens_left(&f.send(chat(10)).await);
    let crlf = StreamStyle {
        line_ending: LineEnding::CrLf,
        ..StreamStyle::default()
    };
    let styles = [
        StreamStyle {
            keep_alive: true,
            writes: Writes::Split { bytes: 5 },
            ..crlf
        },
        StreamStyle {
            writes: Writes::Coalesced,
            done: false,
            ..crlf
        },
        StreamStyle {
            writes: Writes::Split { bytes: 1 },
            keep_alive: true,
            ..StreamStyle::default()
        },
    ];
    for (i, style) in styles.into_iter().enumerate() {
        f.mock.set_stream_style(KEY_A, style);
        let used = 1_000 * (i as u64 + 1);
        f.mock.set_reply(
            "one two three",
            MockUsage {
                prompt_tokens: used,
                completion_tokens: 7,
            },
        );
        let r = f
            .send(json!({ "model": "gpt-4o-mini", "stream": true, "max_tokens": 10, "messages": user("hi") }))
            .await;
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        assert!(
            !text.contains("\"usage\":{"),
            "{style:?}: usage chunk not asked for: {text:?}"
        );
        f.mock.set_reply("free", FREE);
        let now = tokens_left(&f.send(chat(10)).await);
        assert_eq!(left - now, used + 7, "{style:?}");
        left = now;
    }
}

/// A client that goes away mid-stream, while the provider holds the stream open, frees its
/// concurrency slot at once (the provider never sends another byte, so only noticing the
/// client leave can free it), and is charged what was streamed: the prompt and the text so
/// far (an estimate), not nothing and not its whole reservation.
async fn a_client_that_disconnects_frees_its_slot_and_is_charged_what_was_streamed(host: Host) {
    away_from_utc_midnight().await;
    let f = start(host, "{ concurrency: 1, daily_tokens: 1000000 }").await;
    // A prompt of some 2,000 tokens, so that charging it shows.
    let long = json!({ "model": "gpt-4o-mini", "max_tokens": 5000, "messages": user(&"word ".repeat(2_000)) });
    f.mock.set_reply("free", FREE);
    let reserved = 1_000_000 - tokens_left(&f.send(long.clone()).await);
    let prompt = reserved - 5_000;
    assert!(prompt > 1_000, "prompt estimate {prompt}");
    let release = Arc::new(tokio::sync::Notify::new());
    f.mock.set_fault(
        KEY_A,
        Fault::HoldStream {
            release: Arc::clone(&release),
        },
    );
    let mut stream = long.clone();
    stream["stream"] = json!(true);
    let mut r = f.send(stream).await;
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
    let admitted = wait_for_admission(&f, long).await;
    let charged = (1_000_000 - reserved) - tokens_left(&admitted);
    assert!(
        charged >= prompt,
        "charged {charged}: the prompt ({prompt}) of the departed client was not charged"
    );
    assert!(
        charged < prompt + 100,
        "charged {charged}: the 5,000-token reservation was not refunded"
    );
    release.notify_one();
}

/// A client that gives up while the provider is still thinking (and the provider never
/// answers) frees its slot, and is charged its whole reservation, since the provider bills
/// what it was sent.
async fn a_client_that_leaves_before_the_answer_frees_its_slot(host: Host) {
    away_from_utc_midnight().await;
    let f = start(host, "{ concurrency: 1, daily_tokens: 1000000 }").await;
    f.mock.set_reply("free", FREE);
    let reserved = 1_000_000 - tokens_left(&f.send(chat(10)).await);
    let release = Arc::new(tokio::sync::Notify::new());
    f.mock.set_fault(
        KEY_A,
        Fault::HoldStream {
            release: Arc::clone(&release),
        },
    );
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
    let admitted = wait_for_admission(&f, chat(10)).await;
    let charged = (1_000_000 - reserved) - tokens_left(&admitted);
    assert_eq!(
        charged, reserved,
        "the departed request is charged what it reserved"
    );
    release.notify_one();
}

/// Sends `body` until it is admitted (the slot of a departed client is being freed).
async fn wait_for_admission(f: &Fixture, body: Value) -> reqwest::Response {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = f.send(body.clone()).await;
        if r.status() == 200 {
            return r;
        }
        assert_eq!(r.status(), 429);
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
    // One request a second: the second of two back-to-back requests is refused unless a
    // whole second passed between them.
    let f = start(host, "{ requests_per_second: 1 }").await;
    let mut retry_after_ms = None;
    for _ in 0..10 {
        let r = f.send(chat(10)).await;
        if r.status() == 429 {
            let ms = header(&r, "retry-after-ms").unwrap();
            let secs = header(&r, "retry-after").unwrap();
            assert_eq!(secs, ms.div_ceil(1_000));
            assert!(ms > 0 && ms <= 1_000, "{ms}");
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
    let wait = retry_after_ms.expect("1 request a second was never exceeded");
    tokio::time::sleep(Duration::from_millis(wait)).await;
    assert_eq!(f.send(chat(10)).await.status(), 200);
}

/// Every response says how much is left, and it goes down by what each request used.
async fn headers_show_the_remaining_budget_decreasing(host: Host) {
    away_from_utc_midnight().await;
    // Allowances that do not refill while the test runs (a request a day refills in 86 s).
    let f = start(host, "{ daily_tokens: 100000, requests_per_day: 1000 }").await;
    f.mock.set_reply(
        "ok",
        MockUsage {
            prompt_tokens: 500,
            completion_tokens: 500,
        },
    );
    let mut last: Option<(u64, u64)> = None;
    for _ in 0..3 {
        let r = f.send(chat(100)).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-ratelimit-limit-tokens"), Some(100_000));
        assert_eq!(header(&r, "x-ratelimit-limit-requests"), Some(1_000));
        assert!(r.headers().contains_key("x-ratelimit-reset-tokens"));
        let now = (
            tokens_left(&r),
            header(&r, "x-ratelimit-remaining-requests").unwrap(),
        );
        if let Some(last) = last {
            // Each request reserves the same; the one before was charged its 1,000.
            assert_eq!(last.0 - now.0, 1_000, "{now:?} after {last:?}");
            assert!(now.1 < last.1, "{now:?} after {last:?}");
        }
        last = Some(now);
    }
}

/// A daily cost budget runs out at the request that would overspend it, with a 429 whose
/// retry time is the next UTC midnight.
async fn a_daily_cost_budget_runs_out_at_the_right_request(host: Host) {
    away_from_utc_midnight().await;
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
    let to_midnight = 86_400_000 - unix_ms() % 86_400_000;
    assert!(
        retry_ms.abs_diff(to_midnight) < 10_000,
        "{retry_ms} vs {to_midnight}"
    );
    assert_eq!(f.mock.requests().len(), 5);
}

fn tokens_left(r: &reqwest::Response) -> u64 {
    assert_eq!(r.status(), 200);
    header(r, "x-ratelimit-remaining-tokens").expect("x-ratelimit-remaining-tokens")
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
        "[{ id: key-a, secret_env: TG_LIMITS_KEY_A, limits: { requests_per_day: 2 } }, { id: key-b, secret_env: TG_LIMITS_KEY_B }]",
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
        "[{ id: key-a, secret_env: TG_LIMITS_KEY_A, limits: { tokens_per_day: 1000 } }, \
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

/// One key, A, with a limit of 250 tokens a day (refilling under one token a minute), and
/// `more` of the provider's config; every completion uses 100 tokens.
async fn start_with_key_a_at_250_tokens_a_day(host: Host, more: &str) -> Fixture {
    let keys = format!(
        "[{{ id: key-a, secret_env: TG_LIMITS_KEY_A, limits: {{ tokens_per_day: 250 }} }}]{more}"
    );
    let f = start_with_keys(host, &keys).await;
    f.mock.set_reply(
        "ok",
        MockUsage {
            prompt_tokens: 50,
            completion_tokens: 50,
        },
    );
    f
}

/// A key's token limit is settled on the provider's reported usage (in Envoy the key role
/// hands its reservation to the gateway role, which sees the usage); when every key is full,
/// the client gets 429 naming the provider's pool, and no call goes out.
async fn key_token_limits_settle_on_usage_and_a_full_pool_is_429(host: Host) {
    let f = start_with_key_a_at_250_tokens_a_day(host, "").await;
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

/// A provider's response cannot hand the gateway a key reservation of its own making (the
/// internal header the key role uses in Envoy): had the forged one below been settled, its
/// 999,999 reserved tokens would have been refunded to key A, whose limit would never fill.
/// Forged on successes and on a failure alike.
async fn forged_key_reservations_from_a_provider_are_ignored(host: Host) {
    let f = start_with_key_a_at_250_tokens_a_day(host, "\n    retry: { attempts: 1 }").await;
    f.mock.set_key_headers(
        KEY_A,
        vec![(
            "x-tollgate-key-reservation".to_string(),
            format!("upstream/key-a/1/999999/{}", unix_ms()),
        )],
    );
    assert_eq!(f.send(chat(10)).await.status(), 200);
    f.mock.set_fault(KEY_A, Fault::ServerError { status: 500 });
    assert_eq!(f.send(chat(10)).await.status(), 500);
    f.mock.clear_fault(KEY_A);
    // 100 charged; then 200, then 300 (into debt): the fourth success cannot fit.
    for i in 0..2 {
        assert_eq!(f.send(chat(10)).await.status(), 200, "request {i}");
    }
    let r = f.send(chat(10)).await;
    let status = r.status().as_u16();
    assert_error(status, &r.json().await.unwrap(), 429, "rate_limit_exceeded");
}

/// A reload (SIGHUP to the native host; new xDS files for Envoy) keeps the counters of
/// limits that did not change, starts a changed limit afresh, and refuses an invalid file
/// with the running config kept.
async fn reload_keeps_the_counters_of_unchanged_limits(host: Host) {
    let f = match host {
        Host::Native => start(host, "{ requests_per_day: 2 }").await,
        Host::Envoy { workers } => {
            let mock = MockProvider::start().await;
            let config = config(&mock, "{ requests_per_day: 2 }", "");
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
    let unchanged = config(&f.mock, "{ requests_per_day: 2 }", &other);
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
    let raised = config(&f.mock, "{ requests_per_day: 5 }", &other);
    assert!(tokio::task::block_in_place(|| gw.reload(&raised)));
    assert_eq!(
        f.send(chat(10)).await.status(),
        200,
        "a changed limit kept the old counter"
    );
}

both_hosts!(
    concurrent_clients_stay_within_the_token_limit,
    streams_are_charged_their_real_usage,
    streams_in_any_framing_are_charged_their_real_usage,
    a_client_that_disconnects_frees_its_slot_and_is_charged_what_was_streamed,
    a_client_that_leaves_before_the_answer_frees_its_slot,
    a_key_at_its_own_limit_is_skipped,
    a_failed_attempt_gives_its_key_reservation_back,
    key_token_limits_settle_on_usage_and_a_full_pool_is_429,
    forged_key_reservations_from_a_provider_are_ignored,
    reload_keeps_the_counters_of_unchanged_limits,
    the_429_retry_after_is_honest,
    headers_show_the_remaining_budget_decreasing,
    a_daily_cost_budget_runs_out_at_the_right_request,
);
