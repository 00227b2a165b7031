//! Envoy on Redis (`store.kind: redis`). A filter cannot speak Redis, nor wait on the
//! network inside a callback, so the shared state is reached through `tollgate
//! store-server` (cluster `tollgate_store`) by transactions (`store::Tx`):
//!
//! - A decision the request waits on (the gateway role's admission, the key role's pick of
//!   a key) runs on what this VM last saw of Redis, recording every key it reads and writes.
//!   The request pauses while the store-server commits them all at once, on the condition
//!   that every value read is still there. When another replica got in first, the answer
//!   brings the current values and the decision runs again on them. A decision that read
//!   nothing is not sent at all.
//! - Updates nothing waits on (settlements, key health, lease renewals) are queued and sent
//!   by the VM's root context in batches, one batch in flight at a time, each run again on
//!   fresher values until it lands.
//!
//! When the store-server or Redis fails (no answer within `timeout_ms`, an error), the VM
//! takes `on_failure`'s way for `RETRY_DOWN_MS`, then tries Redis again with the next
//! request: `closed` refuses (503 `shared_state_unavailable`), `open` admits unchecked,
//! `local` enforces this Envoy's share of every limit in its shared data.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType};
use tollgate_core::config::store::{OnFailure, StoreSettings};
use tollgate_core::limits::{self, LeaseBook, LeaseMarks};
use tollgate_core::store::{self, Commit, CommitReply, CounterStore, StoreError, Tx, COMMIT_PATH};
use tollgate_core::Config;

use crate::host;

/// The cluster `tollgate envoy-bootstrap` renders for the store-server.
const CLUSTER: &str = tollgate_core::roles::STORE_CLUSTER;

/// How long a VM answers by `on_failure` after Redis failed, before trying it again.
const RETRY_DOWN_MS: u64 = 250;

/// Rounds of a queued batch before it is given up (each lost to another replica's write).
pub const MAX_ROUNDS: u32 = 32;

/// Most queued updates sent in one batch.
const MAX_BATCH: usize = 256;

struct Settings {
    timeout: Duration,
    on_failure: OnFailure,
    /// `on_failure: local`: the config with each limit divided by `replicas`.
    share: Option<Arc<Config>>,
}

/// An update nothing waits on: runs on a transaction, maybe several times.
type Job = Box<dyn FnMut(&Tx<'_>)>;

/// The batch of queued updates in flight.
struct Flight {
    token: u32,
    jobs: Vec<Job>,
    marks: LeaseMarks,
    commit: Commit,
    rounds: u32,
}

thread_local! {
    static SETTINGS: RefCell<Option<Settings>> = const { RefCell::new(None) };
    /// What this VM last saw of each key on Redis (bounded by the config's keys).
    static KNOWN: RefCell<HashMap<String, Option<u64>>> = RefCell::new(HashMap::new());
    /// When Redis last failed, while the VM answers by `on_failure`.
    static DOWN_AT: Cell<Option<u64>> = const { Cell::new(None) };
    static QUEUE: RefCell<Vec<Job>> = const { RefCell::new(Vec::new()) };
    static FLIGHT: RefCell<Option<Flight>> = const { RefCell::new(None) };
}

/// The concurrency leases of requests admitted on Redis (renewed there, by queued updates);
/// those admitted on this Envoy's shared data are in `SharedStore`'s book.
static LEASES: LeaseBook = LeaseBook::new();

/// Takes the config's `store` section (each root, at configure).
pub fn configure(config: &Config, text: &str) {
    let settings = match &config.store {
        StoreSettings::Local => None,
        StoreSettings::Redis(redis) => {
            let share = (redis.on_failure == OnFailure::Local)
                .then(|| {
                    let mut share = crate::load(text).ok()?;
                    share.divide_limits(redis.replicas);
                    Some(Arc::new(share))
                })
                .flatten();
            Some(Settings {
                // The store-server answers within one `timeout_ms` to (re)connect to Redis
                // and one to run the commit: its own 503 comes before Envoy gives up.
                timeout: Duration::from_millis(2 * redis.timeout_ms + 20),
                on_failure: redis.on_failure,
                share,
            })
        }
    };
    SETTINGS.with(|s| *s.borrow_mut() = settings);
}

/// Where a decision made now goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// `store.kind: local`: this Envoy's shared data.
    Local,
    Redis,
    /// Redis failed a moment ago: `on_failure` answers.
    Failed(OnFailure),
}

pub fn backing(now_ms: u64) -> Backing {
    SETTINGS.with(|s| match &*s.borrow() {
        None => Backing::Local,
        Some(settings) => match DOWN_AT.with(Cell::get) {
            Some(at) if now_ms < at.saturating_add(RETRY_DOWN_MS) => {
                Backing::Failed(settings.on_failure)
            }
            _ => Backing::Redis,
        },
    })
}

/// The config a request admitted by this Envoy's share of the limits runs on.
pub fn share() -> Option<Arc<Config>> {
    SETTINGS.with(|s| s.borrow().as_ref().and_then(|s| s.share.clone()))
}

