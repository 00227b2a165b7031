//! The one seam between the exchange and the dialects. The exchange works in the hub shape
//! (OpenAI's chat completions); what a client or a provider speaks other than that is
//! translated here, by the dialect's own module. A new dialect is a new arm in each function
//! below and a folder under `providers/`; the exchange does not change.
//!
//! ```text
//! client request  --ClientDialect::request_to_hub-->  hub request
//! hub request     --provider_request------------->    provider request (body, endpoint, headers)
//! provider answer --answer_to_hub / stream_to_hub->   hub answer (and its usage)
//! hub answer      --ClientDialect::answer_from_hub / stream_from_hub / error_from_hub--> client
//! ```
//! A client speaking a provider's own dialect is passed through (`passthrough_usage` reads
//! what it used) rather than translated there and back.

use crate::providers::anthropic::{self, client, provider};
use crate::providers::openai::usage::Usage;
use crate::providers::openai::CHAT_COMPLETIONS_PATH;
use crate::providers::{Provider, ProviderKind};

/// Bytes of one dialect's event stream in, at any chunk boundary; another's out.
pub trait StreamTranslator: Send {
    /// Translates what `bytes` completes, appending to `out`.
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>);
    /// The stream ended: what is left, and nothing that makes a cut stream look whole.
    fn finish(&mut self, out: &mut Vec<u8>);
    /// What the stream says it used so far, in the gateway's terms (cache writes included),
    /// also when it was cut before its last event; `None` if it said nothing yet.
    fn usage(&self) -> Option<Usage> {
        None
    }
}

impl StreamTranslator for provider::ChatStream {
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        provider::ChatStream::feed(self, bytes, out);
    }
    fn finish(&mut self, out: &mut Vec<u8>) {
        provider::ChatStream::finish(self, out);
    }
    fn usage(&self) -> Option<Usage> {
        provider::ChatStream::usage(self)
    }
}

impl StreamTranslator for client::MessagesStream {
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        client::MessagesStream::feed(self, bytes, out);
    }
    fn finish(&mut self, out: &mut Vec<u8>) {
        client::MessagesStream::finish(self, out);
    }
}

/// The API a client called.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ClientDialect {
    /// OpenAI's chat completions: the hub shape itself.
    #[default]
    Chat,
    /// Anthropic's Messages API.
    Messages,
}

impl ClientDialect {
    /// The provider kind that speaks this dialect natively, if not the hub: its requests are
    /// passed through rather than translated.
    pub fn native_kind(self) -> Option<ProviderKind> {
        match self {
            Self::Chat => None,
            Self::Messages => Some(ProviderKind::Anthropic),
        }
    }

    /// What the gateway reads of a request in this (non-hub) dialect: model, stream flag,
    /// token estimate, guarded texts. `Err`: why it is malformed.
    pub fn read_request(self, body: &[u8]) -> Result<NativeRequest<'_>, String> {
        match self {
            Self::Chat => Err("chat requests are read as the hub shape".into()),
            Self::Messages => client::parse_messages_request(body),
        }
    }

    /// The client's request in the hub shape (`None`: it is already). `Err`: why it cannot be.
    pub fn request_to_hub(self, body: &[u8]) -> Result<Option<Vec<u8>>, String> {
        match self {
            Self::Chat => Ok(None),
            Self::Messages => client::chat_request(body).map(Some),
        }
    }

    /// A whole hub answer (a chat completion) for this client; `None` if it cannot be read.
    pub fn answer_from_hub(self, completion: &[u8], public_model: &str) -> Option<Vec<u8>> {
        match self {
            Self::Chat => Some(completion.to_vec()),
            Self::Messages => client::message_from_chat(completion, public_model),
        }
    }

    /// A hub (OpenAI-shaped) error body with `status`, in this client's shape.
    pub fn error_from_hub(self, status: u16, body: &[u8]) -> Vec<u8> {
        match self {
            Self::Chat => body.to_vec(),
            Self::Messages => client::error_from_openai(status, body),
        }
    }

    /// Translates a hub stream for this client; `None` when it reads the hub stream as is.
    pub fn stream_from_hub(self, public_model: &str) -> Option<Box<dyn StreamTranslator>> {
        match self {
            Self::Chat => None,
            Self::Messages => Some(Box::new(client::MessagesStream::new(public_model))),
        }
    }
}

