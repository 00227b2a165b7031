//! Anthropic clients on the gateway's `POST /v1/messages`, in both hosts: passed through to
//! Anthropic models, translated to and from OpenAI-compatible ones, every refusal in
//! Anthropic's error shape, limits charged the provider's usage; and the official `anthropic`
//! SDK against both kinds of model.

use serde_json::{json, Value};
use tollgate_e2e::both_hosts;
use tollgate_e2e::gateway::Host;
use tollgate_e2e::mock_provider::{
    AnthropicUsage, Fault, MockProvider, MockUsage, DEFAULT_CONTENT,
};
use tollgate_e2e::scenario::{away_from_utc_midnight, run_sdk_script, sha256_hex, Stack};

const APP_KEY: &str = "tg-messages-app-key";
const CLAUDE_KEY: &str = "sk-ant-messages";
const OPENAI_KEY: &str = "sk-openai-messages";

fn config(mock: &MockProvider, limits: &str) -> String {
    format!(
        r#"
consumers:
  - name: app
    keys: [{{ sha256: {app} }}]
    models: [claude-sonnet, gpt-4o-mini, mock-gpt, claude-decorated]
    prompts: ["*"]
    limits: {limits}
providers:
  - name: claude
    kind: anthropic
    base_url: {base}
    keys: [{{ id: claude-1, secret_env: TG_MSG_CLAUDE_KEY }}]
  - name: openai
    kind: openai
    base_url: {base}
    keys: [{{ id: openai-1, secret_env: TG_MSG_OPENAI_KEY }}]
  - name: mock
    kind: mock
models:
  - {{ name: claude-sonnet, provider: claude, upstream_model: claude-sonnet-4-5 }}
  - {{ name: gpt-4o-mini, provider: openai, upstream_model: gpt-4o-mini-2024-07-18 }}
  - {{ name: mock-gpt, provider: mock }}
  - name: claude-decorated
    provider: claude
    upstream_model: claude-sonnet-4-5
    decorators:
      prepend: [{{ role: system, content: "Answer in French." }}]
      append: [{{ role: user, content: "(Keep it short.)" }}]
prompts:
  - name: greet
    versions:
      - version: 1
        model: claude-sonnet
        response: text
        params: {{ max_tokens: 50 }}
        variables: [{{ name: who, type: string, max_length: 100 }}]
        messages:
          - {{ role: system, content: "Greet the person named between <who> tags." }}
          - {{ role: user, content: "<who>{{{{who}}}}</who>" }}
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
        let env = vec![
            ("TG_MSG_CLAUDE_KEY", CLAUDE_KEY),
            ("TG_MSG_OPENAI_KEY", OPENAI_KEY),
        ];
        Fixture(Stack::start(host, move |mock| config(mock, &limits), env).await)
    }

    /// A Messages request as the SDK sends it (key in `x-api-key`, a version header).
    async fn send(&self, key: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url("/v1/messages"))
            .header("x-api-key", key)
            .header("anthropic-version", "2023-06-01")
            .json(body)
            .send()
            .await
            .unwrap()
    }

    async fn message(&self, body: Value) -> (u16, Value) {
        let r = self.send(APP_KEY, &body).await;
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        (status, v)
    }
}

fn hello(model: &str) -> Value {
    json!({ "model": model, "max_tokens": 100, "messages": [{ "role": "user", "content": "hi" }] })
}

/// Asserts Anthropic's error shape with this status and error type.
fn assert_anthropic_error(status: u16, v: &Value, want_status: u16, want_type: &str) {
    assert_eq!(status, want_status, "{v}");
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], want_type, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
}

/// The Events of an Anthropic SSE body: (event name, data).
fn events(text: &str) -> Vec<(String, Value)> {
    text.replace("\r\n", "\n")
        .split("\n\n")
        .filter_map(|block| {
            let mut name = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data = serde_json::from_str(v.trim()).ok();
                }
            }
            Some((name?, data?))
        })
        .collect()
}

