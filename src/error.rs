//! Every error the gateway answers itself, and the one place that maps each to an HTTP status and
//! the OpenAI error shape `{"error": {"message", "type", "param", "code"}}`, so that OpenAI SDKs
//! raise the right exception class.

use std::time::Duration;

use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};
use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use bytes::BytesMut;
use nanogate_actors::error::ForwardError;
use nanogate_actors::limiter::{RateState, Refusal, Refused};
use nanogate_actors::metrics::Cause;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("We could not parse the JSON body of your request: {0}")]
    BadJson(String),
    #[error("Missing required parameter: '{0}'.")]
    MissingField(&'static str),
    #[error("Invalid value for '{field}': {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("The request body is larger than the {limit} byte limit.")]
    TooLarge { limit: usize },
    #[error("The request body did not arrive in time ({0}).")]
    RequestTimeout(&'static str),
    #[error("Protocol upgrades (WebSocket) are not supported; send plain HTTP requests.")]
    UpgradeNotSupported,
    #[error("The gateway holds as many client connections as it may; retry shortly.")]
    TooManyConnections,
    #[error("The gateway holds as many request bodies as it may; retry shortly.")]
    BodyBufferFull,
    #[error("Invalid path: {0}")]
    InvalidPath(&'static str),
    #[error("Invalid URL ({method} {path})")]
    UnknownRoute { method: String, path: String },
    #[error("The model '{0}' does not exist or is not served by any backend.")]
    ModelNotFound(String),
    #[error("A valid admin bearer token is required.")]
    Unauthorized,
    #[error("Incorrect API key provided. Send your key as 'Authorization: Bearer <key>'.")]
    InvalidApiKey,
    #[error("Your API key '{key}' does not have access to model '{model}'.")]
    ModelNotAllowed { key: String, model: String },
    #[error("{}", rate_limit_message(.0))]
    RateLimited(Refused),
    #[error("The usage database is not available: {0}")]
    StoreUnavailable(String),
    #[error("No API key is named '{0}'.")]
    NoSuchKey(String),
    #[error(
        "With API keys on, a request to {0} must name a model (a JSON `model` your key may use)."
    )]
    ModelRequired(String),
    #[error("No endpoint has id {0}.")]
    NoSuchEndpoint(usize),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error("Internal error: {0}")]
    Internal(String),
}

fn rate_limit_message(refused: &Refused) -> String {
    let wait = refused.retry_after.as_secs_f64();
    match refused.why {
        Refusal::Requests => format!(
            "Rate limit reached for requests per minute on this key. Please try again in {wait:.3}s."
        ),
        Refusal::Tokens => format!(
            "Rate limit reached for tokens per minute on this key. Please try again in {wait:.3}s."
        ),
        Refusal::Concurrency => {
            "Too many concurrent requests on this key. Please try again when one has finished."
                .into()
        }
        Refusal::DailyBudget => format!(
            "You exceeded this key's daily token budget; it renews at 00:00 UTC, in {wait:.0}s."
        ),
    }
}

/// OpenAI's `x-ratelimit-*` headers: the limit, what is left, and when it is whole again.
///
/// They go into every answer under a key, so their six values are written into one buffer
/// without `fmt` and each header shares it: `HeaderValue::from(u64)` formats through `fmt` into
/// an allocation of its own, ~600 instructions a value.
pub fn rate_limit_headers(headers: &mut HeaderMap, state: &RateState) {
    static NAMES: [[HeaderName; 3]; 2] = [
        [
            HeaderName::from_static("x-ratelimit-limit-requests"),
            HeaderName::from_static("x-ratelimit-remaining-requests"),
            HeaderName::from_static("x-ratelimit-reset-requests"),
        ],
        [
            HeaderName::from_static("x-ratelimit-limit-tokens"),
            HeaderName::from_static("x-ratelimit-remaining-tokens"),
            HeaderName::from_static("x-ratelimit-reset-tokens"),
        ],
    ];
    // At most 20 digits for a count; a reset: 20 digits, `m`, 2 digits, 4 of fraction, `s`.
    let mut text = BytesMut::with_capacity(6 * 28);
    // Where each window's three values end in `text`, for the windows that are set.
    let ends = [state.requests, state.tokens].map(|window| {
        window.map(|w| {
            push_number(&mut text, w.limit);
            let limit = text.len();
            push_number(&mut text, w.remaining);
            let remaining = text.len();
            push_duration(&mut text, w.reset);
            [limit, remaining, text.len()]
        })
    });
    let text = text.freeze();
    let mut start = 0;
    for (names, ends) in NAMES.iter().zip(ends) {
        for (name, end) in names.iter().zip(ends.into_iter().flatten()) {
            let value = HeaderValue::from_maybe_shared(text.slice(start..end))
                .expect("digits, '.', 'm' and 's' are valid in a header value");
            headers.insert(name.clone(), value);
            start = end;
        }
    }
}

