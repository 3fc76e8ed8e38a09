//! The proxy path over real HTTP: answers arrive intact (non-streaming and SSE), the cache
//! answers identical deterministic requests, models are routed, and the official OpenAI Python
//! SDK works against the gateway.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[actix_rt::test]
async fn non_streaming_answer_arrives_intact() {
    let backends = sims(vec![fast(), fast()]).await;
    let gw = gateway(config(&backends)).await;
    let client = client();
    let answer = post(
        &client,
        &format!("{}/v1/chat/completions", gw.url()),
        &chat(7),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert!(answer
        .header("content-type")
        .unwrap()
        .starts_with("application/json"));
    let body = answer.json();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["usage"]["completion_tokens"], 7);
    assert_eq!(
        body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .count(),
        7
    );
    let completion = post(
        &client,
        &format!("{}/v1/completions", gw.url()),
        &json!({"model": "sim", "prompt": "Once", "max_tokens": 3}),
    )
    .await;
    assert_eq!(completion.status, 200);
    assert_eq!(completion.json()["object"], "text_completion");
    let embedding = post(
        &client,
        &format!("{}/v1/embeddings", gw.url()),
        &json!({"model": "sim", "input": ["a", "b"]}),
    )
    .await;
    assert_eq!(embedding.status, 200);
    assert_eq!(embedding.json()["data"].as_array().unwrap().len(), 2);
    gw.stop(false).await;
}

