//! What operators see: `/stats` with a section per actor, `/stats/{actor}`, `/metrics` in
//! Prometheus text, `/health` and `/ready`, and the pool growing under load and shrinking after.

mod common;

use std::time::Duration;

use common::*;
use nanogate_actors::policy::PolicyKind;

#[actix_rt::test]
async fn stats_and_metrics_describe_the_traffic() {
    let backends = sims(vec![fast(), fast()]).await;
    let mut cfg = config(&backends);
    cfg.balancer.policy = PolicyKind::RoundRobin;
    let gw = gateway(cfg).await;
    let client = client();
    let url = format!("{}/v1/chat/completions", gw.url());
    for _ in 0..10 {
        assert_eq!(post(&client, &url, &chat(3)).await.status, 200);
    }
    for _ in 0..3 {
        assert_eq!(post(&client, &url, &chat_stream(3)).await.status, 200);
    }
    assert_eq!(post_raw(&client, &url, "{").await.status, 400);
    let settled = eventually(Duration::from_secs(2), || async {
        stats(&client, &gw).await["metrics"]["overall"]["requests"] == 14
    })
    .await;
    assert!(
        settled,
        "every request is counted once the threads' batches are flushed"
    );
    let s = stats(&client, &gw).await;
    let pool = &s["pool"];
    for key in ["current", "busy", "queued", "min", "max", "last_resize"] {
        assert!(pool.get(key).is_some(), "pool.{key} in {pool}");
    }
    assert_eq!(pool["min"], 10);
    assert_eq!(pool["max"], 5000);
    let endpoints = s["balancer"]["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 2);
    assert!(endpoints
        .iter()
        .all(|e| e["healthy"] == true && e["weight"].as_f64().unwrap() > 1.0));
    let probes = s["health"]["endpoints"].as_array().unwrap();
    assert!(probes
        .iter()
        .all(|p| p["last_result"] == "/health: 200"
            && p["consecutive_successes"].as_u64().unwrap() >= 1));
    assert!(
        probes.iter().all(|p| p["load"]["running"].is_number()),
        "scraped vLLM gauges: {probes:?}"
    );
    for key in [
        "entries",
        "bytes",
        "hits",
        "misses",
        "evictions",
        "expirations",
    ] {
        assert!(s["cache"].get(key).is_some(), "cache.{key}");
    }
    let overall = &s["metrics"]["overall"];
    assert_eq!(overall["requests"], 14);
    assert_eq!(
        overall["errors"], 0,
        "the malformed request is the client's error"
    );
    assert_eq!(overall["client_errors"], 1);
    assert_eq!(overall["error_rate"], 0.0);
    for key in ["min", "avg", "max", "p50", "p90", "p99"] {
        assert!(overall["latency_ms"][key].as_f64().unwrap() >= 0.0);
    }
    assert_eq!(s["metrics"]["models"]["sim"]["requests"], 13);
    assert_eq!(
        s["metrics"]["models"]["sim"]["ttft_ms"]["count"], 3,
        "time to first token is for streams"
    );
    assert_eq!(s["metrics"]["endpoints"].as_object().unwrap().len(), 2);
    assert!(
        s["metrics"]["models"]["sim"]["inter_token_ms"]["count"]
            .as_u64()
            .unwrap()
            >= 3
    );

    let one = get(&client, &format!("{}/stats/pool", gw.url())).await;
    assert_eq!(one.json()["max"], 5000);
    assert_eq!(
        get(&client, &format!("{}/stats/nothing", gw.url()))
            .await
            .status,
        404
    );

    let metrics = get(&client, &format!("{}/metrics", gw.url())).await;
    assert!(metrics
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    let text = metrics.text();
    for needle in [
        "# TYPE nanogate_requests_total counter",
        "model=\"sim\",status=\"200\"} ",
        "status=\"400\"} 1",
        "# TYPE nanogate_request_duration_seconds histogram",
        "nanogate_time_to_first_token_seconds_bucket",
        "nanogate_pool_workers 10",
        "nanogate_endpoint_healthy{endpoint=",
    ] {
        assert!(text.contains(needle), "/metrics lacks {needle}:\n{text}");
    }
    assert_eq!(
        get(&client, &format!("{}/health", gw.url())).await.status,
        200
    );
    assert_eq!(
        get(&client, &format!("{}/ready", gw.url())).await.status,
        200
    );
    gw.stop(false).await;
}

#[actix_rt::test]
async fn the_load_backends_report_reaches_the_balancer() {
    let backends = sims(vec![paced(20)]).await;
    let mut cfg = config(&backends);
    cfg.health.load_interval_ms = 50;
    cfg.balancer.policy = PolicyKind::LeastLoad;
    let gw = gateway(cfg).await;
    let client = client();
    let url = format!("{}/v1/chat/completions", gw.url());
    let request = chat(40);
    let streams = futures_util::future::join_all((0..3).map(|_| post(&client, &url, &request)));
    let seen = async {
        eventually(Duration::from_secs(3), || async {
            let endpoint = &stats(&client, &gw).await["balancer"]["endpoints"][0];
            endpoint["reported"]["running"].as_f64() == Some(3.0)
        })
        .await
    };
    let (answers, seen) = futures_util::future::join(streams, seen).await;
    assert!(answers.iter().all(|a| a.status == 200));
    assert!(
        seen,
        "the simulator's vllm:num_requests_running reached the balancer"
    );
    gw.stop(false).await;
}

#[actix_rt::test]
async fn the_pool_grows_under_load_and_shrinks_when_idle() {
    let backends = sims(vec![paced(10)]).await;
    let mut cfg = config(&backends);
    cfg.pool.min_workers = 2;
    cfg.pool.max_workers = 64;
    cfg.pool.resize_interval_ms = 200;
    let gw = gateway(cfg).await;
    let client = client();
    let url = format!("{}/v1/chat/completions", gw.url());
    let request = chat(10);
    let answers =
        futures_util::future::join_all((0..24).map(|_| post(&client, &url, &request))).await;
    assert!(
        answers.iter().all(|a| a.status == 200),
        "queued requests are served as the pool grows"
    );
    let pool = stats(&client, &gw).await["pool"].clone();
    assert!(pool["resizes"].as_u64().unwrap() >= 1, "{pool}");
    let grown = pool["current"].as_u64().unwrap();
    let shrunk = eventually(Duration::from_secs(5), || async {
        let pool = stats(&client, &gw).await["pool"].clone();
        pool["current"] == 2
            && pool["last_resize"]["why"]
                .as_str()
                .unwrap_or("")
                .starts_with("shrink")
    })
    .await;
    assert!(shrunk, "the idle pool shrank back to its minimum");
    let pool = stats(&client, &gw).await["pool"].clone();
    assert!(
        pool["resizes"].as_u64().unwrap() >= 2,
        "it grew past its minimum before shrinking back (grown to {grown}): {pool}"
    );
    gw.stop(false).await;
}
