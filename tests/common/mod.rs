//! Helpers for the integration tests: simulated backends and a gateway in this process on
//! ephemeral 127.0.0.1 ports, and a client that speaks to them over real HTTP.

#![allow(dead_code)]

pub mod fake;
pub mod postgres;
pub mod rogue;

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use awc::http::header::HeaderMap;
use awc::http::StatusCode;
use bytes::Bytes;
use nanogate::config::Config;
use nanogate::gateway::Gateway;
use nanogate::simulator::{self, SimConfig, SimHandle};
use nanogate_actors::endpoint::EndpointSpec;
use serde_json::{json, Value};

pub const LOOPBACK: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// A simulated GPU fast enough that tests take milliseconds.
pub fn fast() -> SimConfig {
    SimConfig {
        speed: 20.0,
        ..SimConfig::default()
    }
}

/// A simulated GPU that streams one token every `step_ms`.
pub fn paced(step_ms: u64) -> SimConfig {
    SimConfig {
        decode_step_ms: step_ms,
        ttft_base_ms: 1,
        batch_slowdown: 0.0,
        ..SimConfig::default()
    }
}

pub async fn sims(configs: Vec<SimConfig>) -> Vec<SimHandle> {
    let mut out = Vec::new();
    for config in configs {
        out.push(
            simulator::start(LOOPBACK, config)
                .await
                .expect("simulator starts"),
        );
    }
    out
}

/// Gateway settings for tests: quick health checks that react to one failed probe.
pub fn config(backends: &[SimHandle]) -> Config {
    let mut config = Config::defaults();
    config.server.listen = "127.0.0.1:0".into();
    config.server.workers = 2;
    config.health.interval_ms = 100;
    config.health.timeout_ms = 500;
    config.health.rise = 1;
    config.health.fall = 1;
    // Tests that look at the usage log give it a database of their own.
    config.usage.database = "off".into();
    config.endpoints = backends
        .iter()
        .map(|b| EndpointSpec::new(b.url()))
        .collect();
    config
}

pub async fn gateway(config: Config) -> Gateway {
    Gateway::start(config).await.expect("gateway starts")
}

pub fn client() -> awc::Client {
    awc::Client::builder()
        .connector(awc::Connector::new().limit(0))
        .timeout(Duration::from_secs(20))
        .finish()
}

pub fn chat(max_tokens: u32) -> Value {
    json!({"model": "sim", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": max_tokens})
}

pub fn chat_stream(max_tokens: u32) -> Value {
    json!({"model": "sim", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": max_tokens,
           "stream": true, "stream_options": {"include_usage": true}})
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap_or_default().to_string())
    }
}

pub async fn post_raw(client: &awc::Client, url: &str, body: impl Into<Bytes>) -> Answer {
    post_as(client, url, None, body).await
}

/// A POST with `Authorization: Bearer <key>` when a key is given.
pub async fn post_as(
    client: &awc::Client,
    url: &str,
    key: Option<&str>,
    body: impl Into<Bytes>,
) -> Answer {
    let mut request = client
        .post(url)
        .insert_header(("content-type", "application/json"));
    if let Some(key) = key {
        request = request.insert_header(("authorization", format!("Bearer {key}")));
    }
    let mut response = request
        .send_body(body.into())
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let body = response.body().limit(64 << 20).await.expect("body");
    Answer {
        status: response.status(),
        headers: response.headers().clone(),
        body,
    }
}

pub async fn post(client: &awc::Client, url: &str, body: &Value) -> Answer {
    post_raw(client, url, serde_json::to_vec(body).unwrap()).await
}

pub async fn get(client: &awc::Client, url: &str) -> Answer {
    let mut response = client
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let body = response.body().limit(64 << 20).await.expect("body");
    Answer {
        status: response.status(),
        headers: response.headers().clone(),
        body,
    }
}

/// The `data:` payloads of an SSE body, in order.
pub fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| event.trim().strip_prefix("data:"))
        .map(|data| data.trim().to_string())
        .collect()
}

/// Polls `check` until it holds or `within` passes; returns whether it held.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A gateway's /stats.
pub async fn stats(client: &awc::Client, gateway: &Gateway) -> Value {
    get(client, &format!("{}/stats", gateway.url()))
        .await
        .json()
}

/// Sends `request` as raw bytes on a new connection and reads what comes back until the gateway
/// closes the connection or `read_for` passes. Blocking: runs on a blocking-pool thread.
pub async fn raw_exchange(addr: SocketAddr, request: Vec<u8>, read_for: Duration) -> String {
    actix_rt::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(addr).expect("connect");
        stream.write_all(&request).expect("write");
        stream.set_read_timeout(Some(read_for)).unwrap();
        let deadline = Instant::now() + read_for;
        let mut answer = Vec::new();
        let mut buf = [0u8; 8192];
        while Instant::now() < deadline {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&answer).into_owned()
    })
    .await
    .expect("raw exchange")
}

/// A gateway config in front of one backend at `url` that serves the model `sim` (so no model
/// discovery is needed) and is probed rarely.
pub fn config_for(url: &str) -> Config {
    let mut config = config(&[]);
    let mut endpoint = EndpointSpec::new(url);
    endpoint.models = vec!["sim".into()];
    config.endpoints = vec![endpoint];
    config.health.interval_ms = 60_000;
    config
}

/// Runs `program tests/<script> <args>` (an SDK's checks) off the runtime's threads and asserts
/// that it succeeded, showing what it printed otherwise.
pub async fn run_sdk_script(program: &str, script: &str, args: &[&str]) {
    let path = format!("{}/tests/{script}", env!("CARGO_MANIFEST_DIR"));
    let mut command = std::process::Command::new(program);
    command.arg(&path).args(args);
    let output = actix_rt::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("run {path}: {e}"));
    assert!(
        output.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The official OpenAI SDK for Node in `.node`, installed on first use: `true` when it is there,
/// `false` (with the reason printed) only where node or npm is missing.
pub fn sdk_node() -> bool {
    let root = env!("CARGO_MANIFEST_DIR");
    let present = || std::path::Path::new(&format!("{root}/.node/node_modules/openai")).is_dir();
    if !present() {
        let installed = std::process::Command::new(format!("{root}/scripts/install-test-deps.sh"))
            .arg("node")
            .status()
            .expect("run scripts/install-test-deps.sh");
        assert!(installed.success(), "scripts/install-test-deps.sh failed");
    }
    if !present() {
        eprintln!("SKIPPED: node or npm is not installed, so the Node SDK test cannot run");
    }
    present()
}

/// The Python with the pinned OpenAI SDK (`.venv`, installed by scripts/install-test-deps.sh
/// when it cannot import the SDK); `None` only where python3 itself is missing. The import is
/// what is checked, not the interpreter's file: a venv being made by a test running beside this
/// one has its `python` long before its SDK, and the script (which takes a lock) waits for it.
pub fn sdk_python() -> Option<String> {
    let root = env!("CARGO_MANIFEST_DIR");
    let python = format!("{root}/.venv/bin/python");
    let ready = std::process::Command::new(&python)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !ready {
        if std::process::Command::new("python3")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("SKIPPED: python3 is not installed, so the OpenAI SDK test cannot run");
            return None;
        }
        let installed = std::process::Command::new(format!("{root}/scripts/install-test-deps.sh"))
            .arg("python")
            .status()
            .expect("run scripts/install-test-deps.sh");
        assert!(installed.success(), "scripts/install-test-deps.sh failed");
    }
    Some(python)
}
