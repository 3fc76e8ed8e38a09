//! Failures and bad input over real HTTP: every bad request gets its OpenAI-shaped error and
//! status, backends that go down, hang, or answer garbage are detected and routed around, the
//! client going away frees the backend, overload is shed with Retry-After, and an actor that fails
//! is restarted while the service keeps answering.

mod common;

use std::time::Duration;

use common::*;
use nanogate_actors::Fail;
use serde_json::json;

#[actix_rt::test]
async fn bad_input_gets_clear_errors_and_nothing_else_breaks() {
    let backends = sims(vec![fast()]).await;
    let mut cfg = config(&backends);
    cfg.server.max_body_bytes = 4096;
    let gw = gateway(cfg).await;
    let client = client();
    let url = format!("{}/v1/chat/completions", gw.url());
    let cases: Vec<(bytes::Bytes, u16, &str)> = vec![
        ("{\"model\": ".into(), 400, "invalid_json"),
        ("not json at all".into(), 400, "invalid_json"),
        (
            json!({"messages": []}).to_string().into(),
            400,
            "missing_required_parameter",
        ),
        (
            json!({"model": "sim"}).to_string().into(),
            400,
            "missing_required_parameter",
        ),
        (
            json!({"model": "sim", "messages": "hi"}).to_string().into(),
            400,
            "invalid_value",
        ),
        (
            json!({"model": "unknown-model", "messages": []})
                .to_string()
                .into(),
            404,
            "model_not_found",
        ),
        (
            format!(
                "{{\"model\":\"sim\",\"messages\":[],\"pad\":\"{}\"}}",
                "x".repeat(5000)
            )
            .into(),
            413,
            "request_too_large",
        ),
    ];
    for (body, status, code) in cases {
        let answer = post_raw(&client, &url, body).await;
        assert_eq!(answer.status, status, "{}", answer.text());
        let error = &answer.json()["error"];
        assert_eq!(error["code"], code);
        assert!(error["message"].as_str().unwrap().len() > 10);
        assert!(error["type"].is_string());
    }
    let unknown = get(&client, &format!("{}/v2/nothing", gw.url())).await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["error"]["code"], "unknown_url");
    let wrong_method = get(&client, &url).await;
    assert_eq!(
        wrong_method.status, 404,
        "GET on a POST route, as OpenAI answers it"
    );
    assert_eq!(wrong_method.json()["error"]["code"], "unknown_url");
    let good = post(&client, &url, &chat(3)).await;
    assert_eq!(good.status, 200, "the gateway still serves after bad input");
    gw.stop(false).await;
}

#[actix_rt::test]
async fn a_backend_switched_down_is_avoided_after_its_health_check() {
    let backends = sims(vec![fast(), fast(), fast()]).await;
    let gw = gateway(config(&backends)).await;
    let client = client();
    backends[1].control.set_down(true);
    let avoided = eventually(Duration::from_secs(3), || async {
        stats(&client, &gw).await["balancer"]["endpoints"][1]["healthy"] == false
    })
    .await;
    assert!(
        avoided,
        "the health checker marks the down backend unhealthy"
    );
    let before = backends[1].control.snapshot().requests;
    for _ in 0..30 {
        let answer = post(
            &client,
            &format!("{}/v1/chat/completions", gw.url()),
            &chat(2),
        )
        .await;
        assert_eq!(answer.status, 200);
        assert_ne!(answer.header("x-nanogate-endpoint").as_deref(), Some("1"));
    }
    assert_eq!(
        backends[1].control.snapshot().requests,
        before,
        "no request reached the down backend"
    );
    backends[1].control.set_down(false);
    let back = eventually(Duration::from_secs(3), || async {
        stats(&client, &gw).await["balancer"]["endpoints"][1]["healthy"] == true
    })
    .await;
    assert!(back, "the backend comes back after a good probe");
    gw.stop(false).await;
}

