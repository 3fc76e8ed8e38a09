//! Time to first token when backends fail: a backend killed while it holds a queue, a frozen
//! backend found by its overdue requests' probe, streams retried until their first event, hedged
//! first tokens, and slow start. Every test runs simulators and the gateway in this process and
//! speaks real HTTP on 127.0.0.1.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::fake::{Fake, FakeBody, FakeRequest, FakeResponse};
use common::*;
use nanogate::config::Config;
use nanogate::gateway::Gateway;
use nanogate::simulator::{SimConfig, SimHandle};
use nanogate_actors::policy::PolicyKind;
use serde_json::{json, Value};

fn chat_url(gw: &Gateway) -> String {
    format!("{}/v1/chat/completions", gw.url())
}

/// A GPU with two batch slots and an unbounded queue, like llama.cpp's server: a request holds
/// its slot for about 40 ms.
fn two_slots() -> SimConfig {
    SimConfig {
        max_batch: 2,
        ..paced(10)
    }
}

/// Periodic probes out of the way, so only what the requests themselves see finds a failure.
fn no_periodic_probes(backends: &[SimHandle]) -> Config {
    let mut cfg = config(backends);
    cfg.health.interval_ms = 60_000;
    cfg.health.unhealthy_interval_ms = 60_000;
    cfg
}

/// Sends `n` requests at once; answers with how long each took.
async fn burst(client: &awc::Client, url: &str, n: usize, body: &Value) -> Vec<(Answer, Duration)> {
    futures_util::future::join_all((0..n).map(|_| async {
        let start = Instant::now();
        let answer = post(client, url, body).await;
        (answer, start.elapsed())
    }))
    .await
}

fn failures(answers: &[(Answer, Duration)]) -> Vec<String> {
    answers
        .iter()
        .filter(|(a, _)| {
            a.status != 200
                || (a.text().starts_with("data:") && !a.text().trim_end().ends_with("[DONE]"))
        })
        .map(|(a, _)| {
            format!(
                "{} {}",
                a.status,
                a.text().chars().take(200).collect::<String>()
            )
        })
        .collect()
}

#[actix_rt::test]
async fn a_backend_killed_while_it_holds_a_queue_costs_no_client_anything() {
    let mut backends = sims(vec![two_slots(), two_slots()]).await;
    let gw = gateway(no_periodic_probes(&backends)).await;
    let client = client();
    let url = chat_url(&gw);
    let request = chat(4);
    let answers = burst(&client, &url, 80, &request);
    let kill = async {
        // Kill whichever backend holds more, once it holds 30 or more (2 generating, the rest
        // queued), as SIGKILL would: its connections drop, new ones are refused.
        let deadline = Instant::now() + Duration::from_secs(5);
        let held = |b: &SimHandle| {
            let s = b.control.snapshot();
            s.running + s.waiting
        };
        loop {
            let fullest = (0..2).max_by_key(|&i| held(&backends[i])).unwrap_or(0);
            let holding = held(&backends[fullest]);
            if holding >= 30 {
                backends.swap_remove(fullest).stop().await;
                return holding;
            }
            assert!(
                Instant::now() < deadline,
                "no backend ever held 30: {holding}"
            );
            actix_rt::time::sleep(Duration::from_millis(2)).await;
        }
    };
    let (answers, held) = futures_util::future::join(answers, kill).await;
    let failed = failures(&answers);
    assert!(
        failed.is_empty(),
        "{} of 80 failed: {:?}",
        failed.len(),
        failed.first()
    );
    let s = stats(&client, &gw).await;
    let budget = &s["balancer"]["retry_budget"];
    assert!(
        budget["failovers"].as_u64().unwrap() >= 1,
        "the {held} requests it held failed over: {budget}"
    );
    assert_eq!(
        budget["denied"], 0,
        "failovers take no retry budget: {budget}"
    );
    let ejected = s["balancer"]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["circuit"] == "open");
    assert!(ejected, "the dead backend was ejected at once");
    gw.stop(false).await;
}

