//! Tenants: API keys, their limits, token accounting, and the usage log in SQLite and in a real
//! PostgreSQL server, over real HTTP against simulated backends (and wire-faithful fakes where a
//! real server's behaviour matters: no usage at all, recorded headers).

mod common;

use std::time::{Duration, Instant};

use common::fake::{Fake, FakeResponse};
use common::postgres::Postgres;
use common::*;
use nanogate::config::{AuthMode, Config, KeySpec};
use nanogate::gateway::Gateway;
use serde_json::{json, Value};

const ADMIN: &str = "Bearer admin-secret";

fn key(name: &str, secret: &str) -> KeySpec {
    KeySpec {
        name: name.into(),
        secret: Some(secret.into()),
        secret_env: None,
        models: Vec::new(),
        rpm: None,
        tpm: None,
        max_concurrent: None,
        daily_tokens: None,
    }
}

fn keys_config(urls: &[String], database: &str) -> Config {
    let mut c = config(&[]);
    c.endpoints = urls
        .iter()
        .map(|u| nanogate_actors::endpoint::EndpointSpec::new(u.clone()))
        .collect();
    c.auth.mode = AuthMode::Keys;
    c.admin.token = "admin-secret".into();
    c.usage.database = database.into();
    c.usage.flush_interval_ms = 100;
    c.keys = vec![KeySpec {
        models: vec!["sim".into()],
        rpm: Some(100_000),
        tpm: Some(100_000_000),
        ..key("good", "ng-good-secret")
    }];
    c
}

/// A SQLite file of the test's own, removed with its WAL and shared-memory files however the
/// test ends.
struct TempDb(std::path::PathBuf);

impl std::ops::Deref for TempDb {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut file = self.0.clone().into_os_string();
            file.push(suffix);
            let _ = std::fs::remove_file(file);
        }
    }
}

fn temp_db(name: &str) -> TempDb {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    TempDb(std::env::temp_dir().join(format!(
        "nanogate-test-{name}-{}-{stamp}.db",
        std::process::id()
    )))
}

async fn send(client: &awc::Client, url: &str, key: Option<&str>, body: &Value) -> Answer {
    post_as(client, url, key, serde_json::to_vec(body).unwrap()).await
}

async fn admin(client: &awc::Client, method: &str, url: &str, body: Option<Value>) -> Answer {
    let request = client
        .request(method.parse().unwrap(), url)
        .insert_header(("authorization", ADMIN));
    let mut response = match body {
        Some(body) => request.send_json(&body).await,
        None => request.send().await,
    }
    .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let body = response.body().limit(64 << 20).await.expect("body");
    Answer {
        status: response.status(),
        headers: response.headers().clone(),
        body,
    }
}

fn chat_json() -> &'static str {
    r#"{"id":"cmpl-1","object":"chat.completion","created":1,"model":"sim","choices":[{"index":0,"message":{"role":"assistant","content":"hello there"},"finish_reason":"stop"}]}"#
}