#[actix_rt::test]
async fn a_backend_answering_garbage_is_routed_around_and_alone_gives_502() {
    let backends = sims(vec![fast(), fast()]).await;
    let mut cfg = config(&backends);
    cfg.health.interval_ms = 60_000;
    cfg.balancer.policy = nanogate_actors::policy::PolicyKind::RoundRobin;
    let gw = gateway(cfg).await;
    let client = client();
    backends[0].control.set_garbage(true);
    for _ in 0..20 {
        let answer = post(
            &client,
            &format!("{}/v1/chat/completions", gw.url()),
            &chat(2),
        )
        .await;
        assert_eq!(
            answer.status, 200,
            "garbage before the first byte is retried elsewhere"
        );
        assert_eq!(answer.header("x-nanogate-endpoint").as_deref(), Some("1"));
    }
    let demoted = eventually(Duration::from_secs(2), || async {
        stats(&client, &gw).await["balancer"]["endpoints"][0]["weight"]
            .as_f64()
            .unwrap()
            < 1.0
    })
    .await;
    assert!(demoted, "the garbage backend lost weight");
    backends[1].control.set_garbage(true);
    let answer = post(
        &client,
        &format!("{}/v1/chat/completions", gw.url()),
        &chat(2),
    )
    .await;
    assert_eq!(answer.status, 502);
    assert_eq!(answer.json()["error"]["code"], "upstream_bad_response");
    gw.stop(false).await;
}

#[actix_rt::test]
async fn unreachable_and_hanging_backends_give_502_and_504() {
    let backends = sims(vec![fast()]).await;
    let mut cfg = config(&backends);
    cfg.health.interval_ms = 60_000;
    cfg.upstream.first_byte_timeout_ms = 300;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let mut unreachable = cfg.clone();
    unreachable.endpoints = vec![nanogate_actors::endpoint::EndpointSpec::new(dead_url)];
    unreachable.health.fall = 10;
    let gw = gateway(unreachable).await;
    let client = client();
    let answer = post(
        &client,
        &format!("{}/v1/chat/completions", gw.url()),
        &chat(2),
    )
    .await;
    assert_eq!(answer.status, 502);
    assert_eq!(answer.json()["error"]["code"], "upstream_unreachable");
    gw.stop(false).await;

    let gw = gateway(cfg).await;
    backends[0].control.set_hang(true);
    let started = std::time::Instant::now();
    let answer = post(
        &client,
        &format!("{}/v1/chat/completions", gw.url()),
        &chat(2),
    )
    .await;
    assert_eq!(answer.status, 504);
    assert_eq!(answer.json()["error"]["code"], "upstream_timeout");
    assert!(started.elapsed() < Duration::from_secs(3));
    backends[0].control.set_hang(false);
    gw.stop(false).await;
}

#[actix_rt::test]
async fn all_backends_down_answers_503_quickly_with_retry_after() {
    let backends = sims(vec![fast(), fast()]).await;
    let gw = gateway(config(&backends)).await;
    let client = client();
    for b in &backends {
        b.control.set_down(true);
    }
    let down = eventually(Duration::from_secs(3), || async {
        get(&client, &format!("{}/ready", gw.url())).await.status == 503
    })
    .await;
    assert!(down, "/ready turns 503 when no backend is healthy");
    let started = std::time::Instant::now();
    let answer = post(
        &client,
        &format!("{}/v1/chat/completions", gw.url()),
        &chat(2),
    )
    .await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.json()["error"]["code"], "no_healthy_backend");
    assert!(answer.header("retry-after").is_some());
    assert!(started.elapsed() < Duration::from_millis(500));
    gw.stop(false).await;
}

