//! Reading and classifying an OpenAI request: the body within its size limit, the fields the
//! gateway routes on (model, cacheability, affinity), and the checks that answer 400/413 before
//! any backend is bothered. Only those fields are parsed; the rest of the body is passed on as
//! the exact bytes the client sent.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::header::{self, HeaderMap, HeaderName};
use actix_web::web;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use nanogate_actors::buffers::{ByteBudget, Reservation};
use nanogate_actors::policy::affinity::stable_hash_seeded;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::config::AffinitySettings;
use crate::error::GatewayError;

/// Which OpenAI operation a route is, and so which fields it requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    ChatCompletions,
    Completions,
    Embeddings,
}

impl Operation {
    pub fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
            Self::Embeddings => "/v1/embeddings",
        }
    }
}

/// Request header that opts a request into the cache whatever its sampling settings.
pub const CACHE_OPT_IN: &str = "x-nanogate-cache";

/// Request header with a client's deadline for the whole request, in milliseconds.
pub const TIMEOUT_HEADER: &str = "x-request-timeout-ms";
/// The OpenAI SDKs send their timeout in seconds: the Python SDK as its read timeout, the Node SDK
/// as its whole timeout.
pub const SDK_TIMEOUT_HEADERS: [&str; 2] = ["x-stainless-read-timeout", "x-stainless-timeout"];

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
    stream: Option<bool>,
    temperature: Option<f64>,
    seed: Option<i64>,
    #[serde(borrow)]
    user: Option<Text<'a>>,
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
    /// Hash of the affinity key: the affinity header, else `user`, else the prompt's prefix.
    pub affinity: Option<u64>,
}

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
    let deadline = Instant::now() + limits.total;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let next = match tokio::time::timeout(left.min(limits.idle), payload.next()).await {
            Ok(next) => next,
            Err(_) if left <= limits.idle => {
                return Err(GatewayError::RequestTimeout("body_timeout_ms passed"))
            }
            Err(_) => return Err(GatewayError::RequestTimeout("the client paused too long")),
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
    let fields: Fields = serde_json::from_slice(body).map_err(|e| {
        if e.is_data() {
            GatewayError::InvalidField {
                field: "body",
                reason: e.to_string(),
            }
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
    let (name, content) = match operation {
        Operation::ChatCompletions => ("messages", fields.messages),
        Operation::Completions => ("prompt", fields.prompt),
        Operation::Embeddings => ("input", fields.input),
    };
    let Some(content) = content else {
        return Err(GatewayError::MissingField(name));
    };
    if operation == Operation::ChatCompletions && !content.get().starts_with('[') {
        return Err(GatewayError::InvalidField {
            field: "messages",
            reason: "must be an array of messages".into(),
        });
    }
    let stream = fields.stream.unwrap_or(false);
    let deterministic = operation == Operation::Embeddings
        || fields.temperature == Some(0.0)
        || fields.seed.is_some();
    let opted_in = headers
        .get(HeaderName::from_static(CACHE_OPT_IN))
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"on"));
    let bypass = headers
        .get(header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("no-cache") || v.contains("no-store"));
    let key = headers
        .get(&affinity.header)
        .map(|v| (b'h', v.as_bytes()))
        .filter(|(_, v)| !v.is_empty())
        .or_else(|| fields.user.as_ref().map(|u| (b'u', u.as_str().as_bytes())))
        .or_else(|| {
            let raw = content.get().as_bytes();
            (affinity.prefix_bytes > 0)
                .then(|| (b'p', &raw[..raw.len().min(affinity.prefix_bytes)]))
        });
    Ok(Classified {
        model,
        cacheable: !stream && !bypass && (deterministic || opted_in),
        affinity: key.map(|(kind, bytes)| stable_hash_seeded(u64::from(kind), bytes)),
    })
}

/// How long the request may take: `limit`, or less if the client asks (its own header in
/// milliseconds, else the OpenAI SDKs' timeout in seconds).
pub fn time_budget(headers: &HeaderMap, limit: Duration) -> Duration {
    let header = |name: &'static str| {
        headers
            .get(HeaderName::from_static(name))
            .and_then(|v| v.to_str().ok())
    };
    let asked = header(TIMEOUT_HEADER)
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_millis)
        .or_else(|| {
            SDK_TIMEOUT_HEADERS.iter().find_map(|name| {
                header(name)
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .filter(|s| s.is_finite() && *s > 0.0)
                    .map(|s| Duration::from_secs_f64(s.min(limit.as_secs_f64())))
            })
        });
    asked.map_or(limit, |a| a.min(limit))
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::HeaderValue;

    fn affinity() -> AffinitySettings {
        AffinitySettings {
            header: HeaderName::from_static("x-session-id"),
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
        let ok = chat(r#"{"model":"m\u00e9","messages":[],"stream":true}"#).unwrap();
        assert_eq!(ok.model, "mé");
        assert!(!ok.cacheable, "a stream is never cached");
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
            header: HeaderName::from_static("x-session-id"),
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
    fn the_time_budget_is_the_client_s_when_shorter() {
        let limit = Duration::from_secs(600);
        let mut headers = HeaderMap::new();
        assert_eq!(time_budget(&headers, limit), limit);
        headers.insert(
            HeaderName::from_static(TIMEOUT_HEADER),
            HeaderValue::from_static("1500"),
        );
        assert_eq!(time_budget(&headers, limit), Duration::from_millis(1500));
        for name in SDK_TIMEOUT_HEADERS {
            let mut sdk = HeaderMap::new();
            sdk.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static("2.5"),
            );
            assert_eq!(
                time_budget(&sdk, limit),
                Duration::from_millis(2500),
                "{name}"
            );
        }
        let mut huge = HeaderMap::new();
        huge.insert(
            HeaderName::from_static(SDK_TIMEOUT_HEADERS[0]),
            HeaderValue::from_static("1e9"),
        );
        assert_eq!(time_budget(&huge, limit), limit);
    }
}
