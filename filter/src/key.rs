//! The key role: in a provider cluster's upstream HTTP filters, once per upstream attempt,
//! picks a key from the pool the gateway role routed to and injects it.

use std::sync::Arc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel, MapType};
use tollgate_core::http::PROVIDER_HEADER;
use tollgate_core::keys::{attempt_key, KeyAttempt};
use tollgate_core::roles::provider_of_cluster;
use tollgate_core::{Config, GatewayError};

use crate::host::{self, SharedStore};

pub struct KeyFlow {
    config: Arc<Config>,
}

impl KeyFlow {
    pub fn new(config: Arc<Config>) -> Self {
        Self { config }
    }

    fn inject(&self) -> Result<(), GatewayError> {
        let map = MapType::HttpRequestHeaders;
        let provider = match host::header(map, PROVIDER_HEADER)? {
            Some(p) => Some(p),
            None => host::cluster_name()
                .as_deref()
                .and_then(provider_of_cluster)
                .map(str::to_string),
        };
        let attempt = attempt_key(&self.config, provider.as_deref(), &SharedStore)?;
        for name in KeyAttempt::REMOVE_HEADERS {
            host::remove_header(map, name)?;
        }
        if let Some((name, value)) = attempt.header() {
            host::set_header(map, name, value)?;
        }
        Ok(())
    }
}

impl Context for KeyFlow {}

impl HttpContext for KeyFlow {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        match self.inject() {
            Ok(()) => Action::Continue,
            Err(e) => {
                host::log(LogLevel::Warn, &format!("tollgate key role: {e}"));
                host::send(&e.respond());
                Action::Pause
            }
        }
    }
}
