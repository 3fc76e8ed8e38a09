//! Reading and classifying an OpenAI request: the body within its size limit, the fields the
//! gateway routes on (model, stream, cacheability), and the checks that answer 400/413 before
//! any backend is bothered. Only those fields are parsed; the rest of the body is passed on as
//! the exact bytes the client sent.

use actix_web::http::header::{self, HeaderMap};
use actix_web::web;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde::de::IgnoredAny;
use serde::Deserialize;

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

#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow)]
    model: Option<Text<'a>>,
    messages: Option<Vec<IgnoredAny>>,
    prompt: Option<IgnoredAny>,
    input: Option<IgnoredAny>,
    stream: Option<bool>,
    temperature: Option<f64>,
    seed: Option<i64>,
}

/// A string that may or may not have escapes in it.
#[derive(Deserialize)]
#[serde(untagged)]
enum Text<'a> {
    Borrowed(&'a str),
    Owned(String),
}

impl Text<'_> {
    fn into_string(self) -> String {
        match self {
            Text::Borrowed(s) => s.to_string(),
            Text::Owned(s) => s,
        }
    }
}

/// What the gateway needs to know about a request to route it.
#[derive(Debug)]
pub struct Classified {
    pub model: String,
    pub stream: bool,
    pub cacheable: bool,
}

/// Reads the body, refusing more than `limit` bytes (by `Content-Length` at once, else as it
/// arrives).
pub async fn read_body(
    headers: &HeaderMap,
    mut payload: web::Payload,
    limit: usize,
) -> Result<Bytes, GatewayError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(GatewayError::TooLarge { limit });
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(1024).min(limit));
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|e| GatewayError::BadJson(format!("reading the body failed: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(GatewayError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Validates the fields `operation` requires and decides streaming and cacheability.
pub fn classify(
    operation: Operation,
    body: &[u8],
    headers: &HeaderMap,
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
    let model = match fields.model {
        Some(model) => model.into_string(),
        None => return Err(GatewayError::MissingField("model")),
    };
    if model.is_empty() {
        return Err(GatewayError::InvalidField {
            field: "model",
            reason: "must not be empty".into(),
        });
    }
    match operation {
        Operation::ChatCompletions if fields.messages.is_none() => {
            return Err(GatewayError::MissingField("messages"))
        }
        Operation::Completions if fields.prompt.is_none() => {
            return Err(GatewayError::MissingField("prompt"))
        }
        Operation::Embeddings if fields.input.is_none() => {
            return Err(GatewayError::MissingField("input"))
        }
        _ => {}
    }
    let stream = fields.stream.unwrap_or(false);
    let deterministic = operation == Operation::Embeddings
        || fields.temperature == Some(0.0)
        || fields.seed.is_some();
    let opted_in = headers
        .get(CACHE_OPT_IN)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"on"));
    let bypass = headers
        .get(header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("no-cache") || v.contains("no-store"));
    Ok(Classified {
        model,
        stream,
        cacheable: !stream && !bypass && (deterministic || opted_in),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::HeaderValue;

    fn chat(body: &str) -> Result<Classified, GatewayError> {
        classify(
            Operation::ChatCompletions,
            body.as_bytes(),
            &HeaderMap::new(),
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
        assert!(ok.stream && !ok.cacheable);
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
            !classify(Operation::ChatCompletions, body, &headers)
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
            classify(Operation::ChatCompletions, body, &headers)
                .unwrap()
                .cacheable
        );
        let embeddings = classify(
            Operation::Embeddings,
            br#"{"model":"m","input":"x"}"#,
            &HeaderMap::new(),
        );
        assert!(embeddings.unwrap().cacheable);
    }
}
