//! Token-aware limits: what each configured limit counts, how a request reserves against all
//! that apply before it goes upstream, and how the reservation is settled on real usage.
//! State lives in the host's `CounterStore`, one integer per limit; the math is in `gcra`
//! (rates), `quota` (calendar allowances) and `concurrency` (slots as expiring leases).

pub mod concurrency;
pub mod gcra;
pub mod quota;

use std::sync::Arc;

pub use concurrency::{Concurrency, Lease, LeaseBook};

use crate::store::{CounterStore, Redo, StoreError};

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Requests,
    Tokens,
    /// Millionths of a US dollar.
    MicroUsd,
}

/// How a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meter {
    Rate(gcra::Rate),
    Quota(quota::Quota),
    /// Requests in flight, each holding an expiring lease.
    Concurrency(Concurrency),
}

/// One configured limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// The config field, e.g. `tokens_per_minute`.
    pub name: &'static str,
    /// Whose limit it is, e.g. ``consumer `team-a` ``. Shared, so that a reservation's copy
    /// of the limit costs no allocation.
    pub scope: Arc<str>,
    /// The same owner as a metric label, e.g. `consumer:team-a` (config names only).
    pub label: Arc<str>,
    pub unit: Unit,
    pub meter: Meter,
    /// Its counter in the store. It names the limit's value too, so a reload that changes
    /// the limit starts afresh while unchanged limits keep their counters.
    pub store_key: Arc<str>,
}

/// What one request costs in each unit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amounts {
    pub requests: u64,
    pub tokens: u64,
    pub micro_usd: u64,
}

impl Amounts {
    fn of(&self, unit: Unit) -> u64 {
        match unit {
            Unit::Requests => self.requests,
            Unit::Tokens => self.tokens,
            Unit::MicroUsd => self.micro_usd,
        }
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Try again after this long.
    NotNow {
        limit: &'static str,
        scope: String,
        /// `scope` as a metric label.
        label: Arc<str>,
        retry_after_ms: u64,
    },
    /// A calendar allowance is spent until `retry_after_ms` from now.
    Exhausted {
        limit: &'static str,
        scope: String,
        /// `scope` as a metric label.
        label: Arc<str>,
        retry_after_ms: u64,
    },
    /// The request alone is larger than the limit.
    Never {
        limit: &'static str,
        scope: String,
        /// `scope` as a metric label.
        label: Arc<str>,
        requested: u64,
        capacity: u64,
    },
    Store(StoreError),
}

impl Refusal {
    /// The same refusal, said of another scope (e.g. a whole key pool) with its label.
    pub fn with_scope(mut self, scope: String, label: Arc<str>) -> Self {
        match &mut self {
            Self::NotNow {
                scope: s, label: l, ..
            }
            | Self::Exhausted {
                scope: s, label: l, ..
            }
            | Self::Never {
                scope: s, label: l, ..
            } => {
                *s = scope;
                *l = label;
            }
            Self::Store(_) => {}
        }
        self
    }
}

/// What a request took from one limit.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Taken {
    limit: Limit,
    units: u64,
    /// For a rate: the bucket's state right after this reservation, the end of its slot
    /// (a refund gives back only the part of the slot still ahead); `u64::MAX` when unknown.
    slot_end: u64,
    /// For a concurrency limit: the slot's lease, renewed by the host while it is held.
    lease: Option<Arc<Lease>>,
}

/// What a request took from each limit, to be settled when it ends. A clone shares the
/// original's concurrency leases.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reservation {
    taken: Vec<Taken>,
    /// When it was made (Unix ms): a calendar allowance refunds only within that period.
    at_ms: u64,
}

/// The tightest limit of a unit after admission, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headroom {
    pub limit: u64,
    pub remaining: u64,
    pub reset_ms: u64,
}

/// Headroom per unit that OpenAI-style headers report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateHeaders {
    pub requests: Option<Headroom>,
    pub tokens: Option<Headroom>,
}

impl RateHeaders {
    /// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, as OpenAI sends them.
    pub fn to_headers(self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let mut add = |h: Option<Headroom>, names: [&'static str; 3]| {
            if let Some(h) = h {
                out.push((names[0], h.limit.to_string()));
                out.push((names[1], h.remaining.to_string()));
                out.push((names[2], format_duration(h.reset_ms)));
            }
        };
        add(
            self.requests,
            [
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
            ],
        );
        add(
            self.tokens,
            [
                "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-tokens",
            ],
        );
        out
    }
}

