//! Anthropic clients (the `anthropic` SDKs calling the gateway's `POST /v1/messages`). Two
//! uses. Pass-through to an Anthropic provider: the gateway reads the request (model, stream,
//! `max_tokens`, a token estimate, the texts for guard rules) and the answer's usage (JSON and
//! SSE) and changes nothing but the model name. Translation for every other model: the
//! request becomes a chat completions request (the hub shape), and the chat answer, whole or
//! streamed, becomes a Messages answer. Errors take Anthropic's shape either way.
//!
//! Pure functions over bytes; no IO. Anthropic's own wire types (as a provider, for OpenAI
//! clients) live in `provider`; this module must not grow a dependency on them.
//!
//! What a translation cannot carry is refused (an `Err` naming the parameter, for a 400), not
//! dropped: `top_k`, extended `thinking`, server tools, PDF documents, file sources.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::providers::openai::usage::{self, Usage};
use crate::sse::SseParser;
use crate::tokens;

/// Tokens reserved per image: Anthropic prices an image at width × height / 750 tokens and
/// scales larger ones down to about 1.15 megapixels, so no image costs much more than this.
pub const IMAGE_TOKENS: u64 = 1600;

/// Tokens reserved per non-text document (a PDF): one page's text and image, at the high end
/// of Anthropic's 1,500–3,000 a page. Low for long PDFs; the provider's usage settles it.
pub const DOCUMENT_TOKENS: u64 = 3000;

/// Largest single event a translated stream holds while waiting for its end: beyond it the
/// provider is not sending a chat completions stream, and the stream fails.
pub const MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// The request
// ---------------------------------------------------------------------------------------------

/// What the gateway reads of a Messages request. Strings borrow from the body unless escaped.
/// Block types it does not know are kept (pass-through forwards them untouched); only the
/// translation refuses them.
#[derive(Debug, Deserialize)]
pub struct MessagesRequest<'a> {
    #[serde(borrow)]
    model: Cow<'a, str>,
    #[serde(borrow)]
    messages: Vec<Message<'a>>,
    max_tokens: u64,
    stream: Option<bool>,
    #[serde(borrow)]
    system: Option<Contents<'a>>,
    /// Kept raw: counted and searched as text, parsed only to translate.
    #[serde(borrow)]
    tools: Option<&'a RawValue>,
    #[serde(borrow)]
    tool_choice: Option<ToolChoice<'a>>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<u64>,
    #[serde(borrow)]
    stop_sequences: Option<Vec<Cow<'a, str>>>,
    #[serde(borrow)]
    metadata: Option<Metadata<'a>>,
    #[serde(borrow)]
    thinking: Option<Thinking<'a>>,
}

#[derive(Debug, Deserialize)]
struct Message<'a> {
    #[serde(borrow)]
    role: Cow<'a, str>,
    #[serde(borrow)]
    content: Contents<'a>,
}

/// A content block, of any type: the fields of the types the gateway reads, all optional, so
/// that a new block type never makes a valid request malformed.
#[derive(Debug, Deserialize)]
struct Block<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    text: Option<Cow<'a, str>>,
    /// `image` and `document` blocks: where the bytes are (base64, url, file, text).
    #[serde(borrow)]
    source: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    name: Option<Cow<'a, str>>,
    /// `tool_use`: the arguments, a JSON object.
    #[serde(borrow)]
    input: Option<&'a RawValue>,
    #[serde(borrow)]
    tool_use_id: Option<Cow<'a, str>>,
    /// `tool_result`: a string or blocks.
    #[serde(borrow)]
    content: Option<Contents<'a>>,
    is_error: Option<bool>,
    #[serde(borrow)]
    thinking: Option<Cow<'a, str>>,
}

/// Content as Anthropic allows it: a string, or a list of blocks. `Other` is anything else
/// (the object a `web_search_tool_result` error carries), kept so such blocks parse; a
/// message's or the system's content is checked not to be `Other`. Deserialized by hand: an
/// untagged enum would buffer the blocks and lose their borrowed `RawValue`s.
#[derive(Debug)]
enum Contents<'a> {
    Text(Cow<'a, str>),
    Blocks(Vec<Block<'a>>),
    Other,
}

impl<'de: 'a, 'a> Deserialize<'de> for Contents<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ContentsVisitor<'a>(PhantomData<&'a ()>);

        impl<'de: 'a, 'a> Visitor<'de> for ContentsVisitor<'a> {
            type Value = Contents<'a>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or an array of content blocks")
            }

            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
                Ok(Contents::Text(Cow::Borrowed(s)))
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Ok(Contents::Text(Cow::Owned(s.to_owned())))
            }

            fn visit_string<E: de::Error>(self, s: String) -> Result<Self::Value, E> {
                Ok(Contents::Text(Cow::Owned(s)))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut blocks = Vec::new();
                while let Some(block) = seq.next_element()? {
                    blocks.push(block);
                }
                Ok(Contents::Blocks(blocks))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Contents::Other)
            }

            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Contents::Other)
            }

            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Contents::Other)
            }

            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Contents::Other)
            }

            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Contents::Other)
            }

            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Contents::Other)
            }
        }

        deserializer.deserialize_any(ContentsVisitor(PhantomData))
    }
}

#[derive(Debug, Deserialize)]
struct ToolChoice<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    name: Option<Cow<'a, str>>,
    disable_parallel_tool_use: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct Metadata<'a> {
    #[serde(borrow)]
    user_id: Option<Cow<'a, str>>,
}

#[derive(Debug, Deserialize)]
struct Thinking<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
}

/// An `image` or `document` block's `source`.
#[derive(Debug, Deserialize)]
struct Source<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    media_type: Option<Cow<'a, str>>,
    #[serde(borrow)]
    data: Option<Cow<'a, str>>,
    #[serde(borrow)]
    url: Option<Cow<'a, str>>,
}

impl Block<'_> {
    fn source(&self) -> Option<Source<'_>> {
        serde_json::from_str(self.source?.get()).ok()
    }

    /// The text of a `document` whose source is plain text.
    fn document_text(&self) -> Option<Cow<'_, str>> {
        let source = self.source()?;
        (source.kind == "text").then_some(source.data?)
    }

    fn estimate(&self) -> u64 {
        let mut n: u64 = [&self.text, &self.thinking, &self.name]
            .into_iter()
            .flatten()
            .map(|t| tokens::estimate_text(t))
            .sum();
        n += self.input.map_or(0, |i| tokens::estimate_text(i.get()));
        n += self.content.as_ref().map_or(0, Contents::estimate);
        n + match self.kind.as_ref() {
            "image" => IMAGE_TOKENS,
            "document" => self
                .document_text()
                .map_or(DOCUMENT_TOKENS, |t| tokens::estimate_text(&t)),
            _ => 0,
        }
    }
}

impl Contents<'_> {
    fn estimate(&self) -> u64 {
        match self {
            Contents::Text(t) => tokens::estimate_text(t),
            Contents::Blocks(blocks) => blocks.iter().map(Block::estimate).sum(),
            Contents::Other => 0,
        }
    }

    /// The texts of this content for guard rules: its text blocks joined with nothing between
    /// (a word split across blocks is still seen whole), then, block by block, what else the
    /// model reads: thinking, tool calls' names and input JSON, tool results, text documents.
    fn guarded_texts<'s>(&'s self, out: &mut Vec<Cow<'s, str>>) {
        let blocks = match self {
            Contents::Text(t) => return out.push(Cow::Borrowed(t.as_ref())),
            Contents::Blocks(blocks) => blocks,
            Contents::Other => return,
        };
        let mut texts = blocks
            .iter()
            .filter(|b| b.kind == "text")
            .filter_map(|b| b.text.as_deref());
        if let Some(first) = texts.next() {
            match texts.next() {
                None => out.push(Cow::Borrowed(first)),
                Some(second) => {
                    let mut joined = format!("{first}{second}");
                    texts.for_each(|t| joined.push_str(t));
                    out.push(Cow::Owned(joined));
                }
            }
        }
        for b in blocks {
            if b.kind != "text" {
                out.extend(b.text.as_deref().map(Cow::Borrowed));
            }
            out.extend(b.thinking.as_deref().map(Cow::Borrowed));
            out.extend(b.name.as_deref().map(Cow::Borrowed));
            out.extend(b.input.map(|i| Cow::Borrowed(i.get())));
            if let Some(content) = &b.content {
                content.guarded_texts(out);
            }
            if b.kind == "document" {
                out.extend(b.document_text().map(|t| Cow::Owned(t.into_owned())));
            }
        }
    }
}

/// Parses and checks a Messages request body; the error says what is wrong, for a 400.
pub fn parse_messages_request(body: &[u8]) -> Result<MessagesRequest<'_>, String> {
    let mut json = serde_json::Deserializer::from_slice(body);
    let req: MessagesRequest = serde_path_to_error::deserialize(&mut json).map_err(|e| {
        let path = e.path().to_string();
        describe(e.inner(), (path != ".").then_some(path))
    })?;
    json.end().map_err(|e| describe(&e, None))?;
    if req.model.is_empty() {
        return Err("`model` must not be empty".into());
    }
    if req.messages.is_empty() {
        return Err("`messages` must contain at least one message".into());
    }
    for (i, m) in req.messages.iter().enumerate() {
        if m.role != "user" && m.role != "assistant" {
            return Err(format!(
                "`messages[{i}].role` must be `user` or `assistant`, not `{}`",
                m.role
            ));
        }
        if matches!(m.content, Contents::Other) {
            return Err(format!(
                "`messages[{i}].content` must be a string or an array of content blocks"
            ));
        }
    }
    if matches!(req.system, Some(Contents::Other)) {
        return Err("`system` must be a string or an array of text blocks".into());
    }
    Ok(req)
}

fn describe(e: &serde_json::Error, path: Option<String>) -> String {
    use serde_json::error::Category;
    let at = path.map(|p| format!("`{p}`: ")).unwrap_or_default();
    match e.classify() {
        Category::Syntax | Category::Eof => format!("the body is not valid JSON ({e})"),
        Category::Data => format!("the body is not a valid Messages request ({at}{e})"),
        Category::Io => e.to_string(),
    }
}

impl MessagesRequest<'_> {
    pub fn model(&self) -> &str {
        &self.model
    }

    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// The most output tokens the client allows (required by the Messages API).
    pub fn max_tokens(&self) -> u64 {
        self.max_tokens
    }

    /// Estimated prompt tokens, as `ChatRequest::estimate_prompt_tokens` counts them: the
    /// system prompt and each message with OpenAI's per-message framing (a margin here),
    /// every text, tool input and tool result, images and documents at a fixed price, and
    /// the tool definitions as JSON text.
    pub fn estimate_prompt_tokens(&self) -> u64 {
        let system = self
            .system
            .as_ref()
            .map_or(0, |s| tokens::PER_MESSAGE_OVERHEAD + s.estimate());
        let messages: u64 = self
            .messages
            .iter()
            .map(|m| tokens::PER_MESSAGE_OVERHEAD + m.content.estimate())
            .sum();
        let tools = self.tools.map_or(0, |t| tokens::estimate_text(t.get()));
        tokens::PER_REQUEST_OVERHEAD + system + messages + tools
    }

    /// Every piece of text the model sees, for guard rules: the system prompt, each message's
    /// text (its text blocks joined), thinking, tool calls (name and input as JSON), tool
    /// results, text documents, and the strings of the tool definitions.
    pub fn guarded_texts(&self) -> Vec<Cow<'_, str>> {
        let mut out = Vec::new();
        if let Some(system) = &self.system {
            system.guarded_texts(&mut out);
        }
        for m in &self.messages {
            m.content.guarded_texts(&mut out);
        }
        string_leaves(self.tools, &mut out);
        out
    }
}

/// Every string inside a raw JSON value (tool definitions: names, descriptions, schemas).
fn string_leaves<'a>(raw: Option<&RawValue>, out: &mut Vec<Cow<'a, str>>) {
    fn walk<'a>(v: serde_json::Value, out: &mut Vec<Cow<'a, str>>) {
        match v {
            serde_json::Value::String(s) => out.push(Cow::Owned(s)),
            serde_json::Value::Array(items) => items.into_iter().for_each(|i| walk(i, out)),
            serde_json::Value::Object(map) => map.into_iter().for_each(|(_, i)| walk(i, out)),
            _ => {}
        }
    }
    if let Some(v) = raw.and_then(|r| serde_json::from_str(r.get()).ok()) {
        walk(v, out);
    }
}

