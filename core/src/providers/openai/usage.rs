//! Token usage as OpenAI reports it: in a completion's `usage`, in the usage chunk of a stream
//! (`stream_options.include_usage`), and the streamed text to estimate from when a stream ends
//! before its usage. OpenAI-compatible servers add, omit and misshape fields freely, so reading
//! is tolerant: a part the gateway cannot read is absent, and never hides the other parts.

use std::borrow::Cow;

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

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
    // Absent or null choices are none; a list of none is empty; anything else is not known.
    let no_choices = chunk.choices.as_ref().is_none_or(|c| c.listed == Some(0));
    Some(ChunkInfo {
        usage,
        usage_only: usage.is_some() && no_choices,
        text: chunk.choices.map(|c| c.text).unwrap_or_default(),
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
    choices: Option<Choices<'a>>,
}

/// A chunk's `choices`, read in one pass for their text (see `ChunkInfo::text`). A part shaped
/// otherwise than OpenAI shapes it (a choice, a delta, a tool call, a function, a text) is
/// skipped where it is, and the others are still read. (Read as a `Lenient` list, the choices
/// of every event would be scanned twice: as raw JSON, then again.)
struct Choices<'a> {
    /// How many choices the list has; None if `choices` is not a list.
    listed: Option<usize>,
    text: Cow<'a, str>,
}

impl<'de: 'a, 'a> Deserialize<'de> for Choices<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut text: Cow<'de, str> = Cow::Borrowed("");
        let listed = d.deserialize_any(EachVisitor(In("delta", DeltaText), &mut text))?;
        Ok(Choices { listed, text })
    }
}

/// Reads the text out of one JSON value, appending it to `text`; a value of another shape is
/// skipped.
trait ReadText: Copy {
    fn read<'de, D: Deserializer<'de>>(
        self,
        d: D,
        text: &mut Cow<'de, str>,
    ) -> Result<(), D::Error>;
}

/// Appends `piece` to the text (borrowing the first piece, as most chunks have one).
fn push<'a>(text: &mut Cow<'a, str>, piece: Cow<'a, str>) {
    if piece.is_empty() {
        // Nothing to add: the text stays borrowed.
    } else if text.is_empty() {
        *text = piece;
    } else {
        text.to_mut().push_str(&piece);
    }
}

/// A JSON string.
#[derive(Clone, Copy)]
struct Str;

impl ReadText for Str {
    fn read<'de, D: Deserializer<'de>>(
        self,
        d: D,
        text: &mut Cow<'de, str>,
    ) -> Result<(), D::Error> {
        d.deserialize_any(StrVisitor(text))
    }
}

/// Each element of a JSON list.
#[derive(Clone, Copy)]
struct Each<R>(R);

impl<R: ReadText> ReadText for Each<R> {
    fn read<'de, D: Deserializer<'de>>(
        self,
        d: D,
        text: &mut Cow<'de, str>,
    ) -> Result<(), D::Error> {
        d.deserialize_any(EachVisitor(self.0, text)).map(drop)
    }
}

/// The field of this name of a JSON object.
#[derive(Clone, Copy)]
struct In<R>(&'static str, R);

impl<R: ReadText> ReadText for In<R> {
    fn read<'de, D: Deserializer<'de>>(
        self,
        d: D,
        text: &mut Cow<'de, str>,
    ) -> Result<(), D::Error> {
        d.deserialize_any(InVisitor(self, text))
    }
}

/// A choice's `delta`: its content, refusal, reasoning (`reasoning_content`, else
/// `reasoning`), then its tool calls' arguments, in that order whatever the fields' order.
#[derive(Clone, Copy)]
struct DeltaText;

impl ReadText for DeltaText {
    fn read<'de, D: Deserializer<'de>>(
        self,
        d: D,
        text: &mut Cow<'de, str>,
    ) -> Result<(), D::Error> {
        d.deserialize_any(DeltaVisitor(text))
    }
}

/// `R` as serde's seed, appending to the text.
struct Seed<'t, 'a, R>(R, &'t mut Cow<'a, str>);

impl<'de, R: ReadText> DeserializeSeed<'de> for Seed<'_, 'de, R> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.0.read(d, self.1)
    }
}

/// Which of these names an object's key is, if any.
struct KeyIn<'n>(&'n [&'n str]);

impl<'de> DeserializeSeed<'de> for KeyIn<'_> {
    type Value = Option<usize>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIn<'_> {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E: de::Error>(self, key: &str) -> Result<Option<usize>, E> {
        Ok(self.0.iter().position(|name| *name == key))
    }
}

/// Visitor methods for values of shapes a reader skips, each giving `$value`: numbers,
/// booleans and null; strings; lists; objects (lists and objects read to their end).
macro_rules! skip_scalars {
    ($value:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($value)
        }
    };
}

