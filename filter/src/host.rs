//! Host calls, wrapped so that a status the SDK reports is a value the caller handles, and
//! the shared-data implementation of the core's `CounterStore`. Header values are read as
//! bytes: Envoy accepts values that are not UTF-8, and the SDK's string getters would panic
//! on them. (The SDK itself still panics on statuses the ABI does not define; Envoy does not
//! return those.)

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType, Status};
use tollgate_core::http::LocalResponse;
use tollgate_core::keys::{ChainStep, Ticket};
use tollgate_core::limits::LeaseBook;
use tollgate_core::store::{CounterStore, StoreError};
use tollgate_core::GatewayError;

/// Whether Envoy would log at `level` (so that a message is only built when it is shown).
pub fn logs_at(level: LogLevel) -> bool {
    hostcalls::get_log_level().is_ok_and(|current| current as u32 <= level as u32)
}

/// Removes those of `names` that `present` holds: a host call only where there is something
/// to remove.
pub fn remove_present(
    map: MapType,
    present: &[(String, String)],
    names: &[&str],
) -> Result<(), GatewayError> {
    for name in names {
        if present.iter().any(|(k, _)| k.eq_ignore_ascii_case(name)) {
            remove_header(map, name)?;
        }
    }
    Ok(())
}

pub fn log(level: LogLevel, message: &str) {
    // Nothing sensible is left to do if logging itself fails.
    let _ = hostcalls::log(level, message);
}

/// Milliseconds since the Unix epoch, from the host's clock.
pub fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

pub fn plugin_root_id() -> Option<String> {
    let bytes = hostcalls::get_property(vec!["plugin_root_id"]).ok()??;
    String::from_utf8(bytes).ok()
}

/// The upstream cluster of the current request, as seen from an upstream filter.
pub fn cluster_name() -> Option<String> {
    let bytes = hostcalls::get_property(vec!["xds", "cluster_name"]).ok()??;
    String::from_utf8(bytes).ok()
}

/// Filter state that carries the gateway role's `Ticket` to every upstream attempt's key
/// role. Upstream filters share the downstream request's stream info, and unlike the request
/// headers (which an attempt edits in place, so the next attempt sees its edits) the filter
/// state holds what the gateway role wrote, plus what each attempt adds.
const TICKET_PROPERTY: &str = "tollgate_ticket";

pub fn ticket() -> Option<Ticket> {
    let bytes = hostcalls::get_property(vec![TICKET_PROPERTY]).ok()??;
    Ticket::decode(&bytes)
}

pub fn set_ticket(ticket: &Ticket) -> Result<(), GatewayError> {
    hostcalls::set_property(vec![TICKET_PROPERTY], Some(ticket.encode().as_bytes()))
        .map_err(|s| internal("set_property", s))
}

/// Filter state that carries the fallback the gateway role routed as step `n` of the
/// request's chain (`Ticket::chain` names the steps): written once, read only by an attempt
/// that fails over to it.
fn chain_step_property(n: usize) -> String {
    format!("tollgate_chain_step_{n}")
}

pub fn chain_step(n: usize) -> Option<ChainStep> {
    let bytes = hostcalls::get_property(vec![&chain_step_property(n)]).ok()??;
    ChainStep::decode(&bytes)
}

pub fn set_chain_step(n: usize, step: &ChainStep) -> Result<(), GatewayError> {
    hostcalls::set_property(vec![&chain_step_property(n)], Some(&step.encode()))
        .map_err(|s| internal("set_property", s))
}

pub fn plugin_configuration() -> Option<String> {
    let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX).ok()??;
    String::from_utf8(bytes)
        .ok()
        .filter(|s| !s.trim().is_empty())
}

fn internal(what: &str, status: Status) -> GatewayError {
    GatewayError::Internal {
        detail: format!("{what} failed ({status:?})"),
    }
}

/// All headers of `map`; values that are not UTF-8 are kept, lossily, so that they can be
/// seen but never match anything.
pub fn headers(map: MapType) -> Result<Vec<(String, String)>, GatewayError> {
    hostcalls::get_map_bytes(map)
        .map(|pairs| {
            pairs
                .into_iter()
                .map(|(k, v)| {
                    // Valid UTF-8 (nearly always) is taken as it is, without a copy.
                    let v = String::from_utf8(v)
                        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
                    (k, v)
                })
                .collect()
        })
        .map_err(|s| internal("reading headers", s))
}

