//! Two reference filters for the load bench (`benches/load.py`, targets `envoy-noop` and
//! `envoy-floor`), so that every run shows how far Envoy + tollgate is from what any
//! proxy-wasm gateway costs:
//!
//! - plugin configuration `noop`: a filter that does nothing (the price of a wasm filter);
//! - plugin configuration `body`: pauses the request, reads its whole body and sets one header
//!   (the least a gateway that routes on the body must do);
//! - `body+<call>*<n>`: the `body` filter plus `n` host calls of one kind per request, to
//!   price each kind of host call in Envoy (target `envoy-floor+<call>*<n>`; the price list
//!   is in docs/benchmarks.md). Kinds: see `HostCall`.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType, MetricType};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default)]
struct Root {
    reads_body: bool,
    /// Host calls made per request on top of reading the body.
    calls: Option<(HostCall, u32)>,
    /// The counter's and the histogram's stat ids, defined once per VM.
    stats: (u32, u32),
}

/// The host calls the price list covers: what tollgate makes per request.
#[derive(Clone, Copy)]
enum HostCall {
    /// All request headers into wasm memory.
    GetHeaders,
    /// Set one request header.
    SetHeader,
    /// Remove one request header that is present.
    RemoveHeader,
    /// Read one 8-byte shared-data entry.
    GetShared,
    /// Compare-and-set one 8-byte shared-data entry (read, then write with its CAS).
    CasShared,
    /// Read a filter-state property.
    GetProperty,
    /// Write a filter-state property.
    SetProperty,
    /// Read the clock.
    Time,
    /// Add to a counter stat.
    Counter,
    /// Record a value in a histogram stat.
    Histogram,
}

impl HostCall {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "get_headers" => Self::GetHeaders,
            "set_header" => Self::SetHeader,
            "remove_header" => Self::RemoveHeader,
            "get_shared" => Self::GetShared,
            "cas_shared" => Self::CasShared,
            "get_property" => Self::GetProperty,
            "set_property" => Self::SetProperty,
            "time" => Self::Time,
            "counter" => Self::Counter,
            "histogram" => Self::Histogram,
            _ => return None,
        })
    }

    /// Makes the call once (the `i`th time in this request); what it returns is dropped.
    fn make(self, i: u32, stats: (u32, u32)) {
        const SHARED: &str = "floor/counter";
        let map = MapType::HttpRequestHeaders;
        match self {
            Self::GetHeaders => {
                let _ = hostcalls::get_map_bytes(map);
            }
            Self::SetHeader => {
                let _ = hostcalls::set_map_value(map, "x-floor-set", Some("v"));
            }
            Self::RemoveHeader => {
                // Each removal finds the header there, as tollgate's do.
                let _ = hostcalls::set_map_value(map, "x-floor-gone", Some("v"));
                let _ = hostcalls::remove_map_value(map, "x-floor-gone");
            }
            Self::GetShared => {
                let _ = hostcalls::get_shared_data(SHARED);
            }
            Self::CasShared => {
                if let Ok((value, cas)) = hostcalls::get_shared_data(SHARED) {
                    let n = value
                        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                        .map_or(0, u64::from_le_bytes);
                    let next = n.wrapping_add(1).to_le_bytes();
                    let _ = hostcalls::set_shared_data(SHARED, Some(&next), cas);
                }
            }
            Self::GetProperty => {
                let _ = hostcalls::get_property(vec!["floor_state"]);
            }
            Self::SetProperty => {
                let state = format!("{{\"attempt\":{i}}}");
                let _ = hostcalls::set_property(vec!["floor_state"], Some(state.as_bytes()));
            }
            Self::Time => {
                let _ = hostcalls::get_current_time();
            }
            Self::Counter => {
                let _ = hostcalls::increment_metric(stats.0, 1);
            }
            Self::Histogram => {
                let _ = hostcalls::record_metric(stats.1, u64::from(i));
            }
        }
    }
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        let config = String::from_utf8_lossy(&config);
        let (mode, calls) = config.split_once('+').unwrap_or((&config, ""));
        self.reads_body = mode == "body";
        self.calls = calls
            .split_once('*')
            .and_then(|(kind, n)| Some((HostCall::parse(kind)?, n.parse().ok()?)));
        if let Some((HostCall::Counter | HostCall::Histogram, _)) = self.calls {
            self.stats = (
                hostcalls::define_metric(MetricType::Counter, "floor_counter").unwrap_or(0),
                hostcalls::define_metric(MetricType::Histogram, "floor_histogram").unwrap_or(0),
            );
        }
        // A `body+…` config that names no known call is refused, not measured as `body`.
        calls.is_empty() || self.calls.is_some()
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(if self.reads_body {
            Box::new(ReadsBody {
                calls: self.calls,
                stats: self.stats,
            }) as Box<dyn HttpContext>
        } else {
            Box::new(Noop)
        })
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Noop;

impl Context for Noop {}

impl HttpContext for Noop {}

struct ReadsBody {
    calls: Option<(HostCall, u32)>,
    /// The counter's and the histogram's stat ids.
    stats: (u32, u32),
}

impl Context for ReadsBody {}

impl HttpContext for ReadsBody {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        if end_of_stream {
            self.set_http_request_header("x-floor-model", Some("none"));
            return Action::Continue;
        }
        Action::Pause
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !end_of_stream {
            return Action::Pause;
        }
        // What a router on the body reads: the whole body, then one header from it.
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        let routed = if body.windows(7).any(|w| w == b"\"model\"") {
            "found"
        } else {
            "none"
        };
        self.set_http_request_header("x-floor-model", Some(routed));
        if let Some((call, n)) = self.calls {
            if let HostCall::GetProperty = call {
                // Read back what the request wrote, as tollgate's key role reads its ticket.
                HostCall::SetProperty.make(0, self.stats);
            }
            for i in 0..n {
                call.make(i, self.stats);
            }
        }
        Action::Continue
    }
}
