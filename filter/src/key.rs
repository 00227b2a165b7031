//! The key role: in a provider cluster's upstream HTTP filters, once per upstream attempt
//! (Envoy's route `retry_policy` makes the retries), picks a key from the pool the gateway
//! role routed to — one this request has not tried yet — and injects it; then records what
//! the provider's answer says of the key.

use std::sync::Arc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel, MapType};
use tollgate_core::http::{
    FinalAnswer, LOCAL_REPLY_CARRIER_STATUS, LOCAL_REPLY_HEADER, PROVIDER_HEADER,
};
use tollgate_core::keys::{self, attempt_key, KEY_RESERVATION_HEADER};
use tollgate_core::limits::{self, Amounts, Reservation};
use tollgate_core::retry::{is_retryable, RetryPolicy};
use tollgate_core::roles::provider_of_cluster;
use tollgate_core::{Config, GatewayError};

use crate::host::{self, SharedStore};
use crate::metrics::KeyMetrics;

pub struct KeyFlow {
    config: Arc<Config>,
    metrics: Arc<KeyMetrics>,
    /// What this attempt took from the key's own limits, until it is handed to the gateway
    /// role (with a successful response) or given back (on any other ending).
    reservation: Reservation,
    handover: Option<String>,
    /// The key role answered this attempt itself (its reply carries its own marker).
    replied: bool,
    /// (provider, key id) of the attempt, to record what the answer says of the key.
    used: Option<(String, String)>,
    /// The provider answered (else, at the end, the key counts as unreachable).
    answered: bool,
    /// The provider's retry policy and when the request was forwarded: an answer after the
    /// budget is final, as in the native host.
    retry: Option<(RetryPolicy, u64)>,
}

impl KeyFlow {
    pub fn new(config: Arc<Config>, metrics: Arc<KeyMetrics>) -> Self {
        Self {
            config,
            metrics,
            reservation: Reservation::default(),
            handover: None,
            replied: false,
            used: None,
            answered: false,
            retry: None,
        }
    }

    fn inject(&mut self) -> Result<(), GatewayError> {
        let map = MapType::HttpRequestHeaders;
        // The pool is the cluster's own; the gateway role's ticket must agree with it, so a
        // route that skipped the gateway role (no ticket) never gets a key.
        let cluster = host::cluster_name();
        let pool = cluster.as_deref().and_then(provider_of_cluster);
        let mut ticket = host::ticket().ok_or(GatewayError::NotRoutedByGateway)?;
        if Some(ticket.provider.as_str()) != pool {
            return Err(GatewayError::NotRoutedByGateway);
        }
        let now = host::now_ms();
        let provider = self.config.provider_by_name(&ticket.provider);
        self.retry = provider.map(|p| (p.retry, ticket.started_ms));
        if !ticket.tried.is_empty() {
            // A retry Envoy scheduled: Envoy bounds attempts, the time budget is ours. Only a
            // budget that ran out during Envoy's backoff gets here: an answer that came after
            // it was made final (see `on_http_response_headers`).
            if provider.is_some_and(|p| !p.retry.within_budget(ticket.started_ms, now)) {
                return Err(GatewayError::RetryBudgetSpent {
                    provider: ticket.provider.clone(),
                    attempts: u32::try_from(ticket.tried.len()).unwrap_or(u32::MAX),
                });
            }
        }
        let mut attempt = attempt_key(&self.config, &ticket, &SharedStore, now)?;
        self.handover = attempt.handover();
        self.used = attempt
            .key_id()
            .map(|k| (attempt.provider.name.clone(), k.to_string()));
        self.reservation = std::mem::take(&mut attempt.reservation);
        ticket
            .tried
            .push(attempt.key_id().unwrap_or("-").to_string());
        host::set_ticket(&ticket)?;
        // The routing header goes (on a retry it is gone already: the first attempt removed
        // it from the one header map all attempts share). The consumer's credential went with
        // the gateway role, whose ticket this request carries.
        host::remove_header(map, PROVIDER_HEADER)?;
        if let Some((name, value)) = attempt.header() {
            host::set_header(map, name, value)?;
        }
        Ok(())
    }
}

