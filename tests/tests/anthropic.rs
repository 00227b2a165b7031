//! Anthropic models behind the gateway's OpenAI front door, in both hosts: requests
//! translated into Messages requests, answers (JSON and SSE, tools included) and errors
//! translated back, limits charged the provider's own usage. The mock speaks Anthropic's
//! Messages API as the real one does.

use std::sync::Arc;

use serde_json::{json, Value};
use tollgate_e2e::both_hosts;
use tollgate_e2e::gateway::Host;
use tollgate_e2e::mock_provider::{
    AnthropicUsage, Fault, LineEnding, MockProvider, StreamStyle, Writes, DEFAULT_CONTENT,
};
use tollgate_e2e::scenario::{
    assert_error, away_from_utc_midnight, run_sdk_script, sha256_hex, sse_data, stream_text, user,
    Stack,
};

const APP_KEY: &str = "tg-claude-app-key";
const KEY_A: &str = "sk-ant-test-aaaa";
const KEY_B: &str = "sk-ant-test-bbbb";

fn config(mock: &MockProvider, limits: &str) -> String {
    format!(
        r#"
consumers:
  - name: app
    keys: [{{ sha256: {app} }}]
    models: [claude-sonnet]
    limits: {limits}
providers:
  - name: claude
    kind: anthropic
    base_url: {base}
    retry: {{ attempts: 2, backoff_ms: 10, max_backoff_ms: 20 }}
    keys:
      - {{ id: claude-a, secret_env: TG_CLAUDE_KEY_A }}
      - {{ id: claude-b, secret_env: TG_CLAUDE_KEY_B }}
models:
  - name: claude-sonnet
    provider: claude
    upstream_model: claude-sonnet-4-5
    default_max_tokens: 1024
    pricing: {{ input_per_million: 3.0, output_per_million: 15.0 }}
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
    async fn start(host: Host, limits: &str) -> Fixture {
        let limits = limits.to_string();
        let env = vec![("TG_CLAUDE_KEY_A", KEY_A), ("TG_CLAUDE_KEY_B", KEY_B)];
        Fixture(Stack::start(host, move |mock| config(mock, &limits), env).await)
    }

    async fn post(&self, body: Value) -> reqwest::Response {
        self.http
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(APP_KEY)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    async fn chat(&self, body: Value) -> (u16, Value) {
        let r = self.post(body).await;
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        (status, v)
    }

    fn fault_all_keys(&self, fault: Fault) {
        for key in [KEY_A, KEY_B] {
            self.mock.set_fault(key, fault.clone());
        }
    }
}

fn weather_tool() -> Value {
    json!([{ "type": "function", "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": { "type": "object", "properties": { "location": { "type": "string" } } },
    }}])
}

/// A plain chat request reaches Anthropic as a Messages request (path, key header, version,
/// model, max_tokens, system), and its answer comes back as a chat completion with the usage
/// in OpenAI's terms (cache reads and writes counted as prompt tokens).
async fn a_chat_request_is_a_messages_request_and_back(host: Host) {
    let f = Fixture::start(host, "{}").await;
    f.mock.set_anthropic_usage(AnthropicUsage {
        input_tokens: 20,
        output_tokens: 7,
        cache_creation_input_tokens: 3,
        cache_read_input_tokens: 100,
    });
    let (status, v) = f
        .chat(
            json!({ "model": "claude-sonnet", "temperature": 0.5, "stop": "END", "messages": [
                { "role": "system", "content": "Be brief." },
                { "role": "user", "content": "hi" },
            ]}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "claude-sonnet");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], DEFAULT_CONTENT);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], 123, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 7);
    assert_eq!(v["usage"]["total_tokens"], 130);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 100);

    let seen = f.mock.requests();
    assert_eq!(seen.len(), 1);
    let req = &seen[0];
    assert_eq!(req.path, "/v1/messages");
    assert_eq!(
        req.header("x-api-key").map(|k| k == KEY_A || k == KEY_B),
        Some(true)
    );
    assert_eq!(
        req.header("authorization"),
        None,
        "no consumer credential upstream"
    );
    assert_eq!(req.header("anthropic-version"), Some("2023-06-01"));
    let body = req.json();
    assert_eq!(body["model"], "claude-sonnet-4-5");
    assert_eq!(body["max_tokens"], 1024, "the model's default_max_tokens");
    assert_eq!(body["temperature"], 0.5);
    assert_eq!(body["stop_sequences"], json!(["END"]));
    assert!(body["system"].to_string().contains("Be brief."), "{body}");
    assert_eq!(body["messages"][0]["role"], "user");
    assert!(body["messages"][0].to_string().contains("hi"), "{body}");
    // Anthropic's own rate-limit headers describe the account behind the key.
    let r = f
        .post(json!({ "model": "claude-sonnet", "messages": user("hi") }))
        .await;
    assert!(
        r.headers()
            .keys()
            .all(|k| !k.as_str().starts_with("anthropic-ratelimit")),
        "{:?}",
        r.headers()
    );
}

