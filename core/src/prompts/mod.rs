//! Prompt templates published as REST endpoints: a client posts the template's variables as a
//! JSON object, the gateway checks them against their types and renders the template into a
//! chat request for the template's model, which then goes the way of any chat request
//! (limits, key pools, decorators, guard). Values are inserted as data: the messages are
//! built as JSON values, so a value is text inside one message's content and can never end
//! a string, add a message, change a role or inject a field. `shape` turns the provider's
//! answer into the template's response mode.

pub mod shape;
#[cfg(test)]
mod tests;

use serde_json::{Map, Value};

use crate::error::GatewayError;

/// Where templates are published when they name no path.
pub const PROMPTS_PATH: &str = "/v1/prompts";

/// Request header that pins a template version (as does `?version=`).
pub const VERSION_HEADER: &str = "x-prompt-version";

/// A named template and its versions.
#[derive(Debug)]
pub struct PromptTemplate {
    pub name: String,
    /// The path it is published at.
    pub path: String,
    /// Oldest first; the last is served unless a client pins another.
    pub versions: Vec<PromptVersion>,
}

/// How a template's answer reaches the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseMode {
    /// The chat completion as the provider sent it.
    Raw,
    /// `{"output": "<the model's text>"}`; streamed as `data: {"output": "<delta>"}` events.
    Text,
    /// The model's text parsed as JSON, as the body. Not streamed.
    Json,
}

impl ResponseMode {
    pub const NAMES: [&'static str; 3] = ["raw", "text", "json"];

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "raw" => Some(Self::Raw),
            "text" => Some(Self::Text),
            "json" => Some(Self::Json),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Text => "text",
            Self::Json => "json",
        }
    }

    pub fn streams(self) -> bool {
        self != Self::Json
    }
}

#[derive(Debug)]
pub struct PromptVersion {
    pub version: u32,
    /// The public model name it calls.
    pub model: String,
    /// Generation parameters, sent as they are.
    pub params: Map<String, Value>,
    pub response: ResponseMode,
    pub variables: Vec<Variable>,
    pub messages: Vec<MessageTemplate>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Variable {
    pub name: String,
    pub kind: VariableKind,
    pub required: bool,
    pub default: Option<Value>,
    /// Longest string in characters (for arrays, the longest item).
    pub max_length: Option<u64>,
    /// Arrays: most items.
    pub max_items: Option<u64>,
    pub description: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VariableKind {
    String,
    Number,
    Boolean,
    Enum(Vec<String>),
    /// An array of strings.
    Array,
}

impl VariableKind {
    pub const NAMES: [&'static str; 5] = ["string", "number", "boolean", "enum", "array"];

    pub fn name(&self) -> &'static str {
        match self {
            Self::String => "string",
            Self::Number => "number",
            Self::Boolean => "boolean",
            Self::Enum(_) => "enum",
            Self::Array => "array",
        }
    }
}

/// One message of a template: its role, and its content as text and placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageTemplate {
    pub role: String,
    pub parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Text(String),
    /// The variable at this index of the version's `variables`.
    Var(usize),
}

/// Splits a message's content into text and `{{name}}` placeholders (spaces inside the
/// braces allowed). Every name must be a variable; the error says what is wrong.
pub fn parse_content(content: &str, variables: &[Variable]) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut rest = content;
    while let Some(open) = rest.find("{{") {
        let (text, after) = rest.split_at(open);
        if !text.is_empty() {
            parts.push(Part::Text(text.to_string()));
        }
        let after = after.get(2..).unwrap_or_default();
        let close = after
            .find("}}")
            .ok_or_else(|| "has a `{{` without its `}}`".to_string())?;
        let (name, tail) = after.split_at(close);
        let name = name.trim();
        let index = variables
            .iter()
            .position(|v| v.name == name)
            .ok_or_else(|| format!("uses `{{{{{name}}}}}`, which is not a declared variable"))?;
        parts.push(Part::Var(index));
        rest = tail.get(2..).unwrap_or_default();
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest.to_string()));
    }
    Ok(parts)
}

impl Variable {
    /// Checks a value a client sent (or the default) against the variable's type and bounds.
    pub fn check(&self, value: &Value) -> Result<(), String> {
        let too_long = |s: &str| {
            self.max_length
                .filter(|max| s.chars().count() as u64 > *max)
                .map(|max| format!("is longer than {max} characters"))
        };
        let problem = match (&self.kind, value) {
            (VariableKind::String, Value::String(s)) => too_long(s),
            (VariableKind::Number, Value::Number(_)) => None,
            (VariableKind::Boolean, Value::Bool(_)) => None,
            (VariableKind::Enum(values), Value::String(s)) => {
                (!values.contains(s)).then(|| format!("must be one of {}", quoted(values)))
            }
            (VariableKind::Array, Value::Array(items)) => {
                if let Some(max) = self.max_items.filter(|m| items.len() as u64 > *m) {
                    Some(format!("has more than {max} items"))
                } else {
                    items.iter().find_map(|item| match item {
                        Value::String(s) => too_long(s).map(|p| format!("has an item that {p}")),
                        _ => Some("must be an array of strings".to_string()),
                    })
                }
            }
            (kind, _) => Some(match kind {
                VariableKind::String | VariableKind::Enum(_) => "must be a string".to_string(),
                VariableKind::Number => "must be a number".to_string(),
                VariableKind::Boolean => "must be true or false".to_string(),
                VariableKind::Array => "must be an array of strings".to_string(),
            }),
        };
        problem.map_or(Ok(()), Err)
    }
}

