//! The OpenAI streaming wire format (`data: {chunk}\n\n` ... `data: [DONE]\n\n`) and the body
//! stream that drives a [`Sequence`] token by token.
//!
//! The stream *is* the sequence: it advances only when actix polls the body, and dropping the
//! body (client gone, connection closed) drops the sequence, which frees its batch slot and
//! counts the request as cancelled. Each event is its own body chunk so it leaves the socket as
//! soon as it is produced, and the only per-token allocation is that chunk's bytes.

use bytes::Bytes;
use futures_util::Stream;
use serde::{Serialize, Serializer};
use thiserror::Error;

use super::{
    engine::{Cut, Sequence, Step},
    wire::{Kind, Meta, Usage, Word},
};

/// Why a stream ends early. Either way actix drops the connection without the final chunk
/// terminator, which is exactly what a client of a crashed GPU server sees.
#[derive(Debug, Error)]
pub enum StreamError {
    #[error(transparent)]
    Cut(#[from] Cut),
    #[error("encoding a stream chunk: {0}")]
    Encode(#[from] serde_json::Error),
}

const DONE: &[u8] = b"data: [DONE]\n\n";

/// A body stream of OpenAI chunks for `seq`, named and accounted by `meta`.
pub fn token_stream(seq: Sequence, meta: Meta) -> impl Stream<Item = Result<Bytes, StreamError>> {
    let state = StreamState {
        seq,
        meta,
        phase: Phase::Generate,
    };
    futures_util::stream::unfold(state, |mut state| async move {
        let item = state.step().await?;
        Some((item, state))
    })
}

/// Where a stream is between body chunks.
enum Phase {
    /// Waiting on the sequence for the next token.
    Generate,
    /// The role chunk went out; token `n` (the first) is ready and goes next.
    Ready(u32),
    Usage,
    Done,
    End,
}

/// One SSE event of the OpenAI stream.
#[derive(Clone, Copy)]
enum Event {
    /// The chat stream's opening `{"role":"assistant","content":""}` delta.
    Role,
    Token(u32),
    /// Empty delta carrying the finish reason.
    Finish,
    /// `"choices":[]` plus usage, only with `stream_options.include_usage`.
    Usage,
}

struct StreamState {
    seq: Sequence,
    meta: Meta,
    phase: Phase,
}

impl StreamState {
    async fn step(&mut self) -> Option<Result<Bytes, StreamError>> {
        let event = match self.phase {
            Phase::Generate => match self.seq.next().await {
                // vLLM opens a chat stream with the role once the first token exists.
                Ok(Step::Token(0)) if self.meta.kind == Kind::Chat => {
                    self.phase = Phase::Ready(0);
                    Event::Role
                }
                Ok(Step::Token(n)) => Event::Token(n),
                Ok(Step::Done) => {
                    self.phase = if self.meta.include_usage {
                        Phase::Usage
                    } else {
                        Phase::Done
                    };
                    Event::Finish
                }
                Err(cut) => {
                    self.phase = Phase::End;
                    return Some(Err(cut.into()));
                }
            },
            Phase::Ready(n) => {
                self.phase = Phase::Generate;
                Event::Token(n)
            }
            Phase::Usage => {
                self.phase = Phase::Done;
                self.meta.cached_tokens = self.seq.cached_tokens();
                Event::Usage
            }
            Phase::Done => {
                self.phase = Phase::End;
                return Some(Ok(Bytes::from_static(DONE)));
            }
            Phase::End => return None,
        };
        Some(encode(&self.meta, event).map_err(StreamError::from))
    }
}

/// Renders one event as complete `data: ...\n\n` SSE frames: one per choice (vLLM streams every
/// choice of a request with its own `index`), and the usage frame once.
fn encode(meta: &Meta, event: Event) -> serde_json::Result<Bytes> {
    let mut buf = Vec::with_capacity(256);
    let usage = matches!(event, Event::Usage).then(|| meta.usage());
    let finish_reason = matches!(event, Event::Finish).then_some(meta.finish_reason);
    let piece = match event {
        Event::Token(n) => Piece::Word(Word(n)),
        _ => Piece::Empty,
    };
    let frames = if usage.is_some() { 1 } else { meta.choices };
    for index in 0..frames {
        buf.extend_from_slice(b"data: ");
        match meta.kind {
            Kind::Chat => {
                let choice = ChatChoice {
                    index,
                    delta: Delta {
                        role: matches!(event, Event::Role).then_some("assistant"),
                        content: (!matches!(event, Event::Finish)).then_some(piece),
                    },
                    logprobs: None,
                    finish_reason,
                };
                let choices: &[ChatChoice] = if usage.is_some() { &[] } else { &[choice] };
                serde_json::to_writer(
                    &mut buf,
                    &chunk(meta, "chat.completion.chunk", choices, usage),
                )?;
            }
            Kind::Completion => {
                let choice = TextChoice {
                    index,
                    text: piece,
                    logprobs: None,
                    finish_reason,
                };
                let choices: &[TextChoice] = if usage.is_some() { &[] } else { &[choice] };
                serde_json::to_writer(&mut buf, &chunk(meta, "text_completion", choices, usage))?;
            }
        }
        buf.extend_from_slice(b"\n\n");
    }
    Ok(Bytes::from(buf))
}

fn chunk<'a, C>(
    meta: &'a Meta,
    object: &'static str,
    choices: &'a [C],
    usage: Option<Usage>,
) -> Chunk<'a, C> {
    Chunk {
        id: &meta.id,
        object,
        created: meta.created,
        model: &meta.model,
        choices,
        usage,
    }
}

