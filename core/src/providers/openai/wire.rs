//! The parts of an OpenAI chat request the gateway reads. Unknown fields are ignored here and
//! forwarded untouched, so new OpenAI parameters pass through without a release.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::tokens;

#[derive(Debug, Deserialize)]
pub struct ChatRequest<'a> {
    #[serde(borrow)]
    pub model: Cow<'a, str>,
    #[serde(borrow)]
    pub messages: Vec<Message<'a>>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    /// Choices to generate: each may use up to the completion maximum.
    #[serde(default)]
    pub n: Option<u64>,
    /// Prompt material outside the messages, counted as text (the provider bills it).
    #[serde(default, borrow)]
    pub tools: Option<&'a RawValue>,
    #[serde(default, borrow)]
    pub functions: Option<&'a RawValue>,
    #[serde(default, borrow)]
    pub response_format: Option<&'a RawValue>,
}

/// Tokens reserved per image part: OpenAI's price of a high-detail 512×512-tile image is
/// 85 + 170 per tile; four tiles covers a typical 1024×1024 image.
pub const IMAGE_TOKENS: u64 = 765;

impl ChatRequest<'_> {
    /// The most completion tokens the client allows, if it says.
    pub fn max_output_tokens(&self) -> Option<u64> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    /// Choices the provider generates (each billed).
    pub fn choices(&self) -> u64 {
        self.n.unwrap_or(1).max(1)
    }

    /// Estimated prompt tokens: each message's text, tool calls and images plus OpenAI's
    /// per-message framing, and the tool definitions and response schema.
    pub fn estimate_prompt_tokens(&self) -> u64 {
        let raw = |v: Option<&RawValue>| v.map_or(0, |v| tokens::estimate_text(v.get()));
        let messages: u64 = self
            .messages
            .iter()
            .map(|m| {
                let content = m.content.as_ref().map_or(0, |c| {
                    tokens::estimate_text(&c.text()) + c.images() * IMAGE_TOKENS
                });
                tokens::PER_MESSAGE_OVERHEAD + content + raw(m.tool_calls)
            })
            .sum();
        tokens::PER_REQUEST_OVERHEAD
            + messages
            + raw(self.tools)
            + raw(self.functions)
            + raw(self.response_format)
    }

    /// Every piece of text the request carries to the model, for guard rules: each message's
    /// content (its text and refusal parts joined with nothing between, so that a word split
    /// across parts is still seen whole), its name, the strings inside its tool calls, and
    /// the strings of the tool and function definitions.
    pub fn guarded_texts(&self) -> Vec<Cow<'_, str>> {
        let mut out: Vec<Cow<'_, str>> = Vec::new();
        for m in &self.messages {
            match &m.content {
                Some(Content::Text(t)) => out.push(Cow::Borrowed(t.as_ref())),
                Some(Content::Parts(parts)) => out.push(Cow::Owned(
                    parts
                        .iter()
                        .flat_map(|p| [p.text.as_deref(), p.refusal.as_deref()])
                        .flatten()
                        .collect(),
                )),
                None => {}
            }
            if let Some(name) = &m.name {
                out.push(Cow::Borrowed(name.as_ref()));
            }
            string_leaves(m.tool_calls, &mut out);
        }
        string_leaves(self.tools, &mut out);
        string_leaves(self.functions, &mut out);
        out
    }

    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// Whether the client asked for the final usage chunk of a stream.
    pub fn wants_stream_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct Message<'a> {
    #[serde(borrow)]
    pub role: Cow<'a, str>,
    #[serde(default, borrow)]
    pub content: Option<Content<'a>>,
    #[serde(default, borrow)]
    pub tool_calls: Option<&'a RawValue>,
    #[serde(default, borrow)]
    pub name: Option<Cow<'a, str>>,
}

/// A message's content: a string, or a list of parts of which only text parts carry text.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content<'a> {
    Text(#[serde(borrow)] Cow<'a, str>),
    Parts(#[serde(borrow)] Vec<ContentPart<'a>>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    #[serde(default, borrow)]
    pub text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub refusal: Option<Cow<'a, str>>,
}

impl Content<'_> {
    /// Image parts, priced apart from text.
    pub fn images(&self) -> u64 {
        match self {
            Content::Text(_) => 0,
            Content::Parts(parts) => parts.iter().filter(|p| p.kind == "image_url").count() as u64,
        }
    }

    /// The text of the content, parts joined by newlines; non-text parts are left out.
    pub fn text(&self) -> Cow<'_, str> {
        match self {
            Content::Text(t) => Cow::Borrowed(t.as_ref()),
            Content::Parts(parts) => {
                let texts: Vec<&str> = parts
                    .iter()
                    .filter(|p| p.kind == "text")
                    .filter_map(|p| p.text.as_deref())
                    .collect();
                Cow::Owned(texts.join("\n"))
            }
        }
    }
}

