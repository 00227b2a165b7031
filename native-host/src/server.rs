//! The listener: accepts connections, serves HTTP/1.1 and HTTP/2 with hyper, and on SIGTERM
//! or SIGINT stops accepting and lets requests in flight finish (up to a grace period).
//!
//! Connections are bounded (see docs/hardening.md):
//! - at most `server.max_connections` are open; one accepted beyond that is closed at once;
//! - one with no request in flight for `server.idle_timeout_ms` — none yet (a client that
//!   connected, or sent half a request head, or only the HTTP/2 preface, and went quiet), or
//!   none since its last response ended — is shut down gracefully, and closed outright if it
//!   still has not gone after a short drain (an HTTP/2 client that never answers GOAWAY's
//!   ping). A request in flight, response streaming included, is never cut by it;
//! - an HTTP/1 request head must arrive within `server.header_read_timeout_ms` once begun;
//! - HTTP/2 carries at most `server.http2_max_concurrent_streams` requests at once, and a
//!   peer that stops answering keep-alive pings is closed.
//!
//! Connections are served on workers, one thread per core, each with a runtime of its own
//! (`Workers`), as Envoy's workers serve theirs: a connection, its requests and their
//! connections to the providers (`upstream`, idle ones kept per worker) stay on one
//! thread, so that handing a provider's chunk to the client's request wakes no other thread.
//! (On one multi-threaded runtime those hand-offs cost a chat request 0.051 ms of CPU against
//! 0.037 ms on one thread; docs/benchmarks.md.)

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tollgate_core::config::ServerSettings;
use tollgate_core::limits;

use crate::body::{BoxError, GatewayBody};
use crate::proxy::{handle, Gateway};

/// How long requests in flight may take to finish after a shutdown signal.
const GRACE: Duration = Duration::from_secs(30);

/// Longest a connection told to shut down (idle, or the process stopping) may stay open with
/// no request in flight before it is closed outright. A well-behaved client is gone well
/// before: this is for those that never answer HTTP/2's GOAWAY ping, or read nothing.
const MAX_DRAIN: Duration = Duration::from_secs(5);

/// How often a refused connection is logged at most, with how many were refused since.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The connection settings of `server`, read when a connection is accepted: a reload applies
/// to connections accepted after it.
#[derive(Clone, Copy, Debug)]
struct ConnectionSettings {
    idle: Duration,
    header_read: Duration,
    h2_streams: u32,
    h2_ping_interval: Option<Duration>,
    h2_ping_timeout: Duration,
}

impl ConnectionSettings {
    fn of(s: &ServerSettings) -> Self {
        let ms = Duration::from_millis;
        Self {
            idle: ms(s.idle_timeout_ms),
            header_read: ms(s.header_read_timeout_ms),
            h2_streams: u32::try_from(s.http2_max_concurrent_streams).unwrap_or(u32::MAX),
            h2_ping_interval: (s.http2_keepalive_interval_ms > 0)
                .then(|| ms(s.http2_keepalive_interval_ms)),
            h2_ping_timeout: ms(s.http2_keepalive_timeout_ms),
        }
    }

    fn builder(&self) -> auto::Builder<TokioExecutor> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .keep_alive(true)
            // Counted from the head's first byte: a client that never finishes its request
            // head must not hold a task forever. Before that first byte, `idle` applies.
            .header_read_timeout(self.header_read);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.h2_streams)
            .keep_alive_interval(self.h2_ping_interval)
            .keep_alive_timeout(self.h2_ping_timeout);
        builder
    }
}

