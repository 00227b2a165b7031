//! Two reference filters for the load bench (`benches/load.py`, targets `envoy-noop` and
//! `envoy-floor`), so that every run shows how far Envoy + tollgate is from what any
//! proxy-wasm gateway costs:
//!
//! - plugin configuration `noop`: a filter that does nothing (the price of a wasm filter);
//! - plugin configuration `body`: pauses the request, reads its whole body and sets one header
//!   (the least a gateway that routes on the body must do).

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { reads_body: false }) });
}}

struct Root {
    reads_body: bool,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        self.reads_body = config.as_slice() == b"body";
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(if self.reads_body {
            Box::new(ReadsBody) as Box<dyn HttpContext>
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

struct ReadsBody;

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
        Action::Continue
    }
}
