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

    /// `measure_and_replace`, where `redo` says how the same update is made on another old
    /// value than the one `f` sees (a store that commits remotely hands it over, so that a
    /// hot counter's concurrent updates need not conflict: `Tx`).
    fn redoable<T, E>(
        &self,
        key: &str,
        redo: Redo,
        f: impl FnMut(Option<u64>) -> Result<(T, u64), E>,
    ) -> Result<Result<T, E>, StoreError> {
        let _ = redo;
        self.measure_and_replace(key, f)
    }
}

/// One of two stores, chosen at run time: a host's own store or a transaction, say.
pub enum Either<A, B> {
    Left(A),
    Right(B),
}

impl<A: CounterStore, B: CounterStore> CounterStore for Either<A, B> {
    fn measure_and_replace<T, E>(
        &self,
        key: &str,
        f: impl FnMut(Option<u64>) -> Result<(T, u64), E>,
    ) -> Result<Result<T, E>, StoreError> {
        match self {
            Self::Left(s) => s.measure_and_replace(key, f),
            Self::Right(s) => s.measure_and_replace(key, f),
        }
    }

    fn redoable<T, E>(
        &self,
        key: &str,
        redo: Redo,
        f: impl FnMut(Option<u64>) -> Result<(T, u64), E>,
    ) -> Result<Result<T, E>, StoreError> {
        match self {
            Self::Left(s) => s.redoable(key, redo, f),
            Self::Right(s) => s.redoable(key, redo, f),
        }
    }

    fn leases(&self) -> &LeaseBook {
        match self {
            Self::Left(s) => s.leases(),
            Self::Right(s) => s.leases(),
        }
    }
}

impl<S: CounterStore> CounterStore for &S {
    fn measure_and_replace<T, E>(
        &self,
        key: &str,
        f: impl FnMut(Option<u64>) -> Result<(T, u64), E>,
    ) -> Result<Result<T, E>, StoreError> {
        (**self).measure_and_replace(key, f)
    }

    fn redoable<T, E>(
        &self,
        key: &str,
        redo: Redo,
        f: impl FnMut(Option<u64>) -> Result<(T, u64), E>,
    ) -> Result<Result<T, E>, StoreError> {
        (**self).redoable(key, redo, f)
    }

    fn leases(&self) -> &LeaseBook {
        (**self).leases()
    }
}

/// How an update is made again on whatever value its key holds when a commit lands, by the
/// core's own math (`limits::redo`): where concurrent requests update one counter (a
/// consumer's rate limit, a pool's cursor), each commit is redone on the value the last one
/// left, as long as it still admits what it admitted; only a decision the new value would
/// change goes back to be made again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Redo {
    /// Adds `n` (a counter, a cursor).
    Add { n: u64 },
    /// Reserves `units` at `now_ms` against the limit stored at the key.
    Reserve { units: u64, now_ms: u64 },
    /// Settles a reservation of `units` made at `at_ms` (a rate's slot ending at
    /// `slot_end`) on `used`, at `now_ms`.
    Settle {
        units: u64,
        used: u64,
        at_ms: u64,
        slot_end: u64,
        now_ms: u64,
    },
    /// Gives back a concurrency slot held in epoch `held`.
    Release { held: u64, now_ms: u64 },
    /// Moves a concurrency slot held in epoch `held` to the current epoch.
    Renew { held: u64, now_ms: u64 },
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

/// A transaction over what a host last saw of a remote store (`known`): the core's updates
/// run on those values, and every key read or written is recorded, so that the host can
/// commit them all at once (`commit`), all or nothing, where every value read must still be
/// there. When a commit fails, the host learns the current values (`learn`) and runs the same
/// decision again on them. A key the host never saw is taken as absent: a wrong guess only
/// costs one more round.
///
/// Envoy on Redis decides this way (a filter cannot block on the network); the decision is
/// exact because nothing it read may have changed before its writes land.
pub struct Tx<'a> {
    known: &'a HashMap<String, Option<u64>>,
    ops: std::cell::RefCell<Vec<CommitOp>>,
    leases: &'a LeaseBook,
}

use std::collections::HashMap;

impl<'a> Tx<'a> {
    pub fn new(known: &'a HashMap<String, Option<u64>>, leases: &'a LeaseBook) -> Self {
        Self {
            known,
            ops: std::cell::RefCell::new(Vec::new()),
            leases,
        }
    }

    /// Whether the decision touched no key (nothing to commit).
    pub fn is_empty(&self) -> bool {
        self.ops.borrow().is_empty()
    }

    pub fn into_commit(self) -> Commit {
        Commit {
            ops: self.ops.into_inner(),
        }
    }
}

impl CounterStore for Tx<'_> {
    fn measure_and_replace<T, E>(
        &self,
        key: &str,
        f: impl FnMut(Option<u64>) -> Result<(T, u64), E>,
    ) -> Result<Result<T, E>, StoreError> {
        self.update(key, None, f)
    }

    fn redoable<T, E>(
        &self,
        key: &str,
        redo: Redo,
        f: impl FnMut(Option<u64>) -> Result<(T, u64), E>,
    ) -> Result<Result<T, E>, StoreError> {
        self.update(key, Some(redo), f)
    }

    fn leases(&self) -> &LeaseBook {
        self.leases
    }
}

