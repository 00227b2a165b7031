//! Incremental Server-Sent Events parsing, as the WHATWG HTML spec interprets an event stream.
//! Streamed provider responses arrive in chunks split anywhere (inside a line, a CRLF or a
//! UTF-8 character); the gateway sees each event once it is complete, with the exact bytes it
//! came in, so it can forward, rewrite or drop events without re-serializing the stream.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The last `event:` field's value; `None` without one or when it is empty, which the spec
    /// reads as the default type, `message`.
    pub event: Option<String>,
    /// The `data:` lines' values joined with '\n'.
    pub data: String,
    /// The exact bytes of the event as received, through its terminating blank line, so a
    /// caller can re-emit or drop it verbatim. Lines that dispatched nothing before it
    /// (keep-alive comments, blank lines, a BOM) lead its `raw`: concatenating the `raw` of
    /// every event and the tail `finish` returns reproduces the stream byte for byte.
    pub raw: Vec<u8>,
}

/// The parser's state between chunks. It buffers only the bytes since the last dispatched
/// event (`pending`); a caller that must bound memory checks `pending` after each chunk.
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes since the last dispatch: the event in progress, its unfinished line last.
    raw: Vec<u8>,
    /// Where the unfinished line starts in `raw`.
    line_start: usize,
    data: String,
    event: Option<String>,
    /// Leading bytes of `raw` that belong to no event: blocks that ended without data
    /// (keep-alive comments). `take_idle` hands them out.
    idle: usize,
    /// The last line ended with a CR that ended its chunk: a LF opening the next chunk is
    /// part of that line ending, not a blank line.
    after_cr: bool,
    /// That CR ended the blank line of an event with data. The event waits for the next byte
    /// (or `finish`) to know whether a LF belongs to its `raw`, so that `raw` does not depend
    /// on where the stream was split.
    held: bool,
    /// A line was completed, so a BOM can no longer start the stream.
    started: bool,
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; calls `on_event` for every event completed by them, in order.
    pub fn feed(&mut self, mut bytes: &[u8], mut on_event: impl FnMut(SseEvent)) {
        if self.after_cr {
            let Some((&first, rest)) = bytes.split_first() else {
                return;
            };
            self.after_cr = false;
            if first == b'\n' {
                self.raw.push(b'\n');
                self.line_start = self.raw.len();
                bytes = rest;
            }
            if std::mem::take(&mut self.held) {
                on_event(self.dispatch());
            }
        }
        while let Some(eol) = memchr::memchr2(b'\n', b'\r', bytes) {
            let crlf = bytes.get(eol..eol + 2) == Some(&b"\r\n"[..]);
            let eol_len = if crlf { 2 } else { 1 };
            let Some((line, rest)) = bytes.split_at_checked(eol + eol_len) else {
                break;
            };
            self.raw.extend_from_slice(line);
            self.after_cr = rest.is_empty() && line.last() == Some(&b'\r');
            self.end_line(self.raw.len() - eol_len, &mut on_event);
            bytes = rest;
        }
        self.raw.extend_from_slice(bytes);
    }

    /// End of stream: per the spec an incomplete event at EOF is discarded; returns the bytes
    /// of that unfinished tail (possibly empty) so the caller can still emit them verbatim.
    /// Calls `on_event` for an event whose blank line was a CR ending the last chunk: only
    /// the end of the stream says that no LF follows it. The parser is then as new.
    pub fn finish(&mut self, mut on_event: impl FnMut(SseEvent)) -> Vec<u8> {
        if self.held {
            on_event(self.dispatch());
        }
        std::mem::take(self).raw
    }

    /// Bytes buffered for the event in progress (raw).
    pub fn pending(&self) -> usize {
        self.raw.len()
    }

    /// Interprets the line that ends at `end` in `raw` (its line ending excluded).
    fn end_line(&mut self, end: usize, on_event: &mut impl FnMut(SseEvent)) {
        let mut line = self.raw.get(self.line_start..end).unwrap_or_default();
        if !self.started {
            self.started = true;
            line = line.strip_prefix(BOM).unwrap_or(line);
        }
        if !line.is_empty() {
            field(line, &mut self.data, &mut self.event);
        } else if self.data.is_empty() {
            // Nothing to dispatch; the spec still resets the event type.
            self.event = None;
            self.idle = self.raw.len();
        } else if self.after_cr {
            self.held = true;
        } else {
            on_event(self.dispatch());
        }
        self.line_start = self.raw.len();
    }

    /// Gives up on the event in progress: returns every byte buffered and starts afresh, as
    /// new. For a caller that must bound what it holds back.
    pub fn abandon(&mut self) -> Vec<u8> {
        std::mem::take(self).raw
    }

    /// Takes the bytes buffered so far that belong to no event (keep-alive comments and
    /// other blocks without data), so that a caller that re-emits the stream event by event
    /// need not hold them back until the next event. Taking them keeps the byte-for-byte
    /// invariant: idle bytes, event `raw`s and the `finish` tail, in order, are the input.
    pub fn take_idle(&mut self) -> Vec<u8> {
        let idle = std::mem::take(&mut self.idle).min(self.raw.len());
        if idle == 0 {
            return Vec::new();
        }
        self.line_start = self.line_start.saturating_sub(idle);
        self.raw.drain(..idle).collect()
    }

    fn dispatch(&mut self) -> SseEvent {
        let mut data = std::mem::take(&mut self.data);
        data.pop();
        self.line_start = 0;
        self.idle = 0;
        SseEvent {
            event: self.event.take(),
            data,
            raw: std::mem::take(&mut self.raw),
        }
    }
}