pub fn set_header(map: MapType, name: &str, value: &str) -> Result<(), GatewayError> {
    hostcalls::set_map_value(map, name, Some(value)).map_err(|s| internal("setting a header", s))
}

pub fn remove_header(map: MapType, name: &str) -> Result<(), GatewayError> {
    hostcalls::remove_map_value(map, name).map_err(|s| internal("removing a header", s))
}

pub fn body(buffer: BufferType, size: usize) -> Result<Vec<u8>, GatewayError> {
    hostcalls::get_buffer(buffer, 0, size)
        .map(Option::unwrap_or_default)
        .map_err(|s| internal("reading the body", s))
}

pub fn replace_body(buffer: BufferType, size: usize, value: &[u8]) -> Result<(), GatewayError> {
    hostcalls::set_buffer(buffer, 0, size, value).map_err(|s| internal("replacing the body", s))
}

/// Sends a local reply. Envoy sends it through the rest of the filter chain and ends the
/// stream; the caller returns `Action::Pause`.
pub fn send(response: &LocalResponse) {
    let headers: Vec<(&str, &str)> = response
        .headers
        .iter()
        .map(|(k, v)| (*k, v.as_str()))
        .collect();
    if let Err(status) =
        hostcalls::send_http_response(u32::from(response.status), headers, Some(&response.body))
    {
        log(
            LogLevel::Error,
            &format!("tollgate: sending a local reply failed ({status:?})"),
        );
    }
}

/// Creates absent counters with the value 0 (for every meter: a full bucket, an unused
/// allowance, no request in flight). Shared data has no "create if absent" operation: a
/// counter's first write is unconditional, so concurrent first writes could lose an update.
/// Creating the counters when the config loads, before traffic, closes that window.
pub fn create_counters<'a>(keys: impl Iterator<Item = &'a str>) {
    for key in keys {
        if let Ok((None, _)) = hostcalls::get_shared_data(key) {
            let _ = hostcalls::set_shared_data(key, Some(&0u64.to_le_bytes()), None);
        }
    }
}

/// Bounded compare-and-swap attempts before an update is refused as contended.
const CAS_ATTEMPTS: u32 = 32;

/// proxy-wasm shared data, shared by every worker of the VM id: values are 8 bytes, little
/// endian; updates retry on CAS mismatch, a bounded number of times.
pub struct SharedStore;

/// The concurrency leases of this VM's live requests (both roles), renewed on its roots'
/// ticks. A VM that dies takes the book with it; shared data keeps the slots until their
/// leases run out.
static LEASES: LeaseBook = LeaseBook::new();

impl CounterStore for SharedStore {
    fn measure_and_replace<T, E>(
        &self,
        key: &str,
        mut f: impl FnMut(Option<u64>) -> Result<(T, u64), E>,
    ) -> Result<Result<T, E>, StoreError> {
        for _ in 0..CAS_ATTEMPTS {
            let (bytes, cas) = hostcalls::get_shared_data(key)
                .map_err(|s| StoreError::Host(format!("get_shared_data: {s:?}")))?;
            let old = bytes
                .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                .map(u64::from_le_bytes);
            let (out, new) = match f(old) {
                Ok(v) => v,
                Err(e) => return Ok(Err(e)),
            };
            // A key that was never written has no CAS; 0 means "no check" to the host, and a
            // concurrent first write by another worker is then last-writer-wins, which is
            // harmless for a counter's first value.
            match hostcalls::set_shared_data(key, Some(&new.to_le_bytes()), cas) {
                Ok(()) => return Ok(Ok(out)),
                Err(Status::CasMismatch) => continue,
                Err(s) => return Err(StoreError::Host(format!("set_shared_data: {s:?}"))),
            }
        }
        Err(StoreError::Contended {
            attempts: CAS_ATTEMPTS,
        })
    }

    fn leases(&self) -> &LeaseBook {
        &LEASES
    }
}
