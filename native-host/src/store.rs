//! The native host's `CounterStore`: an in-memory map of atomics shared by every connection
//! task (`store.kind: local`), or Redis shared by every replica (`redis_store`), with the
//! in-memory map standing in while Redis is down under `on_failure: local`. Keys are bounded
//! by the config, not by traffic.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use std::sync::Arc;

use tollgate_core::config::store::OnFailure;
use tollgate_core::limits::LeaseBook;
use tollgate_core::store::{CounterStore, Either, StoreError, Tx};

use crate::redis_store::RedisStore;

pub enum Store {
    Local(MemoryStore),
    Redis {
        redis: Arc<RedisStore>,
        /// `on_failure: local`: where this process enforces its share while Redis is down.
        fallback: MemoryStore,
    },
}

impl Store {
    /// Whether requests use this process's share of the limits now (Redis is down and
    /// `on_failure` is `local`).
    pub fn on_local_share(&self) -> bool {
        match self {
            Self::Local(_) => false,
            Self::Redis { redis, .. } => redis.on_failure() == OnFailure::Local && !redis.is_up(),
        }
    }

    pub fn redis(&self) -> Option<&Arc<RedisStore>> {
        match self {
            Self::Local(_) => None,
            Self::Redis { redis, .. } => Some(redis),
        }
    }

    /// Redis, while it answers: decisions are made as transactions on it.
    pub fn transacting(&self) -> Option<&Arc<RedisStore>> {
        self.redis().filter(|r| r.is_up())
    }
}

impl CounterStore for Store {
    fn measure_and_replace<T, E>(
        &self,
        key: &str,
        mut f: impl FnMut(Option<u64>) -> Result<(T, u64), E>,
    ) -> Result<Result<T, E>, StoreError> {
        match self {
            Self::Local(m) => m.measure_and_replace(key, f),
            Self::Redis { redis, fallback } => {
                if self.on_local_share() {
                    redis.count_unavailable();
                    return fallback.measure_and_replace(key, f);
                }
                match redis.measure_and_replace(key, &mut f) {
                    // Failed just now: the share takes over from this update on.
                    Err(_) if self.on_local_share() => fallback.measure_and_replace(key, f),
                    other => other,
                }
            }
        }
    }

    fn leases(&self) -> &LeaseBook {
        match self {
            Self::Local(m) => m.leases(),
            Self::Redis { redis, .. } => redis.leases(),
        }
    }
}

/// The store a decision runs on: the process's own (`Store`: memory, or Redis key by key,
/// or `on_failure`'s way while it is down: `Left`), or a transaction on Redis (`Right`,
/// `Gateway::decide`).
pub type DecideOn<'a> = Either<&'a Store, &'a Tx<'a>>;

#[derive(Default)]
pub struct MemoryStore {
    counters: RwLock<HashMap<String, AtomicU64>>,
    leases: LeaseBook,
}

impl CounterStore for MemoryStore {
    fn measure_and_replace<T, E>(
        &self,
        key: &str,
        mut f: impl FnMut(Option<u64>) -> Result<(T, u64), E>,
    ) -> Result<Result<T, E>, StoreError> {
        {
            let counters = self.counters.read().map_err(|_| poisoned())?;
            if let Some(cell) = counters.get(key) {
                let mut old = cell.load(Ordering::Acquire);
                loop {
                    let (out, new) = match f(Some(old)) {
                        Ok(v) => v,
                        Err(e) => return Ok(Err(e)),
                    };
                    match cell.compare_exchange_weak(old, new, Ordering::AcqRel, Ordering::Acquire)
                    {
                        Ok(_) => return Ok(Ok(out)),
                        Err(current) => old = current,
                    }
                }
            }
        }
        // First write of this key: take the write lock, and look again in case another task
        // inserted it in between.
        let mut counters = self.counters.write().map_err(|_| poisoned())?;
        let current = counters.get(key).map(|c| c.load(Ordering::Acquire));
        Ok(f(current).map(|(out, new)| {
            match counters.get(key) {
                Some(cell) => cell.store(new, Ordering::Release),
                None => {
                    counters.insert(key.to_string(), AtomicU64::new(new));
                }
            }
            out
        }))
    }

    fn leases(&self) -> &LeaseBook {
        &self.leases
    }
}

fn poisoned() -> StoreError {
    StoreError::Host("the counter map lock is poisoned".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn concurrent_increments_are_not_lost() {
        let store = Arc::new(MemoryStore::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        let r = store.measure_and_replace("k", |old| {
                            Ok::<_, ()>(((), old.unwrap_or(0) + 1))
                        });
                        assert_eq!(r, Ok(Ok(())));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let total = store.measure_and_replace("k", |old| Ok::<_, ()>((old, 0)));
        assert_eq!(total, Ok(Ok(Some(40_000))));
    }

    #[test]
    fn a_refusing_closure_writes_nothing() {
        let store = MemoryStore::default();
        assert_eq!(
            store.measure_and_replace("k", |_| Err::<((), u64), _>("no")),
            Ok(Err("no"))
        );
        assert_eq!(
            store.measure_and_replace("k", |old| Ok::<_, ()>((old, 1))),
            Ok(Ok(None))
        );
    }
}
