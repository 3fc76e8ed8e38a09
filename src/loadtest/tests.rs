//! End-to-end tests of `run()` against a throwaway actix-web server.
//!
//! The server lives inside each test on an ephemeral port so the tests need
//! no fixtures and cannot collide; its routes each reproduce one server
//! behaviour the load tester must classify.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::{dev::ServerHandle, web, App, HttpResponse, HttpServer};
use bytes::Bytes;
use futures_util::stream::{self, StreamExt as _};
use serde_json::{json, Value};

use super::{run, LoadtestArgs};

const ROLE: &str = "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n";
const HELLO: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"Hello\"}}]}\n\n";
const USAGE: &str = "data: {\"choices\":[],\"usage\":{\"total_tokens\":5}}\n\n";
const DONE: &str = "data: [DONE]\n\n";

/// Streams `chunks`, each after its delay in milliseconds.
fn sse(chunks: Vec<(u64, String)>) -> HttpResponse {
    let body = stream::iter(chunks).then(|(delay, text)| async move {
        actix_rt::time::sleep(Duration::from_millis(delay)).await;
        Ok::<_, Infallible>(Bytes::from(text))
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .streaming(body)
}

/// Deliberately splits events mid-line and mid-JSON to exercise reassembly.
async fn chat(body: web::Json<Value>) -> HttpResponse {
    let stream = body["stream"] == json!(true);
    let well_formed = body["model"] == "test-model"
        && body["messages"][0]["content"] == "hi"
        && body["max_tokens"] == 4
        && (body["stream_options"]["include_usage"] == json!(true)) == stream;
    if !well_formed {
        return HttpResponse::BadRequest().finish();
    }
    if !stream {
        return HttpResponse::Ok().json(json!({"choices": [{"message": {"content": "Hello"}}]}));
    }
    let all = [ROLE, HELLO, USAGE, DONE].concat();
    let (a, rest) = all.split_at(ROLE.len() + 20);
    let (b, c) = rest.split_at(rest.len() - 7);
    let mut answer = sse(vec![(0, a.into()), (2, b.into()), (0, c.into())]);
    // As the gateway names the backend that answered.
    answer.headers_mut().insert(
        actix_web::http::header::HeaderName::from_static(crate::ingress::proxy::ENDPOINT_HEADER),
        actix_web::http::header::HeaderValue::from_static("3"),
    );
    answer
}

/// Accepts only the shared-prefix shape: a system prompt, then a user question.
async fn prefixed(body: web::Json<Value>) -> HttpResponse {
    let roles = (
        body["messages"][0]["role"].as_str(),
        body["messages"][1]["role"].as_str(),
    );
    let system_len = body["messages"][0]["content"].as_str().map(str::len);
    if roles == (Some("system"), Some("user")) && system_len == Some(300) {
        HttpResponse::Ok().json(json!({"choices": [{"message": {"content": "Hello"}}]}))
    } else {
        HttpResponse::BadRequest().finish()
    }
}

/// A running test server: its base URL, its handle, and how many TCP
/// connections it has accepted (to check keep-alive reuse).
struct TestServer {
    base: String,
    handle: ServerHandle,
    connections: Arc<AtomicUsize>,
}

async fn start_server() -> TestServer {
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&connections);
    let server = HttpServer::new(|| {
        App::new()
            .route("/v1/chat/completions", web::post().to(chat))
            .route("/prefixed", web::post().to(prefixed))
            .route(
                "/503",
                web::post().to(|| async { HttpResponse::ServiceUnavailable().body("busy") }),
            )
            .route(
                "/bad-json",
                web::post().to(|| async { HttpResponse::Ok().body("not json") }),
            )
            .route(
                "/slow",
                web::post().to(|| async {
                    actix_rt::time::sleep(Duration::from_millis(20)).await;
                    HttpResponse::Ok().json(json!({}))
                }),
            )
            .route(
                "/sse-error",
                web::post().to(|| async {
                    sse(vec![
                        (0, HELLO.into()),
                        (0, "data: {\"error\":{\"message\":\"boom\"}}\n\n".into()),
                    ])
                }),
            )
            .route(
                "/truncated",
                web::post().to(|| async { sse(vec![(0, HELLO.into())]) }),
            )
            .route(
                "/long-stream",
                web::post().to(|| async {
                    let mut chunks = vec![(50, HELLO.to_owned()); 5];
                    chunks.push((0, DONE.into()));
                    sse(chunks)
                }),
            )
            .route(
                "/stalled-stream",
                web::post().to(|| async { sse(vec![(0, HELLO.into()), (5_000, DONE.into())]) }),
            )
    })
    .on_connect(move |_, _| {
        counter.fetch_add(1, Ordering::Relaxed);
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(0)
    .bind(("127.0.0.1", 0))
    .expect("bind test server");
    let addr = server.addrs()[0];
    let server = server.run();
    let handle = server.handle();
    actix_rt::spawn(server);
    TestServer {
        base: format!("http://{addr}"),
        handle,
        connections,
    }
}

fn args(url: String, stream: bool) -> LoadtestArgs {
    LoadtestArgs {
        url,
        requests: 50,
        concurrency: 5,
        rate: None,
        stream,
        model: "test-model".into(),
        max_tokens: 4,
        prompt: "hi".into(),
        timeout: 2.0,
        api_key: Some("secret".into()),
        json: false,
        quiet: true,
        prefixes: 0,
        prefix_chars: 8000,
        zipf: 0.0,
        turns: 1,
        sessions: 64,
        unique: false,
        seed: 1,
        arrivals: super::Arrivals::Fixed,
        request_log: None,
    }
}

#[actix_rt::test]
async fn closed_loop_plain_and_streaming() {
    let TestServer {
        base,
        handle,
        connections,
    } = start_server().await;
    let url = format!("{base}/v1/chat/completions");

    // Not quiet, to exercise the progress line (hidden anyway: stderr is not a terminal).
    let plain = run(&LoadtestArgs {
        quiet: false,
        ..args(url.clone(), false)
    })
    .await
    .expect("no request log to fail");
    assert_eq!((plain.ok, plain.failed), (50, 0), "{plain:?}");
    assert!(plain.ttft_ms.is_none());
    assert!(plain.latency_ms.max >= plain.latency_ms.min && plain.rps > 0.0);

    let streamed = run(&args(url, true)).await.expect("no request log to fail");
    assert_eq!((streamed.ok, streamed.failed), (50, 0), "{streamed:?}");
    let ttft = streamed.ttft_ms.as_ref().expect("streams report TTFT");
    assert!(
        ttft.p50 <= streamed.latency_ms.p50 && ttft.min >= 1.0,
        "{streamed:?}"
    );

    // Each run has its own client, so at most one connection per slot per run.
    let accepted = connections.load(Ordering::Relaxed);
    assert!(
        accepted <= 10,
        "keep-alive not reused: {accepted} connections"
    );

    handle.stop(false).await;
}

/// The request log at `path`, a JSON value per line.
fn log_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .expect("log written")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

#[actix_rt::test]
async fn the_request_log_has_a_line_per_request_with_its_time_to_first_token() {
    let TestServer { base, handle, .. } = start_server().await;
    let path = std::env::temp_dir().join(format!(
        "nanogate-loadtest-requests-{}.jsonl",
        std::process::id()
    ));
    let mut a = args(format!("{base}/v1/chat/completions"), true);
    a.requests = 12;
    a.request_log = Some(path.clone());
    let s = run(&a).await.expect("the log is writable");
    assert_eq!(s.ok, 12, "{s:?}");
    let lines = log_lines(&path);
    let mut numbers: Vec<u64> = lines.iter().map(|l| l["n"].as_u64().unwrap()).collect();
    numbers.sort_unstable();
    assert_eq!(numbers, (0..12).collect::<Vec<_>>());
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as f64;
    for line in &lines {
        let (ttft, latency) = (line["ttft_ms"].as_f64(), line["latency_ms"].as_f64());
        assert!(
            ttft.is_some_and(|t| t > 0.0 && t <= latency.unwrap()),
            "{line}"
        );
        let due = line["due_ms"].as_f64().unwrap();
        assert!(due <= now_ms && due > now_ms - 60_000.0, "{line}");
        assert!(line["error"].is_null(), "{line}");
        assert_eq!(line["endpoint"], "3", "the gateway's x-nanogate-endpoint");
    }

    // A failed request's line says why, and names no backend where the answer named none.
    let mut failing = args(format!("{base}/503"), false);
    failing.requests = 2;
    failing.request_log = Some(path.clone());
    let s = run(&failing).await.expect("the log is writable");
    assert_eq!(s.failed, 2, "{s:?}");
    for line in log_lines(&path) {
        assert_eq!(line["error"], "status 503", "{line}");
        assert!(
            line["endpoint"].is_null() && line["ttft_ms"].is_null(),
            "{line}"
        );
    }

    let _ = std::fs::remove_file(&path);
    a.request_log = Some(path.join("not-a-directory"));
    let err = run(&a).await.expect_err("an unwritable log fails the run");
    assert!(err.to_string().contains("--request-log"), "{err}");
    handle.stop(false).await;
}

#[actix_rt::test]
async fn failures_are_classified_by_cause() {
    let TestServer { base, handle, .. } = start_server().await;
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("probe free port")
        .port();
    let cases = [
        ("/503", false, "status 503"),
        ("/bad-json", false, "bad body"),
        ("/sse-error", true, "stream error"),
        ("/truncated", true, "stream incomplete"),
    ];
    for (path, stream, cause) in cases {
        let mut a = args(format!("{base}{path}"), stream);
        a.requests = 10;
        let s = run(&a).await.expect("no request log to fail");
        assert_eq!((s.ok, s.failed), (0, 10), "{path}: {s:?}");
        assert_eq!(s.failures.get(cause), Some(&10), "{path}: {s:?}");
        assert!(s.render().contains(cause));
    }

    let mut a = args(format!("http://127.0.0.1:{closed_port}/"), false);
    a.requests = 3;
    let s = run(&a).await.expect("no request log to fail");
    assert_eq!(s.failures.get("connect"), Some(&3), "{s:?}");

    handle.stop(false).await;
}

#[actix_rt::test]
async fn body_timeout_covers_the_stream_but_no_more() {
    let TestServer { base, handle, .. } = start_server().await;

    // 250 ms of streaming fits in a 1 s budget: must not be cut.
    let mut a = args(format!("{base}/long-stream"), true);
    a.requests = 2;
    a.timeout = 1.0;
    let s = run(&a).await.expect("no request log to fail");
    assert_eq!(s.ok, 2, "{s:?}");

    // A stream that stalls past the budget ends as a timeout, on time.
    let mut a = args(format!("{base}/stalled-stream"), true);
    a.requests = 2;
    a.timeout = 0.3;
    let s = run(&a).await.expect("no request log to fail");
    assert_eq!(s.failures.get("timeout"), Some(&2), "{s:?}");
    assert!(s.elapsed_s < 1.0, "{s:?}");

    handle.stop(false).await;
}

#[actix_rt::test]
async fn open_loop_counts_queueing_from_the_schedule() {
    let TestServer { base, handle, .. } = start_server().await;
    // 100/s against a 20 ms server with one slot: each request waits behind the
    // previous, so from the schedule the i-th takes about 20 + 10·i ms.
    let mut a = args(format!("{base}/slow"), false);
    a.requests = 10;
    a.concurrency = 1;
    a.rate = Some(100.0);
    let s = run(&a).await.expect("no request log to fail");
    assert_eq!(s.ok, 10, "{s:?}");
    assert!(s.latency_ms.max >= 100.0, "{s:?}");
    assert!(s.latency_ms.min >= 20.0, "{s:?}");

    handle.stop(false).await;
}

#[actix_rt::test]
async fn shared_prefix_workload_sends_system_then_user() {
    let TestServer { base, handle, .. } = start_server().await;
    let mut a = args(format!("{base}/prefixed"), false);
    a.prefixes = 3;
    a.prefix_chars = 300;
    let s = run(&a).await.expect("no request log to fail");
    assert_eq!((s.ok, s.failed), (50, 0), "{s:?}");
    handle.stop(false).await;
}