/// To an Anthropic model the request goes as it came (the model renamed, the key swapped),
/// and the answer comes back as the provider sent it.
async fn a_message_to_an_anthropic_model_is_passed_through(host: Host) {
    let f = Fixture::start(host, "{}").await;
    let body = json!({ "model": "claude-sonnet", "max_tokens": 77, "top_k": 5,
        "system": [{ "type": "text", "text": "Be brief.", "cache_control": { "type": "ephemeral" } }],
        "messages": [{ "role": "user", "content": "hi" }] });
    let (status, v) = f.message(body.clone()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["type"], "message");
    assert_eq!(v["content"][0]["text"], DEFAULT_CONTENT);
    let seen = f.mock.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/v1/messages");
    assert_eq!(seen[0].header("x-api-key"), Some(CLAUDE_KEY));
    let mut want = body;
    want["model"] = json!("claude-sonnet-4-5");
    assert_eq!(seen[0].json(), want, "nothing but the model changed");
}

/// Streams are passed through too, byte for byte.
async fn a_stream_to_an_anthropic_model_is_passed_through(host: Host) {
    let f = Fixture::start(host, "{}").await;
    let mut body = hello("claude-sonnet");
    body["stream"] = json!(true);
    let r = f.send(APP_KEY, &body).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let names: Vec<String> = events(&text).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names.first().map(String::as_str),
        Some("message_start"),
        "{text}"
    );
    assert_eq!(
        names.last().map(String::as_str),
        Some("message_stop"),
        "{text}"
    );
    let streamed: String = events(&text)
        .iter()
        .filter_map(|(_, d)| d["delta"]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(streamed, DEFAULT_CONTENT);
}

/// To an OpenAI-compatible model a Messages request is translated (system, max_tokens,
/// model mapped), and the chat completion comes back as a Messages answer, streamed or not.
async fn a_message_to_an_openai_model_is_translated_both_ways(host: Host) {
    let f = Fixture::start(host, "{}").await;
    let mut body = hello("gpt-4o-mini");
    body["system"] = json!("Be brief.");
    let (status, v) = f.message(body.clone()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["model"], "gpt-4o-mini");
    assert_eq!(
        v["content"],
        json!([{ "type": "text", "text": DEFAULT_CONTENT }])
    );
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["usage"]["input_tokens"], 10, "{v}");
    assert_eq!(v["usage"]["output_tokens"], 5);
    let sent = f.mock.requests()[0].clone();
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_eq!(
        sent.header("authorization"),
        Some(format!("Bearer {OPENAI_KEY}").as_str())
    );
    let sent = sent.json();
    assert_eq!(sent["model"], "gpt-4o-mini-2024-07-18");
    assert_eq!(sent["max_completion_tokens"], 100);
    assert_eq!(
        sent["messages"][0],
        json!({ "role": "system", "content": "Be brief." })
    );

    body["stream"] = json!(true);
    let r = f.send(APP_KEY, &body).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let events = events(&text);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"message_start"), "{text}");
    assert_eq!(names.last(), Some(&"message_stop"), "{text}");
    let streamed: String = events
        .iter()
        .filter_map(|(_, d)| d["delta"]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(streamed, DEFAULT_CONTENT);
    let delta = events
        .iter()
        .find(|(n, _)| n == "message_delta")
        .expect("message_delta");
    assert_eq!(delta.1["delta"]["stop_reason"], "end_turn");
    assert_eq!(delta.1["usage"]["output_tokens"], 5, "{text}");
}

