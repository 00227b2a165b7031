//! Criterion benches of the core's hot paths. Run with `make bench`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tollgate_core::auth::KeyHash;
use tollgate_core::exchange::{OnBody, OnHeaders};
use tollgate_core::http::RequestHead;
use tollgate_core::store::LocalStore;
use tollgate_core::Config;
use tollgate_core::Exchange;

mod fixtures;

use fixtures::{chat_body, config, headers, KEY};

fn request_path(c: &mut Criterion) {
    let config = config();
    let headers = headers();
    let store = LocalStore::default();
    let mut group = c.benchmark_group("core");

    group.bench_function("authenticate", |b| {
        b.iter(|| black_box(config.authenticate(black_box(KEY))))
    });

    for model in ["gpt-4o-mini", "mock-gpt"] {
        let body = chat_body(model);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(format!("chat request 1KB to {model}"), |b| {
            b.iter(|| {
                let mut x = Exchange::new(Arc::clone(&config));
                let head = RequestHead {
                    method: "POST",
                    path: "/v1/chat/completions",
                    headers: &headers,
                };
                match x.on_request_headers(1, &head, &store) {
                    OnHeaders::ReadBody { .. } => {}
                    OnHeaders::Respond(r) => panic!("refused: {}", r.status),
                }
                match x.on_request_body(2, black_box(&body), &store) {
                    OnBody::Forward(f) => black_box(f.provider),
                    OnBody::Respond(r) => black_box(r.body.len()),
                };
                black_box(x.finish(3, &store))
            })
        });
    }
    group.finish();
}

/// Reserve then settle against a consumer's RPM + TPM + concurrency, in a single-threaded store
/// (the cost of the limiter's math and bookkeeping, not of a host's atomics).
fn limiter(c: &mut Criterion) {
    use tollgate_core::limits::{admit, settle, Amounts};

    let text = format!(
        "consumers:\n  - {{ name: a, keys: [{{ sha256: {} }}], models: [m], limits: {{ requests_per_minute: 100000000, tokens_per_minute: 1000000000, concurrency: 1000 }} }}\n\
         providers:\n  - {{ name: mock, kind: mock }}\nmodels:\n  - {{ name: m, provider: mock }}\n",
        KeyHash::of(KEY).to_hex()
    );
    let config = Config::load(&text, &|_| None).expect("limiter config");
    let limits: Vec<_> = config.limits_for(0, 0).cloned().collect();
    let store = LocalStore::default();
    let amounts = Amounts {
        requests: 1,
        tokens: 1_000,
        micro_usd: 0,
    };
    let used = Amounts {
        requests: 1,
        tokens: 700,
        micro_usd: 0,
    };
    let mut now = 1_795_341_600_000u64;
    let mut group = c.benchmark_group("limiter");
    group.bench_function("admit+settle (rpm, tpm, concurrency)", |b| {
        b.iter(|| {
            now += 1;
            let (reservation, headers) = admit(&limits, &store, now, amounts).expect("admitted");
            black_box(headers);
            settle(reservation, &store, now, used).expect("settled");
        })
    });
    group.finish();
}

/// Routing a request's model name to its model (a map lookup by name).
fn routing(c: &mut Criterion) {
    let config = config();
    c.bench_function("core/route model", |b| {
        b.iter(|| black_box(config.model_id(black_box("gpt-4o-mini"))))
    });
}

/// Mixed English prose and code, as prompts are.
fn sample_text(bytes: usize) -> String {
    let piece =
        "The gateway estimates tokens before the call; fn main() { println!(\"{}\", 42); } ";
    piece.repeat(bytes / piece.len() + 1)
}

/// A streamed completion: many small delta events, then the usage chunk, `[DONE]`.
fn sample_stream(events: usize) -> Vec<u8> {
    let mut out = String::new();
    for i in 0..events {
        out.push_str(&format!(
            "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"word{i} \"}},\"finish_reason\":null}}]}}\n\n"
        ));
    }
    out.push_str("data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":20,\"completion_tokens\":500,\"total_tokens\":520}}\n\ndata: [DONE]\n\n");
    out.into_bytes()
}

