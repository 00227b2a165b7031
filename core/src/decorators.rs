//! Decorators: messages the gateway adds to every chat request of a consumer or for a model
//! (a company system prompt, a closing instruction). The order is fixed, most general
//! outside: the model's `prepend`, the consumer's `prepend`, the request's own messages (the
//! client's, or a template's), the consumer's `append`, the model's `append`.

use serde_json::Value;

use crate::tokens;

/// One scope's messages, ready to insert, and what they add to a request's prompt estimate.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decorators {
    pub prepend: Vec<Value>,
    pub append: Vec<Value>,
    pub tokens: u64,
}

impl Decorators {
    pub fn new(prepend: Vec<(String, String)>, append: Vec<(String, String)>) -> Self {
        let count = prepend.len() + append.len();
        let text: u64 = prepend
            .iter()
            .chain(&append)
            .map(|(_, content)| tokens::estimate_text(content))
            .sum();
        let message = |(role, content): (String, String)| serde_json::json!({ "role": role, "content": content });
        Self {
            prepend: prepend.into_iter().map(message).collect(),
            append: append.into_iter().map(message).collect(),
            tokens: text + count as u64 * tokens::PER_MESSAGE_OVERHEAD,
        }
    }
}

/// The messages to put before and after a request's own, for a model's and a consumer's
/// decorators, in the documented order.
pub fn around<'d>(
    model: &'d Decorators,
    consumer: &'d Decorators,
) -> (Vec<&'d Value>, Vec<&'d Value>) {
    let before = model.prepend.iter().chain(&consumer.prepend).collect();
    let after = consumer.append.iter().chain(&model.append).collect();
    (before, after)
}