impl Context for KeyFlow {
    fn on_done(&mut self) -> bool {
        // Envoy does not call `on_log` for an attempt its router abandons for a retry, but
        // every context is done at its end.
        self.conclude();
        true
    }
}

impl HttpContext for KeyFlow {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        match self.inject() {
            Ok(()) => Action::Continue,
            Err(e) => {
                host::log(LogLevel::Warn, &format!("tollgate key role: {e}"));
                let mut response = e.respond();
                // Marks the reply as ours and carries its status; it travels under a status
                // Envoy's retry policy leaves alone, and the gateway role restores it.
                response.headers.push((
                    LOCAL_REPLY_HEADER,
                    FinalAnswer::KeyRole(response.status).marker(),
                ));
                // Even without the gateway role (which would restore the status), a refusal
                // that can never succeed must not be retried by whatever route sent it here.
                response.status = LOCAL_REPLY_CARRIER_STATUS;
                self.replied = true;
                host::send(&response);
                Action::Pause
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let map = MapType::HttpResponseHeaders;
        let headers = host::headers(map).unwrap_or_default();
        if !self.replied {
            // A provider's response must not carry the gateway's internal markers.
            let _ =
                host::remove_present(map, &headers, &[KEY_RESERVATION_HEADER, LOCAL_REPLY_HEADER]);
        }
        let status = headers
            .iter()
            .find(|(k, _)| k == ":status")
            .and_then(|(_, v)| v.parse::<u16>().ok());
        if let (Some(status), Some((provider, key)), false) = (status, &self.used, self.replied) {
            self.answered = true;
            // Counted as Envoy stats (every worker adds to the same counter); the shared
            // store's counters are the native host's admin view.
            self.metrics.count(provider, key, Some(status));
            // Every worker sees what this answer says of the key: cooling, revoked, healthy.
            let recorded = keys::observe(
                &self.config,
                provider,
                key,
                Some(status),
                &headers,
                host::now_ms(),
                &SharedStore,
            );
            if let Err(e) = recorded {
                host::log(LogLevel::Warn, &format!("tollgate key role: {e}"));
            }
        }
        if let (Some(status), false) = (status, self.replied) {
            self.make_final_past_budget(map, status);
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
        self.conclude();
    }
}

impl KeyFlow {
    /// A failed answer that Envoy's router would retry, arriving when no attempt may start
    /// any more: the client should get it, as the native host relays a provider's last answer
    /// (not the next attempt's refusal). It travels under a status the router never retries,
    /// marked with its own, which the gateway role restores.
    fn make_final_past_budget(&self, map: MapType, status: u16) {
        let Some((policy, started_ms)) = self.retry else {
            return;
        };
        if policy.attempts < 2
            || !is_retryable(status)
            || policy.within_budget(started_ms, host::now_ms())
        {
            return;
        }
        let marker = FinalAnswer::Provider(status).marker();
        if host::set_header(map, LOCAL_REPLY_HEADER, &marker).is_ok() {
            let _ = host::set_header(map, ":status", &LOCAL_REPLY_CARRIER_STATUS.to_string());
        }
    }

    /// Ends the attempt, once: counts a key that never answered, and gives back what the
    /// attempt reserved on it unless the gateway role took it over.
    fn conclude(&mut self) {
        let used = self.used.take();
        if let (false, false, Some((provider, key))) = (self.answered, self.replied, used) {
            // Sent with this key, never answered: connection failure, reset or timeout.
            self.metrics.count(&provider, &key, None);
        }
        let reservation = std::mem::take(&mut self.reservation);
        if !reservation.is_empty() {
            // The provider saw a request, but it used no tokens of the key.
            let sent = Amounts {
                requests: 1,
                ..Amounts::default()
            };
            let _ = limits::settle(reservation, &SharedStore, host::now_ms(), sent);
        }
    }
}