/// A duration the way OpenAI writes it: `250ms`, `1s`, `1.5s`, `6m0s`, `2h3m4s`.
pub fn format_duration(ms: u64) -> String {
    if ms < 1_000 {
        return format!("{ms}ms");
    }
    let (h, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    let (s, frac) = (rest / 1_000, rest % 1_000);
    let secs = if frac == 0 {
        format!("{s}s")
    } else {
        format!("{s}.{}s", format!("{frac:03}").trim_end_matches('0'))
    };
    match (h, m) {
        (0, 0) => secs,
        (0, m) => format!("{m}m{secs}"),
        (h, m) => format!("{h}h{m}m{secs}"),
    }
}

/// Where one limit stands now, for `GET /v1/usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    pub limit: u64,
    pub remaining: u64,
    /// Until the limit is whole again (a rate), or its period renews (an allowance).
    pub reset_ms: u64,
    /// Allowances: what the current period has used, and the period.
    pub used: Option<(u64, quota::Period)>,
    /// Concurrency: requests in flight.
    pub in_flight: Option<u64>,
}

impl Limit {
    /// Where the limit stands at `now_ms`, from its counter's `state`.
    pub fn standing(&self, state: Option<u64>, now_ms: u64) -> Standing {
        match self.meter {
            Meter::Rate(rate) => {
                let now_ns = now_ms.saturating_mul(NS_PER_MS);
                Standing {
                    limit: rate.limit,
                    remaining: rate.remaining(state, now_ns),
                    reset_ms: rate.reset_ns(state, now_ns).div_ceil(NS_PER_MS),
                    used: None,
                    in_flight: None,
                }
            }
            Meter::Quota(q) => Standing {
                limit: q.limit,
                remaining: q.remaining(state, now_ms),
                reset_ms: q.reset_ms(now_ms),
                used: Some((q.used_now(state, now_ms), q.period)),
                in_flight: None,
            },
            Meter::Concurrency(c) => {
                let in_flight = c.in_flight(state, now_ms);
                Standing {
                    limit: c.max,
                    remaining: c.max.saturating_sub(in_flight),
                    reset_ms: 0,
                    used: None,
                    in_flight: Some(in_flight),
                }
            }
        }
    }
}

/// Reads a counter without writing it.
pub fn read(store: &impl CounterStore, key: &str) -> Result<Option<u64>, StoreError> {
    store
        .measure_and_replace(key, Err::<((), u64), Option<u64>>)
        .map(|r| r.err().flatten())
}

const NS_PER_MS: u64 = 1_000_000;

/// Times a settlement is retried when the store reports contention.
const SETTLE_TRIES: u32 = 16;

impl Limit {
    fn reserve(&self, state: Option<u64>, now_ms: u64, units: u64) -> Result<u64, Refusal> {
        let never = |capacity| Refusal::Never {
            limit: self.name,
            scope: self.scope.to_string(),
            label: Arc::clone(&self.label),
            requested: units,
            capacity,
        };
        match self.meter {
            Meter::Rate(rate) => rate
                .reserve(state, now_ms.saturating_mul(NS_PER_MS), units)
                .map_err(|r| match r {
                    gcra::Refusal::Never => never(rate.limit),
                    gcra::Refusal::NotNow { retry_after_ns } => Refusal::NotNow {
                        limit: self.name,
                        scope: self.scope.to_string(),
                        label: Arc::clone(&self.label),
                        retry_after_ms: retry_after_ns.div_ceil(NS_PER_MS),
                    },
                }),
            Meter::Quota(q) => q.reserve(state, now_ms, units).map_err(|r| match r {
                quota::Refusal::Never => never(q.limit),
                quota::Refusal::Exhausted { reset_ms } => Refusal::Exhausted {
                    limit: self.name,
                    scope: self.scope.to_string(),
                    label: Arc::clone(&self.label),
                    retry_after_ms: reset_ms.saturating_sub(now_ms),
                },
            }),
            // A slot frees when some request in flight ends, which no state predicts; one
            // second is the shortest honest answer.
            Meter::Concurrency(c) => c.reserve(state, now_ms).ok_or_else(|| Refusal::NotNow {
                limit: self.name,
                scope: self.scope.to_string(),
                label: Arc::clone(&self.label),
                retry_after_ms: 1_000,
            }),
        }
    }