/// Replaces the `model` field's value, keeping every other byte of the body as sent: the
/// value is spliced where it lies, so nothing else is re-serialized (numbers, key order,
/// unknown fields and whitespace are untouched).
pub fn rename_model(body: &[u8], upstream_model: &str) -> Result<Vec<u8>, String> {
    #[derive(Deserialize)]
    struct ModelField<'a> {
        #[serde(borrow)]
        model: &'a RawValue,
    }
    // A derived struct also reads a JSON array; only an object is a request.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err("the body is not a JSON object".into());
    }
    let field: ModelField = serde_json::from_slice(body).map_err(|e| describe(&e, None))?;
    let raw = field.model.get();
    if !raw.starts_with('"') {
        return Err("`model` must be a string".into());
    }
    // The raw value borrows from `body`: its address says where it lies.
    let start = (raw.as_ptr() as usize)
        .checked_sub(body.as_ptr() as usize)
        .ok_or("`model` is not in the body")?;
    let head = body.get(..start).ok_or("`model` is not in the body")?;
    let tail = body
        .get(start + raw.len()..)
        .ok_or("`model` is not in the body")?;
    let mut out = Vec::with_capacity(body.len() + upstream_model.len());
    out.extend_from_slice(head);
    serde_json::to_writer(&mut out, upstream_model).map_err(|e| e.to_string())?;
    out.extend_from_slice(tail);
    Ok(out)
}

/// Adds the gateway's decorator messages (`{"role","content"}` with text content, as
/// `decorators` keeps them) to a Messages request: `system` ones to the top-level `system`
/// (before or after its own blocks), `user`/`assistant` ones as text blocks of the first or
/// last turn when its role is theirs, else as a turn of their own — so roles still alternate
/// as the API requires. Everything else in the body keeps its meaning (key order is kept).
pub fn decorate(body: &[u8], prepend: &[&Value], append: &[&Value]) -> Result<Vec<u8>, String> {
    let mut request: Value = serde_json::from_slice(body).map_err(|e| describe(&e, None))?;
    let object = request
        .as_object_mut()
        .ok_or("the body is not a JSON object")?;
    let text_block =
        |d: &Value| json!({ "type": "text", "text": d["content"].as_str().unwrap_or("") });
    let role = |d: &Value| d["role"].as_str().unwrap_or("user").to_string();
    let system_blocks = |decorators: &[&Value]| -> Vec<Value> {
        decorators
            .iter()
            .filter(|d| is_system(d))
            .map(|d| text_block(d))
            .collect()
    };
    let (before, after) = (system_blocks(prepend), system_blocks(append));
    if !before.is_empty() || !after.is_empty() {
        // Edited where it stands: removing and inserting would move keys around.
        let slot = object.entry("system").or_insert(Value::Null);
        let own = match slot.take() {
            Value::Null => Vec::new(),
            Value::String(text) => vec![json!({ "type": "text", "text": text })],
            Value::Array(blocks) => blocks,
            _ => return Err("`system` must be a string or an array of blocks".into()),
        };
        *slot = Value::Array(before.into_iter().chain(own).chain(after).collect());
    }
    let messages = object
        .get_mut("messages")
        .and_then(Value::as_array_mut)
        .ok_or("`messages` must be an array")?;
    for d in prepend.iter().rev().filter(|d| !is_system(d)) {
        let role = role(d);
        match messages.first_mut() {
            Some(first) if first["role"].as_str() == Some(role.as_str()) => {
                blocks_of(first)
                    .ok_or("a turn's `content` must be a string or blocks")?
                    .insert(0, text_block(d));
            }
            _ => messages.insert(0, json!({ "role": role, "content": [text_block(d)] })),
        }
    }
    for d in append.iter().filter(|d| !is_system(d)) {
        let role = role(d);
        match messages.last_mut() {
            Some(last) if last["role"].as_str() == Some(role.as_str()) => {
                blocks_of(last)
                    .ok_or("a turn's `content` must be a string or blocks")?
                    .push(text_block(d));
            }
            _ => messages.push(json!({ "role": role, "content": [text_block(d)] })),
        }
    }
    serde_json::to_vec(&request).map_err(|e| e.to_string())
}

/// A turn's content blocks, a string content turned into one text block first.
fn blocks_of(turn: &mut Value) -> Option<&mut Vec<Value>> {
    if let Some(text) = turn["content"].as_str() {
        turn["content"] = json!([{ "type": "text", "text": text }]);
    }
    turn["content"].as_array_mut()
}

fn is_system(d: &Value) -> bool {
    matches!(d["role"].as_str(), Some("system" | "developer"))
}

// ---------------------------------------------------------------------------------------------
// Pass-through: usage of Anthropic's answers
// ---------------------------------------------------------------------------------------------

/// Anthropic's `usage`: every field optional, as `message_delta` carries only some.
#[derive(Debug, Default, Deserialize)]
struct WireUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
}

/// Anthropic counts cache reads and writes apart from `input_tokens`; the gateway's prompt
/// tokens are all three, with the cached and written parts as its subsets.
fn anthropic_usage(input: u64, cache_read: u64, cache_write: u64, output: u64) -> Usage {
    Usage {
        prompt_tokens: input.saturating_add(cache_read).saturating_add(cache_write),
        completion_tokens: output,
        cached_prompt_tokens: cache_read,
        cache_write_tokens: cache_write,
    }
}

/// Usage of a Messages response body; None if absent or without both token counts.
pub fn usage_of_message(body: &[u8]) -> Option<Usage> {
    #[derive(Deserialize)]
    struct MessageBody {
        usage: Option<WireUsage>,
    }
    let u = serde_json::from_slice::<MessageBody>(body).ok()?.usage?;
    Some(anthropic_usage(
        u.input_tokens?,
        u.cache_read_input_tokens.unwrap_or(0),
        u.cache_creation_input_tokens.unwrap_or(0),
        u.output_tokens?,
    ))
}

/// What a pass-through Messages stream has told of its usage so far. `message_start` carries
/// the input side (and an output count that has barely begun); `message_delta` the final,
/// cumulative output count (and, from newer API versions, the input side again, which then
/// wins). Feed it each event's `data`, in order.
#[derive(Debug, Default)]
pub struct MessagesStreamUsage {
    input: Option<u64>,
    cache_read: u64,
    cache_write: u64,
    /// Set by `message_delta` only: the count in `message_start` is not the answer's.
    output: Option<u64>,
    streamed_tokens: u64,
}

#[derive(Deserialize)]
struct StreamEvent<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    message: Option<StartedMessage>,
    usage: Option<WireUsage>,
    #[serde(borrow)]
    delta: Option<StreamDelta<'a>>,
}

#[derive(Deserialize)]
struct StartedMessage {
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct StreamDelta<'a> {
    #[serde(borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow)]
    partial_json: Option<Cow<'a, str>>,
    #[serde(borrow)]
    thinking: Option<Cow<'a, str>>,
}

impl MessagesStreamUsage {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads one event's data; events it cannot read are skipped.
    pub fn observe(&mut self, data: &str) {
        let Ok(event) = serde_json::from_str::<StreamEvent>(data) else {
            return;
        };
        match event.kind.as_ref() {
            "message_start" => {
                if let Some(u) = event.message.and_then(|m| m.usage) {
                    self.take_input_side(&u);
                }
            }
            "message_delta" => {
                if let Some(u) = event.usage {
                    self.take_input_side(&u);
                    self.output = u.output_tokens.or(self.output);
                }
            }
            "content_block_delta" => {
                if let Some(d) = event.delta {
                    let text = [d.text, d.partial_json, d.thinking];
                    let n: u64 = text
                        .iter()
                        .flatten()
                        .map(|t| tokens::estimate_text(t))
                        .sum();
                    self.streamed_tokens = self.streamed_tokens.saturating_add(n);
                }
            }
            _ => {}
        }
    }

    fn take_input_side(&mut self, u: &WireUsage) {
        self.input = u.input_tokens.or(self.input);
        self.cache_read = u.cache_read_input_tokens.unwrap_or(self.cache_read);
        self.cache_write = u.cache_creation_input_tokens.unwrap_or(self.cache_write);
    }

    /// The stream's usage once `message_delta` has given the final output count; None before
    /// (a stream cut earlier is charged by estimate: its prompt estimate and
    /// `streamed_text_tokens`).
    pub fn usage(&self) -> Option<Usage> {
        Some(anthropic_usage(
            self.input?,
            self.cache_read,
            self.cache_write,
            self.output?,
        ))
    }

    /// Estimated tokens of the text, tool input and thinking streamed so far.
    pub fn streamed_text_tokens(&self) -> u64 {
        self.streamed_tokens
    }
}

// ---------------------------------------------------------------------------------------------
// Translation: Messages request → chat completions request
// ---------------------------------------------------------------------------------------------

#[derive(Serialize)]
struct ChatBody<'a> {
    model: &'a str,
    messages: Vec<ChatMessage<'a>>,
    /// OpenAI's current name for the limit: its reasoning models refuse `max_tokens`, and
    /// the others take both.
    max_completion_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop: Option<&'a [Cow<'a, str>]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<ChatStreamOptions>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<ChatTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<ChatToolChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parallel_tool_calls: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
}

#[derive(Serialize)]
struct ChatStreamOptions {
    include_usage: bool,
}

#[derive(Serialize)]
struct ChatMessage<'a> {
    role: &'static str,
    /// Null only for an assistant turn that is all tool calls, as OpenAI sends it.
    content: Option<ChatContent<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<ChatToolCall<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<&'a str>,
}

impl<'a> ChatMessage<'a> {
    fn new(role: &'static str, content: ChatContent<'a>) -> Self {
        ChatMessage {
            role,
            content: Some(content),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

#[derive(Serialize)]
#[serde(untagged)]
enum ChatContent<'a> {
    Text(Cow<'a, str>),
    Parts(Vec<ChatPart<'a>>),
}

impl<'a> ChatContent<'a> {
    /// A single text part is sent as a plain string, the shape every compatible server reads.
    fn from_parts(mut parts: Vec<ChatPart<'a>>) -> Self {
        match parts.pop() {
            Some(ChatPart::Text { text }) if parts.is_empty() => ChatContent::Text(text),
            None => ChatContent::Text(Cow::Borrowed("")),
            Some(last) => {
                parts.push(last);
                ChatContent::Parts(parts)
            }
        }
    }
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ChatPart<'a> {
    Text { text: Cow<'a, str> },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Serialize)]
struct ImageUrl {
    url: String,
}

#[derive(Serialize)]
struct ChatToolCall<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: ChatFunctionCall<'a>,
}

#[derive(Serialize)]
struct ChatFunctionCall<'a> {
    name: &'a str,
    /// The input object's JSON text, as sent.
    arguments: &'a str,
}

#[derive(Serialize)]
struct ChatTool<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: ChatFunction<'a>,
}

#[derive(Serialize)]
struct ChatFunction<'a> {
    name: Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    strict: Option<bool>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum ChatToolChoice<'a> {
    Mode(&'static str),
    Named {
        #[serde(rename = "type")]
        kind: &'static str,
        function: NamedFunction<'a>,
    },
}

#[derive(Serialize)]
struct NamedFunction<'a> {
    name: &'a str,
}

/// An Anthropic tool definition: a client tool (`custom`, or no type) or a server tool.
#[derive(Deserialize)]
struct Tool<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(borrow)]
    description: Option<Cow<'a, str>>,
    #[serde(borrow)]
    input_schema: Option<&'a RawValue>,
    strict: Option<bool>,
}

/// The error for a parameter the chat completions API has no way to carry.
fn unsupported(param: &str, why: &str) -> String {
    format!("`{param}` is not supported by this model's provider: {why}")
}

/// Translates a Messages request body into a chat completions request body for the same
/// (public) model name; the exchange maps the model. Streaming requests ask for the usage
/// chunk. The error names what cannot be translated or is malformed, for a 400.
pub fn chat_request(body: &[u8]) -> Result<Vec<u8>, String> {
    let req = parse_messages_request(body)?;
    if req.top_k.is_some() {
        return Err(unsupported(
            "top_k",
            "chat completions have no top-k sampling",
        ));
    }
    if req.thinking.as_ref().is_some_and(|t| t.kind != "disabled") {
        return Err(unsupported(
            "thinking",
            "extended thinking is Anthropic's own",
        ));
    }
    let mut messages = Vec::with_capacity(req.messages.len() + 1);
    if let Some(system) = &req.system {
        messages.push(ChatMessage::new("system", system_content(system)?));
    }
    for (i, m) in req.messages.iter().enumerate() {
        match m.role.as_ref() {
            "user" => user_messages(i, &m.content, &mut messages)?,
            _ => messages.push(assistant_message(i, &m.content)?),
        }
    }
    let tools = match req.tools {
        Some(raw) => chat_tools(raw)?,
        None => Vec::new(),
    };
    let (tool_choice, parallel_tool_calls) = match (&req.tool_choice, tools.is_empty()) {
        // Without tools OpenAI refuses a `tool_choice`; Anthropic's means nothing then.
        (Some(choice), false) => chat_tool_choice(choice)?,
        _ => (None, None),
    };
    let chat = ChatBody {
        model: &req.model,
        messages,
        max_completion_tokens: req.max_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        stop: req.stop_sequences.as_deref(),
        stream: req.stream,
        stream_options: req.is_stream().then_some(ChatStreamOptions {
            include_usage: true,
        }),
        tools,
        tool_choice,
        parallel_tool_calls,
        user: req.metadata.as_ref().and_then(|m| m.user_id.as_deref()),
    };
    serde_json::to_vec(&chat).map_err(|e| e.to_string())
}