fn push_number(text: &mut BytesMut, n: u64) {
    text.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// A duration as OpenAI writes it in `x-ratelimit-reset-*`: `20ms`, `1.5s`, `6m0s`.
fn push_duration(text: &mut BytesMut, d: Duration) {
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    if ms < 1000 {
        push_number(text, ms);
        text.extend_from_slice(b"ms");
        return;
    }
    let (minutes, rest) = (ms / 60_000, ms % 60_000);
    if minutes > 0 {
        push_number(text, minutes);
        text.extend_from_slice(b"m");
    }
    push_number(text, rest / 1000);
    let fraction = rest % 1000;
    if fraction > 0 {
        let digits = [
            b'.',
            b'0' + (fraction / 100) as u8,
            b'0' + (fraction / 10 % 10) as u8,
            b'0' + (fraction % 10) as u8,
        ];
        let mut len = digits.len();
        while digits[len - 1] == b'0' {
            len -= 1;
        }
        text.extend_from_slice(&digits[..len]);
    }
    text.extend_from_slice(b"s");
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    message: String,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl GatewayError {
    fn kind_and_code(&self) -> (&'static str, Option<&'static str>) {
        match self {
            Self::BadJson(_) => ("invalid_request_error", Some("invalid_json")),
            Self::MissingField(_) => ("invalid_request_error", Some("missing_required_parameter")),
            Self::InvalidField { .. } => ("invalid_request_error", Some("invalid_value")),
            Self::TooLarge { .. } => ("invalid_request_error", Some("request_too_large")),
            Self::RequestTimeout(_) => ("invalid_request_error", Some("request_timeout")),
            Self::UpgradeNotSupported => ("invalid_request_error", Some("unsupported_upgrade")),
            Self::TooManyConnections => ("server_error", Some("too_many_connections")),
            Self::BodyBufferFull => ("server_error", Some("overloaded")),
            Self::InvalidPath(_) => ("invalid_request_error", Some("invalid_path")),
            Self::UnknownRoute { .. } => ("invalid_request_error", Some("unknown_url")),
            Self::ModelNotFound(_) => ("invalid_request_error", Some("model_not_found")),
            Self::Unauthorized => ("authentication_error", Some("invalid_admin_token")),
            Self::InvalidApiKey => ("invalid_request_error", Some("invalid_api_key")),
            // What OpenAI answers when a project's key may not use a model.
            Self::ModelNotAllowed { .. } => ("invalid_request_error", Some("model_not_found")),
            Self::RateLimited(refused) => match refused.why {
                Refusal::DailyBudget => ("insufficient_quota", Some("insufficient_quota")),
                Refusal::Tokens => ("tokens", Some("rate_limit_exceeded")),
                Refusal::Requests | Refusal::Concurrency => {
                    ("requests", Some("rate_limit_exceeded"))
                }
            },
            Self::StoreUnavailable(_) => ("server_error", Some("database_unavailable")),
            Self::NoSuchKey(_) => ("invalid_request_error", Some("key_not_found")),
            Self::ModelRequired(_) => ("invalid_request_error", Some("model_required")),
            Self::NoSuchEndpoint(_) => ("invalid_request_error", Some("endpoint_not_found")),
            Self::Conflict(_) => ("invalid_request_error", Some("conflict")),
            Self::Forward(f) => match f {
                ForwardError::Overloaded { .. } => ("server_error", Some("overloaded")),
                ForwardError::NoBackend { .. } => ("server_error", Some("no_healthy_backend")),
                ForwardError::Connect { .. } | ForwardError::Unresponsive { .. } => {
                    ("server_error", Some("upstream_unreachable"))
                }
                ForwardError::Timeout { .. } | ForwardError::DeadlinePassed { .. } => {
                    ("server_error", Some("upstream_timeout"))
                }
                ForwardError::BadResponse { .. } => ("server_error", Some("upstream_bad_response")),
                ForwardError::WorkerGone => ("server_error", Some("worker_restarted")),
            },
            Self::Internal(_) => ("server_error", None),
        }
    }

    fn param(&self) -> Option<&'static str> {
        match self {
            Self::MissingField(field) | Self::InvalidField { field, .. } => Some(field),
            Self::ModelNotFound(_) | Self::ModelNotAllowed { .. } | Self::ModelRequired(_) => {
                Some("model")
            }
            _ => None,
        }
    }

    /// Why the request failed, as the metrics count it.
    pub fn cause(&self) -> Cause {
        match self {
            Self::Forward(f) => match f {
                ForwardError::Overloaded { .. } => Cause::Overload,
                ForwardError::NoBackend { .. } => Cause::NoBackend,
                ForwardError::Connect { .. } | ForwardError::Unresponsive { .. } => {
                    Cause::Unreachable
                }
                ForwardError::Timeout { .. } | ForwardError::DeadlinePassed { .. } => {
                    Cause::Timeout
                }
                ForwardError::BadResponse { .. } => Cause::BadResponse,
                ForwardError::WorkerGone => Cause::Internal,
            },
            Self::TooManyConnections | Self::BodyBufferFull => Cause::Overload,
            Self::Internal(_) | Self::StoreUnavailable(_) => Cause::Internal,
            Self::RateLimited(_) => Cause::RateLimited,
            _ => Cause::ClientError,
        }
    }

    /// Errors after which the connection cannot (or should not) carry another request: the body
    /// was not read to its end, or the connection is over the limit.
    /// Answers after which the connection is not kept: besides the limits, the refusals given
    /// before the request's body is read (a bad path or route, a missing or wrong key), whose
    /// unread body must not be taken for the next request's bytes.
    fn closes_connection(&self) -> bool {
        matches!(
            self,
            Self::TooLarge { .. }
                | Self::RequestTimeout(_)
                | Self::UpgradeNotSupported
                | Self::TooManyConnections
                | Self::BodyBufferFull
                | Self::InvalidPath(_)
                | Self::UnknownRoute { .. }
                | Self::Unauthorized
                | Self::InvalidApiKey
        )
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Forward(ForwardError::Overloaded { retry_after, .. }) => Some(*retry_after),
            Self::Forward(ForwardError::NoBackend { .. } | ForwardError::WorkerGone)
            | Self::TooManyConnections
            | Self::BodyBufferFull
            | Self::StoreUnavailable(_) => Some(Duration::from_secs(1)),
            Self::RateLimited(refused) => Some(refused.retry_after),
            _ => None,
        }
    }
}

