//! End-to-end check of the simulator over real HTTP on an ephemeral port: wire shapes,
//! streaming order, health and metrics, the down switch and cancellation accounting.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

use super::{start, SimConfig, SimHandle, SimStats};

/// Fast enough that a whole request takes well under a millisecond of simulated GPU time.
fn fast() -> SimConfig {
    SimConfig {
        speed: 100.0,
        ..SimConfig::default()
    }
}

async fn eventually(sim: &SimHandle, what: &str, done: impl Fn(&SimStats) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let stats = sim.control.snapshot();
        if done(&stats) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: still {stats:?}");
        actix_rt::time::sleep(Duration::from_millis(5)).await;
    }
}

fn chat(max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": "sim",
        "messages": [{"role": "user", "content": "sixteen chars!!!"}],
        "max_tokens": max_tokens,
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
}

#[actix_rt::test]
async fn behaves_like_vllm_over_http() {
    let sim = start(([127, 0, 0, 1], 0).into(), fast())
        .await
        .expect("simulator binds");
    let client = awc::Client::default();
    let url = |path: &str| format!("{}{path}", sim.url());

    // Non-streaming chat: the full OpenAI shape.
    let mut res = client
        .post(url("/v1/chat/completions"))
        .send_json(&chat(3, false))
        .await
        .expect("chat answers");
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.expect("chat JSON");
    assert!(body["id"]
        .as_str()
        .is_some_and(|id| id.starts_with("chatcmpl-")));
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "sim");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["message"]["content"], "tok0 tok1 tok2 ");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert!(body["choices"][0]["logprobs"].is_null());
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7})
    );

    // Streaming: role, tokens, finish, usage, [DONE], in that order.
    let mut res = client
        .post(url("/v1/chat/completions"))
        .send_json(&chat(2, true))
        .await
        .expect("stream answers");
    assert_eq!(res.status(), 200);
    let text = res.body().await.expect("stream body");
    let events: Vec<&str> = std::str::from_utf8(&text)
        .expect("utf-8")
        .split_terminator("\n\n")
        .map(|e| e.strip_prefix("data: ").expect("data event"))
        .collect();
    assert_eq!(events.len(), 6, "{events:?}");
    assert_eq!(events[5], "[DONE]");
    let chunks: Vec<Value> = events[..5]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk JSON"))
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    assert_eq!(
        chunks[1]["choices"][0]["delta"],
        json!({"content": "tok0 "})
    );
    assert_eq!(
        chunks[2]["choices"][0]["delta"],
        json!({"content": "tok1 "})
    );
    assert_eq!(chunks[3]["choices"][0]["delta"], json!({}));
    assert_eq!(chunks[3]["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks[4]["choices"], json!([]));
    assert_eq!(chunks[4]["usage"]["total_tokens"], 6);

    // Health is an empty 200; metrics carry vLLM names.
    let mut res = client.get(url("/health")).send().await.expect("health");
    assert_eq!(res.status(), 200);
    assert!(res.body().await.expect("health body").is_empty());
    let mut res = client.get(url("/metrics")).send().await.expect("metrics");
    let metrics = res.body().await.expect("metrics body");
    let metrics = std::str::from_utf8(&metrics).expect("utf-8");
    assert!(metrics.contains("vllm:num_requests_running{model_name=\"sim\"} 0"));

    let mut res = client.get(url("/v1/models")).send().await.expect("models");
    let body: Value = res.json().await.expect("models JSON");
    assert_eq!(body["data"][0]["id"], "sim");
    assert_eq!(body["data"][0]["owned_by"], "nanogate-simulator");
    let mut res = client
        .post(url("/v1/embeddings"))
        .send_json(&json!({"model": "sim", "input": ["a", "b"]}))
        .await
        .expect("embeddings answer");
    let body: Value = res.json().await.expect("embeddings JSON");
    assert_eq!(body["data"][1]["index"], 1);
    assert_eq!(
        body["data"][1]["embedding"].as_array().map(Vec::len),
        Some(8)
    );
    let res = client.get(url("/nope")).send().await.expect("404 answers");
    assert_eq!(res.status(), 404);

    // Garbage: a 200 that is not JSON.
    sim.control.set_garbage(true);
    let res = client
        .post(url("/v1/chat/completions"))
        .send_json(&chat(1, false))
        .await
        .expect("garbage answers");
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers().get("content-type").map(|v| v.as_bytes()),
        Some(&b"text/html"[..])
    );
    sim.control.set_garbage(false);

    // Hang: not even /health answers until unhung.
    sim.control.set_hang(true);
    let hung = client
        .get(url("/health"))
        .timeout(Duration::from_millis(100))
        .send()
        .await;
    assert!(hung.is_err(), "a hung server must not answer");
    sim.control.set_hang(false);

    // Unknown model.
    let mut res = client
        .post(url("/v1/completions"))
        .send_json(&json!({"model": "nope", "prompt": "x"}))
        .await
        .expect("completions answers");
    assert_eq!(res.status(), 404);
    let body: Value = res.json().await.expect("error JSON");
    assert_eq!(body["error"]["code"], "model_not_found");

    // A client that walks away mid-stream frees its slot at once.
    let mut res = client
        .post(url("/v1/chat/completions"))
        .send_json(&chat(1_000_000, true))
        .await
        .expect("long stream answers");
    let first = res.next().await.expect("a chunk").expect("chunk bytes");
    assert!(first.starts_with(b"data: "));
    assert_eq!(sim.control.snapshot().running, 1);
    drop(res);
    eventually(&sim, "cancelled stream", |s| {
        s.running == 0 && s.cancelled == 1
    })
    .await;

    // Going down cuts a live stream and answers 503 to new requests.
    let mut res = client
        .post(url("/v1/chat/completions"))
        .send_json(&chat(1_000_000, true))
        .await
        .expect("long stream answers");
    res.next().await.expect("a chunk").expect("chunk bytes");
    sim.control.set_down(true);
    // awc ends a chunked body cut by EOF like a complete one, so the sign of the cut is the
    // missing `[DONE]` (and the connection being gone).
    let mut tail = Vec::new();
    while let Some(chunk) = res.next().await {
        match chunk {
            Ok(bytes) => tail.extend_from_slice(&bytes),
            Err(_) => break,
        }
    }
    assert!(
        !tail.ends_with(b"data: [DONE]\n\n"),
        "the stream must be cut"
    );
    let res = awc::Client::default()
        .get(url("/health"))
        .send()
        .await
        .expect("down server still answers");
    assert_eq!(res.status(), 503);
    assert_eq!(
        res.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    eventually(&sim, "cut stream", |s| s.running == 0 && s.errors == 2).await;
    sim.control.set_down(false);

    let stats = sim.control.snapshot();
    assert_eq!((stats.requests, stats.completed), (6, 3));
    sim.stop().await;
}

/// Sends [`shared_prompt`] with two different questions, one after the other.
async fn ask_first_two(sim: &SimHandle, max_tokens: u32) {
    let client = awc::Client::default();
    for question in ["question 1: first?", "question 2: second?"] {
        let res = client
            .post(format!("{}/v1/chat/completions", sim.url()))
            .send_json(&shared_prompt(max_tokens, question))
            .await
            .expect("chat answers");
        assert_eq!(res.status(), 200);
    }
}

/// A chat of ten 64-character blocks of shared system prompt (160 tokens) and `question`.
fn shared_prompt(max_tokens: u32, question: &str) -> Value {
    json!({"model": "sim", "max_tokens": max_tokens, "messages": [
        {"role": "system", "content": "s".repeat(640)},
        {"role": "user", "content": question},
    ]})
}

#[actix_rt::test]
async fn shared_prefixes_hit_and_flush_starts_cold() {
    let sim = start(([127, 0, 0, 1], 0).into(), fast())
        .await
        .expect("simulator binds");
    let client = awc::Client::default();
    let url = |path: &str| format!("{}{path}", sim.url());
    let ask = |question: &str| shared_prompt(1, question);
    ask_first_two(&sim, 1).await;
    // Ten 64-character blocks of system prompt, 16 tokens each, hit the second time.
    let stats = sim.control.snapshot();
    assert_eq!(stats.prefix_hit_tokens, 160, "{stats:?}");
    let mut res = client.get(url("/metrics")).send().await.expect("metrics");
    let metrics = res.body().await.expect("metrics body");
    let metrics = std::str::from_utf8(&metrics).expect("utf-8");
    assert!(metrics.contains("vllm:prefix_cache_hits_total{model_name=\"sim\"} 160\n"));

    let mut res = client.post(url("/sim/flush")).send().await.expect("flush");
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.expect("stats JSON");
    assert_eq!(
        (&body["requests"], &body["prefix_hit_tokens"]),
        (&json!(0), &json!(0))
    );
    client
        .post(url("/v1/chat/completions"))
        .send_json(&ask("question 3: third?"))
        .await
        .expect("chat answers");
    assert_eq!(sim.control.snapshot().prefix_hit_tokens, 0);
    sim.stop().await;
}

#[actix_rt::test]
async fn the_request_log_has_a_line_per_request_and_flush_starts_it_afresh() {
    let path = std::env::temp_dir().join(format!(
        "nanogate-sim-requests-{}.jsonl",
        std::process::id()
    ));
    let sim = start(
        ([127, 0, 0, 1], 0).into(),
        SimConfig {
            request_log: Some(path.clone()),
            ..fast()
        },
    )
    .await
    .expect("simulator binds");
    let client = awc::Client::default();
    let url = |path: &str| format!("{}{path}", sim.url());
    let ask = |question: &str| shared_prompt(2, question);
    let lines = || -> Vec<Value> {
        std::fs::read_to_string(&path)
            .expect("request log")
            .lines()
            .map(|line| serde_json::from_str(line).expect("a JSON line"))
            .collect()
    };
    ask_first_two(&sim, 2).await;
    let logged = lines();
    assert_eq!(logged.len(), 2, "{logged:?}");
    assert_eq!(logged[0]["cached_tokens"], 0);
    assert_eq!(logged[1]["cached_tokens"], 160, "{logged:?}");
    assert_eq!(logged[0]["prompt"], logged[1]["prompt"]);
    assert!(logged[0]["prompt"].as_str().is_some_and(|k| k.len() == 16));
    for line in &logged {
        let ttft = line["ttft_ms"].as_f64().expect("ttft_ms");
        assert!(ttft >= line["wait_ms"].as_f64().expect("wait_ms"), "{line}");
        assert!(line["at_ms"]
            .as_u64()
            .is_some_and(|at| at > 1_700_000_000_000));
    }

    let res = client.post(url("/sim/flush")).send().await.expect("flush");
    assert_eq!(res.status(), 200);
    assert!(lines().is_empty(), "flush starts the log afresh");
    client
        .post(url("/v1/chat/completions"))
        .send_json(&ask("question 3: third?"))
        .await
        .expect("chat answers");
    let logged = lines();
    assert_eq!(logged.len(), 1);
    assert_eq!(logged[0]["cached_tokens"], 0, "cold after the flush");
    sim.stop().await;
    let _ = std::fs::remove_file(&path);
}

#[actix_rt::test]
async fn a_request_log_that_cannot_be_written_fails_at_start_naming_the_flag() {
    let cfg = SimConfig {
        request_log: Some("/nonexistent-dir/requests.jsonl".into()),
        ..fast()
    };
    let err = start(([127, 0, 0, 1], 0).into(), cfg)
        .await
        .err()
        .expect("no simulator without its log");
    assert!(err.to_string().contains("--request-log"), "{err}");
}

/// Two different long prompts sent together, with batch slots to spare: the GPU prefills them one
/// after the other, as vLLM fills its steps' token budget, so the second's first token comes about
/// two prefills after it was sent.
#[actix_rt::test]
async fn prompts_sent_together_are_prefilled_one_after_the_other() {
    // 4,000 characters, 1,000 tokens: 200 ms of prefill at 200 µs a token.
    let cfg = SimConfig {
        prefill_us_per_token: 200,
        ..SimConfig::default()
    };
    let sim = start(([127, 0, 0, 1], 0).into(), cfg)
        .await
        .expect("simulator binds");
    let url = format!("{}/v1/chat/completions", sim.url());
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(10))
        .finish();
    let ask = |system: char| {
        let body = json!({"model": "sim", "max_tokens": 1, "messages": [
            {"role": "system", "content": system.to_string().repeat(4000)},
            {"role": "user", "content": "why?"}]});
        let request = client.post(&url).send_json(&body);
        async move {
            let started = Instant::now();
            let res = request.await.expect("chat answers");
            assert_eq!(res.status(), 200);
            started.elapsed()
        }
    };
    let (a, b) = futures_util::future::join(ask('a'), ask('b')).await;
    let (first, second) = (a.min(b), a.max(b));
    assert!(first >= Duration::from_millis(200), "{first:?}");
    assert!(second >= Duration::from_millis(400), "{second:?}");
    sim.stop().await;
}
