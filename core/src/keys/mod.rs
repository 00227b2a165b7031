//! The key role: for one upstream attempt, pick a key from the provider's pool — in the
//! pool's strategy's order, skipping keys that are cooling (key-wide or for the request's
//! model), exhausted, revoked or at their own limits, and keys the request already tried —
//! say how to present it, and record what the answer (its refusal class, see
//! `providers::refusal`) says of the key. In Envoy this runs in each provider cluster's upstream filter, once per
//! attempt; the native host calls it before each attempt.

use crate::config::Config;
use crate::error::GatewayError;
use crate::health::{self, Unusable};
use crate::http::HeaderLookup;
use crate::http::{CONSUMER_CREDENTIAL_HEADERS, PROVIDER_HEADER};
use crate::limits::{self, read, Amounts, Refusal, Reservation};
use crate::providers::refusal::{self, RefusalClass};
use crate::providers::signals::KeySignals;
use crate::providers::{Provider, ProviderKey};
use crate::store::CounterStore;

pub mod report;
#[cfg(test)]
mod tests;

pub use report::KeyCounter;

/// Response header by which Envoy's key role hands a key's reservation to the gateway role,
/// which settles it with the rest when the exchange ends:
/// `provider/key/requests/tokens/at_ms/slot_ends/lease_epochs` (the rates' slot ends and the
/// epochs the concurrency slots are held in, each comma-separated).
pub const KEY_RESERVATION_HEADER: &str = "x-tollgate-key-reservation";

/// A key attempt's reservation, to be handed to the gateway role once the attempt succeeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handover {
    provider: String,
    key: String,
    demand: Amounts,
}

