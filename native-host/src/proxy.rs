//! The native host's request path: carries out the core's decisions for one request with
//! hyper — read the body, call the provider with the chosen key, stream the answer back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate_core::exchange::{Forward, OnBody, OnHeaders};
use tollgate_core::http::{HeaderLookup, LocalResponse, RequestHead};
use tollgate_core::keys::{attempt_key, KeyAttempt};
use tollgate_core::providers::Scheme;
use tollgate_core::{Config, Exchange, GatewayError};

use crate::access_log::{self, Ending};
use crate::body::{GatewayBody, UpstreamBody};
use crate::store::MemoryStore;

pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// What every request shares.
pub struct Gateway {
    pub config: Arc<Config>,
    pub store: MemoryStore,
    pub client: UpstreamClient,
}

impl Gateway {
    pub fn new(config: Arc<Config>) -> Result<Self, rustls::Error> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(https);
        Ok(Self {
            config,
            store: MemoryStore::default(),
            client,
        })
    }
}

/// hyper's header map seen through the core's lookup trait.
struct Headers<'a>(&'a HeaderMap);

impl HeaderLookup for Headers<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Request headers that belong to one hop, never forwarded.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

pub async fn handle(gw: Arc<Gateway>, req: Request<Incoming>) -> Response<GatewayBody> {
    let started = Instant::now();
    let mut exchange = Exchange::new(Arc::clone(&gw.config));
    let (parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let head = RequestHead {
        method: parts.method.as_str(),
        path,
        headers: &Headers(&parts.headers),
    };
    let limit = match exchange.on_request_headers(crate::now_ms(), &head) {
        OnHeaders::Respond(r) => return answered(&mut exchange, r, started),
        OnHeaders::ReadBody { limit } => limit,
    };
    let body = match Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX))
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            let error = if e.is::<http_body_util::LengthLimitError>() {
                GatewayError::BodyTooLarge { limit }
            } else {
                GatewayError::MalformedBody {
                    detail: "the request body could not be read".into(),
                }
            };
            let r = exchange.on_upstream_failure(error);
            return answered(&mut exchange, r, started);
        }
    };
    match exchange.on_request_body(crate::now_ms(), &body) {
        OnBody::Respond(r) => answered(&mut exchange, r, started),
        OnBody::Forward(forward) => {
            forward_upstream(&gw, exchange, &parts.headers, body, forward, started).await
        }
    }
}

fn answered(exchange: &mut Exchange, r: LocalResponse, started: Instant) -> Response<GatewayBody> {
    let summary = exchange.finish(crate::now_ms());
    access_log::record(&summary, None, started, Ending::Answered);
    local(r)
}

fn local(r: LocalResponse) -> Response<GatewayBody> {
    let mut resp = Response::new(GatewayBody::local(r.body));
    *resp.status_mut() =
        hyper::StatusCode::from_u16(r.status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    for (name, value) in r.headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().insert(name, v);
        }
    }
    resp
}

async fn forward_upstream(
    gw: &Gateway,
    mut exchange: Exchange,
    client_headers: &HeaderMap,
    client_body: Bytes,
    forward: Forward,
    started: Instant,
) -> Response<GatewayBody> {
    let config = Arc::clone(exchange.config());
    let fail = |mut exchange: Exchange, error: GatewayError, key: Option<&str>| {
        let r = exchange.on_upstream_failure(error);
        let summary = exchange.finish(crate::now_ms());
        access_log::record(&summary, key, started, Ending::UpstreamError);
        local(r)
    };
    let attempt = match attempt_key(&config, Some(&forward.route_header.1), &gw.store) {
        Ok(a) => a,
        Err(e) => return fail(exchange, e, None),
    };
    let key_id = attempt.key_id().map(str::to_string);
    let request = match upstream_request(&attempt, client_headers, client_body, &forward) {
        Ok(r) => r,
        Err(e) => return fail(exchange, e, key_id.as_deref()),
    };
    let provider = attempt.provider.name.clone();
    let timeout = Duration::from_millis(config.server.upstream_timeout_ms);
    let response = match tokio::time::timeout(timeout, gw.client.request(request)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::warn!(provider = %provider, key = key_id.as_deref().unwrap_or("-"), error = %e, "upstream request failed");
            return fail(
                exchange,
                GatewayError::UpstreamUnavailable { provider },
                key_id.as_deref(),
            );
        }
        Err(_) => {
            return fail(
                exchange,
                GatewayError::UpstreamTimeout { provider },
                key_id.as_deref(),
            )
        }
    };
    let (mut parts, body) = response.into_parts();
    let edits = exchange.on_response_headers(parts.status.as_u16(), &Headers(&parts.headers));
    for name in edits.remove_headers.iter().chain(&HOP_BY_HOP) {
        parts.headers.remove(*name);
    }
    // The body may be rewritten frame by frame, so its length is the transport's business.
    parts.headers.remove(hyper::header::CONTENT_LENGTH);
    let body = UpstreamBody::new(body, exchange, timeout, started, key_id);
    Response::from_parts(parts, GatewayBody::Upstream(Box::new(body)))
}

/// Builds one attempt's request: the client's headers minus the hop's and the consumer's,
/// the provider's host and the injected key.
fn upstream_request(
    attempt: &KeyAttempt<'_>,
    client_headers: &HeaderMap,
    client_body: Bytes,
    forward: &Forward,
) -> Result<Request<Full<Bytes>>, GatewayError> {
    let internal = |detail: String| GatewayError::Internal { detail };
    let base = attempt.provider.base_url.as_ref().ok_or_else(|| {
        internal(format!(
            "provider `{}` has no base URL",
            attempt.provider.name
        ))
    })?;
    let scheme = match base.scheme {
        Scheme::Http => "http",
        Scheme::Https => "https",
    };
    let uri: Uri = format!("{scheme}://{}{}", base.authority(), forward.path)
        .parse()
        .map_err(|e| internal(format!("upstream URI: {e}")))?;
    let body = forward.body.clone().map_or(client_body, Bytes::from);
    let mut headers = client_headers.clone();
    for name in HOP_BY_HOP
        .iter()
        .chain(forward.remove_headers)
        .chain(KeyAttempt::REMOVE_HEADERS.iter())
        .chain(&["content-length"])
    {
        headers.remove(*name);
    }
    let host = HeaderValue::from_str(&base.host_header())
        .map_err(|e| internal(format!("host header: {e}")))?;
    headers.insert(hyper::header::HOST, host);
    if let Some((name, value)) = attempt.header() {
        let mut value = HeaderValue::from_str(value).map_err(|_| {
            internal(format!(
                "the key `{}` is not a valid header value",
                attempt.key_id().unwrap_or("-")
            ))
        })?;
        value.set_sensitive(true);
        headers.insert(HeaderName::from_static(name), value);
    }
    headers.insert(hyper::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    let mut request = Request::post(uri)
        .body(Full::new(body))
        .map_err(|e| internal(format!("upstream request: {e}")))?;
    *request.headers_mut() = headers;
    Ok(request)
}
