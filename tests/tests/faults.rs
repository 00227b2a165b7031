//! Broken providers, in both hosts: whatever a provider sends, the gateway relays or refuses
//! it without holding it whole, frees every concurrency slot, and keeps serving.

use serde_json::{json, Value};
use tollgate_e2e::both_hosts;
use tollgate_e2e::gateway::Host;
use tollgate_e2e::mock_provider::{Fault, MockProvider};
use tollgate_e2e::scenario::{sha256_hex, user, Stack};

const APP_KEY: &str = "tg-faults-app-key";
const KEY: &str = "sk-faults-provider";
/// A single never-ending event: 32 MiB of one line.
const ENDLESS: u64 = 32 * 1024 * 1024;

fn config(mock: &MockProvider) -> String {
    format!(
        r#"
server:
  upstream_timeout_ms: 30000
consumers:
  - name: app
    keys: [{{ sha256: {app} }}]
    models: [gpt-4o-mini]
    limits: {{ concurrency: 1 }}
providers:
  - name: upstream
    kind: openai
    base_url: {base}
    retry: {{ attempts: 1 }}
    keys: [{{ id: only, secret_env: TG_FAULTS_KEY }}]
models:
  - {{ name: gpt-4o-mini, provider: upstream }}
"#,
        app = sha256_hex(APP_KEY),
        base = mock.base_url(),
    )
}

async fn start(host: Host) -> Stack {
    Stack::start(host, config, vec![("TG_FAULTS_KEY", KEY)]).await
}

async fn post(f: &Stack, body: Value) -> reqwest::Response {
    f.http
        .post(f.url("/v1/chat/completions"))
        .bearer_auth(APP_KEY)
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// A provider streaming one event that never ends: the client gets the bytes as they come
/// (relayed, not collected), the request's concurrency slot is free afterwards, and the
/// gateway still serves. Whether or not the client asked for the usage chunk (which decides
/// whether the gateway strips the stream).
async fn a_never_ending_event_is_relayed_not_held(host: Host) {
    let f = start(host).await;
    for include_usage in [false, true] {
        f.mock
            .set_fault(KEY, Fault::EndlessEvent { bytes: ENDLESS });
        let mut r = post(
            &f,
            json!({ "model": "gpt-4o-mini", "stream": true, "messages": user("hi"),
                    "stream_options": { "include_usage": include_usage } }),
        )
        .await;
        assert_eq!(r.status(), 200);
        let mut received = 0u64;
        while let Ok(Some(chunk)) = r.chunk().await {
            received += chunk.len() as u64;
        }
        assert!(
            received >= ENDLESS,
            "usage {include_usage}: {received} of {ENDLESS} bytes relayed"
        );
        f.mock.clear_fault(KEY);
        // Concurrency 1: admitted only if the stream's slot was given back.
        let r = post(
            &f,
            json!({ "model": "gpt-4o-mini", "messages": user("hi") }),
        )
        .await;
        assert_eq!(
            r.status(),
            200,
            "usage {include_usage}: the slot stayed taken"
        );
    }
}

both_hosts!(a_never_ending_event_is_relayed_not_held);
