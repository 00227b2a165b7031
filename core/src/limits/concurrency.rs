//! Concurrency as leases: a request in flight holds a slot that expires unless renewed, so
//! the slots of a holder that dies (an Envoy VM that trapped, a lost `on_log`, later a
//! replica) come back by themselves.
//!
//! One counter per limit, as for the other meters. Time is cut into epochs of `lease_ms`;
//! the counter holds the current epoch (mod 2^24) and the slots counted in it and in the one
//! before. A slot counts from the epoch it was taken or last renewed in until the end of the
//! next one: between one and two lease lengths. The holder renews its live slots (moves them
//! to the current epoch) at least once per epoch — the hosts do it every half lease, on a
//! timer — and a slot not renewed drops out when its second epoch ends.

use std::sync::{Arc, Mutex, MutexGuard, Weak};

const EPOCH_BITS: u32 = 24;
const COUNT_BITS: u32 = 20;
const EPOCH_MASK: u64 = (1 << EPOCH_BITS) - 1;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

/// Most slots one limit can count (each of its two epochs holds up to this many).
pub const MAX_SLOTS: u64 = COUNT_MASK;

/// A concurrency limit: at most `max` requests in flight, each holding a lease of `lease_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Concurrency {
    pub max: u64,
    pub lease_ms: u64,
}

/// The slots counted in the current epoch and in the one before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slots {
    current: u64,
    previous: u64,
}

impl Concurrency {
    /// The epoch `now_ms` falls in.
    pub fn epoch(&self, now_ms: u64) -> u64 {
        now_ms / self.lease_ms.max(1)
    }

    /// The slots as of `epoch`: a counter last written one epoch ago has its current count
    /// as the previous one; older counts have expired. A counter from the future (a clock
    /// that stepped back) is read as current, never as expired: slots are not freed early.
    fn slots(state: Option<u64>, epoch: u64) -> Slots {
        let Some(state) = state else {
            return Slots {
                current: 0,
                previous: 0,
            };
        };
        let written = state >> (2 * COUNT_BITS);
        let current = (state >> COUNT_BITS) & COUNT_MASK;
        let previous = state & COUNT_MASK;
        let age = epoch.wrapping_sub(written) & EPOCH_MASK;
        match age {
            0 => Slots { current, previous },
            1 => Slots {
                current: 0,
                previous: current,
            },
            a if a >= 1 << (EPOCH_BITS - 1) => Slots { current, previous },
            _ => Slots {
                current: 0,
                previous: 0,
            },
        }
    }

    fn pack(epoch: u64, slots: Slots) -> u64 {
        ((epoch & EPOCH_MASK) << (2 * COUNT_BITS))
            | (slots.current.min(COUNT_MASK) << COUNT_BITS)
            | slots.previous.min(COUNT_MASK)
    }

    /// Requests in flight as `state` says at `now_ms`.
    pub fn in_flight(&self, state: Option<u64>, now_ms: u64) -> u64 {
        let s = Self::slots(state, self.epoch(now_ms));
        s.current + s.previous
    }

    /// Takes a slot in the current epoch: the new state, or `None` when all are taken.
    pub fn reserve(&self, state: Option<u64>, now_ms: u64) -> Option<u64> {
        let epoch = self.epoch(now_ms);
        let mut s = Self::slots(state, epoch);
        if s.current + s.previous >= self.max {
            return None;
        }
        s.current += 1;
        Some(Self::pack(epoch, s))
    }

    /// Gives back a slot counted in `held` (its epoch); one that expired is gone already.
    pub fn release(&self, state: Option<u64>, now_ms: u64, held: u64) -> u64 {
        let epoch = self.epoch(now_ms);
        let mut s = Self::slots(state, epoch);
        match epoch.saturating_sub(held) {
            0 => s.current = s.current.saturating_sub(1),
            1 => s.previous = s.previous.saturating_sub(1),
            _ => {}
        }
        Self::pack(epoch, s)
    }

    /// Moves a slot held since epoch `held` to the current one; a slot that expired meanwhile
    /// (the renewal came late) is counted again, even past `max`: its request is running.
    /// `None` when the slot is current already.
    pub fn renew(&self, state: Option<u64>, now_ms: u64, held: u64) -> Option<u64> {
        let epoch = self.epoch(now_ms);
        if held >= epoch {
            return None;
        }
        let mut s = Self::slots(state, epoch);
        if epoch - held == 1 {
            s.previous = s.previous.saturating_sub(1);
        }
        s.current += 1;
        Some(Self::pack(epoch, s))
    }
}

/// One request's slot under one concurrency limit, shared by the request (which releases it)
/// and its host's `LeaseBook` (which renews it while the request lives).
#[derive(Debug)]
pub struct Lease {
    pub(super) store_key: Arc<str>,
    pub(super) meter: Concurrency,
    /// The epoch the slot is counted in; `None` once released. Locked across the store
    /// operation so that a renewal and the release never race to different epochs.
    pub(super) held: Mutex<Option<u64>>,
}

