//! The gateway's configuration: parsed from YAML or JSON (the same schema in both hosts),
//! checked as a whole, and compiled into an immutable `Config` that requests share. Every
//! problem is reported at once, each with its path. Environment variables are read through a
//! lookup the host passes in, never directly.

mod limits;
mod prompts;
pub mod raw;
pub mod store;

pub use limits::Pricing;

use std::collections::{BTreeMap, BTreeSet};

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::auth::KeyHash;
use crate::decorators::Decorators;
use crate::guard::GuardRule;
use crate::keys::Strategy;
use crate::limits::{Limit, Meter, Unit};
use crate::prompts::PromptTemplate;
use crate::providers::{BaseUrl, Provider, ProviderKey, ProviderKind, Secret};
use crate::retry::RetryPolicy;
use raw::{RawConsumer, RawModel, RawPrompt, RawProvider, RawServer};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_MAX_BODY_BYTES: u64 = 1024 * 1024;
pub const DEFAULT_UPSTREAM_TIMEOUT_MS: u64 = 120_000;
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 60_000;
pub const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 30_000;
pub const DEFAULT_MAX_CONNECTIONS: u64 = 16_384;
pub const DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS: u64 = 100;
pub const DEFAULT_HTTP2_KEEPALIVE_INTERVAL_MS: u64 = 30_000;
pub const DEFAULT_HTTP2_KEEPALIVE_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_MAX_BODY_MEMORY_BYTES: u64 = 256 * 1024 * 1024;
/// A concurrency slot whose holder died comes back within one to two of these.
pub const DEFAULT_CONCURRENCY_LEASE_MS: u64 = 10_000;
/// Where the native host serves `GET /metrics` (Prometheus' exporter port range).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";
/// Completion tokens reserved for a request that names no maximum, unless the model says.
pub const DEFAULT_MAX_TOKENS: u64 = 4_096;

/// One problem in a config, at a path such as `providers[1].keys[0].secret_env`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

