//! `/admin/endpoints`: list, add, remove and drain backends at runtime. Behind a bearer token
//! (`[admin] token`, better given as `NANOGATE__ADMIN__TOKEN`); without a configured token the
//! routes do not exist (404), so an operator cannot leave them open by accident.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use nanogate_actors::balancer::{AddEndpoint, DrainEndpoint, ListEndpoints, RemoveEndpoint};
use nanogate_actors::endpoint::EndpointSpec;
use nanogate_actors::health_checker::ProbeNow;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::connections::admit;
use super::request::{read_body, BodyLimits};
use super::AppState;
use crate::config::check_endpoint;
use crate::error::GatewayError;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/admin")
            .route("/endpoints", web::get().to(list))
            .route("/endpoints", web::post().to(add))
            .route("/endpoints/{id}", web::delete().to(remove))
            .route("/endpoints/{id}/{action}", web::post().to(set_draining)),
    );
}

/// The admin routes are off without a token, and refuse a request without the right one.
fn authorize(req: &HttpRequest, state: &AppState) -> Result<(), GatewayError> {
    let Some(expected) = &state.admin_authorization else {
        return Err(GatewayError::UnknownRoute {
            method: req.method().to_string(),
            path: req.path().to_string(),
        });
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if digests_equal(&digest(given), expected) {
        Ok(())
    } else {
        Err(GatewayError::Unauthorized)
    }
}

/// The SHA-256 digest of a secret: comparing digests of equal length compares secrets without
/// revealing their length or where they first differ.
pub fn digest(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

/// Compares without stopping at the first difference, so timing does not reveal the token.
fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unavailable(e: impl std::fmt::Display) -> GatewayError {
    GatewayError::Internal(format!("the balancer did not answer: {e}"))
}

async fn list(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, GatewayError> {
    authorize(&req, &state)?;
    let specs = state
        .balancer
        .send(ListEndpoints)
        .await
        .map_err(unavailable)?;
    let table = state.view.table();
    let endpoints: Vec<_> = specs
        .into_iter()
        .map(|(id, spec)| {
            let live = table.by_id(id);
            json!({
                "id": id,
                "url": spec.url,
                "weight": live.map_or(spec.weight, |e| e.weight()),
                "models": spec.models,
                "healthy": live.is_some_and(|e| e.is_healthy()),
                "draining": live.is_some_and(|e| e.is_draining()),
                "in_flight": live.map_or(0, |e| e.in_flight()),
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({"endpoints": endpoints})))
}

/// The largest admin request body.
const MAX_ADMIN_BODY: usize = 64 * 1024;

async fn add(
    req: HttpRequest,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, GatewayError> {
    admit(&req)?;
    authorize(&req, &state)?;
    let limits = BodyLimits {
        max_bytes: MAX_ADMIN_BODY,
        ..state.body_limits.clone()
    };
    let (body, _reservation) = read_body(req.headers(), payload, &limits).await?;
    let spec: EndpointSpec =
        serde_json::from_slice(&body).map_err(|e| GatewayError::BadJson(e.to_string()))?;
    if spec.models.len() > 1024 || spec.models.iter().any(|m| m.len() > 256) {
        return Err(GatewayError::InvalidField {
            field: "models",
            reason: "at most 1024 names of at most 256 bytes each".into(),
        });
    }
    check_endpoint(&spec, "body").map_err(|e| GatewayError::InvalidField {
        field: "url",
        reason: e.to_string(),
    })?;
    match state
        .balancer
        .send(AddEndpoint(spec))
        .await
        .map_err(unavailable)?
    {
        Ok(id) => {
            state.health.do_send(ProbeNow {
                endpoint: Some(id),
                urgent: false,
            });
            Ok(HttpResponse::Created().json(json!({"id": id, "healthy": false})))
        }
        Err(reason) => Err(GatewayError::Conflict(reason)),
    }
}

fn endpoint_id(path: &str) -> Result<usize, GatewayError> {
    path.parse().map_err(|_| GatewayError::InvalidField {
        field: "id",
        reason: format!("'{path}' is not an endpoint id"),
    })
}

fn found(existed: bool, id: usize) -> Result<HttpResponse, GatewayError> {
    if existed {
        Ok(HttpResponse::Ok().json(json!({"id": id})))
    } else {
        Err(GatewayError::NoSuchEndpoint(id))
    }
}

async fn remove(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, GatewayError> {
    authorize(&req, &state)?;
    let id = endpoint_id(&path)?;
    found(
        state
            .balancer
            .send(RemoveEndpoint(id))
            .await
            .map_err(unavailable)?,
        id,
    )
}

/// `POST /endpoints/{id}/drain` stops new requests to an endpoint while its in-flight ones
/// finish; `/undrain` lets it take traffic again.
async fn set_draining(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, GatewayError> {
    authorize(&req, &state)?;
    let (id, action) = path.into_inner();
    let drain = match action.as_str() {
        "drain" => true,
        "undrain" => false,
        _ => {
            return Err(GatewayError::UnknownRoute {
                method: req.method().to_string(),
                path: req.path().to_string(),
            })
        }
    };
    let id = endpoint_id(&id)?;
    let message = DrainEndpoint {
        endpoint: id,
        drain,
    };
    found(state.balancer.send(message).await.map_err(unavailable)?, id)
}

#[cfg(test)]
mod tests {
    use super::{digest, digests_equal};

    #[test]
    fn token_comparison() {
        let expected = digest(b"Bearer abc");
        assert!(digests_equal(&digest(b"Bearer abc"), &expected));
        assert!(!digests_equal(&digest(b"Bearer abd"), &expected));
        assert!(!digests_equal(&digest(b"Bearer ab"), &expected));
        assert!(!digests_equal(&digest(b""), &expected));
    }
}
