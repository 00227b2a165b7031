//! OpenAI clients calling Anthropic models: a chat request becomes a Messages request, and the
//! Messages answer (JSON, error or SSE) becomes what OpenAI would have sent. Pure functions and
//! one stream state struct; the exchange owns IO, limits and retries and must not look inside.
//!
//! Requests are refused (`Unsupported`) only where Anthropic cannot honour a parameter that
//! changes the meaning of the answer; hints that only tune sampling or cost are dropped.
//!
//! The stream, event by event (`ChatStream`):
//!
//! ```text
//! message_start                    -> chunk: role "assistant", content ""
//! content_block_start  text        -> chunk: its text, if any
//! content_block_start  tool_use    -> chunk: tool_calls[k] id, name, arguments ""  (k counts tool_use blocks)
//! content_block_delta  text_delta  -> chunk: content
//! content_block_delta  input_json  -> chunk: tool_calls[k].function.arguments
//! content_block_stop   tool_use    -> chunk: arguments "{}", if none were streamed
//! thinking, server tools, unknown  -> nothing
//! message_delta                    -> chunk: finish_reason; usage updated
//! message_stop                     -> usage chunk (include_usage), then [DONE]; completed
//! ping                             -> `: ping` comment (keeps idle connections open)
//! error                            -> OpenAI error chunk; the stream ends without [DONE]
//! ```

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::providers::openai::usage::Usage;
use crate::sse::{SseEvent, SseParser};
use crate::tokens;

/// A chat request parameter Anthropic cannot honour: the client gets 400 naming it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    pub param: String,
    pub reason: String,
}

fn unsupported(param: impl Into<String>, reason: impl Into<String>) -> Unsupported {
    Unsupported {
        param: param.into(),
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Request: chat completion → Messages
// ---------------------------------------------------------------------------------------------

/// Chat request (JSON body, already carrying the gateway's edits such as decorator messages) →
/// Messages request body.
///
/// Ignored on purpose, since Anthropic has no equivalent and the answer means the same without
/// them: `seed` (OpenAI's determinism is best effort, never a promise a client can observe),
/// `reasoning_effort`, `service_tier`, `store`, `metadata`, `prediction`, `stream_options`
/// (Anthropic always reports usage), message `name`s, unknown fields.
pub fn messages_request(
    chat_body: &[u8],
    upstream_model: &str,
    default_max_tokens: u64,
) -> Result<Vec<u8>, Unsupported> {
    let mut de = serde_json::Deserializer::from_slice(chat_body);
    let chat: ChatIn = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        // The path is `.` at the root and `?` where a syntax error lost it.
        let path = e.path().to_string();
        let param = if path == "." || path == "?" {
            "body".to_string()
        } else {
            path
        };
        unsupported(
            param,
            format!("not a valid chat completion request ({})", e.inner()),
        )
    })?;
    de.end()
        .map_err(|e| unsupported("body", format!("not a valid chat completion request ({e})")))?;
    refuse_unsupported(&chat)?;

    let mut system = Vec::new();
    let mut turns: Vec<Turn> = Vec::new();
    for (i, m) in chat.messages.iter().enumerate() {
        let (role, blocks) = match m.role.as_ref() {
            "system" | "developer" => {
                system_texts(i, m.content.as_ref(), &mut system)?;
                continue;
            }
            "user" => ("user", content_blocks(i, m.content.as_ref())?),
            "assistant" => {
                let mut blocks = content_blocks(i, m.content.as_ref())?;
                for (j, call) in m.tool_calls.iter().flatten().enumerate() {
                    blocks.push(tool_use(i, j, call)?);
                }
                ("assistant", blocks)
            }
            "tool" => ("user", vec![tool_result(i, m)?]),
            other => {
                return Err(unsupported(
                    format!("messages[{i}].role"),
                    format!("the role `{other}` has no Anthropic equivalent"),
                ))
            }
        };
        if blocks.is_empty() {
            // Anthropic refuses empty turns; an empty message says nothing anyway.
            continue;
        }
        // Anthropic requires user and assistant turns to alternate.
        match turns.last_mut() {
            Some(turn) if turn.role == role => turn.content.extend(blocks),
            _ => turns.push(Turn {
                role,
                content: blocks,
            }),
        }
    }
    for turn in &mut turns {
        // Anthropic wants a turn's tool results before its text; the sort is stable.
        turn.content
            .sort_by_key(|b| !matches!(b, Block::ToolResult { .. }));
    }

    let tools: Vec<ToolOut> = chat
        .tools
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, t)| tool(i, t))
        .collect::<Result<_, _>>()?;
    let tool_choice = tool_choice(&chat, !tools.is_empty())?;
    // Anthropic refuses empty stop sequences; they never match anyway.
    let stop_sequences: Vec<&str> = match &chat.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.as_ref()],
        Some(Stop::Many(v)) => v.iter().map(|s| s.as_ref()).collect(),
    };
    let stop_sequences: Vec<&str> = stop_sequences
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect();
    let request = MessagesOut {
        model: upstream_model,
        max_tokens: chat
            .max_completion_tokens
            .or(chat.max_tokens)
            .unwrap_or(default_max_tokens),
        system: match system.as_slice() {
            [] => None,
            [one] => Some(System::Text(one)),
            _ => Some(System::Blocks(
                system.iter().map(|text| Block::Text { text }).collect(),
            )),
        },
        messages: turns,
        temperature: chat.temperature,
        top_p: chat.top_p,
        stop_sequences: (!stop_sequences.is_empty()).then_some(stop_sequences),
        metadata: chat.user.as_ref().map(|u| Metadata { user_id: &u.0 }),
        tools: (!tools.is_empty()).then_some(tools),
        tool_choice,
        stream: chat.stream,
    };
    serde_json::to_vec(&request).map_err(|e| unsupported("body", e.to_string()))
}

/// Refuses the parameters whose effect Anthropic cannot reproduce.
fn refuse_unsupported(chat: &ChatIn) -> Result<(), Unsupported> {
    if chat.n.is_some_and(|n| n > 1) {
        return Err(unsupported(
            "n",
            "Anthropic generates one choice per request",
        ));
    }
    if chat.logprobs == Some(true) {
        return Err(unsupported(
            "logprobs",
            "Anthropic does not return log probabilities",
        ));
    }
    if chat.top_logprobs.is_some_and(|k| k > 0) {
        return Err(unsupported(
            "top_logprobs",
            "Anthropic does not return log probabilities",
        ));
    }
    if let Some(t) = chat.temperature {
        if !(0.0..=1.0).contains(&t) {
            return Err(unsupported(
                "temperature",
                "Anthropic accepts a temperature from 0 to 1",
            ));
        }
    }
    if let Some(format) = &chat.response_format {
        if format.kind != "text" {
            // Anthropic's structured outputs need a beta header, and a forced tool would
            // change the answer's shape: no faithful mapping in a body.
            return Err(unsupported(
                "response_format",
                format!(
                    "Anthropic has no equivalent of the `{}` response format",
                    format.kind
                ),
            ));
        }
    }
    if chat.audio.is_some() {
        return Err(unsupported(
            "audio",
            "Anthropic models do not produce audio",
        ));
    }
    if chat.modalities.iter().flatten().any(|m| m != "text") {
        return Err(unsupported(
            "modalities",
            "Anthropic models produce text only",
        ));
    }
    for (param, value) in [
        ("presence_penalty", chat.presence_penalty),
        ("frequency_penalty", chat.frequency_penalty),
    ] {
        if value.is_some_and(|v| v != 0.0) {
            return Err(unsupported(param, "Anthropic has no repetition penalties"));
        }
    }
    if chat.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
        return Err(unsupported("logit_bias", "Anthropic does not bias tokens"));
    }
    if chat.functions.as_ref().is_some_and(|f| !f.is_empty()) {
        return Err(unsupported(
            "functions",
            "deprecated `functions` are not translated: use `tools`",
        ));
    }
    if chat.web_search_options.is_some() {
        return Err(unsupported(
            "web_search_options",
            "web search is not available through this gateway for Anthropic models",
        ));
    }
    Ok(())
}

/// Appends a system or developer message's text to the top-level `system`.
fn system_texts<'b>(
    i: usize,
    content: Option<&'b ContentIn<'_>>,
    system: &mut Vec<&'b str>,
) -> Result<(), Unsupported> {
    match content {
        None => {}
        Some(ContentIn::Text(t)) => system.extend((!t.is_empty()).then_some(t.as_ref())),
        Some(ContentIn::Parts(parts)) => {
            for (j, part) in parts.iter().enumerate() {
                match (part.kind.as_ref(), &part.text) {
                    ("text", Some(t)) => system.extend((!t.0.is_empty()).then_some(t.0.as_ref())),
                    (kind, _) => {
                        return Err(unsupported(
                            format!("messages[{i}].content[{j}]"),
                            format!("Anthropic's system prompt takes text, not `{kind}` parts"),
                        ))
                    }
                }
            }
        }
    }
    Ok(())
}

/// A user or assistant message's content as blocks; empty text is left out.
fn content_blocks<'b>(
    i: usize,
    content: Option<&'b ContentIn<'_>>,
) -> Result<Vec<Block<'b>>, Unsupported> {
    match content {
        None => Ok(Vec::new()),
        Some(ContentIn::Text(t)) if t.is_empty() => Ok(Vec::new()),
        Some(ContentIn::Text(t)) => Ok(vec![Block::Text { text: t }]),
        Some(ContentIn::Parts(parts)) => {
            let mut blocks = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                blocks.extend(part_block(part, || format!("messages[{i}].content[{j}]"))?);
            }
            Ok(blocks)
        }
    }
}