impl Handover {
    /// The value of `KEY_RESERVATION_HEADER` for `reservation` as it stands now: its leases
    /// may have been renewed since it was made.
    pub fn header(&self, reservation: &Reservation) -> String {
        let join = |values: &mut dyn Iterator<Item = u64>| {
            values.map(|v| v.to_string()).collect::<Vec<_>>().join(",")
        };
        format!(
            "{}/{}/{}/{}/{}/{}/{}",
            self.provider,
            self.key,
            self.demand.requests,
            self.demand.tokens,
            reservation.at_ms(),
            join(&mut reservation.slot_ends()),
            join(&mut reservation.lease_epochs()),
        )
    }
}

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

    /// What hands this attempt's reservation over, if it took any.
    pub fn handover(&self) -> Option<Handover> {
        let key = self.key?;
        (!self.reservation.is_empty()).then(|| Handover {
            provider: self.provider.name.clone(),
            key: key.id.clone(),
            demand: self.demand,
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

/// The reservation a handover header describes, to be settled by the gateway role; its
/// leases are held in `store`'s book from now on.
pub fn taken_over(
    config: &Config,
    handover: &str,
    store: &impl CounterStore,
) -> Option<Reservation> {
    let mut parts = handover.split('/');
    let (provider, key) = (parts.next()?, parts.next()?);
    let requests = parts.next()?.parse().ok()?;
    let tokens = parts.next()?.parse().ok()?;
    let at_ms = parts.next()?.parse().ok()?;
    let mut numbers = || -> Vec<u64> {
        parts
            .next()
            .unwrap_or_default()
            .split(',')
            .filter_map(|e| e.parse().ok())
            .collect()
    };
    // Where the key's rate buckets stood right after the reservation, and the epochs its
    // slots are held in (see `Reservation::of`).
    let slot_ends = numbers();
    let lease_epochs = numbers();
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
    Some(Reservation::of(
        &key.limits,
        demand,
        at_ms,
        &slot_ends,
        &lease_epochs,
        store,
    ))
}

/// Whether the ticket's pool has a key that may be tried now (healthy, or revoked with its
/// re-probe due), by their health alone: a peek that claims nothing. Envoy's gateway role
/// skips a model none of whose keys is usable before the router sends anything.
pub fn pool_usable(
    config: &Config,
    ticket: &Ticket,
    store: &impl CounterStore,
    now_ms: u64,
) -> bool {
    let Some(model) = config
        .model_id(&ticket.model)
        .and_then(|id| config.model(id))
    else {
        return false;
    };
    let Some(provider) = config.provider(model.provider) else {
        return false;
    };
    if model.pool.is_empty() {
        return true;
    }
    model
        .pool
        .iter()
        .filter_map(|&i| provider.keys.get(i))
        .any(|key| {
            let usable = |record: &str| match read(store, record) {
                Ok(state) => match health::state(state, now_ms) {
                    None => true,
                    Some(Unusable::Revoked { probe_at_ms }) => probe_at_ms <= now_ms,
                    Some(_) => false,
                },
                // Unknown: let the attempt find out.
                Err(_) => true,
            };
            model_record(model, provider, key).is_none_or(usable) && usable(&key.health_key)
        })
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
    /// Ids of the keys tried so far, in order, for this model.
    #[serde(default)]
    pub tried: Vec<String>,
    /// Attempts made for the models of the request's chain before this one (failover).
    #[serde(default)]
    pub attempts_before: u32,
    /// Envoy: the models of the chain still to try, each routed already by the gateway role
    /// and kept apart (`ChainStep`): the key role of the fallback's cluster sends it as it
    /// says.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<ChainLink>,
    /// Envoy: the number of the chain step the request failed over to, which every further
    /// attempt on its pool sends again (the router replays the first model's body).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<usize>,
    /// After a failover: the provider of the model the client asked for, whose `retry`
    /// bounds the whole chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_provider: Option<String>,
}

/// A fallback of the request's chain as the ticket names it: the number of its routed
/// request (`ChainStep`), which travels apart from the ticket because only an attempt that
/// fails over to it reads it, and its provider (the cluster such an attempt runs in).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChainLink {
    pub step: usize,
    pub provider: String,
}

impl ChainLink {
    /// The links to `steps`, numbered in order.
    pub fn to(steps: &[ChainStep]) -> Vec<ChainLink> {
        steps
            .iter()
            .enumerate()
            .map(|(step, s)| ChainLink {
                step,
                provider: s.provider.clone(),
            })
            .collect()
    }
}

/// A fallback of the request's chain, as the gateway role routed it for Envoy's key role:
/// what an attempt on it sends instead of the first model's request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChainStep {
    pub provider: String,
    pub model: String,
    /// The `:authority` of the provider (Envoy rewrites the host once per route, for the
    /// first cluster only).
    pub authority: String,
    pub path: String,
    /// The request body in the fallback's dialect: after the encoded head, as it is (see
    /// `encode`).
    #[serde(skip)]
    pub body: String,
    /// Headers set when absent (a provider's API version).
    pub default_headers: Vec<(String, String)>,
    /// Tokens the request reserves under this model (its default output cap may differ).
    pub tokens: u64,
}

impl ChainStep {
    /// The step as Envoy's filter state carries it: its head as JSON, a newline, then the
    /// body as it is (a body inside the JSON would be escaped and unescaped byte by byte).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec(self).unwrap_or_default();
        out.push(b'\n');
        out.extend_from_slice(self.body.as_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        // Compact JSON has no raw newline: the first one ends the head.
        let at = memchr::memchr(b'\n', bytes)?;
        let (head, body) = (bytes.get(..at)?, bytes.get(at + 1..)?);
        let mut step: ChainStep = serde_json::from_slice(head).ok()?;
        step.body = String::from_utf8(body.to_vec()).ok()?;
        Some(step)
    }
}

impl Ticket {
    pub fn demand(&self) -> Amounts {
        Amounts {
            requests: 1,
            tokens: self.tokens,
            micro_usd: 0,
        }
    }

    /// The provider whose `retry` bounds the request: the requested model's.
    pub fn retry_provider(&self) -> &str {
        self.first_provider.as_deref().unwrap_or(&self.provider)
    }

    /// Attempts made so far over the whole chain.
    pub fn attempts_made(&self) -> u32 {
        u32::try_from(self.tried.len())
            .unwrap_or(u32::MAX)
            .saturating_add(self.attempts_before)
    }

    /// The number of the next attempt (1 for the first), over the whole chain.
    pub fn next_attempt(&self) -> u32 {
        self.attempts_made().saturating_add(1)
    }

    /// Moves the ticket to its chain's next step on `provider` (the cluster the router sent
    /// this attempt to), dropping steps before it: the step, read by `load`, if there is one.
    pub fn fail_over_to(
        &mut self,
        provider: &str,
        load: impl FnOnce(usize) -> Option<ChainStep>,
    ) -> Option<ChainStep> {
        let at = self.chain.iter().position(|l| l.provider == provider)?;
        let number = self.chain.get(at)?.step;
        // The step travels apart from the ticket: it must be the one the link names.
        let step = load(number).filter(|s| s.provider == provider)?;
        self.chain.drain(..=at);
        self.attempts_before = self.attempts_made();
        self.tried.clear();
        if self.first_provider.is_none() {
            self.first_provider = Some(std::mem::take(&mut self.provider));
        }
        self.provider = step.provider.clone();
        self.model = step.model.clone();
        self.tokens = step.tokens;
        self.current = Some(number);
        Some(step)
    }

    /// Whether every key of the model's pool was tried for this request already (a pool
    /// without keys: whether it was tried at all): another attempt on it would repeat one.
    pub fn pool_tried(&self, config: &Config) -> bool {
        let Some(model) = config.model_id(&self.model).and_then(|id| config.model(id)) else {
            return true;
        };
        let Some(provider) = config.provider(model.provider) else {
            return true;
        };
        let mut pool = model.pool.iter().filter_map(|&i| provider.keys.get(i));
        if model.pool.is_empty() {
            return !self.tried.is_empty();
        }
        pool.all(|k| self.tried.contains(&k.id))
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }
}

/// Where a key's health for one upstream model lives in the store (providers whose limits
/// are per model): `tollgate/health/<provider>/<key>/m/<upstream model>`.
pub fn model_health_key(key_health_key: &str, upstream_model: &str) -> String {
    format!("{key_health_key}/m/{upstream_model}")
}

/// The store key of `key`'s health for `model`'s upstream model, if the provider's limits
/// are per model (see `Model::key_model_health`).
fn model_record<'m>(
    model: &'m crate::config::Model,
    provider: &Provider,
    key: &ProviderKey,
) -> Option<&'m str> {
    model
        .pool
        .iter()
        .zip(&model.key_model_health)
        .find(|(&i, _)| provider.keys.get(i).is_some_and(|k| k.id == key.id))
        .map(|(_, record)| record.as_str())
}

