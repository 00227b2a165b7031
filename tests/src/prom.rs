//! Reading Prometheus' text exposition format, as the suites check what the gateways export.

/// One sample line: `name{label="value",…} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Every sample of a scrape; comment lines and lines it cannot read are skipped.
pub fn samples(text: &str) -> Vec<Sample> {
    text.lines().filter_map(sample).collect()
}

fn sample(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (series, value) = line.rsplit_once(' ')?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    let (name, labels) = match series.split_once('{') {
        None => (series.to_string(), Vec::new()),
        Some((name, rest)) => (name.to_string(), labels(rest.strip_suffix('}')?)?),
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// `a="x",b="y\"z"` into pairs, unescaping values.
fn labels(mut rest: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    loop {
        rest = rest.trim_start_matches(',');
        if rest.is_empty() {
            return Some(out);
        }
        let (name, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        out.push((name.trim().to_string(), value));
        rest = after.get(end + 1..)?;
    }
}

/// The sum of the samples named `name` whose labels include `want` (an empty value matches
/// an absent label, as in Prometheus); `None` when none does.
pub fn sum(text: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = samples(text)
        .into_iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            want.iter().all(|(k, v)| {
                let got = s
                    .labels
                    .iter()
                    .find(|(l, _)| l == k)
                    .map_or("", |(_, v)| v.as_str());
                got == *v
            })
        })
        .map(|s| s.value)
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_series_with_and_without_labels() {
        let text = "# TYPE x counter\nx{a=\"1\",b=\"q\\\"uote\"} 3\nx{a=\"2\"} 4.5\ny 7\n";
        assert_eq!(sum(text, "x", &[]), Some(7.5));
        assert_eq!(sum(text, "x", &[("a", "1")]), Some(3.0));
        assert_eq!(sum(text, "x", &[("b", "q\"uote")]), Some(3.0));
        assert_eq!(sum(text, "y", &[]), Some(7.0));
        assert_eq!(sum(text, "x", &[("a", "3")]), None);
        assert_eq!(sum(text, "x", &[("b", "")]), Some(4.5));
    }
}
