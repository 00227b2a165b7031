// The logic of every fuzz target, one `pub fn <target>(data: &[u8])` each. `include!`d by
// `fuzz/src/lib.rs` (the cargo-fuzz targets) and by `core/tests/fuzz_corpora.rs` (which replays
// the checked-in corpora on stable `cargo test`), so both run exactly the same code. Plain `//`
// comments only: an included file cannot carry inner doc comments.
//
// Besides "must not panic", the targets assert what the core's own docs promise (the SSE
// parser loses no byte and does not care where chunks split, translated streams do not
// either, rewritten and translated bodies are JSON, ...). A failed assertion is a finding just
// like a panic inside the core.
//
// Input layouts are described per target; every target accepts every byte string (missing
// bytes read as zero), so libFuzzer's mutations never fall outside the format.

use std::sync::{Arc, OnceLock};

use serde_json::{json, Value};
use tollgate_core::auth::KeyHash;
use tollgate_core::exchange::{Chunk, OnBody, OnHeaders, OnResponse};
use tollgate_core::http::RequestHead;
use tollgate_core::providers::anthropic::{client, provider as anthropic_provider};
use tollgate_core::providers::openai::{usage, wire};
use tollgate_core::providers::{refusal, signals, ProviderKind};
use tollgate_core::sse::{SseEvent, SseParser};
use tollgate_core::store::LocalStore;
use tollgate_core::{Config, Exchange};

// ---------------------------------------------------------------------------------------------
// Reading the fuzzer's bytes
// ---------------------------------------------------------------------------------------------

/// A cursor over the input; reads past the end give zeros and empty slices.
pub struct Bytes<'a>(&'a [u8]);

impl<'a> Bytes<'a> {
    pub fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    pub fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        for x in &mut b {
            *x = self.byte();
        }
        u64::from_le_bytes(b)
    }

    pub fn rest(self) -> &'a [u8] {
        self.0
    }
}

/// A chunk plan: one byte `n % 8`, then `n` chunk sizes (one byte each, cycled). No sizes:
/// the input goes in one piece.
pub fn chunk_plan(r: &mut Bytes<'_>) -> Vec<usize> {
    let n = r.byte() % 8;
    (0..n).map(|_| usize::from(r.byte())).collect()
}

/// `data` cut by `plan` (size 0 feeds an empty chunk; a plan of zeros only cuts every byte).
pub fn chunks<'a>(data: &'a [u8], plan: &[usize]) -> Vec<&'a [u8]> {
    if plan.is_empty() {
        return vec![data];
    }
    let all_zero = plan.iter().all(|&s| s == 0);
    let mut out = Vec::new();
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() {
        let size = if all_zero { 1 } else { plan[i % plan.len()] };
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        out.push(chunk);
        rest = tail;
        i += 1;
    }
    out
}

fn json_of(bytes: &[u8], what: &str) -> Value {
    match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => panic!(
            "{what} is not JSON ({e}): {:?}",
            String::from_utf8_lossy(bytes)
        ),
    }
}

/// Every SSE event's data in `bytes`, in order (whole events only).
fn sse_data(bytes: &[u8]) -> Vec<String> {
    let mut parser = SseParser::new();
    let mut out = Vec::new();
    parser.feed(bytes, |e| out.push(e.data));
    let _ = parser.finish(|e| out.push(e.data));
    out
}

// ---------------------------------------------------------------------------------------------
// sse: [chunk plan][stream bytes]
// ---------------------------------------------------------------------------------------------

/// Events, the `finish` tail, and every byte handed out (idle bytes, raws, tail) in order.
fn sse_run(chunks: &[&[u8]], take_idle: bool) -> (Vec<SseEvent>, Vec<u8>, Vec<u8>) {
    let mut parser = SseParser::new();
    let mut events = Vec::new();
    let mut bytes = Vec::new();
    for chunk in chunks {
        parser.feed(chunk, |e| {
            bytes.extend_from_slice(&e.raw);
            events.push(e);
        });
        if take_idle {
            bytes.extend(parser.take_idle());
        }
    }
    let tail = parser.finish(|e| {
        bytes.extend_from_slice(&e.raw);
        events.push(e);
    });
    assert_eq!(parser.pending(), 0, "finish leaves the parser as new");
    bytes.extend_from_slice(&tail);
    (events, tail, bytes)
}

