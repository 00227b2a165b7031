//! Prometheus metrics, in both hosts, as an operator's Prometheus holds them: a real
//! Prometheus scrapes the native host's `GET /metrics` or Envoy's `/stats/prometheus` every
//! second while a known sequence of requests runs (plain, streamed, refused by a limit, a key
//! answering 429); its HTTP API must then show exactly the tokens, cost, request counts, key
//! states and limit standings the mock reported and the limits decided. No secret appears in
//! any scrape. The shipped alert rules and dashboard are checked against the metrics that
//! exist (`promtool check rules`).

use std::time::Duration;

use serde_json::{json, Value};
use tollgate_e2e::both_hosts;
use tollgate_e2e::gateway::Host;
use tollgate_e2e::mock_provider::{Fault, MockProvider, MockUsage};
use tollgate_e2e::prometheus::{promtool_bin, Prometheus};
use tollgate_e2e::scenario::{away_from_utc_midnight, fresh_client, sha256_hex, user, Stack};

const APP_KEY: &str = "tg-metrics-app-key";
const LIMITED_KEY: &str = "tg-metrics-limited-key";
const KEY_A: &str = "sk-metrics-provider-a";
const KEY_B: &str = "sk-metrics-provider-b";
const USED: MockUsage = MockUsage {
    prompt_tokens: 400,
    completion_tokens: 600,
};
/// 400 input tokens at $1/M and 600 output at $2/M, in millionths of a dollar.
const COST_MICRO_USD: f64 = 1_600.0;
/// Gauges and histograms reach Prometheus within a scrape after Envoy publishes them
/// (gauges every second, histograms every five).
const WITHIN: Duration = Duration::from_secs(30);

fn config(mock: &MockProvider) -> String {
    format!(
        r#"
consumers:
  - name: app
    keys: [{{ sha256: {app} }}]
    models: [gpt-4o-mini]
    limits: {{ daily_tokens: 100000 }}
  - name: limited
    keys: [{{ sha256: {limited} }}]
    models: [gpt-4o-mini]
    limits: {{ requests_per_minute: 1 }}
providers:
  - name: upstream
    kind: openai
    base_url: {base}
    retry: {{ attempts: 2 }}
    keys:
      - {{ id: key-a, secret_env: TG_METRICS_KEY_A }}
      - {{ id: key-b, secret_env: TG_METRICS_KEY_B }}
models:
  - name: gpt-4o-mini
    provider: upstream
    pricing: {{ input_per_million: 1.0, output_per_million: 2.0 }}
"#,
        app = sha256_hex(APP_KEY),
        limited = sha256_hex(LIMITED_KEY),
        base = mock.base_url(),
    )
}

async fn chat(f: &Stack, key: &str, stream: bool) -> (u16, String) {
    let r = fresh_client()
        .post(f.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({
            "model": "gpt-4o-mini",
            "max_tokens": 1000,
            "stream": stream,
            "messages": user("hi"),
        }))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.text().await.unwrap())
}

