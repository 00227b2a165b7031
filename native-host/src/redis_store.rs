//! Shared state on Redis (`store.kind: redis`), so that several native replicas enforce one
//! set of limits and see one key health. Every value of the core's `CounterStore` is one
//! Redis string; an update is a compare-and-set script (`CAS`): the core's pure closure
//! decides the new value from the old, and the script writes it only if the old is still
//! there, else answers the current value for the closure to decide again. The limits' math
//! therefore exists once, in the core (docs/redis.md says why).
//!
//! The core calls the store synchronously; each Redis call runs under
//! `tokio::task::block_in_place`, so the runtime moves other tasks off the thread meanwhile.
//! A call that fails (down, slower than `timeout_ms`, a script error) marks Redis down:
//! requests then get `on_failure`'s answer at once, without waiting on Redis, until a
//! background probe finds it up again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{Connection, Script};
use tollgate_core::config::store::{OnFailure, RedisSettings};
use tollgate_core::limits::LeaseBook;
use tollgate_core::limits::{self, LeaseMarks, Limit};
use tollgate_core::store::{Commit, CommitReply, CounterStore, Redo, StoreError, Tx};
use tollgate_core::Config;

/// Writes `ARGV[2]` at `KEYS[1]` if it holds `ARGV[1]` (`""`: absent), to expire after
/// `ARGV[3]` ms (`"0"`: never); answers `{1}`, or `{0, current}` (`""` when absent). Values
/// are decimal strings: Lua never reads them as numbers, which it could not hold exactly
/// beyond 2^53.
const CAS: &str = r#"
local current = redis.call('GET', KEYS[1])
if current == false then current = '' end
if current == ARGV[1] then
  if ARGV[3] == '0' then
    redis.call('SET', KEYS[1], ARGV[2])
  else
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  end
  return {1}
end
return {0, current}
"#;

/// Commits a transaction all or nothing. Per op `i` (1-based), `KEYS[i]` is its key and
/// `ARGV[3i-2]`, `ARGV[3i-1]`, `ARGV[3i]` are the value it expects (`""`: absent), the value to
/// write (`"-"`: none, a read-only op) and the write's expiry in ms (`"0"`: never). If every
/// key holds what its op expects, every write is made and the answer is `{1}`; else nothing
/// is written and the answer is `{0, current_1, …, current_n}` (`""` when absent). As in
/// `CAS`, values stay strings: Lua numbers are doubles and cannot hold 64 bits.
const COMMIT: &str = r#"
local n = #KEYS
local current = {}
local matched = true
for i = 1, n do
  local v = redis.call('GET', KEYS[i])
  if v == false then v = '' end
  current[i] = v
  if v ~= ARGV[3 * i - 2] then matched = false end
end
if not matched then
  local reply = {0}
  for i = 1, n do reply[i + 1] = current[i] end
  return reply
end
for i = 1, n do
  local value = ARGV[3 * i - 1]
  if value ~= '-' then
    local ttl = ARGV[3 * i]
    if ttl == '0' then
      redis.call('SET', KEYS[i], value)
    else
      redis.call('SET', KEYS[i], value, 'PX', ttl)
    end
  end
end
return {1}
"#;

/// An op's write made again on a key's current value (`None`: it cannot be).
pub type RedoFn<'a> = dyn Fn(&str, &Redo, Option<u64>) -> Option<u64> + Sync + 'a;

/// Rounds of redoing a commit's hot counters on fresher values before the commit is handed
/// back as refused.
const REDO_ROUNDS: usize = 16;

