//! Reading and classifying an OpenAI request: the body within its size limit, the fields the
//! gateway routes on (model, cacheability, affinity), and the checks that answer 400/413 before
//! any backend is bothered. Only those fields are parsed; the rest of the body is passed on as
//! the exact bytes the client sent.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::header::{self, HeaderMap, HeaderName};
use actix_web::web;
use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, StreamExt};
use nanogate_actors::buffers::{ByteBudget, Reservation};
use nanogate_actors::exchange::StreamEnd;
use nanogate_actors::policy::affinity::stable_hash_seeded;
use nanogate_actors::prefix_index::{block_keys_of, BLOCK_BYTES};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::config::AffinitySettings;
use crate::error::GatewayError;

/// Which API operation a route is, and so which fields it requires and how its stream ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    ChatCompletions,
    Completions,
    Embeddings,
    /// OpenAI's Responses API.
    Responses,
    /// Anthropic's Messages API (vLLM, SGLang and llama.cpp serve it too).
    Messages,
}

impl Operation {
    pub const ALL: [Operation; 5] = [
        Self::ChatCompletions,
        Self::Completions,
        Self::Embeddings,
        Self::Responses,
        Self::Messages,
    ];

    pub fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
            Self::Embeddings => "/v1/embeddings",
            Self::Responses => "/v1/responses",
            Self::Messages => "/v1/messages",
        }
    }

    /// How a successful stream of this API ends.
    pub fn stream_end(self) -> StreamEnd {
        match self {
            Self::ChatCompletions | Self::Completions | Self::Embeddings => StreamEnd::Done,
            Self::Responses => StreamEnd::ResponseCompleted,
            Self::Messages => StreamEnd::MessageStop,
        }
    }

    /// The field that carries the prompt, and whether it is required.
    fn content_field(self) -> (&'static str, bool) {
        match self {
            Self::ChatCompletions | Self::Messages => ("messages", true),
            Self::Completions => ("prompt", true),
            Self::Embeddings => ("input", true),
            Self::Responses => ("input", false),
        }
    }
}

/// Request header that opts a request into the cache whatever its sampling settings.
pub const CACHE_OPT_IN: &str = "x-nanogate-cache";

/// Request header with a client's deadline for the whole request, in milliseconds.
pub const TIMEOUT_HEADER: &str = "x-request-timeout-ms";
/// The OpenAI Node SDK's timeout, in seconds: until the answer's head (see [`client_timeouts`]).
pub const SDK_TIMEOUT_HEADER: &str = "x-stainless-timeout";
/// The OpenAI Python SDK's read timeout, in seconds: the longest wait for any read of the answer
/// (its head, or each next chunk of a stream), not a limit on the whole request.
pub const SDK_READ_TIMEOUT_HEADER: &str = "x-stainless-read-timeout";

/// What the gateway adds to the OpenAI SDKs' timeouts. The SDK enforces its own timeout (and
/// closes the connection, which cancels the request upstream); the gateway's is the backstop for a
/// client that would wait anyway, a little later, so the client sees its own timeout error as it
/// would without a gateway rather than a 504 that races it.
pub const SDK_TIMEOUT_GRACE: Duration = Duration::from_millis(250);

/// How long the client is prepared to wait.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClientTimeouts {
    /// For the whole request: the gateway's limit, or less if the client asks.
    pub total: Duration,
    /// For each read: the answer's head, and each gap between chunks.
    pub read: Option<Duration>,
    /// For the answer's head only (the Node SDKs' timeout, which they clear once the head is in,
    /// so a stream may then run as long as it needs).
    pub head: Option<Duration>,
}