fn quoted(values: &[String]) -> String {
    values
        .iter()
        .map(|v| format!("`{v}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The text a value stands for in a message: strings as they are, numbers and booleans as
/// JSON writes them, arrays as a JSON array (unambiguous however the items read).
fn as_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

impl PromptTemplate {
    /// The version a request asks for (`None`: the newest).
    pub fn version(&self, requested: Option<&str>) -> Result<&PromptVersion, GatewayError> {
        let not_found = || GatewayError::PromptVersionNotFound {
            prompt: self.name.clone(),
            requested: requested.unwrap_or_default().to_string(),
            available: self.versions.iter().map(|v| v.version).collect(),
        };
        match requested {
            None => self.versions.last().ok_or_else(not_found),
            Some(r) => {
                let n: u32 = r.trim().parse().map_err(|_| not_found())?;
                self.versions
                    .iter()
                    .find(|v| v.version == n)
                    .ok_or_else(not_found)
            }
        }
    }

    /// The machine-readable description `GET /v1/prompts` lists: enough for a client to
    /// build a form.
    pub fn describe(&self) -> Value {
        let versions: Vec<Value> = self
            .versions
            .iter()
            .rev()
            .map(|v| {
                let variables: Vec<Value> = v.variables.iter().map(describe_variable).collect();
                serde_json::json!({
                    "version": v.version,
                    "model": v.model,
                    "response": v.response.as_str(),
                    "stream": v.response.streams(),
                    "variables": variables,
                })
            })
            .collect();
        serde_json::json!({
            "object": "prompt",
            "name": self.name,
            "path": self.path,
            "latest": self.versions.last().map(|v| v.version),
            "versions": versions,
        })
    }
}

fn describe_variable(v: &Variable) -> Value {
    let mut d = Map::new();
    d.insert("name".into(), Value::String(v.name.clone()));
    d.insert("type".into(), Value::String(v.kind.name().into()));
    d.insert("required".into(), Value::Bool(v.required));
    if let VariableKind::Enum(values) = &v.kind {
        d.insert("values".into(), serde_json::json!(values));
    }
    for (key, value) in [("max_length", v.max_length), ("max_items", v.max_items)] {
        if let Some(n) = value {
            d.insert(key.into(), Value::from(n));
        }
    }
    if let Some(default) = &v.default {
        d.insert("default".into(), default.clone());
    }
    if let Some(description) = &v.description {
        d.insert("description".into(), Value::String(description.clone()));
    }
    Value::Object(d)
}

impl PromptVersion {
    /// Checks a call's body (a JSON object of variables) and renders the chat request it
    /// stands for: `{"model", "messages", ...params, "stream"}`.
    pub fn render(&self, body: &[u8], stream: bool) -> Result<Vec<u8>, GatewayError> {
        let invalid = |variable: &str, problem: String| GatewayError::InvalidPromptVariable {
            variable: variable.to_string(),
            problem,
        };
        let args: Map<String, Value> = if body.iter().all(u8::is_ascii_whitespace) {
            Map::new()
        } else {
            serde_json::from_slice(body).map_err(|e| GatewayError::MalformedBody {
                detail: format!("a prompt takes a JSON object of its variables ({e})"),
            })?
        };
        if let Some(unknown) = args
            .keys()
            .find(|k| !self.variables.iter().any(|v| &v.name == *k))
        {
            let known: Vec<&str> = self.variables.iter().map(|v| v.name.as_str()).collect();
            return Err(invalid(
                unknown,
                format!(
                    "is not a variable of this prompt (it takes: {})",
                    known.join(", ")
                ),
            ));
        }
        let mut values = Vec::with_capacity(self.variables.len());
        for v in &self.variables {
            let value = match (args.get(&v.name), &v.default) {
                (Some(value), _) => {
                    v.check(value).map_err(|p| invalid(&v.name, p))?;
                    value.clone()
                }
                (None, Some(default)) => default.clone(),
                (None, None) if v.required => {
                    return Err(invalid(&v.name, "is required".to_string()))
                }
                (None, None) => Value::Null,
            };
            values.push(as_text(&value));
        }
        let messages: Vec<Value> = self
            .messages
            .iter()
            .map(|m| {
                let content: String = m
                    .parts
                    .iter()
                    .map(|p| match p {
                        Part::Text(t) => t.as_str(),
                        Part::Var(i) => values.get(*i).map_or("", String::as_str),
                    })
                    .collect();
                serde_json::json!({ "role": m.role, "content": content })
            })
            .collect();
        let mut request = Map::new();
        request.insert("model".into(), Value::String(self.model.clone()));
        request.insert("messages".into(), Value::Array(messages));
        for (k, v) in &self.params {
            request.insert(k.clone(), v.clone());
        }
        if stream {
            request.insert("stream".into(), Value::Bool(true));
        }
        serde_json::to_vec(&request).map_err(|e| GatewayError::Internal {
            detail: format!("rendering a prompt: {e}"),
        })
    }
}