#[actix_rt::test]
async fn keys_are_required_checked_per_model_and_never_sent_upstream() {
    // A backend that records what it was sent, with a key of its own.
    let backend = Fake::start(|r| match r.path.as_str() {
        "/health" => FakeResponse::empty(200),
        _ => FakeResponse::json(200, chat_json()),
    });
    let mut c = keys_config(std::slice::from_ref(&backend.url), "off");
    c.endpoints[0].models = vec!["sim".into(), "other".into()];
    c.endpoints[0].api_key = Some("backend-secret".into());
    let gw = gateway(c).await;
    let (client, url) = (client(), format!("{}/v1/chat/completions", gw.url()));

    let missing = send(&client, &url, None, &chat(4)).await;
    assert_eq!(missing.status, 401);
    assert_eq!(missing.json()["error"]["code"], "invalid_api_key");
    let wrong = send(&client, &url, Some("ng-wrong"), &chat(4)).await;
    assert_eq!(wrong.status, 401);
    let mut other = chat(4);
    other["model"] = json!("other");
    let forbidden = send(&client, &url, Some("ng-good-secret"), &other).await;
    assert_eq!(forbidden.status, 403);
    assert_eq!(forbidden.json()["error"]["code"], "model_not_found");

    // An OpenAI route spelled otherwise is that route, checked (and accounted) as it is.
    let alias = format!("{}/v1//chat/completions", gw.url());
    let mut unnamed = chat(4);
    unnamed.as_object_mut().unwrap().remove("model");
    let refused = send(&client, &alias, Some("ng-good-secret"), &unnamed).await;
    assert_eq!(refused.status, 400, "{}", refused.text());
    let refused = send(&client, &alias, Some("ng-good-secret"), &other).await;
    assert_eq!(refused.status, 403);
    // A passed-through route must name an allowed model (else the backend would pick its own),
    // and be a POST: a GET of stored objects ignores any body and would reach every key's.
    let other_route = format!("{}/v1/rerank", gw.url());
    let refused = send(&client, &other_route, Some("ng-good-secret"), &unnamed).await;
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert_eq!(refused.json()["error"]["code"], "model_required");
    let listed = client
        .get(format!("{}/v1/files", gw.url()))
        .insert_header(("authorization", "Bearer ng-good-secret"))
        .insert_header(("content-type", "application/json"))
        .send_body(r#"{"model":"sim"}"#)
        .await
        .unwrap();
    assert_eq!(listed.status(), 403);

    let good = send(&client, &url, Some("ng-good-secret"), &chat(4)).await;
    assert_eq!(good.status, 200, "{}", good.text());
    assert_eq!(
        good.header("x-ratelimit-limit-requests").as_deref(),
        Some("100000")
    );
    assert!(good.header("x-ratelimit-remaining-tokens").is_some());
    let sent = backend.on("/v1/chat/completions");
    assert_eq!(sent.len(), 1, "only the admitted request went upstream");
    assert_eq!(
        sent[0].header("authorization"),
        Some("Bearer backend-secret")
    );
    assert!(sent[0].header("x-api-key").is_none());
    // Anthropic's SDKs send the key as `x-api-key`: accepted, and not passed on either.
    let mut anthropic_style = client
        .post(&url)
        .insert_header(("x-api-key", "ng-good-secret"))
        .send_json(&chat(4))
        .await
        .unwrap();
    assert_eq!(anthropic_style.status(), 200);
    let _ = anthropic_style.body().await;
    let sent = backend.on("/v1/chat/completions");
    assert!(sent[1].header("x-api-key").is_none());
    assert_eq!(
        sent[1].header("authorization"),
        Some("Bearer backend-secret")
    );

    let models = client
        .get(format!("{}/v1/models", gw.url()))
        .insert_header(("authorization", "Bearer ng-good-secret"))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["sim"]);
    let anonymous = client
        .get(format!("{}/v1/models", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    gw.stop(false).await;
}

/// The stream's bytes with the parts that differ between any two answers (ids, timestamps)
/// made equal.
fn normalized(body: &str) -> String {
    let mut out = String::with_capacity(body.len());
    for line in body.split_inclusive('\n') {
        match serde_json::from_str::<Value>(line.trim().trim_start_matches("data: ")) {
            Ok(Value::Object(mut event)) => {
                event.insert("id".into(), json!("-"));
                event.insert("created".into(), json!(0));
                out.push_str(&format!("data: {}\n", Value::Object(event)));
            }
            _ => out.push_str(line),
        }
    }
    out
}

#[actix_rt::test]
async fn a_stream_is_counted_and_its_client_gets_the_bytes_it_asked_for() {
    let backends = sims(vec![fast()]).await;
    let gw = gateway(keys_config(&[backends[0].url()], "off")).await;
    let client = client();
    let body = json!({"model": "sim", "messages": [{"role": "user", "content": "Say hello"}],
                      "max_tokens": 6, "stream": true});
    let direct = post(
        &client,
        &format!("{}/v1/chat/completions", backends[0].url()),
        &body,
    )
    .await;
    let through = send(
        &client,
        &format!("{}/v1/chat/completions", gw.url()),
        Some("ng-good-secret"),
        &body,
    )
    .await;
    assert_eq!(through.status, 200);
    assert!(!through.text().contains("\"usage\""), "{}", through.text());
    assert_eq!(normalized(&through.text()), normalized(&direct.text()));

    let mut asked = body.clone();
    asked["stream_options"] = json!({"include_usage": true});
    let with_usage = send(
        &client,
        &format!("{}/v1/chat/completions", gw.url()),
        Some("ng-good-secret"),
        &asked,
    )
    .await;
    assert!(with_usage.text().contains("\"completion_tokens\":6"));

    let counted = eventually(Duration::from_secs(5), || async {
        let s = stats(&client, &gw).await;
        s["metrics"]["keys"]["good"]["tokens"]["completion"] == json!(12)
    })
    .await;
    let s = stats(&client, &gw).await;
    assert!(counted, "{}", s["metrics"]["keys"]);
    assert_eq!(
        s["metrics"]["keys"]["good"]["tokens"]["estimated_answers"],
        0
    );
    let metrics = get(&client, &format!("{}/metrics", gw.url())).await.text();
    assert!(metrics.contains(r#"nanogate_key_tokens_total{key="good",kind="completion"} 12"#));
    gw.stop(false).await;
}

#[actix_rt::test]
async fn a_client_that_did_not_ask_gets_openais_stream_as_openai_would_send_it() {
    // OpenAI with `include_usage` adds `"usage":null` to every chunk and a usage chunk at the
    // end; without it, neither. The gateway asks on the client's behalf and must undo both.
    let backend = Fake::start(|r| {
        if r.path == "/health" {
            return FakeResponse::empty(200);
        }
        let body = r.json();
        let asked = body["stream_options"]["include_usage"] == json!(true);
        let usage = if asked { r#","usage":null"# } else { "" };
        let mut frames: Vec<String> = ["Hel", "lo"]
            .iter()
            .map(|t| {
                format!(
                    "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"sim\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{t}\"}},\"finish_reason\":null}}]{usage}}}\n\n"
                )
            })
            .collect();
        if asked {
            frames.push(
                r#"data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"sim","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}"#
                    .to_string()
                    + "\n\n",
            );
        }
        frames.push("data: [DONE]\n\n".into());
        FakeResponse::sse(frames, true)
    });
    let mut c = keys_config(std::slice::from_ref(&backend.url), "off");
    c.endpoints[0].models = vec!["sim".into()];
    let gw = gateway(c).await;
    let client = client();
    let body = json!({"model": "sim", "messages": [{"role": "user", "content": "hi"}],
                      "stream": true});
    let direct = post(
        &client,
        &format!("{}/v1/chat/completions", backend.url),
        &body,
    )
    .await;
    assert!(!direct.text().contains("usage"));
    let through = send(
        &client,
        &format!("{}/v1/chat/completions", gw.url()),
        Some("ng-good-secret"),
        &body,
    )
    .await;
    assert_eq!(through.status, 200);
    assert_eq!(through.text(), direct.text());
    let counted = eventually(Duration::from_secs(5), || async {
        stats(&client, &gw).await["metrics"]["keys"]["good"]["tokens"]["completion"] == json!(2)
    })
    .await;
    assert!(counted, "{}", stats(&client, &gw).await["metrics"]["keys"]);
    gw.stop(false).await;
}

#[actix_rt::test]
async fn prompt_tokens_the_backend_cached_are_counted_apart() {
    let backends = sims(vec![fast()]).await;
    let gw = gateway(keys_config(&[backends[0].url()], "off")).await;
    let client = client();
    let url = format!("{}/v1/chat/completions", gw.url());
    let system: String = (0..4000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let body = json!({"model": "sim", "max_tokens": 2, "messages": [
        {"role": "system", "content": system}, {"role": "user", "content": "hello"}]});
    let cold = send(&client, &url, Some("ng-good-secret"), &body).await;
    assert!(cold.json()["usage"]["prompt_tokens_details"].is_null());
    let warm = send(&client, &url, Some("ng-good-secret"), &body).await;
    let cached = warm.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("the second request's prefix is cached");
    assert!(cached > 0);
    let mut stream = body.clone();
    stream["stream"] = json!(true);
    let streamed = send(&client, &url, Some("ng-good-secret"), &stream).await;
    assert!(
        !streamed.text().contains("cached_tokens"),
        "the usage chunk was removed"
    );
    let counted = eventually(Duration::from_secs(5), || async {
        let tokens = &stats(&client, &gw).await["metrics"]["keys"]["good"]["tokens"];
        tokens["cached"].as_u64() == Some(2 * cached)
    })
    .await;
    assert!(counted, "{}", stats(&client, &gw).await["metrics"]["keys"]);
    let metrics = get(&client, &format!("{}/metrics", gw.url())).await.text();
    let line = format!(
        r#"nanogate_key_tokens_total{{key="good",kind="cached"}} {}"#,
        2 * cached
    );
    assert!(metrics.contains(&line), "{line}");
    gw.stop(false).await;
}

#[actix_rt::test]
async fn an_answer_without_usage_is_counted_by_an_estimate() {
    // llama-cpp-python's server and some mock servers send no usage at all.
    let backend = Fake::start(|r| match r.path.as_str() {
        "/health" => FakeResponse::empty(200),
        _ => FakeResponse::json(200, chat_json()),
    });
    let mut c = keys_config(std::slice::from_ref(&backend.url), "off");
    c.endpoints[0].models = vec!["sim".into()];
    let gw = gateway(c).await;
    let client = client();
    let answer = send(
        &client,
        &format!("{}/v1/chat/completions", gw.url()),
        Some("ng-good-secret"),
        &chat(4),
    )
    .await;
    assert_eq!(answer.status, 200);
    let estimated = eventually(Duration::from_secs(5), || async {
        stats(&client, &gw).await["metrics"]["keys"]["good"]["tokens"]["estimated_answers"]
            == json!(1)
    })
    .await;
    assert!(estimated);
    let tokens = &stats(&client, &gw).await["metrics"]["keys"]["good"]["tokens"];
    assert!(tokens["prompt"].as_u64().unwrap() > 0);
    assert!(tokens["completion"].as_u64().unwrap() > 0);
    gw.stop(false).await;
}

#[actix_rt::test]
async fn a_requests_per_minute_limit_admits_exactly_its_burst_under_concurrency() {
    let backends = sims(vec![fast()]).await;
    let mut c = keys_config(&[backends[0].url()], "off");
    c.keys.push(KeySpec {
        rpm: Some(20),
        ..key("limited", "ng-limited-secret")
    });
    let gw = gateway(c).await;
    let client = client();
    let url = format!("{}/v1/chat/completions", gw.url());
    let body = chat(2);
    let answers = futures_util::future::join_all(
        (0..60).map(|_| send(&client, &url, Some("ng-limited-secret"), &body)),
    )
    .await;
    let admitted = answers.iter().filter(|a| a.status == 200).count();
    assert!((20..=21).contains(&admitted), "{admitted} admitted");
    for refused in answers.iter().filter(|a| a.status != 200) {
        assert_eq!(refused.status, 429);
        assert_eq!(refused.json()["error"]["code"], "rate_limit_exceeded");
        // One request every 3 s.
        let after: u64 = refused.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=3).contains(&after), "retry-after {after}");
        let ms: u64 = refused.header("retry-after-ms").unwrap().parse().unwrap();
        assert!(ms <= 3000);
        assert_eq!(
            refused.header("x-ratelimit-remaining-requests").as_deref(),
            Some("0")
        );
    }
    gw.stop(false).await;
}

#[actix_rt::test]
async fn tokens_per_minute_are_charged_from_the_usage_of_answers() {
    let backends = sims(vec![fast()]).await;
    let mut c = keys_config(&[backends[0].url()], "off");
    c.keys.push(KeySpec {
        tpm: Some(30),
        ..key("small", "ng-small-secret")
    });
    let gw = gateway(c).await;
    let client = client();
    let url = format!("{}/v1/chat/completions", gw.url());
    let first = send(&client, &url, Some("ng-small-secret"), &chat(40)).await;
    assert_eq!(
        first.status, 200,
        "admitted while the key is under its limit"
    );
    let used = first.json()["usage"]["total_tokens"].as_u64().unwrap();
    assert!(used > 30);
    let second = send(&client, &url, Some("ng-small-secret"), &chat(40)).await;
    assert_eq!(second.status, 429);
    assert_eq!(second.json()["error"]["type"], "tokens");
    // The debt (used - 30 tokens) refills at half a token a second.
    let after: u64 = second.header("retry-after").unwrap().parse().unwrap();
    assert!(
        after >= (used - 30) * 2,
        "retry-after {after} for {used} tokens"
    );
    gw.stop(false).await;
}

#[actix_rt::test]
async fn cached_answers_stay_with_the_key_that_filled_them() {
    let backends = sims(vec![fast()]).await;
    for shared in [false, true] {
        let mut c = keys_config(&[backends[0].url()], "off");
        c.keys.push(key("second", "ng-second-secret"));
        c.cache.shared = shared;
        let gw = gateway(c).await;
        let client = client();
        let url = format!("{}/v1/chat/completions", gw.url());
        let mut body = chat(3);
        body["temperature"] = json!(0);
        let fill = send(&client, &url, Some("ng-good-secret"), &body).await;
        assert_eq!(fill.header("x-nanogate-cache").as_deref(), Some("miss"));
        let again = send(&client, &url, Some("ng-good-secret"), &body).await;
        assert_eq!(again.header("x-nanogate-cache").as_deref(), Some("hit"));
        let other = send(&client, &url, Some("ng-second-secret"), &body).await;
        let expected = if shared { "hit" } else { "miss" };
        assert_eq!(other.header("x-nanogate-cache").as_deref(), Some(expected));
        gw.stop(false).await;
    }
}

/// What the clients saw of a mixed load, to compare with the usage log.
#[derive(Default, Debug)]
struct Seen {
    requests: u64,
    errors: u64,
    prompt: u64,
    completion: u64,
}

/// `count` requests at 16 at a time: chats, streams with usage, unknown models (404) and
/// malformed bodies (400), under two keys.
async fn mixed_load(gw_url: &str, count: usize) -> Seen {
    let client = client();
    let url = format!("{gw_url}/v1/chat/completions");
    let mut seen = Seen::default();
    let jobs: Vec<usize> = (0..count).collect();
    for batch in jobs.chunks(16) {
        let answers = futures_util::future::join_all(batch.iter().map(|&i| {
            let (client, url) = (&client, &url);
            async move {
                let key = if i % 2 == 0 {
                    "ng-good-secret"
                } else {
                    "ng-other-secret"
                };
                let body = match i % 10 {
                    0 => json!({"model": "nope", "messages": []}),
                    1 => json!({"messages": "not a list"}),
                    2 | 3 => json!({"model": "sim", "max_tokens": 3, "stream": true,
                                    "stream_options": {"include_usage": true},
                                    "messages": [{"role": "user", "content": format!("hi {i}")}]}),
                    _ => json!({"model": "sim", "max_tokens": 2 + i % 4,
                                "messages": [{"role": "user", "content": format!("hello {i}")}]}),
                };
                send(client, url, Some(key), &body).await
            }
        }))
        .await;
        for answer in answers {
            seen.requests += 1;
            if answer.status.as_u16() >= 400 {
                seen.errors += 1;
                continue;
            }
            let text = answer.text();
            let usage = if text.starts_with("data:") {
                sse_events(&text)
                    .iter()
                    .filter_map(|e| serde_json::from_str::<Value>(e).ok())
                    .find(|e| e["usage"].is_object())
                    .map(|e| e["usage"].clone())
            } else {
                Some(answer.json()["usage"].clone())
            };
            let usage = usage.expect("every answer carries usage");
            seen.prompt += usage["prompt_tokens"].as_u64().unwrap();
            seen.completion += usage["completion_tokens"].as_u64().unwrap();
        }
    }
    seen
}

async fn usage_totals(client: &awc::Client, gw: &Gateway, query: &str) -> Value {
    let answer = admin(
        client,
        "GET",
        &format!("{}/admin/usage{query}", gw.url()),
        None,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    answer.json()
}

fn with_second_key(mut c: Config) -> Config {
    c.keys.push(KeySpec {
        models: vec!["sim".into()],
        ..key("other", "ng-other-secret")
    });
    c
}

#[actix_rt::test]
async fn records_past_the_retention_are_pruned_and_the_rest_kept() {
    // A log a gateway wrote before: 12,000 records of ten days ago (more than one prune's slice)
    // and 5 of an hour ago.
    let db = temp_db("retention");
    let database = format!("sqlite:{}", db.display());
    let settings = usage_database(&database);
    let store = nanogate_actors::store::Store::open(&settings)
        .await
        .unwrap()
        .expect("a store");
    store.migrate().await.unwrap();
    let now = nanogate_actors::clock::unix_ms();
    let record = |i: usize, at_ms: i64| nanogate_actors::usage::UsageRecord {
        at_ms,
        request_id: format!("old-{i}"),
        key: None,
        model: Some("sim".into()),
        endpoint: None,
        status: 200,
        usage: Default::default(),
        ttft_ms: None,
        latency_ms: 1.0,
        cache_hit: false,
        retries: 0,
        error: None,
    };
    let old: Vec<_> = (0..12_000)
        .map(|i| record(i, now - 10 * 86_400_000))
        .collect();
    for batch in old.chunks(4000) {
        store
            .insert_usage(&std::sync::Arc::new(batch.to_vec()))
            .await
            .unwrap();
    }
    let recent: Vec<_> = (0..5).map(|i| record(i, now - 3_600_000)).collect();
    store
        .insert_usage(&std::sync::Arc::new(recent))
        .await
        .unwrap();
    store.close();

    let backends = sims(vec![fast()]).await;
    let mut c = keys_config(&[backends[0].url()], &database);
    c.usage.retention_days = 1;
    let gw = gateway(c).await;
    let client = client();
    usage_log_reaches(&client, &gw, "pruned", 12_000).await;
    let total = usage_totals(&client, &gw, "").await;
    assert_eq!(total["rows"][0]["requests"], 5, "{total}");
    gw.stop(false).await;
}

/// Waits up to 10 s for the usage log's `counter` in `/stats` to read `value`, and fails showing
/// the usage log's counters if it does not.
async fn usage_log_reaches(client: &awc::Client, gw: &Gateway, counter: &str, value: u64) {
    let reached = eventually(Duration::from_secs(10), || async {
        stats(client, gw).await["usage_log"][counter] == json!(value)
    })
    .await;
    assert!(reached, "{}", stats(client, gw).await["usage_log"]);
}

/// The store settings a config's `[usage]` gives for `database`.
fn usage_database(database: &str) -> nanogate_actors::store::DatabaseSettings {
    let mut c = config(&[]);
    c.usage.database = database.into();
    c.usage.database()
}

#[actix_rt::test]
async fn the_usage_log_in_sqlite_matches_what_the_clients_saw() {
    let backends = sims(vec![fast(), fast()]).await;
    let db = temp_db("sqlite-log");
    let urls: Vec<String> = backends.iter().map(|b| b.url()).collect();
    let c = with_second_key(keys_config(&urls, &format!("sqlite:{}", db.display())));
    let gw = gateway(c).await;
    let seen = mixed_load(&gw.url(), 1000).await;
    let client = client();
    // Records reach the log through the threads' report batches and the metrics actor.
    usage_log_reaches(&client, &gw, "written", 1000).await;
    let total = usage_totals(&client, &gw, "").await;
    let row = &total["rows"][0];
    assert_eq!(row["requests"], seen.requests, "{total}");
    assert_eq!(row["errors"], seen.errors);
    assert_eq!(row["prompt_tokens"], seen.prompt);
    assert_eq!(row["completion_tokens"], seen.completion);
    assert!(row["p99_latency_ms"].as_f64().unwrap() >= row["p50_latency_ms"].as_f64().unwrap());
    let by_key = usage_totals(&client, &gw, "?group_by=key").await;
    let keys: Vec<&str> = by_key["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["group"].as_str().unwrap())
        .collect();
    assert_eq!(keys, vec!["good", "other"]);
    assert_eq!(by_key["rows"][0]["requests"], 500);
    let only = usage_totals(&client, &gw, "?key=good&model=sim").await;
    assert!(only["rows"][0]["requests"].as_u64().unwrap() < 500);
    gw.stop(false).await;
}

#[actix_rt::test]
async fn the_usage_log_in_postgres_rides_out_a_database_crash() {
    let pg = Postgres::start();
    let backends = sims(vec![fast(), fast()]).await;
    let urls: Vec<String> = backends.iter().map(|b| b.url()).collect();
    let mut c = with_second_key(keys_config(&urls, &pg.url));
    c.usage.retry_interval_ms = 100;
    c.usage.buffer_records = 600;
    c.usage.batch_records = 500;
    c.usage.pool_min_connections = 2;
    let gw = gateway(c).await;
    let load = actix_rt::spawn(mixed_load_owned(gw.url(), 1000));
    actix_rt::time::sleep(Duration::from_millis(300)).await;
    pg.kill();
    actix_rt::time::sleep(Duration::from_millis(1500)).await;
    pg.restart();
    let seen = load.await.unwrap();
    let client = client();
    assert_eq!(seen.requests, 1000);
    assert_eq!(
        seen.errors, 200,
        "only the malformed and unknown-model requests failed"
    );
    let settled = eventually(Duration::from_secs(20), || async {
        let log = &stats(&client, &gw).await["usage_log"];
        log["buffered"] == json!(0)
            && log["written"].as_u64().unwrap() + log["dropped"].as_u64().unwrap() == 1000
    })
    .await;
    let log = stats(&client, &gw).await["usage_log"].clone();
    assert!(settled, "{log}");
    assert!(
        log["failed_writes"].as_u64().unwrap() > 0,
        "the crash was noticed: {log}"
    );
    let total = usage_totals(&client, &gw, "").await;
    assert_eq!(
        total["rows"][0]["requests"].as_u64().unwrap(),
        1000 - log["dropped"].as_u64().unwrap(),
        "every record is in the table but those counted as dropped: {log}"
    );
    gw.stop(false).await;
}

async fn mixed_load_owned(url: String, count: usize) -> Seen {
    mixed_load(&url, count).await
}

#[actix_rt::test]
async fn admin_keys_survive_a_restart_and_a_revoked_key_is_refused_at_once() {
    let backends = sims(vec![fast()]).await;
    let db = temp_db("keys");
    let database = format!("sqlite:{}", db.display());
    let urls = vec![backends[0].url()];
    let client = client();
    let gw = gateway(keys_config(&urls, &database)).await;
    let created = admin(
        &client,
        "POST",
        &format!("{}/admin/keys", gw.url()),
        Some(json!({"name": "team-a", "models": ["sim"], "rpm": 100})),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let secret = created.json()["secret"].as_str().unwrap().to_string();
    let malformed = client
        .post(format!("{}/admin/keys", gw.url()))
        .insert_header(("authorization", ADMIN))
        .send_body("{\"name\": ")
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    let oversized = client
        .post(format!("{}/admin/keys", gw.url()))
        .insert_header(("authorization", ADMIN))
        .send_body(vec![b' '; 100_000])
        .await
        .unwrap();
    assert_eq!(oversized.status(), 413);
    for bad in [
        json!({"name": "team-a"}),
        json!({"name": "team-b", "rpm": 0}),
        json!({"name": "team-c", "tpm": -5}),
        json!({"name": "bad name!"}),
    ] {
        let refused = admin(
            &client,
            "POST",
            &format!("{}/admin/keys", gw.url()),
            Some(bad),
        )
        .await;
        assert!(
            matches!(refused.status.as_u16(), 400 | 409),
            "{}",
            refused.text()
        );
        assert!(refused.json()["error"]["message"].is_string());
    }
    let listed = admin(&client, "GET", &format!("{}/admin/keys", gw.url()), None).await;
    assert!(
        !listed.text().contains(&secret),
        "the secret is shown once only"
    );
    let url = format!("{}/v1/chat/completions", gw.url());
    assert_eq!(
        send(&client, &url, Some(&secret), &chat(2)).await.status,
        200
    );
    gw.stop(true).await;

    let gw = gateway(keys_config(&urls, &database)).await;
    let url = format!("{}/v1/chat/completions", gw.url());
    assert_eq!(
        send(&client, &url, Some(&secret), &chat(2)).await.status,
        200
    );
    let patched = admin(
        &client,
        "PATCH",
        &format!("{}/admin/keys/team-a", gw.url()),
        Some(json!({"rpm": null, "tpm": 5000})),
    )
    .await;
    assert_eq!(patched.status, 200, "{}", patched.text());
    assert_eq!(
        patched.json()["limits"],
        json!({"rpm": null, "tpm": 5000, "max_concurrent": null, "daily_tokens": null})
    );
    let unknown = admin(
        &client,
        "DELETE",
        &format!("{}/admin/keys/nobody", gw.url()),
        None,
    )
    .await;
    assert_eq!(unknown.status, 404);
    let revoked = admin(
        &client,
        "DELETE",
        &format!("{}/admin/keys/team-a", gw.url()),
        None,
    )
    .await;
    assert_eq!(revoked.status, 200);
    assert_eq!(
        send(&client, &url, Some(&secret), &chat(2)).await.status,
        401
    );
    gw.stop(true).await;

    let gw = gateway(keys_config(&urls, &database)).await;
    let url = format!("{}/v1/chat/completions", gw.url());
    assert_eq!(
        send(&client, &url, Some(&secret), &chat(2)).await.status,
        401
    );
    gw.stop(false).await;
}

#[actix_rt::test]
async fn a_sqlite_file_that_cannot_be_written_stops_the_start_naming_it() {
    let mut c = config(&[]);
    c.endpoints = vec![nanogate_actors::endpoint::EndpointSpec::new(
        "http://127.0.0.1:9",
    )];
    c.usage.database = "sqlite:/nonexistent-dir/usage.db".into();
    let error = Gateway::start(c)
        .await
        .err()
        .expect("the start fails")
        .to_string();
    assert!(error.contains("usage.database"), "{error}");
    assert!(error.contains("/nonexistent-dir/usage.db"), "{error}");
}

#[actix_rt::test]
async fn a_postgres_server_that_does_not_answer_does_not_stop_the_gateway() {
    let backends = sims(vec![fast()]).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut c = keys_config(
        &[backends[0].url()],
        &format!("postgres://nanogate@127.0.0.1:{port}/postgres"),
    );
    c.usage.connect_timeout_ms = 200;
    let gw = gateway(c).await;
    let client = client();
    let answer = send(
        &client,
        &format!("{}/v1/chat/completions", gw.url()),
        Some("ng-good-secret"),
        &chat(2),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        get(&client, &format!("{}/ready", gw.url())).await.status,
        200
    );
    gw.stop(false).await;
}

#[actix_rt::test]
async fn the_openai_sdk_sees_401_403_and_429_and_backs_off_as_told() {
    let Some(python) = sdk_python() else {
        return;
    };
    let backends = sims(vec![fast()]).await;
    let mut c = keys_config(&[backends[0].url()], "off");
    c.keys[0].rpm = Some(1000);
    c.keys[0].tpm = Some(1_000_000);
    c.keys.push(KeySpec {
        rpm: Some(30),
        ..key("limited", "ng-limited-secret")
    });
    let gw = gateway(c).await;
    let url = format!("{}/v1", gw.url());
    let args = [
        url.as_str(),
        "ng-good-secret",
        "ng-limited-secret",
        "sim",
        "forbidden-model",
    ];
    run_sdk_script(&python, "openai_sdk_keys.py", &args).await;
    gw.stop(false).await;
}

/// Not a test but a measurement, run by scripts/bench-tenants.sh (`--ignored`, release build):
/// how many records a second the store takes in batches of `usage.batch_records` (SQLite file,
/// and a PostgreSQL server of its own), and how much the usage log buffers, drops and takes to
/// drain when PostgreSQL is down under load. It checks only that every record arrived.
#[actix_rt::test]
#[ignore]
async fn usage_log_throughput() {
    use nanogate_actors::store::{Store, UsageQuery};
    use nanogate_actors::usage::{TokenUsage, UsageRecord};
    let pg = Postgres::start();
    let db = temp_db("throughput");
    let record = |i: usize| UsageRecord {
        at_ms: 1_700_000_000_000 + i as i64,
        request_id: format!("{i:032x}"),
        key: Some("team-a".into()),
        model: Some("llama-3-8b".into()),
        endpoint: Some("http://10.0.0.1:8000".into()),
        status: 200,
        usage: TokenUsage {
            prompt: 812,
            completion: 64,
            cached: 512,
            cached_known: true,
            estimated: false,
        },
        ttft_ms: Some(41.5),
        latency_ms: 812.25,
        cache_hit: false,
        retries: 0,
        error: None,
    };
    for database in [format!("sqlite:{}", db.display()), pg.url.clone()] {
        let mut c = config(&[]);
        c.usage.database = database.clone();
        let store = Store::open(&c.usage.database()).await.unwrap().unwrap();
        store.migrate().await.unwrap();
        let batch = c.usage.batch_records;
        let records = std::sync::Arc::new((0..batch).map(record).collect::<Vec<UsageRecord>>());
        let batches = 200;
        let started = Instant::now();
        for _ in 0..batches {
            store.insert_usage(&records).await.unwrap();
        }
        let took = started.elapsed();
        let total = usage_report_requests(&store, &UsageQuery::default()).await;
        assert_eq!(total, (batch * batches) as u64);
        println!(
            "store {}: {} records in batches of {batch} in {:.2} s: {:.0} records/s",
            store.kind(),
            batch * batches,
            took.as_secs_f64(),
            (batch * batches) as f64 / took.as_secs_f64()
        );
        store.close();
    }

    // The log under load with PostgreSQL down for 5 s.
    let backends = sims(vec![fast(), fast()]).await;
    let urls: Vec<String> = backends.iter().map(|b| b.url()).collect();
    let c = with_second_key(keys_config(&urls, &pg.url));
    let gw = gateway(c).await;
    let client = client();
    let url = format!("{}/v1/chat/completions", gw.url());
    pg.kill();
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < Duration::from_secs(5) {
        let body = chat(2);
        let answers = futures_util::future::join_all(
            (0..32).map(|_| send(&client, &url, Some("ng-good-secret"), &body)),
        )
        .await;
        assert!(answers.iter().all(|a| a.status == 200));
        sent += 32;
    }
    let down = stats(&client, &gw).await["usage_log"].clone();
    pg.restart();
    let restarted = Instant::now();
    let drained = eventually(Duration::from_secs(60), || async {
        let log = &stats(&client, &gw).await["usage_log"];
        log["written"].as_u64().unwrap() + log["dropped"].as_u64().unwrap() >= sent
    })
    .await;
    let log = stats(&client, &gw).await["usage_log"].clone();
    assert!(drained, "{log}");
    println!(
        "postgres down 5 s under load: {sent} requests answered ({:.0}/s), buffered {} (peak {}), dropped {}; drained {:.2} s after the restart; written {}",
        sent as f64 / 5.0,
        down["buffered"],
        log["peak_buffered"],
        log["dropped"],
        restarted.elapsed().as_secs_f64(),
        log["written"]
    );
    gw.stop(false).await;
}

async fn usage_report_requests(
    store: &nanogate_actors::store::Store,
    query: &nanogate_actors::store::UsageQuery,
) -> u64 {
    store.usage_report(query).await.unwrap()[0].requests
}
