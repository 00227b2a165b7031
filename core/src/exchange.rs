//! The per-request state machine of the gateway role. A host feeds it the request's head, then
//! its body, then the provider's response head and body chunks, then tells it the exchange
//! ended; each step returns what the host must do next. It does no IO and reads no clock:
//! `now_ms` is passed in.
//!
//! ```text
//! on_request_headers(now, head)   -> OnHeaders  (Respond | ReadBody)
//! on_request_body(now, body)      -> OnBody     (Respond | Forward)
//! on_response_headers(status, h)  -> OnResponse (Relay | Replace)
//! on_response_chunk(bytes, end)   -> Chunk      (bytes to emit)
//! finish(now)                     -> Summary    (for the access log)
//! ```

use std::sync::Arc;

use crate::auth;
use crate::config::{Config, ConsumerId, ModelId, ProviderId};
use crate::error::GatewayError;
use crate::http::{
    HeaderLookup, LocalResponse, RequestHead, FORWARD_REMOVE_HEADERS, LOCAL_REPLY_HEADER,
    PROVIDER_HEADER,
};
use crate::providers::openai::{wire, CHAT_COMPLETIONS_PATH};
use crate::providers::{mock, ProviderKind};

/// What to do after the request head.
#[must_use]
#[derive(Debug, PartialEq, Eq)]
pub enum OnHeaders {
    /// Send this response and stop; nothing goes upstream.
    Respond(LocalResponse),
    /// Read the whole body, refusing with `BodyTooLarge` past `limit` bytes, and pass it to
    /// `on_request_body`.
    ReadBody { limit: u64 },
}

/// What to do after the request body.
#[must_use]
#[derive(Debug, PartialEq, Eq)]
pub enum OnBody {
    /// Send this response and stop; nothing goes upstream.
    Respond(LocalResponse),
    /// Send the request to a provider, edited as described.
    Forward(Forward),
}

/// How the request leaves the gateway role. The key is added per attempt by the key role
/// (`keys::attempt_key`), not here.
#[derive(Debug, PartialEq, Eq)]
pub struct Forward {
    pub provider: ProviderId,
    /// Path to request upstream (the provider's path prefix + endpoint + client's query).
    pub path: String,
    /// Replacement body; `None` forwards the client's body byte for byte.
    pub body: Option<Vec<u8>>,
    /// Request headers to remove: the consumer's credential, `accept-encoding`.
    pub remove_headers: &'static [&'static str],
    /// Header naming the provider (routes the request in Envoy, tells the key role its pool).
    pub route_header: (&'static str, String),
}

/// What to do with the provider's response.
#[must_use]
#[derive(Debug, PartialEq, Eq)]
pub enum OnResponse {
    /// Pass it on without these headers; its body goes through `on_response_chunk`.
    Relay {
        remove_headers: &'static [&'static str],
    },
    /// Send this instead, and drop the provider's body.
    Replace(LocalResponse),
}

/// Response headers that identify the provider account behind a key, or try to set state on
/// the client: none of them is the client's business.
pub const PROVIDER_ACCOUNT_HEADERS: [&str; 3] =
    ["openai-organization", "openai-project", "set-cookie"];

/// What to emit for one chunk of the provider's response body.
#[must_use]
#[derive(Debug, PartialEq, Eq)]
pub enum Chunk {
    /// Emit the chunk as received.
    Unchanged,
    /// Emit these bytes instead.
    Replace(Vec<u8>),
}

/// What happened, for the access log. Holds names, never keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub consumer: Option<String>,
    pub model: Option<String>,
    pub provider: Option<String>,
    pub status: Option<u16>,
    pub stream: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Head,
    Body,
    Upstream,
    Done,
}

pub struct Exchange {
    config: Arc<Config>,
    stage: Stage,
    consumer: Option<ConsumerId>,
    model: Option<ModelId>,
    status: Option<u16>,
    stream: bool,
    /// The client's query string, kept for the upstream path.
    query: String,
}