/// Runs `decide` on what this VM knows of Redis: its outcome, and the keys to commit.
pub fn decide<R>(decide: impl FnOnce(&Tx<'_>) -> R) -> (R, Commit) {
    KNOWN.with(|known| {
        let known = known.borrow();
        let tx = Tx::new(&known, &LEASES);
        let out = decide(&tx);
        (out, tx.into_commit())
    })
}

/// Sends `commit` to the store-server from the context running now, whose
/// `on_http_call_response` gets the answer (`outcome`).
pub fn send(commit: &Commit) -> Result<u32, String> {
    let timeout = SETTINGS.with(|s| s.borrow().as_ref().map(|s| s.timeout));
    let body = serde_json::to_vec(commit).map_err(|e| e.to_string())?;
    hostcalls::dispatch_http_call(
        CLUSTER,
        vec![
            (":method", "POST"),
            (":path", COMMIT_PATH),
            (":authority", CLUSTER),
            ("content-type", "application/json"),
        ],
        Some(&body),
        vec![],
        timeout.unwrap_or(Duration::from_millis(50)),
    )
    .map_err(|s| format!("dispatch_http_call: {s:?}"))
}

/// What became of a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Committed,
    /// Another writer got in first: this VM now knows the current values.
    Conflict,
    /// No usable answer: Redis is taken as down for a moment.
    Failed,
}

/// Reads the store-server's answer to `commit` (in `on_http_call_response`).
pub fn outcome(commit: &Commit, body_size: usize) -> Outcome {
    let status = hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status")
        .ok()
        .flatten();
    let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
        .ok()
        .flatten()
        .unwrap_or_default();
    let reply = match status.as_deref() {
        Some(b"200") => serde_json::from_slice::<CommitReply>(&body).ok(),
        _ => None,
    };
    let Some(reply) = reply else {
        let status = status.map(|s| String::from_utf8_lossy(&s).into_owned());
        let said = String::from_utf8_lossy(body.get(..body.len().min(200)).unwrap_or_default());
        went_down(&format!(
            "the store-server answered {}: {said}",
            status.as_deref().unwrap_or("nothing in time")
        ));
        return Outcome::Failed;
    };
    KNOWN.with(|known| store::learn(&mut known.borrow_mut(), commit, &reply));
    if DOWN_AT.with(|d| d.take()).is_some() {
        host::log(
            LogLevel::Info,
            "tollgate: redis is back: shared state is used again",
        );
    }
    if reply.committed {
        Outcome::Committed
    } else {
        Outcome::Conflict
    }
}

/// Redis (or the way to it) failed: `on_failure` answers for a moment.
pub fn went_down(why: &str) {
    let was_up = DOWN_AT.with(|d| d.replace(Some(host::now_ms()))).is_none();
    let mode = SETTINGS.with(|s| s.borrow().as_ref().map(|s| s.on_failure.as_str()));
    crate::metrics::store_unavailable(mode.unwrap_or("closed"));
    if was_up {
        host::log(
            LogLevel::Error,
            &format!(
                "tollgate: redis is unavailable ({why}); requests get the on_failure answer ({}) until it is back",
                mode.unwrap_or("closed")
            ),
        );
    }
}

/// Whether Redis is taken as up in this VM (for `tollgate_store_up`).
pub fn is_up() -> bool {
    DOWN_AT.with(Cell::get).is_none()
}

/// `on_failure: closed`: every update fails, so the core refuses with 503
/// `shared_state_unavailable`.
pub struct Unavailable;

impl CounterStore for Unavailable {
    fn measure_and_replace<T, E>(
        &self,
        _key: &str,
        _f: impl FnMut(Option<u64>) -> Result<(T, u64), E>,
    ) -> Result<Result<T, E>, StoreError> {
        Err(StoreError::Host("redis is unavailable".into()))
    }

    fn leases(&self) -> &LeaseBook {
        &LEASES
    }
}

/// `on_failure: open`: the state reads as empty and nothing is written: admitted unchecked.
pub struct Unchecked;

impl CounterStore for Unchecked {
    fn measure_and_replace<T, E>(
        &self,
        _key: &str,
        mut f: impl FnMut(Option<u64>) -> Result<(T, u64), E>,
    ) -> Result<Result<T, E>, StoreError> {
        Ok(f(None).map(|(out, _)| out))
    }

    fn leases(&self) -> &LeaseBook {
        &LEASES
    }
}

