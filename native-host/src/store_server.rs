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

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::json;
use tollgate_core::config::store::RedisSettings;
use tollgate_core::store::{Commit, COMMIT_PATH};
use tollgate_core::Config;

use crate::redis_store::Committer;

/// The largest commit body accepted (a request's transaction is a handful of keys).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

pub const HEALTH_PATH: &str = "/healthz";

/// How long a client may take to send a request head, and then its body.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long connections may take to finish after a shutdown signal.
const GRACE: Duration = Duration::from_secs(10);

pub struct StoreServer {
    redis: Committer,
}

impl StoreServer {
    /// `config`: the gateways' config (its limits' math redoes hot counters' writes).
    pub fn new(settings: &RedisSettings, config: &Config) -> Result<Self, String> {
        Ok(Self {
            redis: Committer::new(settings, config)?,
        })
    }

    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        match (req.method().as_str(), path.as_str()) {
            ("POST", COMMIT_PATH) => self.commit(req).await,
            (_, COMMIT_PATH) => method_not_allowed(&path, "POST"),
            ("GET", HEALTH_PATH) => {
                let pong = self.redis.ping().await;
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
        let reply = self.redis.commit(&commit).await;
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
