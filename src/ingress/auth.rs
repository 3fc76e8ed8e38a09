//! API keys on the request path: who the caller is (`Authorization: Bearer <key>`, or the
//! `x-api-key` header Anthropic's SDKs send), whether the key may use the model, and whether it
//! is within its limits. All of it reads memory the key registry publishes: no database, no
//! actor round trip.

use std::sync::Arc;

use actix_web::http::header::{self, HeaderMap, HeaderName};
use actix_web::HttpRequest;
use nanogate_actors::account::Admitted;
use nanogate_actors::keys::{ApiKey, KeyRegistry};
use nanogate_actors::limiter::RateState;

use super::connections::ConnectionSlot;
use crate::error::GatewayError;

const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// The credential headers a client's key travels in; none of them goes upstream in keys mode.
pub const KEY_HEADERS: [HeaderName; 2] = [header::AUTHORIZATION, X_API_KEY];

/// The secret the client presented, if any.
fn presented(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = value.as_bytes();
        let scheme = b"bearer ";
        if value.len() > scheme.len() && value[..scheme.len()].eq_ignore_ascii_case(scheme) {
            return Some(value[scheme.len()..].trim_ascii());
        }
        return None;
    }
    headers.get(X_API_KEY).map(|v| v.as_bytes().trim_ascii())
}

/// The caller's key, when keys are on (`registry` is `Some`): 401 `invalid_api_key` when it
/// sent none or an unknown or revoked one.
pub fn authenticate(
    registry: Option<&KeyRegistry>,
    req: &HttpRequest,
) -> Result<Option<Arc<ApiKey>>, GatewayError> {
    let Some(registry) = registry else {
        return Ok(None);
    };
    let secret = presented(req.headers()).ok_or(GatewayError::InvalidApiKey)?;
    let key = match req.conn_data::<ConnectionSlot>() {
        Some(slot) => registry.authenticate_on(secret, &slot.last_key),
        None => registry.authenticate(secret),
    };
    key.map(Some).ok_or(GatewayError::InvalidApiKey)
}

/// Checks that `key` may use `model` (403 `model_not_found`, as OpenAI answers a project key
/// without access to a model) and admits the request under its limits (429).
pub fn admit(key: Arc<ApiKey>, model: &str) -> Result<(Arc<Admitted>, RateState), GatewayError> {
    if !model.is_empty() && !key.allows(model) {
        return Err(GatewayError::ModelNotAllowed {
            key: key.name.to_string(),
            model: model.to_string(),
        });
    }
    let state = key.limiter.admit().map_err(GatewayError::RateLimited)?;
    Ok((Arc::new(Admitted { key }), state))
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::HeaderValue;

    fn headers(name: HeaderName, value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_static(value));
        h
    }

    #[test]
    fn the_key_comes_from_a_bearer_token_or_x_api_key() {
        assert_eq!(
            presented(&headers(header::AUTHORIZATION, "Bearer ng-1 ")),
            Some(&b"ng-1"[..])
        );
        assert_eq!(
            presented(&headers(header::AUTHORIZATION, "bearer ng-1")),
            Some(&b"ng-1"[..])
        );
        assert_eq!(
            presented(&headers(header::AUTHORIZATION, "Basic eA==")),
            None
        );
        assert_eq!(presented(&headers(header::AUTHORIZATION, "Bearer ")), None);
        assert_eq!(presented(&headers(X_API_KEY, "ng-2")), Some(&b"ng-2"[..]));
        assert_eq!(presented(&HeaderMap::new()), None);
    }
}
