//! A template's response modes: the provider's OpenAI chat completion turned into what the
//! template promises its clients.

use serde_json::Value;

/// The model's text in a chat completion (the first choice).
fn completion_text(completion: &[u8]) -> Result<String, String> {
    let v: Value = serde_json::from_slice(completion)
        .map_err(|e| format!("the provider's answer is not JSON ({e})"))?;
    v.pointer("/choices/0/message/content")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| "the provider's answer has no message content".to_string())
}

/// `text` mode: `{"output": "<the model's text>"}`.
pub fn text(completion: &[u8]) -> Result<Vec<u8>, String> {
    let output = completion_text(completion)?;
    serde_json::to_vec(&serde_json::json!({ "output": output })).map_err(|e| e.to_string())
}

/// `json` mode: the model's text parsed as JSON, as the body. A Markdown code fence around
/// it, which models add unasked, is unwrapped first.
pub fn json(completion: &[u8]) -> Result<Vec<u8>, String> {
    let output = completion_text(completion)?;
    let unfenced = unfence(&output);
    let value: Value = serde_json::from_str(unfenced)
        .map_err(|e| format!("the model's answer is not valid JSON ({e})"))?;
    serde_json::to_vec(&value).map_err(|e| e.to_string())
}

fn unfence(text: &str) -> &str {
    let t = text.trim();
    let Some(inner) = t.strip_prefix("```").and_then(|r| r.strip_suffix("```")) else {
        return t;
    };
    // Drop the info string (`json`) on the opening line.
    inner
        .split_once('\n')
        .map_or(inner, |(_, body)| body)
        .trim()
}

/// `text` mode, streamed: one provider event (its `data`) as the client's event, if it
/// carries text: `data: {"output":"<delta>"}`. `[DONE]` passes; other events (the role
/// chunk, the finish chunk, usage) carry no text and are dropped.
pub fn text_event(data: &str) -> Option<Vec<u8>> {
    if data.trim() == "[DONE]" {
        return Some(b"data: [DONE]\n\n".to_vec());
    }
    let v: Value = serde_json::from_str(data).ok()?;
    let delta = v
        .pointer("/choices/0/delta/content")
        .and_then(Value::as_str)
        .filter(|d| !d.is_empty())?;
    let event = serde_json::to_string(&serde_json::json!({ "output": delta })).ok()?;
    Some(format!("data: {event}\n\n").into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completion(content: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "choices": [{ "message": { "role": "assistant", "content": content } }],
            "usage": { "prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7 },
        }))
        .unwrap()
    }

    #[test]
    fn text_wraps_the_output() {
        let out = text(&completion("Hello \"you\"")).unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&out).unwrap(),
            serde_json::json!({ "output": "Hello \"you\"" })
        );
        assert!(text(b"{}").is_err());
        assert!(text(b"not json").is_err());
    }

    #[test]
    fn json_parses_the_output_fenced_or_not() {
        for content in [
            r#"{"sentiment": "positive"}"#,
            "```json\n{\"sentiment\": \"positive\"}\n```",
            "  ```\n{\"sentiment\": \"positive\"}```  ",
        ] {
            let out = json(&completion(content)).unwrap();
            assert_eq!(
                serde_json::from_slice::<Value>(&out).unwrap(),
                serde_json::json!({ "sentiment": "positive" }),
                "{content}"
            );
        }
        let err = json(&completion("I think it is positive.")).unwrap_err();
        assert!(err.contains("not valid JSON"), "{err}");
    }

    #[test]
    fn streamed_text_keeps_only_deltas() {
        let delta = r#"{"choices":[{"index":0,"delta":{"content":"Hi \"x\""}}]}"#;
        assert_eq!(
            text_event(delta).unwrap(),
            b"data: {\"output\":\"Hi \\\"x\\\"\"}\n\n".to_vec()
        );
        assert!(text_event(r#"{"choices":[{"index":0,"delta":{"role":"assistant"}}]}"#).is_none());
        assert!(text_event(r#"{"choices":[],"usage":{"total_tokens":3}}"#).is_none());
        assert_eq!(text_event("[DONE]").unwrap(), b"data: [DONE]\n\n".to_vec());
    }
}
