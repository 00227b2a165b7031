//! End-to-end support: the mock provider, and the gateway processes (native host and real
//! Envoy loading the built filter) that the suites in `tests/` start and stop.

pub mod gateway;
pub mod mock_provider;
pub mod prom;
pub mod prometheus;
pub mod redis;
pub mod scenario;