/// All the problems found in a config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            if e.path.is_empty() {
                write!(f, "{}", e.message)?;
            } else {
                write!(f, "{}: {}", e.path, e.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[derive(Default)]
pub(crate) struct Errors(Vec<ConfigError>);

impl Errors {
    fn at(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }
}

/// Settings of the request path that are not policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// Native host only: Envoy listens where its bootstrap says.
    pub listen: String,
    /// Native host: where `GET /metrics` is served; empty for nowhere. Envoy exports its
    /// metrics on its admin interface.
    pub metrics_listen: String,
    pub max_body_bytes: u64,
    pub upstream_timeout_ms: u64,
    /// Native host: a client connection with no request in flight (none yet, or none since
    /// the last response ended) for this long is closed.
    pub idle_timeout_ms: u64,
    /// Native host: how long an HTTP/1 client may take to send a request head once it began.
    pub header_read_timeout_ms: u64,
    /// Native host: connections beyond this many are closed as soon as they are accepted.
    pub max_connections: u64,
    /// Native host: most requests in flight on one HTTP/2 connection.
    pub http2_max_concurrent_streams: u64,
    /// Native host: interval of HTTP/2 keep-alive pings; 0 sends none.
    pub http2_keepalive_interval_ms: u64,
    /// Native host: a keep-alive ping unanswered this long closes the connection.
    pub http2_keepalive_timeout_ms: u64,
    /// Native host: most bytes of request bodies held at once over all requests; a request
    /// whose body does not fit in what is left gets 503 at once.
    pub max_body_memory_bytes: u64,
    /// Both hosts: the lease of a concurrency slot (see `limits::concurrency`). Live requests
    /// renew theirs every half lease; the slots of a holder that died (an Envoy VM that
    /// trapped) come back within one to two leases.
    pub concurrency_lease_ms: u64,
}

pub type ProviderId = usize;
pub type ModelId = usize;
pub type ConsumerId = usize;
pub type PromptId = usize;

/// A public model name and where it is served.
#[derive(Debug)]
pub struct Model {
    pub name: String,
    pub provider: ProviderId,
    pub upstream_model: String,
    /// Limits across all consumers.
    pub limits: Vec<Limit>,
    pub default_max_tokens: u64,
    pub pricing: Option<Pricing>,
    /// Indexes of the provider's keys that serve this model (its pool), in listed order.
    pub pool: Vec<usize>,
    /// The models that serve a request for this one when it cannot, in order (its chain
    /// after itself). Not followed further: a fallback's own fallbacks are its own.
    pub fallbacks: Vec<ModelId>,
    /// Store key of the pool's turn cursor, shared by every worker. One per model: models
    /// with different pools sharing one cursor would each see only some turns.
    pub cursor_key: String,
    /// Store keys of the pool's keys' health for this model's upstream model, parallel to
    /// `pool` (see `keys::model_health_key`); empty when the provider's rate limits are
    /// key-wide (`providers::refusal::limits_per_model`).
    pub key_model_health: Vec<String>,
    pub decorators: Decorators,
    pub guard: Vec<GuardRule>,
}

/// A client of the gateway, known by the hashes of its keys.
#[derive(Debug)]
pub struct Consumer {
    pub name: String,
    /// Indexed by `ModelId`.
    allowed_models: Vec<bool>,
    /// The `GET /v1/models` answer for this consumer, rendered once.
    models_list: Vec<u8>,
    pub limits: Vec<Limit>,
    /// This consumer's limits on one model.
    pub model_limits: BTreeMap<ModelId, Vec<Limit>>,
    /// Indexed by `PromptId`.
    allowed_prompts: Vec<bool>,
    /// The `GET /v1/prompts` answer for this consumer, rendered once.
    prompts_list: Vec<u8>,
    pub decorators: Decorators,
    pub guard: Vec<GuardRule>,
}

impl Consumer {
    pub fn may_use(&self, model: ModelId) -> bool {
        self.allowed_models.get(model).copied().unwrap_or(false)
    }

    pub fn may_call(&self, prompt: PromptId) -> bool {
        self.allowed_prompts.get(prompt).copied().unwrap_or(false)
    }

    pub fn prompts_list(&self) -> &[u8] {
        &self.prompts_list
    }

    pub fn models_list(&self) -> &[u8] {
        &self.models_list
    }
}

/// The compiled configuration. Immutable; shared by every request.
#[derive(Debug)]
pub struct Config {
    pub server: ServerSettings,
    /// Where shared state lives: in the process, or on Redis for several replicas.
    pub store: store::StoreSettings,
    consumers: Vec<Consumer>,
    /// Stored key hashes by their first eight bytes (collisions share a list).
    consumer_by_key: BTreeMap<u64, Vec<(KeyHash, ConsumerId)>>,
    providers: Vec<Provider>,
    models: Vec<Model>,
    model_by_name: BTreeMap<String, ModelId>,
    prompts: Vec<PromptTemplate>,
    prompt_by_path: BTreeMap<String, PromptId>,
}

impl Config {
    /// Parses and compiles a YAML or JSON document. `env` looks up environment variables
    /// (the hosts pass `std::env::var`); it is how provider secrets enter.
    pub fn load(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigErrors> {
        let doc: Value = match serde_yaml::from_str(text) {
            Ok(Value::Null) => Value::Object(Default::default()),
            Ok(v) => v,
            Err(e) => {
                return Err(ConfigErrors(vec![ConfigError {
                    path: String::new(),
                    message: format!("not valid YAML or JSON: {e}"),
                }]))
            }
        };
        let mut errors = Errors::default();
        let config = compile(&doc, env, &mut errors);
        match config {
            Some(c) if errors.0.is_empty() => Ok(c),
            _ => Err(ConfigErrors(errors.0)),
        }
    }

    /// Only the `store` section of a config document, checked: for `tollgate
    /// store-server`, which holds no provider secrets and serves whatever config the
    /// gateways run.
    pub fn load_store(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<store::StoreSettings, ConfigErrors> {
        let doc: Value = serde_yaml::from_str(text).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: String::new(),
                message: format!("not valid YAML or JSON: {e}"),
            }])
        })?;
        let mut errors = Errors::default();
        let store = match doc.get("store") {
            None | Some(Value::Null) => Some(store::RawStore::default()),
            Some(v) => one::<store::RawStore>(v, "store", &mut errors),
        }
        .map(|raw| store::compile_store(raw, env, &mut errors))
        .unwrap_or_default();
        if errors.0.is_empty() {
            Ok(store)
        } else {
            Err(ConfigErrors(errors.0))
        }
    }

    pub fn providers(&self) -> &[Provider] {
        &self.providers
    }

    pub fn provider(&self, id: ProviderId) -> Option<&Provider> {
        self.providers.get(id)
    }

    pub fn provider_by_name(&self, name: &str) -> Option<&Provider> {
        self.providers.iter().find(|p| p.name == name)
    }

    pub fn models(&self) -> &[Model] {
        &self.models
    }

    /// Whether some model has fallbacks (Envoy's routes then pick their cluster per attempt).
    pub fn has_chains(&self) -> bool {
        self.models.iter().any(|m| !m.fallbacks.is_empty())
    }

    pub fn model(&self, id: ModelId) -> Option<&Model> {
        self.models.get(id)
    }

    pub fn model_id(&self, name: &str) -> Option<ModelId> {
        self.model_by_name.get(name).copied()
    }

    pub fn prompts(&self) -> &[PromptTemplate] {
        &self.prompts
    }

    pub fn prompt(&self, id: PromptId) -> Option<&PromptTemplate> {
        self.prompts.get(id)
    }

    /// The template published at `path`, if any.
    pub fn prompt_at(&self, path: &str) -> Option<PromptId> {
        self.prompt_by_path.get(path).copied()
    }

    pub fn consumers(&self) -> &[Consumer] {
        &self.consumers
    }

    pub fn consumer(&self, id: ConsumerId) -> Option<&Consumer> {
        self.consumers.get(id)
    }

    /// Every limit in the config: the counters a host may create up front.
    pub fn all_limits(&self) -> impl Iterator<Item = &Limit> {
        let consumers = self
            .consumers
            .iter()
            .flat_map(|c| c.limits.iter().chain(c.model_limits.values().flatten()));
        let keys = self
            .providers
            .iter()
            .flat_map(|p| p.keys.iter().flat_map(|k| k.limits.iter()));
        consumers
            .chain(self.models.iter().flat_map(|m| m.limits.iter()))
            .chain(keys)
    }

    /// This process's share of every limit when `replicas` processes enforce them apart
    /// (`store.on_failure: local` while Redis is down): each limit divided by `replicas`,
    /// never below 1, with counters of its own.
    pub fn divide_limits(&mut self, replicas: u64) {
        let replicas = replicas.max(1);
        let share = |limits: &mut Vec<Limit>| {
            for limit in limits.iter_mut() {
                limit.meter = match limit.meter {
                    Meter::Rate(r) => Meter::Rate(crate::limits::gcra::Rate {
                        limit: (r.limit / replicas).max(1),
                        ..r
                    }),
                    Meter::Quota(q) => Meter::Quota(crate::limits::quota::Quota {
                        limit: (q.limit / replicas).max(1),
                        ..q
                    }),
                    Meter::Concurrency(c) => {
                        Meter::Concurrency(crate::limits::concurrency::Concurrency {
                            max: (c.max / replicas).max(1),
                            ..c
                        })
                    }
                };
                limit.store_key = format!("share/{replicas}/{}", limit.store_key).into();
            }
        };
        for c in &mut self.consumers {
            share(&mut c.limits);
            c.model_limits.values_mut().for_each(share);
        }
        for m in &mut self.models {
            share(&mut m.limits);
        }
        for p in &mut self.providers {
            for k in &mut p.keys {
                share(&mut k.limits);
            }
        }
    }

    /// Every shared counter the key pools use (cursors, health — per key, and per key and
    /// upstream model where limits are per model —, headroom, key counters), for hosts that
    /// create counters up front.
    pub fn pool_store_keys(&self) -> impl Iterator<Item = &str> {
        let cursors = self.models.iter().flat_map(|m| {
            std::iter::once(m.cursor_key.as_str())
                .chain(m.key_model_health.iter().map(String::as_str))
        });
        let keys = self
            .providers
            .iter()
            .flat_map(|p| p.keys.iter().flat_map(ProviderKey::store_keys));
        cursors.chain(keys)
    }

    /// Every limit a request of `consumer` to `model` counts against.
    pub fn limits_for(&self, consumer: ConsumerId, model: ModelId) -> impl Iterator<Item = &Limit> {
        let own = self
            .consumer(consumer)
            .map(|c| c.limits.as_slice())
            .unwrap_or_default();
        own.iter().chain(self.model_limits_for(consumer, model))
    }

    /// The limits of `limits_for` that belong to the model: the model's own, and the
    /// consumer's on that model. A request that fails over moves these to its fallback.
    pub fn model_limits_for(
        &self,
        consumer: ConsumerId,
        model: ModelId,
    ) -> impl Iterator<Item = &Limit> {
        let on_model = self
            .consumer(consumer)
            .and_then(|c| c.model_limits.get(&model))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let model = self
            .model(model)
            .map(|m| m.limits.as_slice())
            .unwrap_or_default();
        on_model.iter().chain(model)
    }

    /// The consumer a presented key belongs to. The index is searched by the first eight
    /// bytes of the key's SHA-256, so its timing tells an attacker only about hashes of
    /// their own input; the whole hash is then compared in constant time.
    pub fn authenticate(&self, presented: &str) -> Option<ConsumerId> {
        let hash = KeyHash::of(presented);
        self.consumer_by_key
            .get(&hash.prefix())?
            .iter()
            .fold(None, |found, (stored, id)| {
                if stored.ct_eq(&hash) {
                    Some(*id)
                } else {
                    found
                }
            })
    }
}

