//! The token usage of an answer, read on its way to the client: from a stream's usage events
//! ([`UsageScan`], which also removes the usage chunk the gateway asked for on the client's
//! behalf), from a whole answer's `usage` object ([`usage_of_body`]), or, when the backend
//! reports none, an [`estimate`].

use std::ops::Range;
use std::sync::LazyLock;

use bytes::{Buf, Bytes, BytesMut};
use memchr::memmem;
use serde::de::IgnoredAny;
use serde::Deserialize;

use crate::usage::TokenUsage;

/// The longest line held back (strip mode) or copied to be judged whole: a usage chunk is a few
/// hundred bytes, so a longer line is not one, and a stream of them must not grow the gateway's
/// memory.
const LINE_CAP: usize = 64 * 1024;

/// What is kept of a line longer than [`LINE_CAP`] to read its usage from: the Responses API's
/// `response.completed` event repeats the whole response (output, instructions, tools) and can run
/// past the cap, with its usage near the end.
const TAIL: usize = 4 * 1024;

/// The most tokens one answer's usage is taken to report, per count: no request has four
/// billion tokens, so a larger count is a backend's garbage; taken as it came (up to 2⁶⁴), it
/// put the key's token bucket beyond any wait a `Duration` holds and, summed in the usage log's
/// 64-bit columns, overflowed every report that covered it.
const MAX_REPORTED_TOKENS: u64 = 1 << 32;

/// `"usage"` keys, from the end, that [`usage_near_end`] tries before giving up.
const TRIES: usize = 4;

/// About 4 bytes of prompt per token: what BPE tokenizers (GPT's, Llama's, Qwen's) average on
/// English text. Code and most other languages take more tokens per byte, so the estimate runs
/// low for them.
const BYTES_PER_TOKEN: usize = 4;

const DATA: &[u8] = b"data:";
/// The member OpenAI adds to every chunk of a stream with `include_usage`, as it ends a chunk.
const NULL_USAGE: &[u8] = br#","usage":null"#;
const NULL_USAGE_END: &[u8] = br#","usage":null}"#;
const KEY: &[u8] = b"\"usage\"";

/// The `"usage"` key's finder, built once: building one per line would cost more than the search.
static USAGE_KEY: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new(KEY));

/// Follows one relayed SSE stream and finds the token usage in it, optionally removing the usage
/// chunk (`"choices":[]` with a `usage` object, before `data: [DONE]`) that the gateway asked for
/// with `stream_options.include_usage` when the client had not, and the `"usage":null` that
/// OpenAI then adds to the end of every other chunk: the client then gets exactly the bytes the
/// backend would have sent it without that option.
///
/// Lines are found with memchr and only a line with a `"usage"` key whose value is an object is
/// parsed, so a typical chunk costs a few short searches. A line split across chunks is copied
/// to be judged whole (at most [`LINE_CAP`] bytes of it); in strip mode it is also held back
/// until its end arrives, which delays nothing a client could use: half an SSE line is not an
/// event.
pub struct UsageScan {
    strip: bool,
    /// The line the last chunk left unfinished: its start, held back from the client in strip
    /// mode and a copy to judge it by otherwise; once it ran past [`LINE_CAP`], its last [`TAIL`]
    /// bytes.
    line: BytesMut,
    /// The unfinished line ran past [`LINE_CAP`] (its start went on to the client); whether it is
    /// a `data:` line.
    overlong: Option<bool>,
    /// The usage chunk's line was just removed: the blank line that ends its event goes too.
    removed: bool,
    usage: Option<TokenUsage>,
    events: u32,
    /// The stream ends at its `data: [DONE]` (OpenAI's streams), and whether that line was read:
    /// from then on only the line ends that close its event go to the client. A backend that
    /// sends events after it in the same chunk had them relayed (the relay ends the response at
    /// the next chunk), and a client that does not stop at `[DONE]` took them for the stream's.
    ends_at_done: bool,
    done: bool,
    /// The blank line that ends the `[DONE]` event has passed too.
    closed: bool,
}

impl UsageScan {
    /// A scan that removes the usage chunk from the stream when `strip`, and only reads it
    /// otherwise; with `ends_at_done`, nothing after `data: [DONE]` is passed on.
    pub fn new(strip: bool, ends_at_done: bool) -> Self {
        Self {
            strip,
            line: BytesMut::new(),
            overlong: None,
            removed: false,
            usage: None,
            events: 0,
            ends_at_done,
            done: false,
            closed: false,
        }
    }

    /// Whether the stream's `data: [DONE]` line has been read (with `ends_at_done`).
    pub fn done(&self) -> bool {
        self.done
    }