/// Every refusal on this endpoint is in Anthropic's shape, the gateway's own included, with
/// `retry-after` on a 429.
async fn refusals_on_the_messages_endpoint_are_anthropic_shaped(host: Host) {
    let f = Fixture::start(host, "{ requests_per_minute: 2 }").await;
    let r = f.send("tg-wrong", &hello("claude-sonnet")).await;
    let status = r.status().as_u16();
    assert_anthropic_error(
        status,
        &r.json().await.unwrap(),
        401,
        "authentication_error",
    );
    let (status, v) = f.message(hello("no-such-model")).await;
    assert_anthropic_error(status, &v, 404, "not_found_error");
    let (status, v) = f.message(json!({ "model": "claude-sonnet" })).await;
    assert_anthropic_error(status, &v, 400, "invalid_request_error");
    let (status, v) = f
        .message(
            json!({ "model": "gpt-4o-mini", "max_tokens": 10, "top_k": 3,
            "messages": [{ "role": "user", "content": "hi" }] }),
        )
        .await;
    assert_anthropic_error(status, &v, 400, "invalid_request_error");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("top_k"),
        "{v}"
    );
    // Two requests a minute: the third is refused, saying when to come back.
    for _ in 0..2 {
        assert_eq!(f.message(hello("mock-gpt")).await.0, 200);
    }
    let r = f.send(APP_KEY, &hello("mock-gpt")).await;
    assert!(r.headers().contains_key("retry-after"), "{:?}", r.headers());
    let status = r.status().as_u16();
    assert_anthropic_error(status, &r.json().await.unwrap(), 429, "rate_limit_error");
    let r = f.http.get(f.url("/v1/messages")).send().await.unwrap();
    let status = r.status().as_u16();
    assert_anthropic_error(
        status,
        &r.json().await.unwrap(),
        405,
        "invalid_request_error",
    );
}

/// A provider's refusal reaches an Anthropic client in Anthropic's shape: passed through
/// from Anthropic, translated from an OpenAI-compatible provider.
async fn provider_errors_reach_anthropic_clients_in_their_shape(host: Host) {
    let f = Fixture::start(host, "{}").await;
    f.mock.set_fault(CLAUDE_KEY, Fault::Overloaded);
    let (status, v) = f.message(hello("claude-sonnet")).await;
    assert_anthropic_error(status, &v, 529, "overloaded_error");
    f.mock
        .set_fault(OPENAI_KEY, Fault::ServerError { status: 500 });
    let (status, v) = f.message(hello("gpt-4o-mini")).await;
    assert_anthropic_error(status, &v, 500, "api_error");
}