/// `commit`, where a key that holds another value than its op expects has the op's write
/// made again on that value when the op says how (`Redo`, by `redo`, the core's math):
/// concurrent commits on one hot counter then land one after the other instead of sending
/// each decision back to be made again. Only a key whose value changes what was decided (an
/// op without a redo, or one `redo` answers `None` for) hands the commit back refused, with
/// every key's value now. A commit whose writes were redone answers the values written.
pub async fn commit_redoing(
    conn: &mut impl redis::aio::ConnectionLike,
    commit: &Commit,
    redo: &RedoFn<'_>,
) -> redis::RedisResult<CommitReply> {
    let mut commit = commit.clone();
    let mut redone = false;
    let mut last = None;
    for _ in 0..REDO_ROUNDS {
        let reply = self::commit(conn, &commit).await?;
        if reply.committed {
            return Ok(if redone {
                CommitReply {
                    committed: true,
                    current: commit.ops.iter().map(|op| op.write.or(op.expect)).collect(),
                }
            } else {
                reply
            });
        }
        for (op, current) in commit.ops.iter_mut().zip(&reply.current) {
            if op.expect == *current {
                continue;
            }
            let again = match (op.redo, op.write) {
                (Some(how), Some(_)) => redo(&op.key, &how, *current),
                _ => None,
            };
            match again {
                Some(new) => {
                    op.expect = *current;
                    op.write = Some(new);
                    redone = true;
                }
                None => {
                    tracing::debug!(
                        key = op.key.as_str(),
                        "a commit is handed back: its decision read a value that changed"
                    );
                    return Ok(reply);
                }
            }
        }
        last = Some(reply);
    }
    // Other writers kept winning: handed back, to be decided again.
    Ok(last.unwrap_or(CommitReply {
        committed: false,
        current: Vec::new(),
    }))
}

/// `COMMIT`, hashed once (it is run by `EVALSHA`, loaded when Redis does not know it).
fn commit_script() -> &'static Script {
    static SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| Script::new(COMMIT))
}

/// Commits `commit` on Redis in one script run: all of its writes if every key holds the
/// value its op expects, else none, answering every key's current value (the caller decides
/// again). Keys are the core's; they get `PREFIX` here. An empty commit is committed without
/// asking Redis. A value at a key that is not a `u64` is an error, as is a malformed reply.
pub async fn commit(
    conn: &mut impl redis::aio::ConnectionLike,
    commit: &Commit,
) -> redis::RedisResult<CommitReply> {
    if commit.ops.is_empty() {
        return Ok(CommitReply {
            committed: true,
            current: Vec::new(),
        });
    }
    let mut invocation = commit_script().prepare_invoke();
    for op in &commit.ops {
        let key = format!("{PREFIX}{}", op.key);
        let ttl = ttl_ms(&key);
        invocation
            .key(key)
            .arg(op.expect.map_or(String::new(), |v| v.to_string()))
            .arg(op.write.map_or("-".to_string(), |v| v.to_string()))
            .arg(ttl.to_string());
    }
    let reply: Vec<String> = invocation.invoke_async(conn).await?;
    let malformed = |what: String| {
        redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "the commit script's reply",
            what,
        ))
    };
    match reply.first().map(String::as_str) {
        Some("1") => Ok(CommitReply {
            committed: true,
            current: Vec::new(),
        }),
        Some("0") if reply.len() == commit.ops.len() + 1 => {
            let current = reply[1..]
                .iter()
                .zip(&commit.ops)
                .map(|(v, op)| match v.as_str() {
                    "" => Ok(None),
                    v => v
                        .parse::<u64>()
                        .map(Some)
                        .map_err(|_| malformed(format!("the value at `{}` is not a u64", op.key))),
                })
                .collect::<redis::RedisResult<_>>()?;
            Ok(CommitReply {
                committed: false,
                current,
            })
        }
        _ => Err(malformed(format!(
            "{} values for {} ops",
            reply.len(),
            commit.ops.len()
        ))),
    }
}

/// A client for `settings.url`, authenticating with the password `password_env` names.
pub fn client(settings: &RedisSettings) -> Result<redis::Client, String> {
    let mut info: redis::ConnectionInfo = settings
        .url
        .as_str()
        .parse()
        .map_err(|e: redis::RedisError| format!("store.url: {e}"))?;
    if let Some(password) = &settings.password {
        let redis_info = info.redis_settings().clone().set_password(password.clone());
        info = info.set_redis_settings(redis_info);
    }
    redis::Client::open(info).map_err(|e| format!("store.url: {e}"))
}