    /// Reads the next chunk of the stream and returns what goes to the client now: the same
    /// `Bytes` when all of it does (always, when not stripping), possibly nothing (then there is
    /// nothing to deliver). In strip mode a trailing unfinished line is held back until its end
    /// arrives or it runs past [`LINE_CAP`].
    pub fn pass(&mut self, chunk: Bytes) -> Bytes {
        let mut kept = Kept::default();
        let mut start = 0;
        if self.done {
            return self.after_done(chunk, 0, kept);
        }
        if !self.line.is_empty() || self.overlong.is_some() {
            let Some(end) = memchr::memchr(b'\n', &chunk) else {
                self.grow(&chunk, 0..chunk.len(), &mut kept);
                return kept.into_bytes(chunk);
            };
            self.end_line(&chunk, end, &mut kept);
            start = end + 1;
            if self.done {
                return self.after_done(chunk, start, kept);
            }
        }
        while let Some(at) = memchr::memchr(b'\n', &chunk[start..]) {
            let end = start + at;
            if self.judge(&chunk[start..end]) {
                match self.null_usage_at(&chunk[start..end]) {
                    Some(cut) => {
                        kept.keep(&chunk, start..start + cut);
                        kept.keep(&chunk, start + cut + NULL_USAGE.len()..end + 1);
                    }
                    None => kept.keep(&chunk, start..end + 1),
                }
            }
            start = end + 1;
            if self.done {
                return self.after_done(chunk, start, kept);
            }
        }
        if start < chunk.len() {
            self.grow(&chunk, start..chunk.len(), &mut kept);
        }
        kept.into_bytes(chunk)
    }

    /// At the end of the stream, the unfinished line still held back, to be delivered as it is
    /// (a line without its end is never removed).
    pub fn finish(&mut self) -> Option<Bytes> {
        let line = std::mem::take(&mut self.line);
        match self.overlong.take() {
            Some(data) => {
                self.read_tail(data, &line);
                None
            }
            None if line.is_empty() => None,
            None => {
                self.read(&line);
                self.strip.then(|| line.freeze())
            }
        }
    }

    /// The usage the stream reported: per field, the largest seen in any of its events (chat and
    /// completions report it once, or on every chunk with vLLM's continuous usage stats, growing;
    /// the Messages API splits it between `message_start` and `message_delta`).
    pub fn usage(&self) -> Option<TokenUsage> {
        self.usage
    }

    /// The `data:` events seen, other than `[DONE]` and the usage chunk: about one completion
    /// token each, for an estimate when the backend reports no usage.
    pub fn events(&self) -> u32 {
        self.events
    }

    /// Adds `chunk[range]`, which has no line end, to the unfinished line; what of it goes to the
    /// client now goes into `kept`.
    fn grow(&mut self, chunk: &[u8], range: Range<usize>, kept: &mut Kept) {
        let part = &chunk[range.clone()];
        if self.overlong.is_none() && self.line.len() + part.len() > LINE_CAP {
            self.overlong = Some(self.line.iter().chain(part).take(DATA.len()).eq(DATA));
            // Only a line continued from earlier chunks was held back; one that began in this
            // chunk follows what this chunk already kept.
            if self.strip && !self.line.is_empty() {
                kept.start_with(&self.line);
            }
        }
        if self.overlong.is_some() {
            slide(&mut self.line, part);
            kept.keep(chunk, range);
        } else {
            self.line.extend_from_slice(part);
            if !self.strip {
                kept.keep(chunk, range);
            }
        }
    }

    /// Ends the unfinished line with `chunk[..end]`, `chunk[end]` being its line end.
    fn end_line(&mut self, chunk: &[u8], end: usize, kept: &mut Kept) {
        self.grow(chunk, 0..end, kept);
        let mut line = std::mem::take(&mut self.line);
        match self.overlong.take() {
            Some(data) => {
                self.read_tail(data, &line);
                kept.keep(chunk, end..end + 1);
            }
            None => {
                if self.judge(&line) {
                    if self.strip {
                        if let Some(cut) = self.null_usage_at(&line) {
                            line.copy_within(cut + NULL_USAGE.len().., cut);
                            line.truncate(line.len() - NULL_USAGE.len());
                        }
                        kept.start_with(&line);
                    }
                    kept.keep(chunk, end..end + 1);
                }
            }
        }
        line.clear();
        self.line = line;
    }

    /// What goes to the client of a chunk whose bytes from `start` on come after the
    /// `data: [DONE]` line: what `kept` holds of it, then the line end that closes the `[DONE]`
    /// event (if it has not passed yet), and nothing more.
    fn after_done(&mut self, chunk: Bytes, start: usize, mut kept: Kept) -> Bytes {
        let mut end = start;
        while !self.closed && end < chunk.len() {
            match chunk[end] {
                b'\r' => end += 1,
                b'\n' => {
                    end += 1;
                    self.closed = true;
                }
                _ => break,
            }
        }
        kept.keep(&chunk, start..end);
        kept.into_bytes(chunk)
    }