/// Limits charge what the provider reports on both paths, streams included: exactly, on
/// an allowance that does not refill.
async fn limits_charge_the_providers_usage_on_the_messages_endpoint(host: Host) {
    away_from_utc_midnight().await;
    let f = Fixture::start(host, "{ daily_tokens: 1000000 }").await;
    let left = |r: &reqwest::Response| -> u64 {
        r.headers()["x-ratelimit-remaining-tokens"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    let free = AnthropicUsage {
        input_tokens: 0,
        output_tokens: 0,
        cache_creation_input_tokens: 0,
        cache_read_input_tokens: 0,
    };
    f.mock.set_anthropic_usage(free);
    f.mock.set_reply(
        DEFAULT_CONTENT,
        MockUsage {
            prompt_tokens: 0,
            completion_tokens: 0,
        },
    );
    let probe = |model: &'static str| {
        let f = &f;
        async move {
            let r = f.send(APP_KEY, &hello(model)).await;
            assert_eq!(r.status(), 200);
            left(&r)
        }
    };
    let before = probe("claude-sonnet").await;
    f.mock.set_anthropic_usage(AnthropicUsage {
        input_tokens: 1_000,
        output_tokens: 300,
        cache_creation_input_tokens: 100,
        cache_read_input_tokens: 600,
    });
    f.mock.set_reply(
        DEFAULT_CONTENT,
        MockUsage {
            prompt_tokens: 700,
            completion_tokens: 300,
        },
    );
    for model in ["claude-sonnet", "gpt-4o-mini"] {
        for stream in [false, true] {
            let mut body = hello(model);
            body["stream"] = json!(stream);
            let r = f.send(APP_KEY, &body).await;
            assert_eq!(r.status(), 200);
            let _ = r.text().await.unwrap();
        }
    }
    f.mock.set_anthropic_usage(free);
    f.mock.set_reply(
        DEFAULT_CONTENT,
        MockUsage {
            prompt_tokens: 0,
            completion_tokens: 0,
        },
    );
    let after = probe("claude-sonnet").await;
    // Claude: 1,000 + 100 + 600 in, 300 out; OpenAI: 700 + 300. Twice each.
    assert_eq!(
        before - after,
        2 * 2_000 + 2 * 1_000,
        "{before} then {after}"
    );
}

/// `count_tokens` is answered from the gateway's estimate; `GET /v1/models` serves both SDKs.
async fn token_counts_and_the_model_list(host: Host) {
    let f = Fixture::start(host, "{}").await;
    let r = f
        .http
        .post(f.url("/v1/messages/count_tokens"))
        .header("x-api-key", APP_KEY)
        .json(&json!({ "model": "claude-sonnet", "messages": [{ "role": "user", "content": "hello there, how are you today?" }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(v["input_tokens"].as_u64().unwrap() > 0, "{v}");
    assert!(f.mock.requests().is_empty(), "counted by the gateway");
    let v: Value = f
        .http
        .get(f.url("/v1/models"))
        .header("x-api-key", APP_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "claude-sonnet",
            "gpt-4o-mini",
            "mock-gpt",
            "claude-decorated"
        ]
    );
    assert_eq!(v["data"][0]["type"], "model");
    assert_eq!(v["data"][0]["object"], "model");
    assert_eq!(v["has_more"], false);
}

/// The official `anthropic` Python SDK: plain, streamed, tools, the tool's result, a token
/// count and an error, against an Anthropic model and an OpenAI-compatible one.
async fn anthropic_sdk(host: Host) {
    let f = Fixture::start(host, "{}").await;
    for model in ["claude-sonnet", "gpt-4o-mini"] {
        if model == "gpt-4o-mini" {
            f.mock.set_reply(
                DEFAULT_CONTENT,
                MockUsage {
                    prompt_tokens: 10,
                    completion_tokens: 5,
                },
            );
        }
        let base = f.gateway.base_url();
        let v = run_sdk_script("anthropic_messages.py", &[&base, APP_KEY, model]).await;
        assert_eq!(v["text"], DEFAULT_CONTENT, "{model}: {v}");
        assert_eq!(v["stop_reason"], "end_turn");
        assert_eq!(v["streamed"], DEFAULT_CONTENT);
        assert_eq!(v["streamed_stop_reason"], "end_turn");
        assert!(v["usage"]["input_tokens"].as_u64().unwrap() > 0, "{v}");
        assert!(v["count_tokens"].as_u64().unwrap() > 0);
        assert_eq!(
            v["error"],
            json!({ "status": 404, "type": "not_found_error" }),
            "{v}"
        );
        // From Claude as it answered; from the OpenAI model, its tool call translated.
        assert_eq!(v["tool_stop_reason"], "tool_use", "{model}: {v}");
        assert_eq!(
            v["tool_use"],
            json!({ "name": "get_weather", "input": { "location": "Paris" } }),
            "{model}: {v}"
        );
        assert_eq!(v["streamed_tool_use"], v["tool_use"], "{model}: {v}");
        assert_eq!(v["after_tool"], DEFAULT_CONTENT, "{model}: {v}");
    }
}

/// The official `openai` SDK with tools against an OpenAI-compatible model: the tool call
/// and its result go through the gateway untouched.
async fn openai_sdk_tools_on_an_openai_model(host: Host) {
    let f = Fixture::start(host, "{}").await;
    let base = format!("{}/v1", f.gateway.base_url());
    let v = run_sdk_script("openai_tools.py", &[&base, APP_KEY, "gpt-4o-mini"]).await;
    assert_eq!(v["content"], DEFAULT_CONTENT, "{v}");
    assert_eq!(v["tool_finish_reason"], "tool_calls", "{v}");
    assert_eq!(v["tool_call"]["arguments"], json!({ "location": "Paris" }));
    assert_eq!(
        v["streamed_tool_calls"][0]["arguments"],
        json!({ "location": "Paris" })
    );
    assert_eq!(v["streamed_tool_finish_reason"], "tool_calls");
    assert_eq!(v["after_tool"], DEFAULT_CONTENT);
}

/// Decorators reach Claude on both front doors: added to the Messages request passed
/// through (system prompt first, the user note in the last user turn), and through the
/// hub for chat clients.
async fn decorators_reach_anthropic_models_on_both_front_doors(host: Host) {
    let f = Fixture::start(host, "{}").await;
    let (status, v) = f.message(hello("claude-decorated")).await;
    assert_eq!(status, 200, "{v}");
    let sent = f.mock.requests()[0].json();
    assert_eq!(sent["model"], "claude-sonnet-4-5");
    assert_eq!(
        sent["system"],
        json!([{ "type": "text", "text": "Answer in French." }]),
        "{sent}"
    );
    assert_eq!(
        sent["messages"],
        json!([{ "role": "user", "content": [
            { "type": "text", "text": "hi" },
            { "type": "text", "text": "(Keep it short.)" },
        ]}]),
        "{sent}"
    );
    let r = f
        .http
        .post(f.url("/v1/chat/completions"))
        .bearer_auth(APP_KEY)
        .json(&json!({ "model": "claude-decorated", "messages": [{ "role": "user", "content": "hi" }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let sent = f.mock.requests()[1].json();
    assert!(
        sent["system"].to_string().contains("Answer in French."),
        "{sent}"
    );
    assert!(
        sent["messages"].to_string().contains("(Keep it short.)"),
        "{sent}"
    );
}

/// A prompt template on a Claude model: rendered, translated, and its answer shaped, plain
/// and streamed.
async fn a_prompt_template_runs_on_an_anthropic_model(host: Host) {
    let f = Fixture::start(host, "{}").await;
    let r = f
        .http
        .post(f.url("/v1/prompts/greet"))
        .bearer_auth(APP_KEY)
        .json(&json!({ "who": "Ada" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v, json!({ "output": DEFAULT_CONTENT }));
    let sent = f.mock.requests()[0].json();
    assert_eq!(sent["model"], "claude-sonnet-4-5");
    assert_eq!(sent["max_tokens"], 50);
    assert!(
        sent["messages"].to_string().contains("<who>Ada</who>"),
        "{sent}"
    );
    let r = f
        .http
        .post(f.url("/v1/prompts/greet?stream=true"))
        .bearer_auth(APP_KEY)
        .json(&json!({ "who": "Ada" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let outputs: String = tollgate_e2e::scenario::sse_data(&text)
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["output"].as_str().map(str::to_string))
        .collect();
    assert_eq!(outputs, DEFAULT_CONTENT, "{text}");
}

/// A rate-limited key pool answers an Anthropic client in Anthropic's shape with
/// `retry-after`, whoever refused: the provider (passed through, or translated from an
/// OpenAI-compatible one) or the gateway's key pool once every key cools (in Envoy, the key
/// role's own reply).
async fn a_cooling_pool_answers_anthropic_clients_in_their_shape(host: Host) {
    let f = Fixture::start(host, "{}").await;
    for key in [CLAUDE_KEY, OPENAI_KEY] {
        f.mock.set_fault(
            key,
            Fault::TooManyRequests {
                retry_after_secs: Some(30),
            },
        );
    }
    for model in ["claude-sonnet", "gpt-4o-mini"] {
        for round in ["the provider's 429", "the pool's own refusal"] {
            let r = f.send(APP_KEY, &hello(model)).await;
            let retry: u64 = r
                .headers()
                .get("retry-after")
                .unwrap_or_else(|| panic!("{model}, {round}: no retry-after: {:?}", r.headers()))
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=30).contains(&retry), "{model}, {round}: {retry}");
            let status = r.status().as_u16();
            let v: Value = r.json().await.unwrap();
            assert_anthropic_error(status, &v, 429, "rate_limit_error");
        }
    }
}

both_hosts!(
    a_cooling_pool_answers_anthropic_clients_in_their_shape,
    decorators_reach_anthropic_models_on_both_front_doors,
    a_prompt_template_runs_on_an_anthropic_model,
    openai_sdk_tools_on_an_openai_model,
    a_message_to_an_anthropic_model_is_passed_through,
    a_stream_to_an_anthropic_model_is_passed_through,
    a_message_to_an_openai_model_is_translated_both_ways,
    refusals_on_the_messages_endpoint_are_anthropic_shaped,
    provider_errors_reach_anthropic_clients_in_their_shape,
    limits_charge_the_providers_usage_on_the_messages_endpoint,
    token_counts_and_the_model_list,
    anthropic_sdk,
);
