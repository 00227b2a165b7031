//! Transcript tests: events in, decisions out, compared as a list.

use super::*;
use crate::auth::KeyHash;
use crate::keys::{attempt_key, KeyAttempt};
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
    let mut x = Exchange::new(config());
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
                match x.on_request_headers(1_000, &head) {
                    OnHeaders::Respond(r) => respond(&r),
                    OnHeaders::ReadBody { limit } => format!("read body up to {limit}"),
                }
            }
            Event::Body(b) => match x.on_request_body(2_000, b.as_bytes()) {
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
            Event::ResponseHead(s) => match x.on_response_headers(*s, &Vec::new()) {
                OnResponse::Relay { remove_headers } => format!("relay without {remove_headers:?}"),
                OnResponse::Replace(r) => format!("replace with {}", respond(&r)),
            },
            Event::Chunk(c, end) => format!("{:?}", x.on_response_chunk(c.as_bytes(), *end)),
            Event::Finish => format!("{:?}", x.finish(3_000)),
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
            r#"relay without ["openai-organization", "openai-project", "set-cookie"]"#,
            "Unchanged",
            "Unchanged",
            r#"Summary { consumer: Some("app"), model: Some("gpt-4o-mini"), provider: Some("openai"), status: Some(200), stream: false }"#,
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
        r#"forward to provider 0 at /v1/chat/completions with {"model":"gpt-4o-mini-2024","stream":true,"messages":[{"role":"user","content":"hi"}]} body, x-tollgate-provider=openai"#
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
    let OnHeaders::Respond(r) = x.on_request_headers(0, &head) else {
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
        "Summary { consumer: None, model: None, provider: None, status: Some(401), stream: false }"
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
            let a = attempt_key(&c, Some("openai"), &store).unwrap();
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
        attempt_key(&c, None, &store).unwrap_err(),
        GatewayError::NotRoutedByGateway
    );
    assert_eq!(
        attempt_key(&c, Some("nope"), &store).unwrap_err(),
        GatewayError::NotRoutedByGateway
    );
    // The mock provider never goes upstream, so the key role has nothing to do for it.
    assert_eq!(
        attempt_key(&c, Some("mock"), &store).unwrap_err(),
        GatewayError::NotRoutedByGateway
    );
    assert!(KeyAttempt::REMOVE_HEADERS.contains(&"x-tollgate-provider"));
    assert!(KeyAttempt::REMOVE_HEADERS.contains(&"x-api-key"));
}