#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow)]
    model: Option<Text<'a>>,
    #[serde(borrow)]
    messages: Option<&'a RawValue>,
    #[serde(borrow)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow)]
    input: Option<&'a RawValue>,
    /// The system prompt of the Messages API, and the instructions of the Responses API: the
    /// start of the prompt, so the start of the affinity key.
    #[serde(borrow)]
    system: Option<&'a RawValue>,
    #[serde(borrow)]
    instructions: Option<&'a RawValue>,
    stream: Option<bool>,
    #[serde(borrow, default, deserialize_with = "present")]
    stream_options: Option<&'a RawValue>,
    temperature: Option<f64>,
    seed: Option<i64>,
    #[serde(borrow)]
    user: Option<Text<'a>>,
    /// The Responses API's stored response this one continues.
    #[serde(borrow)]
    previous_response_id: Option<Text<'a>>,
}

/// A member that is there, even as `null` (which `Option` alone reads as absent): beside a
/// client's `"stream_options": null` the gateway must not write a second `stream_options`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Some members of a body that is a JSON object, read without building it: a JSON array would
/// read as a struct's members in order, so only an object is one.
fn object_fields<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Option<T> {
    if !body.trim_ascii_start().starts_with(b"{") {
        return None;
    }
    serde_json::from_slice(body).ok()
}

/// The `model` a body names, if it is a JSON object that names one (the passed-through routes).
pub fn named_model(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Named<'a> {
        #[serde(borrow)]
        model: Option<Text<'a>>,
    }
    object_fields::<Named>(body)?
        .model
        .map(|model| model.as_str().to_string())
}

/// A string that may or may not have escapes in it.
#[derive(Deserialize)]
#[serde(untagged)]
enum Text<'a> {
    Borrowed(&'a str),
    Owned(String),
}

impl Text<'_> {
    fn as_str(&self) -> &str {
        match self {
            Text::Borrowed(s) => s,
            Text::Owned(s) => s,
        }
    }
}

/// What the gateway needs to know about a request to route it.
#[derive(Debug)]
pub struct Classified {
    pub model: String,
    pub cacheable: bool,
    pub stream: bool,
    /// The chained keys of the prompt's blocks, for cache-aware routing (empty when off).
    pub blocks: Vec<u64>,
    /// Hash of the affinity key: a session header, else `user`, else the prompt's prefix.
    pub affinity: Option<u64>,
    /// How the stream's usage chunk stands: asked for by the client, or not, and whether the
    /// request has `stream_options` at all (which decides how the gateway asks for it).
    pub stream_usage: StreamUsage,
    /// The prompt's size in bytes (its system prompt or instructions and its content), for an
    /// estimate of its tokens when the backend reports none.
    pub prompt_bytes: usize,
    /// The stored response a Responses API request continues (`previous_response_id`).
    pub previous_response: Option<String>,
}

/// What a request says about the usage chunk of its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamUsage {
    /// `stream_options.include_usage` is true.
    Asked,
    /// No `stream_options` at all.
    Absent,
    /// `stream_options` without `include_usage: true` (or `null`).
    NotAsked,
    /// `stream_options` with vLLM's `continuous_usage_stats` but not `include_usage`: left as
    /// it is (see [`with_stream_usage`]).
    Untouched,
}

