//! tollgate's core: everything the gateway decides, and nothing it does. No IO, no clock, no
//! randomness, no proxy-wasm, tokio or hyper: hosts feed events and `now` in and carry the
//! decisions out, so a policy behaves the same in Envoy and in the native host.
//!
//! - `config`: the one schema both hosts load, validated as a whole and compiled once.
//! - `auth`: consumer keys, held as SHA-256 hashes.
//! - `calendar`: UTC civil dates, for allowances and provider headers.
//! - `exchange`: the gateway role's per-request state machine.
//! - `health`: provider key health (cooling after 429, revoked after 401/403).
//! - `keys`: the key role, which picks a provider key per upstream attempt.
//! - `prompts`: prompt templates published as endpoints: variables checked, rendered as data,
//!   answers shaped; `decorators` and `guard`: messages added to, and deny rules over, requests.
//! - `retry`: which failed attempts are retried on another key, and the backoff between.
//! - `limits`: rate limits, concurrency and calendar quotas: reserve, then settle.
//! - `providers`: one module per provider kind: wire types and pure translation; `signals`
//!   reads what providers say about a key's limits (retry times, remaining capacity).
//! - `metrics`: the Prometheus families both hosts export, and what a request adds to them.
//! - `sse`: incremental Server-Sent Events parsing, keeping each event's exact bytes.
//! - `store`: the shared-counter trait the hosts implement.
//! - `roles`: the names of the gateway and key roles in Envoy.
//! - `error`: every refusal, and its OpenAI-shaped body.

#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::string_slice
    )
)]

pub mod auth;
pub mod calendar;
pub mod config;
pub mod decorators;
pub mod error;
pub mod exchange;
pub mod guard;
pub mod health;
pub mod http;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod prompts;
pub mod providers;
pub mod retry;
pub mod roles;
pub mod sse;
pub mod store;
pub mod tokens;

pub use config::{Config, ConfigError, ConfigErrors};
pub use error::GatewayError;
pub use exchange::Exchange;
