//! Providers: what kind each is, where it lives, its pool of keys and how a key is presented.
//! Wire types and translation live in one sub-module per provider kind; nothing here does IO.

pub mod anthropic;
pub mod dialect;
pub mod mock;
pub mod openai;
pub mod refusal;
pub mod signals;

use crate::health::HealthPolicy;
use crate::keys::{KeyCounter, Strategy};
use crate::limits::Limit;
use crate::retry::RetryPolicy;

/// The protocol a provider speaks, which decides how a key is presented and how requests and
/// responses are translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    /// OpenAI and every OpenAI-compatible server (vLLM, Ollama, LM Studio, Together, ...).
    OpenAi,
    /// Anthropic's Messages API.
    Anthropic,
    /// Answered by the gateway itself: deterministic text, correct usage, SSE when asked.
    Mock,
}

impl ProviderKind {
    pub const NAMES: [&'static str; 3] = ["openai", "anthropic", "mock"];

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "openai" => Some(Self::OpenAi),
            "anthropic" => Some(Self::Anthropic),
            "mock" => Some(Self::Mock),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::Anthropic => "anthropic",
            Self::Mock => "mock",
        }
    }

    /// Whether requests leave the gateway (and so need a base URL and, usually, keys).
    pub fn is_upstream(self) -> bool {
        !matches!(self, Self::Mock)
    }

    /// The request header that carries a key, and its value, in this provider's convention.
    fn key_header(self, secret: &str) -> (&'static str, String) {
        match self {
            Self::OpenAi | Self::Mock => ("authorization", format!("Bearer {secret}")),
            Self::Anthropic => ("x-api-key", secret.to_string()),
        }
    }

    /// The base URL a provider of this kind has when its config names none.
    pub fn default_base_url(self) -> Option<&'static str> {
        match self {
            Self::Anthropic => Some(anthropic::DEFAULT_BASE_URL),
            Self::OpenAi | Self::Mock => None,
        }
    }
}

/// A provider key's secret. It has no `Display`, and its `Debug` is redacted, so it cannot
/// reach a log line by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Self {
        Self(s)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// One key of a provider's pool.
#[derive(Debug)]
pub struct ProviderKey {
    /// Public name of the key: safe for logs, metrics and the admin view.
    pub id: String,
    /// Name of the environment variable the secret came from (a name, not a secret).
    pub secret_env: String,
    header_name: &'static str,
    /// The full header value (`Bearer sk-...`), built once at load time.
    header_value: Secret,
    /// The key's own limits at the provider.
    pub limits: Vec<Limit>,
    /// Its health in the store (see `health`).
    pub health_key: String,
    /// Its learned headroom in the store (see `health::headroom`).
    pub headroom_key: String,
    /// Its counters in the store, indexed by `KeyCounter`.
    counter_keys: Vec<String>,
    /// Share of turns under the `weighted` strategy.
    pub weight: u32,
    /// Public model names or globs it serves; empty for every model.
    pub models: Vec<String>,
    /// Where the config defines it, for error messages.
    pub config_path: String,
}

impl ProviderKey {
    pub fn new(
        kind: ProviderKind,
        id: String,
        secret_env: String,
        secret: &Secret,
        limits: Vec<Limit>,
    ) -> Self {
        let (header_name, value) = kind.key_header(secret.expose());
        Self {
            health_key: format!("tollgate/health/{id}"),
            headroom_key: format!("tollgate/headroom/{id}"),
            counter_keys: Vec::new(),
            weight: 1,
            models: Vec::new(),
            config_path: String::new(),
            id,
            secret_env,
            header_name,
            header_value: Secret::new(value),
            limits,
        }
    }

    /// Where one of its counters lives in the store.
    pub fn counter_key(&self, counter: KeyCounter) -> &str {
        self.counter_keys
            .get(counter.index())
            .map_or("tollgate/keystat/unknown", String::as_str)
    }

    /// Whether it serves the public model `model`.
    pub fn serves(&self, model: &str) -> bool {
        self.models.is_empty()
            || self
                .models
                .iter()
                .any(|p| crate::config::glob_match(p, model))
    }

    /// Every store key it uses, for hosts that create counters up front.
    pub fn store_keys(&self) -> impl Iterator<Item = &str> {
        [self.health_key.as_str(), self.headroom_key.as_str()]
            .into_iter()
            .chain(self.counter_keys.iter().map(String::as_str))
    }

