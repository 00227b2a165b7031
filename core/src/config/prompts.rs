//! Compiling what the config says is sent to models: prompt templates (their placeholders
//! checked against their variables), decorators and guard rules.

use std::collections::BTreeSet;

use super::raw::{RawDecorators, RawGuardRule, RawMessage, RawPrompt, RawVariable};
use super::{check_name, Errors, Model};
use crate::decorators::Decorators;
use crate::guard::GuardRule;
use crate::prompts::{
    parse_content, MessageTemplate, Part, PromptTemplate, PromptVersion, ResponseMode, Variable,
    VariableKind, PROMPTS_PATH,
};

/// Roles a configured message may have.
const ROLES: [&str; 4] = ["system", "developer", "user", "assistant"];

/// Paths the gateway serves itself, which no template may take.
const RESERVED_PATHS: [&str; 5] = [
    "/healthz",
    "/v1/chat/completions",
    "/v1/models",
    PROMPTS_PATH,
    "/admin/keys",
];

/// Request fields a template's `params` may not set: the template decides them.
const RESERVED_PARAMS: [&str; 4] = ["model", "messages", "stream", "stream_options"];

fn check_role(errors: &mut Errors, path: &str, role: &str) {
    if !ROLES.contains(&role) {
        errors.at(
            path,
            format!("unknown role `{role}`, expected one of {ROLES:?}"),
        );
    }
}

pub(super) fn compile_prompts(
    raws: Vec<Option<RawPrompt>>,
    models: &[Model],
    errors: &mut Errors,
) -> Vec<PromptTemplate> {
    let mut names = BTreeSet::new();
    let mut paths = BTreeSet::new();
    let mut out = Vec::new();
    for (i, raw) in raws.into_iter().enumerate() {
        let Some(raw) = raw else { continue };
        let path = format!("prompts[{i}]");
        check_name(errors, &format!("{path}.name"), &raw.name);
        if !names.insert(raw.name.clone()) {
            errors.at(
                format!("{path}.name"),
                format!("prompt `{}` is defined twice", raw.name),
            );
        }
        let url = raw
            .path
            .clone()
            .unwrap_or_else(|| format!("{PROMPTS_PATH}/{}", raw.name));
        if !url.starts_with('/') || url.contains(['?', '#', ' ']) || url.len() > 256 {
            errors.at(
                format!("{path}.path"),
                "must start with `/` and have no query, fragment or space",
            );
        } else if RESERVED_PATHS.contains(&url.as_str()) {
            errors.at(
                format!("{path}.path"),
                format!("`{url}` is the gateway's own"),
            );
        } else if !paths.insert(url.clone()) {
            errors.at(
                format!("{path}.path"),
                format!("`{url}` is the path of another prompt"),
            );
        }
        if raw.versions.is_empty() {
            errors.at(format!("{path}.versions"), "must list at least one version");
        }
        let mut versions: Vec<PromptVersion> = Vec::new();
        for (j, v) in raw.versions.into_iter().enumerate() {
            let vpath = format!("{path}.versions[{j}]");
            if v.version == 0 {
                errors.at(format!("{vpath}.version"), "must be at least 1");
            }
            if versions.iter().any(|o| o.version == v.version) {
                errors.at(
                    format!("{vpath}.version"),
                    format!("version {} is listed twice", v.version),
                );
            }
            if !models.iter().any(|m| m.name == v.model) {
                errors.at(
                    format!("{vpath}.model"),
                    format!("no model is named `{}`", v.model),
                );
            }
            let response = match v.response.as_deref() {
                None => ResponseMode::Raw,
                Some(r) => ResponseMode::parse(r).unwrap_or_else(|| {
                    errors.at(
                        format!("{vpath}.response"),
                        format!(
                            "unknown mode `{r}`, expected one of {:?}",
                            ResponseMode::NAMES
                        ),
                    );
                    ResponseMode::Raw
                }),
            };
            for key in v.params.keys() {
                if RESERVED_PARAMS.contains(&key.as_str()) {
                    errors.at(
                        format!("{vpath}.params.{key}"),
                        "is set by the template itself",
                    );
                }
            }
            let variables: Vec<Variable> = v
                .variables
                .iter()
                .enumerate()
                .filter_map(|(k, raw)| {
                    compile_variable(raw, &format!("{vpath}.variables[{k}]"), errors)
                })
                .collect();
            let mut seen = BTreeSet::new();
            for (k, var) in variables.iter().enumerate() {
                if !seen.insert(var.name.as_str()) {
                    errors.at(
                        format!("{vpath}.variables[{k}].name"),
                        format!("variable `{}` is declared twice", var.name),
                    );
                }
            }
            if v.messages.is_empty() {
                errors.at(
                    format!("{vpath}.messages"),
                    "must list at least one message",
                );
            }
            let mut messages = Vec::new();
            for (k, m) in v.messages.iter().enumerate() {
                let mpath = format!("{vpath}.messages[{k}]");
                check_role(errors, &format!("{mpath}.role"), &m.role);
                match parse_content(&m.content, &variables) {
                    Ok(parts) => messages.push(MessageTemplate {
                        role: m.role.clone(),
                        parts,
                    }),
                    Err(e) => errors.at(format!("{mpath}.content"), e),
                }
            }
            for (k, var) in variables.iter().enumerate() {
                let used = messages
                    .iter()
                    .flat_map(|m| &m.parts)
                    .any(|p| *p == Part::Var(k));
                if !used {
                    errors.at(
                        format!("{vpath}.variables[{k}]"),
                        format!("variable `{}` is used by no message", var.name),
                    );
                }
            }
            versions.push(PromptVersion {
                version: v.version,
                model: v.model,
                params: v.params,
                response,
                variables,
                messages,
            });
        }
        versions.sort_by_key(|v| v.version);
        out.push(PromptTemplate {
            name: raw.name,
            path: url,
            versions,
        });
    }
    out
}