/// The request body with `stream_options.include_usage` set, so the backend reports the
/// stream's usage (the gateway removes that chunk before the client sees it). With no
/// `stream_options` the member is written in after the opening brace, the rest of the body kept
/// byte for byte; otherwise the body is parsed and written anew.
pub fn with_stream_usage(body: &[u8], usage: StreamUsage) -> Option<Bytes> {
    const MEMBER: &[u8] = br#""stream_options":{"include_usage":true},"#;
    match usage {
        StreamUsage::Asked | StreamUsage::Untouched => None,
        StreamUsage::Absent => {
            let open = body.iter().position(|b| *b == b'{')?;
            let mut out = BytesMut::with_capacity(body.len() + MEMBER.len());
            out.extend_from_slice(&body[..=open]);
            out.extend_from_slice(MEMBER);
            out.extend_from_slice(&body[open + 1..]);
            Some(out.freeze())
        }
        // Only `stream_options` is rewritten, in place: the body (up to the request limit) is
        // never built as a `serde_json::Value`, which takes about 16 times its size.
        StreamUsage::NotAsked => {
            #[derive(Deserialize)]
            struct Options<'a> {
                #[serde(borrow, default, deserialize_with = "present")]
                stream_options: Option<&'a RawValue>,
            }
            let raw = object_fields::<Options>(body)?.stream_options?;
            let text = raw.get();
            if text.len() > OPTIONS_MAX {
                return None;
            }
            let mut options = match text {
                "null" => serde_json::Map::new(),
                _ => {
                    serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text).ok()?
                }
            };
            options.insert("include_usage".into(), serde_json::Value::Bool(true));
            let written = serde_json::to_vec(&options).ok()?;
            // Where the member's value lies in the body: `raw` borrows from it.
            let start = (text.as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
            let end = start + text.len();
            let mut out = BytesMut::with_capacity(body.len() + written.len());
            out.extend_from_slice(body.get(..start)?);
            out.extend_from_slice(&written);
            out.extend_from_slice(body.get(end..)?);
            Some(out.freeze())
        }
    }
}

/// The longest `stream_options` rewritten to ask for the stream's usage; a longer one is left as
/// it is (and the stream's tokens estimated).
const OPTIONS_MAX: usize = 4096;

/// How a request body may arrive.
#[derive(Debug, Clone)]
pub struct BodyLimits {
    pub max_bytes: usize,
    /// For the whole body, and for the longest pause within it.
    pub total: Duration,
    pub idle: Duration,
    /// Bytes of request bodies held over all requests.
    pub budget: Arc<ByteBudget>,
}

/// The first allocation for a body; it grows as bytes arrive, so a `Content-Length` a client
/// declares but does not send reserves nothing.
const INITIAL_BODY_CAPACITY: usize = 16 * 1024;

/// Reads the body within its limits: at most `max_bytes` (by `Content-Length` at once, else as it
/// arrives), in time, and within the gateway-wide body budget, whose bytes the returned
/// reservation holds until it is dropped.
pub async fn read_body(
    headers: &HeaderMap,
    mut payload: web::Payload,
    limits: &BodyLimits,
) -> Result<(Bytes, Reservation), GatewayError> {
    let limit = limits.max_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(GatewayError::TooLarge { limit });
    }
    let mut reservation = limits.budget.reservation();
    let mut body = BytesMut::with_capacity(
        declared
            .unwrap_or(1024)
            .min(INITIAL_BODY_CAPACITY)
            .min(limit),
    );
    let mut deadline = None;
    loop {
        // What has arrived is taken without a timer: a small body is usually all there with the
        // head. Only a wait arms one.
        let next = match payload.next().now_or_never() {
            Some(next) => next,
            None => {
                let deadline = *deadline.get_or_insert_with(|| Instant::now() + limits.total);
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left.min(limits.idle), payload.next()).await {
                    Ok(next) => next,
                    Err(_) if left <= limits.idle => {
                        return Err(GatewayError::RequestTimeout("body_timeout_ms passed"))
                    }
                    Err(_) => {
                        return Err(GatewayError::RequestTimeout("the client paused too long"))
                    }
                }
            }
        };
        let Some(chunk) = next else {
            break;
        };
        let chunk =
            chunk.map_err(|e| GatewayError::BadJson(format!("reading the body failed: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(GatewayError::TooLarge { limit });
        }
        if !reservation.grow(chunk.len()) {
            return Err(GatewayError::BodyBufferFull);
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body.freeze(), reservation))
}

/// Validates the fields `operation` requires and decides cacheability and affinity.
pub fn classify(
    operation: Operation,
    body: &[u8],
    headers: &HeaderMap,
    affinity: &AffinitySettings,
) -> Result<Classified, GatewayError> {
    classify_with_blocks(operation, body, headers, affinity, 0)
}

