//! Operating the gateway at runtime: the admin API (behind its token) lists, adds, removes and
//! drains endpoints; draining and shutdown lose nothing in flight; SIGHUP reloads the endpoints
//! from the config file and SIGTERM shuts the real binary down gracefully.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nanogate_actors::policy::PolicyKind;
use serde_json::json;

const TOKEN: &str = "test-admin-token";

async fn admin(
    client: &awc::Client,
    method: awc::http::Method,
    url: String,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut request = client.request(method, url);
    if let Some(token) = token {
        request = request.insert_header(("authorization", format!("Bearer {token}")));
    }
    let mut response = match body {
        Some(body) => request.send_json(&body).await.unwrap(),
        None => request.send().await.unwrap(),
    };
    let body = response.body().await.unwrap();
    (
        response.status().as_u16(),
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// Reads a whole SSE response and says whether it ended with `[DONE]`.
async fn stream_completes(client: &awc::Client, url: &str, tokens: u32) -> bool {
    let Ok(mut response) = client.post(url).send_json(&chat_stream(tokens)).await else {
        return false;
    };
    match response.body().limit(1 << 20).await {
        Ok(body) => String::from_utf8_lossy(&body)
            .trim_end()
            .ends_with("data: [DONE]"),
        Err(_) => false,
    }
}

#[actix_rt::test]
async fn admin_routes_are_off_without_a_token_and_refuse_a_wrong_one() {
    let backends = sims(vec![fast()]).await;
    let gw = gateway(config(&backends)).await;
    let client = client();
    let url = format!("{}/admin/endpoints", gw.url());
    let (status, _) = admin(
        &client,
        awc::http::Method::GET,
        url.clone(),
        Some("x"),
        None,
    )
    .await;
    assert_eq!(status, 404, "no token configured: no admin routes");
    gw.stop(false).await;

    let mut cfg = config(&backends);
    cfg.admin.token = TOKEN.into();
    let gw = gateway(cfg).await;
    let url = format!("{}/admin/endpoints", gw.url());
    let (status, body) = admin(&client, awc::http::Method::GET, url.clone(), None, None).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "invalid_admin_token");
    let (status, _) = admin(
        &client,
        awc::http::Method::GET,
        url.clone(),
        Some("wrong"),
        None,
    )
    .await;
    assert_eq!(status, 401);
    let (status, body) = admin(&client, awc::http::Method::GET, url, Some(TOKEN), None).await;
    assert_eq!(status, 200);
    assert_eq!(body["endpoints"][0]["url"], backends[0].url());
    gw.stop(false).await;
}

#[actix_rt::test]
async fn endpoints_are_added_drained_and_removed_at_runtime_without_losing_streams() {
    let backends = sims(vec![paced(10), paced(10)]).await;
    let mut cfg = config(&backends[..1]);
    cfg.admin.token = TOKEN.into();
    cfg.balancer.policy = PolicyKind::RoundRobin;
    let gw = gateway(cfg).await;
    let client = client();
    let admin_url = format!("{}/admin/endpoints", gw.url());
    let chat_url = format!("{}/v1/chat/completions", gw.url());

    let (status, body) = admin(
        &client,
        awc::http::Method::POST,
        admin_url.clone(),
        Some(TOKEN),
        Some(json!({"url": backends[1].url()})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let added = body["id"].as_u64().unwrap();
    let (status, _) = admin(
        &client,
        awc::http::Method::POST,
        admin_url.clone(),
        Some(TOKEN),
        Some(json!({"url": backends[1].url()})),
    )
    .await;
    assert_eq!(status, 409, "the same backend twice is refused");
    let (status, _) = admin(
        &client,
        awc::http::Method::POST,
        admin_url.clone(),
        Some(TOKEN),
        Some(json!({"url": "ftp://x"})),
    )
    .await;
    assert_eq!(status, 400);

    let streams =
        futures_util::future::join_all((0..6).map(|_| stream_completes(&client, &chat_url, 40)));
    let drain = async {
        actix_rt::time::sleep(Duration::from_millis(100)).await;
        let (status, _) = admin(
            &client,
            awc::http::Method::POST,
            format!("{admin_url}/0/drain"),
            Some(TOKEN),
            None,
        )
        .await;
        assert_eq!(status, 200);
    };
    let (completed, ()) = futures_util::future::join(streams, drain).await;
    assert!(
        completed.iter().all(|&done| done),
        "draining lost no stream: {completed:?}"
    );
    for _ in 0..6 {
        let answer = post(&client, &chat_url, &chat(1)).await;
        assert_eq!(
            answer.header("x-nanogate-endpoint").as_deref(),
            Some(added.to_string().as_str())
        );
    }
    let (status, _) = admin(
        &client,
        awc::http::Method::POST,
        format!("{admin_url}/0/sideways"),
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 404, "only drain and undrain");
    let (status, _) = admin(
        &client,
        awc::http::Method::POST,
        format!("{admin_url}/0/undrain"),
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let short = chat(1);
    let back =
        futures_util::future::join_all((0..4).map(|_| post(&client, &chat_url, &short))).await;
    assert!(
        back.iter()
            .any(|a| a.header("x-nanogate-endpoint").as_deref() == Some("0")),
        "an undrained endpoint takes traffic again"
    );
    let (status, _) = admin(
        &client,
        awc::http::Method::DELETE,
        format!("{admin_url}/0"),
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = admin(
        &client,
        awc::http::Method::DELETE,
        format!("{admin_url}/0"),
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (_, body) = admin(
        &client,
        awc::http::Method::GET,
        admin_url,
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(body["endpoints"].as_array().unwrap().len(), 1);
    assert_eq!(post(&client, &chat_url, &chat(1)).await.status, 200);
    let metrics = get(&client, &format!("{}/metrics", gw.url())).await.text();
    let healthy: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("nanogate_endpoint_healthy{"))
        .collect();
    assert_eq!(
        healthy.len(),
        1,
        "the removed endpoint's series went: {healthy:?}"
    );
    gw.stop(false).await;
}

#[actix_rt::test]
async fn shutdown_turns_ready_off_then_lets_admitted_streams_finish() {
    let backends = sims(vec![paced(10)]).await;
    let mut cfg = config(&backends);
    cfg.server.shutdown_delay_ms = 300;
    let gw = gateway(cfg).await;
    let client = client();
    let chat_url = format!("{}/v1/chat/completions", gw.url());
    let ready_url = format!("{}/ready", gw.url());
    let shutdown = gw.shutdown_handle();
    let streams =
        futures_util::future::join_all((0..4).map(|_| stream_completes(&client, &chat_url, 60)));
    let stop = async {
        actix_rt::time::sleep(Duration::from_millis(100)).await;
        let stopping = shutdown.shutdown();
        let check = async {
            actix_rt::time::sleep(Duration::from_millis(50)).await;
            get(&client, &ready_url).await.status
        };
        let ((), ready) = futures_util::future::join(stopping, check).await;
        ready
    };
    let (completed, ready) = futures_util::future::join(streams, stop).await;
    assert_eq!(ready, 503, "/ready is 503 as soon as shutdown begins");
    assert!(
        completed.iter().all(|&done| done),
        "no admitted stream was dropped: {completed:?}"
    );
    assert!(
        client.get(&ready_url).send().await.is_err(),
        "no new connections after shutdown"
    );
}

/// A free loopback port for the binary to listen on.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Through the shell's own `kill`: a slim Debian has no `/bin/kill` (procps).
fn signal(pid: u32, name: &str) {
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("kill -{name} {pid}"))
        .status()
        .unwrap();
    assert!(status.success());
}

/// The gateway process and its directory, gone with the test however it ends (a failed assert
/// must not leave `nanogate serve` holding its port).
struct Spawned {
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[actix_rt::test]
async fn the_binary_reloads_endpoints_on_sighup_and_shuts_down_gracefully_on_sigterm() {
    let backends = sims(vec![paced(10), fast()]).await;
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("nanogate-signals-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("gateway.toml");
    let write_config = |urls: &[String]| {
        let mut f = std::fs::File::create(&file).unwrap();
        writeln!(f, "[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_delay_ms = 200\n[health]\ninterval_ms = 200").unwrap();
        for url in urls {
            writeln!(f, "[[endpoints]]\nurl = \"{url}\"").unwrap();
        }
    };
    write_config(&[backends[0].url()]);
    let child = Command::new(env!("CARGO_BIN_EXE_nanogate"))
        .args(["serve", "--config"])
        .arg(&file)
        // The default usage log (SQLite, nanogate-usage.db) goes in the test's own directory.
        .current_dir(&dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut gateway = Spawned {
        child,
        dir: dir.clone(),
    };
    let client = client();
    let base = format!("http://127.0.0.1:{port}");
    let up = eventually(Duration::from_secs(10), || async {
        matches!(client.get(format!("{base}/ready")).send().await, Ok(r) if r.status() == 200)
    })
    .await;
    assert!(up, "the binary started");

    write_config(&[backends[0].url(), backends[1].url()]);
    signal(gateway.child.id(), "HUP");
    let reloaded = eventually(Duration::from_secs(5), || async {
        let Ok(mut r) = client.get(format!("{base}/stats/balancer")).send().await else {
            return false;
        };
        let body: serde_json::Value = r.json().await.unwrap_or_default();
        body["endpoints"].as_array().map_or(0, |e| e.len()) == 2
    })
    .await;
    assert!(reloaded, "SIGHUP added the second endpoint");

    let chat_url = format!("{base}/v1/chat/completions");
    let stream_client = common::client();
    let streams = futures_util::future::join_all((0..3).map(|_| {
        let (client, url) = (&stream_client, &chat_url);
        async move {
            let Ok(mut response) = client
                .post(url)
                .insert_header(("x-session-id", "slow"))
                .send_json(&chat_stream(50))
                .await
            else {
                return false;
            };
            response.body().limit(1 << 20).await.is_ok_and(|b| {
                String::from_utf8_lossy(&b)
                    .trim_end()
                    .ends_with("data: [DONE]")
            })
        }
    }));
    let pid = gateway.child.id();
    let term = async move {
        actix_rt::time::sleep(Duration::from_millis(150)).await;
        signal(pid, "TERM");
    };
    let (completed, ()) = futures_util::future::join(streams, term).await;
    assert!(
        completed.iter().all(|&done| done),
        "SIGTERM dropped no admitted stream: {completed:?}"
    );
    let started = Instant::now();
    let status = loop {
        if let Some(status) = gateway.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the process exits after its streams"
        );
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
}
