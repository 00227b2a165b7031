//! Token usage as OpenAI reports it: in a completion's `usage`, in the usage chunk of a stream
//! (`stream_options.include_usage`), and the streamed text to estimate from when a stream ends
//! before its usage. OpenAI-compatible servers add, omit and misshape fields freely, so reading
//! is tolerant: a part the gateway cannot read is absent, and never hides the other parts.

use std::borrow::Cow;

use serde::de::IgnoredAny;
use serde::Deserialize;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Prompt tokens served from the provider's cache
    /// (`usage.prompt_tokens_details.cached_tokens`), a subset of `prompt_tokens`.
    pub cached_prompt_tokens: u64,
    /// Prompt tokens written to the provider's cache (Anthropic's
    /// `cache_creation_input_tokens`), a subset of `prompt_tokens`, priced apart.
    pub cache_write_tokens: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

/// Usage of a non-streamed chat completion body (the `usage` object), None if absent or
/// malformed. A usage without both token counts is malformed: billing it as zero would be
/// wrong, and the caller can estimate instead.
pub fn from_completion(body: &[u8]) -> Option<Usage> {
    #[derive(Deserialize)]
    struct Completion {
        usage: Option<Lenient<WireUsage>>,
    }
    let completion: Completion = serde_json::from_slice(body).ok()?;
    completion.usage?.known().map(Usage::from)
}

/// What one streamed chunk (the JSON in one SSE `data:`) tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkInfo<'a> {
    /// Its usage, if it carries a non-null, well-formed `usage` object.
    pub usage: Option<Usage>,
    /// Whether it is the chunk OpenAI adds for `stream_options.include_usage`: usage, and
    /// no choices (an empty, null or absent `choices`), so nothing else is lost by dropping it.
    pub usage_only: bool,
    /// The text it streams, for estimating a stream cut before its usage: each choice's
    /// `delta.content`, `delta.refusal`, reasoning (`delta.reasoning_content` or
    /// `delta.reasoning`, as DeepSeek, vLLM and OpenRouter send it) and tool call
    /// `function.arguments`, concatenated. Borrowed from `data` when it is one unescaped string.
    pub text: Cow<'a, str>,
}

/// Reads one streamed chunk; None if it is not a JSON object (e.g. `[DONE]`).
pub fn inspect_chunk(data: &str) -> Option<ChunkInfo<'_>> {
    let chunk: Chunk = serde_json::from_str(data).ok()?;
    let usage = chunk.usage.and_then(Lenient::known).map(Usage::from);
    let choices = chunk.choices.unwrap_or(Lenient::Known(Vec::new()));
    let usage_only = usage.is_some() && matches!(&choices, Lenient::Known(c) if c.is_empty());
    let mut text = Cow::Borrowed("");
    let deltas = choices
        .known()
        .into_iter()
        .flatten()
        .filter_map(|c| c.delta);
    for delta in deltas {
        let reasoning = delta.reasoning_content.or(delta.reasoning);
        let calls = delta.tool_calls.into_iter().flatten();
        let arguments = calls.filter_map(|c| c.function?.arguments);
        let pieces = [delta.content, delta.refusal, reasoning]
            .into_iter()
            .flatten();
        for piece in pieces.chain(arguments) {
            let Text::Str(piece) = piece else { continue };
            if text.is_empty() {
                text = piece;
            } else {
                text.to_mut().push_str(&piece);
            }
        }
    }
    Some(ChunkInfo {
        usage,
        usage_only,
        text,
    })
}

#[derive(Deserialize)]
struct WireUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
    prompt_tokens_details: Option<PromptTokensDetails>,
}

#[derive(Deserialize)]
struct PromptTokensDetails {
    cached_tokens: Option<u64>,
}

impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Self {
        let cached = u
            .prompt_tokens_details
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0);
        Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            // Clamped so that `prompt_tokens - cached_prompt_tokens` never underflows.
            cached_prompt_tokens: cached.min(u.prompt_tokens),
            cache_write_tokens: 0,
        }
    }
}

#[derive(Deserialize)]
struct Chunk<'a> {
    usage: Option<Lenient<WireUsage>>,
    #[serde(borrow)]
    choices: Option<Lenient<Vec<Choice<'a>>>>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(borrow)]
    delta: Option<Delta<'a>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(borrow)]
    content: Option<Text<'a>>,
    #[serde(borrow)]
    refusal: Option<Text<'a>>,
    #[serde(borrow)]
    reasoning_content: Option<Text<'a>>,
    #[serde(borrow)]
    reasoning: Option<Text<'a>>,
    #[serde(borrow)]
    tool_calls: Option<Vec<ToolCall<'a>>>,
}