/// One content part as a block; None for empty text.
fn part_block<'b>(
    part: &'b PartIn<'_>,
    at: impl Fn() -> String,
) -> Result<Option<Block<'b>>, Unsupported> {
    let text = |t: &'b Option<Str<'_>>| {
        Ok(t.as_ref()
            .map(|t| t.0.as_ref())
            .filter(|t| !t.is_empty())
            .map(|text| Block::Text { text }))
    };
    match part.kind.as_ref() {
        "text" => text(&part.text),
        // An assistant's earlier refusal is what it said.
        "refusal" => text(&part.refusal),
        "image_url" => {
            let url = part
                .image_url
                .as_ref()
                .map(|u| u.url.as_ref())
                .ok_or_else(|| unsupported(at() + ".image_url", "an image part needs a URL"))?;
            let source = if let Some((media_type, data)) = data_url(url) {
                Source::Base64 { media_type, data }
            } else if url.starts_with("https://") || url.starts_with("http://") {
                Source::Url { url }
            } else {
                return Err(unsupported(
                    at() + ".image_url.url",
                    "Anthropic takes images as http(s) URLs or base64 `data:` URLs",
                ));
            };
            Ok(Some(Block::Image { source }))
        }
        "file" => {
            // A PDF sent inline maps to a document block; file ids live at OpenAI only.
            let pdf = part
                .file
                .as_ref()
                .and_then(|f| f.file_data.as_ref())
                .and_then(|d| data_url(&d.0))
                .filter(|(media_type, _)| *media_type == "application/pdf");
            match pdf {
                Some((media_type, data)) => Ok(Some(Block::Document {
                    source: Source::Base64 { media_type, data },
                })),
                None => Err(unsupported(
                    at() + ".file",
                    "Anthropic takes files as base64 `data:application/pdf` in `file_data`",
                )),
            }
        }
        kind => Err(unsupported(
            at(),
            format!("content parts of type `{kind}` have no Anthropic equivalent"),
        )),
    }
}

/// `data:<media type>[;params];base64,<data>` → (media type, data).
fn data_url(url: &str) -> Option<(&str, &str)> {
    let (meta, data) = url.strip_prefix("data:")?.split_once(',')?;
    let media_type = meta.strip_suffix(";base64")?.split(';').next()?;
    (!media_type.is_empty()).then_some((media_type, data))
}

/// An assistant's tool call as a `tool_use` block; Anthropic wants the arguments parsed.
fn tool_use<'b>(i: usize, j: usize, call: &'b ToolCallIn<'_>) -> Result<Block<'b>, Unsupported> {
    let at = |field: &str| format!("messages[{i}].tool_calls[{j}].{field}");
    if call.kind.as_ref().is_some_and(|k| k.0 != "function") {
        return Err(unsupported(
            at("type"),
            "only function tool calls have an Anthropic equivalent",
        ));
    }
    let arguments = call
        .function
        .arguments
        .as_ref()
        .map_or("", |a| a.0.as_ref());
    let input = if arguments.trim().is_empty() {
        // A call without arguments; Anthropic's input is always an object.
        ToolInput::Empty(EmptyObject {})
    } else {
        match serde_json::from_str::<Box<RawValue>>(arguments) {
            Ok(raw) if raw.get().trim_start().starts_with('{') => ToolInput::Parsed(raw),
            _ => {
                return Err(unsupported(
                    at("function.arguments"),
                    "Anthropic needs tool call arguments that are a JSON object",
                ))
            }
        }
    };
    Ok(Block::ToolUse {
        id: &call.id,
        name: &call.function.name,
        input,
    })
}

/// A `tool` message as a `tool_result` block of a user turn.
fn tool_result<'b>(i: usize, m: &'b ChatMessageIn<'_>) -> Result<Block<'b>, Unsupported> {
    let tool_use_id = m
        .tool_call_id
        .as_ref()
        .map(|s| s.0.as_ref())
        .ok_or_else(|| {
            unsupported(
                format!("messages[{i}].tool_call_id"),
                "a tool message must name the tool call it answers",
            )
        })?;
    let content = match &m.content {
        None => None,
        Some(ContentIn::Text(t)) => (!t.is_empty()).then_some(ToolResultContent::Text(t)),
        Some(ContentIn::Parts(_)) => {
            let blocks = content_blocks(i, m.content.as_ref())?;
            (!blocks.is_empty()).then_some(ToolResultContent::Blocks(blocks))
        }
    };
    Ok(Block::ToolResult {
        tool_use_id,
        content,
    })
}

fn tool<'b>(i: usize, t: &'b ToolIn<'_>) -> Result<ToolOut<'b>, Unsupported> {
    if t.kind != "function" {
        return Err(unsupported(
            format!("tools[{i}].type"),
            format!("tools of type `{}` have no Anthropic equivalent", t.kind),
        ));
    }
    let function = t.function.as_ref().ok_or_else(|| {
        unsupported(
            format!("tools[{i}].function"),
            "a function tool needs a function",
        )
    })?;
    Ok(ToolOut {
        name: &function.name,
        description: function.description.as_ref().map(|d| d.0.as_ref()),
        input_schema: match function.parameters {
            Some(schema) => InputSchema::Given(schema),
            None => InputSchema::Default(ObjectSchema { kind: "object" }),
        },
    })
}

/// `tool_choice` and `parallel_tool_calls`, as Anthropic's `tool_choice`.
fn tool_choice<'b>(
    chat: &'b ChatIn<'_>,
    has_tools: bool,
) -> Result<Option<ToolChoiceOut<'b>>, Unsupported> {
    let choice = |kind, name| ToolChoiceOut {
        kind,
        name,
        disable_parallel_tool_use: false,
    };
    let bad = || {
        unsupported(
            "tool_choice",
            "expected auto, none, required or a named function",
        )
    };
    let mut out = match &chat.tool_choice {
        None => None,
        Some(ToolChoiceIn::Mode(mode)) => Some(match mode.as_ref() {
            "auto" => choice("auto", None),
            "none" => choice("none", None),
            "required" => choice("any", None),
            _ => return Err(bad()),
        }),
        Some(ToolChoiceIn::Named(named)) if named.kind == "function" => {
            let name = named.function.as_ref().ok_or_else(bad)?;
            Some(choice("tool", Some(name.name.as_ref())))
        }
        Some(ToolChoiceIn::Named(_)) => return Err(bad()),
    };
    if !has_tools {
        // Without tools, "auto" and "none" mean what no choice means; Anthropic may refuse them.
        out = out.filter(|c| c.kind != "auto" && c.kind != "none");
    } else if chat.parallel_tool_calls == Some(false) {
        let c = out.get_or_insert_with(|| choice("auto", None));
        // "none" calls no tool at all, and Anthropic takes the flag only on the others.
        c.disable_parallel_tool_use = c.kind != "none";
    }
    Ok(out)
}

// Chat request wire types: only what the translation reads.

/// A string that serde borrows from the input when it has no escapes. Not an
/// `Option<Cow<str>>`: serde borrows a `Cow` only when it is the field's whole type.
#[derive(Debug, Deserialize)]
struct Str<'a>(#[serde(borrow)] Cow<'a, str>);

#[derive(Deserialize)]
struct ChatIn<'a> {
    #[serde(borrow)]
    messages: Vec<ChatMessageIn<'a>>,
    stream: Option<bool>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    #[serde(borrow)]
    stop: Option<Stop<'a>>,
    #[serde(borrow)]
    user: Option<Str<'a>>,
    n: Option<u64>,
    logprobs: Option<bool>,
    top_logprobs: Option<u64>,
    #[serde(borrow)]
    response_format: Option<ResponseFormatIn<'a>>,
    #[serde(borrow)]
    modalities: Option<Vec<Cow<'a, str>>>,
    #[serde(borrow)]
    audio: Option<&'a RawValue>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    logit_bias: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(borrow)]
    tools: Option<Vec<ToolIn<'a>>>,
    #[serde(borrow)]
    tool_choice: Option<ToolChoiceIn<'a>>,
    parallel_tool_calls: Option<bool>,
    functions: Option<Vec<serde::de::IgnoredAny>>,
    #[serde(borrow)]
    web_search_options: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ChatMessageIn<'a> {
    #[serde(borrow)]
    role: Cow<'a, str>,
    #[serde(borrow)]
    content: Option<ContentIn<'a>>,
    #[serde(borrow)]
    tool_calls: Option<Vec<ToolCallIn<'a>>>,
    #[serde(borrow)]
    tool_call_id: Option<Str<'a>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ContentIn<'a> {
    Text(#[serde(borrow)] Cow<'a, str>),
    Parts(#[serde(borrow)] Vec<PartIn<'a>>),
}

#[derive(Deserialize)]
struct PartIn<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    text: Option<Str<'a>>,
    #[serde(borrow)]
    refusal: Option<Str<'a>>,
    #[serde(borrow)]
    image_url: Option<ImageUrlIn<'a>>,
    #[serde(borrow)]
    file: Option<FileIn<'a>>,
}

#[derive(Deserialize)]
struct ImageUrlIn<'a> {
    #[serde(borrow)]
    url: Cow<'a, str>,
}

#[derive(Deserialize)]
struct FileIn<'a> {
    #[serde(borrow)]
    file_data: Option<Str<'a>>,
}

#[derive(Deserialize)]
struct ToolCallIn<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(rename = "type", borrow)]
    kind: Option<Str<'a>>,
    #[serde(borrow)]
    function: FunctionCallIn<'a>,
}

#[derive(Deserialize)]
struct FunctionCallIn<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(borrow)]
    arguments: Option<Str<'a>>,
}

#[derive(Deserialize)]
struct ToolIn<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    function: Option<FunctionDefIn<'a>>,
}

#[derive(Deserialize)]
struct FunctionDefIn<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(borrow)]
    description: Option<Str<'a>>,
    #[serde(borrow)]
    parameters: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ToolChoiceIn<'a> {
    Mode(#[serde(borrow)] Cow<'a, str>),
    Named(#[serde(borrow)] NamedToolChoiceIn<'a>),
}

#[derive(Deserialize)]
struct NamedToolChoiceIn<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    function: Option<NamedFunctionIn<'a>>,
}

#[derive(Deserialize)]
struct NamedFunctionIn<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop<'a> {
    One(#[serde(borrow)] Cow<'a, str>),
    Many(#[serde(borrow)] Vec<Cow<'a, str>>),
}

#[derive(Deserialize)]
struct ResponseFormatIn<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
}

// Messages request wire types.