impl ResponseError for GatewayError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::BadJson(_)
            | Self::MissingField(_)
            | Self::InvalidField { .. }
            | Self::UpgradeNotSupported
            | Self::InvalidPath(_) => StatusCode::BAD_REQUEST,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::TooManyConnections | Self::BodyBufferFull => StatusCode::SERVICE_UNAVAILABLE,
            Self::UnknownRoute { .. }
            | Self::ModelNotFound(_)
            | Self::NoSuchEndpoint(_)
            | Self::NoSuchKey(_) => StatusCode::NOT_FOUND,
            Self::Unauthorized | Self::InvalidApiKey => StatusCode::UNAUTHORIZED,
            Self::ModelNotAllowed { .. } | Self::ModelRequired(_) => StatusCode::FORBIDDEN,
            Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Forward(f) => match f {
                ForwardError::Overloaded { .. }
                | ForwardError::NoBackend { .. }
                | ForwardError::WorkerGone => StatusCode::SERVICE_UNAVAILABLE,
                ForwardError::Connect { .. }
                | ForwardError::Unresponsive { .. }
                | ForwardError::BadResponse { .. } => StatusCode::BAD_GATEWAY,
                ForwardError::Timeout { .. } | ForwardError::DeadlinePassed { .. } => {
                    StatusCode::GATEWAY_TIMEOUT
                }
            },
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let (kind, code) = self.kind_and_code();
        let mut response = HttpResponse::build(self.status_code());
        if let Some(after) = self.retry_after() {
            // Whole seconds, rounded up (a client that waits less is refused again); the OpenAI
            // SDKs read `retry-after-ms` first.
            let millis = after.as_millis().max(1);
            response.insert_header((header::RETRY_AFTER, millis.div_ceil(1000).to_string()));
            if matches!(self, Self::RateLimited(_)) {
                response.insert_header(("retry-after-ms", millis.to_string()));
            }
        }

        if self.closes_connection() {
            response.force_close();
        }
        let mut response = response.json(Body {
            error: Detail {
                message: self.to_string(),
                kind,
                param: self.param(),
                code,
            },
        });
        if let Self::RateLimited(refused) = self {
            rate_limit_headers(response.headers_mut(), &refused.state);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::body::to_bytes;

    async fn render(e: GatewayError) -> (StatusCode, Option<String>, serde_json::Value) {
        let response = e.error_response();
        let status = response.status();
        let retry = response
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_string());
        let body = to_bytes(response.into_body()).await.unwrap();
        (status, retry, serde_json::from_slice(&body).unwrap())
    }

    #[actix_rt::test]
    async fn overload_is_503_with_retry_after_in_openai_shape() {
        let (status, retry, body) = render(GatewayError::Forward(ForwardError::Overloaded {
            queued: 5,
            retry_after: Duration::from_secs(2),
        }))
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(retry.as_deref(), Some("2"));
        assert_eq!(body["error"]["code"], "overloaded");
        assert_eq!(body["error"]["type"], "server_error");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("capacity"));
    }

    #[test]
    fn reset_durations_read_as_openai_writes_them() {
        for (ms, text) in [
            (20, "20ms"),
            (1000, "1s"),
            (1500, "1.5s"),
            (2050, "2.05s"),
            (360_000, "6m0s"),
            (61_001, "1m1.001s"),
            (999, "999ms"),
            (1_010, "1.01s"),
            (86_399_999, "1439m59.999s"),
        ] {
            let mut written = BytesMut::new();
            push_duration(&mut written, Duration::from_millis(ms));
            assert_eq!(written, text);
        }
    }

    #[test]
    fn rate_limit_headers_carry_each_window_that_is_set() {
        use nanogate_actors::limiter::Window;
        let window = |limit, remaining, ms| Window {
            limit,
            remaining,
            reset: Duration::from_millis(ms),
        };
        let mut headers = HeaderMap::new();
        rate_limit_headers(
            &mut headers,
            &RateState {
                requests: Some(window(600, 599, 100)),
                tokens: Some(window(u64::MAX, 0, 90_500)),
            },
        );
        let read = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(read("x-ratelimit-limit-requests").as_deref(), Some("600"));
        assert_eq!(
            read("x-ratelimit-remaining-requests").as_deref(),
            Some("599")
        );
        assert_eq!(read("x-ratelimit-reset-requests").as_deref(), Some("100ms"));
        assert_eq!(
            read("x-ratelimit-limit-tokens").as_deref(),
            Some("18446744073709551615")
        );
        assert_eq!(read("x-ratelimit-remaining-tokens").as_deref(), Some("0"));
        assert_eq!(read("x-ratelimit-reset-tokens").as_deref(), Some("1m30.5s"));

        let mut headers = HeaderMap::new();
        rate_limit_headers(
            &mut headers,
            &RateState {
                requests: None,
                tokens: Some(window(1000, 10, 2000)),
            },
        );
        assert_eq!(headers.len(), 3);
        assert!(headers.get("x-ratelimit-limit-requests").is_none());
        assert_eq!(headers.get("x-ratelimit-remaining-tokens").unwrap(), "10");
        assert_eq!(headers.get("x-ratelimit-reset-tokens").unwrap(), "2s");
    }

    #[actix_rt::test]
    async fn each_error_has_its_status() {
        let cases = [
            (GatewayError::BadJson("x".into()), 400),
            (GatewayError::MissingField("model"), 400),
            (GatewayError::TooLarge { limit: 1 }, 413),
            (GatewayError::ModelNotFound("m".into()), 404),
            (
                GatewayError::Forward(ForwardError::Timeout {
                    endpoint: 1,
                    timeout: Duration::from_secs(1),
                }),
                504,
            ),
            (
                GatewayError::Forward(ForwardError::Connect {
                    endpoint: 1,
                    reason: "refused".into(),
                }),
                502,
            ),
        ];
        for (error, status) in cases {
            let (got, _, body) = render(error).await;
            assert_eq!(got.as_u16(), status);
            assert!(body["error"]["message"].is_string());
        }
    }
}