pub fn sse(data: &[u8]) {
    let mut r = Bytes(data);
    let plan = chunk_plan(&mut r);
    let input = r.rest();
    let whole = sse_run(&[input], false);
    assert_eq!(whole.2, input, "raws and tail reproduce the stream");
    let cut = chunks(input, &plan);
    let chunked = sse_run(&cut, false);
    assert_eq!(
        chunked.0, whole.0,
        "events do not depend on chunking ({plan:?})"
    );
    assert_eq!(
        chunked.1, whole.1,
        "the tail does not depend on chunking ({plan:?})"
    );
    let idle = sse_run(&cut, true);
    assert_eq!(
        idle.2, input,
        "idle bytes, raws and tail reproduce the stream"
    );
    let fields = |events: &[SseEvent]| -> Vec<(Option<String>, String)> {
        events
            .iter()
            .map(|e| (e.event.clone(), e.data.clone()))
            .collect()
    };
    assert_eq!(
        fields(&idle.0),
        fields(&whole.0),
        "take_idle changes no event"
    );
    // Abandoning mid-stream hands back what was buffered and starts afresh.
    let mut parser = SseParser::new();
    parser.feed(input, |_| {});
    let pending = parser.pending();
    assert_eq!(parser.abandon().len(), pending);
    assert_eq!(parser.pending(), 0);
}

// ---------------------------------------------------------------------------------------------
// openai_usage: the bytes as a completion body, and as one chunk's data
// ---------------------------------------------------------------------------------------------