/// How long a counter may outlive its last write: a calendar allowance's state means
/// nothing once its period is over (a day, a month), so it expires after the longest period
/// plus a day; other state lives as long as the config names it.
fn ttl_ms(key: &str) -> u64 {
    const DAY_MS: u64 = 86_400_000;
    if key.contains("/daily_tokens/") || key.contains("/daily_cost_usd/") {
        2 * DAY_MS
    } else if key.contains("/monthly_tokens/") || key.contains("/monthly_cost_usd/") {
        32 * DAY_MS
    } else {
        0
    }
}

/// Attempts before an update is reported as contended.
const CAS_TRIES: u32 = 64;

/// Every key of one deployment shares one hash tag: a request's keys sit on one Redis
/// Cluster slot.
const PREFIX: &str = "{tollgate}:";

pub struct RedisStore {
    client: redis::Client,
    settings: RedisSettings,
    script: Script,
    /// Idle connections, reused.
    pool: Mutex<Vec<Connection>>,
    /// The last value seen per key: the first compare-and-set is tried against it, so an
    /// uncontended update is one round trip.
    seen: Mutex<HashMap<String, Option<u64>>>,
    up: AtomicBool,
    /// Updates answered by `on_failure` (`tollgate_store_unavailable_total`).
    unavailable: AtomicU64,
    leases: LeaseBook,
    /// Decisions as transactions (`decide`, `commit`): what this process last saw of each
    /// key, and the async connection their commits go over.
    known: Mutex<HashMap<String, Option<u64>>>,
    committer: Committer,
    /// Updates nothing waits on, sent in batches by `send_queued`.
    queued: Mutex<Vec<(Job, LeaseMarks)>>,
    wake: tokio::sync::Notify,
}

