//! Real backends and clients as they are: each test's backend reproduces the wire behaviour of a
//! named real server (DESIGN.md lists their quirks), and each client request what real SDKs send,
//! over real HTTP.

mod common;

use std::time::{Duration, Instant};

use common::fake::{Fake, FakeResponse};
use common::*;
use nanogate::config::Config;
use nanogate_actors::endpoint::{EndpointSpec, Probe};
use nanogate_actors::policy::PolicyKind;
use serde_json::{json, Value};

const ANSWER: &str = r#"{"id":"c","object":"chat.completion","created":1,"model":"sim","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;

fn models(ids: &[&str]) -> String {
    let data: Vec<Value> = ids
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "x"}))
        .collect();
    json!({"object": "list", "data": data}).to_string()
}

/// A gateway in front of `urls`, each serving the model named beside it (or learning its models
/// when `None`), probed every 100 ms.
fn fleet(urls: &[(&str, Option<&str>)]) -> Config {
    let mut config = config(&[]);
    config.endpoints = urls
        .iter()
        .map(|(url, model)| {
            let mut spec = EndpointSpec::new(*url);
            spec.models = model.iter().map(|m| m.to_string()).collect();
            spec
        })
        .collect();
    config
}

fn chat_url(gw: &nanogate::gateway::Gateway) -> String {
    format!("{}/v1/chat/completions", gw.url())
}

async fn healthy(client: &awc::Client, gw: &nanogate::gateway::Gateway) -> Vec<bool> {
    stats(client, gw).await["balancer"]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["healthy"] == true)
        .collect()
}

