//! The simulator's HTTP surface: vLLM's OpenAI endpoints, `/health`, `/metrics`, and the
//! `/sim/*` control routes a separate `nanogate simulate` process is steered through
//! (`/sim/stats`, `/sim/flush` to start a benchmark run cold, and the fault switches).
//!
//! "Down" and "hang" are applied by one gate middleware in front of every non-`/sim/` route,
//! so even an unknown path or `/health` behaves like a dead or stuck server.

use std::{
    sync::{atomic::Ordering::Relaxed, Arc},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use actix_web::{
    body::{BoxBody, MessageBody},
    dev::{ServiceRequest, ServiceResponse},
    http::{header, StatusCode},
    middleware::Next,
    web::{self, Bytes},
    HttpResponse,
};
use futures_util::StreamExt;
use rand::Rng;

use super::{
    control::{SimControl, Ticket},
    engine::{time_to_first_token, Engine, Outage, Plan, Sequence, Step},
    faults::{self, Fault},
    metrics, sse,
    wire::{self, Kind, Meta},
};

type Sim = web::Data<Engine>;

/// Prompts of long-context models run to megabytes; actix's 256 KiB default would reject them.
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// Registers every route and the data they share.
pub fn configure(engine: Sim) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(engine)
            .app_data(web::PayloadConfig::new(MAX_BODY_BYTES))
            .service(endpoint("/v1/chat/completions", web::post().to(chat)))
            .service(endpoint("/v1/completions", web::post().to(completions)))
            .service(endpoint("/v1/embeddings", web::post().to(embeddings)))
            .service(endpoint("/v1/models", web::get().to(models)))
            .service(endpoint("/health", web::get().to(health)))
            .service(endpoint("/metrics", web::get().to(prometheus)))
            .service(endpoint("/sim/stats", web::get().to(sim_stats)))
            // Before `/sim/{switch}`, which would otherwise take it.
            .service(endpoint("/sim/flush", web::post().to(sim_flush)))
            .service(endpoint("/sim/{switch}", web::post().to(sim_switch)))
            .default_service(web::to(not_found));
    }
}

/// A path with one method; the others get an OpenAI-shaped 405 rather than actix's empty one.
fn endpoint(path: &str, route: actix_web::Route) -> actix_web::Resource {
    web::resource(path)
        .route(route)
        .default_service(web::to(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed",
                "invalid_request_error",
                None,
            )
        }))
}

/// Makes the whole server (except `/sim/*`) look hung or down.
pub async fn gate(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    if !req.path().starts_with("/sim/") {
        if let Some(engine) = req.app_data::<Sim>() {
            let control = Arc::clone(engine.control());
            wait_while_hung(&control).await;
            if control.switches().down {
                return Ok(req.into_response(server_down()));
            }
        }
    }
    Ok(next.call(req).await?.map_into_boxed_body())
}

/// Returns once hang is off, or the server went down (a dead server does not keep hanging).
async fn wait_while_hung(control: &SimControl) {
    if control.switches().hang {
        // An error means the simulator is being dropped; nothing is left to wait for.
        let _ = control.subscribe().wait_for(|s| !s.hang || s.down).await;
    }
}

async fn chat(sim: Sim, body: Bytes) -> HttpResponse {
    generate(sim.into_inner(), &body, Kind::Chat).await
}

async fn completions(sim: Sim, body: Bytes) -> HttpResponse {
    generate(sim.into_inner(), &body, Kind::Completion).await
}