/// Freezes backend 1 (its hang switch: nothing new answered, nothing in flight moves) a moment
/// into a burst of `body`, and checks that every request is answered, each within its overdue
/// threshold plus the urgent probe's timeout plus a normal answer (and some slack).
async fn frozen_during_a_burst(body: Value, backend: SimConfig) {
    let backends = sims(vec![backend.clone(), backend.clone(), backend]).await;
    let mut cfg = no_periodic_probes(&backends);
    cfg.upstream.overdue_floor_ms = 300;
    cfg.health.urgent_timeout_ms = 300;
    cfg.balancer.policy = PolicyKind::RoundRobin;
    let gw = gateway(cfg).await;
    let client = client();
    let url = chat_url(&gw);
    // Normal answers first, so every endpoint knows how long its answers take.
    let mut normal = Duration::ZERO;
    for _ in 0..30 {
        let (answer, took) = burst(&client, &url, 1, &body).await.remove(0);
        assert_eq!(answer.status, 200);
        normal = normal.max(took);
    }
    let answers = burst(&client, &url, 60, &body);
    let freeze = async {
        actix_rt::time::sleep(Duration::from_millis(20)).await;
        backends[1].control.set_hang(true);
    };
    let (answers, ()) = futures_util::future::join(answers, freeze).await;
    let failed = failures(&answers);
    assert!(
        failed.is_empty(),
        "{} of 60 failed: {:?}",
        failed.len(),
        failed.first()
    );
    let s = stats(&client, &gw).await;
    let frozen = &s["balancer"]["endpoints"][1];
    assert_eq!(
        frozen["healthy"], false,
        "the urgent probe took it out: {frozen}"
    );
    // The overdue threshold is 3 x the p95 (at least 300 ms), then the probe's 300 ms, then the
    // answer elsewhere; 1 s of slack for a loaded test machine.
    let threshold = Duration::from_secs_f64(
        (3.0 * frozen["ttft_p95_ms"]
            .as_f64()
            .unwrap()
            .max(frozen["full_p95_ms"].as_f64().unwrap()))
        .max(300.0)
            / 1000.0,
    );
    let bound = threshold + Duration::from_millis(300) + 2 * normal + Duration::from_secs(1);
    let worst = answers.iter().map(|(_, took)| *took).max().unwrap();
    assert!(worst < bound, "worst {worst:?}, bound {bound:?}");
    backends[1].control.set_hang(false);
    gw.stop(false).await;
}

#[actix_rt::test]
async fn a_frozen_backend_under_a_burst_of_non_streamed_requests_loses_none() {
    frozen_during_a_burst(chat(8), paced(5)).await;
}

#[actix_rt::test]
async fn a_frozen_backend_under_a_burst_of_streams_loses_none() {
    // A first token 150 ms in: the freeze catches the streams on it before their first event.
    let slow_start = SimConfig {
        ttft_base_ms: 150,
        ..paced(5)
    };
    frozen_during_a_burst(chat_stream(8), slow_start).await;
}

#[actix_rt::test]
async fn a_stream_that_answers_its_head_then_stalls_or_resets_is_retried() {
    let backends = sims(vec![fast(), fast()]).await;
    let mut cfg = no_periodic_probes(&backends);
    cfg.upstream.first_byte_timeout_ms = 500;
    cfg.balancer.policy = PolicyKind::RoundRobin;
    cfg.balancer.eject_after_failures = 100;
    let gw = gateway(cfg).await;
    let client = client();
    let url = chat_url(&gw);
    for (fault, check) in [("stall", "cancelled"), ("reset", "errors")] {
        match fault {
            "stall" => backends[0].control.set_stall(true),
            _ => {
                backends[0].control.set_stall(false);
                backends[0].control.set_reset(true);
            }
        }
        let before = backends[0].control.snapshot();
        for _ in 0..4 {
            let answer = post(&client, &url, &chat_stream(3)).await;
            assert_eq!(answer.status, 200, "{fault}: {}", answer.text());
            let events = sse_events(&answer.text());
            assert_eq!(
                events.last().map(String::as_str),
                Some("[DONE]"),
                "{fault}: {events:?}"
            );
            assert!(
                events.iter().any(|e| e.contains("tok0")),
                "{fault}: {events:?}"
            );
        }
        assert!(
            eventually(Duration::from_secs(2), || async {
                let now = backends[0].control.snapshot();
                let (was, is) = match check {
                    "cancelled" => (before.cancelled, now.cancelled),
                    _ => (before.errors, now.errors),
                };
                is > was
            })
            .await,
            "{fault}: the broken stream was tried and dropped"
        );
    }
    gw.stop(false).await;
}