/// Names used in headers, cluster names and store keys: keep them to a safe alphabet.
fn check_name(errors: &mut Errors, path: &str, name: &str) {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !ok {
        errors.at(
            path,
            format!("`{name}` must be 1-64 characters of letters, digits, `-`, `_` or `.`"),
        );
    }
}

/// Deserializes one section element by element, so that a bad element is reported with its
/// index and the rest are still checked.
fn list<T: DeserializeOwned>(doc: &Value, section: &str, errors: &mut Errors) -> Vec<Option<T>> {
    match doc.get(section) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| one(item, &format!("{section}[{i}]"), errors))
            .collect(),
        Some(_) => {
            errors.at(section, "must be a list");
            Vec::new()
        }
    }
}

fn one<T: DeserializeOwned>(value: &Value, path: &str, errors: &mut Errors) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(v) => Some(v),
        Err(e) => {
            let inner = e.path().to_string();
            let full = if inner == "." {
                path.to_string()
            } else if inner.starts_with('[') {
                format!("{path}{inner}")
            } else {
                format!("{path}.{inner}")
            };
            errors.at(full, e.into_inner().to_string());
            None
        }
    }
}

const SECTIONS: [&str; 6] = [
    "server",
    "store",
    "consumers",
    "providers",
    "models",
    "prompts",
];

fn compile(
    doc: &Value,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Errors,
) -> Option<Config> {
    let Some(top) = doc.as_object() else {
        errors.at(
            "",
            "the config must be a mapping with `server`, `consumers`, `providers`, `models` and `prompts`",
        );
        return None;
    };
    for key in top.keys() {
        if !SECTIONS.contains(&key.as_str()) {
            errors.at(
                key.as_str(),
                format!("unknown section, expected one of {SECTIONS:?}"),
            );
        }
    }

    let server = match doc.get("server") {
        None | Some(Value::Null) => Some(RawServer::default()),
        Some(v) => one::<RawServer>(v, "server", errors),
    }
    .map(|raw| compile_server(raw, errors));
    let store = match doc.get("store") {
        None | Some(Value::Null) => Some(store::RawStore::default()),
        Some(v) => one::<store::RawStore>(v, "store", errors),
    }
    .map(|raw| store::compile_store(raw, env, errors))
    .unwrap_or_default();
    let lease_ms = server
        .as_ref()
        .map_or(DEFAULT_CONCURRENCY_LEASE_MS, |s| s.concurrency_lease_ms);

    let providers = compile_providers(
        list::<RawProvider>(doc, "providers", errors),
        env,
        lease_ms,
        errors,
    );
    let models = compile_models(
        list::<RawModel>(doc, "models", errors),
        &providers,
        lease_ms,
        errors,
    );
    let prompts =
        prompts::compile_prompts(list::<RawPrompt>(doc, "prompts", errors), &models, errors);
    let (consumers, consumer_by_key) = compile_consumers(
        list::<RawConsumer>(doc, "consumers", errors),
        &models,
        &providers,
        &prompts,
        lease_ms,
        errors,
    );
    let model_by_name = models
        .iter()
        .enumerate()
        .map(|(i, m)| (m.name.clone(), i))
        .collect();
    let prompt_by_path = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| (p.path.clone(), i))
        .collect();
    Some(Config {
        server: server?,
        store,
        consumers,
        consumer_by_key,
        providers,
        models,
        model_by_name,
        prompts,
        prompt_by_path,
    })
}

