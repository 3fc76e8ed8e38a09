//! Hostile clients and broken backends, over real HTTP and raw TCP: nothing a client or a backend
//! sends makes the gateway buffer without bound, answer one client with another's answer, hold a
//! slot for a client that left, or forward a path outside `/v1`. Memory is asserted on the
//! gateway's own buffer counters (`/stats`), never on the process's RSS.

mod common;

use std::time::{Duration, Instant};

use common::rogue::{Behaviour, Rogue};
use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};

fn chat_url(gw: &nanogate::gateway::Gateway) -> String {
    format!("{}/v1/chat/completions", gw.url())
}

fn deterministic_chat() -> Value {
    json!({"model": "sim", "messages": [{"role": "user", "content": "Say hello"}], "temperature": 0, "max_tokens": 4})
}

/// A request head for a raw connection.
fn raw_post(path: &str, extra_headers: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra_headers}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn status_of(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"))
}

#[actix_rt::test]
async fn an_endless_answer_to_a_cacheable_request_streams_with_bounded_buffering() {
    let rogue = Rogue::start(Behaviour::EndlessChunked { chunk: 16 * 1024 });
    let mut cfg = config_for(&rogue.url);
    cfg.cache.max_entry_bytes = 256 * 1024;
    let gw = gateway(cfg).await;
    let client = client();
    let mut response = client
        .post(chat_url(&gw))
        .send_json(&deterministic_chat())
        .await
        .expect("answer head");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers().get("x-nanogate-cache").unwrap(),
        "miss",
        "the cache was asked"
    );
    let mut read = 0;
    while read < 4 << 20 {
        read += response.next().await.expect("more").expect("chunk").len();
    }
    drop(response);
    let released = eventually(Duration::from_secs(3), || async { rogue.serving() == 0 }).await;
    assert!(
        released,
        "the client left, so the backend's answer is dropped"
    );
    let cache = &stats(&client, &gw).await["cache"];
    let fill = &cache["fill_buffer"];
    assert_eq!(fill["bytes"], 0, "{cache}");
    assert!(
        fill["peak_bytes"].as_u64().unwrap() <= 256 * 1024 + 17 * 1024,
        "gathering stopped at cache.max_entry_bytes: {cache}"
    );
    assert_eq!(cache["entries"], 0, "{cache}");
    gw.stop(false).await;
}

#[actix_rt::test]
async fn a_cached_answer_goes_only_to_the_credentials_that_filled_it() {
    let backends = sims(vec![paced(40)]).await;
    let gw = gateway(config(&backends)).await;
    let client = client();
    let ask = |key: Option<&'static str>| {
        let mut request = client.post(chat_url(&gw));
        if let Some(key) = key {
            request = request.insert_header(("authorization", format!("Bearer {key}")));
        }
        async move {
            let mut response = request.send_json(&deterministic_chat()).await.unwrap();
            let body = response.body().await.unwrap();
            assert_eq!(response.status(), 200, "{body:?}");
            response
                .headers()
                .get("x-nanogate-cache")
                .unwrap()
                .to_str()
                .unwrap()
                .to_string()
        }
    };
    let (a1, a2, b) = tokio::join!(ask(Some("a")), ask(Some("a")), ask(Some("b")));
    let mut twins = [a1, a2];
    twins.sort();
    assert_eq!(twins, ["hit", "miss"], "one led, its twin waited for it");
    assert_eq!(b, "miss", "b's identical request did not wait for a's");
    assert_eq!(ask(Some("a")).await, "hit");
    assert_eq!(ask(Some("b")).await, "hit");
    assert_eq!(ask(None).await, "miss", "no key is not key a");
    assert_eq!(ask(Some("c")).await, "miss", "a wrong key is not key a");
    assert_eq!(
        backends[0].control.snapshot().requests,
        4,
        "a (once, its twin coalesced), b, none and c went upstream"
    );
    // Anthropic's SDK sends its key as `x-api-key`, Azure OpenAI's as `api-key`: forwarded when
    // keys are off, so they separate callers too.
    for name in ["x-api-key", "api-key"] {
        let ask = |key: &'static str| {
            let request = client.post(chat_url(&gw)).insert_header((name, key));
            async move {
                let response = request.send_json(&deterministic_chat()).await.unwrap();
                assert_eq!(response.status(), 200);
                response.headers().get("x-nanogate-cache").unwrap().clone()
            }
        };
        assert_eq!(ask("k1").await, "miss", "{name}");
        assert_eq!(ask("k1").await, "hit", "{name}");
        assert_eq!(ask("k2").await, "miss", "{name}: another key is not k1");
    }
    gw.stop(false).await;
}