    /// In strip mode, where a kept line (without its `\n`) ends its event's object with
    /// OpenAI's `,"usage":null`: OpenAI puts that member in every chunk only because
    /// `include_usage` is set, so a client that did not ask gets its chunks without it.
    fn null_usage_at(&self, line: &[u8]) -> Option<usize> {
        if !self.strip {
            return None;
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        (line.starts_with(DATA) && line.ends_with(NULL_USAGE_END))
            .then(|| line.len() - NULL_USAGE_END.len())
    }

    /// Reads a whole line (without its `\n`); whether it goes to the client.
    fn judge(&mut self, line: &[u8]) -> bool {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if std::mem::take(&mut self.removed) && line.is_empty() {
            return false;
        }
        self.removed = self.read(line) && self.strip;
        !self.removed
    }

    /// Reads a whole line: counts it if it is an event and takes its usage, if any; whether it is
    /// the usage chunk.
    fn read(&mut self, line: &[u8]) -> bool {
        let Some(data) = line.strip_prefix(DATA) else {
            return false;
        };
        let data = data.trim_ascii();
        if data == b"[DONE]" {
            self.done = self.ends_at_done;
            return false;
        }
        let usage_chunk = has_usage_object(data) && self.parse(data);
        if !usage_chunk {
            self.events += 1;
        }
        usage_chunk
    }

    /// Takes the usage of an event that has a usage object; whether it is the usage chunk.
    fn parse(&mut self, data: &[u8]) -> bool {
        let Ok(event) = serde_json::from_slice::<Event>(data) else {
            return false;
        };
        for usage in event.usages() {
            self.merge(usage.tokens());
        }
        event.is_usage_chunk()
    }

    /// Reads the tail of a line that ran past [`LINE_CAP`]: never the usage chunk, but an event
    /// when it is a `data:` line, maybe with its usage near its end.
    fn read_tail(&mut self, data: bool, tail: &[u8]) {
        self.removed = false;
        if data {
            self.events += 1;
            self.merge(usage_near_end(tail));
        }
    }

    fn merge(&mut self, usage: Option<TokenUsage>) {
        let Some(usage) = usage else { return };
        let merged = self.usage.get_or_insert_default();
        merged.prompt = merged.prompt.max(usage.prompt);
        merged.completion = merged.completion.max(usage.completion);
        merged.cached = merged.cached.max(usage.cached);
        merged.cached_known |= usage.cached_known;
    }
}

/// What of one chunk goes to the client: a run of it, returned as a slice of the chunk while the
/// kept bytes are contiguous; copied only when they are not (held bytes go first, or a removed
/// line lies between two kept ones).
#[derive(Default)]
struct Kept {
    joined: Option<BytesMut>,
    run: Range<usize>,
}

impl Kept {
    /// Starts with bytes held back from earlier chunks (before anything of this chunk is kept).
    fn start_with(&mut self, held: &[u8]) {
        debug_assert!(self.joined.is_none() && self.run.is_empty());
        if !held.is_empty() {
            self.joined = Some(BytesMut::from(held));
        }
    }

    /// Keeps `chunk[range]`, after everything kept so far.
    fn keep(&mut self, chunk: &[u8], range: Range<usize>) {
        if self.run.is_empty() {
            self.run = range;
            return;
        }
        if self.run.end != range.start {
            self.joined
                .get_or_insert_with(|| BytesMut::with_capacity(chunk.len()))
                .extend_from_slice(&chunk[self.run.clone()]);
            self.run.start = range.start;
        }
        self.run.end = range.end;
    }