macro_rules! skip_strings {
    ($value:expr) => {
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok($value)
        }
    };
}

macro_rules! skip_lists {
    ($value:expr) => {
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok($value)
        }
    };
}

macro_rules! skip_objects {
    ($value:expr) => {
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok($value)
        }
    };
}

/// A list where a list is read; any other value is skipped.
struct EachVisitor<'t, 'a, R>(R, &'t mut Cow<'a, str>);

impl<'de, R: ReadText> Visitor<'de> for EachVisitor<'_, 'de, R> {
    /// How many elements the list has; None if it is no list.
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut n = 0;
        while seq.next_element_seed(Seed(self.0, &mut *self.1))?.is_some() {
            n += 1;
        }
        Ok(Some(n))
    }
    skip_objects!(None);
    skip_strings!(None);
    skip_scalars!(None);
}

/// An object where an object is read; any other value is skipped.
struct InVisitor<'t, 'a, R>(In<R>, &'t mut Cow<'a, str>);

impl<'de, R: ReadText> Visitor<'de> for InVisitor<'_, 'de, R> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let In(name, inner) = self.0;
        let names = [name];
        while let Some(key) = map.next_key_seed(KeyIn(&names))? {
            match key {
                Some(_) => map.next_value_seed(Seed(inner, &mut *self.1))?,
                None => map.next_value::<IgnoredAny>().map(drop)?,
            }
        }
        Ok(())
    }
    skip_lists!(());
    skip_strings!(());
    skip_scalars!(());
}

/// A string where a string is read (borrowed where it has no escapes); any other value (a
/// list of content parts, say) is skipped.
struct StrVisitor<'t, 'a>(&'t mut Cow<'a, str>);

impl<'de> Visitor<'de> for StrVisitor<'_, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<(), E> {
        push(self.0, Cow::Borrowed(v));
        Ok(())
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        push(self.0, Cow::Owned(v.to_owned()));
        Ok(())
    }
    skip_lists!(());
    skip_objects!(());
    skip_scalars!(());
}

struct DeltaVisitor<'t, 'a>(&'t mut Cow<'a, str>);

impl<'de> Visitor<'de> for DeltaVisitor<'_, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a delta")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        const FIELDS: [&str; 5] = [
            "content",
            "refusal",
            "reasoning_content",
            "reasoning",
            "tool_calls",
        ];
        // The text of each field, by its place in `FIELDS`.
        let mut pieces: [Cow<'de, str>; 5] = Default::default();
        while let Some(key) = map.next_key_seed(KeyIn(&FIELDS))? {
            match (key, key.and_then(|i| pieces.get_mut(i))) {
                (Some(4), Some(arguments)) => map
                    .next_value_seed(Seed(Each(In("function", In("arguments", Str))), arguments))?,
                (_, Some(piece)) => map.next_value_seed(Seed(Str, piece))?,
                (_, None) => map.next_value::<IgnoredAny>().map(drop)?,
            }
        }
        let [content, refusal, reasoning_content, reasoning, arguments] = pieces;
        let reasoning = if reasoning_content.is_empty() {
            reasoning
        } else {
            reasoning_content
        };
        for piece in [content, refusal, reasoning, arguments] {
            push(self.0, piece);
        }
        Ok(())
    }
    skip_lists!(());
    skip_strings!(());
    skip_scalars!(());
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
    fn an_odd_choice_delta_tool_call_or_function_skips_only_itself() {
        let data = r#"{"choices":[7,{"delta":[1]},{"delta":{"content":"a"}},{"delta":{"tool_calls":{"0":1},
            "refusal":"b"}},{"delta":{"tool_calls":[null,{"function":"f"},{"function":{"arguments":{"x":1}}},
            {"function":{"arguments":"c"}}]}}],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
        let info = inspect_chunk(data).unwrap();
        assert_eq!(info.text, "abc");
        assert_eq!(info.usage, Some(usage(1, 2, 0)));
        assert!(!info.usage_only, "the choices are there, odd or not");
        // Keys are read decoded; numbers or nulls in place of text are no text.
        let data = r#"{"choices":[{"delta":{"cont\u0065nt":"d","refusal":5,"reasoning":null}}]}"#;
        assert_eq!(inspect_chunk(data).unwrap().text, "d");
        // Absent, null and empty choices beside a usage make the usage-only chunk.
        for choices in ["", r#""choices":null,"#, r#""choices":[],"#] {
            let data =
                format!(r#"{{{choices}"usage":{{"prompt_tokens":1,"completion_tokens":2}}}}"#);
            assert!(inspect_chunk(&data).unwrap().usage_only, "{data}");
        }
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