#[derive(Serialize)]
struct MessagesOut<'b> {
    model: &'b str,
    max_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<System<'b>>,
    messages: Vec<Turn<'b>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_sequences: Option<Vec<&'b str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<Metadata<'b>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<Vec<ToolOut<'b>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<ToolChoiceOut<'b>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<bool>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum System<'b> {
    Text(&'b str),
    Blocks(Vec<Block<'b>>),
}

#[derive(Serialize)]
struct Turn<'b> {
    role: &'static str,
    content: Vec<Block<'b>>,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block<'b> {
    Text {
        text: &'b str,
    },
    Image {
        source: Source<'b>,
    },
    Document {
        source: Source<'b>,
    },
    ToolUse {
        id: &'b str,
        name: &'b str,
        input: ToolInput,
    },
    ToolResult {
        tool_use_id: &'b str,
        #[serde(skip_serializing_if = "Option::is_none")]
        content: Option<ToolResultContent<'b>>,
    },
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Source<'b> {
    Base64 { media_type: &'b str, data: &'b str },
    Url { url: &'b str },
}

#[derive(Serialize)]
#[serde(untagged)]
enum ToolInput {
    Parsed(Box<RawValue>),
    Empty(EmptyObject),
}

#[derive(Serialize)]
struct EmptyObject {}

#[derive(Serialize)]
#[serde(untagged)]
enum ToolResultContent<'b> {
    Text(&'b str),
    Blocks(Vec<Block<'b>>),
}

#[derive(Serialize)]
struct Metadata<'b> {
    user_id: &'b str,
}

#[derive(Serialize)]
struct ToolOut<'b> {
    name: &'b str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'b str>,
    input_schema: InputSchema<'b>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum InputSchema<'b> {
    Given(&'b RawValue),
    Default(ObjectSchema),
}

/// `{"type":"object"}`: a function without `parameters` takes none.
#[derive(Serialize)]
struct ObjectSchema {
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct ToolChoiceOut<'b> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'b str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    disable_parallel_tool_use: bool,
}

// ---------------------------------------------------------------------------------------------
// Response: Messages → chat completion
// ---------------------------------------------------------------------------------------------

/// Messages response body (JSON) → chat completion body, and its usage if it has a readable
/// one. None if not a Messages response.
///
/// `thinking` blocks are left out: OpenAI's chat completion has no standard field for them
/// (`reasoning_content` is a DeepSeek convention), and clients that do not know them would
/// show the model's scratch work as its answer. Server tool blocks (web search) are left out
/// too: the client did not define those tools.
pub fn chat_completion(
    messages_body: &[u8],
    public_model: &str,
    created_s: u64,
) -> Option<(Vec<u8>, Option<Usage>)> {
    let message: MessageBodyIn = serde_json::from_slice(messages_body).ok()?;
    if message.kind.as_ref().is_some_and(|k| k.0 != "message") {
        return None;
    }
    let counts = message.usage.as_ref().and_then(Counts::from_wire);
    let mut content: Option<Cow<str>> = None;
    let mut tool_calls = Vec::new();
    for block in &message.content {
        match block.kind.as_ref() {
            "text" => {
                let text = block.text.as_ref().map_or("", |t| t.0.as_ref());
                match &mut content {
                    None => content = Some(Cow::Borrowed(text)),
                    Some(c) => c.to_mut().push_str(text),
                }
            }
            "tool_use" => tool_calls.push(ToolCallOut {
                id: block.id.as_ref().map_or("", |s| s.0.as_ref()),
                kind: "function",
                function: FunctionOut {
                    name: block.name.as_ref().map_or("", |s| s.0.as_ref()),
                    arguments: block.input.map_or("{}", RawValue::get),
                },
            }),
            _ => {}
        }
    }
    let usage = counts.map(|c| c.usage());
    let completion = CompletionOut {
        id: format!("{ID_PREFIX}{}", message.id),
        object: "chat.completion",
        created: created_s,
        model: public_model,
        choices: [CompletionChoice {
            index: 0,
            message: AssistantOut {
                role: "assistant",
                content: content.as_deref(),
                refusal: None,
                tool_calls,
            },
            logprobs: None,
            finish_reason: finish_reason(message.stop_reason.as_ref().map(|s| s.0.as_ref())),
        }],
        usage: usage.map(UsageOut::from),
    };
    Some((serde_json::to_vec(&completion).ok()?, usage))
}

/// Chat completion ids are Anthropic's message ids behind OpenAI's prefix, so logs on both
/// sides match.
const ID_PREFIX: &str = "chatcmpl-";

/// Anthropic's `stop_reason` → OpenAI's `finish_reason`. `pause_turn` (a server tool paused a
/// long turn) returns a whole answer so far: "stop"; so do reasons added after this was written.
fn finish_reason(stop_reason: Option<&str>) -> &'static str {
    match stop_reason {
        Some("max_tokens" | "model_context_window_exceeded") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        _ => "stop",
    }
}

/// Token counts as Anthropic reports them: input excludes the cached parts.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    input: u64,
    output: u64,
    cache_read: u64,
    cache_write: u64,
}

impl Counts {
    /// None without both input and output counts: billing a missing count as zero is wrong.
    fn from_wire(u: &WireUsage) -> Option<Self> {
        Some(Counts {
            input: u.input_tokens?,
            output: u.output_tokens?,
            cache_read: u.cache_read_input_tokens.unwrap_or(0),
            cache_write: u.cache_creation_input_tokens.unwrap_or(0),
        })
    }

    /// OpenAI's prompt tokens include the cached ones; Anthropic's input tokens do not.
    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self
                .input
                .saturating_add(self.cache_read)
                .saturating_add(self.cache_write),
            completion_tokens: self.output,
            cached_prompt_tokens: self.cache_read,
            cache_write_tokens: self.cache_write,
        }
    }
}

// Messages response wire types. Tolerant: unknown blocks and fields are ignored.

#[derive(Deserialize)]
struct MessageBodyIn<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Str<'a>>,
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    content: Vec<BlockIn<'a>>,
    #[serde(borrow)]
    stop_reason: Option<Str<'a>>,
    /// Absent from some Anthropic-compatible servers: the answer still goes to the client,
    /// and the exchange charges the reservation instead.
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct BlockIn<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    text: Option<Str<'a>>,
    #[serde(borrow)]
    id: Option<Str<'a>>,
    #[serde(borrow)]
    name: Option<Str<'a>>,
    #[serde(borrow)]
    input: Option<&'a RawValue>,
}

#[derive(Deserialize, Default, Clone, Copy)]
struct WireUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
}

// Chat completion wire types.

#[derive(Serialize)]
struct CompletionOut<'b> {
    id: String,
    object: &'static str,
    created: u64,
    model: &'b str,
    choices: [CompletionChoice<'b>; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<UsageOut>,
}

#[derive(Serialize)]
struct CompletionChoice<'b> {
    index: u32,
    message: AssistantOut<'b>,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct AssistantOut<'b> {
    role: &'static str,
    content: Option<&'b str>,
    refusal: Option<()>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<ToolCallOut<'b>>,
}

#[derive(Serialize)]
struct ToolCallOut<'b> {
    id: &'b str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: FunctionOut<'b>,
}

#[derive(Serialize)]
struct FunctionOut<'b> {
    name: &'b str,
    arguments: &'b str,
}

#[derive(Serialize)]
struct UsageOut {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    prompt_tokens_details: PromptDetailsOut,
}

#[derive(Serialize)]
struct PromptDetailsOut {
    cached_tokens: u64,
}

impl From<Usage> for UsageOut {
    fn from(u: Usage) -> Self {
        UsageOut {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total(),
            prompt_tokens_details: PromptDetailsOut {
                cached_tokens: u.cached_prompt_tokens,
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Anthropic's error body → an OpenAI-shaped error body `{"error":{"message","type","param",
/// "code"}}`; None for a body that is not Anthropic's error.
pub fn openai_error(messages_error_body: &[u8]) -> Option<Vec<u8>> {
    let body: ErrorBodyIn = serde_json::from_slice(messages_error_body).ok()?;
    if body.kind.as_ref().is_some_and(|k| k.0 != "error") {
        return None;
    }
    serde_json::to_vec(&ErrorOut::from(&body.error)).ok()
}

/// Anthropic's error type → OpenAI's (`type`, `code`). Types follow the gateway's own errors
/// (`crate::error`); codes are OpenAI's where it has one of the same meaning, else
/// Anthropic's name, so clients can still tell overload from other server errors.
fn openai_kind(anthropic: &str) -> (&'static str, &str) {
    match anthropic {
        "invalid_request_error" => ("invalid_request_error", "invalid_request_error"),
        "request_too_large" => ("invalid_request_error", "request_too_large"),
        "authentication_error" => ("authentication_error", "authentication_error"),
        "permission_error" => ("permission_error", "permission_error"),
        "not_found_error" => ("not_found_error", "not_found"),
        "rate_limit_error" => ("rate_limit_error", "rate_limit_exceeded"),
        "billing_error" => ("insufficient_quota", "insufficient_quota"),
        "overloaded_error" => ("api_error", "overloaded"),
        "timeout_error" => ("api_error", "timeout"),
        other => ("api_error", other),
    }
}

#[derive(Deserialize)]
struct ErrorBodyIn<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Str<'a>>,
    #[serde(borrow)]
    error: ErrorDetailIn<'a>,
}

#[derive(Deserialize)]
struct ErrorDetailIn<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    message: Cow<'a, str>,
}

#[derive(Serialize)]
struct ErrorOut<'b> {
    error: ErrorInnerOut<'b>,
}

#[derive(Serialize)]
struct ErrorInnerOut<'b> {
    message: &'b str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<()>,
    code: &'b str,
}

