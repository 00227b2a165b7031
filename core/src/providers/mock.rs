//! The built-in `mock` provider kind: the gateway answers chat requests itself, with a
//! deterministic reply that echoes the last user message, a `usage` object that adds up, and
//! SSE streaming when asked. Useful with no provider account, and as a load-test target.

use serde_json::json;

use super::openai::usage::Usage;
use super::openai::wire::ChatRequest;
use crate::http::LocalResponse;
use crate::tokens;

/// The reply text for a request: deterministic, so tests and demos can predict it.
pub fn reply_text(req: &ChatRequest) -> String {
    let last_user = req
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .and_then(|m| m.content.as_ref())
        .map(|c| c.text().into_owned())
        .unwrap_or_default();
    if last_user.trim().is_empty() {
        "Hello from tollgate's mock provider.".to_string()
    } else {
        format!("You said: {last_user}")
    }
}

/// Usage as the mock bills it: the prompt estimate plus the reply estimate.
pub fn usage(req: &ChatRequest, reply: &str) -> Usage {
    Usage {
        prompt_tokens: req.estimate_prompt_tokens(),
        completion_tokens: tokens::estimate_text(reply).max(1),
        ..Usage::default()
    }
}

/// The whole response to a chat request. `model` is the public model name; `now_ms` stamps
/// `created`.
pub fn respond(req: &ChatRequest, model: &str, now_ms: u64) -> LocalResponse {
    let text = reply_text(req);
    let Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        ..
    } = usage(req, &text);
    let usage = json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    });
    let id = "chatcmpl-tollgate-mock";
    let created = now_ms / 1000;
    if !req.is_stream() {
        let body = json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": text },
                "logprobs": null,
                "finish_reason": "stop",
            }],
            "usage": usage,
        });
        return LocalResponse::json(200, body.to_string().into_bytes());
    }

    let chunk = |delta: serde_json::Value, finish: Option<&str>| {
        json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }],
        })
    };
    let mut events = vec![chunk(json!({ "role": "assistant", "content": "" }), None)];
    events.extend(words(&text).map(|w| chunk(json!({ "content": w }), None)));
    events.push(chunk(json!({}), Some("stop")));
    if req.wants_stream_usage() {
        events.push(json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage,
        }));
    }
    let mut body = Vec::new();
    for e in events {
        body.extend_from_slice(b"data: ");
        body.extend_from_slice(e.to_string().as_bytes());
        body.extend_from_slice(b"\n\n");
    }
    body.extend_from_slice(b"data: [DONE]\n\n");
    LocalResponse::event_stream(body)
}

/// Splits text into words that keep their leading whitespace, so they concatenate back.
fn words(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let word = rest.trim_start();
        let start = rest.len() - word.len();
        let end = word
            .find(char::is_whitespace)
            .map_or(rest.len(), |i| start + i);
        // `end` is at a char boundary: the start of a whitespace char, or the end.
        let (w, r) = rest.split_at_checked(end)?;
        rest = r;
        Some(w)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::openai::wire::parse_chat_request;

    fn events(body: &[u8]) -> Vec<serde_json::Value> {
        let text = std::str::from_utf8(body).unwrap();
        assert!(text.ends_with("data: [DONE]\n\n"));
        text.split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }

    #[test]
    fn words_concatenate_back() {
        let t = "  You said:  héllo wörld \n x";
        assert_eq!(words(t).collect::<String>(), t);
        assert_eq!(words("a b").collect::<Vec<_>>(), ["a", " b"]);
    }

    #[test]
    fn non_streaming_reply_is_deterministic_with_consistent_usage() {
        let body = br#"{"model":"m","messages":[{"role":"system","content":"sys"},{"role":"user","content":"hi there"}]}"#;
        let req = parse_chat_request(body).unwrap();
        let r = respond(&req, "mock-gpt", 1_700_000_000_123);
        assert_eq!(r, respond(&req, "mock-gpt", 1_700_000_000_123));
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "You said: hi there");
        assert_eq!(v["model"], "mock-gpt");
        assert_eq!(v["created"], 1_700_000_000);
        let u = &v["usage"];
        assert_eq!(
            u["total_tokens"].as_u64().unwrap(),
            u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
        );
        // 3 per request + (3 + 1) + (3 + 2) for "sys" and "hi there".
        assert_eq!(u["prompt_tokens"], 12);
    }

    #[test]
    fn stream_deltas_rebuild_the_text_and_usage_comes_only_when_asked() {
        for (with_usage, body) in [
            (false, &br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"one two three"}]}"#[..]),
            (true, &br#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"one two three"}]}"#[..]),
        ] {
            let req = parse_chat_request(body).unwrap();
            let r = respond(&req, "mock-gpt", 0);
            assert_eq!(r.headers[0].1, "text/event-stream");
            let ev = events(&r.body);
            let text: String = ev
                .iter()
                .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
                .collect();
            assert_eq!(text, "You said: one two three");
            let usage_chunks = ev.iter().filter(|e| e.get("usage").is_some()).count();
            assert_eq!(usage_chunks, usize::from(with_usage));
            assert!(ev.iter().any(|e| e["choices"][0]["finish_reason"] == "stop"));
        }
    }
}