fn system_content<'a>(system: &'a Contents<'a>) -> Result<ChatContent<'a>, String> {
    let blocks = match system {
        Contents::Text(t) => return Ok(ChatContent::Text(Cow::Borrowed(t))),
        Contents::Blocks(blocks) => blocks,
        Contents::Other => return Err("`system` must be a string or text blocks".into()),
    };
    let mut parts = Vec::with_capacity(blocks.len());
    for (j, b) in blocks.iter().enumerate() {
        match (b.kind.as_ref(), &b.text) {
            ("text", Some(text)) => parts.push(ChatPart::Text {
                text: Cow::Borrowed(text),
            }),
            _ => return Err(format!("`system[{j}]` must be a text block")),
        }
    }
    Ok(ChatContent::from_parts(parts))
}

/// A user turn: each `tool_result` becomes a `tool` message, in order, and the turn's other
/// blocks one user message after them (OpenAI wants tool answers right after the calls).
fn user_messages<'a>(
    i: usize,
    content: &'a Contents<'a>,
    out: &mut Vec<ChatMessage<'a>>,
) -> Result<(), String> {
    let blocks = match content {
        Contents::Text(t) => {
            out.push(ChatMessage::new(
                "user",
                ChatContent::Text(Cow::Borrowed(t)),
            ));
            return Ok(());
        }
        Contents::Blocks(blocks) => blocks,
        Contents::Other => return Ok(()),
    };
    let mut parts = Vec::new();
    let mut tool_answers = 0;
    for (j, b) in blocks.iter().enumerate() {
        let at = || format!("messages[{i}].content[{j}]");
        match b.kind.as_ref() {
            "text" => parts.push(text_part(b, &at)?),
            "image" => parts.push(image_part(b, &at)?),
            "document" => match b.document_text() {
                Some(text) => parts.push(ChatPart::Text { text }),
                None => {
                    return Err(unsupported(
                        &at(),
                        "only documents with a text source can be sent to this model",
                    ))
                }
            },
            "tool_result" => {
                out.push(tool_message(b, &at, &mut parts)?);
                tool_answers += 1;
            }
            // Earlier thinking is Anthropic's own (signed); another model cannot use it.
            "thinking" | "redacted_thinking" => {}
            other => return Err(unsupported(&at(), &format!("`{other}` blocks"))),
        }
    }
    // Images of tool results are in `parts` too: OpenAI's tool messages take only text.
    if !parts.is_empty() || tool_answers == 0 {
        out.push(ChatMessage::new("user", ChatContent::from_parts(parts)));
    }
    Ok(())
}

/// A `tool_result` block as a `tool` message. Its text blocks are joined by newlines; its
/// images go to `images`, for the user message that follows. OpenAI has no error flag: an
/// error result is prefixed with "Error: ", which is how the model learns the call failed.
fn tool_message<'a>(
    b: &'a Block<'a>,
    at: &dyn Fn() -> String,
    images: &mut Vec<ChatPart<'a>>,
) -> Result<ChatMessage<'a>, String> {
    let id = b
        .tool_use_id
        .as_deref()
        .ok_or_else(|| format!("`{}.tool_use_id` is missing", at()))?;
    let mut text: Cow<'a, str> = match &b.content {
        Some(Contents::Text(t)) => Cow::Borrowed(t),
        Some(Contents::Blocks(blocks)) => {
            let mut texts = Vec::with_capacity(blocks.len());
            for (k, inner) in blocks.iter().enumerate() {
                let at = || format!("{}.content[{k}]", at());
                match inner.kind.as_ref() {
                    "text" => texts.push(inner.text.as_deref().unwrap_or_default()),
                    "image" => images.push(image_part(inner, &at)?),
                    other => return Err(unsupported(&at(), &format!("`{other}` blocks"))),
                }
            }
            match texts.as_slice() {
                [one] => Cow::Borrowed(*one),
                _ => Cow::Owned(texts.join("\n")),
            }
        }
        Some(Contents::Other) | None => Cow::Borrowed(""),
    };
    if b.is_error == Some(true) {
        text = Cow::Owned(format!("Error: {text}"));
    }
    Ok(ChatMessage {
        role: "tool",
        content: Some(ChatContent::Text(text)),
        tool_calls: Vec::new(),
        tool_call_id: Some(id),
    })
}

fn text_part<'a>(b: &'a Block<'a>, at: &dyn Fn() -> String) -> Result<ChatPart<'a>, String> {
    let text = b
        .text
        .as_deref()
        .ok_or_else(|| format!("`{}.text` is missing", at()))?;
    Ok(ChatPart::Text {
        text: Cow::Borrowed(text),
    })
}

/// An image as OpenAI takes it: a URL, or the base64 bytes as a data URL.
fn image_part<'a>(b: &Block<'_>, at: &dyn Fn() -> String) -> Result<ChatPart<'a>, String> {
    let source = b
        .source()
        .ok_or_else(|| format!("`{}.source` is missing or malformed", at()))?;
    let url = match (
        source.kind.as_ref(),
        source.media_type,
        source.data,
        source.url,
    ) {
        ("base64", Some(media_type), Some(data), _) => format!("data:{media_type};base64,{data}"),
        ("url", _, _, Some(url)) => url.into_owned(),
        (kind, ..) => {
            return Err(unsupported(
                &format!("{}.source", at()),
                &format!("images from a `{kind}` source"),
            ))
        }
    };
    Ok(ChatPart::ImageUrl {
        image_url: ImageUrl { url },
    })
}

/// An assistant turn: its text, and its `tool_use` blocks as `tool_calls`.
fn assistant_message<'a>(i: usize, content: &'a Contents<'a>) -> Result<ChatMessage<'a>, String> {
    let blocks = match content {
        Contents::Text(t) => {
            return Ok(ChatMessage::new(
                "assistant",
                ChatContent::Text(Cow::Borrowed(t)),
            ))
        }
        Contents::Blocks(blocks) => blocks,
        Contents::Other => &[][..],
    };
    let mut parts = Vec::new();
    let mut tool_calls = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        let at = || format!("messages[{i}].content[{j}]");
        match b.kind.as_ref() {
            "text" => parts.push(text_part(b, &at)?),
            "tool_use" => tool_calls.push(ChatToolCall {
                id: b
                    .id
                    .as_deref()
                    .ok_or_else(|| format!("`{}.id` is missing", at()))?,
                kind: "function",
                function: ChatFunctionCall {
                    name: b
                        .name
                        .as_deref()
                        .ok_or_else(|| format!("`{}.name` is missing", at()))?,
                    arguments: b.input.map_or("{}", |i| i.get()),
                },
            }),
            "thinking" | "redacted_thinking" => {}
            other => return Err(unsupported(&at(), &format!("`{other}` blocks"))),
        }
    }
    let content = if parts.is_empty() && !tool_calls.is_empty() {
        None
    } else {
        Some(ChatContent::from_parts(parts))
    };
    Ok(ChatMessage {
        role: "assistant",
        content,
        tool_calls,
        tool_call_id: None,
    })
}

fn chat_tools(raw: &RawValue) -> Result<Vec<ChatTool<'_>>, String> {
    let tools: Vec<Tool> = serde_json::from_str(raw.get())
        .map_err(|e| format!("the body is not a valid Messages request (`tools`: {e})"))?;
    let mut out = Vec::with_capacity(tools.len());
    for (i, t) in tools.into_iter().enumerate() {
        if let Some(kind) = t.kind.as_deref().filter(|k| *k != "custom") {
            return Err(unsupported(
                &format!("tools[{i}]"),
                &format!("`{kind}` is a tool Anthropic runs"),
            ));
        }
        out.push(ChatTool {
            kind: "function",
            function: ChatFunction {
                name: t.name,
                description: t.description,
                parameters: t.input_schema,
                strict: t.strict,
            },
        });
    }
    Ok(out)
}

fn chat_tool_choice<'a>(
    choice: &'a ToolChoice<'a>,
) -> Result<(Option<ChatToolChoice<'a>>, Option<bool>), String> {
    let mode = match choice.kind.as_ref() {
        "auto" => ChatToolChoice::Mode("auto"),
        "any" => ChatToolChoice::Mode("required"),
        "none" => ChatToolChoice::Mode("none"),
        "tool" => ChatToolChoice::Named {
            kind: "function",
            function: NamedFunction {
                name: choice
                    .name
                    .as_deref()
                    .ok_or("`tool_choice.name` is missing")?,
            },
        },
        other => {
            return Err(format!(
                "`tool_choice.type` must be auto, any, tool or none, not `{other}`"
            ))
        }
    };
    let parallel = (choice.disable_parallel_tool_use == Some(true)).then_some(false);
    Ok((Some(mode), parallel))
}

// ---------------------------------------------------------------------------------------------
// Translation: chat completion → Messages answer
// ---------------------------------------------------------------------------------------------

/// A Messages response body, and the message of `message_start`.
#[derive(Serialize)]
struct MessageBody<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: Vec<OutBlock<'a>>,
    stop_reason: Option<&'static str>,
    stop_sequence: Option<&'static str>,
    usage: OutUsage,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum OutBlock<'a> {
    Text {
        text: Cow<'a, str>,
    },
    ToolUse {
        id: Cow<'a, str>,
        name: Cow<'a, str>,
        input: ToolInput<'a>,
    },
}

/// A tool call's input: Anthropic's is a JSON object, OpenAI's arguments a JSON text the model
/// wrote, which may not be one. Arguments that are not an object are kept, as a string, under
/// `_raw`: the client sees what the model said rather than an empty input.
enum ToolInput<'a> {
    Object(&'a RawValue),
    Empty,
    Unparsed(&'a str),
}

impl<'a> ToolInput<'a> {
    fn of(arguments: &'a str) -> Self {
        if arguments.trim().is_empty() {
            return ToolInput::Empty;
        }
        match serde_json::from_str::<&RawValue>(arguments) {
            Ok(raw) if raw.get().starts_with('{') => ToolInput::Object(raw),
            _ => ToolInput::Unparsed(arguments),
        }
    }
}

impl Serialize for ToolInput<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            ToolInput::Object(raw) => raw.serialize(serializer),
            ToolInput::Empty => serializer.serialize_map(Some(0))?.end(),
            ToolInput::Unparsed(text) => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("_raw", text)?;
                map.end()
            }
        }
    }
}

/// Usage in Anthropic's terms: input tokens exclude cache reads, counted apart.
#[derive(Serialize, Default)]
struct OutUsage {
    input_tokens: u64,
    cache_creation_input_tokens: u64,
    cache_read_input_tokens: u64,
    output_tokens: u64,
}

impl From<Usage> for OutUsage {
    fn from(u: Usage) -> Self {
        OutUsage {
            input_tokens: u.prompt_tokens.saturating_sub(u.cached_prompt_tokens),
            cache_creation_input_tokens: 0,
            cache_read_input_tokens: u.cached_prompt_tokens,
            output_tokens: u.completion_tokens,
        }
    }
}

/// OpenAI's `finish_reason` as Anthropic's `stop_reason`. OpenAI does not say whether a stop
/// sequence ended the text, so `stop` is always `end_turn` (and `stop_sequence` null); an
/// unknown or missing reason is `end_turn` too.
fn stop_reason(finish_reason: Option<&str>) -> &'static str {
    match finish_reason {
        Some("length") => "max_tokens",
        Some("tool_calls" | "function_call") => "tool_use",
        Some("content_filter") => "refusal",
        _ => "end_turn",
    }
}