/// Queues an update nothing waits on; the root's next tick sends it. It may run more than
/// once, each time on fresher values: it must be a function of what it captured.
pub fn defer(job: impl FnMut(&Tx<'_>) + 'static) {
    match backing(host::now_ms()) {
        Backing::Redis => QUEUE.with(|q| q.borrow_mut().push(Box::new(job))),
        // Nothing to send it to: what it would give back stays taken on Redis until the
        // limits' windows pass (the cautious side).
        Backing::Failed(_) | Backing::Local => {}
    }
}

/// Queues the renewal of the leases of requests admitted on Redis (each half lease).
pub fn renew_leases(now_ms: u64) {
    let leases = LeaseMarks::of_book(&LEASES).leases();
    if !leases.is_empty() {
        defer(move |tx| limits::renew(&leases, tx, now_ms));
    }
}

/// Sends the queued updates as one batch, unless one is in flight (from a root context).
pub fn flush() {
    if FLIGHT.with(|f| f.borrow().is_some()) {
        return;
    }
    let jobs: Vec<Job> = QUEUE.with(|q| {
        let mut q = q.borrow_mut();
        let n = q.len().min(MAX_BATCH);
        q.drain(..n).collect()
    });
    if jobs.is_empty() {
        return;
    }
    // Every lease's epoch before the batch runs: a rerun starts from the same place.
    let marks = LeaseMarks::of_book(&LEASES);
    launch(jobs, marks, 0);
}

fn launch(mut jobs: Vec<Job>, marks: LeaseMarks, rounds: u32) {
    let ((), commit) = decide(|tx| {
        for job in &mut jobs {
            job(tx);
        }
    });
    if commit.ops.is_empty() {
        return;
    }
    match send(&commit) {
        Ok(token) => FLIGHT.with(|f| {
            *f.borrow_mut() = Some(Flight {
                token,
                jobs,
                marks,
                commit,
                rounds,
            })
        }),
        Err(e) => {
            marks.restore();
            went_down(&e);
        }
    }
}

/// The root's `on_http_call_response`: the batch in flight landed, lost a race (it runs
/// again on the current values) or failed (dropped: Redis keeps what it reserved).
pub fn on_flight_answer(token: u32, body_size: usize) {
    let Some(flight) = FLIGHT.with(|f| {
        let mut f = f.borrow_mut();
        match &*f {
            Some(flight) if flight.token == token => f.take(),
            _ => None,
        }
    }) else {
        return;
    };
    match outcome(&flight.commit, body_size) {
        Outcome::Committed => flush(),
        Outcome::Conflict if flight.rounds < MAX_ROUNDS => {
            flight.marks.restore();
            launch(flight.jobs, flight.marks, flight.rounds + 1);
        }
        Outcome::Conflict => {
            flight.marks.restore();
            host::log(
                LogLevel::Warn,
                &format!(
                    "tollgate: {} queued updates lost {MAX_ROUNDS} rounds to other writers and were dropped",
                    flight.jobs.len()
                ),
            );
        }
        Outcome::Failed => flight.marks.restore(),
    }
}

/// Reads the store as this VM last saw it (for gauges): nothing is committed.
pub fn with_known<R>(read: impl FnOnce(&Tx<'_>) -> R) -> R {
    decide(read).0
}

/// The store a request's decisions run on, by where it was admitted.
pub enum AnyStore<'a> {
    /// This Envoy's shared data (`store.kind: local`, or its share under `on_failure: local`).
    Shared,
    Tx(&'a Tx<'a>),
    Unavailable,
    Unchecked,
}

impl CounterStore for AnyStore<'_> {
    fn measure_and_replace<T, E>(
        &self,
        key: &str,
        f: impl FnMut(Option<u64>) -> Result<(T, u64), E>,
    ) -> Result<Result<T, E>, StoreError> {
        match self {
            Self::Shared => host::SharedStore.measure_and_replace(key, f),
            Self::Tx(tx) => tx.measure_and_replace(key, f),
            Self::Unavailable => Unavailable.measure_and_replace(key, f),
            Self::Unchecked => Unchecked.measure_and_replace(key, f),
        }
    }

    fn redoable<T, E>(
        &self,
        key: &str,
        redo: store::Redo,
        f: impl FnMut(Option<u64>) -> Result<(T, u64), E>,
    ) -> Result<Result<T, E>, StoreError> {
        match self {
            Self::Tx(tx) => tx.redoable(key, redo, f),
            other => other.measure_and_replace(key, f),
        }
    }

    fn leases(&self) -> &LeaseBook {
        match self {
            Self::Shared => host::SharedStore.leases(),
            Self::Tx(tx) => tx.leases(),
            Self::Unavailable | Self::Unchecked => &LEASES,
        }
    }
}

impl Backing {
    /// The store for what happens after the decision (the response, the settlement), when
    /// it is not Redis (whose updates are queued, `defer`).
    pub fn after(self) -> AnyStore<'static> {
        match self {
            Self::Local | Self::Failed(OnFailure::Local) => AnyStore::Shared,
            Self::Failed(OnFailure::Open) => AnyStore::Unchecked,
            // Redis: only the leases' book is used (see `defer` for updates).
            Self::Redis | Self::Failed(OnFailure::Closed) => AnyStore::Unavailable,
        }
    }

    /// The store a decision runs on when it is not Redis, and the config it runs with.
    pub fn decide_on(self, config: &Arc<Config>) -> (AnyStore<'static>, Arc<Config>) {
        match self {
            Self::Failed(OnFailure::Local) => match share() {
                Some(share) => (AnyStore::Shared, share),
                None => (AnyStore::Unavailable, Arc::clone(config)),
            },
            other => (other.after(), Arc::clone(config)),
        }
    }
}
