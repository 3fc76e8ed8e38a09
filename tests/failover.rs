//! Failures the client never sees: retries before the first byte within a retry budget, a
//! hanging backend timed out and the request served elsewhere within its deadline, passive
//! ejection of failing backends, and routing policies chosen in config.

mod common;

use std::time::{Duration, Instant};

use common::*;
use nanogate::config::Config;
use nanogate_actors::policy::PolicyKind;
use serde_json::json;

fn chat_url(gw: &nanogate::gateway::Gateway) -> String {
    format!("{}/v1/chat/completions", gw.url())
}

#[actix_rt::test]
async fn a_backend_switched_down_during_a_burst_costs_the_clients_nothing() {
    let backends = sims(vec![paced(2), paced(2), paced(2)]).await;
    let mut cfg = config(&backends);
    cfg.health.interval_ms = 60_000;
    cfg.balancer.policy = PolicyKind::RoundRobin;
    let gw = gateway(cfg).await;
    let client = client();
    let url = chat_url(&gw);
    let request = chat(5);
    let burst = futures_util::future::join_all((0..240).map(|i| {
        let (client, url, request) = (&client, &url, &request);
        async move {
            actix_rt::time::sleep(Duration::from_millis(i * 2)).await;
            post(client, url, request).await
        }
    }));
    let kill = async {
        actix_rt::time::sleep(Duration::from_millis(150)).await;
        backends[1].control.set_down(true);
    };
    let (answers, ()) = futures_util::future::join(burst, kill).await;
    let failed: Vec<_> = answers
        .iter()
        .filter(|a| a.status != 200)
        .map(|a| a.text())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of 240 failed: {:?}",
        failed.len(),
        failed.first()
    );
    let s = stats(&client, &gw).await;
    assert_eq!(
        s["balancer"]["endpoints"][1]["circuit"], "open",
        "the dead backend was ejected"
    );
    assert!(s["balancer"]["retry_budget"]["retries"].as_u64().unwrap() >= 1);
    gw.stop(false).await;
}

#[actix_rt::test]
async fn a_hanging_backend_is_timed_out_and_the_request_served_elsewhere_within_its_deadline() {
    let backends = sims(vec![fast(), fast()]).await;
    let mut cfg = config(&backends);
    cfg.health.interval_ms = 60_000;
    cfg.upstream.first_byte_timeout_ms = 400;
    cfg.balancer.policy = PolicyKind::RoundRobin;
    let gw = gateway(cfg).await;
    let client = client();
    backends[0].control.set_hang(true);
    for _ in 0..4 {
        let started = Instant::now();
        let answer = client
            .post(chat_url(&gw))
            .insert_header(("x-request-timeout-ms", "2000"))
            .send_json(&chat(3))
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        assert_eq!(answer.headers().get("x-nanogate-endpoint").unwrap(), "1");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "within the deadline"
        );
    }
    backends[0].control.set_hang(false);
    gw.stop(false).await;
}

#[actix_rt::test]
async fn the_client_deadline_is_honoured() {
    let backends = sims(vec![paced(50)]).await;
    let gw = gateway(config(&backends)).await;
    let client = client();
    let started = Instant::now();
    let answer = client
        .post(chat_url(&gw))
        .insert_header(("x-request-timeout-ms", "300"))
        .send_json(&chat(100))
        .await
        .unwrap();
    assert_eq!(answer.status(), 504);
    assert!(started.elapsed() < Duration::from_millis(1500));
    gw.stop(false).await;
}

#[actix_rt::test]
async fn a_backend_returning_garbage_is_ejected_and_probed_back() {
    let backends = sims(vec![fast(), fast()]).await;
    let mut cfg = config(&backends);
    cfg.health.interval_ms = 60_000;
    cfg.balancer.policy = PolicyKind::RoundRobin;
    cfg.balancer.ejection_cooldown_ms = 300;
    let gw = gateway(cfg).await;
    let client = client();
    backends[0].control.set_garbage(true);
    for _ in 0..12 {
        assert_eq!(post(&client, &chat_url(&gw), &chat(1)).await.status, 200);
    }
    let endpoint = stats(&client, &gw).await["balancer"]["endpoints"][0].clone();
    assert_eq!(endpoint["circuit"], "open", "{endpoint}");
    let before = backends[0].control.snapshot().requests;
    for _ in 0..6 {
        assert_eq!(post(&client, &chat_url(&gw), &chat(1)).await.status, 200);
    }
    assert_eq!(
        backends[0].control.snapshot().requests,
        before,
        "no traffic while ejected"
    );
    backends[0].control.set_garbage(false);
    let back = eventually(Duration::from_secs(3), || async {
        post(&client, &chat_url(&gw), &chat(1)).await;
        stats(&client, &gw).await["balancer"]["endpoints"][0]["circuit"] == "closed"
    })
    .await;
    assert!(
        back,
        "after its cool-down a trial request closed the circuit"
    );
    gw.stop(false).await;
}