#[actix_rt::test]
async fn a_late_first_token_is_hedged_and_the_loser_cancelled() {
    // Backend 0 takes 1.5 s to its first token, backend 1 a few ms.
    let slow = SimConfig {
        ttft_base_ms: 1500,
        ..paced(5)
    };
    let backends = sims(vec![slow, paced(5)]).await;
    let mut cfg = no_periodic_probes(&backends);
    cfg.balancer.policy = PolicyKind::RoundRobin;
    cfg.hedge.enabled = true;
    cfg.hedge.min_ms = 50;
    cfg.hedge.max_ms = 200;
    // Every late stream here is hedged (two of the four start on the slow backend); the share's
    // bound has a test of its own.
    cfg.hedge.max_share = 1.0;
    let gw = gateway(cfg).await;
    let client = client();
    let url = chat_url(&gw);
    for _ in 0..4 {
        let start = Instant::now();
        let answer = post(&client, &url, &chat_stream(3)).await;
        assert_eq!(answer.status, 200);
        assert!(answer.text().trim_end().ends_with("[DONE]"));
        assert!(
            start.elapsed() < Duration::from_millis(1000),
            "the hedge answered first: {:?}",
            start.elapsed()
        );
    }
    let s = stats(&client, &gw).await;
    let budget = &s["balancer"]["retry_budget"];
    assert!(budget["hedges"].as_u64().unwrap() >= 1, "{budget}");
    assert!(budget["hedges_won"].as_u64().unwrap() >= 1, "{budget}");
    assert!(
        eventually(Duration::from_secs(2), || async {
            let slow = backends[0].control.snapshot();
            slow.cancelled >= 1 && slow.running == 0 && slow.waiting == 0
        })
        .await,
        "the slow backend's losing requests were cancelled: {:?}",
        backends[0].control.snapshot()
    );
    // Asked not to hedge, a request waits for its backend however slow.
    let mut waited = false;
    for _ in 0..2 {
        let start = Instant::now();
        let response = client
            .post(&url)
            .insert_header(("x-nanogate-hedge", "off"))
            .send_json(&chat_stream(1))
            .await
            .expect("answers");
        assert_eq!(response.status(), 200);
        waited |= start.elapsed() >= Duration::from_millis(1400);
    }
    assert!(
        waited,
        "with hedging off, the request on the slow backend waited for it"
    );
    gw.stop(false).await;
}

