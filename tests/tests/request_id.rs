//! `x-request-id`, in both hosts: every answer carries one — the client's own when it sent a
//! usable one, else a new one per request — and the provider sees the same; the native
//! host's access log names it, with the time to the first byte of the answer.

use serde_json::json;
use tollgate_e2e::both_hosts;
use tollgate_e2e::gateway::Host;
use tollgate_e2e::mock_provider::MockProvider;
use tollgate_e2e::scenario::{sha256_hex, user, Stack};

const APP_KEY: &str = "tg-request-id-app-key";

fn config(mock: &MockProvider) -> String {
    format!(
        r#"
consumers:
  - {{ name: app, keys: [{{ sha256: {app} }}], models: ["*"] }}
providers:
  - {{ name: upstream, kind: openai, base_url: "{base}", keys: [{{ id: only, secret_env: TG_RID_KEY }}] }}
models:
  - {{ name: gpt-4o-mini, provider: upstream }}
"#,
        app = sha256_hex(APP_KEY),
        base = mock.base_url(),
    )
}

async fn requests_carry_an_id_end_to_end(host: Host) {
    let f = Stack::start(host, config, vec![("TG_RID_KEY", "sk-rid")]).await;
    let send = |id: Option<&'static str>, stream: bool| {
        let mut r = f
            .http
            .post(f.url("/v1/chat/completions"))
            .bearer_auth(APP_KEY)
            .json(&json!({ "model": "gpt-4o-mini", "stream": stream, "messages": user("hi") }));
        if let Some(id) = id {
            r = r.header("x-request-id", id);
        }
        r.send()
    };
    let id_of = |r: &reqwest::Response| {
        r.headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    // The client's own id, kept, and seen by the provider.
    let r = send(Some("client-id-42"), false).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(id_of(&r), "client-id-42");
    let _ = r.text().await;
    let sent = f.mock.requests().pop().unwrap();
    assert_eq!(sent.header("x-request-id"), Some("client-id-42"));
    // None sent: a new one per request, the provider's the same as the client's.
    let a = send(None, true).await.unwrap();
    let b = send(None, false).await.unwrap();
    let (a_id, b_id) = (id_of(&a), id_of(&b));
    assert!(a_id.len() >= 16 && b_id.len() >= 16, "{a_id} {b_id}");
    assert_ne!(a_id, b_id);
    let _ = (a.text().await, b.text().await);
    let seen: Vec<String> = f
        .mock
        .requests()
        .iter()
        .filter_map(|r| r.header("x-request-id").map(str::to_string))
        .collect();
    assert!(seen.contains(&a_id) && seen.contains(&b_id), "{seen:?}");
    // A refusal of the gateway's own carries it too.
    let refused = f
        .http
        .get(f.url("/v1/models"))
        .bearer_auth("tg-nobody")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert!(!id_of(&refused).is_empty());
    if host == Host::Native {
        let logs = f.gateway.logs();
        let line = logs
            .lines()
            .find(|l| l.contains(&format!("request_id=\"{a_id}\"")))
            .unwrap_or_else(|| panic!("no access log line names {a_id}: {logs}"));
        assert!(
            line.contains("first_byte_ms=") && !line.contains("first_byte_ms=-"),
            "{line}"
        );
    }
}

both_hosts!(requests_carry_an_id_end_to_end);