    fn settle(&self, state: Option<u64>, now_ms: u64, at_ms: u64, taken: &Taken, used: u64) -> u64 {
        let reserved = taken.units;
        match self.meter {
            Meter::Rate(rate) => rate.settle(
                state,
                now_ms.saturating_mul(NS_PER_MS),
                reserved,
                used,
                taken.slot_end,
            ),
            Meter::Quota(q) => q.settle(state, now_ms, at_ms, reserved, used),
            // Slots are given back by their lease (`release_slot`).
            Meter::Concurrency(_) => state.unwrap_or(0),
        }
    }

    fn headroom(&self, state: Option<u64>, now_ms: u64) -> Option<Headroom> {
        match self.meter {
            Meter::Rate(rate) => {
                let now_ns = now_ms.saturating_mul(NS_PER_MS);
                Some(Headroom {
                    limit: rate.limit,
                    remaining: rate.remaining(state, now_ns),
                    reset_ms: rate.reset_ns(state, now_ns).div_ceil(NS_PER_MS),
                })
            }
            Meter::Quota(q) => Some(Headroom {
                limit: q.limit,
                remaining: q.remaining(state, now_ms),
                reset_ms: q.reset_ms(now_ms),
            }),
            Meter::Concurrency(_) => None,
        }
    }
}

/// Reserves `amounts` against every limit in `limits`, all or nothing: if one refuses, what
/// the others took is given back. Returns the reservation and the headroom left.
pub fn admit<'a>(
    limits: impl IntoIterator<Item = &'a Limit>,
    store: &impl CounterStore,
    now_ms: u64,
    amounts: Amounts,
) -> Result<(Reservation, RateHeaders), Refusal> {
    let mut reservation = Reservation {
        taken: Vec::new(),
        at_ms: now_ms,
    };
    let mut headers = RateHeaders::default();
    for limit in limits {
        let units = amounts.of(limit.unit);
        let redo = Redo::Reserve { units, now_ms };
        let outcome = store.redoable(&limit.store_key, redo, |state| {
            limit
                .reserve(state, now_ms, units)
                .map(|new| ((limit.headroom(Some(new), now_ms), new), new))
        });
        let refusal = match outcome {
            Ok(Ok((headroom, new_state))) => {
                let slot = match limit.unit {
                    Unit::Requests => Some(&mut headers.requests),
                    Unit::Tokens => Some(&mut headers.tokens),
                    Unit::MicroUsd => None,
                };
                if let (Some(slot), Some(h)) = (slot, headroom) {
                    if slot.is_none_or(|s| h.remaining < s.remaining) {
                        *slot = Some(h);
                    }
                }
                let (slot_end, lease) = match limit.meter {
                    Meter::Rate(_) => (new_state, None),
                    Meter::Quota(_) => (u64::MAX, None),
                    Meter::Concurrency(c) => {
                        let lease =
                            Arc::new(Lease::new(Arc::clone(&limit.store_key), c, c.epoch(now_ms)));
                        store.leases().hold(&lease);
                        (u64::MAX, Some(lease))
                    }
                };
                reservation.taken.push(Taken {
                    limit: limit.clone(),
                    units,
                    slot_end,
                    lease,
                });
                continue;
            }
            Ok(Err(refusal)) => refusal,
            Err(e) => Refusal::Store(e),
        };
        // Give back all that the limits before this one took, the request included. A store
        // failure here leaves a counter high until its window passes: the safe side.
        let _ = give_back(reservation, store, now_ms, Amounts::default(), false);
        return Err(refusal);
    }
    Ok((reservation, headers))
}

/// `redo` made on `state`, the value a limit's counter holds when a commit lands (see
/// `store::Redo`): the same math as the update it stands for. `None` when the limit would
/// now refuse what it admitted (or `redo` is not one of its updates): the decision must be
/// made again.
pub fn redo(limit: &Limit, redo: &Redo, state: Option<u64>) -> Option<u64> {
    match (*redo, limit.meter) {
        (Redo::Reserve { units, now_ms }, _) => limit.reserve(state, now_ms, units).ok(),
        (
            Redo::Settle {
                units,
                used,
                at_ms,
                slot_end,
                now_ms,
            },
            _,
        ) => {
            let taken = Taken {
                limit: limit.clone(),
                units,
                slot_end,
                lease: None,
            };
            Some(limit.settle(state, now_ms, at_ms, &taken, used))
        }
        (Redo::Release { held, now_ms }, Meter::Concurrency(c)) => {
            Some(c.release(state, now_ms, held))
        }
        (Redo::Renew { held, now_ms }, Meter::Concurrency(c)) => c.renew(state, now_ms, held),
        _ => None,
    }
}

