//! What the core benches and the instruction count (`core_path.rs`) run on: a config of 101
//! consumers and two models, a typical 1 KB chat request, its headers.

// Each bench uses part of it.
#![allow(dead_code)]

use std::sync::Arc;

use tollgate_core::auth::KeyHash;
use tollgate_core::Config;

pub const KEY: &str = "tg-bench-consumer-key";
pub fn config() -> Arc<Config> {
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
pub fn chat_body(model: &str) -> Vec<u8> {
    let filler = "Summarize the following text in two sentences. ".repeat(18);
    format!(
        r#"{{"model":"{model}","temperature":0.2,"messages":[{{"role":"system","content":"You are a helpful assistant."}},{{"role":"user","content":"{filler}"}}]}}"#
    )
    .into_bytes()
}

pub fn headers() -> Vec<(String, String)> {
    vec![
        (":method".into(), "POST".into()),
        (":path".into(), "/v1/chat/completions".into()),
        ("content-type".into(), "application/json".into()),
        ("authorization".into(), format!("Bearer {KEY}")),
        ("user-agent".into(), "OpenAI/Python 1.50.0".into()),
    ]
}
