//! The key role: in a provider cluster's upstream HTTP filters, once per upstream attempt,
//! picks a key from the pool the gateway role routed to and injects it.

use std::sync::Arc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel, MapType};
use tollgate_core::http::{LOCAL_REPLY_HEADER, PROVIDER_HEADER};
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
        // The pool is the cluster's own; the gateway role's header must agree with it, so a
        // route that skipped the gateway role (no header) never gets a key.
        let cluster = host::cluster_name();
        let pool = cluster.as_deref().and_then(provider_of_cluster);
        let routed = host::header(map, PROVIDER_HEADER)?;
        if routed.is_none() || routed.as_deref() != pool {
            return Err(GatewayError::NotRoutedByGateway);
        }
        let attempt = attempt_key(&self.config, pool, &SharedStore)?;
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
                let mut response = e.respond();
                // Tells the gateway role this reply is ours, not the provider's.
                response
                    .headers
                    .push((LOCAL_REPLY_HEADER, "key".to_string()));
                host::send(&response);
                Action::Pause
            }
        }
    }
}
