//! Shared counters. Every piece of state that several workers must agree on (round-robin
//! cursors now; buckets and key health later) is one `u64` per key, updated through
//! `measure_and_replace` with a pure closure over the old value, after governor's
//! `StateStore`. Envoy implements it with proxy-wasm shared data and compare-and-swap, the
//! native host with atomics. The core never owns the storage.

/// Why a store could not apply an update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// Other writers kept winning the compare-and-swap; the update was not applied.
    Contended { attempts: u32 },
    /// The host refused the operation.
    Host(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Contended { attempts } => {
                write!(f, "shared state stayed contended after {attempts} attempts")
            }
            Self::Host(m) => write!(f, "shared state unavailable: {m}"),
        }
    }
}

use crate::limits::LeaseBook;

/// A map from key to one `u64`, updated atomically.
pub trait CounterStore {
    /// Reads the value at `key` (`None` if never written), lets `f` decide, and if `f`
    /// returns `Ok((out, new))` stores `new` atomically with respect to other writers,
    /// calling `f` again on a fresh value when another writer got in between. When `f`
    /// returns `Err`, nothing is written and the error is handed back as the inner result.
    /// `f` must be pure: it may run several times.
    fn measure_and_replace<T, E>(
        &self,
        key: &str,
        f: impl FnMut(Option<u64>) -> Result<(T, u64), E>,
    ) -> Result<Result<T, E>, StoreError>;

    /// The concurrency leases this process (or Envoy VM) holds for its live requests, which
    /// it renews with `limits::renew_leases` while they run.
    fn leases(&self) -> &LeaseBook;
}

/// A single-threaded store: for the core's tests and benches, and any host that runs one
/// request at a time.
#[derive(Debug, Default)]
pub struct LocalStore(
    std::cell::RefCell<std::collections::BTreeMap<String, u64>>,
    LeaseBook,
);

impl CounterStore for LocalStore {
    fn measure_and_replace<T, E>(
        &self,
        key: &str,
        mut f: impl FnMut(Option<u64>) -> Result<(T, u64), E>,
    ) -> Result<Result<T, E>, StoreError> {
        let old = self.0.borrow().get(key).copied();
        Ok(f(old).map(|(out, new)| {
            let mut map = self.0.borrow_mut();
            match map.get_mut(key) {
                Some(v) => *v = new,
                None => {
                    map.insert(key.to_string(), new);
                }
            }
            out
        }))
    }

    fn leases(&self) -> &LeaseBook {
        &self.1
    }
}

#[cfg(test)]
pub(crate) mod tests {
    /// The core's tests use the local store.
    pub type CellStore = super::LocalStore;
}