/// A request in a client's own dialect, as the gateway reads it.
pub type NativeRequest<'a> = client::MessagesRequest<'a>;

/// A hub request as a provider takes it.
#[derive(Debug, PartialEq, Eq)]
pub struct ProviderRequest {
    /// The body to send; `None`: the hub request as it is.
    pub body: Option<Vec<u8>>,
    /// The endpoint, relative to the provider's base URL.
    pub endpoint: &'static str,
    /// Headers to send when the client sent none of that name.
    pub default_headers: Vec<(&'static str, String)>,
}

/// A hub request parameter the provider cannot honour.
pub use provider::Unsupported;

/// The hub request `hub_body` as `provider` takes it, for `upstream_model`.
pub fn provider_request(
    provider: &Provider,
    hub_body: &[u8],
    upstream_model: &str,
    default_max_tokens: u64,
) -> Result<ProviderRequest, Unsupported> {
    match provider.kind {
        ProviderKind::OpenAi | ProviderKind::Mock => Ok(ProviderRequest {
            body: None,
            endpoint: CHAT_COMPLETIONS_PATH,
            default_headers: Vec::new(),
        }),
        ProviderKind::Anthropic => Ok(ProviderRequest {
            body: Some(provider::messages_request(
                hub_body,
                upstream_model,
                default_max_tokens,
            )?),
            endpoint: anthropic::MESSAGES_PATH,
            default_headers: native_headers(provider),
        }),
    }
}

/// A client's request in `provider`'s own dialect (a passthrough), with the gateway's
/// decorator messages (`prepend`, `append`) added and the model renamed.
pub fn passthrough_request(
    provider: &Provider,
    body: &[u8],
    requested_model: &str,
    upstream_model: &str,
    (prepend, append): (&[&serde_json::Value], &[&serde_json::Value]),
) -> Result<ProviderRequest, String> {
    let endpoint = match provider.kind {
        ProviderKind::Anthropic => anthropic::MESSAGES_PATH,
        ProviderKind::OpenAi | ProviderKind::Mock => {
            return Err(format!(
                "no passthrough to a provider of kind `{}`",
                provider.kind.as_str()
            ))
        }
    };
    let decorated = if prepend.is_empty() && append.is_empty() {
        None
    } else {
        Some(client::decorate(body, prepend, append)?)
    };
    let body = match (decorated, requested_model == upstream_model) {
        (None, true) => None,
        (None, false) => Some(client::rename_model(body, upstream_model)?),
        (Some(decorated), true) => Some(decorated),
        (Some(decorated), false) => Some(client::rename_model(&decorated, upstream_model)?),
    };
    Ok(ProviderRequest {
        body,
        endpoint,
        default_headers: native_headers(provider),
    })
}

/// Headers a provider's API wants on every request (sent unless the client sent its own).
fn native_headers(provider: &Provider) -> Vec<(&'static str, String)> {
    match provider.kind {
        ProviderKind::Anthropic => vec![("anthropic-version", provider.anthropic_version.clone())],
        ProviderKind::OpenAi | ProviderKind::Mock => Vec::new(),
    }
}

/// Whether a provider of `kind` answers in the hub shape (nothing to translate back).
pub fn speaks_hub(kind: ProviderKind) -> bool {
    !matches!(kind, ProviderKind::Anthropic)
}

/// A provider's whole answer in the hub shape.
#[derive(Debug, PartialEq, Eq)]
pub struct HubAnswer {
    /// The status a hub client knows (Anthropic's 529 is 503).
    pub status: u16,
    pub body: Vec<u8>,
    pub usage: Option<Usage>,
}

/// A provider's whole answer (`status`, `body`) in the hub shape; `None` when a successful
/// answer cannot be read, or an error is not the provider's own shape.
pub fn answer_to_hub(
    kind: ProviderKind,
    status: u16,
    body: &[u8],
    public_model: &str,
    created_s: u64,
) -> Option<HubAnswer> {
    match kind {
        ProviderKind::OpenAi | ProviderKind::Mock => Some(HubAnswer {
            status,
            body: body.to_vec(),
            usage: crate::providers::openai::usage::from_completion(body),
        }),
        ProviderKind::Anthropic if (200..300).contains(&status) => {
            provider::chat_completion(body, public_model, created_s).map(|(body, usage)| {
                HubAnswer {
                    status,
                    body,
                    usage,
                }
            })
        }
        ProviderKind::Anthropic => provider::openai_error(body).map(|body| HubAnswer {
            // 529 (overloaded) is Anthropic's own; hub clients know 503.
            status: if status == 529 { 503 } else { status },
            body,
            usage: None,
        }),
    }
}

/// Translates a provider's stream into the hub shape (always ending with a usage chunk, for
/// the gateway's accounting); `None` for providers that stream the hub shape.
pub fn stream_to_hub(
    kind: ProviderKind,
    public_model: &str,
    created_s: u64,
) -> Option<Box<dyn StreamTranslator>> {
    match kind {
        ProviderKind::OpenAi | ProviderKind::Mock => None,
        ProviderKind::Anthropic => Some(Box::new(provider::ChatStream::new(
            public_model,
            created_s,
            true,
        ))),
    }
}

/// Reads what a passed-through answer used, without changing it: stream events one by
/// one, or a whole answer.
pub trait UsageReader: Send {
    /// One event's data of a streamed answer.
    fn observe(&mut self, data: &str);
    /// The usage of a whole (not streamed) answer.
    fn answer_usage(&self, body: &[u8]) -> Option<Usage>;
    /// The stream's usage so far.
    fn usage(&self) -> Option<Usage>;
    /// Estimated tokens of what was streamed so far (for a stream cut before its usage).
    fn streamed_tokens(&self) -> u64;
}

impl UsageReader for client::MessagesStreamUsage {
    fn observe(&mut self, data: &str) {
        client::MessagesStreamUsage::observe(self, data);
    }
    fn answer_usage(&self, body: &[u8]) -> Option<Usage> {
        client::usage_of_message(body)
    }
    fn usage(&self) -> Option<Usage> {
        client::MessagesStreamUsage::usage(self)
    }
    fn streamed_tokens(&self) -> u64 {
        self.streamed_text_tokens()
    }
}

/// The usage reader of a passthrough to a provider of `kind`.
pub fn passthrough_usage(kind: ProviderKind) -> Option<Box<dyn UsageReader>> {
    match kind {
        ProviderKind::Anthropic => Some(Box::new(client::MessagesStreamUsage::new())),
        ProviderKind::OpenAi | ProviderKind::Mock => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::providers::anthropic::{client, provider};

    /// A chat request through Anthropic's dialect and back means what it meant: roles,
    /// text, tools, tool calls and their results, sampling and limits.
    #[test]
    fn a_chat_request_survives_the_round_trip_through_messages() {
        let chat = json!({
            "model": "claude", "max_tokens": 300, "temperature": 0.3, "top_p": 0.9,
            "stop": ["END"], "user": "u-1", "stream": false,
            "tools": [{ "type": "function", "function": {
                "name": "get_weather", "description": "Weather",
                "parameters": { "type": "object", "properties": { "city": { "type": "string" } } },
            }}],
            "tool_choice": "auto",
            "messages": [
                { "role": "system", "content": "Be brief." },
                { "role": "user", "content": "Weather in Paris?" },
                { "role": "assistant", "content": null, "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": { "name": "get_weather", "arguments": "{\"city\":\"Paris\"}" },
                }]},
                { "role": "tool", "tool_call_id": "call_1", "content": "Sunny" },
            ],
        });
        let messages =
            provider::messages_request(chat.to_string().as_bytes(), "claude", 1024).unwrap();
        let back: Value =
            serde_json::from_slice(&client::chat_request(&messages).unwrap()).unwrap();
        assert_eq!(back["max_completion_tokens"], 300);
        assert_eq!(back["temperature"], 0.3);
        assert_eq!(back["top_p"], 0.9);
        assert_eq!(back["stop"], json!(["END"]));
        assert_eq!(back["user"], "u-1");
        assert_eq!(back["tool_choice"], "auto");
        assert_eq!(back["tools"][0]["function"]["name"], "get_weather");
        assert_eq!(
            back["tools"][0]["function"]["parameters"],
            chat["tools"][0]["function"]["parameters"]
        );
        let msgs = back["messages"].as_array().unwrap();
        assert_eq!(msgs[0], json!({ "role": "system", "content": "Be brief." }));
        assert_eq!(msgs[1]["role"], "user");
        assert!(msgs[1]["content"].to_string().contains("Weather in Paris?"));
        assert_eq!(msgs[2]["tool_calls"][0]["id"], "call_1");
        let args: Value = serde_json::from_str(
            msgs[2]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(args, json!({ "city": "Paris" }));
        assert_eq!(msgs[3]["role"], "tool");
        assert_eq!(msgs[3]["tool_call_id"], "call_1");
        assert!(msgs[3]["content"].to_string().contains("Sunny"));
    }

    /// A Messages answer through the hub and back keeps its text, tool call, stop reason and
    /// usage (cache reads included).
    #[test]
    fn a_messages_answer_survives_the_round_trip_through_the_hub() {
        let answer = json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": [
                { "type": "text", "text": "Let me check." },
                { "type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": { "city": "Paris" } },
            ],
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": { "input_tokens": 20, "output_tokens": 9, "cache_read_input_tokens": 100,
                       "cache_creation_input_tokens": 0 },
        });
        let (chat, usage) =
            provider::chat_completion(answer.to_string().as_bytes(), "claude", 1).unwrap();
        let usage = usage.unwrap();
        assert_eq!(usage.prompt_tokens, 120);
        assert_eq!(usage.cached_prompt_tokens, 100);
        let back: Value =
            serde_json::from_slice(&client::message_from_chat(&chat, "claude").unwrap()).unwrap();
        assert_eq!(back["stop_reason"], "tool_use");
        assert_eq!(
            back["content"][0],
            json!({ "type": "text", "text": "Let me check." })
        );
        assert_eq!(back["content"][1]["type"], "tool_use");
        assert_eq!(back["content"][1]["id"], "toolu_1");
        assert_eq!(back["content"][1]["input"], json!({ "city": "Paris" }));
        assert_eq!(back["usage"]["input_tokens"], 20);
        assert_eq!(back["usage"]["cache_read_input_tokens"], 100);
        assert_eq!(back["usage"]["output_tokens"], 9);
    }

    #[test]
    fn only_non_hub_providers_are_translated() {
        assert!(speaks_hub(ProviderKind::OpenAi) && speaks_hub(ProviderKind::Mock));
        assert!(!speaks_hub(ProviderKind::Anthropic));
        assert!(stream_to_hub(ProviderKind::OpenAi, "m", 0).is_none());
        assert!(stream_to_hub(ProviderKind::Anthropic, "m", 0).is_some());
        assert_eq!(
            ClientDialect::Messages.native_kind(),
            Some(ProviderKind::Anthropic)
        );
        assert!(ClientDialect::Chat.stream_from_hub("m").is_none());
        // An Anthropic error the hub client cannot know becomes one it does.
        let overloaded =
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        let hub = answer_to_hub(ProviderKind::Anthropic, 529, overloaded, "m", 0).unwrap();
        assert_eq!(hub.status, 503);
        let v: Value = serde_json::from_slice(&hub.body).unwrap();
        assert_eq!(v["error"]["message"], "Overloaded");
    }
}
