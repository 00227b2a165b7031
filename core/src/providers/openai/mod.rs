//! OpenAI's Chat Completions API: the gateway's front door, and the wire format of every
//! OpenAI-compatible provider. Wire types only; no HTTP client appears here.

pub mod refusal;
pub mod usage;
pub mod wire;

pub use wire::ChatRequest;

/// Path of the chat completions endpoint, relative to a provider's base URL.
pub const CHAT_COMPLETIONS_PATH: &str = "/chat/completions";
