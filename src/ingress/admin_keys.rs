//! `/admin/keys` (create, list, read, update, revoke API keys) and `/admin/usage` (the usage
//! log, totalled). Behind the admin token like the rest of `/admin`. A key's secret is shown once,
//! in the answer that creates it; the database keeps only its SHA-256.

use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use nanogate_actors::keys::{new_secret, ApiKey, KeyError, KeyLimits, KeySource, StoredKey};
use nanogate_actors::store::{GroupBy, StoreError, UsageQuery};
use nanogate_actors::usage_log::Flush;
use serde::{Deserialize, Deserializer};
use serde_json::json;

use super::admin::{authorize, read_admin_body};
use super::AppState;
use crate::config::{key_limits, valid_key_name};
use crate::error::GatewayError;
use nanogate_actors::clock::unix_ms;

pub fn routes(scope: actix_web::Scope) -> actix_web::Scope {
    scope
        .route("/keys", web::get().to(list))
        .route("/keys", web::post().to(create))
        .route("/keys/{name}", web::get().to(one))
        .route("/keys/{name}", web::patch().to(update))
        .route("/keys/{name}", web::delete().to(revoke))
        .route("/usage", web::get().to(usage))
}

/// A new key: its name, and optionally its models and limits.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    name: String,
    #[serde(default)]
    models: Vec<String>,
    rpm: Option<i64>,
    tpm: Option<i64>,
    max_concurrent: Option<i64>,
    daily_tokens: Option<i64>,
}

/// A change to a key: a field left out stays as it is, `null` removes a limit.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyChange {
    models: Option<Vec<String>>,
    #[serde(default, deserialize_with = "present")]
    rpm: Option<Option<i64>>,
    #[serde(default, deserialize_with = "present")]
    tpm: Option<Option<i64>>,
    #[serde(default, deserialize_with = "present")]
    max_concurrent: Option<Option<i64>>,
    #[serde(default, deserialize_with = "present")]
    daily_tokens: Option<Option<i64>>,
}

/// A field that is present, possibly `null` (an absent one is `None` by `default`).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<i64>>, D::Error> {
    Option::<i64>::deserialize(d).map(Some)
}

fn registry(state: &AppState) -> Result<&nanogate_actors::keys::KeyRegistry, GatewayError> {
    state.keys.as_deref().ok_or_else(|| {
        GatewayError::Conflict("API keys are off: set [auth] mode = \"keys\" to use them".into())
    })
}

fn store_error(e: StoreError) -> GatewayError {
    match e {
        StoreError::Conflict(message) => GatewayError::Conflict(message),
        other => GatewayError::StoreUnavailable(other.to_string()),
    }
}

fn key_error(e: KeyError) -> GatewayError {
    match e {
        KeyError::Unknown(name) => GatewayError::NoSuchKey(name),
        other => GatewayError::Conflict(other.to_string()),
    }
}

fn limits(values: [Option<i64>; 4]) -> Result<KeyLimits, GatewayError> {
    key_limits(values, str::to_string).map_err(|e| GatewayError::InvalidField {
        field: "limits",
        reason: e.to_string(),
    })
}

fn check_models(models: &[String]) -> Result<(), GatewayError> {
    if models.len() > 1024 || models.iter().any(|m| m.is_empty() || m.len() > 256) {
        return Err(GatewayError::InvalidField {
            field: "models",
            reason: "at most 1024 names of 1 to 256 bytes each".into(),
        });
    }
    Ok(())
}

