//! The key pools as Envoy stats, the same figures the native host's `GET /admin/keys` shows:
//! per key, counters of attempts by outcome (each worker adds to the same process-wide
//! counter), and gauges of its state, cooldown end and learned headroom, published from the
//! shared store on a timer. Envoy prefixes the names with `wasmcustom.`:
//! `wasmcustom.tollgate.keys.<provider>.<key>.<figure>` (and, where limits are per model,
//! `….<key>.models.<upstream model>.until_ms`); and `wasmcustom.tollgate.vm.memory_bytes`,
//! the linear memory of a worker's VM.

use std::collections::BTreeMap;

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;
use tollgate_core::keys::report::{self, KeyReport};
use tollgate_core::keys::KeyCounter;
use tollgate_core::providers::refusal::RefusalClass;
use tollgate_core::Config;

use crate::host::SharedStore;

struct KeyIds {
    counters: Vec<Option<u32>>,
    state: Option<u32>,
    until_ms: Option<u32>,
    learned_remaining: Option<u32>,
    /// Per upstream model (providers whose limits are per model): until when the key cools
    /// for it (0 when it does not).
    models_until_ms: BTreeMap<String, Option<u32>>,
}

/// Metric ids per (provider, key id), and the VM's memory.
pub struct KeyMetrics {
    keys: BTreeMap<(String, String), KeyIds>,
    vm_memory: Option<u32>,
}

fn define(kind: MetricType, name: &str) -> Option<u32> {
    hostcalls::define_metric(kind, name).ok()
}

impl KeyMetrics {
    pub fn define(config: &Config) -> Self {
        let mut keys = BTreeMap::new();
        for (pi, p) in config.providers().iter().enumerate() {
            for (ki, k) in p.keys.iter().enumerate() {
                let name = |figure: &str| format!("tollgate.keys.{}.{}.{figure}", p.name, k.id);
                // The upstream models the key has a per-model record for.
                let models_until_ms = config
                    .models()
                    .iter()
                    .filter(|m| m.provider == pi && !m.key_model_health.is_empty())
                    .filter(|m| m.pool.contains(&ki))
                    .map(|m| {
                        let figure = format!("models.{}.until_ms", m.upstream_model);
                        (
                            m.upstream_model.clone(),
                            define(MetricType::Gauge, &name(&figure)),
                        )
                    })
                    .collect();
                let ids = KeyIds {
                    counters: KeyCounter::ALL
                        .iter()
                        .map(|c| define(MetricType::Counter, &name(c.name())))
                        .collect(),
                    state: define(MetricType::Gauge, &name("state")),
                    until_ms: define(MetricType::Gauge, &name("until_ms")),
                    learned_remaining: define(MetricType::Gauge, &name("learned_remaining")),
                    models_until_ms,
                };
                keys.insert((p.name.clone(), k.id.clone()), ids);
            }
        }
        Self {
            keys,
            // Each worker runs one VM; they are alike, so the last one to publish stands for
            // all.
            vm_memory: define(MetricType::Gauge, "tollgate.vm.memory_bytes"),
        }
    }

    /// Counts an attempt's outcome (`status` `None`: the provider never answered; `class`:
    /// what its refusal meant).
    pub fn count(
        &self,
        provider: &str,
        key: &str,
        status: Option<u16>,
        class: Option<RefusalClass>,
    ) {
        let Some(ids) = self.keys.get(&(provider.to_string(), key.to_string())) else {
            return;
        };
        for counter in [Some(KeyCounter::Attempts), KeyCounter::of(status, class)]
            .into_iter()
            .flatten()
        {
            if let Some(Some(id)) = ids.counters.get(counter.index()) {
                let _ = hostcalls::increment_metric(*id, 1);
            }
        }
    }

    /// Sets every key's gauges from the shared store: state (0 healthy, 1 cooling — key-wide
    /// or for some models —, 2 revoked, 3 exhausted), until when (Unix ms, 0 when healthy), learned remaining capacity (0 when
    /// the provider said nothing or what it said expired).
    pub fn publish(&self, config: &Config, now_ms: u64) {
        if let Some(id) = self.vm_memory {
            let _ = hostcalls::record_metric(id, linear_memory_bytes());
        }
        for pool in report::pools(config, &SharedStore, now_ms) {
            for key in &pool.keys {
                if let Some(ids) = self.keys.get(&(pool.provider.clone(), key.id.clone())) {
                    record(ids, key);
                }
            }
        }
    }
}

fn record(ids: &KeyIds, key: &KeyReport) {
    let set = |id: Option<u32>, value: u64| {
        if let Some(id) = id {
            let _ = hostcalls::record_metric(id, value);
        }
    };
    set(ids.state, key.state.gauge());
    set(ids.until_ms, key.until_ms.unwrap_or(0));
    set(ids.learned_remaining, key.learned_remaining.unwrap_or(0));
    for (model, id) in &ids.models_until_ms {
        set(*id, key.cooling_models.get(model).copied().unwrap_or(0));
    }
}

/// The size of this VM's linear memory: all the memory the filter's VM holds.
fn linear_memory_bytes() -> u64 {
    #[cfg(target_arch = "wasm32")]
    {
        core::arch::wasm32::memory_size(0) as u64 * 65_536
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        0
    }
}
