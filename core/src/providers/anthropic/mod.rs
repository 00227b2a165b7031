//! Anthropic's Messages API (`POST /v1/messages`), in both directions through the hub shape
//! (OpenAI's chat completions, the gateway's front door): `provider` maps a chat request to
//! a Messages request and the Messages answer (JSON and SSE) back, for Anthropic models
//! called by OpenAI clients; `client` maps a Messages request to a chat request and the chat
//! answer back, for Anthropic clients calling any other model. Wire shapes only; no IO.

pub mod client;
pub mod provider;
pub mod refusal;

/// Path of the Messages endpoint, relative to a provider's base URL.
pub const MESSAGES_PATH: &str = "/messages";

/// Where Anthropic's API lives, when a provider of this kind names no `base_url`.
pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com/v1";

/// The `anthropic-version` sent when neither the provider's config nor the client names one.
pub const DEFAULT_VERSION: &str = "2023-06-01";
