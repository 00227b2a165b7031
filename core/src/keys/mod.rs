//! The key role: for one upstream attempt, pick a key from the provider's pool — in the
//! pool's strategy's order, skipping keys that are cooling, revoked or at their own limits,
//! and keys the request already tried — say how to present it, and record what the answer
//! says of the key. In Envoy this runs in each provider cluster's upstream filter, once per
//! attempt; the native host calls it before each attempt.

use crate::config::Config;
use crate::error::GatewayError;
use crate::health::{self, Unusable};
use crate::http::HeaderLookup;
use crate::http::{CONSUMER_CREDENTIAL_HEADERS, PROVIDER_HEADER};
use crate::limits::{self, Amounts, Refusal, Reservation};
use crate::providers::signals::KeySignals;
use crate::providers::{Provider, ProviderKey};
use crate::store::CounterStore;

pub mod report;
#[cfg(test)]
mod tests;

pub use report::KeyCounter;

/// Response header by which Envoy's key role hands a key's reservation to the gateway role,
/// which settles it with the rest when the exchange ends: `provider/key/requests/tokens/at_ms/slot_ends` (the rates' slot ends, comma-separated).
pub const KEY_RESERVATION_HEADER: &str = "x-tollgate-key-reservation";

/// The key chosen for one attempt, and the header edits that present it.
#[derive(Debug)]
pub struct KeyAttempt<'c> {
    pub provider: &'c Provider,
    /// `None` when the provider takes no key.
    pub key: Option<&'c ProviderKey>,
    /// What the attempt took from the key's own limits; settle it when the exchange ends.
    pub reservation: Reservation,
    /// What was reserved, for handing the reservation over (`handover`).
    pub demand: Amounts,
}

impl KeyAttempt<'_> {
    /// Headers to remove from the attempt: the gateway's internal headers and any consumer
    /// credential that is still there, before the key's own header is set.
    pub const REMOVE_HEADERS: [&'static str; 4] = [
        PROVIDER_HEADER,
        CONSUMER_CREDENTIAL_HEADERS[0],
        CONSUMER_CREDENTIAL_HEADERS[1],
        CONSUMER_CREDENTIAL_HEADERS[2],
    ];

    /// The value of `KEY_RESERVATION_HEADER` that hands this attempt's reservation over, if
    /// it took any.
    pub fn handover(&self) -> Option<String> {
        let key = self.key?;
        (!self.reservation.is_empty()).then(|| {
            let slot_ends: Vec<String> = self
                .reservation
                .slot_ends()
                .map(|e| e.to_string())
                .collect();
            format!(
                "{}/{}/{}/{}/{}/{}",
                self.provider.name,
                key.id,
                self.demand.requests,
                self.demand.tokens,
                self.reservation.at_ms(),
                slot_ends.join(",")
            )
        })
    }

    /// The header to set, if any.
    pub fn header(&self) -> Option<(&'static str, &str)> {
        self.key.map(ProviderKey::header)
    }

    /// The key's public id, for logs.
    pub fn key_id(&self) -> Option<&str> {
        self.key.map(|k| k.id.as_str())
    }
}

/// The reservation a handover header describes, to be settled by the gateway role.
pub fn taken_over(config: &Config, handover: &str) -> Option<Reservation> {
    let mut parts = handover.split('/');
    let (provider, key) = (parts.next()?, parts.next()?);
    let requests = parts.next()?.parse().ok()?;
    let tokens = parts.next()?.parse().ok()?;
    let at_ms = parts.next()?.parse().ok()?;
    // Where the key's rate buckets stood right after the reservation (see `Reservation::of`).
    let slot_ends: Vec<u64> = parts
        .next()
        .unwrap_or_default()
        .split(',')
        .filter_map(|e| e.parse().ok())
        .collect();
    let key = config
        .provider_by_name(provider)?
        .keys
        .iter()
        .find(|k| k.id == key)?;
    let demand = Amounts {
        requests,
        tokens,
        micro_usd: 0,
    };
    Some(Reservation::of(&key.limits, demand, at_ms, &slot_ends))
}