/// An update nothing waits on (a settlement, a successful answer's record): made on a
/// transaction, maybe several times, so a function of what it captured.
pub type Job = Box<dyn FnMut(&Tx<'_>) + Send>;

/// Most queued updates sent in one batch.
const MAX_BATCH: usize = 512;

/// Rounds a batch may lose to other writers before it is dropped.
const BATCH_ROUNDS: usize = 16;

impl RedisStore {
    /// `config`: its limits redo hot counters' writes (`Committer`).
    pub fn new(settings: &RedisSettings, config: &Config) -> Result<Arc<Self>, String> {
        Ok(Arc::new(Self {
            client: client(settings)?,
            settings: settings.clone(),
            script: Script::new(CAS),
            pool: Mutex::new(Vec::new()),
            seen: Mutex::new(HashMap::new()),
            up: AtomicBool::new(true),
            unavailable: AtomicU64::new(0),
            leases: LeaseBook::default(),
            known: Mutex::new(HashMap::new()),
            committer: Committer::new(settings, config)?,
            queued: Mutex::new(Vec::new()),
            wake: tokio::sync::Notify::new(),
        }))
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn on_failure(&self) -> OnFailure {
        self.settings.on_failure
    }

    /// One more update answered by `on_failure`.
    pub fn count_unavailable(&self) {
        self.unavailable.fetch_add(1, Ordering::Relaxed);
    }

    pub fn unavailable(&self) -> u64 {
        self.unavailable.load(Ordering::Relaxed)
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.settings.timeout_ms)
    }

    fn fresh_connection(&self) -> redis::RedisResult<Connection> {
        let c = self.client.get_connection_with_timeout(self.timeout())?;
        c.set_read_timeout(Some(self.timeout()))?;
        c.set_write_timeout(Some(self.timeout()))?;
        Ok(c)
    }

    /// Runs `op` on a pooled connection (else a new one), off the runtime's scheduling (the
    /// thread blocks). A pooled connection that fails as dropped (Redis restarted, say) is
    /// replaced once by a new one; a connection that failed is never pooled again.
    fn with_connection<T>(
        &self,
        op: impl Fn(&mut Connection) -> redis::RedisResult<T>,
    ) -> redis::RedisResult<T> {
        let run = || {
            let pooled = self.pool.lock().ok().and_then(|mut p| p.pop());
            let (mut c, was_pooled) = match pooled {
                Some(c) => (c, true),
                None => (self.fresh_connection()?, false),
            };
            let mut out = op(&mut c);
            if was_pooled
                && out.as_ref().is_err_and(|e| {
                    e.is_connection_dropped() || e.is_connection_refusal() || e.is_io_error()
                })
            {
                c = self.fresh_connection()?;
                out = op(&mut c);
            }
            if out.is_ok() {
                if let Ok(mut pool) = self.pool.lock() {
                    pool.push(c);
                }
            }
            out
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(run)
            }
            _ => run(),
        }
    }

    fn get(&self, key: &str) -> redis::RedisResult<Option<u64>> {
        let v: Option<String> = self.with_connection(|c| redis::cmd("GET").arg(key).query(c))?;
        Ok(v.and_then(|v| v.parse().ok()))
    }

    /// `Ok(None)`: written; `Ok(Some(current))`: another writer got in first.
    fn cas(
        &self,
        key: &str,
        old: Option<u64>,
        new: u64,
    ) -> redis::RedisResult<Option<Option<u64>>> {
        let expected = old.map_or(String::new(), |v| v.to_string());
        let reply: Vec<String> = self.with_connection(|c| {
            self.script
                .key(key)
                .arg(&expected)
                .arg(new.to_string())
                .arg(ttl_ms(key).to_string())
                .invoke(c)
        })?;
        match reply.first().map(String::as_str) {
            Some("1") => Ok(None),
            _ => Ok(Some(reply.get(1).and_then(|v| v.parse().ok()))),
        }
    }

    fn remember(&self, key: &str, value: Option<u64>) {
        if let Ok(mut seen) = self.seen.lock() {
            match seen.get_mut(key) {
                Some(v) => *v = value,
                None => {
                    seen.insert(key.to_string(), value);
                }
            }
        }
    }

    fn went_down(&self, e: &redis::RedisError) -> StoreError {
        if let Ok(mut pool) = self.pool.lock() {
            // Connections to a Redis that failed are not trusted again.
            pool.clear();
        }
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::error!(
                on_failure = self.settings.on_failure.as_str(),
                "redis is unavailable, requests get the on_failure answer until it is back: {e}"
            );
        }
        StoreError::Host(format!("redis: {:?}", e.kind()))
    }

    /// Runs `decide` on what this process last saw of Redis, as a transaction: its outcome
    /// and the keys to commit (`commit`). See `store::Tx`.
    pub fn decide<R>(&self, decide: impl FnOnce(&Tx<'_>) -> R) -> (R, Commit) {
        let known = self.known.lock().map(|k| k.clone()).unwrap_or_default();
        let tx = Tx::new(&known, &self.leases);
        let out = decide(&tx);
        (out, tx.into_commit())
    }

    /// Commits a transaction in one round trip: `Ok(true)` landed, `Ok(false)` lost to
    /// another writer (what it read is learned: decide again), `Err` Redis failed (it is
    /// marked down: `on_failure` answers until the probe finds it back).
    pub async fn commit(&self, commit: &Commit) -> Result<bool, StoreError> {
        match self.committer.commit(commit).await {
            Ok(reply) => {
                if let Ok(mut known) = self.known.lock() {
                    tollgate_core::store::learn(&mut known, commit, &reply);
                }
                Ok(reply.committed)
            }
            Err(Unavailable(why)) => {
                if let Ok(mut pool) = self.pool.lock() {
                    pool.clear();
                }
                if self.up.swap(false, Ordering::Relaxed) {
                    tracing::error!(
                        on_failure = self.settings.on_failure.as_str(),
                        "redis is unavailable, requests get the on_failure answer until it is back: {why}"
                    );
                }
                Err(StoreError::Host(format!("redis: {why}")))
            }
        }
    }

    /// Queues an update nothing waits on; `marks`: the leases it moves, put back before it
    /// runs again. The batch sender (`send_queued`) commits it with the others queued.
    pub fn defer(&self, job: Job, marks: LeaseMarks) {
        if let Ok(mut queued) = self.queued.lock() {
            queued.push((job, marks));
        }
        self.wake.notify_one();
    }

    /// Sends the queued updates, one batch in flight at a time, each batch one transaction:
    /// under load, one round trip settles many requests. A batch that loses to other writers
    /// runs again on the values it learned; one that Redis fails is dropped (what it would
    /// give back stays taken until the limits' windows pass: the cautious side).
    pub fn send_queued(self: Arc<Self>) {
        tokio::spawn(async move {
            loop {
                self.wake.notified().await;
                loop {
                    let mut batch: Vec<(Job, LeaseMarks)> = match self.queued.lock() {
                        Ok(mut q) => {
                            let n = q.len().min(MAX_BATCH);
                            q.drain(..n).collect()
                        }
                        Err(_) => Vec::new(),
                    };
                    if batch.is_empty() {
                        break;
                    }
                    for round in 0..BATCH_ROUNDS {
                        if round > 0 {
                            for (_, marks) in &batch {
                                marks.restore();
                            }
                        }
                        let ((), commit) = self.decide(|tx| {
                            for (job, _) in batch.iter_mut() {
                                job(tx);
                            }
                        });
                        match self.commit(&commit).await {
                            Ok(false) => continue,
                            Ok(true) | Err(_) => break,
                        }
                    }
                }
            }
        });
    }

    /// Takes a reloaded config's limits (the math of redone writes).
    pub fn set_limits(&self, config: &Config) {
        self.committer.set_limits(config);
    }

    /// Checks Redis every `period` while it is marked down, and marks it up when it
    /// answers: the processes go back to it by themselves.
    pub fn probe(self: Arc<Self>, period: Duration) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                if self.is_up() {
                    continue;
                }
                let store = Arc::clone(&self);
                let pong = tokio::task::spawn_blocking(move || {
                    let mut c = store.fresh_connection()?;
                    let pong = redis::cmd("PING").query::<String>(&mut c)?;
                    if let Ok(mut pool) = store.pool.lock() {
                        pool.push(c);
                    }
                    Ok::<_, redis::RedisError>(pong)
                })
                .await;
                if matches!(pong, Ok(Ok(_))) {
                    if let Ok(mut seen) = self.seen.lock() {
                        // Redis may have restarted empty: read afresh.
                        seen.clear();
                    }
                    if let Ok(mut known) = self.known.lock() {
                        known.clear();
                    }
                    self.up.store(true, Ordering::Relaxed);
                    tracing::info!("redis is back: shared state is used again");
                }
            }
        });
    }

    /// `Ok(Ok(out))` written; `Ok(Err(e))` the closure refused; `Err(None)` other writers
    /// kept winning; `Err(Some(e))` Redis failed.
    fn update<T, E>(
        &self,
        key: &str,
        f: &mut impl FnMut(Option<u64>) -> Result<(T, u64), E>,
    ) -> Result<Result<T, E>, Option<redis::RedisError>> {
        let cached = self.seen.lock().ok().and_then(|s| s.get(key).copied());
        let (mut old, mut fresh) = match cached {
            Some(v) => (v, false),
            None => (self.get(key).map_err(Some)?, true),
        };
        for _ in 0..CAS_TRIES {
            match f(old) {
                Err(refused) => {
                    // A refusal is only as good as the value it read.
                    if !fresh {
                        let current = self.get(key).map_err(Some)?;
                        fresh = true;
                        if current != old {
                            old = current;
                            continue;
                        }
                    }
                    self.remember(key, old);
                    return Ok(Err(refused));
                }
                Ok((out, new)) => match self.cas(key, old, new).map_err(Some)? {
                    None => {
                        self.remember(key, Some(new));
                        return Ok(Ok(out));
                    }
                    Some(current) => {
                        old = current;
                        fresh = true;
                    }
                },
            }
        }
        Err(None)
    }
}

