//! The gateway role: runs the core's `Exchange` for one downstream request in Envoy's
//! listener filter chain. Envoy routes on the `x-tollgate-provider` header it sets.

use std::sync::Arc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, LogLevel, MapType};
use tollgate_core::exchange::{Chunk, OnBody, OnHeaders};
use tollgate_core::http::{LocalResponse, RequestHead, PROVIDER_HEADER};
use tollgate_core::{Config, Exchange, GatewayError};

use crate::host;

pub struct GatewayFlow {
    exchange: Exchange,
    /// Set while the request body is being read, to the largest size accepted.
    body_limit: Option<u64>,
    /// Whether the response body goes through the core (only for forwarded requests: local
    /// replies are already final).
    forwarded: bool,
}

impl GatewayFlow {
    pub fn new(config: Arc<Config>) -> Self {
        Self {
            exchange: Exchange::new(config),
            body_limit: None,
            forwarded: false,
        }
    }

    /// Ends the request with a reply of the gateway's own.
    fn respond(&mut self, response: &LocalResponse) -> Action {
        self.body_limit = None;
        host::send(response);
        Action::Pause
    }

    fn fail(&mut self, error: GatewayError) -> Action {
        host::log(LogLevel::Error, &format!("tollgate gateway: {error}"));
        let response = self.exchange.on_upstream_failure(error);
        self.respond(&response)
    }

    fn on_headers(&mut self, end_of_stream: bool) -> Result<Action, GatewayError> {
        // A client must never pick a route itself: the header is ours alone.
        host::remove_header(MapType::HttpRequestHeaders, PROVIDER_HEADER)?;
        let headers = host::headers(MapType::HttpRequestHeaders)?;
        let method = header_value(&headers, ":method");
        let path = header_value(&headers, ":path");
        let head = RequestHead {
            method,
            path,
            headers: &headers,
        };
        match self.exchange.on_request_headers(host::now_ms(), &head) {
            OnHeaders::Respond(r) => Ok(self.respond(&r)),
            OnHeaders::ReadBody { limit } => {
                self.body_limit = Some(limit);
                if end_of_stream {
                    self.on_body(0)
                } else {
                    // Hold the headers until the body is complete: the route depends on it.
                    Ok(Action::Pause)
                }
            }
        }
    }

    fn on_body(&mut self, size: usize) -> Result<Action, GatewayError> {
        let body = host::body(BufferType::HttpRequestBody, size)?;
        match self.exchange.on_request_body(host::now_ms(), &body) {
            OnBody::Respond(r) => Ok(self.respond(&r)),
            OnBody::Forward(forward) => {
                self.body_limit = None;
                let map = MapType::HttpRequestHeaders;
                for name in forward.remove_headers {
                    host::remove_header(map, name)?;
                }
                host::set_header(map, ":path", &forward.path)?;
                if let Some(new_body) = &forward.body {
                    host::replace_body(BufferType::HttpRequestBody, size, new_body)?;
                    host::set_header(map, "content-length", &new_body.len().to_string())?;
                }
                // Set last: changing a request header clears Envoy's route cache, so the
                // router picks the provider's cluster from this header.
                host::set_header(map, forward.route_header.0, &forward.route_header.1)?;
                self.forwarded = true;
                Ok(Action::Continue)
            }
        }
    }
}

fn header_value<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map_or("", |(_, v)| v.as_str())
}

impl Context for GatewayFlow {}

impl HttpContext for GatewayFlow {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.on_headers(end_of_stream)
            .unwrap_or_else(|e| self.fail(e))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(limit) = self.body_limit else {
            return Action::Continue;
        };
        if body_size as u64 > limit {
            let response = self
                .exchange
                .on_upstream_failure(GatewayError::BodyTooLarge { limit });
            return self.respond(&response);
        }
        if !end_of_stream {
            // Buffer until the whole body is here.
            return Action::Pause;
        }
        self.on_body(body_size).unwrap_or_else(|e| self.fail(e))
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if !self.forwarded {
            return Action::Continue;
        }
        let map = MapType::HttpResponseHeaders;
        let result = host::headers(map).and_then(|headers| {
            let status = header_value(&headers, ":status").parse().unwrap_or(0);
            let edits = self.exchange.on_response_headers(status, &headers);
            for name in edits.remove_headers {
                host::remove_header(map, name)?;
            }
            Ok(())
        });
        if let Err(e) = result {
            host::log(LogLevel::Error, &format!("tollgate gateway: {e}"));
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !self.forwarded {
            return Action::Continue;
        }
        let result =
            host::body(BufferType::HttpResponseBody, body_size).and_then(|chunk| {
                match self.exchange.on_response_chunk(&chunk, end_of_stream) {
                    Chunk::Unchanged => Ok(()),
                    Chunk::Replace(bytes) => {
                        host::replace_body(BufferType::HttpResponseBody, body_size, &bytes)
                    }
                }
            });
        if let Err(e) = result {
            host::log(LogLevel::Error, &format!("tollgate gateway: {e}"));
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        let summary = self.exchange.finish(host::now_ms());
        host::log(
            LogLevel::Debug,
            &format!(
                "tollgate: consumer={} model={} provider={} status={} stream={}",
                summary.consumer.as_deref().unwrap_or("-"),
                summary.model.as_deref().unwrap_or("-"),
                summary.provider.as_deref().unwrap_or("-"),
                summary.status.map_or("-".to_string(), |s| s.to_string()),
                summary.stream
            ),
        );
    }
}