/// Reads a value of the store without writing.
/// Picks the key for the ticket's next attempt: the pool's keys that serve its model, in the
/// provider's strategy's order (keys this request already tried last), the first that is
/// healthy (and not cooling for the ticket's upstream model) and has room for the demand
/// under its own limits. When none has, the request waits for the first key to have room
/// (429) or can never fit (400); when every key is out, the soonest back decides: 429 until
/// the first cools down, or 503 `provider_keys_exhausted` until the first exhaustion ends;
/// when every key is revoked, 503.
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
    // The soonest a cooling and an exhausted key are usable again, and whether every
    // skipped key is revoked.
    let mut cooling_until: Option<u64> = None;
    let mut exhausted_until: Option<u64> = None;
    let soonest = |slot: &mut Option<u64>, until: u64| {
        *slot = Some(slot.map_or(until, |u| u.min(until)));
    };
    let mut revoked = 0;
    for key in order {
        // Cooling for this model only (read first: claiming a revoked key's probe writes).
        if let Some(record) = model_record(model, provider, key) {
            let state = read(store, record).map_err(store_error)?;
            if let Some(Unusable::Cooling { until_ms }) = health::state(state, now_ms) {
                soonest(&mut cooling_until, until_ms);
                continue;
            }
        }
        match store.measure_and_replace(&key.health_key, |state| {
            health::claim(state, now_ms, &provider.health)
        }) {
            Ok(Ok(())) | Ok(Err(None)) => {}
            Ok(Err(Some(Unusable::Cooling { until_ms }))) => {
                soonest(&mut cooling_until, until_ms);
                continue;
            }
            Ok(Err(Some(Unusable::Exhausted { until_ms }))) => {
                soonest(&mut exhausted_until, until_ms);
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
    let label: std::sync::Arc<str> = format!("keys:{}", provider.name).into();
    let name = provider.name.clone();
    // No key now: the soonest any becomes usable, whether it is cooling, exhausted or at
    // its limit (a cooling key wins a tie).
    let out = match (cooling_until, exhausted_until) {
        (Some(c), Some(e)) if e < c => Some((e.saturating_sub(now_ms), true)),
        (Some(c), _) => Some((c.saturating_sub(now_ms), false)),
        (None, Some(e)) => Some((e.saturating_sub(now_ms), true)),
        (None, None) => None,
    };
    Err(match (best, out) {
        (Some(r @ (Refusal::NotNow { .. } | Refusal::Exhausted { .. })), Some((wait, _)))
            if refusal_wait(&r).is_some_and(|w| w <= wait) =>
        {
            r.with_scope(scope, label).into()
        }
        (_, Some((retry_after_ms, false))) => GatewayError::KeysCooling {
            provider: name,
            retry_after_ms,
        },
        (_, Some((retry_after_ms, true))) => GatewayError::KeysExhausted {
            provider: name,
            retry_after_ms,
        },
        (Some(refusal), None) => refusal.with_scope(scope, label).into(),
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
    // The turn taken decides nothing another request's turn could spoil: redone as an
    // addition on Redis.
    let turn = store.redoable(cursor_key, crate::store::Redo::Add { n: 1 }, |old| {
        let turn = old.unwrap_or(0);
        Ok::<_, std::convert::Infallible>((turn, turn.wrapping_add(1)))
    })?;
    match turn {
        Ok(t) => Ok(t),
        Err(never) => match never {},
    }
}

/// One attempt, as `observe` and `count` name it: the provider, the key's id, and the
/// public model the request was for.
#[derive(Debug, Clone, Copy)]
pub struct Attempted<'a> {
    pub provider: &'a str,
    pub key: &'a str,
    pub model: &'a str,
}

/// What a provider's answer `status` with error `body` means for the key (`None`: not a
/// refusal, or an unknown provider), by the provider's kind (see `providers::refusal`).
/// Hosts read a failed answer's body (bounded) before calling it.
pub fn classify(config: &Config, provider: &str, status: u16, body: &[u8]) -> Option<RefusalClass> {
    let kind = config.provider_by_name(provider)?.kind;
    refusal::classify(kind, status, body)
}

/// Adds an attempt's outcome to its key's counters in the store (`status` is `None` when the
/// provider never answered; `class` what its refusal meant, see `classify`), for the admin
/// view. (Envoy counts them as stats instead.)
pub fn count(
    config: &Config,
    attempt: &Attempted<'_>,
    status: Option<u16>,
    class: Option<RefusalClass>,
    store: &impl CounterStore,
) -> Result<(), GatewayError> {
    let Some(key) = config
        .provider_by_name(attempt.provider)
        .and_then(|p| p.keys.iter().find(|k| k.id == attempt.key))
    else {
        return Ok(());
    };
    for counter in [Some(KeyCounter::Attempts), KeyCounter::of(status, class)]
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

/// Records what an attempt's answer says of its key, by its refusal class (see `classify`
/// and `health::observe`): cooling after a rate limit — for the attempt's upstream model
/// only, where the provider's limits are per model —, out for long after an exhausted
/// quota, revoked after a 401/403, healthy again after a successful probe; and the
/// remaining capacity the provider reports. `status` is `None` when the provider never
/// answered (connection failure, timeout): nothing to record. Hosts call it once per
/// attempt, before the next attempt picks its key.
pub fn observe<H: HeaderLookup + ?Sized>(
    config: &Config,
    attempt: &Attempted<'_>,
    status: Option<u16>,
    class: Option<RefusalClass>,
    headers: &H,
    now_ms: u64,
    store: &impl CounterStore,
) -> Result<(), GatewayError> {
    let Some(provider) = config.provider_by_name(attempt.provider) else {
        return Ok(());
    };
    let Some(key) = provider.keys.iter().find(|k| k.id == attempt.key) else {
        return Ok(());
    };
    let store_error = |e: crate::store::StoreError| GatewayError::SharedStateUnavailable {
        detail: e.to_string(),
    };
    if status.is_none() {
        return Ok(());
    }
    let signals = KeySignals::read(headers, now_ms);
    if let Some(room) = health::headroom_state(&signals, now_ms) {
        store
            .measure_and_replace(&key.headroom_key, |_| Ok::<_, ()>(((), room)))
            .map_err(store_error)?
            .ok();
    }
    let model_record = config
        .model_id(attempt.model)
        .and_then(|id| config.model(id))
        .and_then(|m| model_record(m, provider, key));
    let (record, update): (&str, &dyn Fn(Option<u64>) -> Option<u64>) = match (class, model_record)
    {
        (Some(RefusalClass::RateLimited { per_model: true }), Some(record)) => (record, &|state| {
            health::cool(state, now_ms, &signals, &provider.health)
        }),
        _ => (&key.health_key, &|state| {
            health::observe(state, now_ms, class, &signals, &provider.health)
        }),
    };
    store
        .measure_and_replace(record, |state| update(state).map(|new| ((), new)).ok_or(()))
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
