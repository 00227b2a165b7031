//! A deterministic sample of texts in several categories, built from the embedded corpus with
//! a seeded PRNG (SplitMix64), so every run measures the same texts.

use crate::corpus::*;

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in lo..=hi.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }

    /// Log-uniform length in lo..=hi, so short and long texts are equally represented.
    pub fn log_len(&mut self, lo: usize, hi: usize) -> usize {
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let (l, h) = ((lo as f64).ln(), (hi as f64).ln());
        (l + u * (h - l)).exp().round() as usize
    }
}

pub struct Category {
    pub name: &'static str,
    pub count: usize,
    pub min_len: usize,
    pub max_len: usize,
    pub gen: fn(&mut Rng, usize) -> String,
}

pub const CATEGORIES: &[Category] = &[
    Category {
        name: "english prose",
        count: 150,
        min_len: 20,
        max_len: 4000,
        gen: english,
    },
    Category {
        name: "chat questions",
        count: 150,
        min_len: 10,
        max_len: 1500,
        gen: chat,
    },
    Category {
        name: "code: rust",
        count: 150,
        min_len: 20,
        max_len: 4000,
        gen: rust_code,
    },
    Category {
        name: "code: python",
        count: 150,
        min_len: 20,
        max_len: 4000,
        gen: python_code,
    },
    Category {
        name: "code: json",
        count: 150,
        min_len: 10,
        max_len: 4000,
        gen: json,
    },
    Category {
        name: "numbers & tables",
        count: 150,
        min_len: 10,
        max_len: 3000,
        gen: numbers,
    },
    Category {
        name: "urls, ids, base64",
        count: 150,
        min_len: 10,
        max_len: 2000,
        gen: ids,
    },
    Category {
        name: "german",
        count: 150,
        min_len: 20,
        max_len: 3000,
        gen: german,
    },
    Category {
        name: "french",
        count: 150,
        min_len: 20,
        max_len: 3000,
        gen: french,
    },
    Category {
        name: "spanish",
        count: 150,
        min_len: 20,
        max_len: 3000,
        gen: spanish,
    },
    Category {
        name: "russian",
        count: 150,
        min_len: 20,
        max_len: 3000,
        gen: russian,
    },
    Category {
        name: "chinese",
        count: 150,
        min_len: 6,
        max_len: 3000,
        gen: chinese,
    },
    Category {
        name: "japanese",
        count: 150,
        min_len: 6,
        max_len: 3000,
        gen: japanese,
    },
    Category {
        name: "pl, tr, vi, uk",
        count: 150,
        min_len: 10,
        max_len: 3000,
        gen: more_latin,
    },
    Category {
        name: "ko, ar, hi, el, he, th",
        count: 150,
        min_len: 10,
        max_len: 3000,
        gen: other_scripts,
    },
    Category {
        name: "mixed",
        count: 150,
        min_len: 20,
        max_len: 4000,
        gen: mixed,
    },
    Category {
        name: "very short",
        count: 300,
        min_len: 1,
        max_len: 24,
        gen: short,
    },
];

/// Every text of the sample, with its category index.
pub fn sample(seed: u64) -> Vec<(usize, String)> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    for (ci, c) in CATEGORIES.iter().enumerate() {
        for _ in 0..c.count {
            let target = rng.log_len(c.min_len, c.max_len);
            let t = (c.gen)(&mut rng, target);
            if !t.is_empty() {
                out.push((ci, t));
            }
        }
    }
    out
}

/// Appends units from `unit` until `s` reaches `target` bytes.
fn fill(rng: &mut Rng, target: usize, mut unit: impl FnMut(&mut Rng, &mut String)) -> String {
    let mut s = String::new();
    while s.len() < target {
        unit(rng, &mut s);
    }
    s
}

fn prose(rng: &mut Rng, target: usize, pool: &[&str], sep: &str) -> String {
    let mut in_par = 0;
    fill(rng, target, |rng, s| {
        if !s.is_empty() {
            if in_par >= 3 && rng.chance(0.3) {
                s.push_str("\n\n");
                in_par = 0;
            } else {
                s.push_str(sep);
            }
        }
        s.push_str(rng.pick(pool));
        in_par += 1;
    })
}