#[actix_rt::test]
async fn stream_arrives_chunk_by_chunk_in_order_with_usage_and_done() {
    let backends = sims(vec![paced(20)]).await;
    let gw = gateway(config(&backends)).await;
    let client = client();
    let mut response = client
        .post(format!("{}/v1/chat/completions", gw.url()))
        .send_json(&chat_stream(10))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response
        .headers()
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut arrivals = Vec::new();
    let mut body = Vec::new();
    let started = std::time::Instant::now();
    while let Some(chunk) = futures_util::StreamExt::next(&mut response).await {
        arrivals.push(started.elapsed());
        body.extend_from_slice(&chunk.unwrap());
    }
    let span = *arrivals.last().unwrap() - arrivals[0];
    assert!(
        arrivals.len() >= 5,
        "the stream came in {} pieces, not chunk by chunk",
        arrivals.len()
    );
    assert!(
        span >= Duration::from_millis(100),
        "chunks were buffered: all within {span:?}"
    );
    let events = sse_events(&String::from_utf8(body).unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<serde_json::Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let words: Vec<String> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .filter(|s| !s.is_empty())
        .map(|s| s.trim().to_string())
        .collect();
    let expected: Vec<String> = (0..10).map(|i| format!("tok{i}")).collect();
    assert_eq!(words, expected, "tokens in order");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"].as_array().unwrap().len(), 0);
    assert_eq!(usage["usage"]["completion_tokens"], 10);
    gw.stop(false).await;
}

#[actix_rt::test]
async fn identical_deterministic_requests_hit_the_cache_and_concurrent_misses_coalesce() {
    let backends = sims(vec![paced(5)]).await;
    let gw = gateway(config(&backends)).await;
    let client = client();
    let url = format!("{}/v1/chat/completions", gw.url());
    let request = json!({"model": "sim", "messages": [{"role": "user", "content": "cache me"}], "temperature": 0, "max_tokens": 20});
    let answers =
        futures_util::future::join_all((0..5).map(|_| post(&client, &url, &request))).await;
    let bodies: Vec<_> = answers.iter().map(|a| a.body.clone()).collect();
    assert!(answers.iter().all(|a| a.status == 200));
    assert!(
        bodies.iter().all(|b| b == &bodies[0]),
        "all five got the one upstream answer"
    );
    assert_eq!(
        backends[0].control.snapshot().requests,
        1,
        "five identical misses made one upstream call"
    );
    let again = post(&client, &url, &request).await;
    assert_eq!(again.header("x-nanogate-cache").as_deref(), Some("hit"));
    assert_eq!(again.body, bodies[0]);
    let different = post(&client, &url, &json!({"model": "sim", "messages": [{"role": "user", "content": "cache me"}], "temperature": 0.8, "max_tokens": 20})).await;
    assert_eq!(different.status, 200);
    assert_eq!(
        different.header("x-nanogate-cache"),
        None,
        "temperature 0.8 is not cached"
    );
    let bypass = client
        .post(&url)
        .insert_header(("cache-control", "no-cache"))
        .send_json(&request)
        .await
        .unwrap();
    assert_eq!(bypass.headers().get("x-nanogate-cache"), None);
    assert_eq!(backends[0].control.snapshot().requests, 3);
    let cache = &stats(&client, &gw).await["cache"];
    assert_eq!(cache["entries"], 1);
    assert_eq!(cache["hits"], 1);
    assert_eq!(cache["coalesced"], 4);
    gw.stop(false).await;
}

#[actix_rt::test]
async fn models_are_learned_from_backends_and_routed() {
    let llama = SimConfigExt::models(&["llama"]);
    let qwen = SimConfigExt::models(&["qwen", "sim"]);
    let backends = sims(vec![llama, qwen]).await;
    let gw = gateway(config(&backends)).await;
    let client = client();
    let listed = eventually(Duration::from_secs(3), || async {
        let models = get(&client, &format!("{}/v1/models", gw.url()))
            .await
            .json();
        let ids: Vec<&str> = models["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["id"].as_str())
            .collect();
        ids == ["llama", "qwen", "sim"]
    })
    .await;
    assert!(
        listed,
        "the gateway lists the union of the backends' models"
    );
    for _ in 0..10 {
        let answer = post(&client, &format!("{}/v1/chat/completions", gw.url()), &json!({"model": "llama", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1})).await;
        assert_eq!(answer.status, 200);
        assert_eq!(
            answer.header("x-nanogate-endpoint").as_deref(),
            Some("0"),
            "only backend 0 serves llama"
        );
    }
    let missing = post(
        &client,
        &format!("{}/v1/chat/completions", gw.url()),
        &json!({"model": "gpt-9", "messages": []}),
    )
    .await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"]["code"], "model_not_found");
    gw.stop(false).await;
}

/// Builds simulator configs that serve given models.
struct SimConfigExt;

impl SimConfigExt {
    fn models(names: &[&str]) -> nanogate::simulator::SimConfig {
        nanogate::simulator::SimConfig {
            models: names.iter().map(|s| s.to_string()).collect(),
            ..fast()
        }
    }
}

/// The interpreter of `.venv` with the official `openai` SDK, installed on first use; `None`
/// (with the reason printed) only where Python itself is missing.
#[actix_rt::test]
async fn the_official_openai_python_sdk_works_against_the_gateway() {
    let Some(python) = sdk_python() else {
        return;
    };
    let backends = sims(vec![fast(), fast()]).await;
    let gw = gateway(config(&backends)).await;
    run_sdk_script(&python, "openai_sdk.py", &[&format!("{}/v1", gw.url())]).await;
    gw.stop(false).await;
}

#[actix_rt::test]
async fn the_openai_sdk_raises_when_the_backend_dies_mid_stream() {
    let Some(python) = sdk_python() else {
        return;
    };
    let backends = sims(vec![paced(20)]).await;
    let mut cfg = config(&backends);
    cfg.health.interval_ms = 60_000;
    let gw = gateway(cfg).await;
    let url = format!("{}/v1", gw.url());
    let script = format!(
        "{}/tests/openai_sdk_stream_error.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut child = std::process::Command::new(python)
        .arg(script)
        .arg(url)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run tests/openai_sdk_stream_error.py");
    let stdout = child.stdout.take().unwrap();
    let control = backends[0].control.clone();
    let output = actix_rt::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if line == "READY" {
                control.set_down(true);
            }
            lines.push(line);
        }
        (child.wait(), lines)
    })
    .await
    .unwrap();
    let (status, lines) = output;
    assert!(
        status.unwrap().success(),
        "the SDK did not raise: {lines:?}"
    );
    assert!(lines.last().unwrap().starts_with("OK"), "{lines:?}");
    gw.stop(false).await;
}
