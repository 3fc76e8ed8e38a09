//! OpenAI request parsing and the non-streaming response shapes, byte-compatible with what
//! vLLM answers, so the gateway is tested against the real wire format.
//!
//! Responses borrow their strings and render the generated text straight into the output
//! buffer, so an answer costs one allocation: its body.

use std::fmt;

use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

use super::prefix::BlockHasher;

/// Which OpenAI endpoint a generation request came in on; it decides the response shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

impl Kind {
    pub fn id_prefix(self) -> &'static str {
        match self {
            Kind::Chat => "chatcmpl-",
            Kind::Completion => "cmpl-",
        }
    }
}

/// The fields of a chat or text completion request that the simulator acts on; the rest
/// (temperature, tools, ...) are accepted and ignored, as a model would.
#[derive(Deserialize)]
struct RawGeneration {
    model: Option<String>,
    messages: Option<Vec<RawMessage>>,
    prompt: Option<Value>,
    stream: Option<bool>,
    stream_options: Option<RawStreamOptions>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    n: Option<u32>,
}

#[derive(Deserialize)]
struct RawMessage {
    content: Option<Value>,
}

#[derive(Deserialize)]
struct RawStreamOptions {
    include_usage: Option<bool>,
}

/// A validated generation request.
#[derive(Debug)]
pub struct Generation {
    pub model: String,
    pub prompt_tokens: u32,
    /// Prefix-cache keys of the prompt text's full blocks (none for a prompt of token ids).
    pub prefix_blocks: Vec<u64>,
    /// `None` when the request set no limit: the simulated model then stops on its own.
    pub max_tokens: Option<u32>,
    pub stream: bool,
    pub include_usage: bool,
    /// Choices to generate: `n` per prompt (a completion's `prompt` may be a list of prompts).
    pub choices: u32,
}

/// The most choices one request may ask for (vLLM has no hard limit; this keeps a hostile
/// request from building a huge answer).
pub const MAX_CHOICES: u32 = 128;

/// Parses a chat (`messages`) or text (`prompt`) completion body; the error is the message of
/// a 400 answer.
pub fn parse_generation(body: &[u8], kind: Kind) -> Result<Generation, String> {
    let raw: RawGeneration =
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
    let model = raw.model.ok_or("field `model` is required")?;
    let n = raw.n.unwrap_or(1);
    if n == 0 {
        return Err("n must be at least 1, got 0.".to_owned());
    }
    let mut prompts = 1;
    let (prompt_tokens, prefix_blocks) = match kind {
        Kind::Chat => {
            let mut text = PromptText::default();
            raw.messages
                .ok_or("field `messages` is required")?
                .iter()
                .filter_map(|m| m.content.as_ref())
                .for_each(|content| text.add(content));
            text.finish()
        }
        Kind::Completion => {
            let prompt = raw.prompt.ok_or("field `prompt` is required")?;
            prompts = prompt_count(&prompt);
            // A prompt given as token ids is already counted in tokens, and has no text to key
            // the prefix cache by.
            token_ids(&prompt).map_or_else(
                || {
                    let mut text = PromptText::default();
                    text.add(&prompt);
                    text.finish()
                },
                |tokens| (tokens, Vec::new()),
            )
        }
    };
    let choices = prompts.saturating_mul(n);
    if choices > MAX_CHOICES {
        return Err(format!(
            "{choices} choices requested (prompts x n); at most {MAX_CHOICES}"
        ));
    }
    let max_tokens = raw.max_completion_tokens.or(raw.max_tokens);
    if max_tokens == Some(0) {
        return Err("max_tokens must be at least 1, got 0.".to_owned());
    }
    Ok(Generation {
        model,
        prompt_tokens,
        prefix_blocks,
        max_tokens,
        stream: raw.stream.unwrap_or(false),
        include_usage: raw
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        choices,
    })
}

/// How many prompts a completion's `prompt` holds: a list of strings or of token-id lists is one
/// prompt each; a string or one token-id list is one.
fn prompt_count(prompt: &Value) -> u32 {
    match prompt.as_array() {
        Some(items) if items.iter().all(|i| i.is_string() || i.is_array()) && !items.is_empty() => {
            u32::try_from(items.len()).unwrap_or(u32::MAX)
        }
        _ => 1,
    }
}

/// The usual rule of thumb: about four characters per token, and never an empty prompt.
fn chars_to_tokens(chars: usize) -> u32 {
    u32::try_from(chars / 4).unwrap_or(u32::MAX).max(1)
}