#[actix_rt::test]
async fn a_request_whose_primary_and_hedge_both_fail_is_retried_on_a_third_backend() {
    // One backend answers 500 after 300 ms, one never sends a head, one works. A request that
    // meets the first two (either as its primary, the other as its hedge) must end on the third:
    // - the primary answers 500 after the hedge went out to the silent one: the hedge waits only
    //   for what was left of the primary's wait, which is the gateway's limit, not the client's,
    //   so its timeout is a backend's failure, retried, not the client's deadline (a 504);
    // - the primary is the silent one and the hedge gets the 500: the failed hedge's backend is
    //   excluded from the retry with the primary's, or the retry could meet the 500 again.
    // The hedge goes to whichever of the other two looks sooner, a tie at random here, so the
    // requests go on until both orders happened a few times: without the hedge's backend
    // excluded, round robin's retry went back to it in about half of them.
    // Which of the two failing backends saw each request id, in order of arrival: the first saw
    // the primary.
    let seen = Arc::new(Mutex::new(Vec::<(bool, String)>::new()));
    let record = |failing: bool| {
        let seen = seen.clone();
        move |r: &FakeRequest| {
            if let Some(id) = r.header("x-request-id") {
                seen.lock().unwrap().push((failing, id.to_owned()));
            }
        }
    };
    let (on_failing, on_silent) = (record(true), record(false));
    let failing = Fake::start(move |r| match r.path.as_str() {
        "/health" => FakeResponse::empty(200),
        _ => {
            on_failing(r);
            FakeResponse::json(500, r#"{"error":{"message":"boom"}}"#)
                .after(Duration::from_millis(300))
        }
    });
    let silent = Fake::start(move |r| match r.path.as_str() {
        "/health" => FakeResponse::empty(200),
        _ => {
            on_silent(r);
            FakeResponse::sse(vec!["data: [DONE]\n\n".into()], true).after(Duration::from_secs(3))
        }
    });
    // A fourth backend serves only the model "phase": a request for it moves round robin's turn
    // on by one, so the races' primaries take every backend in turn.
    let phase_sim = SimConfig {
        models: vec!["phase".into()],
        ..fast()
    };
    let sim = sims(vec![fast(), phase_sim]).await;
    let mut cfg = config(&[]);
    let urls = [
        failing.url.as_str(),
        silent.url.as_str(),
        &sim[0].url(),
        &sim[1].url(),
    ];
    cfg.endpoints = urls
        .into_iter()
        .enumerate()
        .map(|(i, url)| {
            let mut e = nanogate_actors::endpoint::EndpointSpec::new(url);
            e.models = vec![if i == 3 { "phase" } else { "sim" }.into()];
            e
        })
        .collect();
    cfg.health.interval_ms = 60_000;
    cfg.health.unhealthy_interval_ms = 60_000;
    cfg.balancer.policy = PolicyKind::RoundRobin;
    cfg.balancer.eject_after_failures = 1000;
    cfg.upstream.first_byte_timeout_ms = 400;
    cfg.upstream.attempts = 2;
    cfg.hedge.enabled = true;
    cfg.hedge.min_ms = 50;
    cfg.hedge.max_ms = 100;
    cfg.hedge.max_share = 1.0;
    let gw = gateway(cfg).await;
    let client = client();
    let url = chat_url(&gw);
    let phase_chat = json!({"model": "phase", "messages": [{"role": "user", "content": "hi"}]});
    let (mut failed_first, mut silent_first) = (0, 0);
    for i in 0..80 {
        let id = format!("race-{i}");
        let mut response = client
            .post(&url)
            .insert_header(("x-request-id", id.as_str()))
            .send_json(&chat_stream(3))
            .await
            .expect("answers");
        let body = response.body().await.expect("body");
        let text = String::from_utf8_lossy(&body);
        assert_eq!(response.status(), 200, "{id}: {text}");
        assert!(text.trim_end().ends_with("[DONE]"), "{id}: {text}");
        let met: Vec<bool> = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, seen_id)| *seen_id == id)
            .map(|&(failing, _)| failing)
            .collect();
        let visits = |failing: bool| met.iter().filter(|&&f| f == failing).count();
        assert!(
            visits(true) <= 1 && visits(false) <= 1,
            "{id} went back to a backend that failed it (failing: true, silent: false): {met:?}"
        );
        if let [first, _] = met[..] {
            if first {
                failed_first += 1;
            } else {
                silent_first += 1;
            }
        }
        if failed_first >= 2 && silent_first >= 4 {
            break;
        }
        for _ in 0..i % 3 {
            let phase = post(&client, &url, &phase_chat).await;
            assert_eq!(phase.status, 200, "{}", phase.text());
        }
    }
    assert!(
        failed_first >= 2 && silent_first >= 4,
        "both races happened (primary failing: {failed_first}, primary silent: {silent_first})"
    );
    gw.stop(false).await;
}

