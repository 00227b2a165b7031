//! Guard rules: named deny patterns over the text of a request's messages, per consumer and
//! per model. A match refuses the request with the rule's name, never the matched text (it
//! may be the very secret the rule keeps out). Patterns compile when the config loads;
//! `regex-lite` matches in time linear in the text, so a pattern cannot be made to hang.

use regex_lite::Regex;

#[derive(Debug, Clone)]
pub struct GuardRule {
    pub name: String,
    patterns: Vec<Regex>,
}

/// Longest pattern accepted, in bytes.
const MAX_PATTERN: usize = 4_096;

impl GuardRule {
    /// Compiles the rule; the error names the pattern's index and what is wrong.
    pub fn compile(name: &str, patterns: &[String]) -> Result<Self, (usize, String)> {
        let mut compiled = Vec::with_capacity(patterns.len());
        for (i, p) in patterns.iter().enumerate() {
            if p.len() > MAX_PATTERN {
                return Err((i, format!("is longer than {MAX_PATTERN} bytes")));
            }
            let re = Regex::new(p).map_err(|e| (i, format!("is not a valid pattern: {e}")))?;
            compiled.push(re);
        }
        Ok(Self {
            name: name.to_string(),
            patterns: compiled,
        })
    }

    pub fn denies(&self, text: &str) -> bool {
        self.patterns.iter().any(|re| re.is_match(text))
    }
}

/// The name of the first rule that denies any of the texts.
pub fn first_denial<'r, 't>(
    rules: impl IntoIterator<Item = &'r GuardRule>,
    texts: &[std::borrow::Cow<'t, str>],
) -> Option<&'r str> {
    rules
        .into_iter()
        .find(|rule| texts.iter().any(|t| rule.denies(t)))
        .map(|rule| rule.name.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    #[test]
    fn a_rule_denies_any_matching_text_and_names_itself() {
        let secrets = GuardRule::compile(
            "no-secrets",
            &["sk-[A-Za-z0-9]{8,}".into(), "(?i)password".into()],
        )
        .unwrap();
        let rules = [secrets];
        let ok = [Cow::Borrowed("hello"), Cow::Borrowed("a sk-short key")];
        assert_eq!(first_denial(&rules, &ok), None);
        let bad = [Cow::Borrowed("hi"), Cow::Borrowed("my PassWord is x")];
        assert_eq!(first_denial(&rules, &bad), Some("no-secrets"));
        let key = [Cow::Borrowed("use sk-abcdefgh1234")];
        assert_eq!(first_denial(&rules, &key), Some("no-secrets"));
    }

    #[test]
    fn bad_patterns_are_reported_with_their_index() {
        let err = GuardRule::compile("r", &["ok".into(), "(unclosed".into()]).unwrap_err();
        assert_eq!(err.0, 1);
        assert!(err.1.contains("not a valid pattern"), "{}", err.1);
        assert!(GuardRule::compile("r", &["a".repeat(5_000)]).is_err());
    }
}