/// A prompt's text as the model sees it for timing: its length, and its prefix-cache blocks over
/// all pieces in order (chat message contents are concatenated).
#[derive(Default)]
struct PromptText {
    chars: usize,
    blocks: BlockHasher,
}

impl PromptText {
    /// Adds a message content or prompt: a string, or an array of strings or of parts with a
    /// `text` field (images and other parts count as nothing).
    fn add(&mut self, value: &Value) {
        match value {
            Value::String(s) => self.add_str(s),
            Value::Array(items) => {
                for item in items {
                    match item {
                        Value::String(s) => self.add_str(s),
                        Value::Object(part) => {
                            if let Some(s) = part.get("text").and_then(Value::as_str) {
                                self.add_str(s);
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }

    fn add_str(&mut self, s: &str) {
        self.chars += s.chars().count();
        self.blocks.feed(s);
    }

    /// Prompt tokens and block keys.
    fn finish(self) -> (u32, Vec<u64>) {
        (chars_to_tokens(self.chars), self.blocks.finish())
    }
}

/// Token count of a prompt given as token ids (`[1, 2]` or `[[1, 2], [3]]`), if it is one.
fn token_ids(value: &Value) -> Option<u32> {
    let items = value.as_array()?;
    let count = if items.iter().all(Value::is_u64) {
        items.len()
    } else if items
        .iter()
        .all(|i| i.as_array().is_some_and(|a| a.iter().all(Value::is_u64)))
    {
        items.iter().filter_map(Value::as_array).map(Vec::len).sum()
    } else {
        return None;
    };
    Some(u32::try_from(count).unwrap_or(u32::MAX).max(1))
}

/// Everything a response (streaming or not) needs to name and account for one generation.
pub struct Meta {
    pub kind: Kind,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// "length" when the request's limit cut the text, "stop" when the model ended on its own.
    pub finish_reason: &'static str,
    pub include_usage: bool,
    /// Choices in the answer (`n` per prompt); each gets the same text.
    pub choices: u32,
    /// Prompt tokens the prefix cache served, known once the prefill ran.
    pub cached_tokens: u32,
}

impl Meta {
    pub fn usage(&self) -> Usage {
        let completion_tokens = self.completion_tokens.saturating_mul(self.choices);
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens,
            total_tokens: self.prompt_tokens.saturating_add(completion_tokens),
            prompt_tokens_details: (self.cached_tokens > 0).then_some(PromptTokensDetails {
                cached_tokens: self.cached_tokens,
            }),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    /// vLLM's (with `--enable-prompt-tokens-details`) and SGLang's: written only when the prefix
    /// cache served part of the prompt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: u32,
}

/// Generated token `n` as text: deterministic, one word per token, so clients can check that
/// nothing was lost or reordered.
#[derive(Clone, Copy)]
pub struct Word(pub u32);

impl fmt::Display for Word {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tok{} ", self.0)
    }
}

impl Serialize for Word {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The first `n` words: exactly the concatenation of a stream's deltas.
struct Words(u32);

impl fmt::Display for Words {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (0..self.0).try_for_each(|i| Word(i).fmt(f))
    }
}

impl Serialize for Words {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[derive(Serialize)]
struct Completion<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<C>,
    usage: Usage,
}

#[derive(Serialize)]
struct ChatChoice {
    index: u32,
    message: AssistantMessage,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct AssistantMessage {
    role: &'static str,
    content: Words,
}

#[derive(Serialize)]
struct TextChoice {
    index: u32,
    text: Words,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

/// The non-streaming `chat.completion` or `text_completion` body.
pub fn completion_body(meta: &Meta) -> serde_json::Result<Vec<u8>> {
    match meta.kind {
        Kind::Chat => serde_json::to_vec(&Completion {
            id: &meta.id,
            object: "chat.completion",
            created: meta.created,
            model: &meta.model,
            choices: (0..meta.choices)
                .map(|index| ChatChoice {
                    index,
                    message: AssistantMessage {
                        role: "assistant",
                        content: Words(meta.completion_tokens),
                    },
                    logprobs: None,
                    finish_reason: meta.finish_reason,
                })
                .collect(),
            usage: meta.usage(),
        }),
        Kind::Completion => serde_json::to_vec(&Completion {
            id: &meta.id,
            object: "text_completion",
            created: meta.created,
            model: &meta.model,
            choices: (0..meta.choices)
                .map(|index| TextChoice {
                    index,
                    text: Words(meta.completion_tokens),
                    logprobs: None,
                    finish_reason: meta.finish_reason,
                })
                .collect(),
            usage: meta.usage(),
        }),
    }
}

#[derive(Deserialize)]
struct RawEmbedding {
    model: Option<String>,
    input: Option<Value>,
}

/// A validated embeddings request: one entry per input, holding its text (or its token ids
/// rendered as text, which is just as deterministic) and its token count.
pub struct EmbeddingRequest {
    pub model: String,
    pub inputs: Vec<(String, u32)>,
}

pub fn parse_embedding(body: &[u8]) -> Result<EmbeddingRequest, String> {
    let raw: RawEmbedding =
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
    let model = raw.model.ok_or("field `model` is required")?;
    let input = raw.input.ok_or("field `input` is required")?;
    let inputs = match input {
        Value::String(s) => vec![text_input(s)],
        ref ids @ Value::Array(ref items) if items.iter().all(Value::is_u64) => {
            vec![(ids.to_string(), token_ids(ids).unwrap_or(1))]
        }
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::String(s) => Ok(text_input(s)),
                ids @ Value::Array(_) => token_ids(&ids)
                    .map(|n| (ids.to_string(), n))
                    .ok_or_else(|| "`input` arrays must hold token ids".to_owned()),
                _ => Err("`input` must be a string, an array of strings or token ids".to_owned()),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err("`input` must be a string, an array of strings or token ids".to_owned()),
    };
    if inputs.is_empty() {
        return Err("`input` must not be empty".to_owned());
    }
    Ok(EmbeddingRequest { model, inputs })
}

fn text_input(text: String) -> (String, u32) {
    let tokens = chars_to_tokens(text.chars().count());
    (text, tokens)
}

/// Eight unit-length floats derived from the text (FNV-1a seed, splitmix64 stream): equal
/// texts embed equally, different texts almost surely differently.
pub fn embed(text: &str) -> [f32; 8] {
    let mut state = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let mut vector = [0f32; 8];
    for v in &mut vector {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // Top 24 bits to a float in -1..1.
        *v = (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
    }
    let norm = vector.iter().map(|v| v * v).sum::<f32>().sqrt();
    if norm > 0.0 {
        vector.iter_mut().for_each(|v| *v /= norm);
    }
    vector
}

#[derive(Serialize)]
struct EmbeddingList<'a> {
    object: &'static str,
    data: Vec<EmbeddingItem>,
    model: &'a str,
    usage: EmbeddingUsage,
}

#[derive(Serialize)]
struct EmbeddingItem {
    object: &'static str,
    index: usize,
    embedding: [f32; 8],
}

#[derive(Serialize)]
struct EmbeddingUsage {
    prompt_tokens: u32,
    total_tokens: u32,
}

pub fn embedding_body(request: &EmbeddingRequest) -> serde_json::Result<Vec<u8>> {
    let tokens = request
        .inputs
        .iter()
        .fold(0u32, |sum, (_, n)| sum.saturating_add(*n));
    serde_json::to_vec(&EmbeddingList {
        object: "list",
        data: request
            .inputs
            .iter()
            .enumerate()
            .map(|(index, (text, _))| EmbeddingItem {
                object: "embedding",
                index,
                embedding: embed(text),
            })
            .collect(),
        model: &request.model,
        usage: EmbeddingUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    })
}

#[derive(Serialize)]
struct ModelList<'a> {
    object: &'static str,
    data: Vec<ModelCard<'a>>,
}

#[derive(Serialize)]
struct ModelCard<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

pub fn models_body(models: &[String], created: u64) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(&ModelList {
        object: "list",
        data: models
            .iter()
            .map(|id| ModelCard {
                id,
                object: "model",
                created,
                owned_by: "nanogate-simulator",
            })
            .collect(),
    })
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    code: Option<&'a str>,
}

/// The OpenAI error shape `{"error":{"message","type","code"}}`.
pub fn error_body(message: &str, kind: &str, code: Option<&str>) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(&ErrorBody {
        error: ErrorDetail {
            message,
            kind,
            code,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_prompt_tokens_count_all_message_text() {
        let body = br#"{"model":"sim","messages":[{"role":"user","content":"12345678"},
            {"role":"user","content":[{"type":"text","text":"abcd"}]}],"max_tokens":3}"#;
        let g = parse_generation(body, Kind::Chat).expect("valid request");
        assert_eq!(
            (g.prompt_tokens, g.max_tokens, g.stream),
            (3, Some(3), false)
        );
    }

    #[test]
    fn prompt_blocks_span_messages() {
        let half = "h".repeat(32);
        let body = serde_json::json!({"model": "sim", "messages": [
            {"role": "system", "content": half}, {"role": "user", "content": [{"type": "text", "text": half}]}]});
        let g = parse_generation(body.to_string().as_bytes(), Kind::Chat).expect("valid request");
        assert_eq!((g.prompt_tokens, g.prefix_blocks.len()), (16, 1));
        let ids = br#"{"model":"sim","prompt":[1,2,3]}"#;
        let g = parse_generation(ids, Kind::Completion).expect("valid request");
        assert!(g.prefix_blocks.is_empty());
    }

    #[test]
    fn completion_prompt_may_be_token_ids() {
        let body = br#"{"model":"sim","prompt":[1,2,3,4,5],"stream":true,
            "stream_options":{"include_usage":true}}"#;
        let g = parse_generation(body, Kind::Completion).expect("valid request");
        assert_eq!(
            (g.prompt_tokens, g.stream, g.include_usage),
            (5, true, true)
        );
    }

    #[test]
    fn bad_requests_are_rejected() {
        assert!(parse_generation(b"{", Kind::Chat).is_err());
        assert!(parse_generation(br#"{"messages":[]}"#, Kind::Chat).is_err());
        assert!(parse_generation(br#"{"model":"sim"}"#, Kind::Completion).is_err());
        let zero = br#"{"model":"sim","prompt":"x","max_tokens":0}"#;
        assert!(parse_generation(zero, Kind::Completion).is_err());
    }

    #[test]
    fn embeddings_are_deterministic_unit_vectors() {
        let a = embed("hello");
        assert_eq!(a, embed("hello"));
        assert_ne!(a, embed("world"));
        let norm: f32 = a.iter().map(|v| v * v).sum();
        assert!((norm - 1.0).abs() < 1e-5);
    }

    #[test]
    fn non_streaming_text_is_the_concatenated_words() {
        let meta = Meta {
            kind: Kind::Completion,
            id: "cmpl-1".to_owned(),
            created: 1,
            model: "sim".to_owned(),
            prompt_tokens: 2,
            completion_tokens: 3,
            finish_reason: "length",
            include_usage: false,
            choices: 1,
            cached_tokens: 0,
        };
        let body = completion_body(&meta).expect("serializable");
        let json: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(json["choices"][0]["text"], "tok0 tok1 tok2 ");
        assert_eq!(json["usage"]["total_tokens"], 5);
    }

    #[test]
    fn a_list_of_prompts_and_n_make_one_choice_each() {
        let body = br#"{"model":"sim","prompt":["a","b","c"],"n":2,"max_tokens":3}"#;
        let generation = parse_generation(body, Kind::Completion).unwrap();
        assert_eq!(generation.choices, 6);
        let ids = br#"{"model":"sim","prompt":[1,2,3],"n":2}"#;
        assert_eq!(parse_generation(ids, Kind::Completion).unwrap().choices, 2);
        let lists = br#"{"model":"sim","prompt":[[1,2],[3]]}"#;
        assert_eq!(
            parse_generation(lists, Kind::Completion).unwrap().choices,
            2
        );
        let chat = br#"{"model":"sim","messages":[],"n":3}"#;
        assert_eq!(parse_generation(chat, Kind::Chat).unwrap().choices, 3);
        assert!(parse_generation(br#"{"model":"sim","messages":[],"n":0}"#, Kind::Chat).is_err());
        let meta = Meta {
            kind: Kind::Chat,
            id: "chatcmpl-1".to_owned(),
            created: 1,
            model: "sim".to_owned(),
            prompt_tokens: 2,
            completion_tokens: 3,
            finish_reason: "length",
            include_usage: false,
            choices: 3,
            cached_tokens: 0,
        };
        let json: Value = serde_json::from_slice(&completion_body(&meta).unwrap()).unwrap();
        assert_eq!(json["choices"].as_array().unwrap().len(), 3);
        assert_eq!(json["choices"][2]["index"], 2);
        assert_eq!(json["usage"]["completion_tokens"], 9);
    }
}