/// The known sequence, then what Prometheus holds.
async fn prometheus_sees_what_the_gateway_did(host: Host) {
    away_from_utc_midnight().await;
    let f = Stack::start(
        host,
        config,
        vec![("TG_METRICS_KEY_A", KEY_A), ("TG_METRICS_KEY_B", KEY_B)],
    )
    .await;
    let target = f.gateway.metrics_target().expect("a metrics endpoint");
    let prometheus = Prometheus::start(&[target]);
    f.mock.set_reply("counted", USED);
    // Key A answers every request with a 429: the request it gets is retried on key B, and
    // A cools down for a minute, so every later request goes to B.
    f.mock.set_fault(
        KEY_A,
        Fault::TooManyRequests {
            retry_after_secs: Some(60),
        },
    );

    for stream in [false, true, false] {
        let (status, body) = chat(&f, APP_KEY, stream).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = chat(&f, LIMITED_KEY, false).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = chat(&f, LIMITED_KEY, false).await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("rate_limit_exceeded"), "{body}");

    let p = &prometheus;
    let requests = |consumer: &str, code: &str| {
        format!(
            r#"sum(tollgate_requests_total{{consumer="{consumer}",model="gpt-4o-mini",provider="upstream",code="{code}"}})"#
        )
    };
    p.assert_eventually(&requests("app", "2xx"), 3.0, WITHIN)
        .await;
    p.assert_eventually(&requests("limited", "2xx"), 1.0, WITHIN)
        .await;
    p.assert_eventually(&requests("limited", "rate_limited"), 1.0, WITHIN)
        .await;
    // Tokens as the mock reported them, for the four answered requests, the stream's
    // included; none estimated.
    for (consumer, answered) in [("app", 3.0), ("limited", 1.0)] {
        for (kind, tokens) in [
            ("input", USED.prompt_tokens),
            ("output", USED.completion_tokens),
        ] {
            p.assert_eventually(
                &format!(
                    r#"sum(tollgate_tokens_total{{consumer="{consumer}",model="gpt-4o-mini",provider="upstream",kind="{kind}"}})"#
                ),
                answered * tokens as f64,
                WITHIN,
            )
            .await;
        }
    }
    let estimated = p.value("sum(tollgate_tokens_estimated_total)").await;
    assert!(matches!(estimated, None | Some(0.0)), "{estimated:?}");
    p.assert_eventually(
        r#"sum(tollgate_cost_micro_usd_total{consumer="app",model="gpt-4o-mini"})"#,
        3.0 * COST_MICRO_USD,
        WITHIN,
    )
    .await;
    if host == Host::Native {
        // Envoy's stats are integers: it has the micro-dollar twin only (docs/metrics.md).
        p.assert_eventually(
            r#"sum(tollgate_cost_usd_total{consumer="app",model="gpt-4o-mini"})"#,
            3.0 * COST_MICRO_USD / 1e6,
            WITHIN,
        )
        .await;
    }
    // The limit that refused, and where the limits stand.
    p.assert_eventually(
        r#"sum(tollgate_limit_refusals_total{scope="consumer:limited",limit="requests_per_minute"})"#,
        1.0,
        WITHIN,
    )
    .await;
    p.assert_eventually(
        r#"tollgate_limit_remaining{scope="consumer:limited",limit="requests_per_minute"}"#,
        0.0,
        WITHIN,
    )
    .await;
    let spent = 3.0 * USED.total_tokens() as f64;
    p.assert_eventually(
        r#"tollgate_limit_remaining{scope="consumer:app",limit="daily_tokens"}"#,
        100_000.0 - spent,
        WITHIN,
    )
    .await;
    p.assert_eventually(
        r#"tollgate_allowance_used_ppm{scope="consumer:app",limit="daily_tokens"}"#,
        spent / 100_000.0 * 1e6,
        WITHIN,
    )
    .await;
    if host == Host::Native {
        p.assert_eventually(
            r#"tollgate_allowance_used_ratio{scope="consumer:app",limit="daily_tokens"}"#,
            spent / 100_000.0,
            WITHIN,
        )
        .await;
    }
    // Keys: A cooling after its one 429, B healthy with every success.
    let key =
        |metric: &str, key: &str| format!(r#"sum({metric}{{provider="upstream",key="{key}"}})"#);
    p.assert_eventually(&key("tollgate_key_state", "key-a"), 1.0, WITHIN)
        .await;
    p.assert_eventually(&key("tollgate_key_state", "key-b"), 0.0, WITHIN)
        .await;
    let attempts = |key: &str, outcome: &str| {
        format!(
            r#"sum(tollgate_key_attempts_total{{provider="upstream",key="{key}",outcome="{outcome}"}})"#
        )
    };
    p.assert_eventually(&attempts("key-a", "rate_limited"), 1.0, WITHIN)
        .await;
    p.assert_eventually(&attempts("key-b", "succeeded"), 4.0, WITHIN)
        .await;
    let until = p
        .value(&key("tollgate_key_until_seconds", "key-a"))
        .await
        .unwrap();
    let now_s = tollgate_e2e::scenario::unix_ms() as f64 / 1e3;
    assert!(
        (now_s + 20.0..=now_s + 61.0).contains(&until),
        "key A cools until {until}, now {now_s}"
    );
    // Latency: every request under the model, the stream's first token once.
    p.assert_eventually(
        r#"sum(tollgate_request_duration_milliseconds_count{model="gpt-4o-mini",provider="upstream"})"#,
        5.0,
        WITHIN,
    )
    .await;
    p.assert_eventually(
        r#"sum(tollgate_time_to_first_token_milliseconds_count{model="gpt-4o-mini",provider="upstream"})"#,
        1.0,
        WITHIN,
    )
    .await;
    if host == Host::Native {
        p.assert_eventually(
            r#"sum(tollgate_request_duration_seconds_count{model="gpt-4o-mini",provider="upstream"})"#,
            5.0,
            WITHIN,
        )
        .await;
    }
    p.assert_eventually(r#"sum(tollgate_in_flight{consumer="app"})"#, 0.0, WITHIN)
        .await;

    // Labels are config names and codes only: no key in a scrape or in Prometheus.
    let scrape = f.gateway.scrape().expect("a scrape");
    for secret in [APP_KEY, LIMITED_KEY, KEY_A, KEY_B] {
        assert!(!scrape.contains(secret), "a scrape shows a secret");
    }
    let series = p.query(r#"{__name__=~"tollgate_.+"}"#).await;
    assert!(series.len() > 10, "{series:?}");
    let labels =
        serde_json::to_string(&series.iter().map(|s| &s.labels).collect::<Vec<_>>()).unwrap();
    for secret in [APP_KEY, LIMITED_KEY, KEY_A, KEY_B] {
        assert!(!labels.contains(secret), "Prometheus holds a secret");
    }
    assert!(
        !labels.contains("hi\""),
        "a client's text became a label: {labels}"
    );
}

/// A request for a model that does not exist is counted without the client's text as a
/// label; an unauthenticated one without a consumer.
async fn client_text_never_becomes_a_label(host: Host) {
    let f = Stack::start(
        host,
        config,
        vec![("TG_METRICS_KEY_A", KEY_A), ("TG_METRICS_KEY_B", KEY_B)],
    )
    .await;
    let r = fresh_client()
        .post(f.url("/v1/chat/completions"))
        .bearer_auth(APP_KEY)
        .json(&json!({ "model": "client-chosen-model-name", "messages": user("hi") }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = fresh_client()
        .post(f.url("/v1/chat/completions"))
        .bearer_auth("tg-not-a-consumer-key")
        .json(&json!({ "model": "gpt-4o-mini", "messages": user("hi") }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let deadline = std::time::Instant::now() + WITHIN;
    loop {
        let scrape = f.gateway.scrape().unwrap_or_default();
        let not_found = f.gateway.metric(
            "tollgate_requests_total",
            &[
                ("consumer", "app"),
                ("code", "model_not_found"),
                ("model", ""),
            ],
        );
        let unauthenticated = f.gateway.metric(
            "tollgate_requests_total",
            &[("consumer", ""), ("code", "unauthenticated")],
        );
        if not_found == Some(1.0) && unauthenticated == Some(1.0) {
            assert!(!scrape.contains("client-chosen"), "{scrape}");
            assert!(!scrape.contains("tg-not-a-consumer-key"));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{not_found:?} {unauthenticated:?}: {scrape}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

both_hosts!(
    prometheus_sees_what_the_gateway_did,
    client_text_never_becomes_a_label,
);

/// The metric names an expression uses: `tollgate_…` words.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("tollgate_") {
        let tail = rest.get(i..).unwrap_or_default();
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail.get(..end).unwrap_or_default().to_string());
        rest = tail.get(end..).unwrap_or_default();
    }
    names
}

/// Whether `name` is a series the gateways export: a family, or a histogram's
/// `_bucket`/`_sum`/`_count`.
fn exported(name: &str) -> bool {
    tollgate_core::metrics::FAMILIES.iter().any(|f| {
        f.name == name
            || (f.kind == tollgate_core::metrics::Kind::Histogram
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(f.name)))
    })
}

fn workspace_file(path: &str) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn the_shipped_alert_rules_are_valid_and_name_metrics_that_exist() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/alerts.yaml");
    let out = std::process::Command::new(promtool_bin())
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .expect("promtool runs (make prometheus-install)");
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&workspace_file("deploy/prometheus/alerts.yaml")).unwrap();
    let rules: Vec<&serde_yaml::Value> = rules["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules"))
        .collect();
    // Recording rules' names may be used by the alerts after them.
    let records: Vec<&str> = rules.iter().filter_map(|r| r["record"].as_str()).collect();
    let exprs: Vec<&str> = rules.iter().filter_map(|r| r["expr"].as_str()).collect();
    assert!(exprs.len() >= 6, "{exprs:?}");
    for expr in &exprs {
        let names = metric_names(expr);
        for name in &names {
            assert!(
                exported(name) || records.iter().any(|r| r.contains(name.as_str())),
                "{expr}: no metric {name}"
            );
        }
        let uses_a_record = records.iter().any(|r| expr.contains(r));
        assert!(
            !names.is_empty() || uses_a_record,
            "{expr} names no tollgate metric"
        );
    }
    let text = workspace_file("deploy/prometheus/alerts.yaml");
    for alert in [
        "TollgateAllowanceAbove80Percent",
        "TollgateAllowanceAbove95Percent",
        "TollgateProviderKeysExhausted",
        "TollgateProviderKeysAllCooling",
        "TollgateErrorRate",
        "TollgateLatencyP99",
    ] {
        assert!(
            text.contains(&format!("alert: {alert}")),
            "no alert {alert}"
        );
    }
}

#[test]
fn the_dashboard_queries_metrics_that_exist() {
    let dashboard: Value = serde_json::from_str(&workspace_file("deploy/grafana/tollgate.json"))
        .expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 8, "{exprs:?}");
    for expr in &exprs {
        for name in metric_names(expr) {
            assert!(exported(&name), "{expr}: no metric {name}");
        }
    }
}

fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}