/// [`classify`], also keying up to `max_blocks` blocks of the prompt (its system prompt or
/// instructions first) for cache-aware routing.
pub fn classify_with_blocks(
    operation: Operation,
    body: &[u8],
    headers: &HeaderMap,
    affinity: &AffinitySettings,
    max_blocks: usize,
) -> Result<Classified, GatewayError> {
    let fields: Fields = serde_json::from_slice(body).map_err(|e| {
        if e.is_data() {
            wrong_field(body)
        } else {
            GatewayError::BadJson(e.to_string())
        }
    })?;
    let model = match &fields.model {
        Some(model) => model.as_str().to_string(),
        None => return Err(GatewayError::MissingField("model")),
    };
    if model.is_empty() {
        return Err(GatewayError::InvalidField {
            field: "model",
            reason: "must not be empty".into(),
        });
    }
    let (name, required) = operation.content_field();
    let content = match name {
        "messages" => fields.messages,
        "prompt" => fields.prompt,
        _ => fields.input,
    };
    if required && content.is_none() {
        return Err(GatewayError::MissingField(name));
    }
    if name == "messages" && content.is_some_and(|c| !c.get().starts_with('[')) {
        return Err(GatewayError::InvalidField {
            field: "messages",
            reason: "must be an array of messages".into(),
        });
    }
    let lead = fields.system.or(fields.instructions).or(content);
    let prompt_bytes = [fields.system.or(fields.instructions), content]
        .iter()
        .flatten()
        .map(|raw| raw.get().len())
        .sum();
    let stream_usage = match fields.stream_options {
        None => StreamUsage::Absent,
        Some(options) => {
            #[derive(Deserialize)]
            struct Options {
                include_usage: Option<bool>,
                continuous_usage_stats: Option<bool>,
            }
            match serde_json::from_str::<Options>(options.get()) {
                Ok(Options {
                    include_usage: Some(true),
                    ..
                }) => StreamUsage::Asked,
                // vLLM sends usage in every chunk when both are set: asking on the client's behalf
                // would change every chunk, not only add the one the gateway removes.
                Ok(Options {
                    continuous_usage_stats: Some(true),
                    ..
                }) => StreamUsage::Untouched,
                _ => StreamUsage::NotAsked,
            }
        }
    };
    let stream = fields.stream.unwrap_or(false);
    let deterministic = operation == Operation::Embeddings
        || fields.temperature == Some(0.0)
        || fields.seed.is_some();
    const OPT_IN: HeaderName = HeaderName::from_static(CACHE_OPT_IN);
    let opted_in = headers
        .get(OPT_IN)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"on"));
    let bypass = headers
        .get(header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("no-cache") || v.contains("no-store"));
    let key = affinity
        .headers
        .iter()
        .find_map(|name| headers.get(name).filter(|v| !v.is_empty()))
        .map(|v| (b'h', v.as_bytes()))
        .or_else(|| fields.user.as_ref().map(|u| (b'u', u.as_str().as_bytes())))
        .or_else(|| {
            let raw = lead?.get().as_bytes();
            (affinity.prefix_bytes > 0)
                .then(|| (b'p', &raw[..raw.len().min(affinity.prefix_bytes)]))
        });
    let mut blocks = Vec::new();
    if max_blocks > 0 {
        let system = fields.system.or(fields.instructions);
        let parts: [&[u8]; 2] = [
            system.map_or(&[][..], |s| s.get().as_bytes()),
            content.map_or(&[][..], |c| c.get().as_bytes()),
        ];
        blocks.reserve((parts[0].len() + parts[1].len()) / BLOCK_BYTES + 1);
        block_keys_of(&parts, max_blocks, &mut blocks);
    }
    Ok(Classified {
        model,
        cacheable: !stream && !bypass && (deterministic || opted_in),
        stream,
        blocks,
        affinity: key.map(|(kind, bytes)| stable_hash_seeded(u64::from(kind), bytes)),
        stream_usage,
        prompt_bytes,
        previous_response: fields
            .previous_response_id
            .as_ref()
            .map(|id| id.as_str().to_string()),
    })
}