impl CounterStore for RedisStore {
    fn measure_and_replace<T, E>(
        &self,
        key: &str,
        mut f: impl FnMut(Option<u64>) -> Result<(T, u64), E>,
    ) -> Result<Result<T, E>, StoreError> {
        if !self.is_up() {
            return self.failed(&mut f, StoreError::Host("redis is down".into()));
        }
        let key = format!("{PREFIX}{key}");
        match self.update(&key, &mut f) {
            Ok(r) => Ok(r),
            // Redis answers: contention is not a failure of it (the core retries).
            Err(None) => Err(StoreError::Contended {
                attempts: CAS_TRIES,
            }),
            Err(Some(e)) => {
                let error = self.went_down(&e);
                self.failed(&mut f, error)
            }
        }
    }

    fn leases(&self) -> &LeaseBook {
        &self.leases
    }
}

impl RedisStore {
    /// What an update gets while Redis is down: `closed` refuses (the core answers 503
    /// `shared_state_unavailable`); `open` decides on an empty state and writes nothing, so
    /// the request is admitted unchecked. `local` is carried out by the gateway, which sends
    /// requests to its in-memory store then (`Gateway::store`); reaching here, it refuses.
    fn failed<T, E>(
        &self,
        f: &mut impl FnMut(Option<u64>) -> Result<(T, u64), E>,
        error: StoreError,
    ) -> Result<Result<T, E>, StoreError> {
        self.count_unavailable();
        match self.settings.on_failure {
            OnFailure::Open => Ok(f(None).map(|(out, _)| out)),
            OnFailure::Closed | OnFailure::Local => Err(error),
        }
    }
}