async fn generate(engine: Arc<Engine>, body: &[u8], kind: Kind) -> HttpResponse {
    let outage = engine.outage();
    if engine.control().switches().garbage {
        return garbage(engine.control());
    }
    let request = match wire::parse_generation(body, kind) {
        Ok(request) => request,
        Err(message) => return bad_request(&message),
    };
    if !engine.cfg().models.contains(&request.model) {
        return model_not_found(&request.model);
    }
    if request.stream {
        if let Some(broken) = broken_stream(engine.control()) {
            return broken;
        }
    }
    let mut ticket = Ticket::new(Arc::clone(engine.control()));
    let (spike, outage) = match suffer_fault(&engine, &mut ticket, outage).await {
        Ok(ready) => ready,
        Err(response) => return response,
    };
    let completion_tokens = request
        .max_tokens
        .unwrap_or(engine.cfg().default_max_tokens);
    let mut meta = Meta {
        kind,
        id: new_id(kind.id_prefix()),
        created: unix_now(),
        model: request.model,
        prompt_tokens: request.prompt_tokens,
        completion_tokens,
        finish_reason: if request.max_tokens.is_some() {
            "length"
        } else {
            "stop"
        },
        include_usage: request.include_usage,
        choices: request.choices,
        cached_tokens: 0,
    };
    let plan = Plan {
        prompt_tokens: request.prompt_tokens,
        prefix_blocks: request.prefix_blocks,
        completion_tokens,
        spike,
    };
    let mut sequence = Sequence::new(engine, plan, ticket, outage);
    if request.stream {
        return HttpResponse::Ok()
            .content_type("text/event-stream; charset=utf-8")
            .insert_header((header::CACHE_CONTROL, "no-cache"))
            .streaming(sse::token_stream(sequence, meta));
    }
    loop {
        match sequence.next().await {
            Ok(Step::Token(_)) => {}
            Ok(Step::Done) => break,
            Err(_) => return server_down(),
        }
    }
    meta.cached_tokens = sequence.cached_tokens();
    json(StatusCode::OK, wire::completion_body(&meta))
}

async fn embeddings(sim: Sim, body: Bytes) -> HttpResponse {
    let engine = sim.into_inner();
    let outage = engine.outage();
    if engine.control().switches().garbage {
        return garbage(engine.control());
    }
    let request = match wire::parse_embedding(&body) {
        Ok(request) => request,
        Err(message) => return bad_request(&message),
    };
    if !engine.cfg().models.contains(&request.model) {
        return model_not_found(&request.model);
    }
    let mut ticket = Ticket::new(Arc::clone(engine.control()));
    let (spike, mut outage) = match suffer_fault(&engine, &mut ticket, outage).await {
        Ok(ready) => ready,
        Err(response) => return response,
    };
    // Embedding models are small and unbatched here: a fixed overhead, scaled by speed.
    let delay = time_to_first_token(engine.cfg(), 0) + spike;
    if outage.guard(tokio::time::sleep(delay)).await.is_err() {
        ticket.fail();
        return server_down();
    }
    let tokens = request.inputs.iter().map(|(_, n)| u64::from(*n)).sum();
    engine
        .control()
        .counters
        .prompt_tokens
        .fetch_add(tokens, Relaxed);
    ticket.complete();
    json(StatusCode::OK, wire::embedding_body(&request))
}

/// Draws this request's fault and acts it out: `Err` is the answer to give (500, or 503 when a
/// hung request is ended by an outage), `Ok` carries the latency spike to add.
async fn suffer_fault(
    engine: &Engine,
    ticket: &mut Ticket,
    mut outage: Outage,
) -> Result<(Duration, Outage), HttpResponse> {
    let error_rate = engine.control().error_rate();
    match faults::with_rng(|rng| faults::draw(rng, engine.cfg(), error_rate)) {
        Fault::None => Ok((Duration::ZERO, outage)),
        Fault::Spike(spike) => Ok((spike, outage)),
        Fault::Error => {
            ticket.fail();
            Err(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "simulated GPU error",
                "server_error",
                None,
            ))
        }
        Fault::Hang => {
            // Only an outage ends a hang; a client giving up drops this future, and the ticket
            // then counts it as cancelled.
            let _ = outage.guard(std::future::pending::<()>()).await;
            ticket.fail();
            Err(server_down())
        }
    }
}

async fn models(sim: Sim) -> HttpResponse {
    json(
        StatusCode::OK,
        wire::models_body(&sim.cfg().models, unix_now()),
    )
}

/// vLLM answers an empty 200; probes must not expect JSON.
async fn health() -> HttpResponse {
    HttpResponse::Ok().finish()
}

async fn prometheus(sim: Sim) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(metrics::render(sim.cfg(), sim.control()))
}

async fn sim_stats(sim: Sim) -> HttpResponse {
    json(
        StatusCode::OK,
        serde_json::to_vec(&sim.control().snapshot()),
    )
}

