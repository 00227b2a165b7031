//! The `store` section: where shared state (limits, key health, cursors) lives — in the
//! process (`local`: the native host's memory, Envoy's shared data) or on Redis, shared by
//! every replica.

use serde::Deserialize;

use super::Errors;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub kind: Option<String>,
    pub url: Option<String>,
    pub password_env: Option<String>,
    pub timeout_ms: Option<u64>,
    pub on_failure: Option<String>,
    pub replicas: Option<u64>,
    pub server: Option<String>,
}

/// What a request does when Redis cannot answer in time (down, slow, a script error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Refuse: 503 `shared_state_unavailable`.
    Closed,
    /// Admit, unchecked against the shared limits; nothing is recorded.
    Open,
    /// Each process enforces its share of every limit (limit / `replicas`) in memory.
    Local,
}

impl OnFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::Local => "local",
        }
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// `redis://host:port/db` or `rediss://…` (TLS). Never holds the password.
    pub url: String,
    /// From the environment variable `password_env` names.
    pub password: Option<String>,
    pub timeout_ms: u64,
    pub on_failure: OnFailure,
    /// How many processes share the limits (for `on_failure: local`).
    pub replicas: u64,
    /// `host:port` where `tollgate store-server` listens, for Envoy (which cannot speak
    /// Redis: it commits its shared state through that server). A socket address.
    pub server: Option<String>,
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &self.url)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("timeout_ms", &self.timeout_ms)
            .field("on_failure", &self.on_failure)
            .field("replicas", &self.replicas)
            .field("server", &self.server)
            .finish()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StoreSettings {
    #[default]
    Local,
    Redis(RedisSettings),
}

pub const DEFAULT_REDIS_TIMEOUT_MS: u64 = 50;

pub(super) fn compile_store(
    raw: RawStore,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Errors,
) -> StoreSettings {
    match raw.kind.as_deref().unwrap_or("local") {
        "local" => {
            if raw.url.is_some() || raw.password_env.is_some() {
                errors.at("store.url", "only `kind: redis` takes a url");
            }
            if raw.server.is_some() {
                errors.at("store.server", "only `kind: redis` takes a server");
            }
            StoreSettings::Local
        }
        "redis" => {
            let url = raw.url.unwrap_or_default();
            let scheme_ok = url.starts_with("redis://") || url.starts_with("rediss://");
            if !scheme_ok {
                errors.at(
                    "store.url",
                    "must be a redis:// or rediss:// URL, e.g. redis://127.0.0.1:6379/0",
                );
            }
            if url
                .split_once("://")
                .is_some_and(|(_, rest)| rest.contains('@'))
            {
                errors.at(
                    "store.url",
                    "must not hold credentials: name the password's environment variable in `password_env`",
                );
            }
            let password = raw.password_env.as_deref().and_then(|var| {
                let value = env(var).filter(|v| !v.is_empty());
                if value.is_none() {
                    errors.at(
                        "store.password_env",
                        format!("the environment variable `{var}` is not set"),
                    );
                }
                value
            });
            let timeout_ms = raw.timeout_ms.unwrap_or(DEFAULT_REDIS_TIMEOUT_MS);
            if !(1..=10_000).contains(&timeout_ms) {
                errors.at("store.timeout_ms", "must be between 1 and 10000");
            }
            let on_failure = match raw.on_failure.as_deref().unwrap_or("closed") {
                "closed" => OnFailure::Closed,
                "open" => OnFailure::Open,
                "local" => OnFailure::Local,
                other => {
                    errors.at(
                        "store.on_failure",
                        format!("`{other}` is not one of closed, open, local"),
                    );
                    OnFailure::Closed
                }
            };
            let replicas = raw.replicas.unwrap_or(1);
            if !(1..=1_000).contains(&replicas) {
                errors.at("store.replicas", "must be between 1 and 1000");
            }
            if let Some(server) = &raw.server {
                if server.parse::<std::net::SocketAddr>().is_err() {
                    errors.at(
                        "store.server",
                        format!(
                            "`{server}` is not an ip:port address (where `tollgate store-server` listens), e.g. 127.0.0.1:7379"
                        ),
                    );
                }
            }
            StoreSettings::Redis(RedisSettings {
                url,
                password,
                timeout_ms,
                on_failure,
                replicas,
                server: raw.server,
            })
        }
        other => {
            errors.at(
                "store.kind",
                format!("`{other}` is not one of local, redis"),
            );
            StoreSettings::Local
        }
    }
}
