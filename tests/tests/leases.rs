//! Concurrency slots are leases (core/src/limits/concurrency.rs): a live request renews its
//! slot, however long it runs; the slot of a request whose holder died comes back by itself.
//! In Envoy, a VM that traps is reloaded (`failure_policy: FAIL_RELOAD`) and the slots its
//! requests held are free again within two leases: shown with a test build of the filter
//! that crashes on request (`make wasm-trap`), never the release module.
//!
//! Every wait is a hang guard with a generous bound, except one: a slot must still be held
//! right after the VM died, well within one lease (5 s).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_e2e::both_hosts;
use tollgate_e2e::gateway::{trap_wasm_path, Gateway, Host};
use tollgate_e2e::mock_provider::{Fault, MockProvider};
use tollgate_e2e::scenario::{client, fresh_client, sha256_hex, user, Stack};

const APP_KEY: &str = "tg-leases-app-key";
const KEY: &str = "sk-leases-provider";

fn config(mock: &MockProvider, lease_ms: u64) -> String {
    format!(
        r#"
server:
  upstream_timeout_ms: 30000
  concurrency_lease_ms: {lease_ms}
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
    keys: [{{ id: only, secret_env: TG_LEASES_KEY }}]
models:
  - {{ name: gpt-4o-mini, provider: upstream }}
"#,
        app = sha256_hex(APP_KEY),
        base = mock.base_url(),
    )
}

fn chat() -> Value {
    json!({ "model": "gpt-4o-mini", "max_tokens": 10, "messages": user("hi") })
}

async fn post(http: &reqwest::Client, url: &str, body: &Value) -> reqwest::Response {
    http.post(format!("{url}/v1/chat/completions"))
        .bearer_auth(APP_KEY)
        .json(body)
        .send()
        .await
        .expect("the gateway answers")
}

/// Asserts a refusal by the consumer's concurrency limit.
async fn assert_refused_for_concurrency(r: reqwest::Response, context: &str) {
    let status = r.status();
    let body: Value = r.json().await.unwrap_or_default();
    assert_eq!(status, 429, "{context}: {body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("concurrency"), "{context}: {body}");
}

/// Sends a chat request until the concurrency limit admits it, within `bound`; returns the
/// admitted response. Envoy's 503s while a VM reloads are not answers (`past_reload`).
async fn post_when_admitted(url: &str, bound: Duration, context: &str) -> reqwest::Response {
    let deadline = Instant::now() + bound;
    loop {
        let r = past_reload(url).await;
        if r.status() != 429 {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "{context}: the slot stayed taken: {}",
            r.text().await.unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends a chat request on a fresh connection until an answer other than Envoy's own empty
/// 503, which the crashed VM's worker gives while the reload backoff runs (1 s, see
/// docs/envoy.md), within 15 s.
async fn past_reload(url: &str) -> reqwest::Response {
    let http = fresh_client();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = post(&http, url, &chat()).await;
        let reloading = r.status() == 503 && r.content_length() == Some(0);
        if !reloading {
            return r;
        }
        assert!(Instant::now() < deadline, "the crashed VM was not reloaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A stream that lasts several leases keeps its slot all along (its host renews it), and
/// gives it back when it ends. With a 1 s lease, a slot not renewed would be gone after 2 s.
async fn a_stream_longer_than_its_lease_keeps_its_slot(host: Host) {
    const LEASE_MS: u64 = 1_000;
    let f = Stack::start(
        host,
        |mock| config(mock, LEASE_MS),
        vec![("TG_LEASES_KEY", KEY)],
    )
    .await;
    let release = Arc::new(tokio::sync::Notify::new());
    f.mock.set_fault(
        KEY,
        Fault::HoldStream {
            release: Arc::clone(&release),
        },
    );
    let mut stream = chat();
    stream["stream"] = json!(true);
    let mut r = post(&f.http, &f.gateway.base_url(), &stream).await;
    assert_eq!(r.status(), 200);
    r.chunk().await.unwrap().unwrap();
    f.mock.clear_fault(KEY);
    // Three and a half leases later, the stream still holds the only slot.
    tokio::time::sleep(Duration::from_millis(7 * LEASE_MS / 2)).await;
    let busy = post(&fresh_client(), &f.gateway.base_url(), &chat()).await;
    assert_refused_for_concurrency(busy, "while the stream runs").await;
    release.notify_one();
    while let Ok(Some(_)) = r.chunk().await {}
    let r = post_when_admitted(
        &f.gateway.base_url(),
        Duration::from_secs(15),
        "after the stream",
    )
    .await;
    assert_eq!(r.status(), 200);
}

both_hosts!(a_stream_longer_than_its_lease_keeps_its_slot);

/// In Envoy, a request crashes its worker's VM (a trap, as a bug would) while it holds the
/// consumer's only concurrency slot. Envoy reloads the VM; the slot, in shared data that
/// outlives the VM, is still taken at once, and free again within two leases — no `on_log`
/// ever runs for that request. Afterwards every worker serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_vm_is_reloaded_and_its_slots_come_back() {
    const LEASE_MS: u64 = 5_000;
    let mock = MockProvider::start().await;
    let config = config(&mock, LEASE_MS);
    let wasm = trap_wasm_path();
    let gateway = tokio::task::spawn_blocking(move || {
        Gateway::start_envoy_with_module(&config, &[("TG_LEASES_KEY", KEY)], 2, &wasm)
    })
    .await
    .expect("Envoy starts");
    let url = gateway.base_url();

    let sent = Instant::now();
    let crashed = client()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(APP_KEY)
        .header("x-tollgate-test-trap", "1")
        .json(&chat())
        .send()
        .await;
    // Envoy goes on with the response the dead VM's filter no longer sees (or resets it).
    let crashed_status = crashed.map(|r| r.status().as_u16());
    let logs = gateway.logs();
    assert!(
        logs.contains("trapping on purpose"),
        "the VM did not crash (client got {crashed_status:?}): {logs}"
    );

    let busy = past_reload(&url).await;
    let elapsed = sent.elapsed();
    assert!(
        elapsed < Duration::from_millis(LEASE_MS),
        "too slow to see the slot taken: {elapsed:?} after the crash"
    );
    assert_refused_for_concurrency(busy, "right after the crash").await;

    let r = post_when_admitted(
        &url,
        Duration::from_millis(2 * LEASE_MS) + Duration::from_secs(15),
        "after the crash",
    )
    .await;
    // Past the reload backoff, the reloaded VM serves too (no more 503).
    let status = r.status();
    assert_eq!(
        status,
        200,
        "{}\n{}",
        r.text().await.unwrap_or_default(),
        gateway.logs()
    );
    let freed_after = sent.elapsed();
    assert!(
        freed_after >= Duration::from_millis(LEASE_MS) - Duration::from_millis(100),
        "freed after {freed_after:?}: before its lease ran out, so not by the lease"
    );

    // Both workers' VMs serve, the reloaded one included.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = past_reload(&url).await;
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
        let counts = gateway.envoy_worker_connections().expect("worker stats");
        if counts.iter().all(|&n| n > 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every worker served: {counts:?}"
        );
    }
}
