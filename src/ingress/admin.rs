//! `/admin/endpoints`: list, add, remove and drain backends at runtime (and, in [`admin_keys`],
//! `/admin/keys` and `/admin/usage`). Behind a bearer token
//! (`[admin] token`, better given as `NANOGATE__ADMIN__TOKEN`); without a configured token the
//! routes do not exist (404), so an operator cannot leave them open by accident.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use nanogate_actors::balancer::{AddEndpoint, DrainEndpoint, ListEndpoints, RemoveEndpoint};
use nanogate_actors::endpoint::EndpointSpec;
use nanogate_actors::health_checker::ProbeNow;
use nanogate_actors::keys::{constant_time_eq, digest};
use serde_json::json;

use super::connections::admit;
use super::request::{read_body, BodyLimits};
use super::{admin_keys, AppState};
use crate::config::check_endpoint;
use crate::error::GatewayError;

pub fn routes(cfg: &mut web::ServiceConfig) {
    let scope = web::scope("/admin")
        .route("/endpoints", web::get().to(list))
        .route("/endpoints", web::post().to(add))
        .route("/endpoints/{id}", web::delete().to(remove))
        .route("/endpoints/{id}/{action}", web::post().to(set_draining));
    cfg.service(admin_keys::routes(scope));
}

/// The admin routes are off without a token, and refuse a request without the right one.
pub(super) fn authorize(req: &HttpRequest, state: &AppState) -> Result<(), GatewayError> {
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
    if constant_time_eq(&digest(given), expected) {
        Ok(())
    } else {
        Err(GatewayError::Unauthorized)
    }
}

/// An admin request's JSON body, at most [`MAX_ADMIN_BODY`] bytes.
pub(super) async fn read_admin_body(
    req: &HttpRequest,
    state: &AppState,
    payload: web::Payload,
) -> Result<bytes::Bytes, GatewayError> {
    admit(req)?;
    let limits = BodyLimits {
        max_bytes: MAX_ADMIN_BODY,
        ..state.body_limits.clone()
    };
    Ok(read_body(req.headers(), payload, &limits).await?.0)
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
    authorize(&req, &state)?;
    let body = read_admin_body(&req, &state, payload).await?;
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