/// Applies one non-blank line to the event in progress.
fn field(line: &[u8], data: &mut String, event: &mut Option<String>) {
    let (name, value) = match line.iter().position(|&b| b == b':') {
        Some(colon) => {
            let (name, rest) = line.split_at(colon);
            let value = rest.get(1..).unwrap_or_default();
            (name, value.strip_prefix(b" ").unwrap_or(value))
        }
        None => (line, &b""[..]),
    };
    match name {
        b"data" => {
            // `from_utf8` checks ASCII a word at a time; the lossy path only for bad bytes.
            match std::str::from_utf8(value) {
                Ok(text) => data.push_str(text),
                Err(_) => data.push_str(&String::from_utf8_lossy(value)),
            }
            data.push('\n');
        }
        b"event" => {
            *event = (!value.is_empty()).then(|| String::from_utf8_lossy(value).into_owned());
        }
        // Comments (an empty name), `id`, `retry` and unknown fields: nothing the gateway uses.
        _ => {}
    }
}

#[cfg(test)]
mod idle_tests {
    use super::*;

    #[test]
    fn keep_alive_comments_are_handed_out_without_waiting_for_the_next_event() {
        let mut p = SseParser::new();
        let mut events = Vec::new();
        p.feed(b": PROCESSING\n\n: still\n\ndata: x", |e| events.push(e));
        assert!(events.is_empty());
        assert_eq!(p.take_idle(), b": PROCESSING\n\n: still\n\n");
        assert_eq!(p.take_idle(), b"");
        p.feed(b"\n\n", |e| events.push(e));
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].raw, b"data: x\n\n");
        assert_eq!(events[0].data, "x");
        // Split at every offset, taking idle bytes after each chunk: still byte for byte.
        let input: &[u8] = b": ka\r\n\r\ndata: a\r\n\r\n: ka\n\nevent: e\n\ndata: b\n\n";
        for cut in 0..=input.len() {
            let (x, y) = input.split_at(cut);
            let mut p = SseParser::new();
            let mut out = Vec::new();
            for part in [x, y] {
                p.feed(part, |e| out.extend_from_slice(&e.raw));
                out.extend(p.take_idle());
            }
            out.extend(p.finish(|e| out_extend(&e)));
            assert_eq!(out, input, "cut at {cut}");
        }
    }

    fn out_extend(_e: &SseEvent) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` in order; returns the events and the tail `finish` returned.
    fn parse_chunks<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> (Vec<SseEvent>, Vec<u8>) {
        let mut parser = SseParser::new();
        let mut events = Vec::new();
        for chunk in chunks {
            parser.feed(chunk, |e| events.push(e));
        }
        let tail = parser.finish(|e| events.push(e));
        (events, tail)
    }

    fn parse(input: &[u8]) -> (Vec<SseEvent>, Vec<u8>) {
        parse_chunks([input])
    }

    fn data(events: &[SseEvent]) -> Vec<&str> {
        events.iter().map(|e| e.data.as_str()).collect()
    }

    /// Every event's `raw`, then the tail, must be the input again.
    fn assert_lossless(input: &[u8], (events, tail): &(Vec<SseEvent>, Vec<u8>)) {
        let mut out: Vec<u8> = events.iter().flat_map(|e| e.raw.clone()).collect();
        out.extend_from_slice(tail);
        assert_eq!(out, input);
    }

    #[test]
    fn openai_stream() {
        let input = b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n\
                      data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3}}\n\n\
                      data: [DONE]\n\n";
        let parsed = parse(input);
        let (events, tail) = &parsed;
        assert_eq!(
            data(events),
            [
                r#"{"choices":[{"delta":{"content":"Hi"}}]}"#,
                r#"{"choices":[],"usage":{"prompt_tokens":3}}"#,
                "[DONE]"
            ]
        );
        assert!(events.iter().all(|e| e.event.is_none()));
        assert_eq!(events[2].raw, b"data: [DONE]\n\n");
        assert!(tail.is_empty());
        assert_lossless(input, &parsed);
    }

    #[test]
    fn multi_line_data_and_field_syntax() {
        let input = b"data: a\ndata:b\ndata\ndata:  c\n\ndata:\n\n";
        let (events, _) = parse(input);
        // `data` alone is an empty value; only one space after the colon is stripped; a
        // lone `data:` still dispatches, with empty data.
        assert_eq!(data(&events), ["a\nb\n\n c", ""]);
    }

    #[test]
    fn comments_and_empty_blocks_lead_the_next_event() {
        let input = b": keep-alive\n\n\n: ping\ndata: x\n: mid-event\n\n: trailing\n";
        let parsed = parse(input);
        let (events, tail) = &parsed;
        assert_eq!(data(events), ["x"]);
        assert_eq!(
            events[0].raw,
            b": keep-alive\n\n\n: ping\ndata: x\n: mid-event\n\n"
        );
        assert_eq!(tail, b": trailing\n");
        assert_lossless(input, &parsed);
    }

    #[test]
    fn cr_and_crlf_line_endings() {
        let (events, tail) = parse(b"data: a\rdata: b\r\rdata: c\r\n\r\ndata: d\n\r\n");
        assert_eq!(data(&events), ["a\nb", "c", "d"]);
        assert_eq!(events[0].raw, b"data: a\rdata: b\r\r");
        assert_eq!(events[1].raw, b"data: c\r\n\r\n");
        assert!(tail.is_empty());
    }

    #[test]
    fn a_cr_ending_the_stream_still_ends_the_event() {
        let (events, tail) = parse(b"data: a\r\r");
        assert_eq!(data(&events), ["a"]);
        assert!(tail.is_empty());
    }

    #[test]
    fn a_crlf_split_across_chunks_is_one_line_ending() {
        let mut parser = SseParser::new();
        let mut events = Vec::new();
        parser.feed(b"data: a\r", |e| events.push(e));
        parser.feed(b"\n\r", |e| events.push(e));
        assert!(
            events.is_empty(),
            "held until the byte after the CR is known"
        );
        parser.feed(b"\ndata: b", |e| events.push(e));
        assert_eq!(data(&events), ["a"]);
        assert_eq!(events[0].raw, b"data: a\r\n\r\n");
        assert_eq!(parser.pending(), 7);
        assert_eq!(parser.finish(|e| events.push(e)), b"data: b");
        assert_eq!(events.len(), 1);
    }

    #[test]
    fn event_types_reset_at_each_blank_line() {
        let input =
            b"event: add\ndata: 1\n\ndata: 2\n\nevent: lost\n\ndata: 3\n\nevent:\ndata: 4\n\n";
        let (events, _) = parse(input);
        let kinds: Vec<_> = events.iter().map(|e| e.event.as_deref()).collect();
        assert_eq!(kinds, [Some("add"), None, None, None]);
        assert_eq!(data(&events), ["1", "2", "3", "4"]);
    }

    #[test]
    fn id_and_retry_are_ignored() {
        let (events, _) = parse(b"id: 7\nretry: 100\nretry: x\nid\ndata: x\n\n");
        assert_eq!(data(&events), ["x"]);
    }

    #[test]
    fn an_unfinished_event_is_returned_not_dispatched() {
        let input = b"data: a\n\ndata: b\n";
        let parsed = parse(input);
        assert_eq!(data(&parsed.0), ["a"]);
        assert_eq!(parsed.1, b"data: b\n");
        assert_lossless(input, &parsed);
        assert_eq!(parse(b"data: b").1, b"data: b");
    }

    #[test]
    fn a_leading_bom_is_skipped_but_kept_in_raw() {
        let input = b"\xEF\xBB\xBFdata: a\n\n\xEF\xBB\xBFdata: b\n\n";
        let (events, _) = parse(input);
        // Only the stream's first BOM is one; later, it makes an unknown field name.
        assert_eq!(data(&events), ["a"]);
        assert_eq!(events[0].raw, b"\xEF\xBB\xBFdata: a\n\n");
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        let (events, _) = parse(b"event: \xFF\ndata: \xC3\xA9\xC3\n\n");
        assert_eq!(events[0].event.as_deref(), Some("\u{FFFD}"));
        assert_eq!(events[0].data, "é\u{FFFD}");
    }

    #[test]
    fn finish_leaves_the_parser_as_new() {
        let mut parser = SseParser::new();
        parser.feed(b"data: a\n", |_| {});
        assert_eq!(parser.finish(|_| {}), b"data: a\n");
        assert_eq!(parser.pending(), 0);
        let mut events = Vec::new();
        parser.feed(b"\xEF\xBB\xBFdata: b\n\n", |e| events.push(e));
        assert_eq!(data(&events), ["b"]);
    }

    const MIXED: &[u8] = b"\xEF\xBB\xBF: hello\r\n\r\nevent: delta\r\ndata: {\"t\":\"\xC3\xA9\xF0\x9F\xA6\x80\"}\r\n\r\n\
        data: a\rdata: b\r\r: c\n\ndata: [DONE]\n\nid: 1\ndata: cut";

    #[test]
    fn splitting_anywhere_changes_nothing() {
        let whole = parse(MIXED);
        assert_eq!(data(&whole.0), ["{\"t\":\"é🦀\"}", "a\nb", "[DONE]"]);
        assert_eq!(whole.0[0].event.as_deref(), Some("delta"));
        assert_eq!(whole.1, b"id: 1\ndata: cut");
        assert_lossless(MIXED, &whole);
        for at in 0..=MIXED.len() {
            let (a, b) = MIXED.split_at(at);
            assert_eq!(parse_chunks([a, b]), whole, "split at {at}");
        }
        assert_eq!(parse_chunks(MIXED.chunks(1)), whole, "one byte at a time");
    }

    // proptest does not build for wasm32-wasip1; the property tests run on the host.
    #[cfg(not(target_family = "wasm"))]
    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any bytes made of the syntax's pieces, cut into any chunks (the cut points
            /// anywhere in the input, however long), parse as they do whole, and lose nothing.
            #[test]
            fn chunking_never_matters(
                pieces in proptest::collection::vec(
                    prop::sample::select(vec![
                        &b"\r"[..], b"\n", b"\r\n", b"data", b"event", b":", b" ", b"x",
                        b"\xEF\xBB\xBF", b"\xC3", b"\xA9",
                    ]),
                    0..120,
                ),
                cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
            ) {
                let input = pieces.concat();
                let whole = parse(&input);
                assert_lossless(&input, &whole);
                // An index picks a point among 0..=len, wherever the input ends.
                let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(input.len() + 1)).collect();
                cuts.sort_unstable();
                let mut chunks = Vec::new();
                let mut from = 0;
                for cut in cuts.into_iter().chain([input.len()]) {
                    chunks.push(&input[from..cut]);
                    from = cut;
                }
                prop_assert_eq!(parse_chunks(chunks), whole);
            }
        }
    }
}
