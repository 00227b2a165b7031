//! The key role: for one upstream attempt, pick a key from the provider's pool — in turn,
//! skipping keys that have no room left under their own limits — and say how to present it.
//! In Envoy this runs in each provider cluster's upstream filter, once per attempt; the
//! native host calls it before each attempt.

use crate::config::Config;
use crate::error::GatewayError;
use crate::health::{self, Unusable};
use crate::http::HeaderLookup;
use crate::http::{CONSUMER_CREDENTIAL_HEADERS, DEMAND_HEADER, PROVIDER_HEADER};
use crate::limits::{self, Amounts, Refusal, Reservation};
use crate::providers::signals::KeySignals;
use crate::providers::{Provider, ProviderKey};
use crate::store::CounterStore;

/// Response header by which Envoy's key role hands a key's reservation to the gateway role,
/// which settles it with the rest when the exchange ends: `provider/key/requests/tokens/at_ms`.
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
    pub const REMOVE_HEADERS: [&'static str; 5] = [
        PROVIDER_HEADER,
        DEMAND_HEADER,
        CONSUMER_CREDENTIAL_HEADERS[0],
        CONSUMER_CREDENTIAL_HEADERS[1],
        CONSUMER_CREDENTIAL_HEADERS[2],
    ];

    /// The value of `KEY_RESERVATION_HEADER` that hands this attempt's reservation over, if
    /// it took any.
    pub fn handover(&self) -> Option<String> {
        let key = self.key?;
        (!self.reservation.is_empty()).then(|| {
            format!(
                "{}/{}/{}/{}/{}",
                self.provider.name,
                key.id,
                self.demand.requests,
                self.demand.tokens,
                self.reservation.at_ms()
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
    Some(Reservation::of(&key.limits, demand, at_ms))
}

/// Picks the key for an attempt on the provider named by the gateway role's routing header:
/// the next in turn that has room for `demand` under its own limits. When none has, the
/// request waits for the first key to have room (429) or can never fit (400).
pub fn attempt_key<'c>(
    config: &'c Config,
    provider_header: Option<&str>,
    store: &impl CounterStore,
    now_ms: u64,
    demand: Amounts,
) -> Result<KeyAttempt<'c>, GatewayError> {
    let provider = provider_header
        .and_then(|name| config.provider_by_name(name))
        .filter(|p| p.kind.is_upstream())
        .ok_or(GatewayError::NotRoutedByGateway)?;
    let store_error = |e: crate::store::StoreError| GatewayError::SharedStateUnavailable {
        detail: e.to_string(),
    };
    let attempt = |key, reservation| KeyAttempt {
        provider,
        key,
        reservation,
        demand,
    };
    if provider.keys.is_empty() {
        return Ok(attempt(None, Reservation::default()));
    }
    let turn = provider.next_turn(store).map_err(store_error)?;
    // The refusal to report if every key refuses: the soonest retry, else the largest key.
    let mut best: Option<Refusal> = None;
    // The soonest a cooling key is usable again, and whether every skipped key is revoked.
    let mut cooling_until: Option<u64> = None;
    let mut revoked = 0;
    // Most headroom first (as the provider last reported it); keys it says nothing of, and
    // ties, in round-robin order.
    let mut order: Vec<(u64, &ProviderKey)> = Vec::with_capacity(provider.keys.len());
    for key in provider.keys_from(turn) {
        let room = if provider.keys.len() > 1 {
            let read = store.measure_and_replace(&key.headroom_key, |state| {
                Err::<((), u64), u64>(health::headroom(state, now_ms))
            });
            match read {
                Ok(Err(room)) => room,
                Ok(Ok(())) => u64::MAX,
                Err(e) => return Err(store_error(e)),
            }
        } else {
            u64::MAX
        };
        order.push((room, key));
    }
    order.sort_by_key(|(room, _)| std::cmp::Reverse(*room));
    for (_, key) in order {
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

fn refusal_wait(r: &Refusal) -> Option<u64> {
    match r {
        Refusal::NotNow { retry_after_ms, .. } | Refusal::Exhausted { retry_after_ms, .. } => {
            Some(*retry_after_ms)
        }
        _ => None,
    }
}

/// Records what a provider's answer to an attempt says about the key's health: cooling after
/// a 429 (until the time the provider gives), revoked after a 401/403, healthy again after a
/// successful probe. Hosts call it with each attempt's status and response headers.
pub fn observe<H: HeaderLookup + ?Sized>(
    config: &Config,
    provider: &str,
    key_id: &str,
    status: u16,
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
    let signals = KeySignals::read(headers, now_ms);
    if let Some(room) = health::headroom_state(&signals, now_ms) {
        store
            .measure_and_replace(&key.headroom_key, |_| Ok::<_, ()>(((), room)))
            .map_err(|e| GatewayError::SharedStateUnavailable {
                detail: e.to_string(),
            })?
            .ok();
    }
    store
        .measure_and_replace(&key.health_key, |state| {
            health::observe(state, now_ms, status, &signals, &provider.health)
                .map(|new| ((), new))
                .ok_or(())
        })
        .map(|_| ())
        .map_err(|e| GatewayError::SharedStateUnavailable {
            detail: e.to_string(),
        })
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