/// Every string inside a raw JSON value (a tool call's arguments are a JSON text in a string:
/// its string is what the model sees).
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

/// Parses and checks a chat request body; the error says what is wrong, for a 400.
pub fn parse_chat_request(body: &[u8]) -> Result<ChatRequest<'_>, String> {
    let req: ChatRequest = serde_json::from_slice(body).map_err(|e| describe(&e))?;
    if req.model.is_empty() {
        return Err("`model` must not be empty".into());
    }
    if req.messages.is_empty() {
        return Err("`messages` must contain at least one message".into());
    }
    Ok(req)
}

fn describe(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof => format!("the body is not valid JSON ({e})"),
        Category::Data => format!("the body is not a valid chat completion request ({e})"),
        Category::Io => e.to_string(),
    }
}

/// Edits to a chat request body on its way upstream; every other field is kept as sent.
#[derive(Debug, Default)]
pub struct Edits<'a> {
    /// Replaces `model`.
    pub model: Option<&'a str>,
    /// Sets `stream_options.include_usage`.
    pub force_stream_usage: bool,
    /// Messages to put before and after the request's own (decorators).
    pub prepend: Vec<&'a serde_json::Value>,
    pub append: Vec<&'a serde_json::Value>,
}

impl Edits<'_> {
    pub fn is_empty(&self) -> bool {
        self.model.is_none()
            && !self.force_stream_usage
            && self.prepend.is_empty()
            && self.append.is_empty()
    }
}

/// Returns the body with `edits` applied.
pub fn rewrite(body: &[u8], edits: &Edits<'_>) -> Result<Vec<u8>, String> {
    use serde_json::Value;
    let only_stream_usage = edits.force_stream_usage
        && edits.model.is_none()
        && edits.prepend.is_empty()
        && edits.append.is_empty();
    if only_stream_usage {
        if let Some(body) = with_stream_usage(body) {
            return Ok(body);
        }
    }
    let mut v: serde_json::Map<String, Value> =
        serde_json::from_slice(body).map_err(|e| describe(&e))?;
    if let Some(model) = edits.model {
        v.insert("model".into(), Value::String(model.to_string()));
    }
    if edits.force_stream_usage {
        let options = v
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Default::default()));
        if !options.is_object() {
            *options = Value::Object(Default::default());
        }
        if let Value::Object(o) = options {
            o.insert("include_usage".into(), Value::Bool(true));
        }
    }
    if !edits.prepend.is_empty() || !edits.append.is_empty() {
        if let Some(Value::Array(own)) = v.get_mut("messages") {
            let mut all: Vec<Value> = edits.prepend.iter().map(|m| (*m).clone()).collect();
            all.append(own);
            all.extend(edits.append.iter().map(|m| (*m).clone()));
            *own = all;
        }
    }
    serde_json::to_vec(&v).map_err(|e| e.to_string())
}