    /// The header to set on the upstream request.
    pub fn header(&self) -> (&'static str, &str) {
        (self.header_name, self.header_value.expose())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

/// A provider's base URL, split once at load time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing slash, e.g. `/v1` (may be empty).
    pub path_prefix: String,
}

impl BaseUrl {
    /// Parses `http[s]://host[:port][/prefix]`. No query, fragment or user info.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (scheme, rest) = if let Some(r) = s.strip_prefix("https://") {
            (Scheme::Https, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            (Scheme::Http, r)
        } else {
            return Err(format!("`{s}` must start with http:// or https://"));
        };
        if rest.contains(['?', '#', '@']) {
            return Err(format!(
                "`{s}` must not have a query, fragment or user info"
            ));
        }
        let (authority, path) = rest
            .find('/')
            .and_then(|i| rest.split_at_checked(i))
            .unwrap_or((rest, ""));
        let default_port = if scheme == Scheme::Https { 443 } else { 80 };
        let (host, port) = if let Some(h) = authority.strip_prefix('[') {
            // IPv6 literal: [::1]:8080
            let (ip, after) = h
                .split_once(']')
                .ok_or_else(|| format!("`{s}` has an unclosed `[`"))?;
            (format!("[{ip}]"), parse_port(after, default_port, s)?)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_string(),
                    parse_port(&format!(":{p}"), default_port, s)?,
                ),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() || host == "[]" {
            return Err(format!("`{s}` has no host"));
        }
        Ok(Self {
            scheme,
            host,
            port,
            path_prefix: path.trim_end_matches('/').to_string(),
        })
    }

    /// `host:port`, as a TCP address or an Envoy socket address.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The `Host` header value: the port is left out when it is the scheme's default.
    pub fn host_header(&self) -> String {
        let default = matches!(
            (self.scheme, self.port),
            (Scheme::Https, 443) | (Scheme::Http, 80)
        );
        if default {
            self.host.clone()
        } else {
            self.authority()
        }
    }
}

fn parse_port(s: &str, default: u16, url: &str) -> Result<u16, String> {
    match s.strip_prefix(':') {
        None if s.is_empty() => Ok(default),
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("`{url}` has an invalid port")),
        None => Err(format!("`{url}` has an invalid authority")),
    }
}

/// A provider with its pool of keys.
#[derive(Debug)]
pub struct Provider {
    pub name: String,
    pub kind: ProviderKind,
    /// `None` only for kinds the gateway answers itself.
    pub base_url: Option<BaseUrl>,
    pub keys: Vec<ProviderKey>,
    pub health: HealthPolicy,
    pub strategy: Strategy,
    pub retry: RetryPolicy,
    /// Sent as `anthropic-version` when the client sends none (Anthropic kind only).
    pub anthropic_version: String,
}

impl Provider {
    pub fn new(
        name: String,
        kind: ProviderKind,
        base_url: Option<BaseUrl>,
        mut keys: Vec<ProviderKey>,
    ) -> Self {
        // Health is per provider and key: key ids are unique within a provider only.
        for key in &mut keys {
            key.health_key = format!("tollgate/health/{name}/{}", key.id);
            key.headroom_key = format!("tollgate/headroom/{name}/{}", key.id);
            key.counter_keys = KeyCounter::ALL
                .iter()
                .map(|c| format!("tollgate/keystat/{name}/{}/{}", key.id, c.name()))
                .collect();
        }
        Self {
            name,
            kind,
            base_url,
            keys,
            health: HealthPolicy::default(),
            strategy: Strategy::default(),
            retry: RetryPolicy::default(),
            anthropic_version: anthropic::DEFAULT_VERSION.to_string(),
        }
    }

    /// Whether any key has limits of its own (so requests need a token estimate).
    pub fn has_key_limits(&self) -> bool {
        self.keys.iter().any(|k| !k.limits.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_forms() {
        let u = BaseUrl::parse("https://api.openai.com/v1/").unwrap();
        assert_eq!(u.scheme, Scheme::Https);
        assert_eq!(u.host, "api.openai.com");
        assert_eq!(u.port, 443);
        assert_eq!(u.path_prefix, "/v1");
        assert_eq!(u.host_header(), "api.openai.com");
        let u = BaseUrl::parse("http://127.0.0.1:9000").unwrap();
        assert_eq!((u.port, u.path_prefix.as_str()), (9000, ""));
        assert_eq!(u.host_header(), "127.0.0.1:9000");
        let u = BaseUrl::parse("http://[::1]:81/x").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("[::1]", 81));
        for bad in [
            "ftp://x",
            "http://",
            "http://h:0",
            "http://h:abc",
            "http://u@h",
            "http://h/?q",
        ] {
            assert!(BaseUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn secrets_never_debug_print() {
        let k = ProviderKey::new(
            ProviderKind::OpenAi,
            "a".into(),
            "A".into(),
            &Secret::new("sk-123".into()),
            Vec::new(),
        );
        let dbg = format!("{k:?}");
        assert!(!dbg.contains("sk-123"), "{dbg}");
        assert_eq!(k.header(), ("authorization", "Bearer sk-123"));
    }
}