fn english(rng: &mut Rng, target: usize) -> String {
    let mut in_par = 0;
    fill(rng, target, |rng, s| {
        if !s.is_empty() {
            if in_par >= 3 && rng.chance(0.3) {
                s.push_str("\n\n");
                in_par = 0;
            } else {
                s.push(' ');
            }
        }
        in_par += 1;
        if rng.chance(0.6) {
            s.push_str(rng.pick(EN_SENTENCES));
        } else {
            // A synthetic sentence from the word list, for variety.
            let n = rng.range(5, 22);
            for i in 0..n {
                let w = rng.pick(EN_WORDS);
                if i == 0 {
                    let mut c = w.chars();
                    if let Some(f) = c.next() {
                        s.extend(f.to_uppercase());
                        s.push_str(c.as_str());
                    }
                } else {
                    s.push(' ');
                    s.push_str(w);
                }
                if i + 1 < n && rng.chance(0.08) {
                    s.push(',');
                }
            }
            s.push_str(rng.pick(&[".", ".", ".", "?", "!", ";"]));
        }
    })
}

fn chat(rng: &mut Rng, target: usize) -> String {
    fill(rng, target, |rng, s| {
        if !s.is_empty() {
            s.push_str(rng.pick(&[" ", "\n", "\n\n"]));
        }
        s.push_str(rng.pick(CHAT_OPENERS));
        s.push(' ');
        s.push_str(rng.pick(CHAT_TASKS));
        let ctx = rng.pick(CHAT_CONTEXTS);
        if !ctx.is_empty() {
            s.push(' ');
            s.push_str(ctx);
        }
        s.push('?');
        let tail = rng.pick(CHAT_TAILS);
        if !tail.is_empty() {
            s.push(' ');
            s.push_str(tail);
        }
    })
}

fn snake(rng: &mut Rng) -> String {
    let n = rng.range(1, 3);
    (0..n)
        .map(|_| rng.pick(IDENT_WORDS))
        .collect::<Vec<_>>()
        .join("_")
}

fn camel(rng: &mut Rng) -> String {
    let n = rng.range(1, 3);
    (0..n)
        .map(|_| {
            let w = rng.pick(IDENT_WORDS);
            let mut c = w.chars();
            match c.next() {
                Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
                None => String::new(),
            }
        })
        .collect()
}

fn num(rng: &mut Rng) -> String {
    match rng.below(4) {
        0 => rng.below(10).to_string(),
        1 => rng.below(1000).to_string(),
        2 => rng.below(1_000_000).to_string(),
        _ => format!("{}.{}", rng.below(100), rng.below(1000)),
    }
}

fn rust_code(rng: &mut Rng, target: usize) -> String {
    fill(rng, target, |rng, s| {
        let (f, a, b, v) = (snake(rng), snake(rng), snake(rng), snake(rng));
        let (ta, tb) = (rng.pick(RUST_TYPES), rng.pick(RUST_TYPES));
        let ty = camel(rng);
        match rng.below(4) {
            0 => s.push_str(&format!(
                "/// {}\npub fn {f}({a}: {ta}, {b}: {tb}) -> Result<{ty}, Error> {{\n    let {v} = {a}.{}()?;\n    if {v}.len() > {} {{\n        return Err(Error::{}(format!(\"{{}} too long: {{}}\", \"{}\", {v}.len())));\n    }}\n    Ok({ty}::from({v}))\n}}\n\n",
                rng.pick(EN_SENTENCES), snake(rng), num(rng), camel(rng), rng.pick(IDENT_WORDS)
            )),
            1 => s.push_str(&format!(
                "#[derive(Debug, Clone, PartialEq)]\npub struct {ty} {{\n    pub {a}: {ta},\n    {b}: {tb},\n    {v}: Vec<{}>,\n}}\n\n",
                camel(rng)
            )),
            2 => s.push_str(&format!(
                "impl {ty} {{\n    fn {f}(&mut self, {a}: {ta}) -> {tb} {{\n        for (i, {v}) in self.{b}.iter().enumerate() {{\n            if *{v} == {a} {{\n                self.{} += i as u64; // {}\n            }}\n        }}\n        match self.{} {{\n            Some(x) => x,\n            None => Default::default(),\n        }}\n    }}\n}}\n\n",
                snake(rng), rng.pick(EN_WORDS), snake(rng)
            )),
            _ => s.push_str(&format!(
                "#[test]\nfn {f}_works() {{\n    let {v} = {ty}::new({}, \"{}\");\n    assert_eq!({v}.{a}(), {});\n}}\n\n",
                num(rng), rng.pick(IDENT_WORDS), num(rng)
            )),
        }
    })
}