/// `body` with `"stream_options":{"include_usage":true}` added without parsing it again
/// (the most common rewrite: a stream whose usage the gateway must see), for a body that was
/// read as a chat request already. Only where that is sure to be right: the body names no
/// `stream_options` anywhere (so not at its top; a key's quotes are never escaped, a string's
/// inner quotes always are) and is an object with members. `None` otherwise.
fn with_stream_usage(body: &[u8]) -> Option<Vec<u8>> {
    const KEY: &[u8] = b"\"stream_options\"";
    const MEMBER: &[u8] = br#","stream_options":{"include_usage":true}"#;
    if body.windows(KEY.len()).any(|w| w == KEY) {
        return None;
    }
    // The object's members, between its braces (whitespace aside).
    let inner = body.trim_ascii().strip_prefix(b"{")?.strip_suffix(b"}")?;
    let members = inner.trim_ascii_end();
    if members.is_empty() {
        return None;
    }
    // Past the leading whitespace, the opening brace and the members.
    let lead = body.len() - body.trim_ascii_start().len();
    let (head, tail) = body.split_at_checked(lead + 1 + members.len())?;
    let mut out = Vec::with_capacity(body.len() + MEMBER.len());
    out.extend_from_slice(head);
    out.extend_from_slice(MEMBER);
    out.extend_from_slice(tail);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_usage_is_added_in_place_or_by_a_full_rewrite_with_the_same_meaning() {
        let edits = Edits {
            model: None,
            force_stream_usage: true,
            prepend: Vec::new(),
            append: Vec::new(),
        };
        let parsed = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).unwrap();
        for body in [
            &br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"say \"stream_options\""}]}"#[..],
            br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}  "#,
            br#" {"model":"m","stream":true,"stream_options":null,"messages":[{"role":"user","content":"hi"}]}"#,
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":false},"messages":[]}"#,
            br#"{"model":"m","messages":[{"role":"user","content":"}"}],"stream":true}"#,
        ] {
            let out = rewrite(body, &edits).unwrap();
            let mut want = parsed(body);
            want["stream_options"] = serde_json::json!({ "include_usage": true });
            assert_eq!(parsed(&out), want, "{}", String::from_utf8_lossy(&out));
        }
        // In place: the client's bytes are kept as they came.
        let body = br#"{"model":"m", "stream":true, "messages":[{"role":"user","content":"hi"}]}"#;
        let out = rewrite(body, &edits).unwrap();
        assert!(out.starts_with(&body[..body.len() - 1]));
    }

    #[test]
    fn parses_string_and_part_contents() {
        let body = br#"{"model":"m","messages":[{"role":"system","content":"be brief"},
            {"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"x"}},{"type":"text","text":"b"}]},
            {"role":"assistant","content":null,"tool_calls":[]}],"stream":true,"stream_options":{"include_usage":true},"temperature":0.2}"#;
        let r = parse_chat_request(body).unwrap();
        assert_eq!(r.model, "m");
        assert!(r.is_stream() && r.wants_stream_usage());
        assert_eq!(r.messages[0].content.as_ref().unwrap().text(), "be brief");
        assert_eq!(r.messages[1].content.as_ref().unwrap().text(), "a\nb");
        assert!(r.messages[2].content.is_none());
    }

    #[test]
    fn rejects_bad_bodies_with_a_reason() {
        assert!(parse_chat_request(b"{")
            .unwrap_err()
            .contains("not valid JSON"));
        assert!(parse_chat_request(b"[]")
            .unwrap_err()
            .contains("not a valid chat"));
        assert!(parse_chat_request(br#"{"messages":[]}"#)
            .unwrap_err()
            .contains("model"));
        assert!(parse_chat_request(br#"{"model":"m","messages":[]}"#)
            .unwrap_err()
            .contains("at least one"));
        assert!(
            parse_chat_request(br#"{"model":"","messages":[{"role":"user","content":"x"}]}"#)
                .is_err()
        );
    }

    #[test]
    fn rewrite_keeps_other_fields() {
        let edits = Edits {
            model: Some("b"),
            ..Edits::default()
        };
        let out = rewrite(br#"{"model":"a","messages":[],"x":{"y":1}}"#, &edits).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "b");
        assert_eq!(v["x"]["y"], 1);
        assert!(v.get("stream_options").is_none());
        let edits = Edits {
            force_stream_usage: true,
            ..Edits::default()
        };
        let out = rewrite(br#"{"model":"a","stream_options":{"other":1}}"#, &edits).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "a");
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"other": 1, "include_usage": true})
        );
    }

    #[test]
    fn decorators_go_around_the_requests_own_messages() {
        let sys = serde_json::json!({"role": "system", "content": "be kind"});
        let end = serde_json::json!({"role": "user", "content": "answer briefly"});
        let edits = Edits {
            prepend: vec![&sys],
            append: vec![&end],
            ..Edits::default()
        };
        let out = rewrite(
            br#"{"model":"a","messages":[{"role":"user","content":"hi"}]}"#,
            &edits,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let roles: Vec<&str> = v["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["content"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["be kind", "hi", "answer briefly"]);
    }

    #[test]
    fn tools_schemas_tool_calls_images_and_n_count() {
        let plain =
            parse_chat_request(br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#)
                .unwrap();
        let tools = "x".repeat(4_000);
        let body = format!(
            r#"{{"model":"m","n":3,"tools":[{{"type":"function","function":{{"name":"f","description":"{tools}"}}}}],
            "response_format":{{"type":"json_schema"}},
            "messages":[{{"role":"user","content":[{{"type":"text","text":"hi"}},{{"type":"image_url","image_url":{{"url":"x"}}}}]}},
                        {{"role":"assistant","content":null,"tool_calls":[{{"id":"1","type":"function","function":{{"name":"f","arguments":"{{}}"}}}}]}}]}}"#
        );
        let rich = parse_chat_request(body.as_bytes()).unwrap();
        assert_eq!(rich.choices(), 3);
        assert!(
            rich.estimate_prompt_tokens() > plain.estimate_prompt_tokens() + IMAGE_TOKENS + 500,
            "{} vs {}",
            rich.estimate_prompt_tokens(),
            plain.estimate_prompt_tokens()
        );
    }

    #[test]
    fn max_tokens_and_prompt_estimate() {
        let r = parse_chat_request(br#"{"model":"m","max_tokens":10,"max_completion_tokens":20,"messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(r.max_output_tokens(), Some(20));
        assert!(r.estimate_prompt_tokens() > tokens::PER_REQUEST_OVERHEAD);
    }
}