pub async fn serve(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) {
    let max_connections = gateway.config().server.max_connections;
    let max_connections = u32::try_from(max_connections)
        .unwrap_or(u32::MAX)
        .min(Semaphore::MAX_PERMITS as u32);
    // One permit per open connection, held by its task.
    let slots = Arc::new(Semaphore::new(max_connections as usize));
    let (stop, stopping) = watch::channel(false);
    let mut refused = Refusals::default();
    let renewing = tokio::spawn(renew_leases(Arc::clone(&gateway)));
    let mut workers = Workers::start();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _peer) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    // Over the cap: closed at once, before anything is read. The connections
                    // open keep being served.
                    drop(stream);
                    refused.count(max_connections);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let settings = ConnectionSettings::of(&gateway.config().server);
                let gw = Arc::clone(&gateway);
                let stopping = stopping.clone();
                let serve = move |stream| -> Pin<Box<dyn Future<Output = ()> + Send>> {
                    Box::pin(async move {
                        serve_connection(gw, stream, settings, stopping).await;
                        drop(slot);
                    })
                };
                match stream.into_std() {
                    Ok(stream) => workers.hand(stream, Box::new(serve)),
                    Err(e) => tracing::warn!(error = %e, "could not hand a connection to a worker"),
                }
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: finishing requests in flight");
    let _ = stop.send(true);
    // Every connection task holds a slot until it ends: all slots back means all closed.
    tokio::select! {
        _ = slots.acquire_many(max_connections) => tracing::info!("all connections closed"),
        () = tokio::time::sleep(GRACE) => tracing::warn!("grace period over; closing remaining connections"),
    }
    renewing.abort();
}

/// What serves a connection once it is on its worker's runtime.
type Serve =
    Box<dyn FnOnce(tokio::net::TcpStream) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// The threads that serve connections: one per core, each running a single-threaded runtime.
/// Connections are handed round: a busy one stays where it is for its whole life.
struct Workers {
    senders: Vec<tokio::sync::mpsc::UnboundedSender<(std::net::TcpStream, Serve)>>,
    next: usize,
}

impl Workers {
    fn start() -> Self {
        let n = std::thread::available_parallelism().map_or(1, usize::from);
        let senders = (0..n)
            .filter_map(|i| {
                let (tx, mut rx) =
                    tokio::sync::mpsc::unbounded_channel::<(std::net::TcpStream, Serve)>();
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| tracing::error!(error = %e, "starting a worker's runtime"))
                    .ok()?;
                std::thread::Builder::new()
                    .name(format!("tollgate-worker-{i}"))
                    .spawn(move || {
                        runtime.block_on(async move {
                            tokio::spawn(crate::upstream::sweep_idle());
                            while let Some((stream, serve)) = rx.recv().await {
                                match tokio::net::TcpStream::from_std(stream) {
                                    Ok(stream) => {
                                        tokio::spawn(serve(stream));
                                    }
                                    Err(e) => tracing::warn!(error = %e, "taking a connection"),
                                }
                            }
                        });
                    })
                    .map_err(|e| tracing::error!(error = %e, "starting a worker"))
                    .ok()?;
                Some(tx)
            })
            .collect();
        Self { senders, next: 0 }
    }

    /// Hands a connection to the next worker; served here if there is none (a worker that
    /// could not start).
    fn hand(&mut self, stream: std::net::TcpStream, serve: Serve) {
        let job = (stream, serve);
        let job = match self.senders.get(self.next % self.senders.len().max(1)) {
            Some(worker) => match worker.send(job) {
                Ok(()) => {
                    self.next = self.next.wrapping_add(1);
                    return;
                }
                Err(tokio::sync::mpsc::error::SendError(job)) => job,
            },
            None => job,
        };
        let (stream, serve) = job;
        match tokio::net::TcpStream::from_std(stream) {
            Ok(stream) => {
                tokio::spawn(serve(stream));
            }
            Err(e) => tracing::warn!(error = %e, "taking a connection"),
        }
    }
}

/// Renews the concurrency slots of the requests in flight every half lease (see
/// `limits::concurrency`), so that a long stream keeps its slot.
async fn renew_leases(gateway: Arc<Gateway>) {
    loop {
        let lease_ms = gateway.config().server.concurrency_lease_ms;
        tokio::time::sleep(Duration::from_millis(lease_ms / 2)).await;
        limits::renew_leases(&gateway.store, crate::now_ms());
    }
}

