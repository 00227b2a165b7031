//! Helpers the end-to-end suites share: request bodies, SSE splitting, error checks.

use serde_json::{json, Value};

use crate::gateway::{Gateway, Host};
use sha2::{Digest, Sha256};

/// The SHA-256 hex a config stores for a consumer key.
pub fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A port nothing listens on: bound, then released.
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

pub fn user(text: &str) -> Value {
    json!([{ "role": "user", "content": text }])
}

pub fn assert_error(status: u16, body: &Value, want_status: u16, want_code: &str) {
    assert_eq!(status, want_status, "{body}");
    let e = &body["error"];
    assert_eq!(e["code"], want_code, "{body}");
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(e["type"].is_string(), "{body}");
}

/// Splits an SSE body into its `data:` payloads.
pub fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: ").map(str::to_string))
        .collect()
}

pub fn stream_text(events: &[String]) -> String {
    events
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

/// Generates one test per scenario and host: `native::NAME` and `envoy::NAME` (Envoy with two
/// workers), each calling `NAME(host)` of the invoking module.
#[macro_export]
macro_rules! both_hosts {
    ($($scenario:ident),* $(,)?) => {
        mod native {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario($crate::gateway::Host::Native).await;
                }
            )*
        }
        mod envoy {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario($crate::gateway::Host::Envoy { workers: 2 }).await;
                }
            )*
        }
    };
}

/// What a scenario runs against: a mock provider, a gateway in front of it (stopped when
/// dropped), and an HTTP client.
pub struct Stack {
    pub mock: crate::mock_provider::MockProvider,
    pub gateway: Gateway,
    pub http: reqwest::Client,
}

impl Stack {
    /// Starts a mock provider, then a gateway on the config `config` writes for it.
    pub async fn start(
        host: Host,
        config: impl FnOnce(&crate::mock_provider::MockProvider) -> String,
        env: Vec<(&'static str, &'static str)>,
    ) -> Stack {
        let mock = crate::mock_provider::MockProvider::start().await;
        let gateway = start_gateway(host, config(&mock), env).await;
        Stack {
            mock,
            gateway,
            http: client(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.gateway.base_url())
    }
}

/// The scenarios' HTTP client: generous timeout, so that a hung gateway fails a test rather
/// than hanging it.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .expect("an HTTP client")
}

/// Starts a gateway from an async test (the start itself blocks while the process comes up).
pub async fn start_gateway(
    host: Host,
    config: String,
    env: Vec<(&'static str, &'static str)>,
) -> Gateway {
    tokio::task::spawn_blocking(move || Gateway::start(host, &config, &env))
        .await
        .expect("the gateway start panicked")
}