impl<'b> From<&'b ErrorDetailIn<'_>> for ErrorOut<'b> {
    fn from(e: &'b ErrorDetailIn<'_>) -> Self {
        let (kind, code) = openai_kind(&e.kind);
        ErrorOut {
            error: ErrorInnerOut {
                message: &e.message,
                kind,
                param: None,
                code,
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Stream: Messages SSE → chat completion chunks
// ---------------------------------------------------------------------------------------------

/// Most bytes of one Messages stream event held while it arrives (Anthropic's are a few KB).
pub const MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;

/// Translates a Messages SSE stream into chat completion chunks, fed at any byte boundary.
/// Output depends only on the events, never on where the bytes were split.
#[derive(Debug)]
pub struct ChatStream {
    parser: SseParser,
    state: StreamState,
}

impl ChatStream {
    pub fn new(public_model: &str, created_s: u64, include_usage: bool) -> Self {
        ChatStream {
            parser: SseParser::new(),
            state: StreamState {
                model: public_model.to_string(),
                created: created_s,
                include_usage,
                id: None,
                tools: Vec::new(),
                counts: None,
                output_reported: false,
                finish_sent: false,
                streamed_tokens: 0,
                completed: false,
                ended: false,
            },
        }
    }

    /// Translates what `bytes` completes; appends the OpenAI SSE bytes (`data: {...}\n\n`) to
    /// `out`. An event larger than `MAX_EVENT_BYTES` is no Anthropic stream: it ends the
    /// translation with an error chunk rather than be held.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        let state = &mut self.state;
        self.parser.feed(bytes, |event| state.on_event(&event, out));
        if self.parser.pending() > MAX_EVENT_BYTES {
            self.parser.abandon();
            if !self.state.ended {
                self.state.ended = true;
                write_event(
                    out,
                    &ErrorOut {
                        error: ErrorInnerOut {
                            message: "The provider sent a stream event too large to translate.",
                            kind: "api_error",
                            param: None,
                            code: "upstream_event_too_large",
                        },
                    },
                );
            }
        }
    }

    /// The provider's body ended: translates an event the last byte completed (a final CR).
    /// `[DONE]` went out with message_stop; a stream cut before it gets none, so a client
    /// cannot mistake it for a complete answer. The unfinished tail is dropped.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let state = &mut self.state;
        let _tail = self.parser.finish(|event| state.on_event(&event, out));
    }

    /// Usage so far: input (with the cache fields) from message_start, or message_delta when
    /// it restates them; output from the latest message_delta. Before one, message_start's
    /// output count is a placeholder, so the estimate of what streamed stands in when larger:
    /// a stream cut mid-answer is still billed for it. None before message_start.
    pub fn usage(&self) -> Option<Usage> {
        let s = &self.state;
        let mut counts = s.counts?;
        if !s.output_reported {
            counts.output = counts.output.max(s.streamed_tokens);
        }
        Some(counts.usage())
    }

    /// Estimated tokens of the text and tool arguments streamed so far, and of the thinking
    /// and server tool input the client does not see but Anthropic bills as output (what
    /// `usage` counts as output while the provider has not said). Estimated per delta, so it
    /// leans high, as a reservation should.
    #[cfg(test)]
    pub fn streamed_tokens(&self) -> u64 {
        self.state.streamed_tokens
    }

    /// Whether message_stop was seen.
    #[cfg(test)]
    pub fn completed(&self) -> bool {
        self.state.completed
    }
}

#[derive(Debug)]
struct StreamState {
    model: String,
    created: u64,
    include_usage: bool,
    /// `chatcmpl-<message id>`, from message_start; events before it are not translated.
    id: Option<String>,
    /// The tool_use blocks so far, in order: a tool call's index is its position here.
    tools: Vec<ToolBlock>,
    counts: Option<Counts>,
    /// A message_delta gave the output count.
    output_reported: bool,
    finish_sent: bool,
    streamed_tokens: u64,
    completed: bool,
    /// message_stop or an error: nothing after it is translated.
    ended: bool,
}

#[derive(Debug)]
struct ToolBlock {
    /// Anthropic's content block index.
    block: u64,
    arguments_sent: bool,
}

impl StreamState {
    fn on_event(&mut self, event: &SseEvent, out: &mut Vec<u8>) {
        if self.ended {
            return;
        }
        // One parse per event; the `event:` line repeats the data's `type`.
        let Ok(e) = serde_json::from_str::<EventIn>(&event.data) else {
            return;
        };
        match e.kind.as_ref() {
            "message_start" => self.message_start(e.message, out),
            "ping" => out.extend_from_slice(b": ping\n\n"),
            "error" => {
                if let Some(error) = &e.error {
                    write_event(out, &ErrorOut::from(error));
                }
                self.ended = true;
            }
            _ if self.id.is_none() => {}
            "content_block_start" => self.block_start(e.index, e.content_block, out),
            "content_block_delta" => self.block_delta(e.index, e.delta, out),
            "content_block_stop" => self.block_stop(e.index, out),
            "message_delta" => self.message_delta(e.delta, e.usage, out),
            "message_stop" => {
                self.completed = true;
                self.ended = true;
                if self.include_usage {
                    if let (Some(id), Some(usage)) = (&self.id, self.counts) {
                        let chunk = self.chunk(id, &[], Some(UsageOut::from(usage.usage())));
                        write_event(out, &chunk);
                    }
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
            }
            _ => {}
        }
    }

    fn message_start(&mut self, message: Option<StartIn>, out: &mut Vec<u8>) {
        let Some(message) = message else { return };
        if self.id.is_some() {
            return;
        }
        self.id = Some(format!("{ID_PREFIX}{}", message.id));
        let u = message.usage.unwrap_or_default();
        self.counts = Some(Counts {
            input: u.input_tokens.unwrap_or(0),
            output: u.output_tokens.unwrap_or(0),
            cache_read: u.cache_read_input_tokens.unwrap_or(0),
            cache_write: u.cache_creation_input_tokens.unwrap_or(0),
        });
        self.emit(
            out,
            DeltaOut {
                role: Some("assistant"),
                content: Some(""),
                ..DeltaOut::default()
            },
            None,
        );
    }

    fn block_start(&mut self, index: Option<u64>, block: Option<BlockIn>, out: &mut Vec<u8>) {
        let (Some(index), Some(block)) = (index, block) else {
            return;
        };
        match block.kind.as_ref() {
            "text" => {
                if let Some(text) = block.text.as_ref().filter(|t| !t.0.is_empty()) {
                    self.text(&text.0, out);
                }
            }
            "tool_use" => {
                let call = self.tools.len() as u32;
                self.tools.push(ToolBlock {
                    block: index,
                    arguments_sent: false,
                });
                let call = ToolCallDelta {
                    index: call,
                    id: block.id.as_ref().map(|s| s.0.as_ref()),
                    kind: Some("function"),
                    function: FunctionDelta {
                        name: block.name.as_ref().map(|s| s.0.as_ref()),
                        arguments: "",
                    },
                };
                self.emit(out, DeltaOut::tool_call(call), None);
            }
            _ => {}
        }
    }

    fn block_delta(&mut self, index: Option<u64>, delta: Option<DeltaIn>, out: &mut Vec<u8>) {
        let Some(delta) = delta else { return };
        match delta.kind.as_ref().map(|k| k.0.as_ref()) {
            Some("text_delta") if !delta.text.is_empty() => self.text(&delta.text, out),
            // Billed as output though the client never sees it.
            Some("thinking_delta") => {
                self.streamed_tokens += tokens::estimate_text(&delta.thinking);
            }
            Some("input_json_delta") if !delta.partial_json.is_empty() => {
                // Only the client's tools: a server tool's input has no tool call to join.
                let Some(call) = self.tool_call(index) else {
                    self.streamed_tokens += tokens::estimate_text(&delta.partial_json);
                    return;
                };
                if let Some(tool) = self.tools.get_mut(call as usize) {
                    tool.arguments_sent = true;
                }
                self.arguments(call, &delta.partial_json, out);
            }
            _ => {}
        }
    }

    fn block_stop(&mut self, index: Option<u64>, out: &mut Vec<u8>) {
        let Some(call) = self.tool_call(index) else {
            return;
        };
        let sent = self
            .tools
            .get(call as usize)
            .is_none_or(|t| t.arguments_sent);
        if !sent {
            // A call without arguments: "" would not parse as JSON in the client.
            self.arguments(call, "{}", out);
        }
    }

    fn message_delta(
        &mut self,
        delta: Option<DeltaIn>,
        usage: Option<WireUsage>,
        out: &mut Vec<u8>,
    ) {
        if let (Some(counts), Some(u)) = (&mut self.counts, usage) {
            // Anthropic's message_delta counts are cumulative; it may restate the input too.
            if let Some(output) = u.output_tokens {
                counts.output = output;
                self.output_reported = true;
            }
            counts.input = u.input_tokens.unwrap_or(counts.input);
            counts.cache_read = u.cache_read_input_tokens.unwrap_or(counts.cache_read);
            counts.cache_write = u.cache_creation_input_tokens.unwrap_or(counts.cache_write);
        }
        if self.finish_sent {
            return;
        }
        self.finish_sent = true;
        let stop_reason = delta.as_ref().and_then(|d| d.stop_reason.as_ref());
        let reason = finish_reason(stop_reason.map(|s| s.0.as_ref()));
        self.emit(out, DeltaOut::default(), Some(reason));
    }

    /// The tool call index of a content block, if it is one of the client's tool_use blocks.
    fn tool_call(&self, index: Option<u64>) -> Option<u32> {
        let index = index?;
        let call = self.tools.iter().position(|t| t.block == index)?;
        Some(call as u32)
    }

    fn text(&mut self, text: &str, out: &mut Vec<u8>) {
        self.streamed_tokens += tokens::estimate_text(text);
        let delta = DeltaOut {
            content: Some(text),
            ..DeltaOut::default()
        };
        self.emit(out, delta, None);
    }

    fn arguments(&mut self, call: u32, arguments: &str, out: &mut Vec<u8>) {
        self.streamed_tokens += tokens::estimate_text(arguments);
        let call = ToolCallDelta {
            index: call,
            id: None,
            kind: None,
            function: FunctionDelta {
                name: None,
                arguments,
            },
        };
        self.emit(out, DeltaOut::tool_call(call), None);
    }

    /// Appends one chunk with one choice; nothing before message_start gave the id.
    fn emit(&self, out: &mut Vec<u8>, delta: DeltaOut<'_>, finish_reason: Option<&'static str>) {
        let Some(id) = &self.id else { return };
        let choices = [ChoiceOut {
            index: 0,
            delta,
            logprobs: None,
            finish_reason,
        }];
        write_event(out, &self.chunk(id, &choices, None));
    }

    /// A chunk; with include_usage, every chunk but the last carries `"usage":null`, as at
    /// OpenAI.
    fn chunk<'b>(
        &'b self,
        id: &'b str,
        choices: &'b [ChoiceOut<'b>],
        usage: Option<UsageOut>,
    ) -> ChunkOut<'b> {
        ChunkOut {
            id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices,
            usage: self.include_usage.then_some(usage),
        }
    }
}