/// A string, a list of parts (some servers send content so), or anything else (ignored).
#[derive(Deserialize)]
#[serde(untagged)]
enum Text<'a> {
    Str(#[serde(borrow)] Cow<'a, str>),
    Parts(#[serde(borrow)] Vec<TextPart<'a>>),
    Other(IgnoredAny),
}

#[derive(Deserialize)]
struct TextPart<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    text: Option<Cow<'a, str>>,
}

impl<'a> Text<'a> {
    /// The text, with a list's text parts joined.
    fn into_text(self) -> Cow<'a, str> {
        match self {
            Text::Str(s) => s,
            Text::Parts(parts) => Cow::Owned(
                parts
                    .into_iter()
                    .filter(|p| p.kind.as_deref().is_none_or(|k| k == "text"))
                    .filter_map(|p| p.text)
                    .collect(),
            ),
            Text::Other(_) => Cow::Borrowed(""),
        }
    }
}

#[derive(Deserialize)]
struct Completion<'a> {
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    choices: Vec<CompletionChoice<'a>>,
}

#[derive(Deserialize)]
struct CompletionChoice<'a> {
    index: Option<u64>,
    #[serde(borrow)]
    message: Option<CompletionMessage<'a>>,
    #[serde(borrow)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct CompletionMessage<'a> {
    #[serde(borrow)]
    content: Option<Text<'a>>,
    #[serde(borrow)]
    refusal: Option<Text<'a>>,
    #[serde(borrow)]
    tool_calls: Option<Vec<CompletionToolCall<'a>>>,
}

#[derive(Deserialize)]
struct CompletionToolCall<'a> {
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    function: Option<CompletionFunction<'a>>,
}

#[derive(Deserialize)]
struct CompletionFunction<'a> {
    #[serde(borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow)]
    arguments: Option<Cow<'a, str>>,
}

/// The id of the Messages answer to a chat completion: Anthropic's prefix on the chat's id.
fn message_id(chat_id: Option<&str>) -> String {
    format!("msg_{}", chat_id.unwrap_or("tollgate"))
}

/// Translates a chat completion body into a Messages response body named `public_model`:
/// its text (or refusal) as a text block, its tool calls as `tool_use` blocks, the finish
/// reason as `stop_reason`, and the usage. Reasoning text is left out: the client asked for
/// no thinking. None if the body is not a chat completion (no choices).
pub fn message_from_chat(chat_body: &[u8], public_model: &str) -> Option<Vec<u8>> {
    let completion: Completion = serde_json::from_slice(chat_body).ok()?;
    let mut choices = completion.choices.into_iter();
    let first = choices.next()?;
    let choice = std::iter::once(first)
        .chain(choices)
        .find(|c| c.index.unwrap_or(0) == 0)?;
    let message = choice.message?;
    let refusal = message
        .refusal
        .map(Text::into_text)
        .filter(|r| !r.is_empty());
    let mut content = Vec::new();
    let text = message.content.map(Text::into_text).unwrap_or_default();
    if !text.is_empty() {
        content.push(OutBlock::Text { text });
    }
    let refused = refusal.is_some();
    if let Some(text) = refusal {
        content.push(OutBlock::Text { text });
    }
    // Kept alive while the blocks borrow their arguments.
    let calls = message.tool_calls.unwrap_or_default();
    for (i, call) in calls.iter().enumerate() {
        let function = call.function.as_ref();
        content.push(OutBlock::ToolUse {
            id: call
                .id
                .as_deref()
                .map_or_else(|| Cow::Owned(format!("call_{i}")), Cow::Borrowed),
            name: Cow::Borrowed(function.and_then(|f| f.name.as_deref()).unwrap_or_default()),
            input: ToolInput::of(function.and_then(|f| f.arguments.as_deref()).unwrap_or("")),
        });
    }
    let id = message_id(completion.id.as_deref());
    let body = MessageBody {
        id: &id,
        kind: "message",
        role: "assistant",
        model: public_model,
        content,
        stop_reason: Some(if refused {
            "refusal"
        } else {
            stop_reason(choice.finish_reason.as_deref())
        }),
        stop_sequence: None,
        usage: usage::from_completion(chat_body)
            .map(OutUsage::from)
            .unwrap_or_default(),
    };
    serde_json::to_vec(&body).ok()
}

// ---------------------------------------------------------------------------------------------
// Translation: chat completions stream → Messages stream
// ---------------------------------------------------------------------------------------------

/// One Messages stream event; serialized as its `data`, named by `name` in `event:`.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event<'a> {
    MessageStart {
        message: MessageBody<'a>,
    },
    ContentBlockStart {
        index: u32,
        content_block: OutBlock<'a>,
    },
    ContentBlockDelta {
        index: u32,
        delta: BlockDelta<'a>,
    },
    ContentBlockStop {
        index: u32,
    },
    MessageDelta {
        delta: StopDelta,
        usage: DeltaUsage,
    },
    MessageStop,
    Error {
        error: ErrorDetail<'a>,
    },
}

impl Event<'_> {
    fn name(&self) -> &'static str {
        match self {
            Event::MessageStart { .. } => "message_start",
            Event::ContentBlockStart { .. } => "content_block_start",
            Event::ContentBlockDelta { .. } => "content_block_delta",
            Event::ContentBlockStop { .. } => "content_block_stop",
            Event::MessageDelta { .. } => "message_delta",
            Event::MessageStop => "message_stop",
            Event::Error { .. } => "error",
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(self.name().as_bytes());
        out.extend_from_slice(b"\ndata: ");
        // Writing these types to a Vec cannot fail: string keys, no maps of other keys.
        let _ = serde_json::to_writer(&mut *out, self);
        out.extend_from_slice(b"\n\n");
    }
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockDelta<'a> {
    TextDelta { text: &'a str },
    InputJsonDelta { partial_json: &'a str },
}

#[derive(Serialize)]
struct StopDelta {
    stop_reason: &'static str,
    stop_sequence: Option<&'static str>,
}

/// `message_delta`'s usage: the output count, and the input side when the provider told it
/// (newer SDKs read it from here; `message_start` had to say 0).
#[derive(Serialize)]
struct DeltaUsage {
    #[serde(skip_serializing_if = "Option::is_none")]
    input_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_read_input_tokens: Option<u64>,
    output_tokens: u64,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    message: &'a str,
}

#[derive(Deserialize)]
struct ChatChunk<'a> {
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    choices: Option<Vec<ChunkChoice<'a>>>,
    #[serde(borrow)]
    usage: Option<&'a RawValue>,
    #[serde(borrow)]
    error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ChunkChoice<'a> {
    index: Option<u64>,
    #[serde(borrow)]
    delta: Option<ChunkDelta<'a>>,
    #[serde(borrow)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct ChunkDelta<'a> {
    #[serde(borrow)]
    content: Option<Text<'a>>,
    #[serde(borrow)]
    refusal: Option<Text<'a>>,
    #[serde(borrow)]
    reasoning_content: Option<Text<'a>>,
    #[serde(borrow)]
    reasoning: Option<Text<'a>>,
    #[serde(borrow)]
    tool_calls: Option<Vec<ChunkToolCall<'a>>>,
}

#[derive(Deserialize)]
struct ChunkToolCall<'a> {
    index: Option<u64>,
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    function: Option<CompletionFunction<'a>>,
}

/// Where the translated stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing sent yet.
    Idle,
    /// `message_start` sent; content blocks open and close.
    Streaming,
    /// The finish reason came and every block is closed; `message_delta` waits for the usage
    /// chunk, which OpenAI sends after the finish chunk, or `[DONE]`.
    Stopping { stop_reason: &'static str },
    /// `message_stop` or an `error` was sent: nothing more is.
    Ended,
}

/// The content block open in the translated stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpenBlock {
    Text(u32),
    Tool(u32),
}

/// A tool call of the chat stream, and the `tool_use` block it became.
#[derive(Debug)]
struct ToolSlot {
    chat_index: u64,
    id: String,
    block: u32,
}

const INCOMPLETE: &str = "The model's stream ended before the message was complete.";

/// Translates a chat completions stream into a Messages stream, bytes in at any boundary,
/// events out as soon as they are known. Only choice 0 is read (the request asks for one).
///
/// | chat event                              | phase     | Messages events out                          |
/// |-----------------------------------------|-----------|----------------------------------------------|
/// | first chunk                             | Idle      | `message_start` (usage 0), then as below     |
/// | `delta.content`/`refusal` non-empty     | Streaming | [`content_block_stop` of a tool block,] `content_block_start` text; `text_delta` |
/// | a tool call with a new index (or id)    | Streaming | `content_block_stop` of the open block; `content_block_start` tool_use (id, name, input {}) |
/// | tool call `arguments` fragment          | Streaming | `input_json_delta` on that call's block      |
/// | `finish_reason`                         | Streaming | `content_block_stop` of the open block → Stopping |
/// | usage chunk (or usage on the finish)    | Stopping  | `message_delta` (stop_reason, usage), `message_stop` → Ended |
/// | `[DONE]`                                | Stopping  | `message_delta` (output tokens estimated), `message_stop` → Ended |
/// | `[DONE]`, or the body ends              | otherwise | `error` (api_error, incomplete) → Ended: never a `message_stop` |
/// | `{"error": …}` chunk                    | any       | `error` with its message → Ended             |
/// | anything                                | Ended     | nothing                                      |
///
/// Reasoning deltas are counted in `streamed_tokens` but not sent: the client asked for no
/// thinking. `ping` events are not sent.
#[derive(Debug)]
pub struct MessagesStream {
    sse: SseParser,
    model: String,
    phase: Phase,
    open: Option<OpenBlock>,
    next_block: u32,
    tools: Vec<ToolSlot>,
    refused: bool,
    usage: Option<Usage>,
    streamed_tokens: u64,
}

impl MessagesStream {
    pub fn new(public_model: &str) -> Self {
        MessagesStream {
            sse: SseParser::new(),
            model: public_model.to_string(),
            phase: Phase::Idle,
            open: None,
            next_block: 0,
            tools: Vec::new(),
            refused: false,
            usage: None,
            streamed_tokens: 0,
        }
    }