/// Connections refused over the cap, logged now and then rather than once each.
#[derive(Default)]
struct Refusals {
    since_logged: u64,
    logged_at: Option<Instant>,
}

impl Refusals {
    fn count(&mut self, cap: u32) {
        self.since_logged += 1;
        let now = Instant::now();
        if self
            .logged_at
            .is_none_or(|at| now.duration_since(at) >= REFUSAL_LOG_INTERVAL)
        {
            tracing::warn!(
                refused = self.since_logged,
                max_connections = cap,
                "connection limit reached: closing new connections (server.max_connections)"
            );
            self.logged_at = Some(now);
            self.since_logged = 0;
        }
    }
}

/// Serves one connection until it ends, is idle too long, or the process stops.
async fn serve_connection(
    gateway: Arc<Gateway>,
    stream: tokio::net::TcpStream,
    settings: ConnectionSettings,
    mut stopping: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity::new());
    let tracked = Arc::clone(&activity);
    let service = service_fn(move |req| {
        // Counted here, as hyper takes the request in (inside the connection's own poll),
        // so the idle check below never sees a connection idle that has just taken one.
        let in_flight = tracked.begin();
        let gw = Arc::clone(&gateway);
        async move {
            let response = handle(gw, req).await;
            Ok::<_, Infallible>(response.map(|body| Tracked {
                inner: body,
                _in_flight: in_flight,
            }))
        }
    });
    let builder = settings.builder();
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let drain = settings.idle.min(MAX_DRAIN);
    let mut closing = false;
    let timer = tokio::time::sleep(settings.idle);
    tokio::pin!(timer);
    loop {
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            () = timer.as_mut() => {
                let wait = if closing { drain } else { settings.idle };
                match activity.idle_until(wait) {
                    // A request in flight: look again once it may have ended.
                    None => timer.as_mut().reset(Instant::now() + wait),
                    Some(deadline) if deadline > Instant::now() => timer.as_mut().reset(deadline),
                    Some(_) if closing => {
                        tracing::debug!("connection did not close after shutdown; closing it");
                        return;
                    }
                    Some(_) => {
                        tracing::debug!("closing an idle connection");
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                        activity.mark_idle_now();
                        timer.as_mut().reset(Instant::now() + drain);
                    }
                }
            }
            _ = stopping.changed(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
                activity.mark_idle_now();
                timer.as_mut().reset(Instant::now() + drain);
            }
        }
    }
}

/// Requests in flight on one connection, and since when it has had none.
struct Activity {
    epoch: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `epoch` when the last request ended (0: none yet).
    idle_since_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
        }
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(Arc::clone(self))
    }

    fn mark_idle_now(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.idle_since_ms.fetch_max(ms, Ordering::SeqCst);
    }

    /// When the connection will have had no request in flight for `wait`; `None` while one
    /// is in flight.
    fn idle_until(&self, wait: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::SeqCst));
        Some(self.epoch + since + wait)
    }
}

/// One request in flight, from when hyper took it in until its response body is done or
/// dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.mark_idle_now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its request counted as in flight until hyper is done with it.
struct Tracked {
    inner: GatewayBody,
    _in_flight: InFlight,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_deadline_waits_for_requests_in_flight() {
        let activity = Arc::new(Activity::new());
        let wait = Duration::from_millis(500);
        let first = activity.idle_until(wait).expect("idle from the start");
        assert_eq!(first, activity.epoch + wait);
        let a = activity.begin();
        let b = activity.begin();
        assert!(activity.idle_until(wait).is_none());
        drop(a);
        assert!(activity.idle_until(wait).is_none(), "one still in flight");
        std::thread::sleep(Duration::from_millis(5));
        drop(b);
        let later = activity.idle_until(wait).expect("idle again");
        assert!(later > first, "counted from the last request's end");
    }
}