/// Token estimate and SSE parsing in MB/s; reading usage from a completion and a chunk.
fn streams(c: &mut Criterion) {
    use tollgate_core::providers::openai::usage;
    use tollgate_core::sse::SseParser;
    use tollgate_core::tokens;

    let mut group = c.benchmark_group("throughput");
    let text = sample_text(64 * 1024);
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function("token estimate", |b| {
        b.iter(|| black_box(tokens::estimate_text(black_box(&text))))
    });
    let stream = sample_stream(500);
    group.throughput(Throughput::Bytes(stream.len() as u64));
    group.bench_function("SSE parse (4 KB chunks)", |b| {
        b.iter(|| {
            let mut parser = SseParser::new();
            let mut events = 0usize;
            for chunk in stream.chunks(4096) {
                parser.feed(chunk, |e| events += e.data.len());
            }
            black_box(parser.finish(|_| {}));
            black_box(events)
        })
    });
    group.bench_function("SSE parse + usage of every event", |b| {
        b.iter(|| {
            let mut parser = SseParser::new();
            let mut total = 0u64;
            for chunk in stream.chunks(4096) {
                parser.feed(chunk, |e| {
                    if let Some(info) = usage::inspect_chunk(&e.data) {
                        total += info.usage.map_or(0, |u| u.total());
                    }
                });
            }
            black_box(total)
        })
    });
    group.finish();

    let completion = br#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"A short answer of a few words."},"finish_reason":"stop"}],"usage":{"prompt_tokens":250,"completion_tokens":9,"total_tokens":259}}"#;
    c.bench_function("usage/from completion", |b| {
        b.iter(|| black_box(usage::from_completion(black_box(completion))))
    });
}

/// Rendering a prompt template: checking the variables and building the chat request.
fn prompts(c: &mut Criterion) {
    let text = r#"
providers: [{ name: mock, kind: mock }]
models: [{ name: m, provider: mock }]
prompts:
  - name: sentiment
    versions:
      - version: 1
        model: m
        response: json
        params: { temperature: 0, max_tokens: 20 }
        variables:
          - { name: text, type: string, max_length: 4000 }
          - { name: lang, type: enum, values: [en, de], default: en }
        messages:
          - { role: system, content: "Classify the text between <text> tags. Reply in {{lang}} as JSON." }
          - { role: user, content: "<text>{{text}}</text>" }
"#;
    let config = Config::load(text, &|_| None).expect("prompt config");
    let version = config
        .prompt(0)
        .and_then(|p| p.version(None).ok())
        .expect("a version");
    let body = format!(
        r#"{{"text":"{}","lang":"de"}}"#,
        "I loved the film, but the ending was weak. ".repeat(10)
    );
    c.bench_function("prompts/render 500 B of variables", |b| {
        b.iter(|| black_box(version.render(black_box(body.as_bytes()), false)))
    });
}

/// Translating between OpenAI's chat completions and Anthropic's Messages API: requests,
/// and streams in both directions (4 KB chunks, as a host feeds them).
fn translation(c: &mut Criterion) {
    use tollgate_core::providers::anthropic::{client, provider};

    let mut group = c.benchmark_group("translation");
    let chat = chat_body("claude-sonnet");
    group.throughput(Throughput::Bytes(chat.len() as u64));
    group.bench_function("chat request 1KB to Messages", |b| {
        b.iter(|| {
            black_box(provider::messages_request(
                black_box(&chat),
                "claude-sonnet-4-5",
                1024,
            ))
        })
    });
    let messages = provider::messages_request(&chat, "claude-sonnet", 1024).expect("a request");
    group.throughput(Throughput::Bytes(messages.len() as u64));
    group.bench_function("Messages request 1KB to chat", |b| {
        b.iter(|| black_box(client::chat_request(black_box(&messages))))
    });

    let anthropic = anthropic_stream(500);
    group.throughput(Throughput::Bytes(anthropic.len() as u64));
    group.bench_function("Messages stream to chat chunks", |b| {
        b.iter(|| {
            let mut translator = provider::ChatStream::new("claude-sonnet", 1, true);
            let mut out = Vec::with_capacity(anthropic.len() * 2);
            for chunk in anthropic.chunks(4096) {
                translator.feed(chunk, &mut out);
            }
            translator.finish(&mut out);
            black_box(out.len())
        })
    });
    let openai = sample_stream(500);
    group.throughput(Throughput::Bytes(openai.len() as u64));
    group.bench_function("chat stream to Messages events", |b| {
        b.iter(|| {
            let mut translator = client::MessagesStream::new("gpt-4o-mini");
            let mut out = Vec::with_capacity(openai.len() * 2);
            for chunk in openai.chunks(4096) {
                translator.feed(chunk, &mut out);
            }
            translator.finish(&mut out);
            black_box(out.len())
        })
    });
    group.finish();
}

/// A Messages stream of `words` text deltas, as Anthropic sends it.
fn anthropic_stream(words: usize) -> Vec<u8> {
    let mut s = String::from(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5\",\"content\":[],\"stop_reason\":null,\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n\
         event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
    );
    for i in 0..words {
        s.push_str(&format!(
            "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\" word{i}\"}}}}\n\n"
        ));
    }
    s.push_str(
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
         event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":500}}\n\n\
         event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );
    s.into_bytes()
}

criterion_group!(
    benches,
    request_path,
    limiter,
    routing,
    streams,
    prompts,
    translation
);
criterion_main!(benches);