#[actix_rt::test]
async fn the_retry_budget_caps_retries_in_flight() {
    let backends = sims(vec![fast(), paced(100)]).await;
    let mut cfg = config(&backends);
    cfg.health.interval_ms = 60_000;
    cfg.balancer.policy = PolicyKind::RoundRobin;
    cfg.balancer.eject_after_failures = 1000;
    cfg.upstream.retry_ratio = 0.0;
    cfg.upstream.retry_min_concurrency = 2;
    let gw = gateway(cfg).await;
    let client = client();
    backends[0].control.set_error_rate(1.0);
    let (url, body) = (chat_url(&gw), chat(3));
    let requests = (0..10).map(|_| post(&client, &url, &body));
    let statuses: Vec<u16> = futures_util::future::join_all(requests)
        .await
        .iter()
        .map(|a| a.status.as_u16())
        .collect();
    // Round robin sends about half of the ten to the failing backend first. Their retries go to
    // the slow one and hold their place in the budget for its 300 ms: two fit, the others get the
    // backend's own error passed through.
    let refused = backends[0].control.snapshot().requests as usize;
    assert!(refused >= 3, "{refused}");
    let failed = statuses.iter().filter(|&&s| s == 500).count();
    assert_eq!(failed, refused - 2, "{statuses:?}");
    let budget = &stats(&client, &gw).await["balancer"]["retry_budget"];
    assert_eq!(budget["retries"], 2, "{budget}");
    assert_eq!(budget["denied"], refused - 2, "{budget}");
    assert_eq!(budget["in_flight"], 0, "{budget}");
    gw.stop(false).await;
}

#[actix_rt::test]
async fn the_policy_is_chosen_in_config_and_affinity_keeps_sessions_together() {
    let backends = sims(vec![fast(), fast(), fast()]).await;
    assert_eq!(
        Config::defaults().balancer.policy,
        PolicyKind::CacheAware,
        "the default"
    );
    let mut cfg = config(&backends);
    cfg.balancer.policy = PolicyKind::Affinity;
    let gw = gateway(cfg).await;
    let client = client();
    assert_eq!(stats(&client, &gw).await["balancer"]["policy"], "affinity");
    for session in ["alice", "bob", "carol", "dave"] {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..5 {
            let answer = client
                .post(chat_url(&gw))
                .insert_header(("x-session-id", session))
                .send_json(&chat(1))
                .await
                .unwrap();
            assert_eq!(answer.status(), 200);
            seen.insert(
                answer
                    .headers()
                    .get("x-nanogate-endpoint")
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_string(),
            );
        }
        assert_eq!(
            seen.len(),
            1,
            "session {session} stayed on one backend: {seen:?}"
        );
    }
    let shared_prefix = |question: &str| {
        json!({"model": "sim", "max_tokens": 1, "messages": [
            {"role": "system", "content": "You are the assistant of a very long shared system prompt that every request repeats. ".repeat(4)},
            {"role": "user", "content": question}]})
    };
    let mut seen = std::collections::HashSet::new();
    for q in ["one", "two", "three", "four", "five"] {
        let answer = post(&client, &chat_url(&gw), &shared_prefix(q)).await;
        seen.insert(answer.header("x-nanogate-endpoint").unwrap());
    }
    assert_eq!(
        seen.len(),
        1,
        "a shared prompt prefix keeps one backend: {seen:?}"
    );
    gw.stop(false).await;
}

/// A backend that sends a JSON head promising 100 bytes, then hangs up after a few: the answer
/// breaks before any byte reached the client, so the request is retried elsewhere.
fn broken_backend() -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { break };
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let _ = stream.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"partial",
            );
        }
    });
    url
}

#[actix_rt::test]
async fn a_backend_breaking_in_the_middle_of_an_answer_is_retried() {
    let backends = sims(vec![fast()]).await;
    let mut cfg = config(&backends);
    cfg.endpoints.insert(
        0,
        nanogate_actors::endpoint::EndpointSpec::new(broken_backend()),
    );
    cfg.health.interval_ms = 60_000;
    cfg.balancer.policy = PolicyKind::RoundRobin;
    cfg.balancer.eject_after_failures = 1000;
    let gw = gateway(cfg).await;
    let client = client();
    for _ in 0..6 {
        let answer = post(&client, &chat_url(&gw), &chat(2)).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.json()["object"], "chat.completion");
    }
    let budget = &stats(&client, &gw).await["balancer"]["retry_budget"];
    assert!(budget["retries"].as_u64().unwrap() >= 3, "{budget}");
    gw.stop(false).await;
}

/// A backend that answers one request per connection correctly, keeps the connection open as if
/// for keep-alive, then closes it without a word when the next request comes.
fn one_shot_keep_alive_backend() -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { break };
            std::thread::spawn(move || {
                let mut request = [0u8; 8192];
                let _ = stream.read(&mut request);
                let body = br#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}"#;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(body);
                let _ = stream.read(&mut request);
            });
        }
    });
    url
}

#[actix_rt::test]
async fn a_pooled_connection_the_backend_closed_is_retried_on_a_fresh_one() {
    let mut cfg = config(&[]);
    cfg.endpoints = vec![nanogate_actors::endpoint::EndpointSpec::new(
        one_shot_keep_alive_backend(),
    )];
    cfg.endpoints[0].models = vec!["sim".into()];
    cfg.health.interval_ms = 60_000;
    cfg.server.workers = 1;
    let gw = gateway(cfg).await;
    let client = client();
    for i in 0..5 {
        let answer = post(&client, &chat_url(&gw), &chat(1)).await;
        assert_eq!(answer.status, 200, "request {i}: {}", answer.text());
    }
    gw.stop(false).await;
}