fn python_code(rng: &mut Rng, target: usize) -> String {
    fill(rng, target, |rng, s| {
        let (f, a, b, v) = (snake(rng), snake(rng), snake(rng), snake(rng));
        let ty = camel(rng);
        match rng.below(4) {
            0 => s.push_str(&format!(
                "def {f}({a}, {b}={}):\n    \"\"\"{}\"\"\"\n    {v} = {a}.{}({b})\n    for i in range(len({v})):\n        if {v}[i] == \"{}\":\n            return i\n    return None\n\n\n",
                num(rng), rng.pick(EN_SENTENCES), snake(rng), rng.pick(IDENT_WORDS)
            )),
            1 => s.push_str(&format!(
                "class {ty}:\n    def __init__(self, {a}, {b}):\n        self.{a} = {a}\n        self.{b} = {b}\n        self._{v} = {{}}\n\n    def {f}(self):\n        # {}\n        return self.{a} + self.{b}\n\n\n",
                rng.pick(EN_SENTENCES)
            )),
            2 => s.push_str(&format!(
                "import {}\nfrom {}.{} import {ty}\n\n{} = {ty}({a}={}, {b}=\"{}\")\nprint(f\"{{{v}}}: {{len({a})}} items\")\n",
                snake(rng), snake(rng), snake(rng), v.to_uppercase(), num(rng), rng.pick(IDENT_WORDS)
            )),
            _ => s.push_str(&format!(
                "    {v} = [x * {} for x in {a} if x > {}]\n    {b}.update({{\"{}\": {v}, \"{}\": {}}})\n",
                num(rng), num(rng), snake(rng), snake(rng), rng.chance(0.5)
            )),
        }
    })
}

fn json_value(rng: &mut Rng, depth: usize, pretty: bool, indent: usize, s: &mut String) {
    let k = if depth >= 3 {
        rng.below(4)
    } else {
        rng.below(6)
    };
    match k {
        0 => s.push_str(&num(rng)),
        1 => {
            s.push('"');
            if rng.chance(0.5) {
                s.push_str(rng.pick(IDENT_WORDS));
            } else {
                let n = rng.range(1, 6);
                let words: Vec<&str> = (0..n).map(|_| rng.pick(EN_WORDS)).collect();
                s.push_str(&words.join(" "));
            }
            s.push('"');
        }
        2 => s.push_str(rng.pick(&["true", "false", "null"])),
        3 => s.push_str(&format!(
            "\"{}-{:08x}\"",
            rng.pick(IDENT_WORDS),
            rng.next_u64() as u32
        )),
        4 => {
            s.push('[');
            let n = rng.range(0, 4);
            for i in 0..n {
                if i > 0 {
                    s.push_str(if pretty { ", " } else { "," });
                }
                json_value(rng, depth + 1, false, indent, s);
            }
            s.push(']');
        }
        _ => json_object(rng, depth + 1, pretty, indent + 2, s),
    }
}

fn json_object(rng: &mut Rng, depth: usize, pretty: bool, indent: usize, s: &mut String) {
    s.push('{');
    let n = rng.range(1, 6);
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        if pretty {
            s.push('\n');
            s.extend(std::iter::repeat_n(' ', indent));
        }
        s.push('"');
        if rng.chance(0.5) {
            s.push_str(&snake(rng));
        } else {
            let c = camel(rng);
            let mut it = c.chars();
            if let Some(f) = it.next() {
                s.extend(f.to_lowercase());
                s.push_str(it.as_str());
            }
        }
        s.push_str(if pretty { "\": " } else { "\":" });
        json_value(rng, depth, pretty, indent, s);
    }
    if pretty {
        s.push('\n');
        s.extend(std::iter::repeat_n(' ', indent.saturating_sub(2)));
    }
    s.push('}');
}

fn json(rng: &mut Rng, target: usize) -> String {
    let pretty = rng.chance(0.5);
    fill(rng, target, |rng, s| {
        if !s.is_empty() {
            s.push('\n');
        }
        json_object(rng, 0, pretty, 2, s);
    })
}