impl Lease {
    pub(super) fn new(store_key: Arc<str>, meter: Concurrency, held: u64) -> Self {
        Self {
            store_key,
            meter,
            held: Mutex::new(Some(held)),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Option<u64>> {
        // A poisoned lock only means another thread panicked while holding it; the epoch
        // inside is still the last one written.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The epoch the slot is counted in now, for handing the lease to another role.
    pub fn held_epoch(&self) -> Option<u64> {
        *self.lock()
    }
}

impl PartialEq for Lease {
    fn eq(&self, other: &Self) -> bool {
        self.store_key == other.store_key
            && self.meter == other.meter
            && self.held_epoch() == other.held_epoch()
    }
}

impl Eq for Lease {}

/// The leases a host holds for its live requests. A request that ends without releasing its
/// slots (dropped) leaves the book by itself: the book keeps only weak references.
#[derive(Debug, Default)]
pub struct LeaseBook {
    leases: Mutex<Vec<Weak<Lease>>>,
}

impl LeaseBook {
    pub const fn new() -> Self {
        Self {
            leases: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Weak<Lease>>> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn hold(&self, lease: &Arc<Lease>) {
        let mut leases = self.lock();
        // Dropped requests are swept at each renewal; sweep here too when the book has grown
        // a lot since, so that its size follows the requests in flight.
        if leases.len() >= 1024 && leases.len() == leases.capacity() {
            leases.retain(|l| l.strong_count() > 0);
        }
        leases.push(Arc::downgrade(lease));
    }

    /// The leases still held, dropping those of requests that are gone.
    pub(super) fn live(&self) -> Vec<Arc<Lease>> {
        let mut leases = self.lock();
        let mut live = Vec::with_capacity(leases.len());
        leases.retain(|l| match l.upgrade() {
            Some(lease) => {
                live.push(lease);
                true
            }
            None => false,
        });
        live
    }

    /// Leases held by live requests.
    pub fn len(&self) -> usize {
        self.lock().iter().filter(|l| l.strong_count() > 0).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: Concurrency = Concurrency {
        max: 2,
        lease_ms: 1_000,
    };

    #[test]
    fn slots_are_taken_up_to_the_limit_and_released() {
        let s = C.reserve(None, 10_500).unwrap();
        let s = C.reserve(Some(s), 10_600).unwrap();
        assert_eq!(C.reserve(Some(s), 10_700), None);
        assert_eq!(C.in_flight(Some(s), 10_700), 2);
        let s = C.release(Some(s), 10_800, 10);
        assert_eq!(C.in_flight(Some(s), 10_800), 1);
        assert!(C.reserve(Some(s), 10_900).is_some());
    }

    #[test]
    fn a_slot_not_renewed_expires_after_its_second_epoch() {
        let s = C.reserve(None, 10_999).unwrap();
        // Still counted through epoch 11, gone in epoch 12.
        assert_eq!(C.in_flight(Some(s), 11_000), 1);
        assert_eq!(C.in_flight(Some(s), 11_999), 1);
        assert_eq!(C.in_flight(Some(s), 12_000), 0);
        // Releasing it late changes nothing.
        let s = C.release(Some(s), 12_500, 10);
        assert_eq!(C.in_flight(Some(s), 12_500), 0);
    }

    #[test]
    fn a_renewed_slot_lives_on_and_is_released_from_its_new_epoch() {
        let s = C.reserve(None, 10_000).unwrap();
        let other = C.reserve(Some(s), 10_100).unwrap();
        // In epoch 11 the first request renews, the second does not.
        let s = C.renew(Some(other), 11_400, 10).unwrap();
        assert_eq!(C.renew(Some(s), 11_600, 11), None, "current already");
        assert_eq!(C.in_flight(Some(s), 11_500), 2);
        assert_eq!(C.in_flight(Some(s), 12_000), 1, "the other one expired");
        let s = C.release(Some(s), 12_100, 11);
        assert_eq!(C.in_flight(Some(s), 12_100), 0);
    }

    #[test]
    fn a_late_renewal_counts_the_slot_again() {
        let s = C.reserve(None, 10_000).unwrap();
        let s = C.renew(Some(s), 13_000, 10).unwrap();
        assert_eq!(C.in_flight(Some(s), 13_000), 1);
        let s = C.release(Some(s), 13_100, 13);
        assert_eq!(C.in_flight(Some(s), 13_100), 0);
    }

    #[test]
    fn a_clock_that_steps_back_frees_nothing() {
        let s = C.reserve(None, 20_000).unwrap();
        assert_eq!(C.in_flight(Some(s), 15_000), 1);
    }

    #[test]
    fn the_book_forgets_dropped_requests() {
        let book = LeaseBook::new();
        let a = Arc::new(Lease::new("k".into(), C, 1));
        let b = Arc::new(Lease::new("k".into(), C, 1));
        book.hold(&a);
        book.hold(&b);
        drop(a);
        assert_eq!(book.live().len(), 1);
        assert_eq!(book.len(), 1);
        drop(b);
        assert!(book.is_empty());
    }
}
