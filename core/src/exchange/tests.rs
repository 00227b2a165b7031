//! Transcript tests: events in, decisions out, compared as a list.

use super::*;
use crate::auth::KeyHash;
use crate::keys::KEY_RESERVATION_HEADER;
use crate::keys::{attempt_key, taken_over, KeyAttempt, Ticket};
use crate::store::tests::CellStore;

fn config() -> Arc<Config> {
    let text = format!(
        r#"
server: {{ max_body_bytes: 200 }}
consumers:
  - {{ name: app, keys: [{{ sha256: {} }}], models: [gpt-4o-mini, fast, mock-gpt] }}
providers:
  - name: openai
    kind: openai
    base_url: http://127.0.0.1:9/v1
    keys: [{{ id: a, secret_env: KEY_A }}, {{ id: b, secret_env: KEY_B }}]
  - {{ name: mock, kind: mock }}
models:
  - {{ name: gpt-4o-mini, provider: openai }}
  - {{ name: fast, provider: openai, upstream_model: gpt-4o-mini-2024 }}
  - {{ name: secret-model, provider: openai }}
  - {{ name: mock-gpt, provider: mock }}
"#,
        KeyHash::of("tg-app").to_hex()
    );
    let env = |k: &str| Some(format!("sk-{k}"));
    Arc::new(Config::load(&text, &env).unwrap())
}