#[actix_rt::test]
async fn backends_without_health_routes_stay_in_rotation() {
    // mockllm (FastAPI): no /health, no /v1/models, JSON 404 for unknown routes.
    let mockllm = Fake::start(|r| match r.path.as_str() {
        "/v1/chat/completions" => FakeResponse::json(200, ANSWER),
        _ => FakeResponse::json(404, r#"{"detail":"Not Found"}"#),
    });
    // Ollama: "404 page not found" in text for /health, an OpenAI /v1/models, "Ollama is running".
    let ollama = Fake::start(|r| match r.path.as_str() {
        "/v1/chat/completions" => FakeResponse::json(200, ANSWER),
        "/v1/models" => FakeResponse::json(200, models(&["sim"])),
        "/" => FakeResponse::new(200, "text/plain", "Ollama is running"),
        "/api/version" => FakeResponse::json(200, r#"{"version":"0.5.7"}"#),
        _ => FakeResponse::new(404, "text/plain", "404 page not found"),
    });
    // vLLM and TGI: /health is an empty 200.
    let vllm = Fake::start(|r| match r.path.as_str() {
        "/health" => FakeResponse::empty(200),
        "/v1/chat/completions" => FakeResponse::json(200, ANSWER),
        _ => FakeResponse::json(404, r#"{"detail":"Not Found"}"#),
    });
    // llama.cpp's llama-server: /health answers {"status":"ok"}.
    let llama = Fake::start(|r| match r.path.as_str() {
        "/health" => FakeResponse::json(200, r#"{"status":"ok"}"#),
        "/v1/chat/completions" => FakeResponse::json(200, ANSWER),
        _ => FakeResponse::json(404, r#"{"error":{"code":404,"message":"File Not Found"}}"#),
    });
    let mut cfg = fleet(&[
        (&mockllm.url, Some("sim")),
        (&ollama.url, Some("sim")),
        (&vllm.url, Some("sim")),
        (&llama.url, Some("sim")),
        (&ollama.url.replace("127.0.0.1", "localhost"), Some("sim")),
    ]);
    cfg.endpoints[4].probe = Probe::Path("/api/version".into());
    cfg.balancer.policy = PolicyKind::RoundRobin;
    cfg.health.load_interval_ms = 100;
    let gw = gateway(cfg).await;
    let client = client();
    actix_rt::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(healthy(&client, &gw).await, vec![true; 5]);
    for _ in 0..10 {
        let answer = post(&client, &chat_url(&gw), &chat(2)).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    let probes = stats(&client, &gw).await["health"]["endpoints"].clone();
    let resolved: Vec<&str> = probes
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["resolved"].as_str().unwrap_or("-"))
        .collect();
    assert_eq!(
        resolved,
        ["any_answer", "models", "health", "health", "-"],
        "{probes}"
    );
    for fake in [&mockllm, &ollama, &vllm, &llama] {
        for probe in fake.requests().iter().filter(|r| r.method == "GET") {
            assert!(
                probe.header("content-length").is_none(),
                "a GET probe carries no Content-Length: {probe:?}"
            );
        }
        assert!(
            fake.on("/metrics").len() <= 2,
            "a /metrics that 404s is not read every 100 ms: {}",
            fake.on("/metrics").len()
        );
    }
    gw.stop(false).await;
}

#[actix_rt::test]
async fn a_tcp_probe_or_a_named_path_decides_health() {
    let refusing = Fake::start(|_| FakeResponse::json(500, r#"{"error":"no"}"#));
    let mut cfg = fleet(&[(&refusing.url, Some("sim")), (&refusing.url, Some("sim"))]);
    cfg.endpoints[0].probe = Probe::Tcp;
    cfg.endpoints[1].probe = Probe::Path("/status".into());
    cfg.endpoints[1].url.push('/');
    let gw = gateway(cfg).await;
    let client = client();
    actix_rt::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(healthy(&client, &gw).await, vec![true, false]);
    assert!(refusing.on("/status").len() >= 2);
    gw.stop(false).await;
}

fn responses_stream(complete: bool) -> Vec<String> {
    let mut frames = vec![
        "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"in_progress\"}}\n\n".to_string(),
        "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":1,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"Hi\"}\n\n".to_string(),
    ];
    if complete {
        frames.push("event: response.completed\ndata: {\"type\":\"response.completed\",\"sequence_number\":2,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"completed\",\"output\":[]}}\n\n".to_string());
    }
    frames
}

fn messages_stream() -> Vec<String> {
    vec![
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[]}}\n\n".to_string(),
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n".to_string(),
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":1}}\n\n".to_string(),
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".to_string(),
    ]
}

#[actix_rt::test]
async fn responses_and_messages_streams_end_by_their_own_rules_and_route_by_model() {
    // OpenAI's Responses API (vLLM serves it too) and Anthropic's Messages API (vLLM, SGLang).
    let responses = Fake::start(|r| {
        let complete = r.json()["input"] != "cut";
        FakeResponse::sse(responses_stream(complete), true)
    });
    let messages = Fake::start(|_| FakeResponse::sse(messages_stream(), true));
    let mut cfg = fleet(&[
        (&responses.url, Some("gpt-sim")),
        (&messages.url, Some("claude-sim")),
    ]);
    cfg.health.interval_ms = 60_000;
    let gw = gateway(cfg).await;
    let client = client();
    for _ in 0..5 {
        let answer = post(
            &client,
            &format!("{}/v1/responses", gw.url()),
            &json!({"model": "gpt-sim", "input": "hello", "stream": true}),
        )
        .await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.header("x-nanogate-endpoint").as_deref(), Some("0"));
        assert_eq!(
            answer.text(),
            responses_stream(true).concat(),
            "passed as is"
        );
        let answer = post(
            &client,
            &format!("{}/v1/messages", gw.url()),
            &json!({"model": "claude-sim", "max_tokens": 8, "stream": true,
                    "messages": [{"role": "user", "content": "hello"}]}),
        )
        .await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.header("x-nanogate-endpoint").as_deref(), Some("1"));
        assert_eq!(answer.text(), messages_stream().concat(), "passed as is");
    }
    let s = stats(&client, &gw).await;
    for endpoint in s["balancer"]["endpoints"].as_array().unwrap() {
        assert_eq!(endpoint["circuit"], "closed", "{endpoint}");
        assert_eq!(endpoint["consecutive_failures"], 0, "{endpoint}");
    }
    let cut = post(
        &client,
        &format!("{}/v1/responses", gw.url()),
        &json!({"model": "gpt-sim", "input": "cut", "stream": true}),
    )
    .await;
    let text = cut.text();
    assert!(
        text.ends_with("event: error\ndata: {\"type\":\"error\",\"code\":\"upstream_stream_error\",\"message\":\"the backend failed while streaming the response\",\"param\":null,\"sequence_number\":0}\n\n"),
        "a Responses stream cut before response.completed ends with the API's error event: {text}"
    );
    let missing = post(
        &client,
        &format!("{}/v1/messages", gw.url()),
        &json!({"model": "claude-sim", "max_tokens": 8}),
    )
    .await;
    assert_eq!(missing.status, 400);
    assert_eq!(missing.json()["error"]["param"], "messages");
    gw.stop(false).await;
}

#[actix_rt::test]
async fn the_sdks_timeouts_limit_what_the_sdks_limit_and_never_count_against_the_backend() {
    let slow = Fake::start(|r| {
        if r.path == "/health" {
            FakeResponse::empty(200)
        } else if r.json()["stream"] == true {
            // A stream whose whole answer takes 1.5 s, a chunk every 300 ms.
            let mut frames: Vec<(Duration, Vec<u8>)> = (0..5)
                .map(|i| {
                    let chunk = format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{i}\"}}}}]}}\n\n");
                    (Duration::from_millis(300), chunk.into_bytes())
                })
                .collect();
            frames.push((Duration::ZERO, b"data: [DONE]\n\n".to_vec()));
            FakeResponse {
                status: 200,
                headers: vec![("content-type".into(), "text/event-stream".into())],
                body: common::fake::FakeBody::Chunked {
                    pieces: frames,
                    complete: true,
                },
                delay: Duration::ZERO,
            }
        } else {
            FakeResponse::json(200, ANSWER).after(Duration::from_secs(2))
        }
    });
    let gw = gateway(fleet(&[(&slow.url, Some("sim"))])).await;
    let client = client();
    for _ in 0..4 {
        let started = Instant::now();
        let mut response = client
            .post(chat_url(&gw))
            .insert_header(("x-stainless-read-timeout", "0.5"))
            .send_json(&chat(2))
            .await
            .unwrap();
        assert_eq!(response.status(), 504);
        assert!(started.elapsed() < Duration::from_millis(1500));
        let body: Value = response.json().await.unwrap();
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("750 ms"),
            "the SDK's 0.5 s and the grace: {message}"
        );
    }
    let endpoint = stats(&client, &gw).await["balancer"]["endpoints"][0].clone();
    assert_eq!(
        (
            endpoint["circuit"].as_str(),
            endpoint["consecutive_failures"].as_u64()
        ),
        (Some("closed"), Some(0)),
        "the client's timeout is not the backend's failure: {endpoint}"
    );
    let mut stream = client
        .post(chat_url(&gw))
        .insert_header(("x-stainless-read-timeout", "0.5"))
        .send_json(&chat_stream(5))
        .await
        .unwrap();
    let text = String::from_utf8(stream.body().await.unwrap().to_vec()).unwrap();
    assert!(
        text.ends_with("data: [DONE]\n\n"),
        "each read came within 0.5 s, so the 1.5 s stream is whole: {text}"
    );
    // openai-node sends its `timeout` as x-stainless-timeout and clears it once the head is in:
    // the 1.5 s stream outlasts a 1 s timeout whole, and a 2 s answer's head does not come in it.
    let mut stream = client
        .post(chat_url(&gw))
        .insert_header(("x-stainless-timeout", "1"))
        .send_json(&chat_stream(5))
        .await
        .unwrap();
    let text = String::from_utf8(stream.body().await.unwrap().to_vec()).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let started = Instant::now();
    let response = client
        .post(chat_url(&gw))
        .insert_header(("x-stainless-timeout", "1"))
        .send_json(&chat(2))
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    assert!(started.elapsed() < Duration::from_millis(1900));
    gw.stop(false).await;
}

/// A backend that stores its Responses API answers in its own process, as Ollama does: it knows
/// only the ids it made, and answers 404 `previous_response_not_found` for any other.
fn storing_backend(name: &'static str) -> Fake {
    let stored = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    Fake::start(move |r| {
        let mut stored = stored.lock().unwrap();
        let missing = |id: &str| {
            FakeResponse::json(
                404,
                format!(
                    r#"{{"error":{{"message":"Previous response with id '{id}' not found.","type":"invalid_request_error","param":"previous_response_id","code":"previous_response_not_found"}}}}"#
                ),
            )
        };
        if r.path == "/health" {
            return FakeResponse::empty(200);
        }
        if let Some(id) = r.path.strip_prefix("/v1/responses/") {
            return match stored.iter().any(|s| s == id) {
                true => FakeResponse::json(200, format!(r#"{{"id":"{id}","object":"response"}}"#)),
                false => missing(id),
            };
        }
        if let Some(previous) = r.json()["previous_response_id"].as_str() {
            if !stored.iter().any(|s| s == previous) {
                return missing(previous);
            }
        }
        let id = format!("resp_{name}_{}", stored.len());
        stored.push(id.clone());
        FakeResponse::json(
            200,
            format!(r#"{{"id":"{id}","object":"response","status":"completed","output":[]}}"#),
        )
    })
}

#[actix_rt::test]
async fn a_stored_response_is_continued_and_read_where_it_was_made() {
    let (a, b) = (storing_backend("a"), storing_backend("b"));
    let mut cfg = fleet(&[(&a.url, Some("sim")), (&b.url, Some("sim"))]);
    cfg.balancer.policy = PolicyKind::RoundRobin;
    let gw = gateway(cfg).await;
    let client = client();
    let url = format!("{}/v1/responses", gw.url());
    let first = post(&client, &url, &json!({"model": "sim", "input": "hi"})).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let mut id = first.json()["id"].as_str().unwrap().to_string();
    for turn in 0..6 {
        let next = post(
            &client,
            &url,
            &json!({"model": "sim", "input": format!("turn {turn}"), "previous_response_id": id}),
        )
        .await;
        assert_eq!(next.status, 200, "turn {turn}: {}", next.text());
        id = next.json()["id"].as_str().unwrap().to_string();
    }
    for _ in 0..4 {
        let read = get(&client, &format!("{url}/{id}")).await;
        assert_eq!(read.status, 200, "{}", read.text());
    }
    gw.stop(false).await;
}

#[actix_rt::test]
async fn a_backends_cors_headers_do_not_reach_browsers_the_gateway_refuses() {
    // vLLM answers every request with `access-control-allow-origin: *` unless told otherwise.
    let vllm = Fake::start(|r| {
        if r.path == "/health" {
            return FakeResponse::empty(200);
        }
        let mut answer = FakeResponse::json(200, ANSWER);
        answer
            .headers
            .push(("access-control-allow-origin".into(), "*".into()));
        answer
    });
    let gw = gateway(fleet(&[(&vllm.url, Some("sim"))])).await;
    let response = client()
        .post(chat_url(&gw))
        .insert_header(("origin", "https://elsewhere.example"))
        .send_json(&chat(2))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none(),
        "[cors] is off: no page on another origin may read the answer"
    );
    gw.stop(false).await;
}

#[actix_rt::test]
async fn a_refusal_that_follows_the_request_stops_retrying_and_ejects_nobody() {
    // guidellm's mock server answers 500 to a prompt it cannot take, mockllm in text/plain.
    let refuse = |r: &common::fake::FakeRequest| {
        if r.json()["messages"][0]["content"].is_array() {
            FakeResponse::new(500, "text/plain", "Internal Server Error")
        } else {
            FakeResponse::json(200, ANSWER)
        }
    };
    let (a, b) = (Fake::start(refuse), Fake::start(refuse));
    let mut cfg = fleet(&[(&a.url, Some("sim")), (&b.url, Some("sim"))]);
    cfg.balancer.policy = PolicyKind::RoundRobin;
    cfg.health.interval_ms = 60_000;
    let gw = gateway(cfg).await;
    let client = client();
    let bad = json!({"model": "sim", "messages": [{"role": "user", "content": ["not", "text"]}]});
    for _ in 0..6 {
        let answer = post(&client, &chat_url(&gw), &bad).await;
        assert_eq!(answer.status, 500, "the backend's own status");
        assert_eq!(answer.text(), "Internal Server Error", "and body");
        assert_eq!(answer.header("content-type").as_deref(), Some("text/plain"));
    }
    let chats = a.on("/v1/chat/completions").len() + b.on("/v1/chat/completions").len();
    assert_eq!(chats, 12, "each request tried two backends, no more");
    let s = stats(&client, &gw).await;
    for endpoint in s["balancer"]["endpoints"].as_array().unwrap() {
        assert_eq!(endpoint["circuit"], "closed", "{endpoint}");
        assert_eq!(endpoint["consecutive_failures"], 0, "{endpoint}");
    }
    assert_eq!(post(&client, &chat_url(&gw), &chat(2)).await.status, 200);
    gw.stop(false).await;

    // One backend alone: its refusal is passed on as it is, not turned into a 502.
    let gw = gateway(fleet(&[(&a.url, Some("sim"))])).await;
    let answer = post(&client, &chat_url(&gw), &bad).await;
    assert_eq!(
        (answer.status.as_u16(), answer.text().as_str()),
        (500, "Internal Server Error")
    );
    gw.stop(false).await;
}

/// What `promtool check metrics` checks of the classic format: every sample belongs to a family
/// declared with `# HELP` and `# TYPE` before it, counters' samples are named as their family.
fn check_classic_exposition(text: &str) {
    let mut families: Vec<(String, String)> = Vec::new();
    let mut helped = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.insert(rest.split(' ').next().unwrap().to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(helped.contains(name), "no HELP for {name}");
            if kind == "counter" {
                assert!(name.ends_with("_total"), "counter {name} lacks _total");
            }
            families.push((name.to_string(), kind.to_string()));
        } else if line.starts_with('#') {
            panic!("an OpenMetrics-only line in the classic format: {line}");
        } else if !line.is_empty() {
            let sample = line.split(['{', ' ']).next().unwrap();
            let (family, kind) = families.last().expect("a sample before any TYPE");
            let fits = match kind.as_str() {
                "histogram" => [
                    format!("{family}_bucket"),
                    format!("{family}_sum"),
                    format!("{family}_count"),
                ]
                .contains(&sample.to_string()),
                _ => sample == family,
            };
            assert!(fits, "sample {sample} under family {family} ({kind})");
        }
    }
}

#[actix_rt::test]
async fn metrics_serve_each_format_with_its_content_type_and_count_what_operators_need() {
    let backends = sims(vec![fast()]).await;
    let gw = gateway(config(&backends)).await;
    let client = client();
    let url = chat_url(&gw);
    for _ in 0..3 {
        assert_eq!(post(&client, &url, &chat(2)).await.status, 200);
    }
    for _ in 0..2 {
        assert_eq!(post(&client, &url, &chat_stream(2)).await.status, 200);
    }
    assert_eq!(post_raw(&client, &url, "{").await.status, 400);
    let settled = eventually(Duration::from_secs(2), || async {
        stats(&client, &gw).await["metrics"]["overall"]["requests"] == 6
    })
    .await;
    assert!(settled);
    let s = stats(&client, &gw).await;
    let overall = &s["metrics"]["overall"];
    assert_eq!(
        overall["errors"], 0,
        "a client error is not a failure: {overall}"
    );
    assert_eq!(overall["client_errors"], 1);
    assert_eq!(overall["by_cause"]["client_error"], 1);
    assert_eq!(overall["ttft_ms"]["count"], 2, "TTFT is for streams only");
    assert_eq!(overall["last_minute"]["requests"], 6);
    assert!(overall["last_minute"]["latency_ms"]["p99"].is_number());
    assert!(s["balancer"]["endpoints"][0]["ejections_total"].is_number());
    assert!(s["balancer"]["retry_budget"]["retries"].is_number());

    let classic = get(&client, &format!("{}/metrics", gw.url())).await;
    assert_eq!(
        classic.header("content-type").as_deref(),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = classic.text();
    check_classic_exposition(&text);
    for needle in [
        "# TYPE nanogate_requests_total counter",
        "# TYPE nanogate_pool_refused_total counter",
        "# TYPE nanogate_metrics_dropped_observations_total counter",
        "nanogate_request_errors_total{cause=\"client_error\"} 1",
        "le=\"600.0\"",
    ] {
        assert!(text.contains(needle), "/metrics lacks {needle}:\n{text}");
    }
    let ttft_count = text
        .lines()
        .find(|l| l.starts_with("nanogate_time_to_first_token_seconds_count{endpoint=\"http"))
        .unwrap();
    assert!(ttft_count.ends_with(" 2"), "{ttft_count}");

    let mut openmetrics = client
        .get(format!("{}/metrics", gw.url()))
        .insert_header(("accept", "application/openmetrics-text; version=1.0.0"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        openmetrics.headers().get("content-type").unwrap(),
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let body = openmetrics.body().await.unwrap();
    assert!(body.ends_with(b"# EOF\n"));

    for path in ["/health", "/metrics", "/ready"] {
        let mut head = client
            .head(format!("{}{path}", gw.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(head.status(), 200, "HEAD {path}");
        assert!(head.body().await.unwrap().is_empty());
    }
    gw.stop(false).await;

    // A backend whose models are unknown (its /v1/models is missing) takes any model name; the
    // names clients make up do not become series.
    let unknown = Fake::start(|r| match r.path.as_str() {
        "/health" => FakeResponse::empty(200),
        "/v1/chat/completions" => FakeResponse::json(200, ANSWER),
        _ => FakeResponse::json(404, "{}"),
    });
    let gw = gateway(fleet(&[(&unknown.url, None)])).await;
    for junk in ["junk-1", "junk-2"] {
        let body = json!({"model": junk, "messages": [{"role": "user", "content": "x"}]});
        assert_eq!(post(&client, &chat_url(&gw), &body).await.status, 200);
    }
    let counted = eventually(Duration::from_secs(2), || async {
        get(&client, &format!("{}/metrics", gw.url()))
            .await
            .text()
            .contains("model=\"other\",status=\"200\"} 2")
    })
    .await;
    let text = get(&client, &format!("{}/metrics", gw.url())).await.text();
    assert!(counted, "{text}");
    assert!(
        !text.contains("junk-1"),
        "unknown model names make no series"
    );
    gw.stop(false).await;
}

#[actix_rt::test]
async fn models_are_learned_with_the_endpoint_key_and_retrieved_from_the_gateway() {
    // vLLM started with --api-key: /health is open, every /v1 route wants the key.
    let vllm = Fake::start(|r| match (r.path.as_str(), r.header("authorization")) {
        ("/health", _) => FakeResponse::empty(200),
        ("/v1/models", Some("Bearer vllm-secret")) => {
            FakeResponse::json(200, models(&["org/vllm-model"]))
        }
        _ => FakeResponse::json(401, r#"{"error":"Unauthorized"}"#),
    });
    // A server still loading: /health is 503, yet it already lists its model.
    let loading = Fake::start(|r| match r.path.as_str() {
        "/v1/models" => FakeResponse::json(200, models(&["later-model"])),
        _ => FakeResponse::json(503, r#"{"error":"Loading model"}"#),
    });
    let mut cfg = fleet(&[(&vllm.url, None), (&loading.url, None)]);
    cfg.endpoints[0].api_key = Some("vllm-secret".into());
    let gw = gateway(cfg).await;
    let client = client();
    let learned = eventually(Duration::from_secs(3), || async {
        let endpoints = stats(&client, &gw).await["balancer"]["endpoints"].clone();
        endpoints[0]["models"] == json!(["org/vllm-model"])
            && endpoints[1]["models"] == json!(["later-model"])
    })
    .await;
    assert!(learned, "{}", stats(&client, &gw).await["balancer"]);
    let one = get(&client, &format!("{}/v1/models/org/vllm-model", gw.url())).await;
    assert_eq!(one.status, 200);
    assert_eq!(one.json()["id"], "org/vllm-model");
    assert_eq!(one.json()["object"], "model");
    let none = get(&client, &format!("{}/v1/models/later-model", gw.url())).await;
    assert_eq!(
        none.status, 404,
        "not served while its backend is unhealthy"
    );
    assert_eq!(none.json()["error"]["code"], "model_not_found");
    gw.stop(false).await;
}

#[actix_rt::test]
async fn end_to_end_headers_go_upstream_hop_by_hop_ones_do_not_and_every_answer_has_an_id() {
    let backend = Fake::start(|_| FakeResponse::json(200, ANSWER));
    let gw = gateway(fleet(&[(&backend.url, Some("sim"))])).await;
    let client = client();
    let mut answer = client
        .post(chat_url(&gw))
        .insert_header((
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ))
        .insert_header(("tracestate", "vendor=x"))
        .insert_header(("x-request-id", "req-123"))
        .insert_header(("openai-organization", "org-1"))
        .insert_header(("openai-project", "proj-1"))
        .insert_header(("openai-beta", "assistants=v2"))
        .insert_header(("user-agent", "OpenAI/Python 1.109.1"))
        .insert_header(("x-custom", "kept"))
        .send_json(&chat(2))
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers().get("x-request-id").unwrap(), "req-123");
    let _ = answer.body().await;
    let upstream = backend.on("/v1/chat/completions").pop().unwrap();
    for (name, value) in [
        (
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ),
        ("tracestate", "vendor=x"),
        ("x-request-id", "req-123"),
        ("openai-organization", "org-1"),
        ("openai-project", "proj-1"),
        ("openai-beta", "assistants=v2"),
        ("user-agent", "OpenAI/Python 1.109.1"),
        ("x-custom", "kept"),
        ("x-forwarded-for", "127.0.0.1"),
        ("forwarded", "for=127.0.0.1;proto=http"),
        ("x-forwarded-proto", "http"),
        ("content-type", "application/json"),
    ] {
        assert_eq!(upstream.header(name), Some(value), "{name}: {upstream:?}");
    }
    // Hop-by-hop headers, sent as a client would put them on the wire.
    let body = serde_json::to_string(&chat(2)).unwrap();
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n\
         connection: keep-alive, x-per-hop\r\nx-per-hop: dropped\r\nte: trailers\r\n\
         proxy-authorization: Basic xyz\r\nx-nanogate-cache: on\r\naccept-encoding: gzip\r\n\
         keep-alive: timeout=5\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let answer = raw_exchange(gw.addr, raw.into_bytes(), Duration::from_millis(500)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let upstream = backend.on("/v1/chat/completions").pop().unwrap();
    for name in [
        "x-per-hop",
        "te",
        "proxy-authorization",
        "x-nanogate-cache",
        "keep-alive",
    ] {
        assert!(
            upstream.header(name).is_none(),
            "{name} went upstream: {upstream:?}"
        );
    }
    assert_eq!(
        upstream.header("accept-encoding"),
        Some("identity"),
        "the gateway's own, not the client's gzip: a compressed answer could not be checked"
    );
    assert_ne!(upstream.header("connection"), Some("keep-alive, x-per-hop"));

    let generated = post(&client, &chat_url(&gw), &chat(2)).await;
    let id = generated.header("x-request-id").expect("an id is made up");
    assert_eq!(id.len(), 32);
    assert_eq!(
        backend
            .on("/v1/chat/completions")
            .pop()
            .unwrap()
            .header("x-request-id"),
        Some(id.as_str())
    );
    let error = post_raw(&client, &chat_url(&gw), "{").await;
    assert!(
        error.header("x-request-id").is_some(),
        "errors carry it too"
    );
    gw.stop(false).await;
}

#[actix_rt::test]
async fn the_official_openai_node_sdk_works_against_the_gateway() {
    if !sdk_node() {
        return;
    }
    // A token every 70 ms: 30 of them outlast the SDK's 1 s timeout.
    let backends = sims(vec![paced(70)]).await;
    let gw = gateway(config(&backends)).await;
    run_sdk_script("node", "openai_sdk.mjs", &[&format!("{}/v1", gw.url())]).await;
    gw.stop(false).await;
}

#[actix_rt::test]
async fn browsers_on_allowed_origins_get_cors_answers() {
    let backends = sims(vec![fast()]).await;
    let mut cfg = config(&backends);
    cfg.cors.allowed_origins = vec!["https://chat.example.com".into()];
    let gw = gateway(cfg).await;
    let client = client();
    let preflight = client
        .request(awc::http::Method::OPTIONS, chat_url(&gw))
        .insert_header(("origin", "https://chat.example.com"))
        .insert_header(("access-control-request-method", "POST"))
        .insert_header((
            "access-control-request-headers",
            "authorization, content-type, x-stainless-os",
        ))
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    assert_eq!(
        preflight
            .headers()
            .get("access-control-allow-origin")
            .unwrap(),
        "https://chat.example.com"
    );
    let mut answer = client
        .post(chat_url(&gw))
        .insert_header(("origin", "https://chat.example.com"))
        .send_json(&chat(2))
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let exposed = answer
        .headers()
        .get("access-control-expose-headers")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(exposed.contains("x-request-id"), "{exposed}");
    let _ = answer.body().await;
    let other = client
        .post(chat_url(&gw))
        .insert_header(("origin", "https://evil.example.com"))
        .send_json(&chat(2))
        .await
        .unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
    // A preflight the CORS layer answers itself, sent with a chunked body that never comes, is
    // answered and its connection closed, not drained with no timer.
    for origin in ["https://chat.example.com", "https://evil.example.com"] {
        let head = format!(
            "OPTIONS /v1/chat/completions HTTP/1.1\r\nhost: gw\r\norigin: {origin}\r\n\
             access-control-request-method: POST\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        let started = Instant::now();
        let answer = raw_exchange(gw.addr, head.into_bytes(), Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 "), "{origin}: {answer}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{origin}: the connection was closed after the answer: {answer}"
        );
    }
    gw.stop(false).await;
}

#[actix_rt::test]
async fn http_1_0_clients_get_streams_ended_by_a_close_and_errors_name_the_field() {
    let backends = sims(vec![fast()]).await;
    let gw = gateway(config(&backends)).await;
    let body = serde_json::to_string(&chat_stream(3)).unwrap();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.0\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let started = Instant::now();
    let answer = raw_exchange(gw.addr, request.into_bytes(), Duration::from_secs(5)).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed at the end"
    );
    let (head, stream) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    assert!(!head.to_lowercase().contains("transfer-encoding"), "{head}");
    assert!(
        stream.starts_with("data: {"),
        "not chunk-framed: {stream:?}"
    );
    assert!(stream.ends_with("data: [DONE]\n\n"));

    let client = client();
    let hot = json!({"model": "sim", "messages": [], "temperature": "hot"});
    let answer = post(&client, &chat_url(&gw), &hot).await;
    assert_eq!(answer.status, 400);
    let error = &answer.json()["error"];
    assert_eq!(error["param"], "temperature");
    assert_eq!(
        error["message"],
        "Invalid value for 'temperature': expected a number"
    );
    gw.stop(false).await;
}

#[actix_rt::test]
async fn the_simulator_answers_n_choices_for_each_of_a_list_of_prompts() {
    let backends = sims(vec![fast()]).await;
    let gw = gateway(config(&backends)).await;
    let client = client();
    let url = format!("{}/v1/completions", gw.url());
    let body = json!({"model": "sim", "prompt": ["one", "two"], "n": 2, "max_tokens": 3});
    let answer = post(&client, &url, &body).await.json();
    let indices: Vec<u64> = answer["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, [0, 1, 2, 3]);
    assert_eq!(answer["usage"]["completion_tokens"], 12);
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let text = post(&client, &url, &streamed).await.text();
    let mut seen: Vec<u64> = sse_events(&text)
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["index"]
                .as_u64()
                .unwrap()
        })
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen, [0, 1, 2, 3]);
    gw.stop(false).await;
}
