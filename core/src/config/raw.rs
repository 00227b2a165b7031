//! The config file as written: serde types that mirror the YAML/JSON one to one. Unknown
//! fields are errors. Nothing here is checked beyond shape; `compile` does the rest.

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// Address the native host listens on. Envoy takes its listener from its own bootstrap.
    pub listen: Option<String>,
    /// Native host: where `GET /metrics` is served (default 127.0.0.1:9464; "" for nowhere).
    pub metrics_listen: Option<String>,
    /// Largest request body accepted, in bytes; larger ones get 413.
    pub max_body_bytes: Option<u64>,
    /// How long to wait for a provider's response headers, in milliseconds.
    pub upstream_timeout_ms: Option<u64>,
    /// Both hosts (Envoy: in its bootstrap): a client connection with no request in flight
    /// this long is closed.
    pub idle_timeout_ms: Option<u64>,
    /// Both hosts (Envoy: in its bootstrap): how long an HTTP/1 client may take to send a
    /// request head.
    pub header_read_timeout_ms: Option<u64>,
    /// Both hosts (Envoy: in its bootstrap): most client connections open at once; more are
    /// closed on accept.
    pub max_connections: Option<u64>,
    /// Both hosts (Envoy: in its bootstrap): most concurrent streams (requests) on one HTTP/2
    /// connection.
    pub http2_max_concurrent_streams: Option<u64>,
    /// Both hosts (Envoy: in its bootstrap): interval of HTTP/2 keep-alive pings; 0 sends none.
    pub http2_keepalive_interval_ms: Option<u64>,
    /// Both hosts (Envoy: in its bootstrap): how long a keep-alive ping may go unanswered
    /// before the connection is closed.
    pub http2_keepalive_timeout_ms: Option<u64>,
    /// Native host: most bytes of request bodies held at once, over all requests.
    pub max_body_memory_bytes: Option<u64>,
    /// Both hosts: how long a concurrency slot outlives a holder that stopped renewing it
    /// (default 10000; freed within one to two of these).
    pub concurrency_lease_ms: Option<u64>,
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
    #[serde(default)]
    pub limits: Option<RawLimits>,
    /// Limits of this consumer on one model, by public model name.
    #[serde(default)]
    pub model_limits: std::collections::BTreeMap<String, RawLimits>,
    /// Prompt template names or `*` globs this consumer may call.
    #[serde(default)]
    pub prompts: Vec<String>,
    /// Messages added to every chat request of this consumer.
    #[serde(default)]
    pub decorators: Option<RawDecorators>,
    /// Deny rules over the messages of this consumer's requests.
    #[serde(default)]
    pub guard: Vec<RawGuardRule>,
}

/// Messages added around a request's own: `prepend` before them, `append` after.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDecorators {
    #[serde(default)]
    pub prepend: Vec<RawMessage>,
    #[serde(default)]
    pub append: Vec<RawMessage>,
}

/// A chat message written in the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMessage {
    pub role: String,
    pub content: String,
}

/// A named deny rule: a request whose message text matches any pattern is refused with the
/// rule's name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGuardRule {
    pub name: String,
    /// Regular expressions (Rust `regex` syntax; `(?i)` for case-insensitive).
    pub deny: Vec<String>,
}

/// A prompt template: a name, the path it is published at, and its versions.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrompt {
    pub name: String,
    /// Defaults to `/v1/prompts/<name>`.
    pub path: Option<String>,
    pub versions: Vec<RawPromptVersion>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPromptVersion {
    /// A positive integer; the highest is served unless a client pins another.
    pub version: u32,
    /// A public model name.
    pub model: String,
    /// Generation parameters sent with the request (`temperature`, `max_tokens`, ...).
    #[serde(default)]
    pub params: serde_json::Map<String, serde_json::Value>,
    /// `raw` (default), `text` or `json`.
    pub response: Option<String>,
    #[serde(default)]
    pub variables: Vec<RawVariable>,
    /// Messages with `{{variable}}` placeholders.
    pub messages: Vec<RawMessage>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVariable {
    pub name: String,
    /// `string`, `number`, `boolean`, `enum` or `array` (of strings).
    #[serde(rename = "type")]
    pub kind: String,
    /// Required unless it has a default (default true).
    pub required: Option<bool>,
    pub default: Option<serde_json::Value>,
    /// Longest string (characters); for arrays, the longest item.
    pub max_length: Option<u64>,
    /// Arrays: most items.
    pub max_items: Option<u64>,
    /// Enums: the allowed values.
    #[serde(default)]
    pub values: Vec<String>,
    /// Shown to clients by `GET /v1/prompts`.
    pub description: Option<String>,
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
    #[serde(default)]
    pub key_health: Option<RawKeyHealth>,
    /// How an attempt picks its key: `most-headroom` (default), `round-robin`, `weighted`,
    /// `priority`.
    pub strategy: Option<String>,
    #[serde(default)]
    pub retry: Option<RawRetry>,
    /// `anthropic-version` sent upstream when the client sends none (kind `anthropic`).
    pub anthropic_version: Option<String>,
}

/// Retrying a failed attempt on another key; every field has a default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    /// Attempts per request, the first included (default 3; 1 turns retries off).
    pub attempts: Option<u32>,
    /// No attempt starts later than this after the request reached the gateway
    /// (default 30000).
    pub budget_ms: Option<u64>,
    /// Backoff before the second attempt; it doubles per attempt, with jitter (default 50).
    pub backoff_ms: Option<u64>,
    /// Longest backoff (default 1000).
    pub max_backoff_ms: Option<u64>,
}