/// A client's own `anthropic-version` is the one sent.
async fn the_clients_anthropic_version_is_honoured(host: Host) {
    let f = Fixture::start(host, "{}").await;
    let r = f
        .http
        .post(f.url("/v1/chat/completions"))
        .bearer_auth(APP_KEY)
        .header("anthropic-version", "2023-01-01")
        .header("anthropic-beta", "prompt-caching-2024-07-31")
        .json(&json!({ "model": "claude-sonnet", "messages": user("hi") }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = f.mock.requests();
    assert_eq!(seen[0].header("anthropic-version"), Some("2023-01-01"));
    assert_eq!(
        seen[0].header("anthropic-beta"),
        Some("prompt-caching-2024-07-31")
    );
}

/// A streamed answer is translated event by event: the client sees OpenAI chunks, the
/// usage chunk only when it asked, and `[DONE]`; however the provider frames its stream.
async fn a_messages_stream_is_a_chat_stream(host: Host) {
    let f = Fixture::start(host, "{}").await;
    let crlf_split = StreamStyle {
        line_ending: LineEnding::CrLf,
        keep_alive: true,
        writes: Writes::Split { bytes: 3 },
        ..StreamStyle::default()
    };
    for style in [StreamStyle::default(), crlf_split] {
        for key in [KEY_A, KEY_B] {
            f.mock.set_stream_style(key, style);
        }
        for include_usage in [false, true] {
            let r = f
                .post(json!({
                    "model": "claude-sonnet", "stream": true, "messages": user("hi"),
                    "stream_options": { "include_usage": include_usage },
                }))
                .await;
            assert_eq!(r.status(), 200);
            assert!(r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream"));
            let text = r.text().await.unwrap();
            let events = sse_data(&text);
            assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
            assert_eq!(stream_text(&events), DEFAULT_CONTENT, "{style:?}: {text}");
            let chunks: Vec<Value> = events[..events.len() - 1]
                .iter()
                .map(|e| serde_json::from_str(e).unwrap())
                .collect();
            assert!(chunks
                .iter()
                .all(|c| c["object"] == "chat.completion.chunk"));
            assert!(chunks.iter().all(|c| c["model"] == "claude-sonnet"));
            let finish: Vec<&Value> = chunks
                .iter()
                .filter_map(|c| c["choices"][0]["finish_reason"].as_str().map(|_| c))
                .collect();
            assert_eq!(finish.len(), 1, "{text}");
            assert_eq!(finish[0]["choices"][0]["finish_reason"], "stop");
            let usage: Vec<&Value> = chunks.iter().filter(|c| c["usage"].is_object()).collect();
            assert_eq!(usage.len(), usize::from(include_usage), "{text}");
            if include_usage {
                assert_eq!(usage[0]["choices"], json!([]));
                assert!(usage[0]["usage"]["total_tokens"].as_u64().unwrap() > 0);
            }
        }
    }
}

/// Tools: OpenAI `tools` go out as Anthropic tools, a `tool_use` answer comes back as
/// `tool_calls` (plain and streamed, arguments as a JSON string), and the tool's result goes
/// back as a `tool_result`.
async fn tool_calls_go_both_ways(host: Host) {
    let f = Fixture::start(host, "{}").await;
    f.mock
        .set_tool_input(json!({ "location": "Paris", "unit": "celsius" }));
    let ask = json!({ "model": "claude-sonnet", "tools": weather_tool(), "tool_choice": "required",
        "messages": user("What is the weather in Paris?") });
    let (status, v) = f.chat(ask.clone()).await;
    assert_eq!(status, 200, "{v}");
    let sent = f.mock.requests()[0].json();
    assert_eq!(sent["tools"][0]["name"], "get_weather");
    assert_eq!(sent["tools"][0]["input_schema"]["type"], "object");
    assert_eq!(sent["tool_choice"], json!({ "type": "any" }));
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    let call = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({ "location": "Paris", "unit": "celsius" }));
    let id = call["id"].as_str().unwrap().to_string();

    // Streamed: the arguments arrive in fragments under one index, id and name.
    let mut stream = ask.clone();
    stream["stream"] = json!(true);
    let text = f.post(stream).await.text().await.unwrap();
    let events = sse_data(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
    let mut arguments = String::new();
    let mut names = Vec::new();
    let mut finish = None;
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        for call in c["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            assert_eq!(call["index"], 0, "{text}");
            if let Some(name) = call["function"]["name"].as_str() {
                names.push(name.to_string());
            }
            arguments.push_str(call["function"]["arguments"].as_str().unwrap_or(""));
        }
        if let Some(reason) = c["choices"][0]["finish_reason"].as_str() {
            finish = Some(reason.to_string());
        }
    }
    assert_eq!(names, ["get_weather"], "{text}");
    assert_eq!(
        serde_json::from_str::<Value>(&arguments).unwrap(),
        args,
        "{text}"
    );
    assert_eq!(finish.as_deref(), Some("tool_calls"));

    // The result goes back as a tool_result; the model answers in text.
    let (status, v) = f
        .chat(
            json!({ "model": "claude-sonnet", "tools": weather_tool(), "messages": [
                { "role": "user", "content": "What is the weather in Paris?" },
                { "role": "assistant", "content": null, "tool_calls": [call.clone()] },
                { "role": "tool", "tool_call_id": id, "content": "Sunny, 21 C" },
            ]}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], DEFAULT_CONTENT);
    let sent = f.mock.requests().last().unwrap().json();
    let last = &sent["messages"][sent["messages"].as_array().unwrap().len() - 1];
    assert_eq!(last["role"], "user");
    assert_eq!(last["content"][0]["type"], "tool_result", "{sent}");
    assert_eq!(last["content"][0]["tool_use_id"], id.as_str());
}

/// What Anthropic cannot honour is refused with 400 naming the parameter, before anything
/// goes upstream.
async fn parameters_anthropic_cannot_honour_are_refused(host: Host) {
    let f = Fixture::start(host, "{}").await;
    for (param, extra) in [
        ("n", json!({ "n": 2 })),
        ("logprobs", json!({ "logprobs": true })),
    ] {
        let mut body = json!({ "model": "claude-sonnet", "messages": user("hi") });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, v) = f.chat(body).await;
        assert_error(status, &v, 400, "unsupported_parameter");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
    assert!(f.mock.requests().is_empty());
}

/// Anthropic's errors reach the OpenAI client in OpenAI's shape: a rate limit on every key
/// is 429, an overloaded provider 503 (Anthropic's 529 means nothing to OpenAI clients).
async fn anthropic_errors_become_openai_errors(host: Host) {
    let f = Fixture::start(host, "{}").await;
    f.fault_all_keys(Fault::Overloaded);
    let (status, v) = f
        .chat(json!({ "model": "claude-sonnet", "messages": user("hi") }))
        .await;
    assert_eq!(status, 503, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    assert!(v["error"]["type"].is_string(), "{v}");
    assert_eq!(f.mock.requests().len(), 2, "retried on the other key");
    let f = Fixture::start(host, "{}").await;
    f.mock.set_fault(KEY_A, Fault::ServerError { status: 500 });
    f.mock.set_fault(KEY_B, Fault::ServerError { status: 500 });
    let (status, v) = f
        .chat(json!({ "model": "claude-sonnet", "messages": user("hi") }))
        .await;
    assert_eq!(status, 500, "{v}");
    assert_eq!(v["error"]["type"], "api_error", "{v}");
}

/// Limits hold on the Anthropic path: a stream is charged the provider's usage (cache reads
/// and writes included), exactly, on an allowance that does not refill.
async fn limits_charge_anthropic_usage(host: Host) {
    away_from_utc_midnight().await;
    let f = Fixture::start(host, "{ daily_tokens: 1000000 }").await;
    f.mock.set_anthropic_usage(AnthropicUsage {
        input_tokens: 0,
        output_tokens: 0,
        cache_creation_input_tokens: 0,
        cache_read_input_tokens: 0,
    });
    let left = |r: &reqwest::Response| -> u64 {
        r.headers()["x-ratelimit-remaining-tokens"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    let before = left(
        &f.post(json!({ "model": "claude-sonnet", "max_tokens": 10, "messages": user("hi") }))
            .await,
    );
    f.mock.set_anthropic_usage(AnthropicUsage {
        input_tokens: 1_000,
        output_tokens: 500,
        cache_creation_input_tokens: 200,
        cache_read_input_tokens: 300,
    });
    for stream in [false, true] {
        let r = f
            .post(json!({ "model": "claude-sonnet", "stream": stream, "max_tokens": 10, "messages": user("hi") }))
            .await;
        assert_eq!(r.status(), 200);
        let _ = r.text().await.unwrap();
    }
    f.mock.set_anthropic_usage(AnthropicUsage {
        input_tokens: 0,
        output_tokens: 0,
        cache_creation_input_tokens: 0,
        cache_read_input_tokens: 0,
    });
    let after = left(
        &f.post(json!({ "model": "claude-sonnet", "max_tokens": 10, "messages": user("hi") }))
            .await,
    );
    assert_eq!(before - after, 2 * 2_000, "{before} then {after}");
}

/// 50 clients at once against a token limit that does not refill while the test runs:
/// what is admitted on the Anthropic path stays within the limit plus one reservation.
async fn concurrent_clients_stay_within_the_token_limit(host: Host) {
    const LIMIT: u64 = 1_000;
    let f = Arc::new(Fixture::start(host, &format!("{{ tokens_per_day: {LIMIT} }}")).await);
    f.mock.set_anthropic_usage(AnthropicUsage {
        input_tokens: 40,
        output_tokens: 60,
        cache_creation_input_tokens: 0,
        cache_read_input_tokens: 0,
    });
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let f = Arc::clone(&f);
            tokio::spawn(async move {
                let body =
                    json!({ "model": "claude-sonnet", "max_tokens": 80, "messages": user("hi") });
                tollgate_e2e::scenario::fresh_client()
                    .post(f.url("/v1/chat/completions"))
                    .bearer_auth(APP_KEY)
                    .json(&body)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let mut admitted = 0u64;
    for t in tasks {
        match t.await.unwrap() {
            200 => admitted += 1,
            429 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(f.mock.requests().len() as u64, admitted);
    assert!(admitted * 100 <= LIMIT + 100, "{admitted} admitted");
    assert!(admitted >= LIMIT / 100, "{admitted} admitted");
    f.assert_every_worker_served();
}

/// The official `openai` Python SDK against an Anthropic model: plain, streamed, tools.
async fn openai_sdk_against_an_anthropic_model(host: Host) {
    let f = Fixture::start(host, "{}").await;
    let base = format!("{}/v1", f.gateway.base_url());
    let v = run_sdk_script("openai_tools.py", &[&base, APP_KEY, "claude-sonnet"]).await;
    assert_eq!(v["content"], DEFAULT_CONTENT, "{v}");
    assert_eq!(v["finish_reason"], "stop");
    assert_eq!(v["streamed"], DEFAULT_CONTENT);
    assert_eq!(v["stream_finish_reason"], "stop");
    assert_eq!(v["usage_chunks"], 1);
    assert_eq!(v["tool_finish_reason"], "tool_calls");
    assert_eq!(v["tool_call"]["name"], "get_weather");
    assert_eq!(v["tool_call"]["arguments"], json!({ "location": "Paris" }));
    assert_eq!(v["streamed_tool_calls"][0]["name"], "get_weather");
    assert_eq!(
        v["streamed_tool_calls"][0]["arguments"],
        json!({ "location": "Paris" })
    );
    assert_eq!(v["streamed_tool_finish_reason"], "tool_calls");
    assert_eq!(v["after_tool"], DEFAULT_CONTENT);
}

/// Anthropic's mid-stream `error` event reaches the OpenAI client as an error chunk after
/// what came before, and the stream ends without `[DONE]`: it must not look complete.
async fn a_mid_stream_error_event_ends_the_chat_stream_incomplete(host: Host) {
    let f = Fixture::start(host, "{}").await;
    for key in [KEY_A, KEY_B] {
        f.mock.set_stream_style(
            key,
            StreamStyle {
                error_after: Some(5),
                ..StreamStyle::default()
            },
        );
    }
    let r = f
        .post(json!({ "model": "claude-sonnet", "stream": true, "messages": user("hi") }))
        .await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let events = sse_data(&text);
    assert!(!events.iter().any(|e| e == "[DONE]"), "{text}");
    let last: Value = serde_json::from_str(events.last().expect("events")).unwrap();
    assert_eq!(last["error"]["code"], "overloaded", "{text}");
    assert!(
        !stream_text(&events).is_empty(),
        "what came before was relayed: {text}"
    );
    assert_eq!(
        f.mock.requests().len(),
        1,
        "not retried after the first byte"
    );
}

both_hosts!(
    a_mid_stream_error_event_ends_the_chat_stream_incomplete,
    a_chat_request_is_a_messages_request_and_back,
    the_clients_anthropic_version_is_honoured,
    a_messages_stream_is_a_chat_stream,
    tool_calls_go_both_ways,
    parameters_anthropic_cannot_honour_are_refused,
    anthropic_errors_become_openai_errors,
    limits_charge_anthropic_usage,
    concurrent_clients_stay_within_the_token_limit,
    openai_sdk_against_an_anthropic_model,
);