/// Commits transactions on Redis over one shared async connection (`tollgate store-server`,
/// and the native host's decisions): within `timeout_ms` (one to connect, one to answer),
/// hot counters redone by the config's limits (`commit_redoing`).
pub struct Committer {
    client: redis::Client,
    timeout: Duration,
    /// The connection every request shares (multiplexed), made when first needed and
    /// dropped after any failure.
    connection: std::sync::Mutex<Option<MultiplexedConnection>>,
    /// Held while a connection is made, so that requests arriving meanwhile wait for it
    /// instead of each making one.
    connecting: tokio::sync::Mutex<()>,
    up: AtomicBool,
    /// The config's limits by their store key: the math of a commit's redone writes.
    limits: std::sync::RwLock<HashMap<String, Limit>>,
}

/// Why Redis could not be used (logged; the client gets 503 `shared_state_unavailable`).
pub struct Unavailable(pub String);

impl Committer {
    /// `config`: the gateways' config (its limits' math redoes hot counters' writes).
    pub fn new(settings: &RedisSettings, config: &Config) -> Result<Self, String> {
        Ok(Self {
            limits: std::sync::RwLock::new(limits_by_key(config)),
            client: client(settings)?,
            timeout: Duration::from_millis(settings.timeout_ms),
            connection: std::sync::Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            up: AtomicBool::new(true),
        })
    }

    /// An op's write made again on `current` (see `store::Redo`).
    fn redo(&self, key: &str, how: &Redo, current: Option<u64>) -> Option<u64> {
        match how {
            Redo::Add { n } => Some(current.unwrap_or(0).wrapping_add(*n)),
            other => limits::redo(self.limits.read().ok()?.get(key)?, other, current),
        }
    }

    fn current(&self) -> Option<MultiplexedConnection> {
        self.connection.lock().ok().and_then(|c| c.clone())
    }