/// How a pool orders its keys for an attempt. Every strategy skips keys that are cooling,
/// revoked or at their own limit, and tries keys this request already tried last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Most headroom first, as the provider last reported it; keys it said nothing of count
    /// as roomy, and ties go round-robin.
    #[default]
    MostHeadroom,
    /// In turn, shared by every worker.
    RoundRobin,
    /// In turn, each key taking a share of turns proportional to its `weight`.
    Weighted,
    /// In the order listed: the first usable key takes everything, the next ones take over
    /// when it fails.
    Priority,
}

impl Strategy {
    pub const NAMES: [&'static str; 4] = ["most-headroom", "round-robin", "weighted", "priority"];

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "most-headroom" => Some(Self::MostHeadroom),
            "round-robin" => Some(Self::RoundRobin),
            "weighted" => Some(Self::Weighted),
            "priority" => Some(Self::Priority),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::MostHeadroom => "most-headroom",
            Self::RoundRobin => "round-robin",
            Self::Weighted => "weighted",
            Self::Priority => "priority",
        }
    }
}

/// What every attempt of one request needs to pick its key: set by the gateway role when it
/// forwards, and carried from attempt to attempt (in Envoy as filter state, which a retry
/// keeps while the request headers it edited do not).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ticket {
    /// The provider's name (its pool).
    pub provider: String,
    /// The public model name (its keys may be a subset of the pool).
    pub model: String,
    /// Tokens the request reserves, for the keys' own limits.
    pub tokens: u64,
    /// When the request was forwarded: attempts start within the retry budget from here.
    pub started_ms: u64,
    /// Ids of the keys tried so far, in order.
    #[serde(default)]
    pub tried: Vec<String>,
}

impl Ticket {
    pub fn demand(&self) -> Amounts {
        Amounts {
            requests: 1,
            tokens: self.tokens,
            micro_usd: 0,
        }
    }

    /// The number of the next attempt (1 for the first).
    pub fn next_attempt(&self) -> u32 {
        u32::try_from(self.tried.len())
            .unwrap_or(u32::MAX)
            .saturating_add(1)
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }
}