#[derive(Serialize)]
struct Chunk<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [C],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(Serialize)]
struct ChatChoice {
    index: u32,
    delta: Delta,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

/// `{}` on the finish chunk, role and/or content otherwise.
#[derive(Serialize)]
struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<Piece>,
}

#[derive(Serialize)]
struct TextChoice {
    index: u32,
    text: Piece,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

/// Text of one chunk, written straight into the chunk buffer.
#[derive(Clone, Copy)]
enum Piece {
    Empty,
    Word(Word),
}

impl Serialize for Piece {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Piece::Empty => s.serialize_str(""),
            Piece::Word(word) => word.serialize(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(kind: Kind) -> Meta {
        Meta {
            kind,
            id: "chatcmpl-x".to_owned(),
            created: 7,
            model: "sim".to_owned(),
            prompt_tokens: 2,
            completion_tokens: 1,
            finish_reason: "length",
            include_usage: true,
            choices: 1,
            cached_tokens: 0,
        }
    }

    fn frame(kind: Kind, event: Event) -> String {
        let bytes = encode(&meta(kind), event).expect("encodable");
        String::from_utf8(bytes.to_vec()).expect("utf-8")
    }

    #[test]
    fn chat_chunks_match_openai_bytes() {
        let head = r#"data: {"id":"chatcmpl-x","object":"chat.completion.chunk","created":7,"model":"sim","choices":"#;
        assert_eq!(
            frame(Kind::Chat, Event::Role),
            format!("{head}[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n")
        );
        assert_eq!(
            frame(Kind::Chat, Event::Token(3)),
            format!("{head}[{{\"index\":0,\"delta\":{{\"content\":\"tok3 \"}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n")
        );
        assert_eq!(
            frame(Kind::Chat, Event::Finish),
            format!("{head}[{{\"index\":0,\"delta\":{{}},\"logprobs\":null,\"finish_reason\":\"length\"}}]}}\n\n")
        );
        assert_eq!(
            frame(Kind::Chat, Event::Usage),
            format!("{head}[],\"usage\":{{\"prompt_tokens\":2,\"completion_tokens\":1,\"total_tokens\":3}}}}\n\n")
        );
    }

    #[test]
    fn each_choice_streams_with_its_index_and_usage_counts_them_all() {
        let mut two = meta(Kind::Completion);
        two.choices = 2;
        let frames = String::from_utf8(encode(&two, Event::Token(1)).unwrap().to_vec()).unwrap();
        assert_eq!(frames.matches("data: ").count(), 2);
        assert!(frames.contains(r#""index":0,"text":"tok1 ""#));
        assert!(frames.contains(r#""index":1,"text":"tok1 ""#));
        let usage = String::from_utf8(encode(&two, Event::Usage).unwrap().to_vec()).unwrap();
        assert_eq!(usage.matches("data: ").count(), 1);
        assert!(usage.contains(r#""completion_tokens":2"#));
    }

    #[test]
    fn completion_chunks_carry_text() {
        let token = frame(Kind::Completion, Event::Token(0));
        assert!(token.contains(r#""object":"text_completion""#));
        assert!(token.contains(
            r#""choices":[{"index":0,"text":"tok0 ","logprobs":null,"finish_reason":null}]"#
        ));
    }
}
