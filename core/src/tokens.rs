//! Token estimates for text, without a tokenizer. Used where the gateway must count tokens
//! itself: the mock provider's usage today, reservations later.

/// Estimated tokens in `text`: about four bytes of English per token, at least one token for
/// any non-empty text.
pub fn estimate_text(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4)
}

/// Tokens OpenAI bills per message for its role and separators, and per request to prime
/// the reply.
pub const PER_MESSAGE_OVERHEAD: u64 = 3;
pub const PER_REQUEST_OVERHEAD: u64 = 3;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_up() {
        assert_eq!(estimate_text(""), 0);
        assert_eq!(estimate_text("a"), 1);
        assert_eq!(estimate_text("abcd"), 1);
        assert_eq!(estimate_text("abcde"), 2);
    }
}