/// Picks the key for the ticket's next attempt: the pool's keys that serve its model, in the
/// provider's strategy's order (keys this request already tried last), the first that is
/// healthy and has room for the demand under its own limits. When none has, the request
/// waits for the first key to have room (429) or can never fit (400); when every key is
/// cooling, 429 until the first cools down; when every key is revoked, 503.
pub fn attempt_key<'c>(
    config: &'c Config,
    ticket: &Ticket,
    store: &impl CounterStore,
    now_ms: u64,
) -> Result<KeyAttempt<'c>, GatewayError> {
    let provider = config
        .provider_by_name(&ticket.provider)
        .filter(|p| p.kind.is_upstream())
        .ok_or(GatewayError::NotRoutedByGateway)?;
    let model = config
        .model_id(&ticket.model)
        .and_then(|id| config.model(id))
        .ok_or_else(|| GatewayError::UnknownModel {
            model: ticket.model.clone(),
        })?;
    if config.provider(model.provider).map(|p| p.name.as_str()) != Some(provider.name.as_str()) {
        return Err(GatewayError::NotRoutedByGateway);
    }
    let demand = ticket.demand();
    let store_error = |e: crate::store::StoreError| GatewayError::SharedStateUnavailable {
        detail: e.to_string(),
    };
    let attempt = |key, reservation| KeyAttempt {
        provider,
        key,
        reservation,
        demand,
    };
    let pool: Vec<&ProviderKey> = model
        .pool
        .iter()
        .filter_map(|&i| provider.keys.get(i))
        .collect();
    if pool.is_empty() {
        return Ok(attempt(None, Reservation::default()));
    }
    let order = order_pool(provider, &model.cursor_key, &pool, ticket, store, now_ms)
        .map_err(store_error)?;
    // The refusal to report if every key refuses: the soonest retry, else the largest key.
    let mut best: Option<Refusal> = None;
    // The soonest a cooling key is usable again, and whether every skipped key is revoked.
    let mut cooling_until: Option<u64> = None;
    let mut revoked = 0;
    for key in order {
        match store.measure_and_replace(&key.health_key, |state| {
            health::claim(state, now_ms, &provider.health)
        }) {
            Ok(Ok(())) | Ok(Err(None)) => {}
            Ok(Err(Some(Unusable::Cooling { until_ms }))) => {
                cooling_until = Some(cooling_until.map_or(until_ms, |u| u.min(until_ms)));
                continue;
            }
            Ok(Err(Some(Unusable::Revoked { .. }))) => {
                revoked += 1;
                continue;
            }
            Err(e) => return Err(store_error(e)),
        }
        if key.limits.is_empty() {
            return Ok(attempt(Some(key), Reservation::default()));
        }
        match limits::admit(&key.limits, store, now_ms, demand) {
            Ok((reservation, _)) => return Ok(attempt(Some(key), reservation)),
            Err(Refusal::Store(e)) => return Err(store_error(e)),
            Err(refusal) => {
                if better(&refusal, best.as_ref()) {
                    best = Some(refusal);
                }
            }
        }
    }
    let scope = format!("every key of provider `{}`", provider.name);
    let name = provider.name.clone();
    // No key now: the soonest any becomes usable, whether it is cooling or at its limit.
    let cooling = cooling_until.map(|u| u.saturating_sub(now_ms));
    Err(match (best, cooling) {
        (Some(r @ (Refusal::NotNow { .. } | Refusal::Exhausted { .. })), Some(wait))
            if refusal_wait(&r).is_some_and(|w| w <= wait) =>
        {
            r.with_scope(scope).into()
        }
        (_, Some(retry_after_ms)) => GatewayError::KeysCooling {
            provider: name,
            retry_after_ms,
        },
        (Some(refusal), None) => refusal.with_scope(scope).into(),
        (None, None) if revoked > 0 => GatewayError::KeysRevoked { provider: name },
        (None, None) => GatewayError::Internal {
            detail: "a pool with keys refused without a reason".into(),
        },
    })
}

/// The pool in the order the provider's strategy tries it, keys the ticket already tried
/// moved to the end (still usable: after a 5xx on every key, the least recently failed one
/// is worth another go).
fn order_pool<'c>(
    provider: &Provider,
    cursor_key: &str,
    pool: &[&'c ProviderKey],
    ticket: &Ticket,
    store: &impl CounterStore,
    now_ms: u64,
) -> Result<Vec<&'c ProviderKey>, crate::store::StoreError> {
    let n = pool.len();
    let turn = if n > 1 && provider.strategy != Strategy::Priority {
        next_turn(store, cursor_key)?
    } else {
        0
    };
    let start = match provider.strategy {
        Strategy::Priority => 0,
        Strategy::RoundRobin | Strategy::MostHeadroom => (turn % n as u64) as usize,
        Strategy::Weighted => {
            // The turn falls in one key's share of the total weight.
            let total: u64 = pool.iter().map(|k| u64::from(k.weight)).sum();
            let mut at = turn % total.max(1);
            pool.iter()
                .position(|k| {
                    let w = u64::from(k.weight);
                    if at < w {
                        true
                    } else {
                        at -= w;
                        false
                    }
                })
                .unwrap_or(0)
        }
    };
    let mut order: Vec<&ProviderKey> = pool.iter().cycle().skip(start).take(n).copied().collect();
    if provider.strategy == Strategy::MostHeadroom && n > 1 {
        let mut rooms = Vec::with_capacity(n);
        for key in &order {
            let read = store.measure_and_replace(&key.headroom_key, |state| {
                Err::<((), u64), u64>(health::headroom(state, now_ms))
            })?;
            rooms.push(read.err().unwrap_or(u64::MAX));
        }
        let mut ranked: Vec<(u64, &ProviderKey)> = rooms.into_iter().zip(order).collect();
        ranked.sort_by_key(|(room, _)| std::cmp::Reverse(*room));
        order = ranked.into_iter().map(|(_, k)| k).collect();
    }
    if !ticket.tried.is_empty() {
        // Stable: untried keys keep their order; tried ones follow, least recently tried
        // first.
        order.sort_by_key(|k| ticket.tried.iter().rposition(|t| *t == k.id));
    }
    Ok(order)
}