/// Settles a reservation on what the request really used (zero for a request that never
/// reached a provider or was refused by it): refunds or charges each limit the difference,
/// and frees concurrency slots.
pub fn settle(
    reservation: Reservation,
    store: &impl CounterStore,
    now_ms: u64,
    used: Amounts,
) -> Result<(), StoreError> {
    give_back(reservation, store, now_ms, used, true)
}

fn give_back(
    reservation: Reservation,
    store: &impl CounterStore,
    now_ms: u64,
    used: Amounts,
    request_was_made: bool,
) -> Result<(), StoreError> {
    let mut result = Ok(());
    let at_ms = reservation.at_ms;
    for taken in reservation.taken {
        if let Some(lease) = &taken.lease {
            if let Err(e) = release_slot(lease, store, now_ms) {
                result = Err(e);
            }
            continue;
        }
        let limit = &taken.limit;
        let used = match limit.unit {
            // A request that was made counts, answered or not.
            Unit::Requests if request_was_made => taken.units,
            unit => used.of(unit),
        };
        if used == taken.units {
            // Used what it reserved (always so for a request count): the counter already
            // says so, and a read and a write would change nothing.
            continue;
        }
        let redo = Redo::Settle {
            units: taken.units,
            used,
            at_ms,
            slot_end: taken.slot_end,
            now_ms,
        };
        let outcome = insist(store, &limit.store_key, redo, |state| {
            limit.settle(state, now_ms, at_ms, &taken, used)
        });
        if let Err(e) = outcome {
            result = Err(e);
        }
    }
    result
}

/// Runs `f` on a store counter until it is written or fails for another reason than
/// contention: a settlement that is lost can leave a counter wrong for good (each try is
/// itself a bounded compare-and-swap loop).
fn insist(
    store: &impl CounterStore,
    key: &str,
    redo: Redo,
    mut f: impl FnMut(Option<u64>) -> u64,
) -> Result<(), StoreError> {
    let mut tries = 0;
    loop {
        let outcome = store.redoable(key, redo, |state| {
            Ok::<_, std::convert::Infallible>(((), f(state)))
        });
        tries += 1;
        match outcome {
            Err(StoreError::Contended { .. }) if tries < SETTLE_TRIES => continue,
            Err(e) => return Err(e),
            Ok(_) => return Ok(()),
        }
    }
}

/// Gives a concurrency slot back, once.
fn release_slot(lease: &Lease, store: &impl CounterStore, now_ms: u64) -> Result<(), StoreError> {
    let mut held = lease.lock();
    let Some(epoch) = held.take() else {
        return Ok(());
    };
    let redo = Redo::Release {
        held: epoch,
        now_ms,
    };
    insist(store, &lease.store_key, redo, |state| {
        lease.meter.release(state, now_ms, epoch)
    })
}

/// Renews the slots of every request the host still holds (see `concurrency`): hosts call
/// it at least every half lease. Returns how many leases are held.
pub fn renew_leases(store: &impl CounterStore, now_ms: u64) -> usize {
    let live = store.leases().live();
    renew(&live, store, now_ms);
    live.len()
}

/// Renews each of `leases` whose epoch has passed.
pub fn renew(leases: &[Arc<Lease>], store: &impl CounterStore, now_ms: u64) {
    for lease in leases {
        let mut held = lease.lock();
        let Some(epoch) = *held else { continue };
        let meter = lease.meter;
        if meter.epoch(now_ms) <= epoch {
            continue;
        }
        let redo = Redo::Renew {
            held: epoch,
            now_ms,
        };
        let renewed = store.redoable(&lease.store_key, redo, |state| {
            meter
                .renew(state, now_ms, epoch)
                .map(|new| ((), new))
                .ok_or(())
        });
        // A failed renewal leaves the slot to expire: the next tick tries again.
        if let Ok(Ok(())) = renewed {
            *held = Some(meter.epoch(now_ms));
        }
    }
}