fn compile_server(raw: RawServer, errors: &mut Errors) -> ServerSettings {
    let listen = raw.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    if listen.parse::<std::net::SocketAddr>().is_err() {
        errors.at(
            "server.listen",
            format!("`{listen}` is not an address like 127.0.0.1:8080"),
        );
    }
    let metrics_listen = raw
        .metrics_listen
        .unwrap_or_else(|| DEFAULT_METRICS_LISTEN.to_string());
    if !metrics_listen.is_empty() && metrics_listen.parse::<std::net::SocketAddr>().is_err() {
        errors.at(
            "server.metrics_listen",
            format!("`{metrics_listen}` is not an address like 127.0.0.1:9464 (or \"\" for none)"),
        );
    }
    let max_body_bytes = raw.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
    if max_body_bytes == 0 || max_body_bytes > 64 * 1024 * 1024 {
        errors.at(
            "server.max_body_bytes",
            "must be between 1 and 67108864 (64 MiB)",
        );
    }
    let upstream_timeout_ms = raw
        .upstream_timeout_ms
        .unwrap_or(DEFAULT_UPSTREAM_TIMEOUT_MS);
    if upstream_timeout_ms == 0 {
        errors.at("server.upstream_timeout_ms", "must be at least 1");
    }
    let mut within = |field: &str, value: Option<u64>, default: u64, min: u64, max: u64| {
        let value = value.unwrap_or(default);
        if !(min..=max).contains(&value) {
            errors.at(
                format!("server.{field}"),
                format!("must be between {min} and {max}"),
            );
        }
        value
    };
    const DAY_MS: u64 = 86_400_000;
    let idle_timeout_ms = within(
        "idle_timeout_ms",
        raw.idle_timeout_ms,
        DEFAULT_IDLE_TIMEOUT_MS,
        1,
        DAY_MS,
    );
    let header_read_timeout_ms = within(
        "header_read_timeout_ms",
        raw.header_read_timeout_ms,
        DEFAULT_HEADER_READ_TIMEOUT_MS,
        1,
        DAY_MS,
    );
    let max_connections = within(
        "max_connections",
        raw.max_connections,
        DEFAULT_MAX_CONNECTIONS,
        1,
        1_000_000,
    );
    let http2_max_concurrent_streams = within(
        "http2_max_concurrent_streams",
        raw.http2_max_concurrent_streams,
        DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS,
        1,
        10_000,
    );
    let http2_keepalive_interval_ms = within(
        "http2_keepalive_interval_ms",
        raw.http2_keepalive_interval_ms,
        DEFAULT_HTTP2_KEEPALIVE_INTERVAL_MS,
        0,
        DAY_MS,
    );
    let http2_keepalive_timeout_ms = within(
        "http2_keepalive_timeout_ms",
        raw.http2_keepalive_timeout_ms,
        DEFAULT_HTTP2_KEEPALIVE_TIMEOUT_MS,
        1,
        DAY_MS,
    );
    let concurrency_lease_ms = within(
        "concurrency_lease_ms",
        raw.concurrency_lease_ms,
        DEFAULT_CONCURRENCY_LEASE_MS,
        200,
        DAY_MS,
    );
    const MAX_BODY_MEMORY: u64 = 64 * 1024 * 1024 * 1024;
    let max_body_memory_bytes = raw
        .max_body_memory_bytes
        .unwrap_or(DEFAULT_MAX_BODY_MEMORY_BYTES);
    if !(max_body_bytes..=MAX_BODY_MEMORY).contains(&max_body_memory_bytes) {
        errors.at(
            "server.max_body_memory_bytes",
            format!(
                "must be between server.max_body_bytes ({max_body_bytes}) and {MAX_BODY_MEMORY} \
                 (64 GiB): a body the size of max_body_bytes must fit"
            ),
        );
    }
    ServerSettings {
        listen,
        metrics_listen,
        max_body_bytes,
        upstream_timeout_ms,
        idle_timeout_ms,
        header_read_timeout_ms,
        max_connections,
        http2_max_concurrent_streams,
        http2_keepalive_interval_ms,
        http2_keepalive_timeout_ms,
        max_body_memory_bytes,
        concurrency_lease_ms,
    }
}

#[cfg(test)]
mod server_connection_settings {
    use super::*;

    fn none(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn defaults_apply_and_values_are_read() {
        let c = Config::load("server: {}", &none).unwrap();
        assert_eq!(c.server.idle_timeout_ms, DEFAULT_IDLE_TIMEOUT_MS);
        assert_eq!(
            c.server.header_read_timeout_ms,
            DEFAULT_HEADER_READ_TIMEOUT_MS
        );
        assert_eq!(c.server.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(
            c.server.max_body_memory_bytes,
            DEFAULT_MAX_BODY_MEMORY_BYTES
        );
        let c = Config::load(
            "server: { idle_timeout_ms: 500, max_connections: 20, http2_keepalive_interval_ms: 0, \
             max_body_bytes: 1000, max_body_memory_bytes: 1000 }",
            &none,
        )
        .unwrap();
        assert_eq!(c.server.idle_timeout_ms, 500);
        assert_eq!(c.server.max_connections, 20);
        assert_eq!(c.server.http2_keepalive_interval_ms, 0);
        assert_eq!(c.server.max_body_memory_bytes, 1000);
    }

    #[test]
    fn out_of_range_values_are_reported_with_their_paths() {
        let errs = Config::load(
            "server: { idle_timeout_ms: 0, header_read_timeout_ms: 0, max_connections: 0, \
             http2_max_concurrent_streams: 0, http2_keepalive_timeout_ms: 0, \
             concurrency_lease_ms: 100, max_body_bytes: 2000, max_body_memory_bytes: 1000 }",
            &none,
        )
        .unwrap_err();
        let paths: Vec<_> = errs.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "server.idle_timeout_ms",
                "server.header_read_timeout_ms",
                "server.max_connections",
                "server.http2_max_concurrent_streams",
                "server.http2_keepalive_timeout_ms",
                "server.concurrency_lease_ms",
                "server.max_body_memory_bytes",
            ]
        );
    }