fn refusal_wait(r: &Refusal) -> Option<u64> {
    match r {
        Refusal::NotNow { retry_after_ms, .. } | Refusal::Exhausted { retry_after_ms, .. } => {
            Some(*retry_after_ms)
        }
        _ => None,
    }
}

/// The next turn of a pool's cursor, shared by every worker (the caller takes it modulo
/// what it rotates over).
fn next_turn(store: &impl CounterStore, cursor_key: &str) -> Result<u64, crate::store::StoreError> {
    let turn = store.measure_and_replace(cursor_key, |old| {
        let turn = old.unwrap_or(0);
        Ok::<_, std::convert::Infallible>((turn, turn.wrapping_add(1)))
    })?;
    match turn {
        Ok(t) => Ok(t),
        Err(never) => match never {},
    }
}

/// Adds an attempt's outcome to its key's counters in the store (`status` is `None` when the
/// provider never answered), for the admin view. (Envoy counts them as stats instead.)
pub fn count(
    config: &Config,
    provider: &str,
    key_id: &str,
    status: Option<u16>,
    store: &impl CounterStore,
) -> Result<(), GatewayError> {
    let Some(key) = config
        .provider_by_name(provider)
        .and_then(|p| p.keys.iter().find(|k| k.id == key_id))
    else {
        return Ok(());
    };
    for counter in [Some(KeyCounter::Attempts), KeyCounter::of(status)]
        .into_iter()
        .flatten()
    {
        store
            .measure_and_replace(key.counter_key(counter), |n| {
                Ok::<_, ()>(((), n.unwrap_or(0).saturating_add(1)))
            })
            .map_err(|e| GatewayError::SharedStateUnavailable {
                detail: e.to_string(),
            })?
            .ok();
    }
    Ok(())
}

/// Records what an attempt's answer says of its key: cooling after a 429 (until the time
/// the provider gives), revoked after a 401/403, healthy again after a successful probe,
/// and the remaining capacity the provider reports. `status` is `None` when the provider
/// never answered (connection failure, timeout): nothing to record. Hosts call it once per
/// attempt.
pub fn observe<H: HeaderLookup + ?Sized>(
    config: &Config,
    provider: &str,
    key_id: &str,
    status: Option<u16>,
    headers: &H,
    now_ms: u64,
    store: &impl CounterStore,
) -> Result<(), GatewayError> {
    let Some(provider) = config.provider_by_name(provider) else {
        return Ok(());
    };
    let Some(key) = provider.keys.iter().find(|k| k.id == key_id) else {
        return Ok(());
    };
    let store_error = |e: crate::store::StoreError| GatewayError::SharedStateUnavailable {
        detail: e.to_string(),
    };
    let Some(status) = status else {
        return Ok(());
    };
    let signals = KeySignals::read(headers, now_ms);
    if let Some(room) = health::headroom_state(&signals, now_ms) {
        store
            .measure_and_replace(&key.headroom_key, |_| Ok::<_, ()>(((), room)))
            .map_err(store_error)?
            .ok();
    }
    store
        .measure_and_replace(&key.health_key, |state| {
            health::observe(state, now_ms, status, &signals, &provider.health)
                .map(|new| ((), new))
                .ok_or(())
        })
        .map(|_| ())
        .map_err(store_error)
}

/// Whether `new` is the refusal to report rather than `old`: a wait beats "never", and a
/// shorter wait a longer one.
fn better(new: &Refusal, old: Option<&Refusal>) -> bool {
    match (old, refusal_wait(new)) {
        (None, _) => true,
        (Some(old), Some(n)) => refusal_wait(old).is_none_or(|o| n < o),
        (Some(_), None) => false,
    }
}
