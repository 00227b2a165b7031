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

const KEY: &str = "tg-bench-consumer-key";

fn config() -> Arc<Config> {
    // 100 consumers, so that the lookup is not a one-entry map.
    let consumers: String = (0..100)
        .map(|i| {
            format!(
                "  - {{ name: c{i}, keys: [{{ sha256: {} }}], models: [\"*\"] }}\n",
                KeyHash::of(&format!("{KEY}-{i}")).to_hex()
            )
        })
        .collect();
    let text = format!(
        "consumers:\n{consumers}  - {{ name: bench, keys: [{{ sha256: {} }}], models: [gpt-4o-mini, mock-gpt] }}\n\
         providers:\n  - {{ name: openai, kind: openai, base_url: 'https://api.openai.com/v1', keys: [{{ id: a, secret_env: A }}] }}\n  - {{ name: mock, kind: mock }}\n\
         models:\n  - {{ name: gpt-4o-mini, provider: openai }}\n  - {{ name: mock-gpt, provider: mock }}\n",
        KeyHash::of(KEY).to_hex()
    );
    Arc::new(Config::load(&text, &|_| Some("sk-bench".into())).expect("bench config"))
}

/// A typical chat request of about 1 KB.
fn chat_body(model: &str) -> Vec<u8> {
    let filler = "Summarize the following text in two sentences. ".repeat(18);
    format!(
        r#"{{"model":"{model}","temperature":0.2,"messages":[{{"role":"system","content":"You are a helpful assistant."}},{{"role":"user","content":"{filler}"}}]}}"#
    )
    .into_bytes()
}

fn headers() -> Vec<(String, String)> {
    vec![
        (":method".into(), "POST".into()),
        (":path".into(), "/v1/chat/completions".into()),
        ("content-type".into(), "application/json".into()),
        ("authorization".into(), format!("Bearer {KEY}")),
        ("user-agent".into(), "OpenAI/Python 1.50.0".into()),
    ]
}

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
                match x.on_request_headers(1, &head) {
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

criterion_group!(benches, request_path, limiter);
criterion_main!(benches);