impl Tx<'_> {
    fn update<T, E>(
        &self,
        key: &str,
        redo: Option<Redo>,
        mut f: impl FnMut(Option<u64>) -> Result<(T, u64), E>,
    ) -> Result<Result<T, E>, StoreError> {
        let mut ops = self.ops.borrow_mut();
        let at = match ops.iter().position(|op| op.key == key) {
            Some(at) => at,
            None => {
                ops.push(CommitOp {
                    key: key.to_string(),
                    expect: self.known.get(key).copied().flatten(),
                    write: None,
                    redo: None,
                });
                ops.len() - 1
            }
        };
        let Some(op) = ops.get_mut(at) else {
            return Err(StoreError::Host("transaction lost a key".into()));
        };
        // A key written earlier in this transaction is read as written.
        let current = op.write.or(op.expect);
        let first_write = op.write.is_none();
        Ok(f(current).map(|(out, new)| {
            op.write = Some(new);
            // Only a key's one update in the transaction can be redone as it says; two (a
            // reservation given back) must land on the value they read.
            op.redo = if first_write { redo } else { None };
            out
        }))
    }
}

/// What a commit's answer teaches about the store: the values written, or the current ones.
pub fn learn(known: &mut HashMap<String, Option<u64>>, commit: &Commit, reply: &CommitReply) {
    for (at, op) in commit.ops.iter().enumerate() {
        let value = if reply.committed && reply.current.is_empty() {
            op.write.or(op.expect)
        } else {
            match reply.current.get(at) {
                Some(v) => *v,
                None => {
                    // An answer that does not say: read it afresh next time.
                    known.remove(&op.key);
                    continue;
                }
            }
        };
        match known.get_mut(&op.key) {
            Some(v) => *v = value,
            None => {
                known.insert(op.key.clone(), value);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The core's tests use the local store.
    pub type CellStore = super::LocalStore;

    /// Plays a remote store: applies a commit as Redis's script does.
    fn apply(remote: &mut HashMap<String, u64>, commit: &Commit) -> CommitReply {
        let current: Vec<Option<u64>> = commit
            .ops
            .iter()
            .map(|op| remote.get(&op.key).copied())
            .collect();
        if commit
            .ops
            .iter()
            .zip(&current)
            .all(|(op, c)| op.expect == *c)
        {
            for op in &commit.ops {
                if let Some(w) = op.write {
                    remote.insert(op.key.clone(), w);
                }
            }
            CommitReply {
                committed: true,
                current: Vec::new(),
            }
        } else {
            CommitReply {
                committed: false,
                current,
            }
        }
    }

    fn add(store: &impl CounterStore, key: &str, n: u64) -> Result<u64, ()> {
        store
            .measure_and_replace(key, |old| {
                let v = old.unwrap_or(0) + n;
                if v > 10 {
                    Err(())
                } else {
                    Ok((v, v))
                }
            })
            .unwrap_or(Err(()))
    }

    #[test]
    fn a_transaction_reads_its_own_writes_and_commits_all_keys() {
        let known = HashMap::new();
        let book = LeaseBook::new();
        let tx = Tx::new(&known, &book);
        assert_eq!(add(&tx, "a", 2), Ok(2));
        assert_eq!(add(&tx, "a", 3), Ok(5));
        assert_eq!(add(&tx, "b", 20), Err(()));
        let commit = tx.into_commit();
        assert_eq!(
            commit.ops,
            vec![
                CommitOp {
                    key: "a".into(),
                    expect: None,
                    write: Some(5),
                    redo: None,
                },
                CommitOp {
                    key: "b".into(),
                    expect: None,
                    write: None,
                    redo: None,
                },
            ]
        );
    }

    #[test]
    fn concurrent_transactions_on_stale_views_converge_exactly() {
        // Three hosts, each with its own view, add 1 to a counter capped at 10: whatever
        // the interleaving, exactly 10 additions succeed and the counter ends at 10.
        let mut remote = HashMap::new();
        let mut views = [HashMap::new(), HashMap::new(), HashMap::new()];
        let book = LeaseBook::new();
        let mut admitted = 0;
        for round in 0..60 {
            let view = &mut views[round % 3];
            loop {
                let tx = Tx::new(view, &book);
                let decision = add(&tx, "n", 1);
                let commit = tx.into_commit();
                let reply = apply(&mut remote, &commit);
                learn(view, &commit, &reply);
                if reply.committed {
                    admitted += u32::from(decision.is_ok());
                    break;
                }
            }
        }
        assert_eq!(admitted, 10);
        assert_eq!(remote.get("n"), Some(&10));
    }

    #[test]
    fn the_wire_format_is_plain_json() {
        let commit = Commit {
            ops: vec![CommitOp {
                key: "k".into(),
                expect: Some(u64::MAX),
                write: None,
                redo: None,
            }],
        };
        let text = serde_json::to_string(&commit).unwrap_or_default();
        assert_eq!(
            text,
            r#"{"ops":[{"key":"k","expect":18446744073709551615}]}"#
        );
        let reply: Result<CommitReply, _> =
            serde_json::from_str(r#"{"committed":false,"current":[null,7]}"#);
        assert_eq!(
            reply.ok(),
            Some(CommitReply {
                committed: false,
                current: vec![None, Some(7)]
            })
        );
    }
}

/// One key of a transaction (`Tx`) as it goes to the store: the value the request's
/// decision read (`None`: absent), and the value to write if every key of the commit still
/// holds what was read (`None`: read only, the decision only depends on it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CommitOp {
    pub key: String,
    pub expect: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write: Option<u64>,
    /// How `write` is made again on another value (`Redo`); none: the key must hold `expect`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redo: Option<Redo>,
}

/// A transaction's keys, committed all or nothing (`POST /v1/store/commit` of
/// `tollgate store-server`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Commit {
    pub ops: Vec<CommitOp>,
}

/// The store's answer to a `Commit`: written, or not because some key held another value
/// than was read. `current` holds every key's value now, in the commit's order: always
/// after a refusal, and after a commit some of whose writes were redone (`Redo`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CommitReply {
    pub committed: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub current: Vec<Option<u64>>,
}

/// Where `tollgate store-server` takes commits.
pub const COMMIT_PATH: &str = "/v1/store/commit";