/// How a pool treats keys the provider refuses; every field has a default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeyHealth {
    /// Cooldown after a 429 that gives no retry time (default 1000).
    pub cooldown_ms: Option<u64>,
    /// Longest cooldown, whatever the provider says (default 3600000).
    pub max_cooldown_ms: Option<u64>,
    /// How long a key refused with 401/403 is skipped before one request re-probes it
    /// (default 60000).
    pub revoked_probe_ms: Option<u64>,
    /// How long a key whose account is out of credit (the provider's "quota exhausted") is
    /// left out before it is tried again (default 3600000).
    pub exhausted_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProviderKey {
    /// Name the key is known by in logs, metrics and the admin view.
    pub id: String,
    /// Environment variable that holds the secret. Secrets never live in the file.
    pub secret_env: String,
    /// The key's own limits at the provider (requests and tokens; no cost budgets): the
    /// gateway never sends a key more than these.
    #[serde(default)]
    pub limits: Option<RawLimits>,
    /// Share of requests under the `weighted` strategy (default 1).
    pub weight: Option<u32>,
    /// Public model names or `*` globs this key serves; empty serves every model.
    #[serde(default)]
    pub models: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    /// Name clients send in `model`.
    pub name: String,
    pub provider: String,
    /// Name the provider knows the model by; defaults to `name`.
    pub upstream_model: Option<String>,
    /// Limits of the model across all consumers.
    #[serde(default)]
    pub limits: Option<RawLimits>,
    /// Completion tokens reserved when a request sets neither `max_tokens` nor
    /// `max_completion_tokens`.
    pub default_max_tokens: Option<u64>,
    pub pricing: Option<RawPricing>,
    /// Ids of the provider's keys this model may use (its own pool); empty means every
    /// key that serves it.
    #[serde(default)]
    pub keys: Vec<String>,
    /// Messages added to every chat request for this model.
    #[serde(default)]
    pub decorators: Option<RawDecorators>,
    /// Deny rules over the messages of every request for this model.
    #[serde(default)]
    pub guard: Vec<RawGuardRule>,
    /// Other public models that serve a request for this one, in order, when it cannot:
    /// no usable key, or its attempts fail in a way another provider may not.
    #[serde(default)]
    pub fallbacks: Vec<String>,
}

/// Limits of one scope (a consumer, a consumer on one model, or a model across consumers).
/// Every field is optional; what is set applies.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub requests_per_second: Option<u64>,
    pub requests_per_minute: Option<u64>,
    pub requests_per_hour: Option<u64>,
    pub requests_per_day: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub tokens_per_hour: Option<u64>,
    pub tokens_per_day: Option<u64>,
    /// Requests in flight at once.
    pub concurrency: Option<u64>,
    /// Tokens per calendar day / month (UTC); resets at the boundary.
    pub daily_tokens: Option<u64>,
    pub monthly_tokens: Option<u64>,
    /// Spend per calendar day / month (UTC) in US dollars, from the models' `pricing`.
    pub daily_cost_usd: Option<f64>,
    pub monthly_cost_usd: Option<f64>,
}

/// A model's price in US dollars per million tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPricing {
    pub input_per_million: f64,
    pub output_per_million: f64,
    /// Prompt tokens the provider served from its cache; defaults to the input price.
    pub cached_input_per_million: Option<f64>,
    /// Prompt tokens the provider wrote to its cache (Anthropic's cache writes); defaults to
    /// 1.25× the input price for Anthropic models (what Anthropic charges for its 5-minute
    /// cache), the input price otherwise.
    pub cache_write_per_million: Option<f64>,
}
