//! The native host's request path: carries out the core's decisions for one request with
//! hyper — read the body, call the provider with the chosen key, stream the answer back.

use std::sync::{Arc, RwLock};
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
use tollgate_core::exchange::{Forward, OnBody, OnHeaders, OnResponse};
use tollgate_core::http::{is_gateway_header, HeaderLookup, LocalResponse, RequestHead};
use tollgate_core::keys::{self, attempt_key, KeyAttempt};
use tollgate_core::providers::Scheme;
use tollgate_core::{Config, Exchange, GatewayError};

use crate::access_log::{self, Ending};
use crate::body::{GatewayBody, UpstreamBody};
use crate::store::MemoryStore;

pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// What every request shares.
pub struct Gateway {
    /// Swapped whole on reload; requests keep the snapshot they started with.
    config: RwLock<Arc<Config>>,
    /// Counters outlive reloads: a limit that did not change keeps its key, so its state.
    pub store: MemoryStore,
    pub client: UpstreamClient,
}

impl Gateway {
    pub fn config(&self) -> Arc<Config> {
        match self.config.read() {
            Ok(c) => Arc::clone(&c),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    pub fn replace_config(&self, config: Config) {
        let config = Arc::new(config);
        match self.config.write() {
            Ok(mut c) => *c = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
    }

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
            config: RwLock::new(config),
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

/// Headers that belong to one hop (RFC 9110 §7.6.1), never relayed in either direction.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes the hop-by-hop headers, including those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    for name in HOP_BY_HOP
        .iter()
        .copied()
        .chain(named.iter().map(String::as_str))
    {
        headers.remove(name);
    }
}

/// How long a client may take to send its request body.
const CLIENT_BODY_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn handle(gw: Arc<Gateway>, req: Request<Incoming>) -> Response<GatewayBody> {
    let started = Instant::now();
    let mut exchange = Exchange::new(gw.config());
    let (parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let head = RequestHead {
        method: parts.method.as_str(),
        path,
        headers: &Headers(&parts.headers),
    };
    let limit = match exchange.on_request_headers(crate::now_ms(), &head) {
        OnHeaders::Respond(r) => {
            return conclude(&gw, exchange, r, None, started, Ending::Answered)
        }
        OnHeaders::ReadBody { limit } => limit,
    };
    let read = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX)).collect();
    let body = match tokio::time::timeout(CLIENT_BODY_TIMEOUT, read).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) => {
            let error = if e.is::<http_body_util::LengthLimitError>() {
                GatewayError::BodyTooLarge { limit }
            } else {
                GatewayError::MalformedBody {
                    detail: "the request body could not be read".into(),
                }
            };
            let r = exchange.refuse(error);
            return conclude(&gw, exchange, r, None, started, Ending::Answered);
        }
        Err(_) => {
            let r = exchange.refuse(GatewayError::RequestTimeout);
            return conclude(&gw, exchange, r, None, started, Ending::Answered);
        }
    };
    match exchange.on_request_body(crate::now_ms(), &body, &gw.store) {
        OnBody::Respond(r) => conclude(&gw, exchange, r, None, started, Ending::Answered),
        OnBody::Forward(forward) => {
            forward_upstream(&gw, exchange, &parts.headers, body, forward, started).await
        }
    }
}

