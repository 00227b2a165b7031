//! The admin view of the key pools: each key's state, cooldown end, learned headroom and
//! counters, read from the shared store. The native host serves it as `GET /admin/keys`;
//! in Envoy the key role publishes the same figures as stats. Never a secret: ids only.

use serde::Serialize;

use crate::config::Config;
use crate::health;
use crate::store::CounterStore;

/// What happened to a key's attempts, counted per key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyCounter {
    /// Every attempt that was sent with the key.
    Attempts,
    /// Answered 2xx.
    Succeeded,
    /// Answered 429.
    RateLimited,
    /// Answered 401 or 403.
    Refused,
    /// Answered 5xx.
    ServerErrors,
    /// Never answered: connection failure or timeout.
    Unreachable,
}

impl KeyCounter {
    pub const ALL: [Self; 6] = [
        Self::Attempts,
        Self::Succeeded,
        Self::RateLimited,
        Self::Refused,
        Self::ServerErrors,
        Self::Unreachable,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Attempts => "attempts",
            Self::Succeeded => "succeeded",
            Self::RateLimited => "rate_limited",
            Self::Refused => "refused",
            Self::ServerErrors => "server_errors",
            Self::Unreachable => "unreachable",
        }
    }

    /// The counter an answer adds to, besides `Attempts`; `None` for other answers (4xx).
    pub fn of(status: Option<u16>) -> Option<Self> {
        match status {
            None => Some(Self::Unreachable),
            Some(200..=299) => Some(Self::Succeeded),
            Some(429) => Some(Self::RateLimited),
            Some(401 | 403) => Some(Self::Refused),
            Some(500..=599) => Some(Self::ServerErrors),
            Some(_) => None,
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// A key's state now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    Healthy,
    Cooling,
    Revoked,
}

impl KeyState {
    /// The value of the `state` gauge in Envoy.
    pub fn gauge(self) -> u64 {
        match self {
            Self::Healthy => 0,
            Self::Cooling => 1,
            Self::Revoked => 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyReport {
    pub id: String,
    pub state: KeyState,
    /// Cooling: when it may be used again; revoked: when one request re-probes it (Unix ms).
    pub until_ms: Option<u64>,
    /// What the provider last said the key has left (tokens, else requests), while valid.
    pub learned_remaining: Option<u64>,
    pub weight: u32,
    /// Models the key serves; empty for all.
    pub models: Vec<String>,
    /// `KeyCounter::ALL` by name.
    pub counters: std::collections::BTreeMap<&'static str, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolReport {
    pub provider: String,
    pub strategy: &'static str,
    pub keys: Vec<KeyReport>,
}

/// Every pool's keys as they stand at `now_ms`. Values the store cannot give read as unset.
pub fn pools(config: &Config, store: &impl CounterStore, now_ms: u64) -> Vec<PoolReport> {
    let read = |key: &str| -> Option<u64> {
        store
            .measure_and_replace(key, Err::<((), u64), Option<u64>>)
            .ok()
            .and_then(|r| r.err())
            .flatten()
    };
    config
        .providers()
        .iter()
        .filter(|p| !p.keys.is_empty())
        .map(|p| PoolReport {
            provider: p.name.clone(),
            strategy: p.strategy.as_str(),
            keys: p
                .keys
                .iter()
                .map(|k| {
                    let (state, until_ms) = match health::state(read(&k.health_key), now_ms) {
                        None => (KeyState::Healthy, None),
                        Some(health::Unusable::Cooling { until_ms }) => {
                            (KeyState::Cooling, Some(until_ms))
                        }
                        Some(health::Unusable::Revoked { probe_at_ms }) => {
                            (KeyState::Revoked, Some(probe_at_ms))
                        }
                    };
                    let room = health::headroom(read(&k.headroom_key), now_ms);
                    KeyReport {
                        id: k.id.clone(),
                        state,
                        until_ms,
                        learned_remaining: (room != u64::MAX).then_some(room),
                        weight: k.weight,
                        models: k.models.clone(),
                        counters: KeyCounter::ALL
                            .iter()
                            .map(|c| (c.name(), read(k.counter_key(*c)).unwrap_or(0)))
                            .collect(),
                    }
                })
                .collect(),
        })
        .collect()
}
