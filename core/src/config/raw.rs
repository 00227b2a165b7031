//! The config file as written: serde types that mirror the YAML/JSON one to one. Unknown
//! fields are errors. Nothing here is checked beyond shape; `compile` does the rest.

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// Address the native host listens on. Envoy takes its listener from its own bootstrap.
    pub listen: Option<String>,
    /// Largest request body accepted, in bytes; larger ones get 413.
    pub max_body_bytes: Option<u64>,
    /// How long to wait for a provider's response headers, in milliseconds.
    pub upstream_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConsumer {
    pub name: String,
    #[serde(default)]
    pub keys: Vec<RawConsumerKey>,
    /// Public model names or `*` globs this consumer may call.
    #[serde(default)]
    pub models: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConsumerKey {
    /// SHA-256 of the key, lower-case hex (`tollgate hash-key` prints it).
    pub sha256: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvider {
    pub name: String,
    pub kind: String,
    pub base_url: Option<String>,
    #[serde(default)]
    pub keys: Vec<RawProviderKey>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProviderKey {
    /// Name the key is known by in logs, metrics and the admin view.
    pub id: String,
    /// Environment variable that holds the secret. Secrets never live in the file.
    pub secret_env: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    /// Name clients send in `model`.
    pub name: String,
    pub provider: String,
    /// Name the provider knows the model by; defaults to `name`.
    pub upstream_model: Option<String>,
}