/// Appends `data: <json>\n\n`. Serializing these types into a Vec cannot fail; if it did, the
/// event is left out whole rather than half written.
fn write_event(out: &mut Vec<u8>, value: &impl Serialize) {
    let start = out.len();
    out.extend_from_slice(b"data: ");
    if serde_json::to_writer(&mut *out, value).is_ok() {
        out.extend_from_slice(b"\n\n");
    } else {
        out.truncate(start);
    }
}

// Stream wire types. One flat struct for every event type: one pass, no buffering, and any
// field Anthropic adds is skipped.

#[derive(Deserialize)]
struct EventIn<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    index: Option<u64>,
    #[serde(borrow)]
    message: Option<StartIn<'a>>,
    #[serde(borrow)]
    content_block: Option<BlockIn<'a>>,
    #[serde(borrow)]
    delta: Option<DeltaIn<'a>>,
    usage: Option<WireUsage>,
    #[serde(borrow)]
    error: Option<ErrorDetailIn<'a>>,
}

#[derive(Deserialize)]
struct StartIn<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct DeltaIn<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Str<'a>>,
    #[serde(default, borrow)]
    text: Cow<'a, str>,
    #[serde(default, borrow)]
    partial_json: Cow<'a, str>,
    #[serde(default, borrow)]
    thinking: Cow<'a, str>,
    #[serde(borrow)]
    stop_reason: Option<Str<'a>>,
}

#[derive(Serialize)]
struct ChunkOut<'b> {
    id: &'b str,
    object: &'static str,
    created: u64,
    model: &'b str,
    choices: &'b [ChoiceOut<'b>],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<UsageOut>>,
}

#[derive(Serialize)]
struct ChoiceOut<'b> {
    index: u32,
    delta: DeltaOut<'b>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize, Default)]
struct DeltaOut<'b> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'b str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<[ToolCallDelta<'b>; 1]>,
}

impl<'b> DeltaOut<'b> {
    fn tool_call(call: ToolCallDelta<'b>) -> Self {
        DeltaOut {
            tool_calls: Some([call]),
            ..DeltaOut::default()
        }
    }
}

#[derive(Serialize)]
struct ToolCallDelta<'b> {
    index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'b str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    function: FunctionDelta<'b>,
}