/// Ends an exchange with a response of the gateway's own: settles its limits, logs it.
fn conclude(
    gw: &Gateway,
    mut exchange: Exchange,
    r: LocalResponse,
    key: Option<&str>,
    started: Instant,
    ending: Ending,
) -> Response<GatewayBody> {
    let summary = exchange.finish(crate::now_ms(), &gw.store);
    access_log::record(&summary, key, started, ending);
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
    gw: &Arc<Gateway>,
    mut exchange: Exchange,
    client_headers: &HeaderMap,
    client_body: Bytes,
    forward: Forward,
    started: Instant,
) -> Response<GatewayBody> {
    let config = Arc::clone(exchange.config());
    let fail = |mut exchange: Exchange, error: GatewayError, key: Option<&str>| {
        let r = exchange.refuse(error);
        conclude(gw, exchange, r, key, started, Ending::UpstreamError)
    };
    let now = crate::now_ms();
    let mut attempt = match attempt_key(
        &config,
        Some(&forward.route_header.1),
        &gw.store,
        now,
        forward.demand,
    ) {
        Ok(a) => a,
        Err(e) => return fail(exchange, e, None),
    };
    // Settled with the exchange, whatever becomes of the attempt.
    exchange.attach_key_reservation(std::mem::take(&mut attempt.reservation));
    let key_id = attempt.key_id().map(str::to_string);
    let request = match upstream_request(&attempt, client_headers, client_body, forward) {
        Ok(r) => r,
        Err(e) => return fail(exchange, e, key_id.as_deref()),
    };
    let provider = attempt.provider.name.clone();
    let timeout = Duration::from_millis(config.server.upstream_timeout_ms);
    // If the client goes away while the provider thinks, this future is dropped here: the
    // guard settles the exchange (frees its slot, refunds its tokens) all the same.
    let mut guard = InFlight {
        exchange: Some(exchange),
        gateway: Arc::clone(gw),
        started,
    };
    let sent = tokio::time::timeout(timeout, gw.client.request(request)).await;
    let Some(exchange) = guard.exchange.take() else {
        return local(
            GatewayError::Internal {
                detail: "the exchange was lost".into(),
            }
            .respond(),
        );
    };
    let mut exchange = exchange;
    let response = match sent {
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
    // The gateway's internal headers are never the provider's to set.
    let forged: Vec<HeaderName> = parts
        .headers
        .keys()
        .filter(|name| is_gateway_header(name.as_str()))
        .cloned()
        .collect();
    for name in forged {
        parts.headers.remove(name);
    }
    if let Some(key) = key_id.as_deref() {
        // The key's health: cooling after a 429, revoked after a 401/403.
        let observed = keys::observe(
            &config,
            &provider,
            key,
            parts.status.as_u16(),
            &Headers(&parts.headers),
            crate::now_ms(),
            &gw.store,
        );
        if let Err(e) = observed {
            tracing::warn!(provider = %provider, key, error = %e, "key health not recorded");
        }
    }
    match exchange.on_response_headers(parts.status.as_u16(), &Headers(&parts.headers)) {
        OnResponse::Relay {
            remove_headers,
            add_headers,
            body_rewritten,
        } => {
            strip_hop_by_hop(&mut parts.headers);
            for name in remove_headers {
                parts.headers.remove(*name);
            }
            if body_rewritten {
                parts.headers.remove(hyper::header::CONTENT_LENGTH);
            }
            for (name, value) in add_headers {
                if let Ok(v) = HeaderValue::from_str(&value) {
                    parts.headers.insert(name, v);
                }
            }
        }
        OnResponse::Replace(r) => {
            drop(body);
            return conclude(
                gw,
                exchange,
                r,
                key_id.as_deref(),
                started,
                Ending::Answered,
            );
        }
    }
    let body = UpstreamBody::new(body, exchange, Arc::clone(gw), timeout, started, key_id);
    Response::from_parts(parts, GatewayBody::Upstream(Box::new(body)))
}

/// Holds an exchange across the wait for the provider, and settles it if that wait is
/// abandoned (the request future dropped because the client left).
struct InFlight {
    exchange: Option<Exchange>,
    gateway: Arc<Gateway>,
    started: Instant,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(mut exchange) = self.exchange.take() {
            let summary = exchange.finish(crate::now_ms(), &self.gateway.store);
            access_log::record(&summary, None, self.started, Ending::ClientGone);
        }
    }
}

/// Builds one attempt's request: the client's headers minus the hop's and the consumer's,
/// the provider's host and the injected key.
fn upstream_request(
    attempt: &KeyAttempt<'_>,
    client_headers: &HeaderMap,
    client_body: Bytes,
    forward: Forward,
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
    let body = forward.body.map_or(client_body, Bytes::from);
    let mut headers = client_headers.clone();
    strip_hop_by_hop(&mut headers);
    let gateway_owned: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_gateway_header(name.as_str()))
        .cloned()
        .collect();
    for name in gateway_owned {
        headers.remove(name);
    }
    // `expect` was answered by this hop already; host and length are set below.
    for name in forward
        .remove_headers
        .iter()
        .chain(KeyAttempt::REMOVE_HEADERS.iter())
        .chain(&["expect", "host", "content-length"])
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