pub fn openai_usage(data: &[u8]) {
    if let Some(u) = usage::from_completion(data) {
        assert!(u.total() >= u.prompt_tokens);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(info) = usage::inspect_chunk(text) {
            assert!(!info.usage_only || info.usage.is_some());
            let _ = info.text.len();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// openai_wire: [edit flags][chat request body]
// ---------------------------------------------------------------------------------------------

fn read_chat(req: &wire::ChatRequest<'_>) {
    let _ = req.max_output_tokens();
    assert!(req.choices() >= 1);
    let _ = req.estimate_prompt_tokens();
    let _ = req.guarded_texts();
    let _ = (req.is_stream(), req.wants_stream_usage());
    for m in &req.messages {
        if let Some(c) = &m.content {
            let _ = (c.text(), c.images());
        }
    }
}

pub fn openai_wire(data: &[u8]) {
    let mut r = Bytes(data);
    let flags = r.byte();
    let body = r.rest();
    let parsed = wire::parse_chat_request(body);
    if let Ok(req) = &parsed {
        read_chat(req);
    }
    let first = json!({ "role": "system", "content": "decorator first" });
    let last = json!({ "role": "user", "content": "decorator \"last\" \u{1F980}" });
    let edits = wire::Edits {
        model: (flags & 1 != 0).then_some("upstream-\"model\"-\u{e9}"),
        force_stream_usage: flags & 2 != 0,
        prepend: if flags & 4 != 0 { vec![&first] } else { vec![] },
        append: if flags & 8 != 0 {
            vec![&last, &first]
        } else {
            vec![]
        },
    };
    let _ = edits.is_empty();
    let Ok(out) = wire::rewrite(body, &edits) else {
        return;
    };
    let v = json_of(&out, "a rewritten chat request");
    assert!(v.is_object(), "a rewritten chat request is an object");
    if let Some(model) = edits.model {
        assert_eq!(v.get("model").and_then(Value::as_str), Some(model));
    }
    if edits.force_stream_usage {
        assert_eq!(
            v.pointer("/stream_options/include_usage"),
            Some(&Value::Bool(true))
        );
    }
    if let Ok(req) = &parsed {
        let again = match wire::parse_chat_request(&out) {
            Ok(again) => again,
            Err(e) => panic!(
                "a valid request rewritten is no longer valid ({e}): {:?}",
                String::from_utf8_lossy(&out)
            ),
        };
        let added = edits.prepend.len() + edits.append.len();
        assert_eq!(again.messages.len(), req.messages.len() + added);
        read_chat(&again);
    }
}

// ---------------------------------------------------------------------------------------------
// config_load: [env mode][YAML or JSON text, lossy UTF-8]
// ---------------------------------------------------------------------------------------------

fn read_config(c: &Config) {
    for p in c.providers() {
        let _ = (p.has_key_limits(), c.provider_by_name(&p.name).is_some());
    }
    for (id, m) in c.models().iter().enumerate() {
        assert_eq!(c.model_id(&m.name), Some(id));
        for consumer in 0..c.consumers().len() {
            let _ = c.limits_for(consumer, id).count();
        }
    }
    for consumer in c.consumers() {
        let _ = (consumer.prompts_list().len(), consumer.models_list().len());
    }
    for t in c.prompts() {
        assert!(c.prompt_at(&t.path).is_some());
        let _ = t.describe();
        let _ = t.version(None);
        for v in &t.versions {
            // Defaults only; a template must render or say why not.
            let _ = v.render(b"{}", false);
            let _ = v.render(b"", true);
        }
    }
    let _ = c.all_limits().count();
    let _ = c.pool_store_keys().count();
    let _ = c.authenticate("tg-app");
}

pub fn config_load(data: &[u8]) {
    let mut r = Bytes(data);
    let mode = r.byte() % 3;
    let text = String::from_utf8_lossy(r.rest());
    let env = move |k: &str| match mode {
        0 => None,
        1 => Some("sk-test".to_string()),
        _ => Some(format!("sk-{k}")),
    };
    match Config::load(&text, &env) {
        Ok(c) => read_config(&c),
        Err(errors) => {
            assert!(!errors.0.is_empty(), "a refused config says why");
            let _ = errors.to_string();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// prompt_render: [mode][variables body] against a fixed template
// ---------------------------------------------------------------------------------------------

const PROMPTS_CONFIG: &str = r#"
consumers:
  - { name: app, keys: [{ sha256: "@APP@" }], models: ["*"], prompts: ["*"] }
providers:
  - { name: mock, kind: mock }
models:
  - { name: m, provider: mock }
prompts:
  - name: fuzz
    versions:
      - version: 1
        model: m
        messages: [{ role: user, content: "{{s}}" }]
        variables: [{ name: s, type: string }]
      - version: 2
        model: m
        params: { temperature: 0, max_tokens: 20, stop: ["}}"] }
        response: json
        variables:
          - { name: text, type: string, max_length: 50 }
          - { name: lang, type: enum, values: [en, de, "{{text}}"], default: en }
          - { name: tags, type: array, max_items: 3, max_length: 5, required: false }
          - { name: score, type: number, required: false }
          - { name: strict, type: boolean, default: false }
        messages:
          - { role: system, content: "Answer in {{lang}} as JSON. Strict: {{strict}}." }
          - { role: user, content: "<text>{{ text }}</text> tags={{tags}} score={{score}}" }
          - { role: assistant, content: "{{text}}{{text}}{{   tags   }}" }
      - version: 7
        model: m
        response: text
        variables: [{ name: n, type: number, default: 1.5 }, { name: e, type: enum, values: [a] }]
        messages: [{ role: developer, content: "n={{n}} e={{e}}" }]
"#;

fn prompts_config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let text = PROMPTS_CONFIG.replace("@APP@", &KeyHash::of("tg-app").to_hex());
        match Config::load(&text, &|_| None) {
            Ok(c) => c,
            Err(e) => panic!("the prompt fuzz config loads: {e}"),
        }
    })
}

pub fn prompt_render(data: &[u8]) {
    use tollgate_core::prompts::{parse_content, shape};
    let mut r = Bytes(data);
    let mode = r.byte();
    let body = r.rest();
    let template = &prompts_config().prompts()[0];
    let version = &template.versions[usize::from(mode >> 4) % template.versions.len()];
    match mode & 3 {
        // Render: the values land in the messages' content and nowhere else.
        0 | 1 => {
            let stream = mode & 1 != 0;
            let Ok(out) = version.render(body, stream) else {
                return;
            };
            let v = json_of(&out, "a rendered prompt");
            assert_eq!(v["model"], Value::String(version.model.clone()));
            let messages = v["messages"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            assert_eq!(messages.len(), version.messages.len(), "no message added");
            for (m, t) in messages.iter().zip(&version.messages) {
                assert_eq!(
                    m["role"],
                    Value::String(t.role.clone()),
                    "roles are the template's"
                );
                assert!(m["content"].is_string());
                assert_eq!(m.as_object().map(|o| o.len()), Some(2), "no field injected");
            }
            let keys = v.as_object().map(|o| o.len()).unwrap_or_default();
            assert_eq!(keys, 2 + version.params.len() + usize::from(stream));
        }
        // The template syntax itself, with this version's variables.
        2 => {
            let text = String::from_utf8_lossy(body);
            if let Ok(parts) = parse_content(&text, &version.variables) {
                let vars = parts
                    .iter()
                    .filter(|p| matches!(p, tollgate_core::prompts::Part::Var(i) if *i < version.variables.len()))
                    .count();
                let all = parts
                    .iter()
                    .filter(|p| matches!(p, tollgate_core::prompts::Part::Var(_)))
                    .count();
                assert_eq!(vars, all, "placeholders name declared variables");
            }
            let _ = template.version(Some(text.as_ref()));
        }
        // The answer shapes, from a completion / an event's data.
        _ => {
            if let Ok(out) = shape::text(body) {
                json_of(&out, "a text answer");
            }
            if let Ok(out) = shape::json(body) {
                json_of(&out, "a json answer");
            }
            if let Ok(text) = std::str::from_utf8(body) {
                if let Some(event) = shape::text_event(text) {
                    assert!(event.starts_with(b"data: ") && event.ends_with(b"\n\n"));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// signals: [now u64][default u64][cap u64][header values, one per line]
// ---------------------------------------------------------------------------------------------

const SIGNAL_HEADERS: [&str; 14] = [
    "retry-after",
    "retry-after-ms",
    "x-ms-retry-after-ms",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
    "anthropic-ratelimit-requests-remaining",
    "anthropic-ratelimit-tokens-remaining",
    "anthropic-ratelimit-input-tokens-remaining",
    "anthropic-ratelimit-output-tokens-remaining",
    "anthropic-ratelimit-requests-reset",
    "anthropic-ratelimit-tokens-reset",
    "anthropic-ratelimit-input-tokens-reset",
];

pub fn signals(data: &[u8]) {
    let mut r = Bytes(data);
    let now = r.u64();
    let default = r.u64();
    let cap = r.u64();
    let text = String::from_utf8_lossy(r.rest());
    let mut headers: Vec<(String, String)> = Vec::new();
    for (i, value) in text.split('\n').enumerate() {
        let _ = signals::parse_duration_ms(value);
        let _ = signals::parse_rfc3339_ms(value);
        let _ = signals::parse_http_date_ms(value);
        let name = SIGNAL_HEADERS[i % SIGNAL_HEADERS.len()];
        headers.push((name.to_string(), value.to_string()));
    }
    let s = signals::KeySignals::read(&headers, now);
    let until = s.cooldown_until(now, default, cap);
    assert!(
        until >= now && until <= now.saturating_add(cap),
        "cooldown within its cap"
    );
    let _ = tollgate_core::health::headroom_state(&s, now);
}

// ---------------------------------------------------------------------------------------------
// anthropic_provider: [mode][param][chunk plan (stream mode)][body]
// ---------------------------------------------------------------------------------------------

fn chat_stream(chunks: &[&[u8]], include_usage: bool) -> (Vec<u8>, String) {
    let mut s = anthropic_provider::ChatStream::new("pub-model", 1_700_000_000, include_usage);
    let mut out = Vec::new();
    for c in chunks {
        s.feed(c, &mut out);
    }
    s.finish(&mut out);
    let facts = format!("{:?}", s.usage());
    (out, facts)
}

pub fn anthropic_provider(data: &[u8]) {
    let mut r = Bytes(data);
    let mode = r.byte() % 4;
    let param = r.byte();
    match mode {
        0 => {
            let body = r.rest();
            if let Ok(out) =
                anthropic_provider::messages_request(body, "claude-up", u64::from(param) * 64)
            {
                let v = json_of(&out, "a Messages request");
                assert_eq!(v["model"], json!("claude-up"));
            }
        }
        1 => {
            let body = r.rest();
            if let Some((out, _usage)) =
                anthropic_provider::chat_completion(body, "pub-model", u64::from(param))
            {
                json_of(&out, "a translated completion");
            }
        }
        2 => {
            let body = r.rest();
            if let Some(out) = anthropic_provider::openai_error(body) {
                json_of(&out, "a translated error");
            }
        }
        _ => {
            let plan = chunk_plan(&mut r);
            let body = r.rest();
            let whole = chat_stream(&[body], param & 1 != 0);
            let cut = chat_stream(&chunks(body, &plan), param & 1 != 0);
            assert_eq!(
                String::from_utf8_lossy(&cut.0),
                String::from_utf8_lossy(&whole.0),
                "ChatStream output does not depend on chunking ({plan:?})"
            );
            assert_eq!(
                cut.1, whole.1,
                "ChatStream state does not depend on chunking"
            );
            for event in sse_data(&whole.0) {
                if event != "[DONE]" {
                    json_of(event.as_bytes(), "a translated chunk");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// anthropic_client: [mode][param][chunk plan (stream mode)][body]
// ---------------------------------------------------------------------------------------------

fn messages_stream(chunks: &[&[u8]]) -> (Vec<u8>, String) {
    let mut s = client::MessagesStream::new("pub-model");
    let mut out = Vec::new();
    for c in chunks {
        s.feed(c, &mut out);
    }
    s.finish(&mut out);
    (out, format!("{:?} {}", s.usage(), s.streamed_tokens()))
}

pub fn anthropic_client(data: &[u8]) {
    let mut r = Bytes(data);
    let mode = r.byte() % 7;
    let param = r.byte();
    match mode {
        0 => {
            let body = r.rest();
            if let Ok(req) = client::parse_messages_request(body) {
                let _ = (req.model(), req.is_stream(), req.max_tokens());
                let _ = (req.estimate_prompt_tokens(), req.guarded_texts());
            }
        }
        1 => {
            let body = r.rest();
            if let Ok(out) = client::chat_request(body) {
                json_of(&out, "a translated chat request");
                if let Err(e) = wire::parse_chat_request(&out) {
                    panic!(
                        "a translated Messages request is no chat request ({e}): {:?}",
                        String::from_utf8_lossy(&out)
                    );
                }
            }
        }
        2 => {
            let body = r.rest();
            if let Some(out) = client::message_from_chat(body, "pub-model") {
                json_of(&out, "a translated message");
            }
        }
        3 => {
            let body = r.rest();
            let name = if param & 1 == 0 {
                "claude-up"
            } else {
                "a \"quoted\" \u{2028} name"
            };
            if let Ok(out) = client::rename_model(body, name) {
                let original: Result<Value, _> = serde_json::from_slice(body);
                if original.is_ok() {
                    let v = json_of(&out, "a renamed request");
                    assert_eq!(v["model"], json!(name));
                }
            }
        }
        4 => {
            let body = r.rest();
            let system = json!({ "role": "system", "content": "be brief" });
            let user = json!({ "role": "user", "content": "first" });
            let assistant = json!({ "role": "assistant", "content": "last" });
            let all = [&system, &user, &assistant];
            let prepend: Vec<&Value> = all
                .iter()
                .enumerate()
                .filter(|(i, _)| param >> i & 1 != 0)
                .map(|(_, v)| *v)
                .collect();
            let append: Vec<&Value> = all
                .iter()
                .enumerate()
                .filter(|(i, _)| param >> (i + 3) & 1 != 0)
                .map(|(_, v)| *v)
                .collect();
            if let Ok(out) = client::decorate(body, &prepend, &append) {
                json_of(&out, "a decorated Messages request");
            }
        }
        5 => {
            let plan = chunk_plan(&mut r);
            let body = r.rest();
            let whole = messages_stream(&[body]);
            let cut = messages_stream(&chunks(body, &plan));
            assert_eq!(
                String::from_utf8_lossy(&cut.0),
                String::from_utf8_lossy(&whole.0),
                "MessagesStream output does not depend on chunking ({plan:?})"
            );
            assert_eq!(
                cut.1, whole.1,
                "MessagesStream state does not depend on chunking"
            );
            for event in sse_data(&whole.0) {
                json_of(event.as_bytes(), "a translated Messages event");
            }
        }
        _ => {
            let body = r.rest();
            let mut u = client::MessagesStreamUsage::new();
            for event in sse_data(body) {
                u.observe(&event);
            }
            let _ = (u.usage(), u.streamed_text_tokens());
            let _ = client::usage_of_message(body);
            let status = 400 + u16::from(param);
            json_of(
                &client::error_from_openai(status, body),
                "a translated error",
            );
            json_of(
                &client::error_body(status, &String::from_utf8_lossy(body)),
                "an error",
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// refusal: [status u16][error body]
// ---------------------------------------------------------------------------------------------

pub fn refusal(data: &[u8]) {
    use tollgate_core::providers::anthropic::refusal as anthropic_refusal;
    use tollgate_core::providers::openai::refusal as openai_refusal;
    let mut r = Bytes(data);
    let status = r.u16();
    let body = r.rest();
    for kind in [
        ProviderKind::OpenAi,
        ProviderKind::Anthropic,
        ProviderKind::Mock,
    ] {
        let class = refusal::classify(kind, status, body);
        assert!(status >= 400 || class.is_none(), "below 400 is no refusal");
        let _ = class.map(|c| c.retried());
        let _ = refusal::limits_per_model(kind);
    }
    let _ = openai_refusal::classify(status, body);
    let _ = anthropic_refusal::classify(status, body);
    let _ = refusal::RefusalClass::of_status(status);
    if let Some(m) = refusal::provider_message(body) {
        assert!(m.chars().count() <= 601, "provider messages are cut");
    }
    if let Some(out) = refusal::scrub_account_ids(body) {
        assert!(out.len() < body.len(), "scrubbing removes something");
    }
    let _ = refusal::scrub_account_ids_str(&String::from_utf8_lossy(body));
}

// ---------------------------------------------------------------------------------------------
// exchange: fields separated by 0xFF:
//   [path, method, auth, flags, status lo, status hi, now step] 0xFF
//   request header lines ("name: value") 0xFF  path suffix 0xFF  request body 0xFF
//   response header lines 0xFF  response chunk 0xFF  response chunk ...
// flags: 1 content-length, 2 key handover, 4 collect overflow, 8 fail over (chain steps
// too), 16 answer read as a fallback's (32: which one)
// ---------------------------------------------------------------------------------------------

const EXCHANGE_CONFIG: &str = r#"
server: { max_body_bytes: 4096 }
consumers:
  - name: app
    keys: [{ sha256: "@APP@" }]
    models: ["*"]
    prompts: ["*"]
    limits: { requests_per_minute: 1000, tokens_per_minute: 100000, concurrency: 4, daily_cost_usd: 5.0 }
    model_limits: { gpt: { tokens_per_day: 50000 } }
    decorators: { prepend: [{ role: system, content: "consumer first" }], append: [{ role: user, content: "consumer last" }] }
    guard: [{ name: no-keys, deny: ["sk-[a-z0-9]{6,}"] }]
  - name: tight
    keys: [{ sha256: "@TIGHT@" }]
    models: [gpt, mock-gpt, claude]
    limits: { requests_per_second: 1, tokens_per_minute: 50, monthly_tokens: 1000, monthly_cost_usd: 0.001 }
providers:
  - name: openai
    kind: openai
    base_url: "http://127.0.0.1:9/v1"
    strategy: most-headroom
    retry: { attempts: 3, budget_ms: 30000, backoff_ms: 50, max_backoff_ms: 1000 }
    key_health: { cooldown_ms: 1000, max_cooldown_ms: 3600000, revoked_probe_ms: 60000 }
    keys:
      - { id: a, secret_env: A, limits: { tokens_per_minute: 2000 } }
      - { id: b, secret_env: B, weight: 2, models: [gpt, gpt-b] }
  - name: claude
    kind: anthropic
    keys: [{ id: c, secret_env: C, limits: { requests_per_minute: 100 } }]
  - { name: mock, kind: mock }
models:
  - name: gpt
    provider: openai
    upstream_model: gpt-4o-mini-2024
    default_max_tokens: 100
    fallbacks: [claude, mock-gpt]
    pricing: { input_per_million: 1.0, output_per_million: 2.0, cached_input_per_million: 0.5 }
    guard: [{ name: no-shouting, deny: ["^[A-Z !]+$"] }]
  - { name: gpt-b, provider: openai, keys: [b], pricing: { input_per_million: 0.1, output_per_million: 0.2 } }
  - name: claude
    provider: claude
    upstream_model: claude-sonnet-up
    default_max_tokens: 200
    fallbacks: [gpt-b]
    pricing: { input_per_million: 3.0, output_per_million: 15.0, cached_input_per_million: 0.3 }
    decorators: { prepend: [{ role: system, content: "model first" }] }
  - { name: mock-gpt, provider: mock, limits: { tokens_per_minute: 100000 }, pricing: { input_per_million: 1.0, output_per_million: 1.0 } }
prompts:
  - name: chat
    versions:
      - { version: 1, model: gpt, messages: [{ role: user, content: "{{text}}" }], variables: [{ name: text, type: string }] }
  - name: texty
    path: /api/texty
    versions:
      - { version: 1, model: claude, response: text, messages: [{ role: user, content: "{{text}}" }], variables: [{ name: text, type: string }] }
  - name: jsony
    versions:
      - { version: 2, model: gpt, response: json, params: { max_tokens: 30 }, messages: [{ role: user, content: "{{text}}" }], variables: [{ name: text, type: string, default: "x" }] }
  - name: echo
    versions:
      - { version: 1, model: mock-gpt, response: text, messages: [{ role: user, content: "{{text}}" }], variables: [{ name: text, type: string }] }
"#;

fn exchange_config() -> &'static Arc<Config> {
    static CONFIG: OnceLock<Arc<Config>> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let text = EXCHANGE_CONFIG
            .replace("@APP@", &KeyHash::of("tg-app").to_hex())
            .replace("@TIGHT@", &KeyHash::of("tg-tight").to_hex());
        match Config::load(&text, &|k| Some(format!("sk-{k}"))) {
            Ok(c) => Arc::new(c),
            Err(e) => panic!("the exchange fuzz config loads: {e}"),
        }
    })
}

const PATHS: [&str; 12] = [
    "/v1/chat/completions",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/prompts/chat",
    "/api/texty",
    "/v1/prompts/jsony",
    "/v1/prompts/echo",
    "/v1/prompts",
    "/v1/models",
    "/healthz",
    "/admin/keys",
    "",
];

const METHODS: [&str; 4] = ["POST", "GET", "PUT", "post"];

const AUTHS: [(&str, &str); 6] = [
    ("authorization", "Bearer tg-app"),
    ("x-api-key", "tg-app"),
    ("api-key", "tg-tight"),
    ("authorization", "Bearer tg-nope"),
    ("authorization", "tg-app"),
    ("x-nothing", ""),
];

fn header_lines(bytes: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

pub fn exchange(data: &[u8]) {
    use tollgate_core::keys;
    let mut fields = data.split(|&b| b == 0xFF);
    let mut control = Bytes(fields.next().unwrap_or_default());
    let path = PATHS[usize::from(control.byte()) % PATHS.len()];
    let method = METHODS[usize::from(control.byte()) % METHODS.len()];
    let auth = AUTHS[usize::from(control.byte()) % AUTHS.len()];
    let flags = control.byte();
    // A status as a host can receive it (HTTP codes are three digits).
    let status = 100 + control.u16() % 500;
    let step = u64::from(control.byte()) * 1_000;
    let mut headers = header_lines(fields.next().unwrap_or_default());
    headers.push((auth.0.to_string(), auth.1.to_string()));
    let path = format!(
        "{path}{}",
        String::from_utf8_lossy(fields.next().unwrap_or_default())
    );
    let body = fields.next().unwrap_or_default();
    if flags & 1 != 0 {
        headers.push(("content-length".to_string(), body.len().to_string()));
    }
    let mut response_headers = header_lines(fields.next().unwrap_or_default());
    let response_chunks: Vec<&[u8]> = fields.collect();

    let config = exchange_config();
    let store = LocalStore::default();
    let mut now = 1_795_341_600_000u64;
    let mut x = Exchange::new(Arc::clone(config));
    let head = RequestHead {
        method,
        path: &path,
        headers: &headers,
    };
    let go_on = match x.on_request_headers(now, &head, &store) {
        OnHeaders::Respond(r) => {
            assert!((100..600).contains(&r.status));
            false
        }
        OnHeaders::ReadBody { limit } => u64::try_from(body.len()).is_ok_and(|n| n <= limit),
    };
    now += step;
    let forward = if go_on {
        match x.on_request_body(now, body, &store) {
            OnBody::Respond(r) => {
                assert!((100..600).contains(&r.status));
                None
            }
            OnBody::Forward(f) => Some(f),
        }
    } else {
        None
    };
    // Failover: the chain routed for Envoy's key roles (every step a request its provider
    // reads), then on to the next model as the native host does, or the answer read as a
    // fallback's as Envoy's gateway role does.
    let forward = match forward {
        Some(f) if flags & 8 != 0 => {
            for step in x.chain_steps(now) {
                json_of(step.body.as_bytes(), "a chain step's body");
                // As Envoy's filter state carries it to the key role.
                let decoded = keys::ChainStep::decode(&step.encode());
                assert_eq!(decoded.as_ref(), Some(&step), "chain steps round-trip");
            }
            match x.fail_over(now, &store, &f.ticket) {
                Some(OnBody::Forward(next)) => {
                    assert!(next.ticket.attempts_before >= f.ticket.attempts_made());
                    Some(next)
                }
                Some(OnBody::Respond(r)) => {
                    assert!((100..600).contains(&r.status));
                    None
                }
                None => Some(f),
            }
        }
        Some(f) if flags & 16 != 0 => {
            x.serve_as(if flags & 32 != 0 { "claude" } else { "gpt-b" }, now, &store);
            Some(f)
        }
        other => other,
    };
    if let Some(f) = forward {
        // The key role's attempt, handed over as Envoy's would be.
        let ticket = keys::Ticket::decode(f.ticket.encode().as_bytes());
        assert_eq!(ticket.as_ref(), Some(&f.ticket), "tickets round-trip");
        let attempt = keys::attempt_key(config, &f.ticket, &store, now);
        let mut key_id = None;
        if let Ok(a) = &attempt {
            if flags & 2 != 0 {
                if let Some(h) = a.handover() {
                    let h = h.header(&a.reservation);
                    response_headers.push((keys::KEY_RESERVATION_HEADER.to_string(), h));
                }
            }
            key_id = a.key_id().map(str::to_string);
        }
        let whole: Vec<u8> = response_chunks.concat();
        now += step;
        match x.on_response_headers(status, &response_headers, &store) {
            OnResponse::Relay { .. } => {
                let n = response_chunks.len();
                if n == 0 {
                    let _ = x.on_response_chunk(b"", true);
                }
                for (i, c) in response_chunks.iter().enumerate() {
                    match x.on_response_chunk(c, i + 1 == n) {
                        Chunk::Unchanged | Chunk::Replace(_) => {}
                    }
                }
            }
            OnResponse::Replace(r) => assert!((100..600).contains(&r.status)),
            OnResponse::Collect { limit } => {
                let r = if whole.len() > limit || flags & 4 != 0 {
                    x.on_collect_overflow(limit)
                } else {
                    x.on_collected(&whole)
                };
                assert!((100..600).contains(&r.status));
                json_of(&r.body, "a collected answer");
            }
        }
        if let Some(key) = key_id {
            let attempted = keys::Attempted {
                provider: &f.ticket.provider,
                key: &key,
                model: &f.ticket.model,
            };
            let class = keys::classify(config, &f.ticket.provider, status, &whole);
            let _ = keys::observe(
                config,
                &attempted,
                Some(status),
                class,
                &response_headers,
                now,
                &store,
            );
            let _ = keys::count(config, &attempted, Some(status), class, &store);
        }
    }
    now += step;
    let _ = x.finish(now, &store);
    let _ = keys::report::pools(config, &store, now);
}