enum Event<'a> {
    Head(&'a str, &'a str, &'a [(&'a str, &'a str)]),
    Body(&'a str),
    ResponseHead(u16),
    Chunk(&'a str, bool),
    Finish,
}

fn run(events: &[Event]) -> Vec<String> {
    run_with(config(), &CellStore::default(), events)
}

fn run_with(config: Arc<Config>, store: &CellStore, events: &[Event]) -> Vec<String> {
    let mut x = Exchange::new(config);
    events
        .iter()
        .map(|e| match e {
            Event::Head(method, path, hs) => {
                let headers: Vec<(String, String)> = hs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                let head = RequestHead {
                    method,
                    path,
                    headers: &headers,
                };
                match x.on_request_headers(1_000, &head, store) {
                    OnHeaders::Respond(r) => respond(&r),
                    OnHeaders::ReadBody { limit } => format!("read body up to {limit}"),
                }
            }
            Event::Body(b) => match x.on_request_body(2_000, b.as_bytes(), store) {
                OnBody::Respond(r) => respond(&r),
                OnBody::Forward(f) => format!(
                    "forward to provider {} at {} with {} body, {}={}",
                    f.provider,
                    f.path,
                    match &f.body {
                        None => "the client's".to_string(),
                        Some(b) => String::from_utf8_lossy(b).into_owned(),
                    },
                    f.route_header.0,
                    f.route_header.1,
                ),
            },
            Event::ResponseHead(s) => match x.on_response_headers(*s, &Vec::new(), store) {
                OnResponse::Relay {
                    status,
                    remove_headers,
                    add_headers,
                    body_rewritten,
                } => {
                    let mut line = format!("relay without {remove_headers:?}");
                    if let Some(s) = status {
                        line.push_str(&format!(" as {s}"));
                    }
                    for (k, v) in add_headers {
                        line.push_str(&format!(", {k}: {v}"));
                    }
                    if body_rewritten {
                        line.push_str(", body rewritten");
                    }
                    line
                }
                OnResponse::Replace(r) => format!("replace with {}", respond(&r)),
                OnResponse::Collect { limit } => format!("collect up to {limit}"),
            },
            Event::Chunk(c, end) => match x.on_response_chunk(c.as_bytes(), *end) {
                Chunk::Unchanged => "Unchanged".to_string(),
                Chunk::Replace(b) => format!("Replace({:?})", String::from_utf8_lossy(&b)),
            },
            // The same instant as the body: no refill in between, so figures are exact.
            Event::Finish => format!("{:?}", x.finish(2_000, store)),
        })
        .collect()
}

fn respond(r: &LocalResponse) -> String {
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    match v.get("error") {
        Some(e) => format!("respond {} {}", r.status, e["code"].as_str().unwrap()),
        None => format!("respond {} {}", r.status, v),
    }
}

const AUTH: (&str, &str) = ("authorization", "Bearer tg-app");
const CHAT: &str = "/v1/chat/completions";

#[test]
fn forwarded_completion() {
    let t = run(&[
        Event::Head(
            "POST",
            "/v1/chat/completions?trace=1",
            &[AUTH, ("content-length", "60")],
        ),
        Event::Body(r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#),
        Event::ResponseHead(200),
        Event::Chunk("{...", false),
        Event::Chunk("...}", true),
        Event::Finish,
    ]);
    assert_eq!(
        t,
        [
            "read body up to 200",
            "forward to provider 0 at /v1/chat/completions?trace=1 with the client's body, x-tollgate-provider=openai",
            &format!(
                "relay without {:?}, x-tollgate-model: gpt-4o-mini",
                crate::exchange::RELAY_REMOVE_HEADERS
            ),
            "Unchanged",
            "Unchanged",
            r#"Summary { consumer: Some("app"), model: Some("gpt-4o-mini"), requested_model: Some("gpt-4o-mini"), request_id: None, provider: Some("openai"), status: Some(200), stream: false, charged: None, usage_reported: false, code: "2xx", tokens: None, micro_usd: 0, usd: 0.0, refused_by: None }"#,
        ]
    );
}

#[test]
fn upstream_model_name_is_rewritten_and_stream_flag_seen() {
    let t = run(&[
        Event::Head("POST", CHAT, &[("x-api-key", "tg-app")]),
        Event::Body(
            r#"{"model":"fast","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        ),
    ]);
    assert_eq!(
        t[1],
        r#"forward to provider 0 at /v1/chat/completions with {"model":"gpt-4o-mini-2024","stream":true,"messages":[{"role":"user","content":"hi"}],"stream_options":{"include_usage":true}} body, x-tollgate-provider=openai"#
    );
}

#[test]
fn mock_provider_is_answered_in_place() {
    let t = run(&[
        Event::Head("POST", CHAT, &[("api-key", "tg-app")]),
        Event::Body(r#"{"model":"mock-gpt","messages":[{"role":"user","content":"ping"}]}"#),
        Event::Finish,
    ]);
    assert_eq!(t[0], "read body up to 200");
    assert!(t[1].starts_with("respond 200 "), "{}", t[1]);
    assert!(t[1].contains(r#""content":"You said: ping""#), "{}", t[1]);
    assert!(
        t[2].contains(r#"provider: Some("mock"), status: Some(200)"#),
        "{}",
        t[2]
    );
}

#[test]
fn refusals() {
    let cases: &[(&[Event], &str)] = &[
        (
            &[Event::Head("POST", CHAT, &[])],
            "respond 401 missing_api_key",
        ),
        (
            &[Event::Head(
                "POST",
                CHAT,
                &[("authorization", "Bearer nope")],
            )],
            "respond 401 invalid_api_key",
        ),
        (
            &[Event::Head(
                "POST",
                CHAT,
                &[AUTH, ("content-length", "201")],
            )],
            "respond 413 request_too_large",
        ),
        (
            &[Event::Head("GET", CHAT, &[AUTH])],
            "respond 405 method_not_allowed",
        ),
        (
            &[Event::Head("POST", "/v1/embeddings", &[AUTH])],
            "respond 404 not_found",
        ),
        (
            &[Event::Head("POST", CHAT, &[AUTH]), Event::Body("{nope")],
            "respond 400 invalid_request_body",
        ),
        (
            &[
                Event::Head("POST", CHAT, &[AUTH]),
                Event::Body(&"x".repeat(201)),
            ],
            "respond 413 request_too_large",
        ),
        (
            &[
                Event::Head("POST", CHAT, &[AUTH]),
                Event::Body(
                    r#"{"model":"secret-model","messages":[{"role":"user","content":"x"}]}"#,
                ),
            ],
            "respond 403 model_not_allowed",
        ),
        (
            &[
                Event::Head("POST", CHAT, &[AUTH]),
                Event::Body(r#"{"model":"gpt-5","messages":[{"role":"user","content":"x"}]}"#),
            ],
            "respond 404 model_not_found",
        ),
    ];
    for (events, want) in cases {
        let t = run(events);
        assert_eq!(t.last().map(String::as_str), Some(*want), "{t:?}");
    }
}

#[test]
fn a_provider_refusing_the_key_is_not_relayed() {
    for status in [401, 403] {
        let t = run(&[
            Event::Head("POST", CHAT, &[AUTH]),
            Event::Body(r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"x"}]}"#),
            Event::ResponseHead(status),
            Event::Finish,
        ]);
        assert_eq!(t[2], "replace with respond 502 upstream_auth_failed");
        assert!(t[3].contains("status: Some(502)"), "{}", t[3]);
    }
}

#[test]
fn gateway_headers_are_recognized_in_any_case() {
    use crate::http::is_gateway_header;
    for h in [
        "x-tollgate-provider",
        "X-Tollgate-Provider",
        "x-envoy-retry-on",
        "X-Envoy-Max-Retries",
    ] {
        assert!(is_gateway_header(h), "{h}");
    }
    for h in ["authorization", "x-envoy", "x-request-id", "é-envoy-x"] {
        assert!(!is_gateway_header(h), "{h}");
    }
}

#[test]
fn method_not_allowed_says_which_is() {
    let mut x = Exchange::new(config());
    let headers: Vec<(String, String)> = vec![];
    let head = RequestHead {
        method: "DELETE",
        path: "/v1/models",
        headers: &headers,
    };
    let OnHeaders::Respond(r) = x.on_request_headers(0, &head, &CellStore::default()) else {
        panic!()
    };
    assert_eq!(r.status, 405);
    assert!(r.headers.contains(&("allow", "GET".to_string())));
}

#[test]
fn a_refusal_is_summarized_with_its_status() {
    let t = run(&[
        Event::Head("POST", CHAT, &[("authorization", "Bearer nope")]),
        Event::Finish,
    ]);
    assert_eq!(
        t[1],
        "Summary { consumer: None, model: None, requested_model: None, request_id: None, provider: None, status: Some(401), stream: false, charged: None, usage_reported: false, code: \"unauthenticated\", tokens: None, micro_usd: 0, usd: 0.0, refused_by: None }"
    );
}

#[test]
fn models_list_and_health() {
    let t = run(&[Event::Head("GET", "/v1/models", &[AUTH])]);
    let v: serde_json::Value =
        serde_json::from_str(t[0].strip_prefix("respond 200 ").unwrap()).unwrap();
    let ids: Vec<_> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["gpt-4o-mini", "fast", "mock-gpt"]);
    assert_eq!(
        run(&[Event::Head("GET", "/v1/models", &[])]),
        ["respond 401 missing_api_key"]
    );
    assert_eq!(
        run(&[Event::Head("GET", "/healthz", &[])]),
        [r#"respond 200 {"status":"ok"}"#]
    );
}

#[test]
fn a_body_without_headers_first_is_refused_not_panicked() {
    assert_eq!(
        run(&[Event::Body("{}")]),
        ["respond 400 invalid_request_body"]
    );
}

#[test]
fn key_role_injects_keys_in_turn_and_refuses_unrouted_requests() {
    let c = config();
    let store = CellStore::default();
    let picks: Vec<_> = (0..4)
        .map(|_| {
            let a = attempt_key(&c, &ticket("openai", "gpt-4o-mini", 0), &store, 0).unwrap();
            (
                a.key_id().unwrap().to_string(),
                a.header().unwrap().1.to_string(),
            )
        })
        .collect();
    assert_eq!(
        picks,
        [
            ("a".to_string(), "Bearer sk-KEY_A".to_string()),
            ("b".to_string(), "Bearer sk-KEY_B".to_string()),
            ("a".to_string(), "Bearer sk-KEY_A".to_string()),
            ("b".to_string(), "Bearer sk-KEY_B".to_string()),
        ]
    );
    assert_eq!(
        attempt_key(&c, &ticket("", "gpt-4o-mini", 0), &store, 0).unwrap_err(),
        GatewayError::NotRoutedByGateway
    );
    assert_eq!(
        attempt_key(&c, &ticket("nope", "gpt-4o-mini", 0), &store, 0).unwrap_err(),
        GatewayError::NotRoutedByGateway
    );
    // The mock provider never goes upstream, so the key role has nothing to do for it.
    assert_eq!(
        attempt_key(&c, &ticket("mock", "gpt-4o-mini", 0), &store, 0).unwrap_err(),
        GatewayError::NotRoutedByGateway
    );
    assert!(KeyAttempt::REMOVE_HEADERS.contains(&"x-tollgate-provider"));
    assert!(KeyAttempt::REMOVE_HEADERS.contains(&"x-api-key"));
}

// ---- limits -----------------------------------------------------------------------------

fn limited_config(limits: &str, pricing: &str) -> Arc<Config> {
    let text = format!(
        r#"
consumers:
  - name: app
    keys: [{{ sha256: {} }}]
    models: ["*"]
    limits: {limits}
providers:
  - {{ name: openai, kind: openai, base_url: "http://127.0.0.1:9/v1", keys: [{{ id: a, secret_env: A }}] }}
  - {{ name: mock, kind: mock }}
models:
  - {{ name: gpt-4o-mini, provider: openai, default_max_tokens: 100 {pricing} }}
  - {{ name: mock-gpt, provider: mock, default_max_tokens: 100 {pricing} }}
"#,
        KeyHash::of("tg-app").to_hex()
    );
    Arc::new(Config::load(&text, &|_| Some("sk".into())).unwrap())
}

const SMALL: &str =
    r#"{"model":"gpt-4o-mini","max_tokens":20,"messages":[{"role":"user","content":"hi"}]}"#;

/// Sends SMALL and gets a successful response head: the head's transcript line shows the
/// headroom left.
fn admit_small(config: Arc<Config>, store: &CellStore) -> Vec<String> {
    run_with(
        config,
        store,
        &[
            Event::Head("POST", CHAT, &[AUTH]),
            Event::Body(SMALL),
            Event::ResponseHead(200),
        ],
    )
}

/// Estimated prompt tokens of SMALL.
fn prompt_hi() -> u64 {
    use crate::tokens::*;
    PER_REQUEST_OVERHEAD + PER_MESSAGE_OVERHEAD + estimate_text("hi")
}

/// What SMALL reserves: its prompt estimate and its max_tokens.
fn reserved_small() -> u64 {
    prompt_hi() + 20
}

#[test]
fn tokens_are_reserved_then_settled_on_reported_usage() {
    let config = limited_config("{ tokens_per_minute: 1000, requests_per_minute: 10 }", "");
    let store = CellStore::default();
    let completion =
        r#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}"#;
    let t = run_with(
        Arc::clone(&config),
        &store,
        &[
            Event::Head("POST", CHAT, &[AUTH]),
            Event::Body(SMALL),
            Event::ResponseHead(200),
            Event::Chunk(completion, true),
            Event::Finish,
        ],
    );
    let r = reserved_small();
    assert!(
        t[2].contains(&format!(
            "x-ratelimit-limit-tokens: 1000, x-ratelimit-remaining-tokens: {}",
            1000 - r
        )),
        "{}",
        t[2]
    );
    assert!(
        t[2].contains("x-ratelimit-remaining-requests: 9"),
        "{}",
        t[2]
    );
    assert!(t[4].contains("charged: Some(Amounts { requests: 1, tokens: 10, micro_usd: 0 }), usage_reported: true"), "{}", t[4]);
    // Settled on 10: the next request sees 1000 - 10 - its own reservation left.
    let t = admit_small(config, &store);
    assert!(
        t[2].contains(&format!("x-ratelimit-remaining-tokens: {}", 1000 - 10 - r)),
        "{}",
        t[2]
    );
}

#[test]
fn a_request_that_does_not_fit_now_gets_429_and_one_that_never_fits_400() {
    // Room for one SMALL, not two.
    let config = limited_config(
        &format!("{{ tokens_per_minute: {} }}", 2 * reserved_small() - 1),
        "",
    );
    let store = CellStore::default();
    let first = run_with(
        Arc::clone(&config),
        &store,
        &[Event::Head("POST", CHAT, &[AUTH]), Event::Body(SMALL)],
    );
    assert!(first[1].starts_with("forward"), "{first:?}");
    let second = run_with(
        Arc::clone(&config),
        &store,
        &[Event::Head("POST", CHAT, &[AUTH]), Event::Body(SMALL)],
    );
    assert_eq!(second[1], "respond 429 rate_limit_exceeded");
    let huge =
        r#"{"model":"gpt-4o-mini","max_tokens":5000,"messages":[{"role":"user","content":"hi"}]}"#;
    let third = run_with(
        config,
        &store,
        &[Event::Head("POST", CHAT, &[AUTH]), Event::Body(huge)],
    );
    assert_eq!(third[1], "respond 400 request_exceeds_limit");
}

#[test]
fn the_429_says_when_to_retry_from_the_bucket() {
    let r = reserved_small();
    let limit = 2 * r - 1;
    let config = limited_config(&format!("{{ tokens_per_minute: {limit} }}"), "");
    let store = CellStore::default();
    let mut x = Exchange::new(Arc::clone(&config));
    let headers: Vec<(String, String)> = vec![("authorization".into(), "Bearer tg-app".into())];
    let head = RequestHead {
        method: "POST",
        path: CHAT,
        headers: &headers,
    };
    let _ = x.on_request_headers(0, &head, &store);
    let _ = x.on_request_body(0, SMALL.as_bytes(), &store);
    let mut y = Exchange::new(config);
    let _ = y.on_request_headers(0, &head, &store);
    let OnBody::Respond(resp) = y.on_request_body(0, SMALL.as_bytes(), &store) else {
        panic!()
    };
    // One reservation of r is taken from 2r - 1: the next fits once one more token has
    // refilled, i.e. after a minute / limit, rounded up to the millisecond.
    let wait_ms = (60_000u64 * 1_000_000).div_ceil(limit).div_ceil(1_000_000);
    let get = |n: &str| {
        resp.headers
            .iter()
            .find(|(k, _)| *k == n)
            .map(|(_, v)| v.clone())
    };
    let resp = &resp;
    assert_eq!(resp.status, 429);
    let got: u64 = get("retry-after-ms").unwrap().parse().unwrap();
    assert!(got.abs_diff(wait_ms) <= 1, "{got} vs {wait_ms}");
    assert_eq!(get("retry-after").unwrap(), got.div_ceil(1_000).to_string());
}

#[test]
fn a_stream_is_charged_its_usage_and_the_forced_usage_chunk_is_hidden() {
    let config = limited_config("{ tokens_per_minute: 1000 }", "");
    let store = CellStore::default();
    let body = r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":20,"messages":[{"role":"user","content":"hi"}]}"#;
    let content =
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}],\"usage\":null}\n\n";
    let usage = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}}\n\n";
    let usage_split = usage.split_at(30);
    let t = run_with(
        config,
        &store,
        &[
            Event::Head("POST", CHAT, &[AUTH]),
            Event::Body(body),
            Event::ResponseHead(200),
            Event::Chunk(content, false),
            Event::Chunk(usage_split.0, false),
            Event::Chunk(usage_split.1, false),
            Event::Chunk("data: [DONE]\n\n", true),
            Event::Finish,
        ],
    );
    assert!(
        t[1].contains(r#""stream_options":{"include_usage":true}"#),
        "{}",
        t[1]
    );
    assert!(t[2].ends_with("body rewritten"), "{}", t[2]);
    // Whole events kept as they came are relayed unchanged (no copy back into the host).
    assert_eq!(t[3], "Unchanged");
    assert_eq!(t[4], "Replace(\"\")");
    assert_eq!(t[5], "Replace(\"\")", "the usage chunk is dropped");
    assert_eq!(t[6], "Unchanged");
    assert!(t[7].contains("tokens: 9"), "{}", t[7]);
}

#[test]
fn a_stream_cut_before_its_usage_is_charged_what_was_streamed() {
    let config = limited_config("{ tokens_per_minute: 1000 }", "");
    let store = CellStore::default();
    let body = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#;
    let text = "a".repeat(40);
    let content =
        format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}\"}}}}]}}\n\n");
    let t = run_with(
        config,
        &store,
        &[
            Event::Head("POST", CHAT, &[AUTH]),
            Event::Body(body),
            Event::ResponseHead(200),
            Event::Chunk(&content, false),
            Event::Finish,
        ],
    );
    assert_eq!(
        t[3], "Unchanged",
        "the client asked for usage: nothing to hide"
    );
    // Prompt estimate (3 + 3 + 1) plus the streamed text's estimate.
    let streamed = crate::tokens::estimate_text(&text);
    assert!(
        t[4].contains(&format!("tokens: {}", 7 + streamed)),
        "{}",
        t[4]
    );
    assert!(t[4].contains("usage_reported: false"), "{}", t[4]);
}

#[test]
fn failed_requests_are_refunded_and_free_their_slot() {
    let config = limited_config("{ tokens_per_minute: 1000, concurrency: 1 }", "");
    let store = CellStore::default();
    let t = run_with(
        Arc::clone(&config),
        &store,
        &[
            Event::Head("POST", CHAT, &[AUTH]),
            Event::Body(SMALL),
            Event::ResponseHead(503),
            Event::Finish,
        ],
    );
    assert!(t[3].contains("tokens: 0"), "{}", t[3]);
    let t = admit_small(config, &store);
    assert!(
        t[2].contains(&format!(
            "x-ratelimit-remaining-tokens: {}",
            1000 - reserved_small()
        )),
        "{}",
        t[2]
    );
}

#[test]
fn a_daily_cost_budget_runs_out_at_the_right_request() {
    // $1 per million input and output tokens: 27 reserved tokens cost 27 millionths.
    let config = limited_config(
        "{ daily_cost_usd: 0.0001 }",
        ", pricing: { input_per_million: 1.0, output_per_million: 1.0 }",
    );
    let store = CellStore::default();
    let mock =
        r#"{"model":"mock-gpt","max_tokens":20,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut statuses = Vec::new();
    for _ in 0..20 {
        let t = run_with(
            Arc::clone(&config),
            &store,
            &[
                Event::Head("POST", CHAT, &[AUTH]),
                Event::Body(mock),
                Event::Finish,
            ],
        );
        statuses.push(if t[1].starts_with("respond 200") {
            200
        } else {
            429
        });
        if statuses.last() == Some(&429) {
            assert_eq!(t[1], "respond 429 quota_exhausted");
            break;
        }
    }
    // At $1 per million tokens a token costs one millionth. The mock bills its prompt
    // estimate plus "You said: hi"; each request reserves the prompt estimate plus 20.
    // Requests are admitted while what was billed plus one reservation fits in 100.
    let billed = prompt_hi() + crate::tokens::estimate_text("You said: hi").max(1);
    let reserved = reserved_small();
    let mut expected = 0;
    while expected * billed + reserved <= 100 {
        expected += 1;
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count() as u64,
        expected,
        "{statuses:?}"
    );
}

#[test]
fn keys_with_no_room_are_skipped_and_a_full_pool_says_when_to_retry() {
    let text = format!(
        r#"
consumers: [{{ name: app, keys: [{{ sha256: {} }}], models: ["*"] }}]
providers:
  - name: openai
    kind: openai
    base_url: "http://127.0.0.1:9/v1"
    keys:
      - {{ id: a, secret_env: A, limits: {{ tokens_per_minute: 100 }} }}
      - {{ id: b, secret_env: B, limits: {{ tokens_per_minute: 300 }} }}
models: [{{ name: m, provider: openai }}]
"#,
        KeyHash::of("tg-app").to_hex()
    );
    let c = Config::load(&text, &|_| Some("sk".into())).unwrap();
    let store = CellStore::default();
    let pick = |tokens| {
        attempt_key(&c, &ticket("openai", "m", tokens), &store, 0)
            .map(|a| a.key_id().map(str::to_string))
    };
    // Turns alternate a, b; a has room for one 80-token request only.
    assert_eq!(pick(80).unwrap().as_deref(), Some("a"));
    assert_eq!(pick(80).unwrap().as_deref(), Some("b"));
    assert_eq!(
        pick(80).unwrap().as_deref(),
        Some("b"),
        "a is full: its turn goes to b"
    );
    assert_eq!(pick(80).unwrap().as_deref(), Some("b"));
    let Err(GatewayError::RateLimited {
        scope,
        retry_after_ms,
        ..
    }) = pick(80)
    else {
        panic!()
    };
    assert!(scope.contains("every key of provider `openai`"));
    // Key a (100/min) has 20 left and needs 60 more: 36 s; b (300/min) needs 20: 4 s.
    assert_eq!(retry_after_ms, 4_000);
    assert!(matches!(
        pick(500),
        Err(GatewayError::ExceedsLimit { capacity: 300, .. })
    ));
}

#[test]
fn a_key_reservation_handed_over_is_settled_with_the_exchange() {
    let text = format!(
        r#"
consumers: [{{ name: app, keys: [{{ sha256: {} }}], models: ["*"] }}]
providers:
  - {{ name: openai, kind: openai, base_url: "http://127.0.0.1:9/v1", keys: [{{ id: a, secret_env: A, limits: {{ tokens_per_minute: 1000 }} }}] }}
models: [{{ name: gpt-4o-mini, provider: openai }}]
"#,
        KeyHash::of("tg-app").to_hex()
    );
    let c = Arc::new(Config::load(&text, &|_| Some("sk".into())).unwrap());
    let store = CellStore::default();
    // The gateway role: the request is estimated although the consumer has no limits.
    let (mut x, f) = forwarded_small(&c, &store);
    assert_eq!(f.ticket.tokens, reserved_small());
    assert_eq!(f.ticket.model, "gpt-4o-mini");
    assert_eq!(
        Ticket::decode(f.ticket.encode().as_bytes()),
        Some(f.ticket.clone())
    );
    // The key role reserves on key a and hands the reservation over in a response header.
    let a = attempt_key(&c, &f.ticket, &store, 0).unwrap();
    let handover = a.handover().unwrap().header(&a.reservation);
    // With where key a's token bucket stood after it (the slot a refund is limited to), and
    // no concurrency slots.
    let (head, slot_end) = handover.trim_end_matches('/').rsplit_once('/').unwrap();
    assert_eq!(head, format!("openai/a/1/{}/0", reserved_small()));
    assert!(handover.ends_with('/'), "{handover}");
    assert!(slot_end.parse::<u64>().unwrap() > 0, "{handover}");
    assert!(taken_over(&c, "openai/zz/1/5/0", &store).is_none());
    assert!(
        taken_over(&c, "openai/a/1/5", &store).is_none(),
        "malformed"
    );
    let response = vec![(KEY_RESERVATION_HEADER.to_string(), handover)];
    let OnResponse::Relay { remove_headers, .. } = x.on_response_headers(200, &response, &store)
    else {
        panic!()
    };
    assert!(remove_headers.contains(&KEY_RESERVATION_HEADER));
    let usage = r#"{"usage":{"prompt_tokens":4,"completion_tokens":6,"total_tokens":10}}"#;
    let _ = x.on_response_chunk(usage.as_bytes(), true);
    let _ = x.finish(0, &store);
    // Key a was charged 10 tokens in all: 990 left for the next demand.
    let next = attempt_key(&c, &ticket("openai", "gpt-4o-mini", 990), &store, 0);
    assert!(next.is_ok());
    let full = attempt_key(&c, &ticket("openai", "gpt-4o-mini", 1), &store, 0);
    assert!(full.is_err());
}

#[test]
fn what_cannot_be_known_is_charged_at_the_reservation() {
    let config = limited_config("{ tokens_per_minute: 1000 }", "");
    let r = reserved_small();
    // The client left before the provider answered: the provider still bills.
    let store = CellStore::default();
    let t = run_with(
        Arc::clone(&config),
        &store,
        &[
            Event::Head("POST", CHAT, &[AUTH]),
            Event::Body(SMALL),
            Event::Finish,
        ],
    );
    assert!(t[2].contains(&format!("tokens: {r}")), "{}", t[2]);
    // A success whose body has no readable usage.
    let store = CellStore::default();
    let t = run_with(
        config,
        &store,
        &[
            Event::Head("POST", CHAT, &[AUTH]),
            Event::Body(SMALL),
            Event::ResponseHead(200),
            Event::Chunk("{\"choices\":[]}", true),
            Event::Finish,
        ],
    );
    assert!(t[4].contains(&format!("tokens: {r}")), "{}", t[4]);
}

#[test]
fn a_huge_unfinished_event_is_not_held_back_forever() {
    let config = limited_config("{ tokens_per_minute: 100000 }", "");
    let store = CellStore::default();
    let body = r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":20,"messages":[{"role":"user","content":"hi"}]}"#;
    let big = format!("data: {}", "x".repeat(300 * 1024));
    let t = run_with(
        config,
        &store,
        &[
            Event::Head("POST", CHAT, &[AUTH]),
            Event::Body(body),
            Event::ResponseHead(200),
            Event::Chunk(&big, false),
            Event::Chunk("more", false),
        ],
    );
    // Nothing was held before it: the event goes out as it came, not held back.
    assert_eq!(t[3], "Unchanged", "held back");
    assert_eq!(t[4], "Unchanged", "stripping stops once it gave up");
}

/// A ticket for the key role, as the gateway role would write it.
fn ticket(provider: &str, model: &str, tokens: u64) -> Ticket {
    Ticket {
        provider: provider.into(),
        model: model.into(),
        tokens,
        started_ms: 0,
        tried: Vec::new(),
        attempts_before: 0,
        chain: Vec::new(),
        current: None,
        first_provider: None,
    }
}

#[test]
fn a_key_role_reply_gets_its_real_status_back() {
    let c = config();
    let store = CellStore::default();
    let (mut x, _) = forwarded_small(&c, &store);
    // Through Envoy's router it travels as 400 (never retried), marked with its status.
    let reply = crate::http::test_headers(&[(
        crate::http::LOCAL_REPLY_HEADER,
        &crate::http::FinalAnswer::KeyRole(429, Some("keys_cooling")).marker(),
    )]);
    let OnResponse::Relay {
        status,
        remove_headers,
        ..
    } = x.on_response_headers(crate::http::LOCAL_REPLY_CARRIER_STATUS, &reply, &store)
    else {
        panic!()
    };
    assert!(remove_headers.contains(&crate::http::LOCAL_REPLY_HEADER));
    assert_eq!(status, Some(429));
    assert_eq!(x.finish(0, &store).status, Some(429));
}

#[test]
fn a_provider_answer_made_final_is_handled_as_the_provider_answered() {
    let c = config();
    let store = CellStore::default();
    let marked = |status: u16| {
        crate::http::test_headers(&[
            (
                crate::http::LOCAL_REPLY_HEADER,
                &crate::http::FinalAnswer::Provider(status).marker(),
            ),
            ("content-type", "application/json"),
        ])
    };
    // A 500 after the retry budget: relayed under its own status, marker removed.
    let (mut x, _) = forwarded_small(&c, &store);
    let OnResponse::Relay {
        status,
        remove_headers,
        ..
    } = x.on_response_headers(
        crate::http::LOCAL_REPLY_CARRIER_STATUS,
        &marked(500),
        &store,
    )
    else {
        panic!()
    };
    assert_eq!(status, Some(500));
    assert!(remove_headers.contains(&crate::http::LOCAL_REPLY_HEADER));
    assert_eq!(x.finish(0, &store).status, Some(500));
    // A refused key stays the gateway's problem, whatever carried the answer.
    let (mut x, _) = forwarded_small(&c, &store);
    let OnResponse::Replace(r) = x.on_response_headers(
        crate::http::LOCAL_REPLY_CARRIER_STATUS,
        &marked(401),
        &store,
    ) else {
        panic!()
    };
    assert_eq!(r.status, 502);
}

#[test]
fn a_provider_error_that_is_not_json_becomes_an_openai_error_with_its_status() {
    let c = config();
    let store = CellStore::default();
    for (status, content_type, replaced) in [
        (502, "text/html", true),
        (503, "text/plain; charset=utf-8", true),
        (500, "application/json; charset=utf-8", false),
        (429, "application/json", false),
        (200, "text/html", false),
    ] {
        let (mut x, _) = forwarded_small(&c, &store);
        let headers = crate::http::test_headers(&[("content-type", content_type)]);
        match x.on_response_headers(status, &headers, &store) {
            OnResponse::Replace(r) => {
                assert!(replaced, "{status} {content_type}");
                assert_eq!(r.status, status);
                let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                assert_eq!(v["error"]["code"], "upstream_error");
                assert!(v["error"]["message"].as_str().unwrap().contains("not JSON"));
            }
            OnResponse::Relay { .. } => assert!(!replaced, "{status} {content_type}"),
            OnResponse::Collect { .. } => panic!("collected"),
        }
    }
}

/// An exchange of `app` that forwarded the small chat request, and how it forwarded it.
fn forwarded_small(c: &Arc<Config>, store: &CellStore) -> (Exchange, crate::exchange::Forward) {
    let mut x = Exchange::new(Arc::clone(c));
    let headers = crate::http::test_headers(&[("authorization", "Bearer tg-app")]);
    let _ = x.on_request_headers(
        0,
        &RequestHead {
            method: "POST",
            path: CHAT,
            headers: &headers,
        },
        store,
    );
    let OnBody::Forward(f) = x.on_request_body(0, SMALL.as_bytes(), store) else {
        panic!("not forwarded")
    };
    (x, f)
}

/// Whatever a provider streams, the exchange holds no more than `MAX_HELD_EVENT` of one
/// event: one never-ending event (16 MiB, no line end) on a stream relayed as it is, on one
/// stripped of its usage chunk, and on a Messages passthrough.
#[test]
fn a_never_ending_event_is_never_held_whole() {
    let config = limited_config("{ tokens_per_minute: 100000000 }", "");
    let store = CellStore::default();
    let piece = "x".repeat(64 * 1024);
    for wants_usage in [true, false] {
        let body = format!(
            r#"{{"model":"gpt-4o-mini","stream":true,"max_tokens":20,{}"messages":[{{"role":"user","content":"hi"}}]}}"#,
            if wants_usage {
                r#""stream_options":{"include_usage":true},"#
            } else {
                ""
            }
        );
        let mut x = Exchange::new(Arc::clone(&config));
        let headers = crate::http::test_headers(&[AUTH]);
        let _ = x.on_request_headers(
            0,
            &RequestHead {
                method: "POST",
                path: CHAT,
                headers: &headers,
            },
            &store,
        );
        let OnBody::Forward(_) = x.on_request_body(0, body.as_bytes(), &store) else {
            panic!("not forwarded")
        };
        let _ = x.on_response_headers(200, &crate::http::test_headers(&[]), &store);
        let _ = x.on_response_chunk(b"data: ", false);
        for _ in 0..256 {
            let _ = x.on_response_chunk(piece.as_bytes(), false);
            let held = x.sse.as_ref().map_or(0, |s| s.pending());
            assert!(held <= MAX_HELD_EVENT + piece.len(), "{held} bytes held");
        }
        // The stream still ends, and is settled.
        let _ = x.on_response_chunk(b"\n\n", true);
        let summary = x.finish(0, &store);
        assert_eq!(summary.status, Some(200));
    }
}

/// A chain of OpenAI `smart`, then Anthropic `claude` (whose own limit allows one request a
/// day), then the in-gateway `mock-gpt`.
fn chain_config(fallbacks: &str) -> Arc<Config> {
    let text = format!(
        r#"
consumers:
  - {{ name: app, keys: [{{ sha256: {} }}], models: ["*"] }}
providers:
  - {{ name: openai, kind: openai, base_url: "http://127.0.0.1:9/v1", keys: [{{ id: a, secret_env: A }}] }}
  - {{ name: claude, kind: anthropic, keys: [{{ id: c, secret_env: C }}] }}
  - {{ name: mock, kind: mock }}
models:
  - {{ name: smart, provider: openai, fallbacks: {fallbacks}, limits: {{ daily_tokens: 100000 }} }}
  - {{ name: claude, provider: claude, limits: {{ requests_per_day: 1 }} }}
  - {{ name: mock-gpt, provider: mock }}
"#,
        KeyHash::of("tg-app").to_hex()
    );
    Arc::new(Config::load(&text, &|_| Some("sk".into())).unwrap())
}

fn routed_smart(c: &Arc<Config>, store: &CellStore) -> (Exchange, crate::exchange::Forward) {
    let mut x = Exchange::new(Arc::clone(c));
    let headers = crate::http::test_headers(&[AUTH]);
    let head = RequestHead {
        method: "POST",
        path: CHAT,
        headers: &headers,
    };
    let _ = x.on_request_headers(0, &head, store);
    let body = r#"{"model":"smart","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;
    let OnBody::Forward(f) = x.on_request_body(0, body.as_bytes(), store) else {
        panic!()
    };
    (x, f)
}

#[test]
fn a_failover_moves_the_model_limits_and_reads_the_answer_as_the_fallbacks() {
    let c = chain_config("[claude]");
    let store = CellStore::default();
    let (mut x, f) = routed_smart(&c, &store);
    assert!(x.has_chain());
    let Some(OnBody::Forward(next)) = x.fail_over(0, &store, &f.ticket) else {
        panic!()
    };
    assert_eq!(
        (next.ticket.provider.as_str(), next.ticket.model.as_str()),
        ("claude", "claude")
    );
    assert_eq!(next.path, "/v1/messages");
    // Read as Anthropic's answer, named as the fallback.
    let OnResponse::Collect { .. } = x.on_response_headers(200, &Vec::new(), &store) else {
        panic!("an Anthropic answer is read whole to be translated")
    };
    let answer = x.on_collected(
        br#"{"id":"m","type":"message","role":"assistant","model":"claude","content":[{"type":"text","text":"ok"}],"stop_reason":"end_turn","usage":{"input_tokens":3,"output_tokens":2}}"#,
    );
    assert!(answer
        .headers
        .contains(&(MODEL_HEADER, "claude".to_string())));
    let s = x.finish(0, &store);
    assert_eq!(
        (s.model.as_deref(), s.requested_model.as_deref()),
        (Some("claude"), Some("smart"))
    );
    // smart's allowance got its reservation back; claude's one request a day is spent.
    let (mut y, f) = routed_smart(&c, &store);
    assert_eq!(
        y.fail_over(0, &store, &f.ticket),
        None,
        "claude's limit refuses"
    );
    let _ = y.finish(0, &store);
}

#[test]
fn a_fallback_that_cannot_take_the_request_leaves_the_exchange_as_it_was() {
    let c = chain_config("[claude]");
    let store = CellStore::default();
    // Spend claude's one request of the day.
    let (mut used, f) = routed_smart(&c, &store);
    let _ = used.fail_over(0, &store, &f.ticket);
    let _ = used.finish(0, &store);
    let (mut x, f) = routed_smart(&c, &store);
    assert_eq!(x.fail_over(0, &store, &f.ticket), None);
    // The primary's failure is still answered as the primary's: an OpenAI body relayed.
    let OnResponse::Relay { add_headers, .. } = x.on_response_headers(500, &Vec::new(), &store)
    else {
        panic!("relayed as OpenAI's")
    };
    assert!(add_headers.contains(&(MODEL_HEADER, "smart".to_string())));
    let s = x.finish(0, &store);
    assert_eq!(s.model.as_deref(), Some("smart"));
}

#[test]
fn a_mock_fallback_answers_at_once() {
    let c = chain_config("[mock-gpt]");
    let store = CellStore::default();
    let (mut x, f) = routed_smart(&c, &store);
    let Some(OnBody::Respond(r)) = x.fail_over(0, &store, &f.ticket) else {
        panic!()
    };
    assert_eq!(r.status, 200);
    assert!(r.headers.contains(&(MODEL_HEADER, "mock-gpt".to_string())));
    assert!(x.finish(0, &store).usage_reported);
}

/// Any time: these requests are far below their limits' windows.
const METRICS_NOW: u64 = 1_795_341_600_000;

#[test]
fn a_stream_cut_without_limits_still_gives_its_metrics_estimated_tokens() {
    // `{}`: no limit meters the request, yet its tokens are counted for the metrics.
    let config = limited_config(
        "{}",
        ", pricing: { input_per_million: 1.0, output_per_million: 2.0 }",
    );
    let store = CellStore::default();
    let body =
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let text = "a".repeat(40);
    let content =
        format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}\"}}}}]}}\n\n");
    let mut x = Exchange::new(config);
    let head = RequestHead {
        method: "POST",
        path: CHAT,
        headers: &[("authorization".to_string(), "Bearer tg-app".to_string())][..],
    };
    let _ = x.on_request_headers(METRICS_NOW, &head, &store);
    let _ = x.on_request_body(METRICS_NOW, body.as_bytes(), &store);
    let _ = x.on_response_headers(200, &Vec::<(String, String)>::new(), &store);
    let _ = x.on_response_chunk(content.as_bytes(), false);
    let summary = x.finish(METRICS_NOW, &store);
    assert!(summary.charged.is_none(), "nothing metered");
    let tokens = summary.tokens.expect("estimated tokens");
    assert!(tokens.estimated);
    assert_eq!(tokens.usage.prompt_tokens, 7);
    assert_eq!(
        tokens.usage.completion_tokens,
        crate::tokens::estimate_text(&text)
    );
    assert_eq!(summary.code, "2xx");
    let cost = 7.0 + 2.0 * tokens.usage.completion_tokens as f64;
    assert!((summary.usd - cost / 1e6).abs() < 1e-12, "{}", summary.usd);
    assert_eq!(summary.micro_usd, cost as u64);
}