    #[test]
    fn concurrency_limits_carry_the_lease_and_name_it_in_their_key() {
        let text = |lease: &str, max: u64| {
            format!(
                "server: {{ {lease} }}\nconsumers: [{{ name: a, keys: [{{ sha256: {} }}], \
                 limits: {{ concurrency: {max} }} }}]",
                "ab".repeat(32)
            )
        };
        let c = Config::load(&text("", 3), &none).unwrap();
        let limit = c.all_limits().next().unwrap();
        assert_eq!(
            limit.meter,
            crate::limits::Meter::Concurrency(crate::limits::Concurrency {
                max: 3,
                lease_ms: DEFAULT_CONCURRENCY_LEASE_MS
            })
        );
        let c = Config::load(&text("concurrency_lease_ms: 2000", 3), &none).unwrap();
        let limit = c.all_limits().next().unwrap();
        assert!(
            limit.store_key.ends_with("/concurrency/3/2000"),
            "{}",
            limit.store_key
        );
        let errs = Config::load(&text("", 1 << 20), &none).unwrap_err();
        assert_eq!(errs.0[0].path, "consumers[0].limits.concurrency", "{errs}");
    }
}

fn compile_providers(
    raws: Vec<Option<RawProvider>>,
    env: &dyn Fn(&str) -> Option<String>,
    lease_ms: u64,
    errors: &mut Errors,
) -> Vec<Provider> {
    let mut names = BTreeSet::new();
    let mut out = Vec::new();
    for (i, raw) in raws.into_iter().enumerate() {
        let Some(raw) = raw else { continue };
        let path = format!("providers[{i}]");
        check_name(errors, &format!("{path}.name"), &raw.name);
        if !names.insert(raw.name.clone()) {
            errors.at(
                format!("{path}.name"),
                format!("provider `{}` is defined twice", raw.name),
            );
        }
        let Some(kind) = ProviderKind::parse(&raw.kind) else {
            errors.at(
                format!("{path}.kind"),
                format!(
                    "unknown kind `{}`, expected one of {:?}",
                    raw.kind,
                    ProviderKind::NAMES
                ),
            );
            continue;
        };
        let base_url = match (&raw.base_url, kind.is_upstream()) {
            (Some(u), true) => BaseUrl::parse(u)
                .map_err(|e| errors.at(format!("{path}.base_url"), e))
                .ok(),
            (None, true) if kind.default_base_url().is_some() => {
                kind.default_base_url().and_then(|u| BaseUrl::parse(u).ok())
            }
            (None, true) => {
                errors.at(
                    format!("{path}.base_url"),
                    format!("is required for kind `{}`", raw.kind),
                );
                None
            }
            (Some(_), false) => {
                errors.at(
                    format!("{path}.base_url"),
                    "the mock provider is answered by the gateway and takes no base_url",
                );
                None
            }
            (None, false) => None,
        };
        if !kind.is_upstream() && !raw.keys.is_empty() {
            errors.at(format!("{path}.keys"), "the mock provider takes no keys");
        }
        let mut ids = BTreeSet::new();
        let mut keys = Vec::new();
        for (j, k) in raw.keys.iter().enumerate() {
            let kpath = format!("{path}.keys[{j}]");
            check_name(errors, &format!("{kpath}.id"), &k.id);
            if !ids.insert(k.id.as_str()) {
                errors.at(
                    format!("{kpath}.id"),
                    format!("key id `{}` is used twice in this provider", k.id),
                );
            }
            let key_limits = k.limits.as_ref().map_or_else(Vec::new, |l| {
                let scope = format!("key `{}` of provider `{}`", k.id, raw.name);
                let store_key = format!("k/{}/{}", raw.name, k.id);
                limits::compile_limits(
                    l,
                    &format!("{kpath}.limits"),
                    &scope,
                    &format!("key:{}/{}", raw.name, k.id),
                    &store_key,
                    lease_ms,
                    errors,
                )
            });
            if key_limits.iter().any(|l| l.unit == Unit::MicroUsd) {
                errors.at(
                    format!("{kpath}.limits"),
                    "a key takes request and token limits; put cost budgets on consumers or models",
                );
            }
            let weight = k.weight.unwrap_or(1);
            if weight == 0 {
                errors.at(format!("{kpath}.weight"), "must be at least 1");
            }
            for (m, pattern) in k.models.iter().enumerate() {
                if pattern.is_empty() {
                    errors.at(format!("{kpath}.models[{m}]"), "must not be empty");
                }
            }
            match env(&k.secret_env) {
                Some(s) if !s.trim().is_empty() => {
                    let mut key = ProviderKey::new(
                        kind,
                        k.id.clone(),
                        k.secret_env.clone(),
                        &Secret::new(s.trim().to_string()),
                        key_limits,
                    );
                    key.weight = weight.max(1);
                    key.config_path = kpath.clone();
                    key.models = k.models.clone();
                    keys.push(key);
                }
                Some(_) => errors.at(
                    format!("{kpath}.secret_env"),
                    format!("env var {} is empty", k.secret_env),
                ),
                None => errors.at(
                    format!("{kpath}.secret_env"),
                    format!("env var {} is not set", k.secret_env),
                ),
            }
        }
        let mut provider = Provider::new(raw.name, kind, base_url, keys);
        match (&raw.anthropic_version, kind) {
            (Some(v), ProviderKind::Anthropic) if !v.trim().is_empty() => {
                provider.anthropic_version = v.trim().to_string();
            }
            (Some(_), ProviderKind::Anthropic) => {
                errors.at(format!("{path}.anthropic_version"), "must not be empty")
            }
            (Some(_), _) => errors.at(
                format!("{path}.anthropic_version"),
                format!(
                    "only a provider of kind `anthropic` takes it, not `{}`",
                    raw.kind
                ),
            ),
            (None, _) => {}
        }
        if let Some(name) = &raw.strategy {
            match Strategy::parse(name) {
                Some(strategy) => provider.strategy = strategy,
                None => errors.at(
                    format!("{path}.strategy"),
                    format!(
                        "unknown strategy `{name}`, expected one of {:?}",
                        Strategy::NAMES
                    ),
                ),
            }
        }
        if let Some(r) = &raw.retry {
            let d = RetryPolicy::default();
            provider.retry = RetryPolicy {
                attempts: r.attempts.unwrap_or(d.attempts),
                budget_ms: r.budget_ms.unwrap_or(d.budget_ms),
                backoff_ms: r.backoff_ms.unwrap_or(d.backoff_ms),
                max_backoff_ms: r.max_backoff_ms.unwrap_or(d.max_backoff_ms),
            };
            let retry = provider.retry;
            if !(1..=10).contains(&retry.attempts) {
                errors.at(format!("{path}.retry.attempts"), "must be between 1 and 10");
            }
            if retry.backoff_ms == 0 {
                errors.at(format!("{path}.retry.backoff_ms"), "must be at least 1");
            }
            if retry.max_backoff_ms < retry.backoff_ms {
                errors.at(
                    format!("{path}.retry.max_backoff_ms"),
                    "must be at least backoff_ms",
                );
            }
            if retry.budget_ms == 0 {
                errors.at(format!("{path}.retry.budget_ms"), "must be at least 1");
            }
        }
        if let Some(h) = &raw.key_health {
            let d = crate::health::HealthPolicy::default();
            provider.health = crate::health::HealthPolicy {
                default_cooldown_ms: h.cooldown_ms.unwrap_or(d.default_cooldown_ms),
                max_cooldown_ms: h.max_cooldown_ms.unwrap_or(d.max_cooldown_ms),
                revoked_probe_ms: h.revoked_probe_ms.unwrap_or(d.revoked_probe_ms),
                exhausted_ms: h.exhausted_ms.unwrap_or(d.exhausted_ms),
            };
            if provider.health.max_cooldown_ms < provider.health.default_cooldown_ms {
                errors.at(
                    format!("{path}.key_health.max_cooldown_ms"),
                    "must be at least cooldown_ms",
                );
            }
        }
        out.push(provider);
    }
    out
}

