//! `tollgate store-server`: commits shared-state transactions on Redis for hosts that cannot
//! speak Redis themselves (Envoy: its filter sends each commit over HTTP to this server's
//! cluster, `tollgate_store`). Stateless: every `POST /v1/store/commit` is one run of the
//! `COMMIT` script (`redis_store::commit`), all or nothing; any number of these servers may
//! stand in front of one Redis.
//!
//! - `POST /v1/store/commit`, a JSON `Commit` → 200 JSON `CommitReply`;
//! - `GET /healthz` → 200 `{"status":"ok"}` when Redis answers `PING`, else 503.
//!
//! Redis failing or slower than `store.timeout_ms` is answered 503 `shared_state_unavailable`
//! within that time (one `timeout_ms` to connect when there is no connection, one to
//! answer); the connection is then dropped and made again by a later request, so the
//! server goes back to Redis by itself when it returns.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use redis::aio::MultiplexedConnection;
use serde_json::json;
use tollgate_core::config::store::RedisSettings;
use tollgate_core::limits::{self, Limit};
use tollgate_core::store::{Commit, Redo, COMMIT_PATH};
use tollgate_core::Config;

use crate::redis_store;

/// The largest commit body accepted (a request's transaction is a handful of keys).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

pub const HEALTH_PATH: &str = "/healthz";

/// How long a client may take to send a request head, and then its body.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long connections may take to finish after a shutdown signal.
const GRACE: Duration = Duration::from_secs(10);

pub struct StoreServer {
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
    limits: HashMap<String, Limit>,
}

/// Why Redis could not be used (logged; the client gets 503 `shared_state_unavailable`).
struct Unavailable(String);

impl StoreServer {
    /// `config`: the gateways' config (its limits' math redoes hot counters' writes).
    pub fn new(settings: &RedisSettings, config: &Config) -> Result<Self, String> {
        let limits = config
            .all_limits()
            .map(|l| (l.store_key.to_string(), l.clone()))
            .collect();
        Ok(Self {
            limits,
            client: redis_store::client(settings)?,
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
            other => limits::redo(self.limits.get(key)?, other, current),
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

    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        match (req.method().as_str(), path.as_str()) {
            ("POST", COMMIT_PATH) => self.commit(req).await,
            (_, COMMIT_PATH) => method_not_allowed(&path, "POST"),
            ("GET", HEALTH_PATH) => {
                let pong = self
                    .with_redis(|mut c| async move {
                        redis::cmd("PING").query_async::<String>(&mut c).await
                    })
                    .await;
                match pong {
                    Ok(_) => json_response(StatusCode::OK, &json!({ "status": "ok" })),
                    Err(_) => unavailable(),
                }
            }
            (_, HEALTH_PATH) => method_not_allowed(&path, "GET"),
            _ => error(
                StatusCode::NOT_FOUND,
                "not_found_error",
                "not_found",
                &format!("Unknown path `{path}`: commits go to POST {COMMIT_PATH}."),
            ),
        }
    }

    async fn commit(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let read = tokio::time::timeout(
            READ_TIMEOUT,
            Limited::new(req.into_body(), MAX_BODY_BYTES).collect(),
        )
        .await;
        let body = match read {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request_error",
                    "request_too_large",
                    &format!("A commit is at most {MAX_BODY_BYTES} bytes."),
                )
            }
            Ok(Err(e)) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "invalid_body",
                    &format!("The request body could not be read: {e}"),
                )
            }
            Err(_) => {
                return error(
                    StatusCode::REQUEST_TIMEOUT,
                    "invalid_request_error",
                    "request_timeout",
                    "The request body did not arrive in time.",
                )
            }
        };
        let commit: Commit = match serde_json::from_slice(&body) {
            Ok(c) => c,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "invalid_json",
                    &format!("The body is not a commit ({{\"ops\":[{{\"key\":..,\"expect\":..,\"write\":..}}]}}): {e}"),
                )
            }
        };
        if commit.ops.is_empty() {
            // Nothing to check or write: Redis is not asked.
            return json_response(StatusCode::OK, &json!({ "committed": true }));
        }
        let reply = self
            .with_redis(|mut c| async move {
                let redo =
                    |key: &str, how: &Redo, current: Option<u64>| self.redo(key, how, current);
                redis_store::commit_redoing(&mut c, &commit, &redo).await
            })
            .await;
        match reply {
            Ok(reply) => match serde_json::to_value(&reply) {
                Ok(v) => json_response(StatusCode::OK, &v),
                Err(_) => unavailable(),
            },
            Err(_) => unavailable(),
        }
    }
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// An OpenAI-shaped error, as the gateway answers.
fn error(status: StatusCode, kind: &str, code: &str, message: &str) -> Response<Full<Bytes>> {
    json_response(
        status,
        &json!({ "error": { "message": message, "type": kind, "param": null, "code": code } }),
    )
}

fn unavailable() -> Response<Full<Bytes>> {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "shared_state_unavailable",
        "The shared state store (Redis) is unavailable.",
    )
}

fn method_not_allowed(path: &str, allowed: &'static str) -> Response<Full<Bytes>> {
    let mut response = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        &format!("Use {allowed} for {path}."),
    );
    response
        .headers_mut()
        .insert(hyper::header::ALLOW, HeaderValue::from_static(allowed));
    response
}

/// Serves `listener` until `shutdown` resolves, then lets open connections finish their
/// requests (up to a grace period).
pub async fn serve(
    server: Arc<StoreServer>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let server = Arc::clone(&server);
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let server = Arc::clone(&server);
                    async move { Ok::<_, Infallible>(server.answer(req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .keep_alive(true)
                    .header_read_timeout(READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: finishing commits in flight");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(GRACE) => tracing::warn!("grace period over; closing remaining connections"),
    }
}

/// Where the server listens: the command line's address, else `store.server`.
pub fn listen_address(
    listen: Option<SocketAddr>,
    settings: &RedisSettings,
) -> Result<SocketAddr, String> {
    match (listen, &settings.server) {
        (Some(addr), _) => Ok(addr),
        (None, Some(server)) => server.parse().map_err(|e| format!("store.server: {e}")),
        (None, None) => {
            Err("no address to listen on: set `store.server` (host:port) or pass --listen".into())
        }
    }
}