impl Exchange {
    pub fn new(config: Arc<Config>) -> Self {
        Self {
            config,
            stage: Stage::Head,
            consumer: None,
            model: None,
            status: None,
            stream: false,
            query: String::new(),
        }
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    pub fn on_request_headers<H: HeaderLookup + ?Sized>(
        &mut self,
        _now_ms: u64,
        head: &RequestHead<'_, H>,
    ) -> OnHeaders {
        let (path, query) = match head.path.split_once('?') {
            Some((p, q)) => (p, q),
            None => (head.path, ""),
        };
        let decision = match (path, head.method) {
            ("/healthz", "GET") => {
                self.status = Some(200);
                Ok(OnHeaders::Respond(LocalResponse::json(
                    200,
                    br#"{"status":"ok"}"#.to_vec(),
                )))
            }
            ("/v1/chat/completions", "POST") => self.authenticate(head.headers).and_then(|()| {
                let limit = self.config.server.max_body_bytes;
                match declared_length(head.headers) {
                    Some(n) if n > limit => Err(GatewayError::BodyTooLarge { limit }),
                    _ => {
                        self.query = query.to_string();
                        self.stage = Stage::Body;
                        Ok(OnHeaders::ReadBody { limit })
                    }
                }
            }),
            ("/v1/models", "GET") => self.authenticate(head.headers).map(|()| {
                let list = self
                    .consumer
                    .and_then(|c| self.config.consumer(c))
                    .map(|c| c.models_list().to_vec())
                    .unwrap_or_default();
                self.status = Some(200);
                OnHeaders::Respond(LocalResponse::json(200, list))
            }),
            (known @ ("/healthz" | "/v1/chat/completions" | "/v1/models"), method) => {
                Err(GatewayError::MethodNotAllowed {
                    method: method.to_string(),
                    path: path.to_string(),
                    allowed: if known == "/v1/chat/completions" {
                        "POST"
                    } else {
                        "GET"
                    },
                })
            }
            _ => Err(GatewayError::NotFound {
                path: path.to_string(),
            }),
        };
        decision.unwrap_or_else(|e| OnHeaders::Respond(self.refuse(e)))
    }

    pub fn on_request_body(&mut self, now_ms: u64, body: &[u8]) -> OnBody {
        if self.stage != Stage::Body {
            // A host bug, not a client's: answer rather than panic.
            return OnBody::Respond(self.refuse(GatewayError::MalformedBody {
                detail: "the request has no body to read".into(),
            }));
        }
        match self.route(now_ms, body) {
            Ok(decision) => decision,
            Err(e) => OnBody::Respond(self.refuse(e)),
        }
    }

    fn route(&mut self, now_ms: u64, body: &[u8]) -> Result<OnBody, GatewayError> {
        let limit = self.config.server.max_body_bytes;
        if body.len() as u64 > limit {
            return Err(GatewayError::BodyTooLarge { limit });
        }
        let req = wire::parse_chat_request(body)
            .map_err(|detail| GatewayError::MalformedBody { detail })?;
        self.stream = req.is_stream();
        let config = Arc::clone(&self.config);
        let model_id = config
            .model_id(&req.model)
            .ok_or_else(|| GatewayError::UnknownModel {
                model: req.model.to_string(),
            })?;
        let allowed = self
            .consumer
            .and_then(|c| config.consumer(c))
            .is_some_and(|c| c.may_use(model_id));
        if !allowed {
            return Err(GatewayError::ModelNotAllowed {
                model: req.model.to_string(),
            });
        }
        self.model = Some(model_id);
        let (Some(model), Some(provider)) = (
            config.model(model_id),
            config
                .model(model_id)
                .and_then(|m| config.provider(m.provider)),
        ) else {
            return Err(GatewayError::UnknownModel {
                model: req.model.to_string(),
            });
        };
        if provider.kind == ProviderKind::Mock {
            self.stage = Stage::Done;
            self.status = Some(200);
            return Ok(OnBody::Respond(mock::respond(&req, &model.name, now_ms)));
        }
        let body = if model.upstream_model != req.model {
            Some(
                wire::with_model(body, &model.upstream_model)
                    .map_err(|detail| GatewayError::MalformedBody { detail })?,
            )
        } else {
            None
        };
        let prefix = provider
            .base_url
            .as_ref()
            .map_or("", |u| u.path_prefix.as_str());
        let mut path = format!("{prefix}{CHAT_COMPLETIONS_PATH}");
        if !self.query.is_empty() {
            path.push('?');
            path.push_str(&self.query);
        }
        self.stage = Stage::Upstream;
        Ok(OnBody::Forward(Forward {
            provider: model.provider,
            path,
            body,
            remove_headers: &FORWARD_REMOVE_HEADERS,
            route_header: (PROVIDER_HEADER, provider.name.clone()),
        }))
    }

    pub fn on_response_headers<H: HeaderLookup + ?Sized>(
        &mut self,
        status: u16,
        headers: &H,
    ) -> OnResponse {
        self.status = Some(status);
        if headers.header(LOCAL_REPLY_HEADER).is_some() {
            // The key role's own refusal: already the error the client should see.
            return OnResponse::Relay {
                remove_headers: &[LOCAL_REPLY_HEADER],
            };
        }
        if matches!(status, 401 | 403) {
            // The gateway's key was refused: the client's own key is fine, and the
            // provider's message may quote the key, so answer with our own error.
            let provider = self.provider_name().unwrap_or_default();
            return OnResponse::Replace(self.refuse(GatewayError::UpstreamAuthFailed { provider }));
        }
        OnResponse::Relay {
            remove_headers: &PROVIDER_ACCOUNT_HEADERS,
        }
    }

    fn provider_name(&self) -> Option<String> {
        let model = self.config.model(self.model?)?;
        Some(self.config.provider(model.provider)?.name.clone())
    }

    /// One chunk of the provider's response body, in order; `end_of_stream` on the last.
    pub fn on_response_chunk(&mut self, _chunk: &[u8], end_of_stream: bool) -> Chunk {
        if end_of_stream {
            self.stage = Stage::Done;
        }
        Chunk::Unchanged
    }

    /// The exchange ended, however it ended (completed, refused, client gone, upstream reset).
    pub fn finish(&mut self, _now_ms: u64) -> Summary {
        self.stage = Stage::Done;
        let config = &self.config;
        Summary {
            consumer: self
                .consumer
                .and_then(|c| config.consumer(c))
                .map(|c| c.name.clone()),
            model: self
                .model
                .and_then(|m| config.model(m))
                .map(|m| m.name.clone()),
            provider: self.provider_name(),
            status: self.status,
            stream: self.stream,
        }
    }

    fn authenticate<H: HeaderLookup + ?Sized>(&mut self, headers: &H) -> Result<(), GatewayError> {
        let key = auth::presented_key(headers).ok_or(GatewayError::MissingConsumerKey)?;
        let id = self
            .config
            .authenticate(key)
            .ok_or(GatewayError::UnknownConsumerKey)?;
        self.consumer = Some(id);
        Ok(())
    }

    /// Ends the exchange with an error of the gateway's own — the core's refusals, and the
    /// hosts' (body too large or too slow, provider unreachable or silent): the response to send.
    pub fn refuse(&mut self, e: GatewayError) -> LocalResponse {
        self.stage = Stage::Done;
        self.status = Some(e.status());
        e.respond()
    }
}

fn declared_length<H: HeaderLookup + ?Sized>(headers: &H) -> Option<u64> {
    headers.header("content-length")?.trim().parse().ok()
}

#[cfg(test)]
mod tests;