    fn set_current(&self, connection: Option<MultiplexedConnection>) {
        if let Ok(mut slot) = self.connection.lock() {
            *slot = connection;
        }
    }

    /// The shared connection, made if there is none; within one `timeout` in all, waiting
    /// on another request's attempt included.
    async fn connection(&self) -> Result<MultiplexedConnection, Unavailable> {
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let connect = async {
            let _connecting = self.connecting.lock().await;
            if let Some(c) = self.current() {
                // Made by the request this one waited for.
                return Ok(c);
            }
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(self.timeout))
                .set_response_timeout(Some(self.timeout));
            let c = self
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map_err(|e| Unavailable(format!("connecting: {e}")))?;
            self.set_current(Some(c.clone()));
            Ok(c)
        };
        tokio::time::timeout(self.timeout, connect)
            .await
            .unwrap_or_else(|_| Err(Unavailable("connecting: timed out".into())))
    }

    /// Runs `op` on the shared connection within `timeout`; a failure drops the connection
    /// (a later request makes a new one) and is logged once until Redis answers again.
    async fn with_redis<T, F>(
        &self,
        op: impl FnOnce(MultiplexedConnection) -> F,
    ) -> Result<T, Unavailable>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let outcome = match self.connection().await {
            Err(e) => Err(e),
            Ok(c) => match tokio::time::timeout(self.timeout, op(c)).await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(Unavailable(e.to_string())),
                Err(_) => Err(Unavailable("no answer within store.timeout_ms".into())),
            },
        };
        match &outcome {
            Ok(_) => {
                if !self.up.swap(true, Ordering::Relaxed) {
                    tracing::info!("redis is back: commits are served again");
                }
            }
            Err(Unavailable(why)) => {
                // Made again by the next request: a connection that failed is not trusted.
                self.set_current(None);
                if self.up.swap(false, Ordering::Relaxed) {
                    tracing::error!(
                        "redis is unavailable, commits are answered 503 until it is back: {why}"
                    );
                } else {
                    tracing::debug!("redis is still unavailable: {why}");
                }
            }
        }
        outcome
    }

    /// Commits `commit` (see `commit_redoing`).
    pub async fn commit(&self, commit: &Commit) -> Result<CommitReply, Unavailable> {
        if commit.ops.is_empty() {
            return Ok(CommitReply {
                committed: true,
                current: Vec::new(),
            });
        }
        self.with_redis(|mut c| async move {
            let redo = |key: &str, how: &Redo, current: Option<u64>| self.redo(key, how, current);
            commit_redoing(&mut c, commit, &redo).await
        })
        .await
    }

    pub async fn ping(&self) -> Result<String, Unavailable> {
        self.with_redis(
            |mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await },
        )
        .await
    }

    /// Takes the limits of a reloaded config.
    pub fn set_limits(&self, config: &Config) {
        if let Ok(mut limits) = self.limits.write() {
            *limits = limits_by_key(config);
        }
    }
}

fn limits_by_key(config: &Config) -> HashMap<String, Limit> {
    config
        .all_limits()
        .map(|l| (l.store_key.to_string(), l.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::ttl_ms;

    #[test]
    fn calendar_allowances_expire_after_their_period() {
        let key = |name: &str| format!("{{tollgate}}:tollgate/limit/c/app/{name}/1000");
        assert_eq!(ttl_ms(&key("daily_tokens")), 2 * 86_400_000);
        assert_eq!(ttl_ms(&key("daily_cost_usd")), 2 * 86_400_000);
        assert_eq!(ttl_ms(&key("monthly_tokens")), 32 * 86_400_000);
        assert_eq!(ttl_ms(&key("monthly_cost_usd")), 32 * 86_400_000);
        assert_eq!(
            ttl_ms(&key("tokens_per_day")),
            0,
            "a rate is not an allowance"
        );
        assert_eq!(ttl_ms("{tollgate}:tollgate/keys/openai/k1/health"), 0);
    }
}