#[actix_rt::test]
async fn request_bodies_are_read_in_time_and_upgrades_are_refused_at_once() {
    let backends = sims(vec![fast()]).await;
    let mut cfg = config(&backends);
    cfg.server.body_idle_timeout_ms = 300;
    cfg.server.body_timeout_ms = 1000;
    cfg.admin.token = "a-token-of-sixteen-or-more".into();
    let gw = gateway(cfg).await;
    let head =
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n";

    let idle = format!("{head}content-length: 1000\r\n\r\n{{\"model\"").into_bytes();
    let started = Instant::now();
    let answer = raw_exchange(gw.addr, idle, Duration::from_secs(5)).await;
    assert_eq!(status_of(&answer), 408, "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(2), "idle timeout");

    // A client that trickles a byte every 200 ms never pauses long enough for the idle timeout,
    // but the whole body has body_timeout_ms.
    let addr = gw.addr;
    let trickle_head = format!("{head}content-length: 100000\r\n\r\n");
    let started = Instant::now();
    let answer = actix_rt::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.write_all(trickle_head.as_bytes()).unwrap();
        stream.set_nonblocking(true).unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let _ = stream.write(b" ");
            std::thread::sleep(Duration::from_millis(200));
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
        String::from_utf8_lossy(&answer).into_owned()
    })
    .await
    .unwrap();
    assert_eq!(status_of(&answer), 408, "{answer}");
    assert!(started.elapsed() < Duration::from_secs(3), "total timeout");

    // A WebSocket upgrade would make HTTP/1.1 read the body until the client hangs up.
    let upgrade = raw_post(
        "/v1/chat/completions",
        "connection: upgrade\r\nupgrade: websocket\r\n",
        "{}",
    );
    let started = Instant::now();
    let answer = raw_exchange(gw.addr, upgrade, Duration::from_secs(5)).await;
    assert_eq!(status_of(&answer), 400, "{answer}");
    assert!(answer.contains("unsupported_upgrade"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(1));

    // A chunked body the handler leaves unread, refused before it is read (an unknown route, a
    // bad path, a wrong method, no admin token), timed out (408, then 2 s to spare) or on a route
    // that reads none: answered and its connection closed, not held to drain the body with no
    // timer (actix-http drains a dropped chunked body until it ends).
    let chunked = "transfer-encoding: chunked\r\n\r\n";
    let cases = [
        ("POST /x", 404, 2),
        ("POST /v1/x/../../admin", 404, 2),
        ("POST /v1/%2e%2e/admin", 404, 2),
        ("POST /v1/..%2fadmin", 400, 2),
        ("POST /health", 405, 2),
        ("POST /admin/endpoints", 401, 2),
        ("GET /v1/models", 200, 2),
        ("POST /v1/chat/completions", 408, 3),
        ("POST /v1/passed/through", 408, 3),
    ];
    let exchanges = cases.iter().map(|&(request, _, _)| async move {
        let head = format!("{request} HTTP/1.1\r\nhost: gw\r\n{chunked}");
        let started = Instant::now();
        let answer = raw_exchange(gw.addr, head.into_bytes(), Duration::from_secs(6)).await;
        (answer, started.elapsed())
    });
    let answers = futures_util::future::join_all(exchanges).await;
    for ((request, wants, within), (answer, took)) in cases.into_iter().zip(answers) {
        assert_eq!(status_of(&answer), wants, "{request}: {answer}");
        assert!(
            took < Duration::from_secs(within),
            "{request}: the connection was closed after the answer: {answer}"
        );
    }
    // Read to its end, a chunked body leaves the connection open for the next request.
    let body = serde_json::to_vec(&chat(1)).unwrap();
    let mut two = Vec::new();
    for _ in 0..2 {
        two.extend_from_slice(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n");
        two.extend_from_slice(chunked.as_bytes());
        two.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
        two.extend_from_slice(&body);
        two.extend_from_slice(b"\r\n0\r\n\r\n");
    }
    let answers = raw_exchange(gw.addr, two, Duration::from_secs(2)).await;
    assert_eq!(answers.matches("HTTP/1.1 200").count(), 2, "{answers}");

    // A declared length reserves nothing: only received bytes count, and they are given back.
    let addr = gw.addr;
    let declared = format!("{head}content-length: 30000000\r\n\r\n{{\"model\":");
    let holder = actix_rt::task::spawn_blocking(move || {
        use std::io::Write;
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.write_all(declared.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        stream
    });
    let client = client();
    let ingress = &stats(&client, &gw).await["ingress"];
    assert!(
        ingress["request_bodies"]["bytes"].as_u64().unwrap() < 1024,
        "{ingress}"
    );
    drop(holder.await.unwrap());
    let drained = eventually(Duration::from_secs(2), || async {
        stats(&client, &gw).await["ingress"]["request_bodies"]["bytes"] == 0
    })
    .await;
    assert!(drained, "the partial body's bytes are given back");
    let good = post(&client, &chat_url(&gw), &chat(2)).await;
    assert_eq!(good.status, 200);
    gw.stop(false).await;
}

#[actix_rt::test]
async fn connections_beyond_the_limit_still_reach_the_operator_routes() {
    let backends = sims(vec![fast()]).await;
    let mut cfg = config(&backends);
    cfg.server.max_connections = 2;
    cfg.server.ops_connections = 2;
    let gw = gateway(cfg).await;
    let addr = gw.addr;
    let held = actix_rt::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        (0..2)
            .map(|_| {
                let mut stream = std::net::TcpStream::connect(addr).unwrap();
                stream
                    .write_all(b"GET /health HTTP/1.1\r\nhost: gw\r\n\r\n")
                    .unwrap();
                let mut buf = [0u8; 1024];
                let n = stream.read(&mut buf).unwrap();
                assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
                stream
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let refused = raw_exchange(
        gw.addr,
        raw_post(
            "/v1/chat/completions",
            "",
            &serde_json::to_string(&chat(2)).unwrap(),
        ),
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(status_of(&refused), 503, "{refused}");
    assert!(refused.contains("too_many_connections"), "{refused}");
    assert!(refused.to_ascii_lowercase().contains("retry-after"));
    assert!(refused.to_ascii_lowercase().contains("connection: close"));
    for path in ["/health", "/metrics", "/ready"] {
        let answer = raw_exchange(
            gw.addr,
            format!("GET {path} HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n").into_bytes(),
            Duration::from_secs(3),
        )
        .await;
        assert_eq!(status_of(&answer), 200, "{path}: {answer}");
    }
    drop(held);
    let client = client();
    let freed = eventually(Duration::from_secs(2), || async {
        post(&client, &chat_url(&gw), &chat(2)).await.status == 200
    })
    .await;
    assert!(freed, "closed connections free their places");
    let connections = &stats(&client, &gw).await["ingress"]["connections"];
    assert_eq!(connections["refused"], 1, "{connections}");
    gw.stop(false).await;
}

#[actix_rt::test]
async fn clients_that_leave_free_their_slots_and_cancel_the_generation_at_any_stage() {
    let rogue = Rogue::start(Behaviour::Hang);
    let mut cfg = config_for(&rogue.url);
    cfg.pool.min_workers = 4;
    cfg.pool.max_workers = 4;
    cfg.pool.queue_limit = 4;
    let gw = gateway(cfg).await;
    let impatient = awc::Client::builder()
        .timeout(Duration::from_millis(300))
        .finish();
    let attempts = (0..8).map(|_| impatient.post(chat_url(&gw)).send_json(&chat(2)));
    let results = futures_util::future::join_all(attempts).await;
    assert!(results.iter().all(Result::is_err), "every client gave up");
    let client = client();
    let freed = eventually(Duration::from_secs(3), || async {
        let pool = stats(&client, &gw).await["pool"].clone();
        pool["busy"] == 0 && pool["queued"] == 0 && rogue.serving() == 0
    })
    .await;
    assert!(
        freed,
        "slots, queue places and upstream requests are released: {} / backend serving {}",
        stats(&client, &gw).await["pool"],
        rogue.serving()
    );
    gw.stop(false).await;

    // A non-streamed generation in progress is cancelled when its client leaves.
    let backends = sims(vec![paced(50)]).await;
    let gw = gateway(config(&backends)).await;
    let started = impatient.post(chat_url(&gw)).send_json(&chat(100)).await;
    assert!(started.is_err(), "the client gave up after 300 ms");
    let cancelled = eventually(Duration::from_secs(3), || async {
        backends[0].control.snapshot().cancelled == 1
    })
    .await;
    assert!(
        cancelled,
        "the backend stopped generating: {:?}",
        backends[0].control.snapshot()
    );
    gw.stop(false).await;
}

#[actix_rt::test]
async fn a_client_that_stops_reading_is_cut_off_and_its_stream_released() {
    let rogue = Rogue::start(Behaviour::EndlessStream { chunk: 32 * 1024 });
    let mut cfg = config_for(&rogue.url);
    cfg.server.client_stall_timeout_ms = 500;
    let gw = gateway(cfg).await;
    let stream =
        json!({"model": "sim", "messages": [{"role": "user", "content": "go"}], "stream": true});
    let request = raw_post(
        "/v1/chat/completions",
        "",
        &serde_json::to_string(&stream).unwrap(),
    );
    let never_reads = |request: Vec<u8>, addr| {
        actix_rt::task::spawn_blocking(move || {
            use std::io::Write;
            let mut stream = std::net::TcpStream::connect(addr).unwrap();
            stream.write_all(&request).unwrap();
            std::thread::sleep(Duration::from_secs(4));
            drop(stream);
        })
    };
    let reader = never_reads(request, gw.addr);
    let client = client();
    let started = Instant::now();
    let released = eventually(Duration::from_secs(3), || async {
        let pool = stats(&client, &gw).await["pool"].clone();
        rogue
            .stats
            .accepted
            .load(std::sync::atomic::Ordering::SeqCst)
            > 0
            && rogue.serving() == 0
            && pool["busy"] == 0
    })
    .await;
    assert!(released, "the stalled stream was cut off");
    assert!(started.elapsed() < Duration::from_secs(3));
    let emptied = eventually(Duration::from_secs(3), || async {
        stats(&client, &gw).await["metrics"]["buffers"]["relay_bytes"] == 0
    })
    .await;
    let buffers = stats(&client, &gw).await["metrics"]["buffers"].clone();
    assert!(
        emptied,
        "the kernel dropped the stalled connection (TCP_USER_TIMEOUT), and what waited for it: {buffers}"
    );
    assert!(
        buffers["relay_peak_bytes"].as_u64().unwrap() <= 17 * 40 * 1024,
        "at most the relay's 16 chunks waited: {buffers}"
    );
    reader.await.unwrap();
    gw.stop(false).await;

    // The request's deadline holds for a client that is not reading, too.
    let mut cfg = config_for(&rogue.url);
    cfg.server.client_stall_timeout_ms = 60_000;
    let gw = gateway(cfg).await;
    let request = raw_post(
        "/v1/chat/completions",
        "x-request-timeout-ms: 800\r\n",
        &serde_json::to_string(&stream).unwrap(),
    );
    let reader = never_reads(request, gw.addr);
    let started = Instant::now();
    actix_rt::time::sleep(Duration::from_millis(300)).await;
    let released = eventually(Duration::from_secs(3), || async { rogue.serving() == 0 }).await;
    assert!(released, "the deadline ended the stalled stream");
    assert!(started.elapsed() < Duration::from_secs(3));
    reader.await.unwrap();
    gw.stop(false).await;
}

#[actix_rt::test]
async fn a_close_delimited_answer_arrives_whole_and_is_never_cached() {
    const BODY: &str = r#"{"id":"c","object":"chat.completion","model":"sim","choices":[{"index":0,"message":{"role":"assistant","content":"an answer delimited by the connection closing"},"finish_reason":"stop"}]}"#;
    let rogue = Rogue::start(Behaviour::CloseDelimited { body: BODY });
    let gw = gateway(config_for(&rogue.url)).await;
    let client = client();
    for _ in 0..2 {
        let answer = post(&client, &chat_url(&gw), &deterministic_chat()).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.text(), BODY);
        assert_eq!(answer.header("x-nanogate-cache").as_deref(), Some("miss"));
    }
    let answer = post(&client, &chat_url(&gw), &chat(2)).await;
    assert_eq!(answer.text(), BODY, "not cacheable, relayed whole");
    assert_eq!(stats(&client, &gw).await["cache"]["entries"], 0);
    gw.stop(false).await;
}

#[actix_rt::test]
async fn an_answer_cut_short_framed_twice_or_with_no_valid_status_is_a_bad_gateway() {
    // Cut short, framed twice (`Content-Length` and chunks, which the HTTP client reads by the
    // chunks), or with a status past 599: none reaches the client as an answer.
    for (raw, says) in [
        (
            &b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"id\":\"x\","[..],
            "closed the connection after 10 of 1000 bytes",
        ),
        (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5\r\n\
              transfer-encoding: chunked\r\n\r\n8\r\n{\"id\":1}\r\n0\r\n\r\n",
            "sent 8 bytes under a Content-Length of 5",
        ),
        (
            b"HTTP/1.1 999 Weird\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
            "status 999, outside HTTP's 100-599",
        ),
    ] {
        let rogue = Rogue::start(Behaviour::Raw(raw));
        let mut cfg = config_for(&rogue.url);
        cfg.upstream.attempts = 1;
        let gw = gateway(cfg).await;
        let answer = post(&client(), &chat_url(&gw), &chat(2)).await;
        assert_eq!(answer.status, 502, "{}", answer.text());
        assert_eq!(answer.json()["error"]["code"], "upstream_bad_response");
        assert!(answer.text().contains(says), "{}", answer.text());
        gw.stop(false).await;
    }
}

#[actix_rt::test]
async fn a_stream_ends_at_its_done_whatever_the_backend_sends_after_it() {
    // An event, `[DONE]`, then more events and no end of the body (the connection closes, which
    // the HTTP client reads as a failure): in chunks of their own, in the same chunk as the
    // `[DONE]`, and with the `[DONE]` line split over two chunks.
    const APART: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
        transfer-encoding: chunked\r\n\r\n\
        2f\r\ndata: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n\r\n\
        e\r\ndata: [DONE]\n\n\r\n\
        2f\r\ndata: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n\r\n";
    const TOGETHER: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
        transfer-encoding: chunked\r\n\r\n\
        6c\r\ndata: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n\
        data: [DONE]\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n\r\n";
    const SPLIT: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
        transfer-encoding: chunked\r\n\r\n\
        34\r\ndata: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata:\r\n\
        38\r\n [DONE]\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n\r\n";
    // The `[DONE]` line's end in one chunk, the blank line that closes its event and another
    // event in the next.
    const CLOSED_LATER: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
        transfer-encoding: chunked\r\n\r\n\
        3c\r\ndata: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: [DONE]\n\r\n\
        30\r\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n\r\n";
    // `[DONE]`, then the connection held open with nothing more: the answer is whole, without an
    // error event, and ends soon after the `[DONE]`, not when the idle timeout (60 s) passes.
    const HELD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
        transfer-encoding: chunked\r\n\r\n\
        3d\r\ndata: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: [DONE]\n\n\r\n";
    for (name, behaviour) in [
        ("apart", Behaviour::Raw(APART)),
        ("together", Behaviour::Raw(TOGETHER)),
        ("split", Behaviour::Raw(SPLIT)),
        ("closed later", Behaviour::Raw(CLOSED_LATER)),
        ("held", Behaviour::RawThenSilence(HELD)),
    ] {
        let rogue = Rogue::start(behaviour);
        let gw = gateway(config_for(&rogue.url)).await;
        let started = Instant::now();
        let answer = post(&client(), &chat_url(&gw), &chat_stream(2)).await;
        assert!(started.elapsed() < Duration::from_secs(5), "{name}");
        assert_eq!(answer.status, 200, "{name}");
        assert_eq!(
            answer.text(),
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: [DONE]\n\n",
            "{name}"
        );
        gw.stop(false).await;
    }
}

#[actix_rt::test]
async fn paths_that_leave_v1_are_refused_and_never_forwarded() {
    let rogue = Rogue::start(Behaviour::Record);
    let gw = gateway(config_for(&rogue.url)).await;
    for (path, status) in [
        ("/v1/../admin/endpoints", 404),
        ("/v1/%2e%2e/stats", 404),
        ("/v1/%2E%2E/metrics", 404),
        ("/v1/..%2fstats", 400),
        ("/v1/files%2f..%2f..%2fadmin", 400),
        ("/v1/files/../../health", 404),
    ] {
        let answer = raw_exchange(
            gw.addr,
            format!("GET {path} HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n").into_bytes(),
            Duration::from_secs(3),
        )
        .await;
        assert_eq!(status_of(&answer), status, "{path}: {answer}");
    }
    let answer = raw_exchange(
        gw.addr,
        b"GET /v1/files/./x/../list?limit=2 HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n"
            .to_vec(),
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    let heads = rogue.heads();
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert!(
        heads[0].starts_with("GET /v1/files/list?limit=2 "),
        "{heads:?}"
    );
    gw.stop(false).await;
}

#[actix_rt::test]
async fn a_stream_broken_mid_line_ends_with_an_error_event_of_its_own() {
    let rogue = Rogue::start(Behaviour::StreamBrokenMidLine);
    let gw = gateway(config_for(&rogue.url)).await;
    let client = client();
    let answer = post(&client, &chat_url(&gw), &chat_stream(4)).await;
    assert_eq!(answer.status, 200);
    let text = answer.text();
    assert!(text.contains("{\"del\n\ndata: {\"error\""), "{text:?}");
    let events = sse_events(&text);
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_stream_error");
    assert!(last["error"].get("param").is_some(), "{last}");
    gw.stop(false).await;
}

#[actix_rt::test]
async fn admin_refuses_bad_urls_and_new_endpoints_wait_for_a_probe() {
    let backends = sims(vec![fast()]).await;
    let mut cfg = config(&backends);
    cfg.admin.token = "secret-token".into();
    cfg.health.interval_ms = 60_000;
    let gw = gateway(cfg).await;
    let client = client();
    let admin = |body: Value| {
        client
            .post(format!("{}/admin/endpoints", gw.url()))
            .insert_header(("authorization", "Bearer secret-token"))
            .send_json(&body)
    };
    for url in [
        "http://a b/",
        "http://user:pw@127.0.0.1:9",
        "http://",
        "ftp://x",
    ] {
        let mut answer = admin(json!({"url": url})).await.unwrap();
        assert_eq!(answer.status(), 400, "{url}");
        let body: Value = answer.json().await.unwrap();
        assert!(body["error"]["message"].is_string());
    }
    let wrong_length = client
        .get(format!("{}/admin/endpoints", gw.url()))
        .insert_header(("authorization", "Bearer s"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_length.status(), 401);

    // Twenty dead endpoints added at once take no traffic: they start unhealthy. Their ports are
    // all bound before any is closed: bound and closed one at a time, the kernel handed out the
    // same port twice, and the second was refused as a duplicate (409).
    let dead: Vec<_> = (0..20)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let urls: Vec<String> = dead
        .iter()
        .map(|l| format!("http://{}", l.local_addr().unwrap()))
        .collect();
    drop(dead);
    for url in urls {
        let mut added = admin(json!({"url": url, "models": ["sim"]})).await.unwrap();
        assert_eq!(added.status(), 201);
        assert_eq!(added.json::<Value>().await.unwrap()["healthy"], false);
    }
    for _ in 0..20 {
        let answer = post(&client, &chat_url(&gw), &chat(2)).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    // A live one is probed at once rather than after the 60 s interval.
    let live = sims(vec![fast()]).await;
    let mut added = admin(json!({"url": live[0].url()})).await.unwrap();
    let id = added.json::<Value>().await.unwrap()["id"].as_u64().unwrap();
    let admitted = eventually(Duration::from_secs(3), || async {
        stats(&client, &gw).await["balancer"]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["id"] == id && e["healthy"] == true)
    })
    .await;
    assert!(admitted, "the new endpoint was probed and admitted");
    gw.stop(false).await;
}

#[actix_rt::test]
async fn error_messages_name_endpoints_by_id_not_by_url() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let mut cfg = config_for(&url);
    cfg.health.fall = 10;
    let gw = gateway(cfg).await;
    let answer = post(&client(), &chat_url(&gw), &chat(2)).await;
    assert_eq!(answer.status, 502);
    let message = answer.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("#0"), "{message}");
    assert!(!message.contains("127.0.0.1"), "{message}");
    gw.stop(false).await;
}
