//! The key role: for one upstream attempt, pick a key from the provider's pool and say how to
//! present it. In Envoy this runs in each provider cluster's upstream filter, once per attempt;
//! the native host calls it before each attempt.

use crate::config::Config;
use crate::error::GatewayError;
use crate::http::{CONSUMER_CREDENTIAL_HEADERS, PROVIDER_HEADER};
use crate::providers::{Provider, ProviderKey};
use crate::store::CounterStore;

/// The key chosen for one attempt, and the header edits that present it.
#[derive(Debug)]
pub struct KeyAttempt<'c> {
    pub provider: &'c Provider,
    /// `None` when the provider takes no key.
    pub key: Option<&'c ProviderKey>,
}

impl KeyAttempt<'_> {
    /// Headers to remove from the attempt: the routing header (internal) and any consumer
    /// credential that is still there, before the key's own header is set.
    pub const REMOVE_HEADERS: [&'static str; 4] = [
        PROVIDER_HEADER,
        CONSUMER_CREDENTIAL_HEADERS[0],
        CONSUMER_CREDENTIAL_HEADERS[1],
        CONSUMER_CREDENTIAL_HEADERS[2],
    ];

    /// The header to set, if any.
    pub fn header(&self) -> Option<(&'static str, &str)> {
        self.key.map(ProviderKey::header)
    }

    /// The key's public id, for logs.
    pub fn key_id(&self) -> Option<&str> {
        self.key.map(|k| k.id.as_str())
    }
}

/// Picks the key for an attempt on the provider named by the gateway role's routing header.
pub fn attempt_key<'c>(
    config: &'c Config,
    provider_header: Option<&str>,
    store: &impl CounterStore,
) -> Result<KeyAttempt<'c>, GatewayError> {
    let provider = provider_header
        .and_then(|name| config.provider_by_name(name))
        .filter(|p| p.kind.is_upstream())
        .ok_or(GatewayError::NotRoutedByGateway)?;
    let key = provider
        .select_key(store)
        .map_err(|e| GatewayError::SharedStateUnavailable {
            detail: e.to_string(),
        })?;
    Ok(KeyAttempt { provider, key })
}