#[derive(Serialize)]
struct FunctionDelta<'b> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'b str>,
    arguments: &'b str,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const MODEL: &str = "claude-sonnet-4-5-20250929";

    /// The Messages request for a chat request, as JSON.
    fn request(chat: Value) -> Value {
        let body = messages_request(chat.to_string().as_bytes(), MODEL, 1024).unwrap();
        serde_json::from_slice(&body).unwrap()
    }

    /// The parameter a chat request is refused for.
    fn refused(chat: Value) -> String {
        messages_request(chat.to_string().as_bytes(), MODEL, 1024)
            .unwrap_err()
            .param
    }

    fn user(content: Value) -> Value {
        json!({"role": "user", "content": content})
    }

    fn chat(messages: Value) -> Value {
        json!({"model": "gpt-4o", "messages": messages})
    }

    /// `chat(..)` with extra top-level fields.
    fn chat_with(extra: Value) -> Value {
        let mut c = chat(json!([user(json!("hi"))]));
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    }

    #[test]
    fn a_plain_request_keeps_its_sampling_and_takes_the_upstream_model() {
        let r = request(json!({
            "model": "gpt-4o", "messages": [user(json!("hi"))], "temperature": 0.5, "top_p": 0.9,
            "stream": true, "stream_options": {"include_usage": true}, "seed": 7,
            "user": "user-42", "reasoning_effort": "low", "some_future_field": {"x": 1}
        }));
        assert_eq!(
            r,
            json!({
                "model": MODEL, "max_tokens": 1024,
                "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                "temperature": 0.5, "top_p": 0.9, "metadata": {"user_id": "user-42"}, "stream": true
            })
        );
    }

    #[test]
    fn system_and_developer_messages_become_the_system_prompt_in_order() {
        let one = request(chat(json!([
            {"role": "system", "content": "Be brief."},
            user(json!("hi")),
        ])));
        assert_eq!(one["system"], "Be brief.");
        let several = request(chat(json!([
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
            user(json!("hi")),
            {"role": "system", "content": ""},
            {"role": "system", "content": "Never lie."},
        ])));
        assert_eq!(
            several["system"],
            json!([
                {"type": "text", "text": "Be brief."},
                {"type": "text", "text": "Answer in French."},
                {"type": "text", "text": "Never lie."}
            ])
        );
        assert_eq!(several["messages"].as_array().unwrap().len(), 1);
        assert!(request(chat(json!([user(json!("hi"))])))
            .get("system")
            .is_none());
        let image = json!({"type": "image_url", "image_url": {"url": "https://x/y.png"}});
        assert_eq!(
            refused(chat(json!([{"role": "system", "content": [image]}]))),
            "messages[0].content[0]"
        );
    }

    #[test]
    fn consecutive_turns_of_one_role_merge_and_tool_results_are_user_turns() {
        let r = request(chat(json!([
            user(json!("a")),
            user(json!([{"type": "text", "text": "b"}, {"type": "text", "text": ""}])),
            {"role": "assistant", "content": "c"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}},
                {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": ""}}
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "one"},
            user(json!("note")),
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "two"}]},
            user(json!("")),
            {"role": "assistant", "content": null},
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]},
        ])));
        assert_eq!(
            r["messages"],
            json!([
                {"role": "user", "content": [
                    {"type": "text", "text": "a"}, {"type": "text", "text": "b"}
                ]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "c"},
                    {"type": "tool_use", "id": "call_1", "name": "f", "input": {"x": 1}},
                    {"type": "tool_use", "id": "call_2", "name": "g", "input": {}}
                ]},
                // Anthropic wants tool results first in their turn: the note moves after.
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "one"},
                    {"type": "tool_result", "tool_use_id": "call_2",
                     "content": [{"type": "text", "text": "two"}]},
                    {"type": "text", "text": "note"}
                ]},
                {"role": "assistant", "content": [{"type": "text", "text": "I can't."}]}
            ])
        );
    }

    #[test]
    fn tool_calls_need_object_arguments_and_tool_messages_an_id() {
        let call = |arguments: &str| {
            chat(
                json!([user(json!("hi")), {"role": "assistant", "tool_calls": [
                    {"id": "c0", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
                ]}]),
            )
        };
        let input = |r: Value| r["messages"][1]["content"][1]["input"].clone();
        assert_eq!(
            input(request(call(" {\"a\": [1, \"é\\n\"]} "))),
            json!({"a": [1, "é\n"]})
        );
        assert_eq!(input(request(call("  "))), json!({}));
        for bad in ["{\"a\":", "not json", "[1]", "\"x\""] {
            assert_eq!(
                refused(call(bad)),
                "messages[1].tool_calls[1].function.arguments",
                "{bad}"
            );
        }
        let custom = chat(json!([{"role": "assistant", "tool_calls": [
            {"id": "c", "type": "custom", "function": {"name": "f", "arguments": "{}"}}
        ]}]));
        assert_eq!(refused(custom), "messages[0].tool_calls[0].type");
        let anonymous = chat(json!([{"role": "tool", "content": "x"}]));
        assert_eq!(refused(anonymous), "messages[0].tool_call_id");
        let empty = request(chat(
            json!([{"role": "tool", "tool_call_id": "c", "content": ""}]),
        ));
        assert_eq!(
            empty["messages"][0]["content"],
            json!([{"type": "tool_result", "tool_use_id": "c"}])
        );
    }

    #[test]
    fn images_by_data_url_and_by_http_url() {
        let part =
            |url: &str| json!({"type": "image_url", "image_url": {"url": url, "detail": "high"}});
        let r = request(chat(json!([user(json!([
            {"type": "text", "text": "what is this?"},
            part("data:image/png;base64,iVBORw0KGgo="),
            part("https://example.com/cat.jpg"),
            part("http://example.com/dog.webp"),
            part("data:image/jpeg;name=x.jpg;base64,/9j/4AAQ"),
        ]))])));
        assert_eq!(
            r["messages"][0]["content"],
            json!([
                {"type": "text", "text": "what is this?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
                {"type": "image", "source": {"type": "url", "url": "http://example.com/dog.webp"}},
                {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}}
            ])
        );
        for url in [
            "data:image/png,rawbytes",
            "data:;base64,AAAA",
            "ftp://x/y.png",
            "file:///etc/passwd",
        ] {
            assert_eq!(
                refused(chat(json!([user(
                    json!([{"type": "text", "text": "x"}, part(url)])
                )]))),
                "messages[0].content[1].image_url.url",
                "{url}"
            );
        }
        let no_url = json!({"type": "image_url"});
        assert_eq!(
            refused(chat(json!([user(json!([no_url]))]))),
            "messages[0].content[0].image_url"
        );
    }

    #[test]
    fn inline_pdfs_become_documents_and_other_parts_are_refused() {
        let pdf = json!({"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0x"}});
        let r = request(chat(json!([user(json!([pdf]))])));
        assert_eq!(
            r["messages"][0]["content"],
            json!([{"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0x"}}])
        );
        let by_id = json!({"type": "file", "file": {"file_id": "file-abc"}});
        assert_eq!(
            refused(chat(json!([user(json!([by_id]))]))),
            "messages[0].content[0].file"
        );
        let audio =
            json!({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}});
        assert_eq!(
            refused(chat(json!([user(json!("x")), user(json!([audio]))]))),
            "messages[1].content[0]"
        );
    }

    #[test]
    fn tools_become_anthropic_tools() {
        let r = request(chat_with(json!({"tools": [
            {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
             "strict": true}},
            {"type": "function", "function": {"name": "now"}}
        ]})));
        assert_eq!(
            r["tools"],
            json!([
                {"name": "get_weather", "description": "Weather now", "input_schema":
                    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
                {"name": "now", "input_schema": {"type": "object"}}
            ])
        );
        assert!(r.get("tool_choice").is_none());
        assert!(request(chat_with(json!({"tools": []})))
            .get("tools")
            .is_none());
        assert_eq!(
            refused(chat_with(
                json!({"tools": [{"type": "custom", "custom": {"name": "x"}}]})
            )),
            "tools[0].type"
        );
        assert_eq!(
            refused(chat_with(json!({"tools": [{"type": "function"}]}))),
            "tools[0].function"
        );
    }

    #[test]
    fn tool_choice_and_parallel_tool_calls() {
        let tools = json!([{"type": "function", "function": {"name": "f"}}]);
        let choice = |tool_choice: Value, parallel: Value| {
            request(chat_with(json!({"tools": tools, "tool_choice": tool_choice, "parallel_tool_calls": parallel})))
                .get("tool_choice")
                .cloned()
        };
        let named = json!({"type": "function", "function": {"name": "f"}});
        assert_eq!(
            choice(json!("auto"), Value::Null),
            Some(json!({"type": "auto"}))
        );
        assert_eq!(
            choice(json!("none"), Value::Null),
            Some(json!({"type": "none"}))
        );
        assert_eq!(
            choice(json!("required"), json!(true)),
            Some(json!({"type": "any"}))
        );
        assert_eq!(
            choice(named.clone(), Value::Null),
            Some(json!({"type": "tool", "name": "f"}))
        );
        assert_eq!(choice(Value::Null, Value::Null), None);
        assert_eq!(
            choice(Value::Null, json!(false)),
            Some(json!({"type": "auto", "disable_parallel_tool_use": true}))
        );
        assert_eq!(
            choice(json!("required"), json!(false)),
            Some(json!({"type": "any", "disable_parallel_tool_use": true}))
        );
        assert_eq!(
            choice(named, json!(false)),
            Some(json!({"type": "tool", "name": "f", "disable_parallel_tool_use": true}))
        );
        assert_eq!(
            choice(json!("none"), json!(false)),
            Some(json!({"type": "none"}))
        );
        // Without tools, "auto" and "none" say nothing.
        for mode in ["auto", "none"] {
            let r = request(chat_with(
                json!({"tool_choice": mode, "parallel_tool_calls": false}),
            ));
            assert!(r.get("tool_choice").is_none(), "{mode}");
        }
        assert_eq!(
            refused(chat_with(
                json!({"tools": tools, "tool_choice": "sometimes"})
            )),
            "tool_choice"
        );
        assert_eq!(
            refused(chat_with(
                json!({"tools": tools, "tool_choice": {"type": "allowed_tools"}})
            )),
            "tool_choice"
        );
        assert_eq!(
            refused(chat_with(
                json!({"tools": tools, "tool_choice": {"type": "function"}})
            )),
            "tool_choice"
        );
    }

    #[test]
    fn stop_sequences_from_a_string_or_a_list() {
        let stop = |stop: Value| {
            request(chat_with(json!({"stop": stop})))
                .get("stop_sequences")
                .cloned()
        };
        assert_eq!(stop(json!("END")), Some(json!(["END"])));
        assert_eq!(stop(json!(["a", "b\n"])), Some(json!(["a", "b\n"])));
        assert_eq!(stop(json!([])), None);
        assert_eq!(stop(json!("")), None);
        assert_eq!(stop(json!(["", "x"])), Some(json!(["x"])));
        assert_eq!(stop(Value::Null), None);
    }

    #[test]
    fn max_tokens_falls_back_to_the_default() {
        let max = |extra: Value| request(chat_with(extra))["max_tokens"].clone();
        assert_eq!(max(json!({})), 1024);
        assert_eq!(max(json!({"max_tokens": 100})), 100);
        assert_eq!(max(json!({"max_completion_tokens": 200})), 200);
        assert_eq!(
            max(json!({"max_tokens": 100, "max_completion_tokens": 200})),
            200
        );
        assert_eq!(max(json!({"max_tokens": null})), 1024);
    }

    #[test]
    fn parameters_anthropic_cannot_honour_are_refused_by_name() {
        let cases = [
            (json!({"n": 2}), "n"),
            (json!({"logprobs": true}), "logprobs"),
            (json!({"top_logprobs": 3}), "top_logprobs"),
            (json!({"temperature": 1.5}), "temperature"),
            (json!({"temperature": -0.1}), "temperature"),
            (
                json!({"response_format": {"type": "json_object"}}),
                "response_format",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}),
                "response_format",
            ),
            (
                json!({"audio": {"voice": "alloy", "format": "wav"}}),
                "audio",
            ),
            (json!({"modalities": ["text", "audio"]}), "modalities"),
            (json!({"presence_penalty": 0.5}), "presence_penalty"),
            (json!({"frequency_penalty": -1}), "frequency_penalty"),
            (json!({"logit_bias": {"50256": -100}}), "logit_bias"),
            (json!({"functions": [{"name": "f"}]}), "functions"),
            (json!({"web_search_options": {}}), "web_search_options"),
        ];
        for (extra, param) in cases {
            let r = messages_request(chat_with(extra.clone()).to_string().as_bytes(), MODEL, 1)
                .unwrap_err();
            assert_eq!(r.param, param, "{extra}");
            assert!(!r.reason.is_empty());
        }
        // Their harmless values pass.
        let harmless = json!({
            "n": 1, "logprobs": false, "top_logprobs": 0, "temperature": 1, "response_format": {"type": "text"},
            "modalities": ["text"], "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {},
            "functions": [], "audio": null, "web_search_options": null, "seed": 1, "service_tier": "auto"
        });
        request(chat_with(harmless));
        let function_role =
            chat(json!([user(json!("x")), {"role": "function", "name": "f", "content": "1"}]));
        assert_eq!(refused(function_role), "messages[1].role");
    }

    #[test]
    fn a_malformed_body_names_where() {
        assert_eq!(
            refused(json!({"messages": [{"role": 1}]})),
            "messages[0].role"
        );
        assert_eq!(
            refused(json!({"messages": [user(json!("x"))], "max_tokens": "many"})),
            "max_tokens"
        );
        for body in [&b"{"[..], b"[]", br#"{"messages":[]} x"#] {
            let r = messages_request(body, MODEL, 1).unwrap_err();
            assert_eq!(r.param, "body");
            assert!(r.reason.contains("not a valid chat completion request"));
        }
    }

    // Responses.

    fn completion(message: Value) -> (Value, Usage) {
        let (body, usage) = chat_completion(
            message.to_string().as_bytes(),
            "claude-public",
            1_700_000_000,
        )
        .unwrap();
        (serde_json::from_slice(&body).unwrap(), usage.unwrap())
    }

    fn message(content: Value, stop_reason: &str) -> Value {
        json!({
            "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant",
            "model": "claude-sonnet-4-5-20250929", "content": content, "stop_reason": stop_reason,
            "stop_sequence": null, "usage": {"input_tokens": 10, "output_tokens": 5}
        })
    }

    #[test]
    fn a_text_answer() {
        let (body, usage) = completion(message(
            json!([{"type": "text", "text": "Hello"}, {"type": "text", "text": ", \"world\"", "citations": null}]),
            "end_turn",
        ));
        assert_eq!(
            body,
            json!({
                "id": "chatcmpl-msg_01XFDUDYJgAACzvnptvVoYEL", "object": "chat.completion",
                "created": 1_700_000_000, "model": "claude-public",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello, \"world\"", "refusal": null},
                             "logprobs": null, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
                          "prompt_tokens_details": {"cached_tokens": 0}}
            })
        );
        assert_eq!(
            usage,
            Usage {
                prompt_tokens: 10,
                completion_tokens: 5,
                cached_prompt_tokens: 0,
                cache_write_tokens: 0
            }
        );
    }

    #[test]
    fn every_stop_reason() {
        for (stop, finish) in [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("pause_turn", "stop"),
            ("max_tokens", "length"),
            ("model_context_window_exceeded", "length"),
            ("tool_use", "tool_calls"),
            ("refusal", "content_filter"),
            ("something_new", "stop"),
        ] {
            let (body, _) = completion(message(json!([{"type": "text", "text": "x"}]), stop));
            assert_eq!(body["choices"][0]["finish_reason"], finish, "{stop}");
        }
    }

    #[test]
    fn tool_use_blocks_become_tool_calls_and_thinking_is_left_out() {
        let (body, _) = completion(message(
            json!([
                {"type": "thinking", "thinking": "Weather, then time.", "signature": "EqQB"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris", "unit": "c"}},
                {"type": "server_tool_use", "id": "srvtoolu_01", "name": "web_search", "input": {"query": "x"}},
                {"type": "tool_use", "id": "toolu_02", "name": "now", "input": {}}
            ]),
            "tool_use",
        ));
        let m = &body["choices"][0]["message"];
        assert_eq!(m["content"], "Checking.");
        let calls = m["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0]["id"], "toolu_01");
        assert_eq!(calls[0]["type"], "function");
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        let args: Value =
            serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, json!({"city": "Paris", "unit": "c"}));
        assert_eq!(
            calls[1]["function"],
            json!({"name": "now", "arguments": "{}"})
        );
        assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");

        let (body, _) = completion(message(
            json!([{"type": "tool_use", "id": "t", "name": "f", "input": {}}]),
            "tool_use",
        ));
        assert_eq!(body["choices"][0]["message"]["content"], Value::Null);
        let (body, _) = completion(message(json!([]), "end_turn"));
        assert_eq!(body["choices"][0]["message"]["content"], Value::Null);
        assert!(body["choices"][0]["message"].get("tool_calls").is_none());
    }

    #[test]
    fn usage_counts_cached_prompt_tokens_in_the_prompt() {
        let mut m = message(json!([{"type": "text", "text": "x"}]), "end_turn");
        m["usage"] = json!({
            "input_tokens": 10, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 2000,
            "output_tokens": 5, "service_tier": "standard", "cache_creation": {"ephemeral_5m_input_tokens": 100}
        });
        let (body, usage) = completion(m);
        assert_eq!(
            body["usage"],
            json!({"prompt_tokens": 2110, "completion_tokens": 5, "total_tokens": 2115,
                   "prompt_tokens_details": {"cached_tokens": 2000}})
        );
        assert_eq!(
            usage,
            Usage {
                prompt_tokens: 2110,
                completion_tokens: 5,
                cached_prompt_tokens: 2000,
                cache_write_tokens: 100
            }
        );
    }

    #[test]
    fn what_is_not_a_messages_response_is_none() {
        let error =
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        assert!(chat_completion(error, "m", 0).is_none());
        assert!(chat_completion(b"not json", "m", 0).is_none());
        assert!(chat_completion(b"", "m", 0).is_none());
        // Without a usage it can read, the answer still reads; only its usage is unknown.
        for usage in [json!({"input_tokens": 3}), Value::Null] {
            let mut no_usage = message(json!([]), "end_turn");
            no_usage["usage"] = usage;
            let (body, usage) = chat_completion(no_usage.to_string().as_bytes(), "m", 0).unwrap();
            assert!(usage.is_none());
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert!(v.get("usage").is_none(), "{v}");
        }
        let mut other = message(json!([]), "end_turn");
        other["type"] = json!("message_batch");
        assert!(chat_completion(other.to_string().as_bytes(), "m", 0).is_none());
    }

    // Errors.

    fn anthropic_error(kind: &str, message: &str) -> Vec<u8> {
        json!({"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_011"})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn errors_take_openai_types_and_codes() {
        for (kind, openai_type, code) in [
            (
                "invalid_request_error",
                "invalid_request_error",
                "invalid_request_error",
            ),
            (
                "request_too_large",
                "invalid_request_error",
                "request_too_large",
            ),
            (
                "authentication_error",
                "authentication_error",
                "authentication_error",
            ),
            ("permission_error", "permission_error", "permission_error"),
            ("not_found_error", "not_found_error", "not_found"),
            (
                "rate_limit_error",
                "rate_limit_error",
                "rate_limit_exceeded",
            ),
            ("billing_error", "insufficient_quota", "insufficient_quota"),
            ("overloaded_error", "api_error", "overloaded"),
            ("timeout_error", "api_error", "timeout"),
            ("api_error", "api_error", "api_error"),
            ("brand_new_error", "api_error", "brand_new_error"),
        ] {
            let body = anthropic_error(kind, "Say \"why\"\n");
            let out: Value = serde_json::from_slice(&openai_error(&body).unwrap()).unwrap();
            assert_eq!(
                out,
                json!({"error": {"message": "Say \"why\"\n", "type": openai_type, "param": null, "code": code}}),
                "{kind}"
            );
        }
    }

    #[test]
    fn what_is_not_an_anthropic_error_is_none() {
        let openai =
            br#"{"error":{"message":"x","type":"invalid_request_error","param":null,"code":null}}"#;
        // OpenAI's own shape has a type inside too; it still reads (and maps to itself).
        assert!(openai_error(openai).is_some());
        for body in [
            &b"oops"[..],
            b"{}",
            br#"{"type":"message","error":{"type":"x"}}"#,
            br#"{"error":"x"}"#,
        ] {
            assert!(
                openai_error(body).is_none(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn a_never_ending_event_ends_the_translation_instead_of_growing() {
        let mut stream = ChatStream::new("m", 0, true);
        let mut out = Vec::new();
        stream.feed(b"event: message_start\ndata: ", &mut out);
        let piece = vec![b'x'; 64 * 1024];
        for _ in 0..(MAX_EVENT_BYTES / piece.len() + 8) {
            stream.feed(&piece, &mut out);
            assert!(stream.parser.pending() <= MAX_EVENT_BYTES + piece.len());
        }
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("upstream_event_too_large"), "{text}");
        assert_eq!(text.matches("data: ").count(), 1, "one error chunk: {text}");
        assert!(!text.contains("[DONE]"));
    }

    // The stream.

    /// A tool-use turn as Anthropic streams it: thinking, text (with escapes and non-ASCII),
    /// two tool_use blocks whose input arrives in many pieces, a ping, usage.
    const STREAM: &str = concat!(
        "event: message_start\n",
        r#"data: {"type":"message_start","message":{"id":"msg_014p7gG3wDgGV9EUtLvnow3U","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":472,"cache_creation_input_tokens":100,"cache_read_input_tokens":2000,"output_tokens":2,"service_tier":"standard"}}}"#,
        "\n\n",
        "event: content_block_start\n",
        r#"data: {"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":"","signature":""}}"#,
        "\n\n",
        "event: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"Weather, then time."}}"#,
        "\n\n",
        "event: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"EqQBCgIYAhIM1gbcDa9GJwZA"}}"#,
        "\n\n",
        "event: content_block_stop\n",
        r#"data: {"type":"content_block_stop","index":0}"#,
        "\n\n",
        "event: content_block_start\n",
        r#"data: {"type":"content_block_start","index":1,"content_block":{"type":"text","text":""}}"#,
        "\n\n",
        "event: ping\n",
        r#"data: {"type": "ping"}"#,
        "\n\n",
        "event: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"Let me check "}}"#,
        "\n\n",
        "event: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"\"SF\" — 🌁\n"}}"#,
        "\n\n",
        "event: content_block_stop\n",
        r#"data: {"type":"content_block_stop","index":1}"#,
        "\n\n",
        "event: content_block_start\n",
        r#"data: {"type":"content_block_start","index":2,"content_block":{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}"#,
        "\n\n",
        "event: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":""}}"#,
        "\n\n",
        "event: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"{\"locat"}}"#,
        "\n\n",
        "event: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"ion\": \"San Fra"}}"#,
        "\n\n",
        "event: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"ncisco, CA\""}}"#,
        "\n\n",
        "event: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":", \"unit\": \"c"}}"#,
        "\n\n",
        "event: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"elsius\"}"}}"#,
        "\n\n",
        "event: content_block_stop\n",
        r#"data: {"type":"content_block_stop","index":2}"#,
        "\n\n",
        "event: content_block_start\n",
        r#"data: {"type":"content_block_start","index":3,"content_block":{"type":"tool_use","id":"toolu_02","name":"get_time","input":{}}}"#,
        "\n\n",
        "event: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":3,"delta":{"type":"input_json_delta","partial_json":"{\"tz\":"}}"#,
        "\n\n",
        "event: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":3,"delta":{"type":"input_json_delta","partial_json":" \"America/Los"}}"#,
        "\n\n",
        "event: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":3,"delta":{"type":"input_json_delta","partial_json":"_Angeles\"}"}}"#,
        "\n\n",
        "event: content_block_stop\n",
        r#"data: {"type":"content_block_stop","index":3}"#,
        "\n\n",
        "event: message_delta\n",
        r#"data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":89}}"#,
        "\n\n",
        "event: message_stop\n",
        r#"data: {"type":"message_stop"}"#,
        "\n\n",
    );

    const CREATED: u64 = 1_700_000_000;

    /// Feeds `chunks` in order, then finishes.
    fn translate_chunks<'a>(
        chunks: impl IntoIterator<Item = &'a [u8]>,
        include_usage: bool,
    ) -> (Vec<u8>, ChatStream) {
        let mut stream = ChatStream::new("claude-public", CREATED, include_usage);
        let mut out = Vec::new();
        for chunk in chunks {
            stream.feed(chunk, &mut out);
        }
        stream.finish(&mut out);
        (out, stream)
    }

    fn translate(input: &[u8], include_usage: bool) -> (Vec<u8>, ChatStream) {
        translate_chunks([input], include_usage)
    }

    /// The output's events: JSON for `data:` lines, the text itself for [DONE] and comments.
    fn events(out: &[u8]) -> Vec<Value> {
        let text = std::str::from_utf8(out).unwrap();
        assert!(text.is_empty() || text.ends_with("\n\n"), "{text}");
        text.split_terminator("\n\n")
            .map(|e| match e.strip_prefix("data: ") {
                Some("[DONE]") => json!("[DONE]"),
                Some(data) => serde_json::from_str(data).unwrap(),
                None => json!(e),
            })
            .collect()
    }

    /// A chunk with one choice, as OpenAI shapes it.
    fn chunk(delta: Value, finish_reason: Value) -> Value {
        json!({
            "id": "chatcmpl-msg_014p7gG3wDgGV9EUtLvnow3U", "object": "chat.completion.chunk",
            "created": CREATED, "model": "claude-public",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}]
        })
    }

    fn content(text: &str) -> Value {
        chunk(json!({"content": text}), Value::Null)
    }

    fn arguments(index: u32, arguments: &str) -> Value {
        chunk(
            json!({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}),
            Value::Null,
        )
    }

    fn tool_start(index: u32, id: &str, name: &str) -> Value {
        chunk(
            json!({"tool_calls": [{"index": index, "id": id, "type": "function",
                                   "function": {"name": name, "arguments": ""}}]}),
            Value::Null,
        )
    }

    fn expected_without_usage() -> Vec<Value> {
        vec![
            chunk(json!({"role": "assistant", "content": ""}), Value::Null),
            json!(": ping"),
            content("Let me check "),
            content("\"SF\" — 🌁\n"),
            tool_start(0, "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "get_weather"),
            arguments(0, "{\"locat"),
            arguments(0, "ion\": \"San Fra"),
            arguments(0, "ncisco, CA\""),
            arguments(0, ", \"unit\": \"c"),
            arguments(0, "elsius\"}"),
            tool_start(1, "toolu_02", "get_time"),
            arguments(1, "{\"tz\":"),
            arguments(1, " \"America/Los"),
            arguments(1, "_Angeles\"}"),
            chunk(json!({}), json!("tool_calls")),
            json!("[DONE]"),
        ]
    }

    const USAGE: Usage = Usage {
        prompt_tokens: 2572,
        completion_tokens: 89,
        cached_prompt_tokens: 2000,
        cache_write_tokens: 100,
    };

    #[test]
    fn a_full_stream_translates_chunk_by_chunk() {
        let (out, stream) = translate(STREAM.as_bytes(), false);
        assert_eq!(events(&out), expected_without_usage());
        // The first chunk, byte for byte: OpenAI's field order, no usage field.
        let first = out.split(|&b| b == b'\n').next().unwrap();
        assert_eq!(
            std::str::from_utf8(first).unwrap(),
            r#"data: {"id":"chatcmpl-msg_014p7gG3wDgGV9EUtLvnow3U","object":"chat.completion.chunk","created":1700000000,"model":"claude-public","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#
        );
        assert!(stream.completed());
        assert_eq!(stream.usage(), Some(USAGE));
        assert!(stream.streamed_tokens() > 0);
        // The streamed arguments, joined per tool call, are the tool inputs.
        let mut joined = [String::new(), String::new()];
        for e in events(&out) {
            if let Some(call) = e["choices"][0]["delta"]["tool_calls"].get(0) {
                let index = call["index"].as_u64().unwrap() as usize;
                joined[index].push_str(call["function"]["arguments"].as_str().unwrap());
            }
        }
        let inputs: Vec<Value> = joined
            .iter()
            .map(|a| serde_json::from_str(a).unwrap())
            .collect();
        assert_eq!(
            inputs,
            [
                json!({"location": "San Francisco, CA", "unit": "celsius"}),
                json!({"tz": "America/Los_Angeles"})
            ]
        );
    }

    #[test]
    fn with_include_usage_every_chunk_says_usage_and_the_last_carries_it() {
        let (out, stream) = translate(STREAM.as_bytes(), true);
        let mut expected: Vec<Value> = expected_without_usage()
            .into_iter()
            .map(|mut e| {
                if e.is_object() {
                    e["usage"] = Value::Null;
                }
                e
            })
            .collect();
        let done = expected.pop().unwrap();
        expected.push(json!({
            "id": "chatcmpl-msg_014p7gG3wDgGV9EUtLvnow3U", "object": "chat.completion.chunk",
            "created": CREATED, "model": "claude-public", "choices": [],
            "usage": {"prompt_tokens": 2572, "completion_tokens": 89, "total_tokens": 2661,
                      "prompt_tokens_details": {"cached_tokens": 2000}}
        }));
        expected.push(done);
        assert_eq!(events(&out), expected);
        assert_eq!(stream.usage(), Some(USAGE));
    }

    #[test]
    fn splitting_the_stream_anywhere_changes_nothing() {
        let input = STREAM.as_bytes();
        for include_usage in [false, true] {
            let (whole, _) = translate(input, include_usage);
            for at in 0..=input.len() {
                let (a, b) = input.split_at(at);
                let (out, stream) = translate_chunks([a, b], include_usage);
                assert_eq!(out, whole, "split at {at}");
                assert!(stream.completed());
            }
            let (out, stream) = translate_chunks(input.chunks(1), include_usage);
            assert_eq!(out, whole, "one byte at a time");
            assert_eq!(stream.usage(), Some(USAGE));
        }
    }

    #[test]
    fn crlf_and_a_final_cr_read_the_same() {
        let crlf = STREAM.replace('\n', "\r\n");
        let (whole, _) = translate(STREAM.as_bytes(), true);
        let (out, stream) = translate(crlf.as_bytes(), true);
        assert_eq!(out, whole);
        assert!(stream.completed());
        // A CR ending the body ends message_stop's event only when `finish` says so.
        let cr = STREAM.replace('\n', "\r");
        let mut stream = ChatStream::new("claude-public", CREATED, true);
        let mut out = Vec::new();
        stream.feed(cr.as_bytes(), &mut out);
        assert!(!stream.completed());
        stream.finish(&mut out);
        assert!(stream.completed());
        assert_eq!(out, whole);
    }

    #[test]
    fn a_cut_stream_does_not_look_complete() {
        let cut = STREAM.find("event: message_delta").unwrap();
        // Cut between events, and inside the message_delta event.
        for at in [cut, cut + 40] {
            let (out, stream) = translate(&STREAM.as_bytes()[..at], true);
            let sent = events(&out);
            assert!(!sent.contains(&json!("[DONE]")));
            assert!(sent
                .iter()
                .all(|e| e["choices"][0]["finish_reason"].is_null()));
            assert!(sent.iter().all(|e| e["usage"].is_null()));
            assert!(!stream.completed());
            // Output not reported yet: the estimate of what streamed stands in.
            let usage = stream.usage().unwrap();
            assert!(stream.streamed_tokens() > 2);
            assert_eq!(usage.completion_tokens, stream.streamed_tokens());
            assert_eq!(
                (usage.prompt_tokens, usage.cached_prompt_tokens),
                (2572, 2000)
            );
        }
        // Cut after message_delta: the finish reason went out, [DONE] did not.
        let stop = STREAM.find("event: message_stop").unwrap();
        let (out, stream) = translate(&STREAM.as_bytes()[..stop], false);
        assert!(!out.ends_with(b"data: [DONE]\n\n"));
        assert_eq!(
            events(&out).last(),
            Some(&chunk(json!({}), json!("tool_calls")))
        );
        assert!(!stream.completed());
        assert_eq!(stream.usage(), Some(USAGE));
        // Thinking goes unseen, but is billed: the estimate counts it.
        let text = STREAM
            .find("event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1")
            .unwrap();
        let (out, stream) = translate(&STREAM.as_bytes()[..text], false);
        assert_eq!(events(&out).len(), 1, "the role chunk only");
        assert!(stream.streamed_tokens() > 0);
        // Nothing before message_start.
        let (out, stream) = translate(&STREAM.as_bytes()[..100], true);
        assert!(out.is_empty());
        assert_eq!(stream.usage(), None);
        assert_eq!(stream.streamed_tokens(), 0);
    }

    #[test]
    fn an_error_event_ends_the_stream_with_an_openai_error() {
        let start = STREAM.find("event: content_block_start").unwrap();
        let text = STREAM
            .find("event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}")
            .unwrap();
        let input = format!(
            "{}{}event: error\ndata: {}\n\n{}",
            &STREAM[..start],
            &STREAM[start..text],
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            &STREAM[text..],
        );
        let (out, stream) = translate(input.as_bytes(), true);
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.ends_with("data: {\"error\":{\"message\":\"Overloaded\",\"type\":\"api_error\",\"param\":null,\"code\":\"overloaded\"}}\n\n"),
            "{out}"
        );
        let relayed = events(out.as_bytes());
        assert_eq!(relayed.len(), 5, "role, ping, two texts, the error");
        assert!(!stream.completed());
        assert!(!out.contains("[DONE]"));
        assert!(!out.contains("tool_calls"));
        // An error before anything else is still relayed.
        let error = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"rate_limit_error\",\"message\":\"slow down\"}}\n\n";
        let (out, stream) = translate(error.as_bytes(), true);
        assert_eq!(
            events(&out),
            [
                json!({"error": {"message": "slow down", "type": "rate_limit_error", "param": null, "code": "rate_limit_exceeded"}})
            ]
        );
        assert_eq!(stream.usage(), None);
    }

    #[test]
    fn tool_calls_without_input_get_an_empty_object_and_server_tools_are_left_out() {
        let input = concat!(
            "data: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":1,\"output_tokens\":1}}}\n\n",
            "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"server_tool_use\",\"id\":\"srv\",\"name\":\"web_search\",\"input\":{}}}\n\n",
            "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"q\\\":1}\"}}\n\n",
            "data: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
            "data: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"t\",\"name\":\"now\",\"input\":{}}}\n\n",
            "data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"\"}}\n\n",
            "data: {\"type\":\"content_block_stop\",\"index\":1}\n\n",
            "data: {\"type\":\"some_future_event\",\"index\":1}\n\n",
            "data: not json\n\n",
            "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"max_tokens\"},\"usage\":{\"output_tokens\":7,\"input_tokens\":3}}\n\n",
            "data: {\"type\":\"message_stop\"}\n\n",
            "data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"text_delta\",\"text\":\"late\"}}\n\n",
        );
        let (out, stream) = translate(input.as_bytes(), false);
        let sent = events(&out);
        let id = "chatcmpl-m";
        let with_id = |mut v: Value| {
            v["id"] = json!(id);
            v
        };
        assert_eq!(
            sent,
            [
                with_id(chunk(
                    json!({"role": "assistant", "content": ""}),
                    Value::Null
                )),
                with_id(tool_start(0, "t", "now")),
                with_id(arguments(0, "{}")),
                with_id(chunk(json!({}), json!("length"))),
                json!("[DONE]"),
            ]
        );
        // message_delta restated the input count.
        assert_eq!(
            stream.usage(),
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 7,
                cached_prompt_tokens: 0,
                cache_write_tokens: 0
            })
        );
    }

    // proptest does not build for wasm32-wasip1; the property tests run on the host.
    #[cfg(not(target_family = "wasm"))]
    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any prefix of the stream (a stream cut anywhere), fed in any chunks, translates
            /// as it does whole; only the whole stream ends with [DONE].
            #[test]
            fn cutting_and_chunking_never_matter(
                end in any::<prop::sample::Index>(),
                cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..16),
                include_usage in any::<bool>(),
            ) {
                let full = STREAM.as_bytes();
                let input = &full[..end.index(full.len() + 1)];
                let (whole, whole_stream) = translate(input, include_usage);
                let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(input.len() + 1)).collect();
                cuts.sort_unstable();
                let mut chunks = Vec::new();
                let mut from = 0;
                for cut in cuts.into_iter().chain([input.len()]) {
                    chunks.push(&input[from..cut]);
                    from = cut;
                }
                let (out, stream) = translate_chunks(chunks, include_usage);
                prop_assert_eq!(&out, &whole);
                prop_assert_eq!(stream.usage(), whole_stream.usage());
                prop_assert_eq!(stream.streamed_tokens(), whole_stream.streamed_tokens());
                let complete = input.len() == full.len();
                prop_assert_eq!(stream.completed(), complete);
                prop_assert_eq!(out.ends_with(b"data: [DONE]\n\n"), complete);
                // Whatever went out is whole events.
                events(&out);
            }
        }
    }
}