/// The field whose type is wrong, named, for a body that is JSON but not what the fields must be
/// (serde's own message names a type and a column, not the field). Only on the error path, and
/// like the classification itself without building the body as a `serde_json::Value`: a body of
/// 32 MiB of `[0,0,...]` made half a GiB of one.
fn wrong_field(body: &[u8]) -> GatewayError {
    let invalid = |field, reason: &str| GatewayError::InvalidField {
        field,
        reason: reason.into(),
    };
    #[derive(Deserialize)]
    struct Members<'a> {
        #[serde(borrow)]
        model: Option<&'a RawValue>,
        #[serde(borrow)]
        stream: Option<&'a RawValue>,
        #[serde(borrow)]
        temperature: Option<&'a RawValue>,
        #[serde(borrow)]
        seed: Option<&'a RawValue>,
        #[serde(borrow)]
        user: Option<&'a RawValue>,
    }
    let Some(members) = object_fields::<Members>(body) else {
        return invalid("body", "must be a JSON object");
    };
    // What each member's raw JSON must look like (a `null` member reads as absent).
    type Check<'a> = (
        &'static str,
        Option<&'a RawValue>,
        fn(&str) -> bool,
        &'static str,
    );
    let string = |raw: &str| raw.starts_with('"');
    let checks: [Check; 5] = [
        ("model", members.model, string, "expected a string"),
        (
            "stream",
            members.stream,
            |raw| matches!(raw, "true" | "false"),
            "expected true or false",
        ),
        (
            "temperature",
            members.temperature,
            |raw| raw.starts_with(|c: char| c == '-' || c.is_ascii_digit()),
            "expected a number",
        ),
        (
            "seed",
            members.seed,
            |raw| raw.parse::<i64>().is_ok() || raw.parse::<u64>().is_ok(),
            "expected an integer",
        ),
        ("user", members.user, string, "expected a string"),
    ];
    for (field, raw, ok, reason) in checks {
        if raw.is_some_and(|raw| !ok(raw.get())) {
            return invalid(field, reason);
        }
    }
    invalid("body", "a field has the wrong type")
}

