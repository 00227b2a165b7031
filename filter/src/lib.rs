//! tollgate as a proxy-wasm filter. One module, loaded twice with one `vm_id`:
//! - root id `tollgate-gateway`, in the listener's HTTP filters: the gateway role
//!   (`gateway.rs`) — auth, routing, body rewrite, mock answers, response path;
//! - root id `tollgate-key`, in each provider cluster's upstream HTTP filters: the key role
//!   (`key.rs`) — one provider key per upstream attempt.
//!
//! Both take the same tollgate config as their plugin configuration. This crate only carries
//! the core's decisions out through host calls (`host.rs`); it never panics on input.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod gateway;
mod host;
mod key;
mod metrics;
mod remote;

use std::sync::Arc;
use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};
use tollgate_core::config::store::StoreSettings;
use tollgate_core::limits;
use tollgate_core::roles::{GATEWAY_ROOT_ID, KEY_ROOT_ID};
use tollgate_core::Config;

proxy_wasm::main! {{
    // Also installs a panic hook that logs at critical level, should one ever happen.
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Gateway,
    Key,
}

/// One per plugin configuration per worker: holds the compiled config its requests share.
#[derive(Default)]
struct Root {
    role: Option<Role>,
    config: Option<Arc<Config>>,
    /// `store.kind: redis`.
    remote: bool,
    renew_period_ms: u64,
    next_renewal_ms: u64,
    next_gauges_ms: u64,
}

/// Compiles the plugin configuration. The Redis password (`store.password_env`) is the
/// store-server's, not the filter's: Envoy need not hold it.
pub(crate) fn load(text: &str) -> Result<Config, tollgate_core::ConfigErrors> {
    let env = |name: &str| std::env::var(name).ok();
    match Config::load(text, &env) {
        Err(errors) if errors.0.iter().all(|e| e.path == "store.password_env") => {
            let held_elsewhere = |name: &str| {
                std::env::var(name)
                    .ok()
                    .or_else(|| Some("(held by tollgate store-server)".to_string()))
            };
            Config::load(text, &held_elsewhere)
        }
        other => other,
    }
}

/// How often queued updates go to the store-server (`store.kind: redis`).
const FLUSH_PERIOD: Duration = Duration::from_millis(20);

/// How often the gateway role publishes the gauges of limits and keys.
const GAUGE_PERIOD: Duration = Duration::from_secs(1);

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _: usize) {
        // A batch of queued updates answered (`remote::flush`).
        remote::on_flight_answer(token, body_size);
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let root_id = host::plugin_root_id();
        let role = match root_id.as_deref() {
            Some(GATEWAY_ROOT_ID) => Role::Gateway,
            Some(KEY_ROOT_ID) => Role::Key,
            other => {
                host::log(
                    LogLevel::Critical,
                    &format!(
                        "tollgate: root_id must be `{GATEWAY_ROOT_ID}` or `{KEY_ROOT_ID}`, got {other:?}"
                    ),
                );
                return false;
            }
        };
        let Some(text) = host::plugin_configuration() else {
            host::log(LogLevel::Critical, "tollgate: the plugin configuration is empty; it must be a tollgate config (YAML or JSON)");
            return false;
        };
        match load(&text) {
            Ok(config) => {
                // `store.kind: redis`: shared state through the store-server (`remote`).
                remote::configure(&config, &text);
                self.remote = config.store != StoreSettings::Local;
                // Both roles create the counters: either may load first (listener and
                // clusters reload separately under xDS).
                host::create_counters(config.all_limits().map(|l| &*l.store_key));
                host::create_counters(config.pool_store_keys());
                // Every half lease, the concurrency slots of this VM's live requests are
                // renewed (see `limits::concurrency`).
                self.renew_period_ms = config.server.concurrency_lease_ms / 2;
                let mut tick = Duration::from_millis(self.renew_period_ms);
                if role == Role::Gateway {
                    tick = tick.min(GAUGE_PERIOD);
                }
                if self.remote {
                    // Queued updates (settlements, key health) go out on the tick.
                    tick = tick.min(FLUSH_PERIOD);
                }
                self.set_tick_period(tick);
                self.role = Some(role);
                self.config = Some(Arc::new(config));
                true
            }
            Err(errors) => {
                // Returning false makes Envoy reject the config; the log says why, every error.
                host::log(
                    LogLevel::Critical,
                    &format!("tollgate: invalid config for {root_id:?}:\n{errors}"),
                );
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let config = Arc::clone(self.config.as_ref()?);
        match self.role? {
            Role::Gateway => Some(Box::new(gateway::GatewayFlow::new(config))),
            Role::Key => Some(Box::new(key::KeyFlow::new(config))),
        }
    }

    fn on_tick(&mut self) {
        let now = host::now_ms();
        if now >= self.next_renewal_ms {
            self.next_renewal_ms = now.saturating_add(self.renew_period_ms);
            limits::renew_leases(&host::SharedStore, now);
            remote::renew_leases(now);
        }
        if let (Some(Role::Gateway), Some(config)) = (self.role, &self.config) {
            if now >= self.next_gauges_ms {
                self.next_gauges_ms = now.saturating_add(GAUGE_PERIOD.as_millis() as u64);
                if self.remote {
                    // The gauges of shared state say what this worker last saw of Redis.
                    remote::with_known(|tx| metrics::publish(config, now, tx));
                    metrics::store_up(remote::is_up());
                } else {
                    metrics::publish(config, now, &host::SharedStore);
                }
            }
        }
        remote::flush();
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