#[derive(Deserialize)]
struct ToolCall<'a> {
    #[serde(borrow)]
    function: Option<Function<'a>>,
}

#[derive(Deserialize)]
struct Function<'a> {
    #[serde(borrow)]
    arguments: Option<Text<'a>>,
}

/// A part as the dialect shapes it, or whatever a provider sent in its place (then ignored).
enum Lenient<T> {
    Known(T),
    Other,
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Taken as its raw JSON, then read as `T`: an untagged enum would first copy the
        // whole value into serde's generic form (a chunk's `choices`, on every event).
        let raw = <&'de serde_json::value::RawValue>::deserialize(d)?;
        Ok(serde_json::from_str(raw.get()).map_or(Lenient::Other, Lenient::Known))
    }
}

impl<T> Lenient<T> {
    fn known(self) -> Option<T> {
        match self {
            Lenient::Known(t) => Some(t),
            Lenient::Other => None,
        }
    }
}

/// A string, or whatever a provider sent in its place (e.g. a list of content parts). Not a
/// `Lenient<Cow<str>>`: serde borrows a `Cow` only when it is the field's whole type.
#[derive(Deserialize)]
#[serde(untagged)]
enum Text<'a> {
    Str(#[serde(borrow)] Cow<'a, str>),
    Other(IgnoredAny),
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMPLETION: &str = r#"{"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion",
        "created":1741569952,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant",
        "content":"Hello! How can I assist you today?","refusal":null,"annotations":[]},"logprobs":null,
        "finish_reason":"stop"}],"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,
        "prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":
        {"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},
        "service_tier":"default","system_fingerprint":"fp_fc9f1d7035"}"#;

    fn usage(prompt: u64, completion: u64, cached: u64) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_prompt_tokens: cached,
            cache_write_tokens: 0,
        }
    }

    #[test]
    fn completion_usage() {
        let u = from_completion(COMPLETION.as_bytes()).unwrap();
        assert_eq!(u, usage(19, 10, 0));
        assert_eq!(u.total(), 29);
    }

    #[test]
    fn completion_usage_with_cached_prompt_tokens() {
        let body = br#"{"choices":[],"usage":{"prompt_tokens":2006,"completion_tokens":300,
            "total_tokens":2306,"prompt_tokens_details":{"cached_tokens":1920}}}"#;
        assert_eq!(from_completion(body), Some(usage(2006, 300, 1920)));
        // vLLM and others send null details; a cache larger than the prompt is clamped.
        let body =
            br#"{"usage":{"prompt_tokens":5,"completion_tokens":1,"prompt_tokens_details":null}}"#;
        assert_eq!(from_completion(body), Some(usage(5, 1, 0)));
        let body = br#"{"usage":{"prompt_tokens":5,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":9}}}"#;
        assert_eq!(from_completion(body), Some(usage(5, 1, 5)));
    }

    #[test]
    fn missing_or_malformed_completion_usage() {
        for body in [
            &br#"{"id":"x","choices":[]}"#[..],
            br#"{"usage":null}"#,
            br#"{"usage":{}}"#,
            br#"{"usage":{"prompt_tokens":5}}"#,
            br#"{"usage":{"prompt_tokens":"5","completion_tokens":1}}"#,
            br#"{"usage":{"prompt_tokens":-1,"completion_tokens":1}}"#,
            br#"{"usage":[1,2]}"#,
            b"[]",
            b"{\"usage\":",
            b"",
            b"\xFF",
        ] {
            assert_eq!(
                from_completion(body),
                None,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn content_chunk() {
        let data = r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",
            "system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,
            "finish_reason":null}],"usage":null}"#;
        let info = inspect_chunk(data).unwrap();
        assert_eq!(info.usage, None);
        assert!(!info.usage_only);
        assert!(matches!(info.text, Cow::Borrowed("Hello")));
        // Escapes make the text owned, and are decoded.
        let info = inspect_chunk(r#"{"choices":[{"delta":{"content":"a\nb \"c\""}}]}"#).unwrap();
        assert_eq!(info.text, "a\nb \"c\"");
    }

    #[test]
    fn role_and_finish_chunks_with_null_usage_carry_nothing() {
        for data in [
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"finish_reason":null}],"usage":null}"#,
            r#"{"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}"#,
            r#"{"choices":[{"index":0,"finish_reason":"stop"}]}"#,
            // Azure's content-filter chunk: no choices, but no usage either.
            r#"{"choices":[],"prompt_filter_results":[{"prompt_index":0,"content_filter_results":{}}]}"#,
        ] {
            let info = inspect_chunk(data).unwrap();
            assert_eq!(
                (info.usage, info.usage_only, info.text.as_ref()),
                (None, false, ""),
                "{data}"
            );
        }
    }

    #[test]
    fn usage_only_chunk() {
        let data = r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",
            "system_fingerprint":"fp_1","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":7,
            "total_tokens":19,"prompt_tokens_details":{"cached_tokens":4,"audio_tokens":0},
            "completion_tokens_details":{"reasoning_tokens":0}}}"#;
        let info = inspect_chunk(data).unwrap();
        assert_eq!(info.usage, Some(usage(12, 7, 4)));
        assert!(info.usage_only);
        assert_eq!(info.text, "");
    }

    #[test]
    fn usage_on_a_content_chunk_is_not_usage_only() {
        // Some compatible servers put usage on the last content chunk.
        let data = r#"{"choices":[{"delta":{"content":"!"},"finish_reason":"stop"}],
            "usage":{"prompt_tokens":3,"completion_tokens":2}}"#;
        let info = inspect_chunk(data).unwrap();
        assert_eq!(info.usage, Some(usage(3, 2, 0)));
        assert!(!info.usage_only);
        assert_eq!(info.text, "!");
    }

    #[test]
    fn tool_call_arguments_refusals_and_reasoning_are_text() {
        let first = r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,
            "id":"call_1","type":"function","function":{"name":"get_weather","arguments":""}}]}}],"usage":null}"#;
        assert_eq!(inspect_chunk(first).unwrap().text, "");
        let next = r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"loc"}},
            {"index":1,"function":{"arguments":"ation\":"}},{"index":2,"type":"function"}]}}]}"#;
        assert_eq!(inspect_chunk(next).unwrap().text, r#"{"location":"#);
        let refusal = r#"{"choices":[{"delta":{"content":null,"refusal":"I can't"}}]}"#;
        assert_eq!(inspect_chunk(refusal).unwrap().text, "I can't");
        let reasoning = r#"{"choices":[{"delta":{"reasoning_content":"hmm","reasoning":"hmm"}},
            {"delta":{"reasoning":" so","content":" yes"}}]}"#;
        assert_eq!(inspect_chunk(reasoning).unwrap().text, "hmm yes so");
    }

    #[test]
    fn done_and_malformed_chunks_are_none() {
        for data in ["[DONE]", "", "{", r#"{"choices":[}"#, "42", "null"] {
            assert!(inspect_chunk(data).is_none(), "{data}");
        }
    }

    #[test]
    fn odd_parts_do_not_hide_the_others() {
        // Content as a list of parts, as some servers stream it: skipped, the rest still read.
        let data = r#"{"choices":[{"delta":{"content":[{"type":"text","text":"x"}],"refusal":"no"}}],
            "usage":{"prompt_tokens":1,"completion_tokens":1}}"#;
        let info = inspect_chunk(data).unwrap();
        assert_eq!(
            (info.usage, info.text.as_ref()),
            (Some(usage(1, 1, 0)), "no")
        );
        // Unreadable choices keep the usage but are not known to be empty.
        let data = r#"{"choices":{"0":1},"usage":{"prompt_tokens":1,"completion_tokens":1}}"#;
        let info = inspect_chunk(data).unwrap();
        assert_eq!((info.usage, info.usage_only), (Some(usage(1, 1, 0)), false));
        // Unreadable usage keeps the text.
        let data = r#"{"choices":[{"delta":{"content":"y"}}],"usage":{"prompt_tokens":1.5}}"#;
        let info = inspect_chunk(data).unwrap();
        assert_eq!((info.usage, info.text.as_ref()), (None, "y"));
    }

    #[test]
    fn a_whole_stream_through_the_sse_parser() {
        let stream = concat!(
            "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":null}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}],\"usage\":null}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}],\"usage\":null}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":8,\"completion_tokens\":2}}\n\n",
            "data: [DONE]\n\n",
        );
        let mut parser = crate::sse::SseParser::new();
        let (mut text, mut usage_seen, mut done) = (String::new(), None, false);
        for chunk in stream.as_bytes().chunks(7) {
            parser.feed(chunk, |event| match inspect_chunk(&event.data) {
                Some(info) => {
                    text.push_str(&info.text);
                    usage_seen = usage_seen.or(info.usage.filter(|_| info.usage_only));
                }
                None => done = event.data == "[DONE]",
            });
        }
        assert!(parser.finish(|_| {}).is_empty());
        assert_eq!(
            (text.as_str(), usage_seen, done),
            ("Hello", Some(usage(8, 2, 0)), true)
        );
    }
}