/// How long the client waits: `limit` for the whole request, or less if it asks (its own header in
/// milliseconds); the Python SDK's read timeout; and the Node SDK's timeout, for the head.
/// openai-node (and Anthropic's) abort a request after `timeout` only until `fetch` resolves, at
/// the head: taken for the whole request's deadline, it cut a stream that ran past it.
pub fn client_timeouts(headers: &HeaderMap, limit: Duration) -> ClientTimeouts {
    let header = |name: HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let seconds = |name| {
        header(name)
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(|s| Duration::from_secs_f64(s.min(limit.as_secs_f64())) + SDK_TIMEOUT_GRACE)
    };
    const OWN: HeaderName = HeaderName::from_static(TIMEOUT_HEADER);
    const SDK: HeaderName = HeaderName::from_static(SDK_TIMEOUT_HEADER);
    const SDK_READ: HeaderName = HeaderName::from_static(SDK_READ_TIMEOUT_HEADER);
    let asked = header(OWN)
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_millis);
    ClientTimeouts {
        total: asked.map_or(limit, |asked| asked.min(limit)),
        read: seconds(SDK_READ),
        head: seconds(SDK),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::HeaderValue;

    fn affinity() -> AffinitySettings {
        AffinitySettings {
            headers: vec![HeaderName::from_static("x-session-id")],
            prefix_bytes: 32,
        }
    }

    fn chat(body: &str) -> Result<Classified, GatewayError> {
        classify(
            Operation::ChatCompletions,
            body.as_bytes(),
            &HeaderMap::new(),
            &affinity(),
        )
    }

    #[test]
    fn required_fields_and_json_errors() {
        assert!(matches!(chat("{"), Err(GatewayError::BadJson(_))));
        assert!(matches!(
            chat("[1]"),
            Err(GatewayError::InvalidField { .. })
        ));
        assert!(matches!(
            chat(r#"{"messages":[]}"#),
            Err(GatewayError::MissingField("model"))
        ));
        assert!(matches!(
            chat(r#"{"model":"m"}"#),
            Err(GatewayError::MissingField("messages"))
        ));
        assert!(matches!(
            chat(r#"{"model":"m","messages":"hi"}"#),
            Err(GatewayError::InvalidField { .. })
        ));
        for (body, field) in [
            (r#"{"model":5,"messages":[]}"#, "model"),
            (r#"{"model":"m","messages":[],"stream":"yes"}"#, "stream"),
            (
                r#"{"model":"m","messages":[],"temperature":"hot"}"#,
                "temperature",
            ),
            (r#"{"model":"m","messages":[],"seed":1.5}"#, "seed"),
            (r#"{"model":"m","messages":[],"user":["u"]}"#, "user"),
            ("[0,0,0,0,0,0,0,0,0,0]", "body"),
        ] {
            match chat(body) {
                Err(GatewayError::InvalidField { field: named, .. }) => {
                    assert_eq!(named, field, "{body}")
                }
                other => panic!("{body}: {other:?}"),
            }
        }
        let ok = chat(r#"{"model":"m\u00e9","messages":[],"stream":true}"#).unwrap();
        assert_eq!(ok.model, "mé");
        assert!(!ok.cacheable, "a stream is never cached");
    }

    #[test]
    fn the_usage_chunk_is_asked_for_once_and_never_beside_the_clients_own_options() {
        let ask = |body: &str| {
            let usage = chat(body).unwrap().stream_usage;
            let sent = with_stream_usage(body.as_bytes(), usage)
                .map(|b| serde_json::from_slice::<serde_json::Value>(&b).unwrap());
            (usage, sent.map(|v| v["stream_options"].clone()))
        };
        let asked = serde_json::json!({"include_usage": true});
        assert_eq!(
            ask(r#"{"model":"m","messages":[],"stream":true}"#),
            (StreamUsage::Absent, Some(asked.clone()))
        );
        // `null` is there: rewritten, not a second member beside it (a duplicate key a strict
        // parser refuses and a lenient one reads as the later `null`).
        let body = r#"{"model":"m","messages":[],"stream":true,"stream_options":null}"#;
        assert_eq!(ask(body), (StreamUsage::NotAsked, Some(asked.clone())));
        let sent = with_stream_usage(body.as_bytes(), StreamUsage::NotAsked).unwrap();
        assert_eq!(
            sent.windows(16)
                .filter(|w| w == b"\"stream_options\"")
                .count(),
            1
        );
        assert_eq!(
            ask(r#"{"model":"m","messages":[],"stream_options":{"include_usage":false}}"#),
            (StreamUsage::NotAsked, Some(asked))
        );
        assert_eq!(
            ask(r#"{"model":"m","messages":[],"stream_options":{"include_usage":true}}"#),
            (StreamUsage::Asked, None)
        );
        // vLLM would then put usage in every chunk, which the gateway does not remove.
        assert_eq!(
            ask(r#"{"model":"m","messages":[],"stream_options":{"continuous_usage_stats":true}}"#),
            (StreamUsage::Untouched, None)
        );
    }

    #[test]
    fn cacheable_only_when_deterministic_or_opted_in() {
        assert!(
            chat(r#"{"model":"m","messages":[],"temperature":0}"#)
                .unwrap()
                .cacheable
        );
        assert!(
            chat(r#"{"model":"m","messages":[],"seed":4}"#)
                .unwrap()
                .cacheable
        );
        assert!(
            !chat(r#"{"model":"m","messages":[],"temperature":0.7}"#)
                .unwrap()
                .cacheable
        );
        assert!(
            !chat(r#"{"model":"m","messages":[],"temperature":0,"stream":true}"#)
                .unwrap()
                .cacheable
        );
        let mut headers = HeaderMap::new();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        let body = br#"{"model":"m","messages":[],"temperature":0}"#;
        assert!(
            !classify(Operation::ChatCompletions, body, &headers, &affinity())
                .unwrap()
                .cacheable
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            header::HeaderName::from_static(CACHE_OPT_IN),
            HeaderValue::from_static("on"),
        );
        let body = br#"{"model":"m","messages":[]}"#;
        assert!(
            classify(Operation::ChatCompletions, body, &headers, &affinity())
                .unwrap()
                .cacheable
        );
        let embeddings = classify(
            Operation::Embeddings,
            br#"{"model":"m","input":"x"}"#,
            &HeaderMap::new(),
            &affinity(),
        );
        assert!(embeddings.unwrap().cacheable);
    }
}

#[cfg(test)]
mod affinity_tests {
    use super::*;
    use actix_web::http::header::{HeaderName, HeaderValue};

    fn key(body: &str, session: Option<&str>) -> Option<u64> {
        let settings = AffinitySettings {
            headers: vec![HeaderName::from_static("x-session-id")],
            prefix_bytes: 40,
        };
        let mut headers = HeaderMap::new();
        if let Some(s) = session {
            headers.insert(
                HeaderName::from_static("x-session-id"),
                HeaderValue::from_str(s).unwrap(),
            );
        }
        classify(
            Operation::ChatCompletions,
            body.as_bytes(),
            &headers,
            &settings,
        )
        .unwrap()
        .affinity
    }

    #[test]
    fn shared_prompt_prefixes_share_a_key_and_sessions_or_users_override_it() {
        let system = r#"{"role":"system","content":"You are a careful assistant who"}"#;
        let a = format!(r#"{{"model":"m","messages":[{system},{{"role":"user","content":"a"}}]}}"#);
        let b = format!(r#"{{"model":"m","messages":[{system},{{"role":"user","content":"b"}}]}}"#);
        let other = r#"{"model":"m","messages":[{"role":"system","content":"Something else entirely, really"}]}"#;
        assert_eq!(key(&a, None), key(&b, None), "same 40-byte prefix");
        assert_ne!(key(&a, None), key(other, None));
        assert_eq!(
            key(&a, Some("s1")),
            key(other, Some("s1")),
            "the session wins"
        );
        let with_user = r#"{"model":"m","messages":[],"user":"u1"}"#;
        let with_user_too =
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"user":"u1"}"#;
        assert_eq!(key(with_user, None), key(with_user_too, None));
    }

    #[test]
    fn the_client_s_timeouts_are_read_from_its_headers() {
        let limit = Duration::from_secs(600);
        let timeouts = |pairs: &[(&'static str, &'static str)]| {
            let mut headers = HeaderMap::new();
            for (name, value) in pairs {
                headers.insert(
                    HeaderName::from_static(name),
                    HeaderValue::from_static(value),
                );
            }
            client_timeouts(&headers, limit)
        };
        assert_eq!(
            timeouts(&[]),
            ClientTimeouts {
                total: limit,
                read: None,
                head: None,
            }
        );
        assert_eq!(
            timeouts(&[(TIMEOUT_HEADER, "1500")]).total,
            Duration::from_millis(1500)
        );
        let node = timeouts(&[(SDK_TIMEOUT_HEADER, "2.5")]);
        assert_eq!(
            (node.total, node.head),
            (limit, Some(Duration::from_millis(2500) + SDK_TIMEOUT_GRACE)),
            "the Node SDKs' timeout ends at the head"
        );
        let python = timeouts(&[(SDK_READ_TIMEOUT_HEADER, "2.5")]);
        assert_eq!(
            (python.total, python.read),
            (limit, Some(Duration::from_millis(2500) + SDK_TIMEOUT_GRACE)),
            "a read timeout limits each read, not the request"
        );
        assert_eq!(
            timeouts(&[(SDK_TIMEOUT_HEADER, "1e9")]).head,
            Some(limit + SDK_TIMEOUT_GRACE)
        );
    }
}