#[actix_rt::test]
async fn overload_is_answered_503_with_retry_after_and_in_flight_requests_finish() {
    let backends = sims(vec![paced(20)]).await;
    let mut cfg = config(&backends);
    cfg.pool.min_workers = 1;
    cfg.pool.max_workers = 1;
    cfg.pool.queue_limit = 0;
    let gw = gateway(cfg).await;
    let client = client();
    let url = format!("{}/v1/chat/completions", gw.url());
    let long_request = chat(20);
    let long = post(&client, &url, &long_request);
    let refused = async {
        actix_rt::time::sleep(Duration::from_millis(100)).await;
        post(&client, &url, &chat(1)).await
    };
    let (long, refused) = futures_util::future::join(long, refused).await;
    assert_eq!(long.status, 200, "the admitted request is not disturbed");
    assert_eq!(refused.status, 503);
    assert_eq!(refused.header("retry-after").as_deref(), Some("1"));
    assert_eq!(refused.json()["error"]["code"], "overloaded");
    assert_eq!(
        post(&client, &url, &chat(1)).await.status,
        200,
        "served again once a worker is free"
    );
    assert_eq!(stats(&client, &gw).await["pool"]["refused"], 1);
    gw.stop(false).await;
}

#[actix_rt::test]
async fn the_client_going_away_cancels_the_upstream_request() {
    let backends = sims(vec![paced(20)]).await;
    let gw = gateway(config(&backends)).await;
    let client = client();
    let mut response = client
        .post(format!("{}/v1/chat/completions", gw.url()))
        .send_json(&chat_stream(500))
        .await
        .unwrap();
    let first = futures_util::StreamExt::next(&mut response).await;
    assert!(first.is_some());
    assert_eq!(backends[0].control.snapshot().running, 1);
    drop(response);
    drop(client);
    let freed = eventually(Duration::from_secs(2), || async {
        let s = backends[0].control.snapshot();
        s.running == 0 && s.cancelled == 1
    })
    .await;
    assert!(
        freed,
        "the backend stopped generating: {:?}",
        backends[0].control.snapshot()
    );
    let client = common::client();
    let in_flight = eventually(Duration::from_secs(2), || async {
        stats(&client, &gw).await["balancer"]["endpoints"][0]["in_flight"] == 0
    })
    .await;
    assert!(in_flight);
    gw.stop(false).await;
}

#[actix_rt::test]
async fn a_backend_dying_mid_stream_ends_the_stream_with_an_error_event() {
    let backends = sims(vec![paced(20)]).await;
    let mut cfg = config(&backends);
    cfg.health.interval_ms = 60_000;
    let gw = gateway(cfg).await;
    let client = client();
    let mut response = client
        .post(format!("{}/v1/chat/completions", gw.url()))
        .send_json(&chat_stream(100))
        .await
        .unwrap();
    let mut body = Vec::new();
    if let Some(chunk) = futures_util::StreamExt::next(&mut response).await {
        body.extend_from_slice(&chunk.unwrap());
    }
    backends[0].control.set_down(true);
    while let Some(chunk) = futures_util::StreamExt::next(&mut response).await {
        body.extend_from_slice(&chunk.unwrap());
    }
    let events = sse_events(&String::from_utf8(body).unwrap());
    let last: serde_json::Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_stream_error");
    assert!(!events.iter().any(|e| e == "[DONE]"));
    gw.stop(false).await;
}

#[actix_rt::test]
async fn failed_actors_are_restarted_and_the_service_keeps_answering() {
    let backends = sims(vec![fast()]).await;
    let gw = gateway(config(&backends)).await;
    let client = client();
    let url = format!("{}/v1/chat/completions", gw.url());
    assert_eq!(post(&client, &url, &chat(1)).await.status, 200);
    gw.state.balancer.do_send(Fail);
    gw.state.metrics.addr().do_send(Fail);
    gw.state.cache.do_send(Fail);
    gw.state.pool.do_send(Fail);
    gw.state.health.do_send(Fail);
    actix_rt::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..5 {
        assert_eq!(post(&client, &url, &chat(1)).await.status, 200);
    }
    let counted = eventually(Duration::from_secs(2), || async {
        stats(&client, &gw).await["metrics"]["overall"]["requests"]
            .as_u64()
            .unwrap()
            >= 6
    })
    .await;
    assert!(counted, "counters survive the restart");
    let stats = stats(&client, &gw).await;
    for section in ["pool", "balancer", "health", "cache", "metrics"] {
        assert!(
            stats[section].get("error").is_none(),
            "{section} answers after its restart: {}",
            stats[section]
        );
    }
    gw.stop(false).await;
}