/// Empties the prefix cache and zeroes the counters; answers the (zeroed) stats.
async fn sim_flush(sim: Sim) -> HttpResponse {
    sim.flush();
    sim_stats(sim).await
}

/// `POST /sim/{down,up,hang,unhang,garbage,ungarbage,stall,unstall,reset,unreset}`; answers
/// the switches now in force.
async fn sim_switch(sim: Sim, switch: web::Path<String>) -> HttpResponse {
    let control = sim.control();
    match switch.as_str() {
        "down" => control.set_down(true),
        "up" => control.set_down(false),
        "hang" => control.set_hang(true),
        "unhang" => control.set_hang(false),
        "garbage" => control.set_garbage(true),
        "ungarbage" => control.set_garbage(false),
        "stall" => control.set_stall(true),
        "unstall" => control.set_stall(false),
        "reset" => control.set_reset(true),
        "unreset" => control.set_reset(false),
        _ => return not_found().await,
    }
    json(StatusCode::OK, serde_json::to_vec(&control.switches()))
}

async fn not_found() -> HttpResponse {
    error(
        StatusCode::NOT_FOUND,
        "not found",
        "invalid_request_error",
        None,
    )
}

fn bad_request(message: &str) -> HttpResponse {
    error(
        StatusCode::BAD_REQUEST,
        message,
        "invalid_request_error",
        None,
    )
}

fn model_not_found(model: &str) -> HttpResponse {
    error(
        StatusCode::NOT_FOUND,
        &format!("The model `{model}` does not exist."),
        "invalid_request_error",
        Some("model_not_found"),
    )
}

/// 503 on a closing connection: the simulated server is dead, so nothing is kept alive.
fn server_down() -> HttpResponse {
    let mut response = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "simulated GPU server is down",
        "server_error",
        None,
    );
    response
        .head_mut()
        .set_connection_type(actix_web::http::ConnectionType::Close);
    response
}

/// With the stall or reset switch on, a stream's 200 head whose body never sends a byte or is
/// cut at once. The ticket lives in the body, so the request counts as cancelled when the client
/// gives up on a stall and as an error on a reset.
fn broken_stream(control: &Arc<SimControl>) -> Option<HttpResponse> {
    let switches = control.switches();
    if !(switches.stall || switches.reset) {
        return None;
    }
    let mut ticket = Ticket::new(Arc::clone(control));
    let body: futures_util::stream::BoxStream<'static, Result<Bytes, sse::StreamError>> =
        if switches.reset {
            ticket.fail();
            Box::pin(futures_util::stream::once(async move {
                drop(ticket);
                Err(sse::StreamError::Cut(super::engine::Cut))
            }))
        } else {
            Box::pin(
                futures_util::stream::pending().map(move |item: Result<Bytes, _>| {
                    let _held = &ticket;
                    item
                }),
            )
        };
    Some(
        HttpResponse::Ok()
            .content_type("text/event-stream; charset=utf-8")
            .insert_header((header::CACHE_CONTROL, "no-cache"))
            .streaming(body),
    )
}

/// A 200 that is not JSON, as from a misconfigured proxy; counted as an error it caused.
fn garbage(control: &Arc<SimControl>) -> HttpResponse {
    Ticket::new(Arc::clone(control)).fail();
    HttpResponse::Ok()
        .content_type("text/html")
        .body("<html>garbage")
}

fn error(status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> HttpResponse {
    json(status, wire::error_body(message, kind, code))
}

fn json(status: StatusCode, body: serde_json::Result<Vec<u8>>) -> HttpResponse {
    match body {
        Ok(body) => HttpResponse::build(status)
            .content_type("application/json")
            .body(body),
        Err(e) => HttpResponse::InternalServerError()
            .content_type("text/plain")
            .body(format!("simulator could not encode its answer: {e}")),
    }
}

/// `chatcmpl-` / `cmpl-` plus 32 hex digits, like vLLM's uuid-based ids.
fn new_id(prefix: &str) -> String {
    let (high, low): (u64, u64) = faults::with_rng(|rng| (rng.gen(), rng.gen()));
    format!("{prefix}{high:016x}{low:016x}")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