    /// Feeds upstream bytes; appends the Messages events they complete to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        if self.phase == Phase::Ended {
            return;
        }
        let mut sse = std::mem::take(&mut self.sse);
        sse.feed(bytes, |e| self.on_event(&e.data, out));
        if sse.pending() > MAX_EVENT_BYTES && self.phase != Phase::Ended {
            sse.abandon();
            self.fail(
                "api_error",
                "The model's stream sent an event too large to translate.",
                out,
            );
        }
        self.sse = sse;
    }

    /// The upstream body ended. A stream that did not finish (no finish reason, or neither a
    /// usage chunk nor `[DONE]` after it) ends with an `error` event, never `message_stop`,
    /// so the client cannot take a cut answer for a whole one.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let mut sse = std::mem::take(&mut self.sse);
        // An unfinished event at the end is discarded, as the SSE spec says.
        let _ = sse.finish(|e| self.on_event(&e.data, out));
        if self.phase != Phase::Ended {
            self.fail("api_error", INCOMPLETE, out);
        }
    }

    /// The usage the provider reported (its usage chunk), if it did.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Estimated tokens of everything streamed (text, refusals, reasoning, tool arguments).
    pub fn streamed_tokens(&self) -> u64 {
        self.streamed_tokens
    }

    fn on_event(&mut self, data: &str, out: &mut Vec<u8>) {
        if self.phase == Phase::Ended {
            return;
        }
        if data.trim() == "[DONE]" {
            match self.phase {
                Phase::Stopping { stop_reason } => self.stop(stop_reason, out),
                _ => self.fail("api_error", INCOMPLETE, out),
            }
            return;
        }
        // Tolerant of what is not a chunk (comments turned data, odd keep-alives): skipped.
        let Ok(chunk) = serde_json::from_str::<ChatChunk>(data) else {
            return;
        };
        if let Some(error) = chunk.error.filter(|e| e.get() != "null") {
            let message = error_message(error.get().as_bytes());
            let message = message.as_deref().unwrap_or(INCOMPLETE);
            return self.fail("api_error", message, out);
        }
        if self.phase == Phase::Idle {
            self.start(chunk.id.as_deref(), out);
        }
        if chunk.usage.is_some_and(|u| u.get() != "null") {
            self.usage = usage::from_completion(data.as_bytes()).or(self.usage);
        }
        for choice in chunk.choices.into_iter().flatten() {
            if choice.index.unwrap_or(0) != 0 {
                continue;
            }
            if let Some(delta) = choice.delta {
                self.on_delta(delta, out);
            }
            if let (Some(reason), Phase::Streaming) = (choice.finish_reason, self.phase) {
                self.close_block(out);
                let stop_reason = if self.refused {
                    "refusal"
                } else {
                    stop_reason(Some(&reason))
                };
                self.phase = Phase::Stopping { stop_reason };
            }
        }
        if let (Phase::Stopping { stop_reason }, Some(_)) = (self.phase, self.usage) {
            self.stop(stop_reason, out);
        }
    }

    fn start(&mut self, chat_id: Option<&str>, out: &mut Vec<u8>) {
        let id = message_id(chat_id);
        Event::MessageStart {
            message: MessageBody {
                id: &id,
                kind: "message",
                role: "assistant",
                model: &self.model,
                content: Vec::new(),
                stop_reason: None,
                stop_sequence: None,
                usage: OutUsage::default(),
            },
        }
        .write(out);
        self.phase = Phase::Streaming;
    }

    fn on_delta(&mut self, delta: ChunkDelta<'_>, out: &mut Vec<u8>) {
        let content = delta.content.map(Text::into_text).unwrap_or_default();
        let refusal = delta.refusal.map(Text::into_text).unwrap_or_default();
        let reasoning = delta
            .reasoning_content
            .or(delta.reasoning)
            .map(Text::into_text)
            .unwrap_or_default();
        let calls = delta.tool_calls.unwrap_or_default();
        let arguments = calls
            .iter()
            .filter_map(|c| c.function.as_ref()?.arguments.as_deref());
        let counted: u64 = [&content, &refusal, &reasoning]
            .into_iter()
            .map(|t| &**t)
            .chain(arguments)
            .map(tokens::estimate_text)
            .sum();
        self.streamed_tokens = self.streamed_tokens.saturating_add(counted);
        if self.phase != Phase::Streaming {
            return;
        }
        self.refused |= !refusal.is_empty();
        for text in [content, refusal] {
            if !text.is_empty() {
                self.text_delta(&text, out);
            }
        }
        for call in &calls {
            self.tool_call_delta(call, out);
        }
    }

    fn text_delta(&mut self, text: &str, out: &mut Vec<u8>) {
        let index = match self.open {
            Some(OpenBlock::Text(index)) => index,
            _ => {
                self.close_block(out);
                let index = self.open_block(OpenBlock::Text);
                Event::ContentBlockStart {
                    index,
                    content_block: OutBlock::Text {
                        text: Cow::Borrowed(""),
                    },
                }
                .write(out);
                index
            }
        };
        Event::ContentBlockDelta {
            index,
            delta: BlockDelta::TextDelta { text },
        }
        .write(out);
    }

    /// A tool call delta. A call is new when its index is, or when it names an id other than
    /// the one its index had (some servers send every call at index 0, each with its id).
    fn tool_call_delta(&mut self, call: &ChunkToolCall<'_>, out: &mut Vec<u8>) {
        let chat_index = call.index.unwrap_or(0);
        let id = call.id.as_deref().filter(|id| !id.is_empty());
        let slot = self.tools.iter().rposition(|s| s.chat_index == chat_index);
        let known = slot
            .and_then(|s| self.tools.get(s))
            .filter(|s| id.is_none_or(|id| id == s.id))
            .map(|s| s.block);
        let function = call.function.as_ref();
        let block = match known {
            Some(block) => block,
            None => {
                self.close_block(out);
                let block = self.open_block(OpenBlock::Tool);
                let id = id.map_or_else(|| format!("call_{block}"), str::to_string);
                let name = function.and_then(|f| f.name.as_deref()).unwrap_or_default();
                Event::ContentBlockStart {
                    index: block,
                    content_block: OutBlock::ToolUse {
                        id: Cow::Borrowed(&id),
                        name: Cow::Borrowed(name),
                        input: ToolInput::Empty,
                    },
                }
                .write(out);
                self.tools.push(ToolSlot {
                    chat_index,
                    id,
                    block,
                });
                block
            }
        };
        // A fragment for a call already closed still goes to its block's index: clients
        // gather input by index, and dropping it would lose arguments.
        let fragment = function.and_then(|f| f.arguments.as_deref());
        if let Some(partial_json) = fragment.filter(|a| !a.is_empty()) {
            Event::ContentBlockDelta {
                index: block,
                delta: BlockDelta::InputJsonDelta { partial_json },
            }
            .write(out);
        }
    }

    fn open_block(&mut self, kind: fn(u32) -> OpenBlock) -> u32 {
        let index = self.next_block;
        self.next_block += 1;
        self.open = Some(kind(index));
        index
    }

    fn close_block(&mut self, out: &mut Vec<u8>) {
        if let Some(OpenBlock::Text(index) | OpenBlock::Tool(index)) = self.open.take() {
            Event::ContentBlockStop { index }.write(out);
        }
    }

    /// `message_delta` and `message_stop`: the output count is the provider's if it reported
    /// usage, else the estimate of what streamed.
    fn stop(&mut self, stop_reason: &'static str, out: &mut Vec<u8>) {
        let usage = match self.usage {
            Some(u) => {
                let u = OutUsage::from(u);
                DeltaUsage {
                    input_tokens: Some(u.input_tokens),
                    cache_read_input_tokens: Some(u.cache_read_input_tokens),
                    output_tokens: u.output_tokens,
                }
            }
            None => DeltaUsage {
                input_tokens: None,
                cache_read_input_tokens: None,
                output_tokens: self.streamed_tokens,
            },
        };
        Event::MessageDelta {
            delta: StopDelta {
                stop_reason,
                stop_sequence: None,
            },
            usage,
        }
        .write(out);
        Event::MessageStop.write(out);
        self.phase = Phase::Ended;
    }

    fn fail(&mut self, kind: &str, message: &str, out: &mut Vec<u8>) {
        Event::Error {
            error: ErrorDetail { kind, message },
        }
        .write(out);
        self.phase = Phase::Ended;
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Anthropic's error type for an HTTP status, as its docs list them; other 4xx are
/// `invalid_request_error` and other 5xx `api_error`, as Anthropic does.
fn error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        529 => "overloaded_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

/// An Anthropic-shaped error body: `{"type":"error","error":{"type","message"}}`.
pub fn error_body(status: u16, message: &str) -> Vec<u8> {
    anthropic_error(error_type(status), message)
}

fn anthropic_error(kind: &str, message: &str) -> Vec<u8> {
    let mut out = Vec::new();
    // Cannot fail: two string fields into a Vec.
    let _ = serde_json::to_writer(
        &mut out,
        &Event::Error {
            error: ErrorDetail { kind, message },
        },
    );
    out
}

/// Most of an upstream error body kept as its message when no message field can be found.
const MAX_RAW_MESSAGE_CHARS: usize = 1000;

/// An OpenAI-shaped error body (the gateway's own refusals, or an OpenAI-compatible
/// provider's) in Anthropic's shape, with the type its status means and the same message.
/// Messages are found where servers put them: `error.message` (OpenAI), `error` as a string,
/// `message` (vLLM), `detail` (FastAPI servers); else the body's text is the message. A body
/// already in Anthropic's shape keeps its type too.
pub fn error_from_openai(status: u16, openai_error_body: &[u8]) -> Vec<u8> {
    #[derive(Deserialize)]
    struct AnthropicShape<'a> {
        #[serde(rename = "type", borrow)]
        kind: Cow<'a, str>,
        #[serde(borrow)]
        error: AnthropicDetail<'a>,
    }
    #[derive(Deserialize)]
    struct AnthropicDetail<'a> {
        #[serde(rename = "type", borrow)]
        kind: Cow<'a, str>,
        #[serde(borrow)]
        message: Cow<'a, str>,
    }
    if let Ok(e) = serde_json::from_slice::<AnthropicShape>(openai_error_body) {
        if e.kind == "error" {
            return anthropic_error(&e.error.kind, &e.error.message);
        }
    }
    let message = error_message(openai_error_body).unwrap_or_else(|| {
        let text = String::from_utf8_lossy(openai_error_body);
        let text: String = text.trim().chars().take(MAX_RAW_MESSAGE_CHARS).collect();
        if text.is_empty() {
            format!("The model's provider answered with status {status}.")
        } else {
            text
        }
    });
    error_body(status, &message)
}