fn numbers(rng: &mut Rng, target: usize) -> String {
    let kind = rng.below(4);
    let cols = rng.range(2, 6);
    let mut s = String::new();
    match kind {
        0 => {
            let h: Vec<String> = (0..cols).map(|_| snake(rng)).collect();
            s.push_str(&h.join(","));
            s.push('\n');
        }
        1 => {
            let h: Vec<String> = (0..cols).map(|_| camel(rng)).collect();
            s.push_str(&format!(
                "| {} |\n|{}\n",
                h.join(" | "),
                "---|".repeat(cols)
            ));
        }
        _ => {}
    }
    while s.len() < target {
        match kind {
            0 => {
                let r: Vec<String> = (0..cols).map(|_| num(rng)).collect();
                s.push_str(&r.join(","));
                s.push('\n');
            }
            1 => {
                let r: Vec<String> = (0..cols).map(|_| num(rng)).collect();
                s.push_str(&format!("| {} |\n", r.join(" | ")));
            }
            2 => {
                s.push_str(&match rng.below(6) {
                    0 => format!(
                        "Total: ${},{:03}.{:02} ",
                        rng.below(1000),
                        rng.below(1000),
                        rng.below(100)
                    ),
                    1 => format!(
                        "{}-{:02}-{:02} ",
                        rng.range(1990, 2030),
                        rng.range(1, 12),
                        rng.range(1, 28)
                    ),
                    2 => format!("{}.{}% ", rng.below(100), rng.below(10)),
                    3 => format!(
                        "+1 ({}) {}-{:04} ",
                        rng.range(200, 999),
                        rng.range(200, 999),
                        rng.below(10000)
                    ),
                    4 => format!(
                        "{:02}:{:02}:{:02} ",
                        rng.below(24),
                        rng.below(60),
                        rng.below(60)
                    ),
                    _ => format!("{} ", rng.next_u64() % 10_000_000_000),
                });
            }
            _ => {
                s.push_str(&format!(
                    "{} {} {}: {} ({}%)\n",
                    rng.pick(&["In", "By", "Since"]),
                    rng.range(1990, 2030),
                    rng.pick(IDENT_WORDS),
                    num(rng),
                    rng.below(100)
                ));
            }
        }
    }
    s
}

const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const B64URL: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const HEX: &[u8] = b"0123456789abcdef";

fn chars_from(rng: &mut Rng, alphabet: &[u8], n: usize) -> String {
    (0..n).map(|_| rng.pick(alphabet) as char).collect()
}

fn id_unit(rng: &mut Rng) -> String {
    match rng.below(10) {
        0 => format!(
            "https://{}.{}/{}/{}?{}={}&page={}",
            rng.pick(IDENT_WORDS),
            rng.pick(&["com", "io", "org", "dev", "example.com"]),
            rng.pick(&["api/v1", "v2", "docs", "users", "static/js"]),
            snake(rng),
            rng.pick(IDENT_WORDS),
            num(rng),
            rng.below(50)
        ),
        1 => format!(
            "{}-{}-4{}-{}-{}",
            chars_from(rng, HEX, 8),
            chars_from(rng, HEX, 4),
            chars_from(rng, HEX, 3),
            chars_from(rng, HEX, 4),
            chars_from(rng, HEX, 12)
        ),
        2 => {
            let n = rng.pick(&[7, 32, 40, 64]);
            chars_from(rng, HEX, n)
        }
        3 => {
            let n = rng.range(4, 120) * 4;
            let mut b = chars_from(rng, B64, n);
            if rng.chance(0.5) {
                b.truncate(n - 2);
                b.push_str("==");
            }
            b
        }
        4 => format!(
            "eyJ{}.eyJ{}.{}",
            chars_from(rng, B64URL, 30),
            {
                let n = rng.range(40, 160);
                chars_from(rng, B64URL, n)
            },
            chars_from(rng, B64URL, 43)
        ),
        5 => format!(
            "sk-{}{}",
            rng.pick(&["", "proj-", "ant-"]),
            chars_from(rng, B64URL, 48)
        ),
        6 => format!(
            "{}.{}@{}.com",
            rng.pick(IDENT_WORDS),
            rng.pick(IDENT_WORDS),
            rng.pick(IDENT_WORDS)
        ),
        7 => format!(
            "{}.{}.{}.{}:{}",
            rng.below(256),
            rng.below(256),
            rng.below(256),
            rng.below(256),
            rng.range(1, 65535)
        ),
        8 => format!(
            "/var/{}/{}/{}.{}",
            rng.pick(IDENT_WORDS),
            snake(rng),
            snake(rng),
            rng.pick(&["log", "json", "rs", "py", "tar.gz"])
        ),
        _ => format!(
            "{}_{}",
            rng.pick(&["req", "usr", "org", "msg", "chatcmpl"]),
            chars_from(rng, B64URL, 24)
        ),
    }
}