fn compile_models(
    raws: Vec<Option<RawModel>>,
    providers: &[Provider],
    lease_ms: u64,
    errors: &mut Errors,
) -> Vec<Model> {
    let mut names = BTreeSet::new();
    let mut out = Vec::new();
    // Each compiled model's config path and the names of its fallbacks, linked once every
    // model is known.
    let mut fallback_names = Vec::new();
    for (i, raw) in raws.into_iter().enumerate() {
        let Some(raw) = raw else { continue };
        let path = format!("models[{i}]");
        if raw.name.is_empty() || raw.name.contains('*') {
            errors.at(
                format!("{path}.name"),
                "must be non-empty and contain no `*`",
            );
        }
        if !names.insert(raw.name.clone()) {
            errors.at(
                format!("{path}.name"),
                format!("model `{}` is defined twice", raw.name),
            );
        }
        let Some(provider) = providers.iter().position(|p| p.name == raw.provider) else {
            errors.at(
                format!("{path}.provider"),
                format!("no provider is named `{}`", raw.provider),
            );
            continue;
        };
        let upstream_model = raw
            .upstream_model
            .clone()
            .unwrap_or_else(|| raw.name.clone());
        let pricing = raw.pricing.as_ref().map(|p| {
            let cache_write_factor = match providers.get(provider).map(|p| p.kind) {
                Some(ProviderKind::Anthropic) => 1.25,
                _ => 1.0,
            };
            limits::compile_pricing(p, &format!("{path}.pricing"), cache_write_factor, errors)
        });
        let model_limits = raw.limits.as_ref().map_or_else(Vec::new, |l| {
            let scope = format!("model `{}`", raw.name);
            limits::compile_limits(
                l,
                &format!("{path}.limits"),
                &scope,
                &format!("model:{}", raw.name),
                &format!("m/{}", raw.name),
                lease_ms,
                errors,
            )
        });
        if pricing.is_none() && model_limits.iter().any(|l| l.unit == Unit::MicroUsd) {
            errors.at(
                format!("{path}.limits"),
                "cost limits need the model's `pricing`",
            );
        }
        let pool = providers
            .get(provider)
            .map(|p| model_pool(&raw, p, &path, errors))
            .unwrap_or_default();
        let default_max_tokens = raw.default_max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
        if default_max_tokens == 0 {
            errors.at(format!("{path}.default_max_tokens"), "must be at least 1");
        }
        let decorators = prompts::compile_decorators(
            raw.decorators.as_ref(),
            &format!("{path}.decorators"),
            errors,
        );
        let guard = prompts::compile_guard(&raw.guard, &format!("{path}.guard"), errors);
        let cursor_key = format!(
            "tollgate/rr/{}/{}",
            providers.get(provider).map_or("", |p| p.name.as_str()),
            raw.name
        );
        let key_model_health = providers
            .get(provider)
            .filter(|p| crate::providers::refusal::limits_per_model(p.kind))
            .map(|p| {
                pool.iter()
                    .filter_map(|&k| p.keys.get(k))
                    .map(|k| crate::keys::model_health_key(&k.health_key, &upstream_model))
                    .collect()
            })
            .unwrap_or_default();
        out.push(Model {
            cursor_key,
            key_model_health,
            name: raw.name,
            provider,
            upstream_model,
            limits: model_limits,
            default_max_tokens,
            pricing,
            pool,
            decorators,
            guard,
            fallbacks: Vec::new(),
        });
        fallback_names.push((path, raw.fallbacks));
    }
    link_fallbacks(&mut out, fallback_names, providers, errors);
    for (p, provider) in providers.iter().enumerate() {
        for key in &provider.keys {
            for (m, pattern) in key.models.iter().enumerate() {
                let matches = out
                    .iter()
                    .any(|model| model.provider == p && glob_match(pattern, &model.name));
                if !matches {
                    errors.at(
                        format!("{}.models[{m}]", key.config_path),
                        format!(
                            "`{pattern}` matches no model served by provider `{}`",
                            provider.name
                        ),
                    );
                }
            }
        }
    }
    out
}

