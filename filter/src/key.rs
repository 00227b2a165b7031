//! The key role: in a provider cluster's upstream HTTP filters, once per upstream attempt,
//! picks a key from the pool the gateway role routed to and injects it.

use std::sync::Arc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel, MapType};
use tollgate_core::http::{DEMAND_HEADER, LOCAL_REPLY_HEADER, PROVIDER_HEADER};
use tollgate_core::keys::{self, KEY_RESERVATION_HEADER};
use tollgate_core::keys::{attempt_key, KeyAttempt};
use tollgate_core::limits::{self, Amounts, Reservation};
use tollgate_core::roles::provider_of_cluster;
use tollgate_core::{Config, GatewayError};

use crate::host::{self, SharedStore};

pub struct KeyFlow {
    config: Arc<Config>,
    /// What this attempt took from the key's own limits, until it is handed to the gateway
    /// role (with a successful response) or given back (on any other ending).
    reservation: Reservation,
    handover: Option<String>,
    /// The key role answered this attempt itself (its reply carries its own marker).
    replied: bool,
    /// (provider, key id) of the attempt, to record what the answer says of the key.
    used: Option<(String, String)>,
}

impl KeyFlow {
    pub fn new(config: Arc<Config>) -> Self {
        Self {
            config,
            reservation: Reservation::default(),
            handover: None,
            replied: false,
            used: None,
        }
    }

    fn inject(&mut self) -> Result<(), GatewayError> {
        let map = MapType::HttpRequestHeaders;
        // The pool is the cluster's own; the gateway role's header must agree with it, so a
        // route that skipped the gateway role (no header) never gets a key.
        let cluster = host::cluster_name();
        let pool = cluster.as_deref().and_then(provider_of_cluster);
        let routed = host::header(map, PROVIDER_HEADER)?;
        if routed.is_none() || routed.as_deref() != pool {
            return Err(GatewayError::NotRoutedByGateway);
        }
        let tokens = host::header(map, DEMAND_HEADER)?
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let demand = Amounts {
            requests: 1,
            tokens,
            micro_usd: 0,
        };
        let mut attempt = attempt_key(&self.config, pool, &SharedStore, host::now_ms(), demand)?;
        self.handover = attempt.handover();
        self.used = attempt
            .key_id()
            .map(|k| (attempt.provider.name.clone(), k.to_string()));
        self.reservation = std::mem::take(&mut attempt.reservation);
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
                self.replied = true;
                host::send(&response);
                Action::Pause
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let map = MapType::HttpResponseHeaders;
        if !self.replied {
            // A provider's response must not carry the gateway's internal markers.
            for name in [KEY_RESERVATION_HEADER, LOCAL_REPLY_HEADER] {
                let _ = host::remove_header(map, name);
            }
        }
        let status = host::header(map, ":status")
            .ok()
            .flatten()
            .and_then(|s| s.parse::<u16>().ok());
        if let (Some(status), Some((provider, key)), false) = (status, &self.used, self.replied) {
            // Every worker sees what this answer says of the key: cooling, revoked, healthy.
            let recorded = host::headers(map).and_then(|headers| {
                keys::observe(
                    &self.config,
                    provider,
                    key,
                    status,
                    &headers,
                    host::now_ms(),
                    &SharedStore,
                )
            });
            if let Err(e) = recorded {
                host::log(LogLevel::Warn, &format!("tollgate key role: {e}"));
            }
        }
        let success = status.is_some_and(|s| (200..300).contains(&s));
        // A successful response reaches the gateway role, which sees its usage: hand it the
        // reservation to settle. Anything else (a retry, an error) is settled here.
        if let (true, Some(handover)) = (success, self.handover.take()) {
            if host::set_header(map, KEY_RESERVATION_HEADER, &handover).is_ok() {
                self.reservation = Reservation::default();
            }
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        let reservation = std::mem::take(&mut self.reservation);
        if !reservation.is_empty() {
            let _ = limits::settle(
                reservation,
                &SharedStore,
                host::now_ms(),
                Amounts::default(),
            );
        }
    }
}