    fn into_bytes(self, chunk: Bytes) -> Bytes {
        match self.joined {
            None if self.run == (0..chunk.len()) => chunk,
            None => chunk.slice(self.run),
            Some(mut joined) => {
                joined.extend_from_slice(&chunk[self.run]);
                joined.freeze()
            }
        }
    }
}

/// Appends `part` to `tail`, keeping only the last [`TAIL`] bytes.
fn slide(tail: &mut BytesMut, part: &[u8]) {
    let part = &part[part.len().saturating_sub(TAIL)..];
    tail.advance((tail.len() + part.len()).saturating_sub(TAIL));
    tail.extend_from_slice(part);
}

/// Whether an event has a `"usage"` key whose value is an object: the only events worth parsing,
/// as most carry no usage and OpenAI's carry `"usage":null`. A `"usage"` followed by a colon is
/// always a key: inside a JSON string its quotes would be escaped.
fn has_usage_object(data: &[u8]) -> bool {
    USAGE_KEY
        .find_iter(data)
        .any(|at| object_at(data, at).is_some())
}

/// Where the value of the `"usage"` key found at `at` starts, when it is an object.
fn object_at(bytes: &[u8], at: usize) -> Option<usize> {
    let value = bytes[at + KEY.len()..]
        .trim_ascii_start()
        .strip_prefix(b":")?
        .trim_ascii_start();
    value.starts_with(b"{").then(|| bytes.len() - value.len())
}

/// The usage of a whole (non-streamed) JSON answer of any API: chat, completions, embeddings,
/// responses, messages.
pub fn usage_of_body(body: &[u8]) -> Option<TokenUsage> {
    usage_near_end(body)
}

/// The usage object nearest the end of `bytes`, where every API puts it: found from the end (an
/// answer can be megabytes) and parsed on its own. The last few `"usage"` keys are tried, in case
/// the last is not the answer's own (another object's key of that name).
fn usage_near_end(bytes: &[u8]) -> Option<TokenUsage> {
    memmem::rfind_iter(bytes, KEY)
        .take(TRIES)
        .filter_map(|at| object_at(bytes, at))
        .find_map(|start| {
            serde_json::Deserializer::from_slice(&bytes[start..])
                .into_iter::<RawUsage>()
                .next()?
                .ok()?
                .tokens()
        })
}

/// A usage estimated when the backend reported none: the prompt at about [`BYTES_PER_TOKEN`]
/// bytes per token, the completion as the caller counted it (one token per streamed event, see
/// [`UsageScan::events`]).
pub fn estimate(prompt_bytes: usize, completion: u64) -> TokenUsage {
    TokenUsage {
        prompt: prompt_bytes.div_ceil(BYTES_PER_TOKEN) as u64,
        completion,
        cached: 0,
        estimated: true,
        cached_known: false,
    }
}

/// The parts of a streamed event that may carry usage: a chat or completions chunk and
/// Anthropic's `message_delta` at the top level, the Responses API's `response.completed` in
/// `response`, Anthropic's `message_start` in `message`.
#[derive(Deserialize)]
struct Event {
    /// A chunk's choices; `Vec<IgnoredAny>` counts them without allocating.
    choices: Option<Vec<IgnoredAny>>,
    usage: Option<RawUsage>,
    response: Option<Holder>,
    message: Option<Holder>,
}

#[derive(Deserialize)]
struct Holder {
    usage: Option<RawUsage>,
}

impl Event {
    fn usages(&self) -> impl Iterator<Item = &RawUsage> {
        let nested = [&self.response, &self.message]
            .into_iter()
            .flatten()
            .filter_map(|holder| holder.usage.as_ref());
        self.usage.iter().chain(nested)
    }

    /// The chunk `stream_options.include_usage` adds: empty choices and a usage object. Azure's
    /// first chunk (`prompt_filter_results`) also has empty choices, but no usage.
    fn is_usage_chunk(&self) -> bool {
        self.choices.as_ref().is_some_and(Vec::is_empty) && self.usage.is_some()
    }
}

/// A usage object as any of the APIs spells it; other fields are ignored.
#[derive(Deserialize)]
struct RawUsage {
    prompt_tokens: Option<u64>,
    input_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    output_tokens: Option<u64>,
    prompt_tokens_details: Option<Details>,
    input_tokens_details: Option<Details>,
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Details {
    cached_tokens: Option<u64>,
}

impl RawUsage {
    /// Its counts; `None` when it has neither prompt nor completion tokens (an object of another
    /// kind that happens to be called `usage`).
    fn tokens(&self) -> Option<TokenUsage> {
        // Anthropic's `input_tokens` leaves out the prompt tokens read from or written to its
        // cache (reported apart, and only by Anthropic); every other API counts them all.
        let anthropic_prompt = self.input_tokens.map(|input| {
            input
                .saturating_add(self.cache_read_input_tokens.unwrap_or(0))
                .saturating_add(self.cache_creation_input_tokens.unwrap_or(0))
        });
        let prompt = self.prompt_tokens.or(anthropic_prompt);
        let completion = self.completion_tokens.or(self.output_tokens);
        if prompt.is_none() && completion.is_none() {
            return None;
        }
        let cached = [&self.prompt_tokens_details, &self.input_tokens_details]
            .into_iter()
            .flatten()
            .find_map(|details| details.cached_tokens)
            .or(self.cache_read_input_tokens);
        let count = |n: Option<u64>| n.unwrap_or(0).min(MAX_REPORTED_TOKENS);
        Some(TokenUsage {
            prompt: count(prompt),
            completion: count(completion),
            cached: count(cached),
            cached_known: cached.is_some(),
            estimated: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(json: &str) -> String {
        format!("data: {json}\n\n")
    }

    fn chat_chunk(delta: &str, finish: &str) -> String {
        event(&format!(
            r#"{{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{finish}}}]}}"#
        ))
    }

    const USAGE_CHUNK: &str = r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":9,"total_tokens":12,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":4}}}"#;