fn compile_variable(raw: &RawVariable, path: &str, errors: &mut Errors) -> Option<Variable> {
    if raw.name.is_empty()
        || !raw
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        errors.at(
            format!("{path}.name"),
            format!("`{}` must be letters, digits and `_`", raw.name),
        );
    }
    let kind = match raw.kind.as_str() {
        "string" => VariableKind::String,
        "number" => VariableKind::Number,
        "boolean" => VariableKind::Boolean,
        "array" => VariableKind::Array,
        "enum" => {
            if raw.values.is_empty() {
                errors.at(format!("{path}.values"), "an enum lists its values");
            }
            VariableKind::Enum(raw.values.clone())
        }
        other => {
            errors.at(
                format!("{path}.type"),
                format!(
                    "unknown type `{other}`, expected one of {:?}",
                    VariableKind::NAMES
                ),
            );
            return None;
        }
    };
    if !raw.values.is_empty() && !matches!(kind, VariableKind::Enum(_)) {
        errors.at(format!("{path}.values"), "only an enum lists values");
    }
    if raw.max_items.is_some() && kind != VariableKind::Array {
        errors.at(format!("{path}.max_items"), "only an array has items");
    }
    if raw.max_length.is_some() && !matches!(kind, VariableKind::String | VariableKind::Array) {
        errors.at(
            format!("{path}.max_length"),
            "only a string or an array of strings has a length",
        );
    }
    let variable = Variable {
        name: raw.name.clone(),
        kind,
        required: raw.required.unwrap_or(raw.default.is_none()),
        default: raw.default.clone(),
        max_length: raw.max_length,
        max_items: raw.max_items,
        description: raw.description.clone(),
    };
    if let Some(default) = &raw.default {
        if let Err(problem) = variable.check(default) {
            errors.at(format!("{path}.default"), format!("the default {problem}"));
        }
        if variable.required {
            errors.at(
                format!("{path}.required"),
                "a variable with a default is not required",
            );
        }
    }
    Some(variable)
}

fn compile_messages(
    messages: &[RawMessage],
    path: &str,
    errors: &mut Errors,
) -> Vec<(String, String)> {
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            check_role(errors, &format!("{path}[{i}].role"), &m.role);
            (m.role.clone(), m.content.clone())
        })
        .collect()
}

pub(super) fn compile_decorators(
    raw: Option<&RawDecorators>,
    path: &str,
    errors: &mut Errors,
) -> Decorators {
    let Some(raw) = raw else {
        return Decorators::default();
    };
    Decorators::new(
        compile_messages(&raw.prepend, &format!("{path}.prepend"), errors),
        compile_messages(&raw.append, &format!("{path}.append"), errors),
    )
}

pub(super) fn compile_guard(
    raws: &[RawGuardRule],
    path: &str,
    errors: &mut Errors,
) -> Vec<GuardRule> {
    let mut names = BTreeSet::new();
    raws.iter()
        .enumerate()
        .filter_map(|(i, rule)| {
            let rpath = format!("{path}[{i}]");
            check_name(errors, &format!("{rpath}.name"), &rule.name);
            if !names.insert(rule.name.as_str()) {
                errors.at(
                    format!("{rpath}.name"),
                    format!("rule `{}` is defined twice here", rule.name),
                );
            }
            if rule.deny.is_empty() {
                errors.at(format!("{rpath}.deny"), "must list at least one pattern");
            }
            GuardRule::compile(&rule.name, &rule.deny)
                .map_err(|(j, e)| errors.at(format!("{rpath}.deny[{j}]"), e))
                .ok()
        })
        .collect()
}