#[actix_rt::test]
async fn an_added_backend_ramps_up_its_share_over_slow_start() {
    let warming = SimConfig {
        warmup_ms: 3000,
        warmup_factor: 5.0,
        ..paced(5)
    };
    let backends = sims(vec![paced(5), warming]).await;
    let mut cfg = config(&backends[..1]);
    cfg.admin.token = "token".into();
    cfg.balancer.policy = PolicyKind::RoundRobin;
    cfg.balancer.slow_start_ms = 3000;
    let gw = gateway(cfg).await;
    let client = client();
    let url = chat_url(&gw);
    let mut added = client
        .post(format!("{}/admin/endpoints", gw.url()))
        .insert_header(("authorization", "Bearer token"))
        .send_json(&json!({"url": backends[1].url()}))
        .await
        .expect("admin answers");
    assert_eq!(added.status(), 201);
    let id: Value = added.json().await.expect("json");
    let id = id["id"].to_string();
    assert!(
        eventually(Duration::from_secs(3), || async {
            stats(&client, &gw).await["balancer"]["endpoints"][1]["healthy"] == true
        })
        .await
    );
    let since = Instant::now();
    // (elapsed, went to the new backend) for a steady stream of requests, 8 at a time.
    let mut picks = Vec::new();
    while since.elapsed() < Duration::from_millis(3600) {
        let answers = burst(&client, &url, 8, &chat(1)).await;
        for (answer, _) in answers {
            assert_eq!(answer.status, 200);
            picks.push((
                since.elapsed(),
                answer.header("x-nanogate-endpoint") == Some(id.clone()),
            ));
        }
    }
    let share = |from: u64, to: u64| {
        let window: Vec<bool> = picks
            .iter()
            .filter(|(t, _)| (from..to).contains(&(t.as_millis() as u64)))
            .map(|(_, new)| *new)
            .collect();
        window.iter().filter(|new| **new).count() as f64 / window.len().max(1) as f64
    };
    let (early, late) = (share(0, 600), share(2800, 3600));
    assert!(
        early < 0.2,
        "a fresh backend starts with a small share: {early}"
    );
    assert!(late > 0.3, "and ramps to about half of round robin: {late}");
    gw.stop(false).await;
}