#[test]
fn a_limit_refusal_names_the_limit_and_its_scope_for_metrics() {
    let config = limited_config("{ requests_per_minute: 1 }", "");
    let store = CellStore::default();
    let summary = |store: &CellStore| {
        let mut x = Exchange::new(Arc::clone(&config));
        let head = RequestHead {
            method: "POST",
            path: CHAT,
            headers: &[("authorization".to_string(), "Bearer tg-app".to_string())][..],
        };
        let _ = x.on_request_headers(METRICS_NOW, &head, store);
        let _ = x.on_request_body(METRICS_NOW, SMALL.as_bytes(), store);
        x.finish(METRICS_NOW, store)
    };
    let first = summary(&store);
    assert_eq!(first.refused_by, None);
    let second = summary(&store);
    assert_eq!(second.code, "rate_limited");
    assert_eq!(
        second.refused_by,
        Some(("consumer:app".into(), "requests_per_minute"))
    );
    let f = second.figures();
    assert_eq!(
        (f.consumer, f.model, f.provider),
        ("app", "gpt-4o-mini", "openai")
    );
    assert_eq!(f.refused_by, Some(("consumer:app", "requests_per_minute")));
}

#[test]
fn a_key_role_refusal_keeps_its_metric_code() {
    let config = limited_config("{}", "");
    let store = CellStore::default();
    let mut x = Exchange::new(config);
    let head = RequestHead {
        method: "POST",
        path: CHAT,
        headers: &[("authorization".to_string(), "Bearer tg-app".to_string())][..],
    };
    let _ = x.on_request_headers(METRICS_NOW, &head, &store);
    let _ = x.on_request_body(METRICS_NOW, SMALL.as_bytes(), &store);
    let marker = crate::http::FinalAnswer::KeyRole(429, Some("keys_cooling")).marker();
    let headers = vec![(crate::http::LOCAL_REPLY_HEADER.to_string(), marker)];
    let _ = x.on_response_headers(400, &headers, &store);
    let summary = x.finish(METRICS_NOW, &store);
    assert_eq!((summary.status, summary.code), (Some(429), "keys_cooling"));
    // A marker with an unknown code is read as its status class.
    assert_eq!(
        crate::http::FinalAnswer::parse("key 429 made-up"),
        Some(crate::http::FinalAnswer::KeyRole(429, None))
    );
}