    const VLLM_USAGE: TokenUsage = TokenUsage {
        prompt: 9,
        completion: 3,
        cached: 4,
        estimated: false,
        cached_known: true,
    };

    /// A vLLM chat stream with `include_usage`, and the same stream without it. One delta says
    /// `"usage": {` in its text.
    fn vllm_stream() -> (String, String) {
        let body = [
            chat_chunk(r#"{"role":"assistant","content":""}"#, "null"),
            chat_chunk(r#"{"content":"Hello"}"#, "null"),
            chat_chunk(
                r#"{"content":" the \"usage\": {\"prompt_tokens\": 1} field"}"#,
                "null",
            ),
            chat_chunk(r#"{"content":"!"}"#, r#""stop""#),
        ]
        .concat();
        let done = "data: [DONE]\n\n";
        (
            format!("{body}{}{done}", event(USAGE_CHUNK)),
            format!("{body}{done}"),
        )
    }

    /// Feeds the chunks through a scan; what the client got, and the scan.
    fn run<'a>(strip: bool, chunks: impl IntoIterator<Item = &'a [u8]>) -> (Vec<u8>, UsageScan) {
        let mut scan = UsageScan::new(strip, true);
        let mut out = Vec::new();
        for chunk in chunks {
            out.extend_from_slice(&scan.pass(Bytes::copy_from_slice(chunk)));
        }
        if let Some(rest) = scan.finish() {
            out.extend_from_slice(&rest);
        }
        (out, scan)
    }

    fn crlf(stream: &str) -> String {
        stream.replace('\n', "\r\n")
    }

    /// Every split in two chunks, and one byte at a time, give the client `expected`.
    fn assert_every_split(strip: bool, stream: &str, expected: &str, usage: Option<TokenUsage>) {
        let bytes = stream.as_bytes();
        for at in 0..=bytes.len() {
            let (out, scan) = run(strip, [&bytes[..at], &bytes[at..]]);
            assert_eq!(String::from_utf8(out).unwrap(), expected, "split at {at}");
            assert_eq!(scan.usage(), usage, "split at {at}");
        }
        let (out, scan) = run(strip, bytes.chunks(1));
        assert_eq!(String::from_utf8(out).unwrap(), expected);
        assert_eq!(scan.usage(), usage);
    }

    #[test]
    fn strip_removes_the_usage_event_at_every_split() {
        let (stream, without) = vllm_stream();
        assert_every_split(true, &stream, &without, Some(VLLM_USAGE));
        let (_, scan) = run(true, [stream.as_bytes()]);
        assert_eq!(scan.events(), 4);
    }

    #[test]
    fn strip_handles_crlf_line_ends_and_spaced_json() {
        let (stream, without) = vllm_stream();
        let spaced =
            USAGE_CHUNK.replace(r#""choices":[],"usage":{"#, r#""choices": [], "usage" : {"#);
        let stream = crlf(&stream.replace(USAGE_CHUNK, &spaced));
        assert!(stream.contains(r#""usage" : {"prompt_tokens""#));
        assert_every_split(true, &stream, &crlf(&without), Some(VLLM_USAGE));
    }

    #[test]
    fn whole_events_pass_uncopied_and_the_usage_event_yields_nothing() {
        let (stream, _) = vllm_stream();
        let mut scan = UsageScan::new(true, true);
        for raw in stream.split_inclusive("\n\n") {
            let chunk = Bytes::copy_from_slice(raw.as_bytes());
            let out = scan.pass(chunk.clone());
            if raw.contains(r#""choices":[]"#) {
                assert!(out.is_empty());
            } else {
                assert_eq!(out.as_ptr(), chunk.as_ptr());
                assert_eq!(out.len(), chunk.len());
            }
        }
        assert_eq!(scan.finish(), None);
        assert_eq!(scan.usage(), Some(VLLM_USAGE));
    }

    #[test]
    fn usage_chunk_and_done_in_one_chunk_keep_done_as_a_slice() {
        let done = "data: [DONE]\n\n";
        let chunk = Bytes::from(format!("{}{done}", event(USAGE_CHUNK)));
        let mut scan = UsageScan::new(true, true);
        let out = scan.pass(chunk.clone());
        assert_eq!(&out[..], done.as_bytes());
        assert_eq!(out.as_ptr(), chunk[chunk.len() - done.len()..].as_ptr());
        assert_eq!(scan.usage(), Some(VLLM_USAGE));
        assert_eq!(scan.events(), 0);
    }

    #[test]
    fn nothing_after_done_passes_at_every_split() {
        let (stream, without) = vllm_stream();
        let after = format!(
            "{}: keep-alive\n\n",
            event(r#"{"choices":[{"delta":{"content":"x"}}]}"#)
        );
        for strip in [false, true] {
            let expected = if strip { &without } else { &stream };
            assert_every_split(
                strip,
                &format!("{stream}{after}"),
                expected,
                Some(VLLM_USAGE),
            );
            assert_every_split(
                strip,
                &crlf(&format!("{stream}{after}")),
                &crlf(expected),
                Some(VLLM_USAGE),
            );
        }
        let (_, scan) = run(false, [format!("{stream}{after}").as_bytes()]);
        assert!(scan.done());
        assert_eq!(scan.events(), 4, "the event after [DONE] is not counted");
        // A stream that does not end at `[DONE]` (not OpenAI's) passes whole.
        let mut scan = UsageScan::new(false, false);
        let whole = format!("{stream}{after}");
        let out = scan.pass(Bytes::from(whole.clone()));
        assert_eq!(&out[..], whole.as_bytes());
        assert!(!scan.done());
    }

    #[test]
    fn without_strip_every_chunk_passes_unchanged() {
        let (stream, _) = vllm_stream();
        let bytes = stream.as_bytes();
        for at in 0..=bytes.len() {
            let mut scan = UsageScan::new(false, true);
            for part in [&bytes[..at], &bytes[at..]] {
                let chunk = Bytes::copy_from_slice(part);
                let out = scan.pass(chunk.clone());
                assert_eq!(out.as_ptr(), chunk.as_ptr(), "split at {at}");
                assert_eq!(out.len(), chunk.len(), "split at {at}");
            }
            assert_eq!(scan.finish(), None);
            assert_eq!(scan.usage(), Some(VLLM_USAGE), "split at {at}");
            assert_eq!(scan.events(), 4);
        }
        assert_every_split(false, &stream, &stream, Some(VLLM_USAGE));
    }

    #[test]
    fn null_usage_is_not_usage_and_goes_where_the_gateway_asked_for_it() {
        let chunk = |delta: &str, finish: &str| {
            event(&format!(
                r#"{{"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[{{"index":0,"delta":{delta},"finish_reason":{finish}}}],"usage":null}}"#
            ))
        };
        let body = [
            chunk(r#"{"role":"assistant","content":""}"#, "null"),
            chunk(r#"{"content":"Hi"}"#, "null"),
            chunk("{}", r#""stop""#),
        ]
        .concat();
        let stream = format!("{body}data: [DONE]\n\n");
        // What OpenAI sends without `include_usage`: no `usage` member at all.
        let without = stream.replace(r#","usage":null}"#, "}");
        assert_every_split(false, &stream, &stream, None);
        assert_every_split(true, &stream, &without, None);
        assert_every_split(true, &crlf(&stream), &crlf(&without), None);
        let (_, scan) = run(true, [stream.as_bytes()]);
        assert_eq!(scan.events(), 3);

        let usage = r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":2,"total_tokens":13,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}}}"#;
        let with_usage = format!("{body}{}data: [DONE]\n\n", event(usage));
        let expected = TokenUsage {
            prompt: 11,
            completion: 2,
            cached: 0,
            estimated: false,
            cached_known: true,
        };
        assert_every_split(true, &with_usage, &without, Some(expected));
        assert_every_split(false, &with_usage, &with_usage, Some(expected));
    }

    #[test]
    fn continuous_usage_stats_are_read_but_not_stripped() {
        let chunk = |content: &str, completion: u64| {
            event(&format!(
                r#"{{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{{"index":0,"delta":{{"content":"{content}"}},"finish_reason":null}}],"usage":{{"prompt_tokens":7,"total_tokens":{},"completion_tokens":{completion}}}}}"#,
                7 + completion
            ))
        };
        let stream = [
            chunk("a", 1),
            chunk("b", 2),
            chunk("c", 3),
            "data: [DONE]\n\n".into(),
        ]
        .concat();
        let expected = TokenUsage {
            prompt: 7,
            completion: 3,
            cached: 0,
            estimated: false,
            cached_known: false,
        };
        assert_every_split(true, &stream, &stream, Some(expected));
        let (_, scan) = run(true, [stream.as_bytes()]);
        assert_eq!(scan.events(), 3);
    }

    #[test]
    fn azure_prompt_filter_chunk_passes() {
        let (stream, without) = vllm_stream();
        let filter = event(
            r#"{"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"}}}]}"#,
        );
        assert_every_split(
            true,
            &format!("{filter}{stream}"),
            &format!("{filter}{without}"),
            Some(VLLM_USAGE),
        );
    }

    #[test]
    fn responses_stream_usage_is_read_and_kept() {
        let stream = concat!(
            "event: response.created\n",
            r#"data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_1","object":"response","status":"in_progress","output":[],"usage":null}}"#,
            "\n\n",
            "event: response.output_text.delta\n",
            r#"data: {"type":"response.output_text.delta","sequence_number":1,"item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hi"}"#,
            "\n\n",
            "event: response.completed\n",
            r#"data: {"type":"response.completed","sequence_number":2,"response":{"id":"resp_1","object":"response","status":"completed","output":[{"type":"message","content":[{"type":"output_text","text":"Hi"}]}],"usage":{"input_tokens":20,"input_tokens_details":{"cached_tokens":16},"output_tokens":5,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":25},"user":null,"metadata":{}}}"#,
            "\n\n",
        );
        let expected = TokenUsage {
            prompt: 20,
            completion: 5,
            cached: 16,
            estimated: false,
            cached_known: true,
        };
        assert_every_split(true, stream, stream, Some(expected));
        let (_, scan) = run(true, [stream.as_bytes()]);
        assert_eq!(scan.events(), 3);
    }

    #[test]
    fn messages_stream_usages_are_merged() {
        let stream = concat!(
            "event: message_start\n",
            r#"data: {"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"m","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,"output_tokens":1}}}"#,
            "\n\n",
            "event: content_block_start\n",
            r#"data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
            "\n\n",
            "event: content_block_delta\n",
            r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}"#,
            "\n\n",
            "event: content_block_stop\n",
            r#"data: {"type":"content_block_stop","index":0}"#,
            "\n\n",
            "event: message_delta\n",
            r#"data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}"#,
            "\n\n",
            "event: message_stop\n",
            r#"data: {"type":"message_stop"}"#,
            "\n\n",
        );
        let expected = TokenUsage {
            prompt: 25,
            completion: 15,
            cached: 0,
            estimated: false,
            cached_known: false,
        };
        assert_every_split(true, stream, stream, Some(expected));
        let (_, scan) = run(true, [stream.as_bytes()]);
        assert_eq!(scan.events(), 6);
    }

    #[test]
    fn a_line_longer_than_the_cap_passes_and_is_not_held() {
        let (stream, without) = vllm_stream();
        let long = chat_chunk(
            &format!(r#"{{"content":"{}"}}"#, "x".repeat(100_000)),
            "null",
        );
        let stream = format!("{long}{stream}");
        let without = format!("{long}{without}");
        let mut scan = UsageScan::new(true, true);
        let mut out = Vec::new();
        let (mut fed, mut most_held) = (0, 0);
        for chunk in stream.as_bytes().chunks(1000) {
            fed += chunk.len();
            out.extend_from_slice(&scan.pass(Bytes::copy_from_slice(chunk)));
            most_held = most_held.max(fed - out.len());
        }
        assert_eq!(scan.finish(), None);
        assert!(most_held <= LINE_CAP + 1000, "held {most_held} bytes");
        assert_eq!(String::from_utf8(out).unwrap(), without);
        assert_eq!(scan.usage(), Some(VLLM_USAGE));
        assert_eq!(scan.events(), 5);
    }

    #[test]
    fn a_line_that_runs_past_the_cap_after_whole_lines_of_its_chunk_passes() {
        let (stream, without) = vllm_stream();
        let long = chat_chunk(
            &format!(r#"{{"content":"{}"}}"#, "x".repeat(100_000)),
            "null",
        );
        let first = chat_chunk(r#"{"content":"a"}"#, "null");
        let (out, scan) = run(
            true,
            format!("{first}{long}{stream}").as_bytes().chunks(70_000),
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("{first}{long}{without}")
        );
        assert_eq!(scan.usage(), Some(VLLM_USAGE));
    }

    #[test]
    fn usage_at_the_end_of_an_overlong_event_is_read() {
        let completed = format!(
            r#"data: {{"type":"response.completed","response":{{"instructions":"{}","output":[],"usage":{{"input_tokens":30000,"input_tokens_details":{{"cached_tokens":29000}},"output_tokens":12,"total_tokens":30012}},"metadata":{{}}}}}}"#,
            "y".repeat(120_000)
        );
        let stream = format!("event: response.completed\n{completed}\n\n");
        let (out, scan) = run(true, stream.as_bytes().chunks(4096));
        assert_eq!(out, stream.as_bytes());
        let expected = TokenUsage {
            prompt: 30000,
            completion: 12,
            cached: 29000,
            estimated: false,
            cached_known: true,
        };
        assert_eq!(scan.usage(), Some(expected));
        assert_eq!(scan.events(), 1);
    }

    #[test]
    fn an_unfinished_last_line_is_delivered_by_finish() {
        let mut scan = UsageScan::new(true, true);
        assert_eq!(
            &scan.pass(Bytes::from_static(b"data: {}\n\ndata: [DO"))[..],
            b"data: {}\n\n"
        );
        assert!(scan.pass(Bytes::from_static(b"NE]")).is_empty());
        assert_eq!(scan.finish().as_deref(), Some(&b"data: [DONE]"[..]));
        assert_eq!(scan.finish(), None);
        assert_eq!(scan.events(), 1);
    }

    #[test]
    fn usage_of_chat_body() {
        let body = br#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Read the \"usage\": {\"prompt_tokens\": 1000} field, and \"usage\":{}"},"finish_reason":"stop"}],"usage":{"prompt_tokens":31,"total_tokens":45,"completion_tokens":14,"prompt_tokens_details":{"cached_tokens":16}},"prompt_logprobs":null,"kv_transfer_params":null}"#;
        let expected = TokenUsage {
            prompt: 31,
            completion: 14,
            cached: 16,
            estimated: false,
            cached_known: true,
        };
        assert_eq!(usage_of_body(body), Some(expected));
    }

    #[test]
    fn absurd_counts_are_capped() {
        let body = br#"{"choices":[],"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":9223372036854775807}}}"#;
        let expected = TokenUsage {
            prompt: MAX_REPORTED_TOKENS,
            completion: 3,
            cached: MAX_REPORTED_TOKENS,
            estimated: false,
            cached_known: true,
        };
        assert_eq!(usage_of_body(body), Some(expected));
    }

    #[test]
    fn usage_of_body_with_usage_text_after_the_usage() {
        let body = br#"{"choices":[{"text":"ok"}],"usage" : { "prompt_tokens" : 5, "completion_tokens" : 2 },"note":"the \"usage\": {\"prompt_tokens\": 99} text","tag":"usage","metadata":{"usage":{"tier":"free"}}}"#;
        let expected = TokenUsage {
            prompt: 5,
            completion: 2,
            cached: 0,
            estimated: false,
            cached_known: false,
        };
        assert_eq!(usage_of_body(body), Some(expected));
    }

    #[test]
    fn usage_of_embeddings_responses_and_messages_bodies() {
        let embeddings = br#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,-0.2]}],"model":"e","usage":{"prompt_tokens":8,"total_tokens":8}}"#;
        assert_eq!(
            usage_of_body(embeddings),
            Some(TokenUsage {
                prompt: 8,
                completion: 0,
                cached: 0,
                estimated: false,
                cached_known: false,
            })
        );
        let responses = br#"{"id":"resp_1","object":"response","status":"completed","output":[],"tools":[{"type":"function","name":"f","parameters":{"type":"object","properties":{"usage":{"type":"string"}}}}],"usage":{"input_tokens":40,"input_tokens_details":{"cached_tokens":32},"output_tokens":6,"output_tokens_details":{"reasoning_tokens":2},"total_tokens":46},"user":null,"metadata":{}}"#;
        assert_eq!(
            usage_of_body(responses),
            Some(TokenUsage {
                prompt: 40,
                completion: 6,
                cached: 32,
                estimated: false,
                cached_known: true,
            })
        );
        let messages = br#"{"id":"msg_1","type":"message","role":"assistant","content":[{"type":"text","text":"Hi"}],"model":"m","stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":5,"cache_creation_input_tokens":10,"cache_read_input_tokens":100,"output_tokens":7}}"#;
        assert_eq!(
            usage_of_body(messages),
            Some(TokenUsage {
                prompt: 115,
                completion: 7,
                cached: 100,
                estimated: false,
                cached_known: true,
            })
        );
    }

    #[test]
    fn usage_of_body_without_usage() {
        assert_eq!(usage_of_body(b""), None);
        assert_eq!(usage_of_body(br#"{"choices":[],"usage":null}"#), None);
        assert_eq!(usage_of_body(br#"{"usage":{"prompt_tokens":3,"#), None);
        assert_eq!(usage_of_body(br#"{"usage":{"tier":"free"}}"#), None);
    }

    #[test]
    fn estimate_rounds_prompt_bytes_up_to_tokens() {
        assert_eq!(
            estimate(10, 3),
            TokenUsage {
                prompt: 3,
                completion: 3,
                cached: 0,
                estimated: true,
                cached_known: false,
            }
        );
        assert_eq!(estimate(0, 0).total(), 0);
        assert_eq!(estimate(8, 1).prompt, 2);
    }
}