/// Resolves each model's `fallbacks` to model ids: every name must be another model, named
/// once; and the chain (the model and its fallbacks) must fit in the attempts its provider's
/// `retry` allows, since each model in it takes at least one.
fn link_fallbacks(
    models: &mut [Model],
    names: Vec<(String, Vec<String>)>,
    providers: &[Provider],
    errors: &mut Errors,
) {
    let ids: BTreeMap<String, ModelId> = models
        .iter()
        .enumerate()
        .map(|(i, m)| (m.name.clone(), i))
        .collect();
    for (i, (path, fallbacks)) in names.into_iter().enumerate() {
        let Some(model) = models.get(i) else { continue };
        let mut chain = vec![i];
        for (j, name) in fallbacks.iter().enumerate() {
            let at = format!("{path}.fallbacks[{j}]");
            match ids.get(name) {
                None => errors.at(at, format!("no model is named `{name}`")),
                Some(&id) if chain.contains(&id) => errors.at(
                    at,
                    format!("`{name}` is in the chain already: a chain cannot loop"),
                ),
                Some(&id) => chain.push(id),
            }
        }
        let attempts = providers
            .get(model.provider)
            .map_or(0, |p| p.retry.attempts);
        if !fallbacks.is_empty() && chain.len() > attempts as usize {
            errors.at(
                format!("{path}.fallbacks"),
                format!(
                    "a chain of {} models needs at least as many attempts; the provider's \
                     retry.attempts is {attempts}",
                    chain.len()
                ),
            );
        }
        chain.remove(0);
        if let Some(m) = models.get_mut(i) {
            m.fallbacks = chain;
        }
    }
}

/// The keys of `provider` that serve the model: those whose `models` allow it, narrowed to
/// the model's own `keys` when it lists them. A provider with keys must leave at least one.
fn model_pool(raw: &RawModel, provider: &Provider, path: &str, errors: &mut Errors) -> Vec<usize> {
    for (j, id) in raw.keys.iter().enumerate() {
        if !provider.keys.iter().any(|k| k.id == *id) {
            errors.at(
                format!("{path}.keys[{j}]"),
                format!("provider `{}` has no key `{id}`", provider.name),
            );
        }
    }
    let pool: Vec<usize> = provider
        .keys
        .iter()
        .enumerate()
        .filter(|(_, k)| k.serves(&raw.name))
        .filter(|(_, k)| raw.keys.is_empty() || raw.keys.contains(&k.id))
        .map(|(i, _)| i)
        .collect();
    if pool.is_empty() && !provider.keys.is_empty() {
        errors.at(
            format!("{path}.keys"),
            format!(
                "no key of provider `{}` serves model `{}` (see the keys' `models`)",
                provider.name, raw.name
            ),
        );
    }
    pool
}

type KeyIndex = BTreeMap<u64, Vec<(KeyHash, ConsumerId)>>;