fn ids(rng: &mut Rng, target: usize) -> String {
    fill(rng, target, |rng, s| {
        if !s.is_empty() {
            s.push_str(rng.pick(&["\n", " ", ", "]));
        }
        s.push_str(&id_unit(rng));
    })
}

fn german(rng: &mut Rng, target: usize) -> String {
    prose(rng, target, DE_SENTENCES, " ")
}
fn french(rng: &mut Rng, target: usize) -> String {
    prose(rng, target, FR_SENTENCES, " ")
}
fn spanish(rng: &mut Rng, target: usize) -> String {
    prose(rng, target, ES_SENTENCES, " ")
}
fn russian(rng: &mut Rng, target: usize) -> String {
    prose(rng, target, RU_SENTENCES, " ")
}
fn chinese(rng: &mut Rng, target: usize) -> String {
    prose(rng, target, ZH_SENTENCES, "")
}
fn japanese(rng: &mut Rng, target: usize) -> String {
    prose(rng, target, JA_SENTENCES, "")
}

/// One language per text, as a real message would be.
fn one_language(rng: &mut Rng, target: usize, languages: &[&[&'static str]]) -> String {
    let pool = rng.pick(languages);
    prose(rng, target, pool, " ")
}

fn other_scripts(rng: &mut Rng, target: usize) -> String {
    one_language(rng, target, OTHER_SCRIPT_LANGUAGES)
}

fn more_latin(rng: &mut Rng, target: usize) -> String {
    one_language(rng, target, MORE_LANGUAGES)
}

fn mixed(rng: &mut Rng, target: usize) -> String {
    fill(rng, target, |rng, s| {
        if !s.is_empty() {
            s.push_str(rng.pick(&[" ", " ", "\n", "\n\n"]));
        }
        match rng.below(10) {
            0 => s.push_str(&format!("## {}\n", rng.pick(CHAT_TASKS))),
            1 => s.push_str(&format!(
                "- **{}**: `{}()` returns {}",
                rng.pick(IDENT_WORDS),
                snake(rng),
                num(rng)
            )),
            2 => s.push_str(&format!("{} {}", rng.pick(EN_SENTENCES), rng.pick(EMOJI))),
            3 => s.push_str(rng.pick(ZH_SENTENCES)),
            4 => s.push_str(&format!("See {} for details.", id_unit(rng))),
            5 => s.push_str(&format!(
                "```\n{}\n```",
                rng.pick(&[
                    "cargo build --release",
                    "pip install -r requirements.txt",
                    "git log --oneline -n 5",
                    "curl -s localhost:8080/health | jq ."
                ])
            )),
            6 => {
                let pool = rng.pick(&[
                    DE_SENTENCES,
                    FR_SENTENCES,
                    ES_SENTENCES,
                    RU_SENTENCES,
                    JA_SENTENCES,
                ]);
                s.push_str(rng.pick(pool));
            }
            7 => s.push_str(&format!(
                "> {} — {} ({}%)",
                rng.pick(EN_SENTENCES),
                num(rng),
                rng.below(100)
            )),
            _ => s.push_str(rng.pick(EN_SENTENCES)),
        }
    })
}

fn short(rng: &mut Rng, target: usize) -> String {
    let s = match rng.below(6) {
        0 => (rng.pick(SHORT_MISC)).to_string(),
        1 => (rng.pick(EN_WORDS)).to_string(),
        2 => {
            let n = rng.range(2, 4);
            (0..n)
                .map(|_| rng.pick(EN_WORDS))
                .collect::<Vec<_>>()
                .join(" ")
        }
        3 => num(rng),
        4 => (rng.pick(EMOJI)).to_string(),
        _ => {
            let pool = rng.pick(&[EN_SENTENCES, DE_SENTENCES, ZH_SENTENCES, RU_SENTENCES]);
            rng.pick(pool)
                .chars()
                .take(target.clamp(2, 24) / 2 + 1)
                .collect()
        }
    };
    s
}