/// The message of an error body or of a stream's `error` value, wherever servers put it.
fn error_message(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let text = |v: Option<&serde_json::Value>| v.and_then(|m| m.as_str()).map(str::to_string);
    let inner = v.get("error");
    text(inner.and_then(|e| e.get("message")))
        .or_else(|| text(inner))
        .or_else(|| text(v.get("message")))
        .or_else(|| text(v.get("detail")))
        .or_else(|| text(Some(&v)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn decorators_join_the_system_prompt_and_the_turns_keeping_roles_alternating() {
        let system = json!({ "role": "system", "content": "Answer in French." });
        let closing = json!({ "role": "system", "content": "Be brief." });
        let nudge = json!({ "role": "user", "content": "(from the gateway)" });
        let primer = json!({ "role": "assistant", "content": "Bonjour." });
        let body = br#"{"model":"m","max_tokens":5,"system":"Own.","messages":[{"role":"user","content":"hi"}],"cache":1}"#;
        let out = decorate(body, &[&system, &primer], &[&closing, &nudge]).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v["system"],
            json!([
                { "type": "text", "text": "Answer in French." },
                { "type": "text", "text": "Own." },
                { "type": "text", "text": "Be brief." },
            ])
        );
        // The assistant primer opens the conversation as its own turn; the user nudge joins
        // the last user turn, so roles still alternate.
        assert_eq!(
            v["messages"],
            json!([
                { "role": "assistant", "content": [{ "type": "text", "text": "Bonjour." }] },
                { "role": "user", "content": [
                    { "type": "text", "text": "hi" },
                    { "type": "text", "text": "(from the gateway)" },
                ]},
            ])
        );
        // Everything else as sent, in its order.
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["model", "max_tokens", "system", "messages", "cache"]);
        // Nothing to add: nothing but the decorators changes.
        let plain = decorate(body, &[], &[]).unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&plain).unwrap()["system"],
            "Own."
        );
        assert!(decorate(b"[]", &[&system], &[]).is_err());
    }

    fn chat(body: Value) -> Value {
        let bytes = chat_request(body.to_string().as_bytes()).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    fn chat_err(body: Value) -> String {
        chat_request(body.to_string().as_bytes()).unwrap_err()
    }

    /// A request with every kind of block, as the SDK sends a tool loop.
    fn rich_request() -> Value {
        json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 1024,
            "stream": true,
            "system": [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "What is in this picture, and the weather in Paris?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
                ]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "A cat. Let me check the weather."},
                    {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris", "unit": "c"}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_01", "content": [{"type": "text", "text": "18 degrees, sunny"}]},
                    {"type": "text", "text": "And tomorrow?"}
                ]}
            ],
            "tools": [{"name": "get_weather", "description": "Current weather for a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}}, "required": ["city"]}}],
            "tool_choice": {"type": "auto"},
            "temperature": 0.2
        })
    }

    // --- reading the request (pass-through) ------------------------------------------------

    #[test]
    fn reads_what_the_gateway_needs() {
        let body = rich_request().to_string();
        let r = parse_messages_request(body.as_bytes()).unwrap();
        assert_eq!(r.model(), "claude-sonnet-4-5");
        assert!(r.is_stream());
        assert_eq!(r.max_tokens(), 1024);
        let plain = br#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#;
        let plain = parse_messages_request(plain).unwrap();
        assert!(!plain.is_stream());
        assert_eq!(
            plain.estimate_prompt_tokens(),
            tokens::PER_REQUEST_OVERHEAD
                + tokens::PER_MESSAGE_OVERHEAD
                + tokens::estimate_text("hi")
        );
        assert!(r.estimate_prompt_tokens() > IMAGE_TOKENS + 40);
    }

    #[test]
    fn estimate_counts_images_tools_and_tool_traffic() {
        let base =
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
        let estimate = |v: &Value| {
            let s = v.to_string();
            parse_messages_request(s.as_bytes())
                .unwrap()
                .estimate_prompt_tokens()
        };
        let plain = estimate(&base);
        let mut with_image = base.clone();
        with_image["messages"][0]["content"] = json!([{"type": "text", "text": "hi"},
            {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]);
        assert_eq!(estimate(&with_image), plain + IMAGE_TOKENS);
        let mut with_pdf = base.clone();
        with_pdf["messages"][0]["content"] = json!([{"type": "text", "text": "hi"},
            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}}]);
        assert_eq!(estimate(&with_pdf), plain + DOCUMENT_TOKENS);
        let mut with_tools = base.clone();
        with_tools["tools"] = rich_request()["tools"].clone();
        assert!(estimate(&with_tools) > plain + 10);
        let mut with_result = base.clone();
        with_result["messages"][0]["content"] = json!([{"type": "tool_result", "tool_use_id": "t",
            "content": "a long tool result with many words in it"}]);
        assert!(estimate(&with_result) > plain + 5);
    }

    #[test]
    fn guarded_texts_cover_everything_the_model_reads() {
        let body = rich_request().to_string();
        let r = parse_messages_request(body.as_bytes()).unwrap();
        let texts: Vec<String> = r.guarded_texts().into_iter().map(Cow::into_owned).collect();
        for want in [
            "You are terse.",
            "What is in this picture, and the weather in Paris?",
            "A cat. Let me check the weather.",
            "get_weather",
            r#"{"city":"Paris","unit":"c"}"#,
            "18 degrees, sunny",
            "And tomorrow?",
            "Current weather for a city",
            "City name",
        ] {
            assert!(
                texts.iter().any(|t| t == want),
                "{want:?} missing from {texts:?}"
            );
        }
        // Text blocks of one message are joined, so a word split across them is seen whole.
        let body = br#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":[
            {"type":"text","text":"for"},{"type":"text","text":"bidden"},
            {"type":"tool_result","tool_use_id":"t","content":"plain result","is_error":true},
            {"type":"document","source":{"type":"text","media_type":"text/plain","data":"doc text"}}]},
            {"role":"assistant","content":[{"type":"thinking","thinking":"hmm","signature":"s"}]}]}"#;
        let r = parse_messages_request(body).unwrap();
        let texts = r.guarded_texts();
        assert_eq!(
            texts,
            ["forbidden", "plain result", "doc text", "hmm"].map(Cow::Borrowed)
        );
        assert!(matches!(texts[1], Cow::Borrowed(_)));
    }

    #[test]
    fn unknown_blocks_and_fields_are_tolerated() {
        // Server tool traffic, search results, citations and new fields: a valid request
        // for Anthropic must stay readable for pass-through.
        let body = br#"{"model":"m","max_tokens":5,"service_tier":"auto","new_field":{"x":[1]},
            "messages":[{"role":"user","content":"search"},
            {"role":"assistant","content":[
              {"type":"server_tool_use","id":"srvtoolu_1","name":"web_search","input":{"query":"q"}},
              {"type":"web_search_tool_result","tool_use_id":"srvtoolu_1","content":{"type":"web_search_tool_result_error","error_code":"unavailable"}},
              {"type":"web_search_tool_result","tool_use_id":"srvtoolu_1","content":[{"type":"web_search_result","url":"u","title":"t","encrypted_content":"e","page_age":null}]},
              {"type":"text","text":"ok","citations":[{"type":"web_search_result_location","url":"u"}]}]},
            {"role":"user","content":[{"type":"search_result","source":"https://s","title":"T","content":[{"type":"text","text":"found"}]}]}]}"#;
        let r = parse_messages_request(body).unwrap();
        assert!(r.guarded_texts().iter().any(|t| t == "found"));
        assert!(r.estimate_prompt_tokens() > 10);
    }

    #[test]
    fn malformed_requests_say_why() {
        let cases: [(&[u8], &str); 13] = [
            (b"{", "not valid JSON"),
            (b"[]", "not a valid Messages request"),
            (br#"{"max_tokens":5,"messages":[]}"#, "missing field `model`"),
            (br#"{"model":"m","max_tokens":5}"#, "missing field `messages`"),
            (
                br#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#,
                "missing field `max_tokens`",
            ),
            (
                br#"{"model":"m","max_tokens":"5","messages":[]}"#,
                "`max_tokens`",
            ),
            (
                br#"{"model":"","max_tokens":5,"messages":[{"role":"user","content":"x"}]}"#,
                "`model` must not be empty",
            ),
            (
                br#"{"model":"m","max_tokens":5,"messages":[]}"#,
                "at least one",
            ),
            (
                br#"{"model":"m","max_tokens":5,"messages":[{"role":"system","content":"x"}]}"#,
                "`messages[0].role` must be `user` or `assistant`",
            ),
            (
                br#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":5}]}"#,
                "`messages[0].content` must be",
            ),
            (
                br#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":[{"type":"text","text":7}]}]}"#,
                "`messages[0].content[0].text`",
            ),
            (
                br#"{"model":"m","max_tokens":5,"system":{},"messages":[{"role":"user","content":"x"}]}"#,
                "`system` must be",
            ),
            (
                br#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"x"}]} x"#,
                "not valid JSON",
            ),
        ];
        for (body, want) in cases {
            let err = parse_messages_request(body).unwrap_err();
            assert!(
                err.contains(want),
                "{}: {err}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn rename_model_changes_only_the_model() {
        let body = br#"{ "max_tokens" : 1.0e3, "model":"claude-x" ,"messages":[{"role":"user","content":"caf\u00e9"}],"z":1}"#;
        let out = rename_model(body, "claude-sonnet-4-5-20250929").unwrap();
        assert_eq!(
            out,
            br#"{ "max_tokens" : 1.0e3, "model":"claude-sonnet-4-5-20250929" ,"messages":[{"role":"user","content":"caf\u00e9"}],"z":1}"#
        );
        // An escaped name in, a quoted name out.
        let out = rename_model(br#"{"model":"a\"b"}"#, "q\"uote").unwrap();
        assert_eq!(out, br#"{"model":"q\"uote"}"#);
        assert_eq!(
            rename_model(br#"{"model":5}"#, "m").unwrap_err(),
            "`model` must be a string"
        );
        assert!(rename_model(br#"{"messages":[]}"#, "m")
            .unwrap_err()
            .contains("model"));
        assert!(rename_model(br#"["m"]"#, "m").is_err());
        assert!(rename_model(br#"{"model":"a","model":"b"}"#, "m").is_err());
        assert!(rename_model(b"{", "m").is_err());
    }

    // --- usage of Anthropic's answers (pass-through) ---------------------------------------

    #[test]
    fn usage_of_a_message_counts_cache_reads_and_writes_as_prompt() {
        let body = br#"{"id":"msg_01","type":"message","role":"assistant","model":"claude-sonnet-4-5",
            "content":[{"type":"text","text":"Hi"}],"stop_reason":"end_turn","stop_sequence":null,
            "usage":{"input_tokens":12,"cache_creation_input_tokens":100,"cache_read_input_tokens":2000,
            "output_tokens":7,"service_tier":"standard"}}"#;
        assert_eq!(
            usage_of_message(body),
            Some(Usage {
                prompt_tokens: 2112,
                completion_tokens: 7,
                cached_prompt_tokens: 2000,
                cache_write_tokens: 100,
            })
        );
        let body =
            br#"{"usage":{"input_tokens":3,"output_tokens":1,"cache_creation_input_tokens":null}}"#;
        assert_eq!(
            usage_of_message(body),
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 1,
                ..Usage::default()
            })
        );
        for body in [
            &br#"{"type":"message"}"#[..],
            br#"{"usage":{"input_tokens":3}}"#,
            br#"{"usage":null}"#,
            b"not json",
        ] {
            assert_eq!(usage_of_message(body), None);
        }
    }

    const ANTHROPIC_STREAM: &[&str] = &[
        r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-5","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,"cache_creation_input_tokens":10,"cache_read_input_tokens":300,"output_tokens":1}}}"#,
        r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
        r#"{"type": "ping"}"#,
        r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello there, friend"}}"#,
        r#"{"type":"content_block_stop","index":0}"#,
        r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_1","name":"f","input":{}}}"#,
        r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"city\": \"Par"}}"#,
        r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"is\"}"}}"#,
        r#"{"type":"content_block_stop","index":1}"#,
        r#"{"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":42}}"#,
        r#"{"type":"message_stop"}"#,
    ];

    #[test]
    fn stream_usage_from_message_start_and_message_delta() {
        let mut u = MessagesStreamUsage::new();
        for (i, data) in ANTHROPIC_STREAM.iter().enumerate() {
            u.observe(data);
            if i < 9 {
                assert_eq!(
                    u.usage(),
                    None,
                    "no final output count before message_delta"
                );
            }
        }
        assert_eq!(
            u.usage(),
            Some(Usage {
                prompt_tokens: 335,
                completion_tokens: 42,
                cached_prompt_tokens: 300,
                cache_write_tokens: 10,
            })
        );
        assert_eq!(
            u.streamed_text_tokens(),
            tokens::estimate_text("Hello there, friend")
                + tokens::estimate_text(r#"{"city": "Par"#)
                + tokens::estimate_text(r#"is"}"#)
        );
        // Newer API versions repeat the input side, cumulative, in message_delta: it wins.
        u.observe(
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"input_tokens":30,"cache_read_input_tokens":0,"output_tokens":50}}"#,
        );
        assert_eq!(
            u.usage(),
            Some(Usage {
                prompt_tokens: 40,
                completion_tokens: 50,
                cached_prompt_tokens: 0,
                cache_write_tokens: 10,
            })
        );
    }

    #[test]
    fn a_cut_pass_through_stream_has_no_usage_but_an_estimate() {
        let mut u = MessagesStreamUsage::new();
        for data in ANTHROPIC_STREAM.iter().take(4) {
            u.observe(data);
        }
        u.observe("not json");
        u.observe(r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#);
        assert_eq!(u.usage(), None);
        assert!(u.streamed_text_tokens() > 0);
    }

    // --- request translation ----------------------------------------------------------------

    #[test]
    fn a_tool_loop_request_becomes_a_chat_request() {
        let out = chat(rich_request());
        assert_eq!(
            out,
            json!({
                "model": "claude-sonnet-4-5",
                "messages": [
                    {"role": "system", "content": "You are terse."},
                    {"role": "user", "content": [
                        {"type": "text", "text": "What is in this picture, and the weather in Paris?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
                    ]},
                    {"role": "assistant", "content": "A cat. Let me check the weather.", "tool_calls": [
                        {"id": "toolu_01", "type": "function",
                         "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\",\"unit\":\"c\"}"}}
                    ]},
                    {"role": "tool", "content": "18 degrees, sunny", "tool_call_id": "toolu_01"},
                    {"role": "user", "content": "And tomorrow?"}
                ],
                "max_completion_tokens": 1024,
                "temperature": 0.2,
                "stream": true,
                "stream_options": {"include_usage": true},
                "tools": [{"type": "function", "function": {"name": "get_weather",
                    "description": "Current weather for a city",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}}, "required": ["city"]}}}],
                "tool_choice": "auto"
            })
        );
    }

    fn with(fields: Value) -> Value {
        let mut req = json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in fields.as_object().unwrap() {
            req[k] = v.clone();
        }
        req
    }

    #[test]
    fn system_prompts() {
        let out = chat(with(json!({"system": "be brief"})));
        assert_eq!(
            out["messages"][0],
            json!({"role": "system", "content": "be brief"})
        );
        let out = chat(with(
            json!({"system": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}),
        ));
        assert_eq!(
            out["messages"][0],
            json!({"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]})
        );
        assert_eq!(out["messages"][1], json!({"role": "user", "content": "hi"}));
        assert!(
            chat_err(with(json!({"system": [{"type": "image", "source": {}}]})))
                .contains("`system[0]` must be a text block")
        );
    }

    #[test]
    fn sampling_and_plain_parameters() {
        let out = chat(with(
            json!({"stop_sequences": ["END", "\n\n"], "temperature": 1,
            "top_p": 0.9, "metadata": {"user_id": "u-42"}, "stream": false,
            "thinking": {"type": "disabled"}, "service_tier": "auto"}),
        ));
        assert_eq!(
            out,
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10,
                "temperature": 1.0, "top_p": 0.9, "stop": ["END", "\n\n"], "stream": false, "user": "u-42"})
        );
        // No stream options unless streaming; metadata without a user is nothing.
        let out = chat(with(json!({"metadata": {}})));
        assert!(out.get("stream_options").is_none() && out.get("user").is_none());
    }

    #[test]
    fn parameters_without_an_equivalent_are_refused_by_name() {
        let err = chat_err(with(json!({"top_k": 40})));
        assert!(
            err.starts_with("`top_k` is not supported by this model's provider"),
            "{err}"
        );
        let err = chat_err(with(
            json!({"thinking": {"type": "enabled", "budget_tokens": 2048}}),
        ));
        assert!(err.starts_with("`thinking` is not supported"), "{err}");
        let err = chat_err(with(
            json!({"tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]}),
        ));
        assert!(
            err.contains("`tools[0]`") && err.contains("web_search_20250305"),
            "{err}"
        );
        let err = chat_err(with(json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "read"},
            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}}]}]})));
        assert!(err.contains("`messages[0].content[1]`"), "{err}");
        let err = chat_err(with(json!({"messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "file", "file_id": "file_1"}}]}]})));
        assert!(
            err.contains("`messages[0].content[0].source`") && err.contains("`file`"),
            "{err}"
        );
        let err = chat_err(with(json!({"messages": [{"role": "user", "content": [
            {"type": "search_result", "source": "s", "title": "t", "content": []}]}]})));
        assert!(err.contains("`search_result` blocks"), "{err}");
        let err = chat_err(with(json!({"messages": [{"role": "user", "content": [
            {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]})));
        assert!(err.contains("`tool_use` blocks"), "{err}");
        let err = chat_err(with(json!({"messages": [{"role": "user", "content": [
            {"type": "tool_result", "content": "x"}]}]})));
        assert!(err.contains("tool_use_id` is missing"), "{err}");
        let err = chat_err(with(
            json!({"tool_choice": {"type": "tool"}, "tools": [{"name": "f", "input_schema": {}}]}),
        ));
        assert!(err.contains("`tool_choice.name`"), "{err}");
        let err = chat_err(with(
            json!({"tool_choice": {"type": "maybe"}, "tools": [{"name": "f", "input_schema": {}}]}),
        ));
        assert!(err.contains("`tool_choice.type`"), "{err}");
        // Malformed is malformed before anything is translated.
        assert!(chat_err(json!({"model": "m", "messages": []})).contains("max_tokens"));
    }

    #[test]
    fn user_content_blocks() {
        let out = chat(with(json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "only one"}]}]})));
        assert_eq!(
            out["messages"][0],
            json!({"role": "user", "content": "only one"})
        );
        let out = chat(with(json!({"messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://img/x.jpg"}},
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "notes"}},
            {"type": "text", "text": "compare"}]}]})));
        assert_eq!(
            out["messages"][0],
            json!({"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "https://img/x.jpg"}},
                {"type": "text", "text": "notes"},
                {"type": "text", "text": "compare"}]})
        );
        // An empty turn stays a turn.
        let out = chat(with(json!({"messages": [{"role": "user", "content": []}]})));
        assert_eq!(out["messages"][0], json!({"role": "user", "content": ""}));
    }

    #[test]
    fn tool_results_become_tool_messages_before_the_rest_of_the_turn() {
        let out = chat(with(json!({"messages": [
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "plan", "signature": "sig"},
                {"type": "tool_use", "id": "call_a", "name": "f", "input": {"x": 1}},
                {"type": "tool_use", "id": "call_b", "name": "g", "input": {}}]},
            {"role": "user", "content": [
                {"type": "text", "text": "both done"},
                {"type": "tool_result", "tool_use_id": "call_a", "content": "one"},
                {"type": "tool_result", "tool_use_id": "call_b", "is_error": true, "content": [
                    {"type": "text", "text": "line 1"}, {"type": "text", "text": "line 2"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/"}}]},
                {"type": "tool_result", "tool_use_id": "call_c"}]}
        ]})));
        assert_eq!(
            out["messages"],
            json!([
                {"role": "user", "content": "go"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}},
                    {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
                {"role": "tool", "content": "one", "tool_call_id": "call_a"},
                {"role": "tool", "content": "Error: line 1\nline 2", "tool_call_id": "call_b"},
                {"role": "tool", "content": "", "tool_call_id": "call_c"},
                {"role": "user", "content": [
                    {"type": "text", "text": "both done"},
                    {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/"}}]}
            ])
        );
        // A turn of tool results only adds no empty user message.
        let out = chat(with(json!({"messages": [{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t", "content": "r"}]}]})));
        assert_eq!(out["messages"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn assistant_turns() {
        let out = chat(with(json!({"messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "xx"}]}]})));
        assert_eq!(
            out["messages"],
            json!([
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": ""}
            ])
        );
        let err = chat_err(with(json!({"messages": [{"role": "assistant", "content": [
            {"type": "image", "source": {"type": "url", "url": "u"}}]}]})));
        assert!(err.contains("`image` blocks"), "{err}");
    }

    #[test]
    fn tools_and_tool_choice() {
        let tools = json!([
            {"name": "f", "description": "say \"hi\"\nnow", "input_schema": {"type": "object"}},
            {"type": "custom", "name": "g", "input_schema": {"type": "object", "properties": {}}, "strict": true}
        ]);
        let out = chat(with(json!({"tools": tools})));
        assert_eq!(
            out["tools"],
            json!([
                {"type": "function", "function": {"name": "f", "description": "say \"hi\"\nnow", "parameters": {"type": "object"}}},
                {"type": "function", "function": {"name": "g", "parameters": {"type": "object", "properties": {}}, "strict": true}}
            ])
        );
        assert!(out.get("tool_choice").is_none() && out.get("parallel_tool_calls").is_none());
        for (choice, want) in [
            (json!({"type": "auto"}), json!("auto")),
            (json!({"type": "any"}), json!("required")),
            (json!({"type": "none"}), json!("none")),
            (
                json!({"type": "tool", "name": "g"}),
                json!({"type": "function", "function": {"name": "g"}}),
            ),
        ] {
            let out = chat(with(json!({"tools": tools, "tool_choice": choice})));
            assert_eq!(out["tool_choice"], want);
            assert!(out.get("parallel_tool_calls").is_none());
        }
        let out = chat(with(json!({"tools": tools,
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true}})));
        assert_eq!(
            (&out["tool_choice"], &out["parallel_tool_calls"]),
            (&json!("required"), &json!(false))
        );
        // Without tools, a choice means nothing and OpenAI would refuse it.
        let out = chat(with(
            json!({"tool_choice": {"type": "auto", "disable_parallel_tool_use": true}}),
        ));
        assert!(out.get("tool_choice").is_none() && out.get("parallel_tool_calls").is_none());
    }

    // --- response translation ---------------------------------------------------------------

    fn completion(message: Value, finish_reason: Value) -> Vec<u8> {
        json!({"id": "chatcmpl-9", "object": "chat.completion", "created": 1, "model": "gpt-4o",
            "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150,
                "prompt_tokens_details": {"cached_tokens": 100}}})
        .to_string()
        .into_bytes()
    }

    fn message(chat_body: &[u8]) -> Value {
        serde_json::from_slice(&message_from_chat(chat_body, "claude-public").unwrap()).unwrap()
    }

    #[test]
    fn a_text_answer() {
        let out = message(&completion(
            json!({"role": "assistant", "content": "Hello!", "refusal": null}),
            json!("stop"),
        ));
        assert_eq!(
            out,
            json!({"id": "msg_chatcmpl-9", "type": "message", "role": "assistant", "model": "claude-public",
                "content": [{"type": "text", "text": "Hello!"}], "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": 20, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 100, "output_tokens": 30}})
        );
    }

    #[test]
    fn every_finish_reason() {
        for (finish, want) in [
            (json!("stop"), "end_turn"),
            (json!("length"), "max_tokens"),
            (json!("tool_calls"), "tool_use"),
            (json!("function_call"), "tool_use"),
            (json!("content_filter"), "refusal"),
            (json!(null), "end_turn"),
            (json!("eos"), "end_turn"),
        ] {
            let out = message(&completion(json!({"content": "x"}), finish.clone()));
            assert_eq!(out["stop_reason"], want, "{finish}");
        }
        let out = message(&completion(
            json!({"content": null, "refusal": "I can't help with that."}),
            json!("stop"),
        ));
        assert_eq!(out["stop_reason"], "refusal");
        assert_eq!(
            out["content"],
            json!([{"type": "text", "text": "I can't help with that."}])
        );
    }

    #[test]
    fn tool_calls_become_tool_use_blocks() {
        let out = message(&completion(
            json!({"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
                {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": ""}},
                {"type": "function", "function": {"name": "bad", "arguments": "{\"city\": \"Par"}},
                {"id": "call_4", "type": "function", "function": {"name": "list", "arguments": "[1,2]"}}]}),
            json!("tool_calls"),
        ));
        assert_eq!(
            out["content"],
            json!([
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "now", "input": {}},
                {"type": "tool_use", "id": "call_2", "name": "bad", "input": {"_raw": "{\"city\": \"Par"}},
                {"type": "tool_use", "id": "call_4", "name": "list", "input": {"_raw": "[1,2]"}}
            ])
        );
        assert_eq!(out["stop_reason"], "tool_use");
    }

    #[test]
    fn odd_completions() {
        // Content as parts, no usage: zeros, not a failure.
        let body = br#"{"id":"c","choices":[{"message":{"content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},"finish_reason":"stop"}]}"#;
        let out = message(body);
        assert_eq!(out["content"], json!([{"type": "text", "text": "ab"}]));
        assert_eq!(out["usage"]["output_tokens"], 0);
        // Choice 0 is the answer, wherever it is in the list.
        let body = br#"{"choices":[{"index":1,"message":{"content":"no"}},{"index":0,"message":{"content":"yes"}}]}"#;
        let out = message(body);
        assert_eq!(out["content"][0]["text"], "yes");
        assert_eq!(out["id"], "msg_tollgate");
        for body in [
            &br#"{"choices":[]}"#[..],
            br#"{"error":{"message":"x"}}"#,
            br#"{"choices":[{"index":0}]}"#,
            b"nope",
        ] {
            assert!(message_from_chat(body, "m").is_none());
        }
    }

    // --- stream translation -----------------------------------------------------------------

    /// An OpenAI stream as gpt-4o sends it: role, text, two tool calls with arguments in
    /// many pieces, the finish chunk, the usage chunk, `[DONE]`.
    fn openai_stream() -> Vec<u8> {
        let chunk = |choices: Value| {
            json!({"id": "chatcmpl-7", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
                "system_fingerprint": "fp", "choices": choices, "usage": null})
        };
        let delta = |d: Value| {
            chunk(json!([{"index": 0, "delta": d, "logprobs": null, "finish_reason": null}]))
        };
        let mut events = vec![
            delta(json!({"role": "assistant", "content": "", "refusal": null})),
            delta(json!({"content": "Let me "})),
            delta(json!({"content": "check “Paris” 🌦."})),
            delta(
                json!({"tool_calls": [{"index": 0, "id": "call_A", "type": "function",
                "function": {"name": "get_weather", "arguments": ""}}]}),
            ),
        ];
        for piece in ["{\"", "city", "\":\"", "Par", "is\"", "}"] {
            events.push(delta(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}),
            ));
        }
        events.push(delta(
            json!({"tool_calls": [{"index": 1, "id": "call_B", "type": "function",
            "function": {"name": "get_time", "arguments": "{\"tz\""}}]}),
        ));
        for piece in [":\"Europe/", "Paris\"}"] {
            events.push(delta(
                json!({"tool_calls": [{"index": 1, "function": {"arguments": piece}}]}),
            ));
        }
        events.push(chunk(
            json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "tool_calls"}]),
        ));
        let mut usage = chunk(json!([]));
        usage["usage"] = json!({"prompt_tokens": 80, "completion_tokens": 40, "total_tokens": 120,
            "prompt_tokens_details": {"cached_tokens": 64}});
        events.push(usage);
        let mut out = Vec::new();
        for e in events {
            out.extend_from_slice(format!("data: {e}\n\n").as_bytes());
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
        out
    }

    fn translate(chunks: &[&[u8]]) -> (Vec<u8>, MessagesStream) {
        let mut stream = MessagesStream::new("claude-public");
        let mut out = Vec::new();
        for chunk in chunks {
            stream.feed(chunk, &mut out);
        }
        stream.finish(&mut out);
        (out, stream)
    }

    /// The output as (event, data) pairs, checking each event names its data's type.
    fn events(out: &[u8]) -> Vec<(String, Value)> {
        let mut parser = SseParser::new();
        let mut events = Vec::new();
        parser.feed(out, |e| {
            let data: Value = serde_json::from_str(&e.data).unwrap();
            let name = e.event.unwrap();
            assert_eq!(data["type"], name.as_str());
            events.push((name, data));
        });
        assert!(
            parser.finish(|_| {}).is_empty(),
            "output ends with a whole event"
        );
        events
    }

    fn names(events: &[(String, Value)]) -> Vec<&str> {
        events.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[test]
    fn a_streamed_answer_with_text_and_two_tool_calls() {
        let input = openai_stream();
        let (out, stream) = translate(&[&input]);
        let events = events(&out);
        let data: Vec<Value> = events.iter().map(|(_, d)| d.clone()).collect();
        let mut want = vec![
            json!({"type": "message_start", "message": {"id": "msg_chatcmpl-7", "type": "message",
                "role": "assistant", "model": "claude-public", "content": [], "stop_reason": null,
                "stop_sequence": null, "usage": {"input_tokens": 0, "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0, "output_tokens": 0}}}),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me "}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "check “Paris” 🌦."}}),
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use",
                "id": "call_A", "name": "get_weather", "input": {}}}),
        ];
        for piece in ["{\"", "city", "\":\"", "Par", "is\"", "}"] {
            want.push(json!({"type": "content_block_delta", "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": piece}}));
        }
        want.push(json!({"type": "content_block_stop", "index": 1}));
        want.push(
            json!({"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use",
            "id": "call_B", "name": "get_time", "input": {}}}),
        );
        for piece in ["{\"tz\"", ":\"Europe/", "Paris\"}"] {
            want.push(json!({"type": "content_block_delta", "index": 2,
                "delta": {"type": "input_json_delta", "partial_json": piece}}));
        }
        want.push(json!({"type": "content_block_stop", "index": 2}));
        want.push(json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null},
            "usage": {"input_tokens": 16, "cache_read_input_tokens": 64, "output_tokens": 40}}));
        want.push(json!({"type": "message_stop"}));
        assert_eq!(data, want);
        assert_eq!(
            stream.usage(),
            Some(Usage {
                prompt_tokens: 80,
                completion_tokens: 40,
                cached_prompt_tokens: 64,
                cache_write_tokens: 0,
            })
        );
        let text = "Let me check “Paris” 🌦.";
        assert!(stream.streamed_tokens() >= tokens::estimate_text(text));
        // The exact bytes of the first events: what an SDK reads.
        assert!(out.starts_with(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_chatcmpl-7\""));
        assert!(out.ends_with(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
    }

    #[test]
    fn splitting_the_stream_anywhere_changes_nothing() {
        let input = openai_stream();
        let (whole, _) = translate(&[&input]);
        for at in 0..=input.len() {
            let (a, b) = input.split_at(at);
            let (split, stream) = translate(&[a, b]);
            assert!(split == whole, "split at {at}");
            assert_eq!(stream.usage().map(|u| u.completion_tokens), Some(40));
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert!(translate(&bytes).0 == whole, "one byte at a time");
    }

    #[test]
    fn events_go_out_as_soon_as_they_are_known() {
        let input = openai_stream();
        let mut stream = MessagesStream::new("m");
        let mut out = Vec::new();
        // Up to the end of the second content chunk: the start and two text deltas are out.
        let second = input.windows(9).position(|w| w == b"Let me \"}").unwrap();
        let end = second
            + input[second..]
                .windows(2)
                .position(|w| w == b"\n\n")
                .unwrap()
            + 2;
        stream.feed(&input[..end], &mut out);
        assert_eq!(
            names(&events(&out)),
            [
                "message_start",
                "content_block_start",
                "content_block_delta"
            ]
        );
    }

    #[test]
    fn the_usage_chunk_is_awaited_after_the_finish() {
        let finish = b"data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":\"stop\"}]}\n\n";
        let mut stream = MessagesStream::new("m");
        let mut out = Vec::new();
        stream.feed(finish, &mut out);
        assert_eq!(
            names(&events(&out)),
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop"
            ]
        );
        stream.feed(
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2}}\n\n",
            &mut out,
        );
        let events = events(&out);
        assert_eq!(events.len(), 6);
        assert_eq!(
            events[4].1,
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                "usage": {"input_tokens": 9, "cache_read_input_tokens": 0, "output_tokens": 2}})
        );
        assert_eq!(events[5].0, "message_stop");
        // [DONE] and the end add nothing.
        let before = out.len();
        stream.feed(b"data: [DONE]\n\n", &mut out);
        stream.finish(&mut out);
        assert_eq!(out.len(), before);
    }

    #[test]
    fn usage_on_the_finish_chunk_ends_the_message_at_once() {
        let input = b"data: {\"choices\":[{\"delta\":{\"content\":\"!\"},\"finish_reason\":\"length\"}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n";
        let mut stream = MessagesStream::new("m");
        let mut out = Vec::new();
        stream.feed(input, &mut out);
        let events = events(&out);
        assert_eq!(
            names(&events),
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(events[4].1["delta"]["stop_reason"], "max_tokens");
        assert_eq!(events[0].1["message"]["id"], "msg_tollgate");
    }

    #[test]
    fn done_without_usage_estimates_the_output() {
        let input = b"data: {\"choices\":[{\"delta\":{\"content\":\"Hello world\"}}]}\n\n\
            data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";
        let (out, stream) = translate(&[input]);
        let events = events(&out);
        assert_eq!(
            events[4].1["usage"],
            json!({"output_tokens": tokens::estimate_text("Hello world")})
        );
        assert_eq!(events[5].0, "message_stop");
        assert_eq!(stream.usage(), None);
    }

    /// Where the event holding `needle` starts in `input`.
    fn event_start(input: &[u8], needle: &[u8]) -> usize {
        let at = input
            .windows(needle.len())
            .position(|w| w == needle)
            .unwrap();
        input[..at].windows(2).rposition(|w| w == b"\n\n").unwrap() + 2
    }

    #[test]
    fn a_cut_stream_never_looks_complete() {
        let input = openai_stream();
        let finish_at = event_start(&input, b"\"finish_reason\":\"tool_calls\"");
        let usage_at = event_start(&input, b"\"prompt_tokens\"");
        // Before anything, inside the first event, before and inside the finish chunk, after
        // it (the content is whole, but the stream did not end as OpenAI ends one), and
        // inside the usage chunk.
        for cut in [0, 10, finish_at, finish_at + 5, usage_at, usage_at + 30] {
            let (out, _) = translate(&[&input[..cut]]);
            let events = events(&out);
            let names = names(&events);
            assert!(!names.contains(&"message_stop"), "cut at {cut}: {names:?}");
            assert_eq!(names.last(), Some(&"error"), "cut at {cut}");
            assert_eq!(
                events.last().unwrap().1["error"],
                json!({"type": "api_error", "message": INCOMPLETE})
            );
        }
        // [DONE] without a finish reason is a cut too.
        let (out, _) = translate(&[
            b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: [DONE]\n\n",
        ]);
        assert_eq!(names(&events(&out)).last(), Some(&"error"));
        // An empty body.
        let (out, _) = translate(&[b""]);
        assert_eq!(names(&events(&out)), ["error"]);
    }

    #[test]
    fn an_error_chunk_becomes_an_error_event() {
        let input = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n\
            data: {\"error\":{\"message\":\"upstream overloaded\",\"type\":\"server_error\"}}\n\n\
            data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n";
        let (out, _) = translate(&[input]);
        let events = events(&out);
        assert_eq!(
            names(&events),
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "error"
            ]
        );
        assert_eq!(
            events[3].1["error"],
            json!({"type": "api_error", "message": "upstream overloaded"})
        );
    }

    #[test]
    fn calls_sent_all_at_index_zero_are_told_apart_by_id() {
        let input = b"data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"a\",\"function\":{\"name\":\"f\",\"arguments\":\"{}\"}}]}}]}\n\n\
            data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"b\",\"function\":{\"name\":\"g\",\"arguments\":\"{\\\"x\\\":1}\"}}]}}]}\n\n\
            data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\ndata: [DONE]\n\n";
        let (out, _) = translate(&[input]);
        let events = events(&out);
        let blocks: Vec<&Value> = events
            .iter()
            .filter(|(n, _)| n == "content_block_start")
            .map(|(_, d)| &d["content_block"])
            .collect();
        assert_eq!(
            blocks,
            [
                &json!({"type": "tool_use", "id": "a", "name": "f", "input": {}}),
                &json!({"type": "tool_use", "id": "b", "name": "g", "input": {}})
            ]
        );
        assert_eq!(
            names(&events),
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(
            events[5].1,
            json!({"type": "content_block_delta", "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": "{\"x\":1}"}})
        );
        assert_eq!(events[7].1["delta"]["stop_reason"], "tool_use");
    }

    #[test]
    fn refusals_and_reasoning() {
        let input =
            b"data: {\"choices\":[{\"delta\":{\"reasoning_content\":\"thinking hard\"}}]}\n\n\
            data: {\"choices\":[{\"delta\":{\"content\":null,\"refusal\":\"I can't\"}}]}\n\n\
            data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";
        let (out, stream) = translate(&[input]);
        let events = events(&out);
        assert_eq!(
            events[2].1["delta"],
            json!({"type": "text_delta", "text": "I can't"})
        );
        assert_eq!(events[4].1["delta"]["stop_reason"], "refusal");
        // Reasoning is not shown, but it is billed.
        assert!(!String::from_utf8_lossy(&out).contains("thinking hard"));
        assert_eq!(
            stream.streamed_tokens(),
            tokens::estimate_text("thinking hard") + tokens::estimate_text("I can't")
        );
    }

    #[test]
    fn an_oversized_event_fails_the_stream() {
        let mut stream = MessagesStream::new("m");
        let mut out = Vec::new();
        stream.feed(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: \"",
            &mut out,
        );
        stream.feed(&vec![b'x'; MAX_EVENT_BYTES], &mut out);
        stream.feed(b"\"\n\n", &mut out);
        stream.finish(&mut out);
        let events = events(&out);
        assert_eq!(names(&events).last(), Some(&"error"));
        assert_eq!(names(&events).iter().filter(|n| **n == "error").count(), 1);
    }

    // --- errors -----------------------------------------------------------------------------

    #[test]
    fn error_bodies_by_status() {
        for (status, kind) in [
            (400, "invalid_request_error"),
            (401, "authentication_error"),
            (402, "billing_error"),
            (403, "permission_error"),
            (404, "not_found_error"),
            (405, "invalid_request_error"),
            (408, "invalid_request_error"),
            (413, "request_too_large"),
            (429, "rate_limit_error"),
            (500, "api_error"),
            (502, "api_error"),
            (503, "api_error"),
            (504, "timeout_error"),
            (529, "overloaded_error"),
        ] {
            let body: Value = serde_json::from_slice(&error_body(status, "why \"so\"")).unwrap();
            assert_eq!(
                body,
                json!({"type": "error", "error": {"type": kind, "message": "why \"so\""}}),
                "{status}"
            );
        }
        assert_eq!(
            error_body(429, "slow down"),
            br#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#
        );
    }

    #[test]
    fn openai_errors_keep_their_message() {
        let cases: [(u16, &[u8], &str, &str); 7] = [
            (
                429,
                br#"{"error":{"message":"Rate limit reached: `per-minute`.","type":"rate_limit_exceeded","param":null,"code":"rate_limit_exceeded"}}"#,
                "rate_limit_error",
                "Rate limit reached: `per-minute`.",
            ),
            (
                400,
                br#"{"error":"bad input"}"#,
                "invalid_request_error",
                "bad input",
            ),
            (
                400,
                br#"{"object":"error","message":"vLLM says no","type":"BadRequestError","code":400}"#,
                "invalid_request_error",
                "vLLM says no",
            ),
            (
                422,
                br#"{"detail":"field required"}"#,
                "invalid_request_error",
                "field required",
            ),
            (
                502,
                b"<html>Bad Gateway</html>\n",
                "api_error",
                "<html>Bad Gateway</html>",
            ),
            (
                503,
                b"",
                "api_error",
                "The model's provider answered with status 503.",
            ),
            (
                529,
                br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
                "overloaded_error",
                "Overloaded",
            ),
        ];
        for (status, body, kind, message) in cases {
            let out: Value = serde_json::from_slice(&error_from_openai(status, body)).unwrap();
            assert_eq!(
                out,
                json!({"type": "error", "error": {"type": kind, "message": message}}),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let long = vec![b'x'; 5000];
        let out: Value = serde_json::from_slice(&error_from_openai(500, &long)).unwrap();
        assert_eq!(
            out["error"]["message"].as_str().unwrap().len(),
            MAX_RAW_MESSAGE_CHARS
        );
    }

    // proptest does not build for wasm32-wasip1; the property tests run on the host.
    #[cfg(not(target_family = "wasm"))]
    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn any_cut_points_give_the_same_stream(mut cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12)) {
                let input = openai_stream();
                let (whole, _) = translate(&[&input]);
                let mut at: Vec<usize> = cuts.drain(..).map(|i| i.index(input.len() + 1)).collect();
                at.sort_unstable();
                let mut chunks: Vec<&[u8]> = Vec::new();
                let mut from = 0;
                for to in at {
                    chunks.push(&input[from..to]);
                    from = to;
                }
                chunks.push(&input[from..]);
                let (split, stream) = translate(&chunks);
                prop_assert!(split == whole);
                prop_assert_eq!(stream.usage().map(|u| u.prompt_tokens), Some(80));
            }
        }
    }
}
