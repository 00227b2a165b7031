//! The admin view of the key pools: each key's state, cooldown end, learned headroom and
//! counters, read from the shared store. The native host serves it as `GET /admin/keys`;
//! in Envoy the key role publishes the same figures as stats. Never a secret: ids only.

use serde::Serialize;

use crate::config::Config;
use crate::health;
use crate::providers::refusal::RefusalClass;
use crate::store::CounterStore;

/// What happened to a key's attempts, counted per key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyCounter {
    /// Every attempt that was sent with the key.
    Attempts,
    /// Answered 2xx.
    Succeeded,
    /// Refused as rate limited (a 429 but for those that mean an exhausted quota or a
    /// request too large).
    RateLimited,
    /// Answered 401 or 403.
    Refused,
    /// Answered 5xx.
    ServerErrors,
    /// Never answered: connection failure or timeout.
    Unreachable,
    /// Its account's quota is exhausted (OpenAI's `insufficient_quota`, Anthropic's credit
    /// balance too low).
    Exhausted,
}

impl KeyCounter {
    pub const ALL: [Self; 7] = [
        Self::Attempts,
        Self::Succeeded,
        Self::RateLimited,
        Self::Refused,
        Self::ServerErrors,
        Self::Unreachable,
        Self::Exhausted,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Attempts => "attempts",
            Self::Succeeded => "succeeded",
            Self::RateLimited => "rate_limited",
            Self::Refused => "refused",
            Self::ServerErrors => "server_errors",
            Self::Unreachable => "unreachable",
            Self::Exhausted => "exhausted",
        }
    }

    /// The counter an answer adds to, besides `Attempts`, by its refusal class (else its
    /// status); `None` for other answers (a request too large, another 4xx).
    pub fn of(status: Option<u16>, class: Option<RefusalClass>) -> Option<Self> {
        let status = match status {
            None => return Some(Self::Unreachable),
            Some(s) => s,
        };
        match class.or_else(|| RefusalClass::of_status(status)) {
            None => (200..300).contains(&status).then_some(Self::Succeeded),
            Some(RefusalClass::RateLimited { .. }) => Some(Self::RateLimited),
            Some(RefusalClass::QuotaExhausted) => Some(Self::Exhausted),
            Some(RefusalClass::Auth) => Some(Self::Refused),
            Some(RefusalClass::Overloaded | RefusalClass::ServerError) => Some(Self::ServerErrors),
            Some(RefusalClass::TooLarge | RefusalClass::Other) => None,
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
    /// Rate limited: key-wide, or (see `KeyReport::cooling_models`) for some models only.
    Cooling,
    Revoked,
    /// Its account's quota is exhausted: out for `key_health.exhausted_ms`.
    Exhausted,
}

impl KeyState {
    /// The value of the `state` gauge in Envoy.
    pub fn gauge(self) -> u64 {
        match self {
            Self::Healthy => 0,
            Self::Cooling => 1,
            Self::Revoked => 2,
            Self::Exhausted => 3,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyReport {
    pub id: String,
    pub state: KeyState,
    /// Cooling or exhausted: when it may be used again (cooling for some models only: when
    /// the last of them ends); revoked: when one request re-probes it (Unix ms).
    pub until_ms: Option<u64>,
    /// Upstream models the key is cooling for, while it serves the others (providers whose
    /// limits are per model), with when each cooldown ends (Unix ms).
    pub cooling_models: std::collections::BTreeMap<String, u64>,
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
        .enumerate()
        .filter(|(_, p)| !p.keys.is_empty())
        .map(|(pi, p)| PoolReport {
            provider: p.name.clone(),
            strategy: p.strategy.as_str(),
            keys: p
                .keys
                .iter()
                .enumerate()
                .map(|(ki, k)| {
                    // The key's per-model records: one per upstream model of the models
                    // whose pool it is in.
                    let mut cooling_models = std::collections::BTreeMap::new();
                    for m in config.models().iter().filter(|m| m.provider == pi) {
                        let record = m
                            .pool
                            .iter()
                            .zip(&m.key_model_health)
                            .find(|(&i, _)| i == ki)
                            .map(|(_, r)| r);
                        if let Some(record) = record {
                            if let Some(health::Unusable::Cooling { until_ms }) =
                                health::state(read(record), now_ms)
                            {
                                cooling_models.insert(m.upstream_model.clone(), until_ms);
                            }
                        }
                    }
                    let (state, until_ms) = match health::state(read(&k.health_key), now_ms) {
                        None => match cooling_models.values().max() {
                            Some(&last) => (KeyState::Cooling, Some(last)),
                            None => (KeyState::Healthy, None),
                        },
                        Some(health::Unusable::Cooling { until_ms }) => {
                            (KeyState::Cooling, Some(until_ms))
                        }
                        Some(health::Unusable::Exhausted { until_ms }) => {
                            (KeyState::Exhausted, Some(until_ms))
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
                        cooling_models,
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