/// Two streams of one long system prompt, the second sent while the backend prefills it for the
/// first: the second waits for the first's prefill (its first token, or its due time: here the
/// gateway has learned nothing yet and expects it sooner) and then finds the prompt cached,
/// instead of computing it beside the first as llama.cpp would in a second slot.
#[actix_rt::test]
async fn a_stream_waits_for_the_prefill_of_its_prompt_already_in_progress() {
    // 7,000 characters, about 1,750 tokens: 350 ms of prefill at 200 µs a token.
    let system: String = (0..1000).map(|i| format!("w{:05} ", i * 7)).collect();
    let backends = sims(vec![SimConfig {
        prefill_us_per_token: 200,
        ..paced(5)
    }])
    .await;
    let gw = gateway(config(&backends)).await;
    let client = client();
    let url = chat_url(&gw);
    let body = |question: &str| {
        json!({"model": "sim", "max_tokens": 4, "stream": true, "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question}]})
    };
    let started = Instant::now();
    let first = async {
        let answer = post(&client, &url, &body("What is first?")).await;
        (answer, started.elapsed())
    };
    // Sent 30 ms after the first: well inside the first's prefill, and inside the ~160 ms the
    // gateway expects it to take before it has measured anything.
    let second = async {
        actix_rt::time::sleep(Duration::from_millis(30)).await;
        let answer = post(&client, &url, &body("And what comes second?")).await;
        (answer, started.elapsed())
    };
    // While the second waits, the backend has been sent the first alone.
    let waiting = async {
        actix_rt::time::sleep(Duration::from_millis(90)).await;
        backends[0].control.snapshot().requests
    };
    let ((first, first_done), (second, second_done), sent_at_90ms) =
        futures_util::future::join3(first, second, waiting).await;
    assert!(
        failures(&[(first, first_done), (second, second_done)]).is_empty(),
        "both streams complete"
    );
    assert_eq!(sent_at_90ms, 1, "the second waited at the gateway");
    let endpoint = stats(&client, &gw).await["balancer"]["endpoints"][0].clone();
    assert_eq!(endpoint["prefill_holds"], 1, "{endpoint}");
    // The second request's prefill found the whole system prompt cached (109 full blocks).
    let sim = backends[0].control.snapshot();
    assert!(sim.prefix_hit_tokens >= 1_700, "{sim:?}");
    // It could not have its first token before the first's prefill ended.
    assert!(second_done >= Duration::from_millis(350), "{second_done:?}");
    gw.stop(false).await;
}

/// llama.cpp keeps a prompt in the slot of the request using it until that request ends: a
/// second request of the prompt before then gets the other slot and computes it again, cached or
/// not. A backend that answers like llama-server (its `/metrics` gauges named `llamacpp:`) gets
/// the second request only when the first has ended, so the prompt is never in two slots at
/// once; the same backend without those names (vLLM's) gets them together.
#[actix_rt::test]
async fn on_llama_cpp_a_request_waits_for_the_end_of_the_one_holding_its_prompt() {
    for llama in [true, false] {
        let metrics = if llama {
            "llamacpp:requests_processing 0\nllamacpp:requests_deferred 0\n"
        } else {
            "vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"
        };
        // Each answer: its first token at 100 ms, its end 300 ms later.
        let backend = Fake::start(move |request| match request.path.as_str() {
            "/metrics" => FakeResponse::new(200, "text/plain", metrics),
            "/v1/chat/completions" => {
                let chunk = |content: &str| {
                    format!(
                        "data: {}\n\n",
                        json!({"id": "c", "object": "chat.completion.chunk", "created": 1,
                        "model": "sim", "choices": [{"index": 0,
                        "delta": {"content": content}, "finish_reason": null}]})
                    )
                };
                let mut answer = FakeResponse::sse(
                    vec![chunk("a"), chunk("b"), "data: [DONE]\n\n".into()],
                    true,
                );
                if let FakeBody::Chunked { pieces, .. } = &mut answer.body {
                    pieces[0].0 = Duration::from_millis(100);
                    pieces[1].0 = Duration::from_millis(300);
                }
                answer
            }
            _ => FakeResponse::empty(200),
        });
        let mut config = config_for(&backend.url);
        config.health.load_interval_ms = 50;
        let gw = gateway(config).await;
        let client = client();
        assert!(
            eventually(Duration::from_secs(5), || async {
                stats(&client, &gw).await["balancer"]["endpoints"][0]["reported"]["binds_slots"]
                    == json!(llama)
            })
            .await,
            "the gateway reads the server kind from /metrics"
        );
        let system: String = (0..400).map(|i| format!("w{:05} ", i * 7)).collect();
        let body = |question: &str| {
            json!({"model": "sim", "max_tokens": 2, "stream": true, "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": question}]})
        };
        let url = chat_url(&gw);
        let started = Instant::now();
        let (first_body, second_body) = (body("first?"), body("second?"));
        let first = post(&client, &url, &first_body);
        let second = async {
            actix_rt::time::sleep(Duration::from_millis(150)).await;
            post(&client, &url, &second_body).await
        };
        let (first, second) = futures_util::future::join(first, second).await;
        assert_eq!((first.status.as_u16(), second.status.as_u16()), (200, 200));
        let elapsed = started.elapsed();
        let endpoint = stats(&client, &gw).await["balancer"]["endpoints"][0].clone();
        if llama {
            // The second went when the first had ended (400 ms), after its first token (100 ms).
            assert_eq!(endpoint["prefill_holds"], 1, "{endpoint}");
            assert!(elapsed >= Duration::from_millis(800), "{elapsed:?}");
        } else {
            assert_eq!(endpoint["prefill_holds"], 0, "{endpoint}");
        }
        assert_eq!(backend.on("/v1/chat/completions").len(), 2);
        gw.stop(false).await;
    }
}