async fn list(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, GatewayError> {
    authorize(&req, &state)?;
    Ok(HttpResponse::Ok().json(json!({"keys": registry(&state)?.list()})))
}

async fn one(
    req: HttpRequest,
    state: web::Data<AppState>,
    name: web::Path<String>,
) -> Result<HttpResponse, GatewayError> {
    authorize(&req, &state)?;
    let key = registry(&state)?
        .get(&name)
        .ok_or_else(|| GatewayError::NoSuchKey(name.to_string()))?;
    let mut info = serde_json::to_value(key.info()).unwrap_or_default();
    info["rate_limits"] = rate_state(&key);
    Ok(HttpResponse::Ok().json(info))
}

fn rate_state(key: &ApiKey) -> serde_json::Value {
    let state = key.limiter.state();
    let window = |w: Option<nanogate_actors::limiter::Window>| {
        w.map(|w| json!({"limit": w.limit, "remaining": w.remaining, "reset_ms": w.reset.as_millis() as u64}))
    };
    json!({"requests": window(state.requests), "tokens": window(state.tokens)})
}

async fn create(
    req: HttpRequest,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, GatewayError> {
    authorize(&req, &state)?;
    let registry = registry(&state)?;
    let body = read_admin_body(&req, &state, payload).await?;
    let new: NewKey =
        serde_json::from_slice(&body).map_err(|e| GatewayError::BadJson(e.to_string()))?;
    if !valid_key_name(&new.name) {
        return Err(GatewayError::InvalidField {
            field: "name",
            reason: "1 to 64 letters, digits, '-', '_' or '.'".into(),
        });
    }
    check_models(&new.models)?;
    let limits = limits([new.rpm, new.tpm, new.max_concurrent, new.daily_tokens])?;
    if registry.get(&new.name).is_some() {
        return Err(key_error(KeyError::NameTaken(new.name)));
    }
    let store = state.store.as_ref().ok_or_else(|| {
        GatewayError::StoreUnavailable(
            "usage.database is off, and keys made here live in the database".into(),
        )
    })?;
    let secret = new_secret();
    let stored = StoredKey {
        name: new.name,
        secret_sha256: nanogate_actors::keys::digest(secret.as_bytes()),
        models: new.models,
        limits,
        created_ms: unix_ms(),
        revoked_ms: None,
    };
    store.insert_key(&stored).await.map_err(store_error)?;
    let key = ApiKey::new(stored, KeySource::Admin);
    let info = key.info();
    registry.insert_made(key).map_err(key_error)?;
    let mut answer = serde_json::to_value(info).unwrap_or_default();
    answer["secret"] = json!(secret);
    Ok(HttpResponse::Created().json(answer))
}

async fn update(
    req: HttpRequest,
    state: web::Data<AppState>,
    name: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, GatewayError> {
    authorize(&req, &state)?;
    let registry = registry(&state)?;
    let body = read_admin_body(&req, &state, payload).await?;
    let change: KeyChange =
        serde_json::from_slice(&body).map_err(|e| GatewayError::BadJson(e.to_string()))?;
    let old = registry
        .get(&name)
        .filter(|k| k.revoked_ms.is_none())
        .ok_or_else(|| GatewayError::NoSuchKey(name.to_string()))?;
    let keep =
        |change: Option<Option<i64>>, old: Option<u64>| change.unwrap_or(old.map(|v| v as i64));
    let limits = limits([
        keep(change.rpm, old.limits.rpm),
        keep(change.tpm, old.limits.tpm),
        keep(change.max_concurrent, old.limits.max_concurrent),
        keep(change.daily_tokens, old.limits.daily_tokens),
    ])?;
    let models = change.models.unwrap_or_else(|| old.models.clone());
    check_models(&models)?;
    if old.source == KeySource::Config {
        return Err(key_error(KeyError::FromConfig(name.to_string())));
    }
    let store = state
        .store
        .as_ref()
        .ok_or_else(|| GatewayError::StoreUnavailable("usage.database is off".into()))?;
    if !store
        .update_key(&name, &models, &limits)
        .await
        .map_err(store_error)?
    {
        return Err(GatewayError::NoSuchKey(name.to_string()));
    }
    let info = registry.update(&name, models, limits).map_err(key_error)?;
    Ok(HttpResponse::Ok().json(info))
}

async fn revoke(
    req: HttpRequest,
    state: web::Data<AppState>,
    name: web::Path<String>,
) -> Result<HttpResponse, GatewayError> {
    authorize(&req, &state)?;
    let registry = registry(&state)?;
    let key = registry
        .get(&name)
        .filter(|k| k.revoked_ms.is_none())
        .ok_or_else(|| GatewayError::NoSuchKey(name.to_string()))?;
    if key.source == KeySource::Config {
        return Err(key_error(KeyError::FromConfig(name.to_string())));
    }
    let at = unix_ms();
    // The database first, so that a revocation it did not take is not undone by a restart (the
    // caller gets a 503 and may try again); then refused from this moment on.
    if let Some(store) = &state.store {
        store.revoke_key(&name, at).await.map_err(store_error)?;
    }
    let info = match registry.revoke(&name, at) {
        Ok(info) => info,
        // The periodic sync read the revocation from the database first: it took effect.
        Err(KeyError::Unknown(_)) => registry
            .get(&name)
            .filter(|k| k.revoked_ms.is_some())
            .map(|k| k.info())
            .ok_or_else(|| GatewayError::NoSuchKey(name.to_string()))?,
        Err(e) => return Err(key_error(e)),
    };
    Ok(HttpResponse::Ok().json(info))
}

/// `GET /admin/usage?key=&model=&since=&until=&group_by=key|model|endpoint|hour`: totals from
/// the usage log. `since` and `until` are Unix milliseconds or UTC times like
/// `2026-11-28T09:00:00Z` (or a date). What the log still buffers is written first (up to 2 s).
async fn usage(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, GatewayError> {
    authorize(&req, &state)?;
    let store = state
        .store
        .as_ref()
        .ok_or_else(|| GatewayError::StoreUnavailable("usage.database is off".into()))?;
    let params = web::Query::<UsageParams>::from_query(req.query_string())
        .map_err(|e| GatewayError::InvalidField {
            field: "query",
            reason: e.to_string(),
        })?
        .into_inner();
    let query = UsageQuery {
        key: params.key,
        model: params.model,
        since_ms: params
            .since
            .as_deref()
            .map(|t| time_ms(t, "since"))
            .transpose()?,
        until_ms: params
            .until
            .as_deref()
            .map(|t| time_ms(t, "until"))
            .transpose()?,
        group_by: params.group_by,
    };
    if let Some(log) = &state.usage_log {
        for _ in 0..40 {
            match log.send(Flush).await {
                Ok(0) | Err(_) => break,
                Ok(_) => actix_rt::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
    let rows = store.usage_report(&query).await.map_err(store_error)?;
    Ok(HttpResponse::Ok().json(json!({
        "group_by": query.group_by.map(|g| format!("{g:?}").to_lowercase()),
        "rows": rows,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageParams {
    key: Option<String>,
    model: Option<String>,
    since: Option<String>,
    until: Option<String>,
    group_by: Option<GroupBy>,
}

/// Unix milliseconds, or `YYYY-MM-DD[THH:MM[:SS]Z]` in UTC.
fn time_ms(text: &str, field: &'static str) -> Result<i64, GatewayError> {
    let bad = || GatewayError::InvalidField {
        field,
        reason: format!(
            "'{text}' is neither Unix milliseconds nor a UTC time like 2026-11-28T09:00:00Z"
        ),
    };
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    let (date, time) = text.split_once('T').unwrap_or((text, "00:00:00Z"));
    let time = time.strip_suffix('Z').ok_or_else(bad)?;
    let number = |s: &str| s.parse::<i64>().map_err(|_| bad());
    let mut d = date.split('-');
    let (y, m, day) = (
        number(d.next().ok_or_else(bad)?)?,
        number(d.next().ok_or_else(bad)?)?,
        number(d.next().ok_or_else(bad)?)?,
    );
    let mut t = time.split(':');
    let h = number(t.next().ok_or_else(bad)?)?;
    let min = number(t.next().unwrap_or("0"))?;
    let sec = number(t.next().unwrap_or("0"))?;
    // Years bounded so the arithmetic below cannot overflow.
    if d.next().is_some()
        || !(0..=9999).contains(&y)
        || !(1..=12).contains(&m)
        || !(1..=31).contains(&day)
        || !(0..=23).contains(&h)
        || !(0..=59).contains(&min)
        || !(0..=60).contains(&sec)
    {
        return Err(bad());
    }
    Ok(((days_from_civil(y, m, day) * 24 + h) * 60 + min) * 60_000 + sec * 1000)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_unix_milliseconds_or_utc() {
        assert_eq!(
            time_ms("1764288000000", "since").unwrap(),
            1_764_288_000_000
        );
        assert_eq!(time_ms("1970-01-02", "since").unwrap(), 86_400_000);
        assert_eq!(
            time_ms("2026-11-28T01:02:03Z", "since").unwrap(),
            1_795_827_723_000
        );
        assert!(time_ms("yesterday", "since").is_err());
        assert!(time_ms("300000000000000-01-01", "since").is_err());
        assert!(time_ms("2026-11-28T-5:00:00Z", "since").is_err());
        assert!(time_ms("2026-13-01", "since").is_err());
    }
}