fn compile_consumers(
    raws: Vec<Option<RawConsumer>>,
    models: &[Model],
    providers: &[Provider],
    prompts: &[PromptTemplate],
    lease_ms: u64,
    errors: &mut Errors,
) -> (Vec<Consumer>, KeyIndex) {
    let mut names = BTreeSet::new();
    let mut seen = BTreeSet::new();
    let mut by_key = KeyIndex::new();
    let mut out = Vec::new();
    for (i, raw) in raws.into_iter().enumerate() {
        let Some(raw) = raw else { continue };
        let path = format!("consumers[{i}]");
        check_name(errors, &format!("{path}.name"), &raw.name);
        if !names.insert(raw.name.clone()) {
            errors.at(
                format!("{path}.name"),
                format!("consumer `{}` is defined twice", raw.name),
            );
        }
        for (j, k) in raw.keys.iter().enumerate() {
            let kpath = format!("{path}.keys[{j}].sha256");
            match KeyHash::from_hex(&k.sha256) {
                Some(h) => {
                    if seen.insert(h) {
                        by_key.entry(h.prefix()).or_default().push((h, out.len()));
                    } else {
                        errors.at(
                            kpath,
                            "this key hash is listed twice (keys must be unique across consumers)",
                        );
                    }
                }
                None => errors.at(kpath, "must be 64 hex digits (use `tollgate hash-key`)"),
            }
        }
        let model_names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
        let allowed = allow_list(
            &raw.models,
            &model_names,
            &format!("{path}.models"),
            "model",
            errors,
        );
        let models_list = render_models_list(models, providers, &allowed);
        let prompt_names: Vec<&str> = prompts.iter().map(|p| p.name.as_str()).collect();
        let allowed_prompts = allow_list(
            &raw.prompts,
            &prompt_names,
            &format!("{path}.prompts"),
            "prompt",
            errors,
        );
        let prompts_list = render_prompts_list(prompts, &allowed_prompts);
        // A template call is also a call of its model: count its models as used.
        let mut uses = allowed.clone();
        for (prompt, _) in prompts.iter().zip(&allowed_prompts).filter(|(_, ok)| **ok) {
            for v in &prompt.versions {
                if let Some(m) = models.iter().position(|m| m.name == v.model) {
                    if let Some(slot) = uses.get_mut(m) {
                        *slot = true;
                    }
                }
            }
        }
        let scope = format!("consumer `{}`", raw.name);
        let own_limits = raw.limits.as_ref().map_or_else(Vec::new, |l| {
            limits::compile_limits(
                l,
                &format!("{path}.limits"),
                &scope,
                &format!("consumer:{}", raw.name),
                &format!("c/{}", raw.name),
                lease_ms,
                errors,
            )
        });
        let mut model_limits = BTreeMap::new();
        for (name, l) in &raw.model_limits {
            let lpath = format!("{path}.model_limits.{name}");
            let Some(m) = models.iter().position(|m| &m.name == name) else {
                errors.at(lpath, format!("no model is named `{name}`"));
                continue;
            };
            let scope = format!("consumer `{}` on model `{name}`", raw.name);
            let key = format!("cm/{}/{name}", raw.name);
            let label = format!("consumer:{}/model:{name}", raw.name);
            model_limits.insert(
                m,
                limits::compile_limits(l, &lpath, &scope, &label, &key, lease_ms, errors),
            );
        }
        // A cost budget that some allowed model cannot be priced against would never trip.
        let has_budget = own_limits.iter().any(|l| l.unit == Unit::MicroUsd);
        for (m, model) in models.iter().enumerate() {
            let budget_on_model = model_limits
                .get(&m)
                .is_some_and(|ls: &Vec<Limit>| ls.iter().any(|l| l.unit == Unit::MicroUsd));
            let ok = uses.get(m).copied().unwrap_or(false);
            if (has_budget || budget_on_model) && ok && model.pricing.is_none() {
                errors.at(
                    format!("{path}.limits"),
                    format!(
                        "a cost limit applies to model `{}`, which has no `pricing`",
                        model.name
                    ),
                );
            }
        }
        let decorators = prompts::compile_decorators(
            raw.decorators.as_ref(),
            &format!("{path}.decorators"),
            errors,
        );
        let guard = prompts::compile_guard(&raw.guard, &format!("{path}.guard"), errors);
        out.push(Consumer {
            name: raw.name,
            allowed_models: allowed,
            models_list,
            limits: own_limits,
            model_limits,
            allowed_prompts,
            prompts_list,
            decorators,
            guard,
        });
    }
    (out, by_key)
}

/// Which of `names` a list of names and `*` globs allows; a pattern that matches nothing is
/// an error (a typo would otherwise silently allow nothing).
fn allow_list(
    patterns: &[String],
    names: &[&str],
    path: &str,
    what: &str,
    errors: &mut Errors,
) -> Vec<bool> {
    let mut allowed = vec![false; names.len()];
    for (j, pattern) in patterns.iter().enumerate() {
        let mut matched = false;
        for (slot, name) in allowed.iter_mut().zip(names) {
            if glob_match(pattern, name) {
                *slot = true;
                matched = true;
            }
        }
        if !matched {
            errors.at(
                format!("{path}[{j}]"),
                format!("`{pattern}` matches no {what}"),
            );
        }
    }
    allowed
}

/// The `GET /v1/prompts` list of the templates a consumer may call.
fn render_prompts_list(prompts: &[PromptTemplate], allowed: &[bool]) -> Vec<u8> {
    let data: Vec<Value> = prompts
        .iter()
        .zip(allowed)
        .filter(|(_, ok)| **ok)
        .map(|(p, _)| p.describe())
        .collect();
    serde_json::to_vec(&serde_json::json!({ "object": "list", "data": data })).unwrap_or_default()
}

/// The `GET /v1/models` list of the models a consumer may use, readable by both SDKs: each
/// entry has OpenAI's fields (`object`, `created`, `owned_by`) and Anthropic's (`type`,
/// `display_name`, `created_at`), and the list Anthropic's paging fields.
fn render_models_list(models: &[Model], providers: &[Provider], allowed: &[bool]) -> Vec<u8> {
    let data: Vec<Value> = models
        .iter()
        .zip(allowed)
        .filter(|(_, ok)| **ok)
        .map(|(m, _)| {
            serde_json::json!({
                "id": m.name,
                "object": "model",
                "created": 0,
                "owned_by": providers.get(m.provider).map(|p| p.name.as_str()).unwrap_or(""),
                "type": "model",
                "display_name": m.name,
                "created_at": "1970-01-01T00:00:00Z",
            })
        })
        .collect();
    let first = data.first().map(|m| m["id"].clone());
    let last = data.last().map(|m| m["id"].clone());
    serde_json::json!({
        "object": "list", "data": data, "has_more": false, "first_id": first, "last_id": last,
    })
    .to_string()
    .into_bytes()
}

/// `*` matches any run of characters (including none); everything else matches itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    // Where the last `*` was, and how much of the name it has taken so far.
    let mut star: Option<(usize, usize)> = None;
    while let Some(&c) = n.get(ni) {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(&pc) if pc == c => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                // Let the last `*` take one more character and try again after it.
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p.get(pi..).unwrap_or_default().iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests;