/// The prefill line is learned from what the backend says it had cached, not from the gateway's
/// guess: a backend whose cache is emptied behind the gateway's back (here `/sim/flush`; in life,
/// evictions the index does not see) answers cold prompts the index takes for cached, and says so
/// in `usage.prompt_tokens_details` by leaving the details out. Taught by the index alone, every
/// answer looked cached: the line had no slope, and its warm time was the average of warm and
/// cold answers, far below what a cold prompt takes.
#[actix_rt::test]
async fn the_prefill_line_learns_from_the_cached_tokens_the_backend_reports() {
    // 8,000 characters, about 2,000 tokens in 126 blocks: ~105 ms of prefill cold.
    let system: String = (0..1000).map(|i| format!("v{:06} ", i * 3)).collect();
    let backends = sims(vec![SimConfig::default()]).await;
    let gw = gateway(config(&backends)).await;
    let client = client();
    let url = chat_url(&gw);
    let flush = format!("{}/sim/flush", backends[0].url());
    for i in 0..12 {
        if i % 2 == 0 {
            let flushed = client.post(&flush).send().await.expect("flush");
            assert_eq!(flushed.status(), 200);
        }
        let body = json!({"model": "sim", "max_tokens": 1, "stream": true, "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": format!("Question {i}?")}]});
        let answer = post(&client, &url, &body).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    let sim = backends[0].control.snapshot();
    assert!(
        sim.prefix_hit_tokens > 0,
        "the odd requests were warm: {sim:?}"
    );
    // The cached answers' first tokens, as the gateway measured them.
    let fastest = stats(&client, &gw).await["metrics"]["overall"]["ttft_ms"]["min"]
        .as_f64()
        .expect("a measured first token");
    let learned = eventually(Duration::from_secs(5), || async {
        let estimate = first_estimate(&client, &gw).await;
        let (warm, block) = (estimate["warm_ms"].as_f64(), estimate["block_ms"].as_f64());
        // A line that puts cached prompts where the cached answers were and cold ones where the
        // cold answers were.
        matches!((warm, block), (Some(w), Some(b))
            if w > 0.0 && w < fastest + 10.0 && w + 126.0 * b > 90.0)
    })
    .await;
    let estimate = &first_estimate(&client, &gw).await;
    assert!(
        learned,
        "cached answers from {fastest} ms, cold ones ~105 ms over 126 blocks: {estimate}"
    );
    gw.stop(false).await;
}

/// What the balancer estimates of the first endpoint, as `/stats` shows it.
async fn first_estimate(client: &awc::Client, gw: &Gateway) -> Value {
    stats(client, gw).await["balancer"]["endpoints"][0]["estimate"].take()
}

/// A gateway that starts under load reads its backends' load as soon as more run on one than its
/// default guess of a batch, not a load interval later: until then every backend looked queued.
#[actix_rt::test]
async fn a_backend_running_more_than_its_guessed_batch_has_its_load_read_at_once() {
    let backends = sims(vec![paced(20)]).await;
    let mut cfg = config(&backends);
    // The interval's reads out of the way: the first at start, the next a minute later.
    cfg.health.load_interval_ms = 60_000;
    let gw = gateway(cfg).await;
    let client = client();
    let url = chat_url(&gw);
    let body = json!({"model": "sim", "max_tokens": 100, "stream": true,
        "messages": [{"role": "user", "content": "a long answer, please"}]});
    // Twelve streams of ~2 s each, four past the default guess of 8.
    let streams = burst(&client, &url, 12, &body);
    let read = async {
        eventually(Duration::from_millis(1500), || async {
            let estimate = first_estimate(&client, &gw).await;
            estimate["capacity"].as_u64().is_some_and(|c| c >= 12)
        })
        .await
    };
    let (answers, read) = futures_util::future::join(streams, read).await;
    assert!(failures(&answers).is_empty(), "{:?}", failures(&answers));
    let estimate = &first_estimate(&client, &gw).await;
    assert!(
        read,
        "12 running seen well before the next interval's read: {estimate}"
    );
    gw.stop(false).await;
}
