//! Incremental Server-Sent Events parsing for streamed chat completions.
//!
//! Network chunks split events (and even UTF-8 characters) at arbitrary byte
//! offsets, so the parser buffers bytes until a full line is available and
//! only emits an event at the blank line that ends it. Classification into
//! OpenAI stream semantics (`[DONE]`, error, content) lives here too so the
//! request code only has to act on the verdict.

use serde::Deserialize;

/// One dispatched SSE event: its `event:` name, if any, and its joined `data:` lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Event {
    pub name: Option<String>,
    pub data: String,
}

/// Line-oriented SSE parser that survives arbitrary chunk boundaries.
///
/// Only `\n` and `\r\n` line endings are recognised: a bare `\r` terminator is
/// legal SSE but no inference server emits it, and supporting it would need
/// look-ahead across chunks for no practical gain.
#[derive(Debug, Default)]
pub(crate) struct Parser {
    buf: Vec<u8>,
    name: Option<String>,
    data: String,
    has_data: bool,
}

impl Parser {
    /// Appends `chunk` and pushes every event it completes onto `out`.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<Event>) {
        self.buf.extend_from_slice(chunk);
        let mut start = 0;
        while let Some(pos) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let end = start + pos;
            let line = strip_cr(&self.buf[start..end]);
            let line = String::from_utf8_lossy(line).into_owned();
            self.line(&line, out);
            start = end + 1;
        }
        self.buf.drain(..start);
    }

    /// Flushes what is left once the body ends.
    ///
    /// Strict SSE drops an event that is not followed by a blank line, but a
    /// server that closes right after `data: [DONE]\n` did finish its stream,
    /// so the load tester is lenient here rather than reporting a false failure.
    pub fn finish(&mut self, out: &mut Vec<Event>) {
        if !self.buf.is_empty() {
            let rest = std::mem::take(&mut self.buf);
            let line = String::from_utf8_lossy(strip_cr(&rest)).into_owned();
            self.line(&line, out);
        }
        self.dispatch(out);
    }

    fn line(&mut self, line: &str, out: &mut Vec<Event>) {
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "event" => self.name = Some(value.to_owned()),
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut Vec<Event>) {
        let name = self.name.take();
        if self.has_data {
            self.has_data = false;
            out.push(Event {
                name,
                data: std::mem::take(&mut self.data),
            });
        }
    }
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// What an event means for the request's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `data: [DONE]`, the only proof that the server finished the stream.
    Done,
    /// An `{"error": ...}` payload or an `event: error`.
    Error,
    /// A chunk carrying generated text; the first one marks time to first token.
    Content,
    /// Role-only, usage-only or otherwise empty chunks.
    Other,
    /// Data that is not JSON, i.e. a protocol violation.
    Malformed,
}

#[derive(Deserialize)]
struct Chunk {
    error: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    choices: Vec<Choice>,
}

#[derive(Deserialize)]
struct Choice {
    delta: Option<Delta>,
}

#[derive(Deserialize)]
struct Delta {
    content: Option<String>,
}

pub(crate) fn classify(event: &Event) -> Kind {
    if event.name.as_deref() == Some("error") {
        return Kind::Error;
    }
    if event.data.trim() == "[DONE]" {
        return Kind::Done;
    }
    match serde_json::from_str::<Chunk>(&event.data) {
        Err(_) => Kind::Malformed,
        Ok(chunk) if chunk.error.is_some() => Kind::Error,
        Ok(chunk) => {
            let has_content = chunk.choices.iter().any(|c| {
                c.delta
                    .as_ref()
                    .and_then(|d| d.content.as_deref())
                    .is_some_and(|s| !s.is_empty())
            });
            if has_content {
                Kind::Content
            } else {
                Kind::Other
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_chunks(chunks: &[&[u8]]) -> Vec<Event> {
        let mut parser = Parser::default();
        let mut out = Vec::new();
        for chunk in chunks {
            parser.feed(chunk, &mut out);
        }
        parser.finish(&mut out);
        out
    }

    fn data(s: &str) -> Event {
        Event {
            name: None,
            data: s.to_owned(),
        }
    }

    const STREAM: &str = concat!(
        ": keep-alive comment\n\n",
        "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"h\u{e9}llo\"}}]}\r\n\r\n",
        "data: {\"choices\":[],\"usage\":{\"total_tokens\":3}}\n\n",
        "data: [DONE]\n\n",
    );

    #[test]
    fn every_split_point_yields_the_same_events() {
        let whole = parse_chunks(&[STREAM.as_bytes()]);
        let kinds: Vec<Kind> = whole.iter().map(classify).collect();
        assert_eq!(
            kinds,
            [Kind::Other, Kind::Content, Kind::Other, Kind::Done],
            "{whole:?}"
        );
        let bytes = STREAM.as_bytes();
        for split in 1..bytes.len() {
            let (a, b) = bytes.split_at(split);
            assert_eq!(parse_chunks(&[a, b]), whole, "split at byte {split}");
        }
        let single_bytes: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(parse_chunks(&single_bytes), whole);
    }

    #[test]
    fn done_without_trailing_blank_line_still_counts() {
        assert_eq!(parse_chunks(&[b"data: [DONE]\n"]), [data("[DONE]")]);
        assert_eq!(parse_chunks(&[b"data: [DO", b"NE]"]), [data("[DONE]")]);
        assert_eq!(classify(&data("[DONE]")), Kind::Done);
    }

    #[test]
    fn error_payload_and_error_event_are_errors() {
        let events = parse_chunks(&[
            b"data: {\"error\":{\"message\":\"overloaded\"}}\n\n",
            b"event: error\ndata: upstream went away\n\n",
        ]);
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].name.as_deref(), Some("error"));
        assert!(events.iter().all(|e| classify(e) == Kind::Error));
    }

    #[test]
    fn multi_line_data_is_joined_and_garbage_is_malformed() {
        let events = parse_chunks(&[b"data: {\"choices\":\ndata: []}\n\ndata: nope\n\n"]);
        assert_eq!(events, [data("{\"choices\":\n[]}"), data("nope")]);
        assert_eq!(classify(&events[0]), Kind::Other);
        assert_eq!(classify(&events[1]), Kind::Malformed);
    }

    #[test]
    fn empty_content_is_not_a_first_token() {
        let event = data("{\"choices\":[{\"delta\":{\"content\":\"\"}}]}");
        assert_eq!(classify(&event), Kind::Other);
    }
}