/// The epochs a set of leases is held in, to put back before an operation on them runs
/// again: a store that commits remotely (`store::Tx`) may have to run a settlement or a
/// renewal a second time on fresher values, and both move the leases' epochs as they go.
#[derive(Debug, Default)]
pub struct LeaseMarks(Vec<(Arc<Lease>, Option<u64>)>);

impl LeaseMarks {
    /// The leases of `reservation`.
    pub fn of(reservation: &Reservation) -> Self {
        Self(
            reservation
                .taken
                .iter()
                .filter_map(|t| t.lease.as_ref())
                .map(|l| (Arc::clone(l), l.held_epoch()))
                .collect(),
        )
    }

    /// Every live lease of `book`.
    pub fn of_book(book: &LeaseBook) -> Self {
        Self(
            book.live()
                .into_iter()
                .map(|l| {
                    let held = l.held_epoch();
                    (l, held)
                })
                .collect(),
        )
    }

    pub fn leases(&self) -> Vec<Arc<Lease>> {
        self.0.iter().map(|(l, _)| Arc::clone(l)).collect()
    }

    /// Puts every lease back in the epoch it was held in when marked.
    pub fn restore(&self) {
        for (lease, held) in &self.0 {
            *lease.lock() = *held;
        }
    }
}

impl Reservation {
    pub fn is_empty(&self) -> bool {
        self.taken.is_empty()
    }

    pub fn at_ms(&self) -> u64 {
        self.at_ms
    }

    /// The reservation `admit` made of `amounts` against `limits` (which all admitted it),
    /// with the rates' slot ends (`slot_ends`, in the order of `limits`' rates) and the
    /// epochs the concurrency slots are held in (`lease_epochs`, likewise) where known: lets
    /// one host role settle what another reserved. The leases are held in `store`'s book
    /// from now on.
    pub fn of(
        limits: &[Limit],
        amounts: Amounts,
        at_ms: u64,
        slot_ends: &[u64],
        lease_epochs: &[u64],
        store: &impl CounterStore,
    ) -> Self {
        let mut slot_ends = slot_ends.iter().copied();
        let mut lease_epochs = lease_epochs.iter().copied();
        Self {
            taken: limits
                .iter()
                .map(|l| {
                    let (slot_end, lease) = match l.meter {
                        Meter::Rate(_) => (slot_ends.next().unwrap_or(u64::MAX), None),
                        Meter::Quota(_) => (u64::MAX, None),
                        Meter::Concurrency(c) => {
                            let held = lease_epochs.next().unwrap_or_else(|| c.epoch(at_ms));
                            let lease = Arc::new(Lease::new(Arc::clone(&l.store_key), c, held));
                            store.leases().hold(&lease);
                            (u64::MAX, Some(lease))
                        }
                    };
                    Taken {
                        limit: l.clone(),
                        units: amounts.of(l.unit),
                        slot_end,
                        lease,
                    }
                })
                .collect(),
            at_ms,
        }
    }

    /// The slot ends of its rates, in order (see `Reservation::of`).
    pub fn slot_ends(&self) -> impl Iterator<Item = u64> + '_ {
        self.taken
            .iter()
            .filter(|t| matches!(t.limit.meter, Meter::Rate(_)))
            .map(|t| t.slot_end)
    }

    /// The epochs its concurrency slots are held in now, in order (see `Reservation::of`);
    /// a released slot (none is, before settlement) reads as epoch 0, long expired.
    pub fn lease_epochs(&self) -> impl Iterator<Item = u64> + '_ {
        self.taken
            .iter()
            .filter_map(|t| t.lease.as_ref())
            .map(|l| l.held_epoch().unwrap_or(0))
    }

    /// Takes out what it took from the limits `which` picks, as a reservation of its own.
    pub fn split_off(&mut self, which: impl Fn(&Limit) -> bool) -> Reservation {
        let (out, kept) = std::mem::take(&mut self.taken)
            .into_iter()
            .partition(|t| which(&t.limit));
        self.taken = kept;
        Reservation {
            taken: out,
            at_ms: self.at_ms,
        }
    }

    /// Adds another reservation's takings, to be settled together.
    pub fn merge(&mut self, other: Reservation) {
        if self.taken.is_empty() {
            self.at_ms = other.at_ms;
        }
        self.taken.extend(other.taken);
    }
}

#[cfg(test)]
mod tests;
