//! `nanogate stats`: a running gateway's `/stats`, laid out for a terminal.

use std::fmt::Write;

use serde_json::Value;

/// Fetches `{url}/stats` and renders it.
pub async fn fetch(url: &str) -> Result<String, String> {
    let (_, stats) = get_json(url, "/stats", &[], None, 16 * 1024 * 1024).await?;
    Ok(render(&stats))
}

/// `GET {url}{path}` with `query` (and the admin token, if given): its status and JSON body, read
/// up to `limit` bytes; every failure as a message naming the target.
async fn get_json(
    url: &str,
    path: &str,
    query: &[(&str, &str)],
    token: Option<&str>,
    limit: usize,
) -> Result<(awc::http::StatusCode, Value), String> {
    let target = format!("{}{path}", url.trim_end_matches('/'));
    let mut request = awc::Client::default().get(&target);
    if !query.is_empty() {
        request = request.query(&query).map_err(|e| e.to_string())?;
    }
    if let Some(token) = token {
        request = request.insert_header(("authorization", format!("Bearer {token}")));
    }
    let mut response = request
        .send()
        .await
        .map_err(|e| format!("cannot reach {target}: {e}"))?;
    let body = response
        .json()
        .limit(limit)
        .await
        .map_err(|e| format!("{target} did not answer JSON: {e}"))?;
    Ok((response.status(), body))
}

fn num(v: &Value) -> String {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() != 0.0 => format!("{f:.2}"),
            _ => n.to_string(),
        },
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn latency(v: &Value) -> String {
    if v.is_null() {
        return "-".into();
    }
    format!(
        "p50 {} p90 {} p99 {} (min {} avg {} max {}) ms",
        num(&v["p50"]),
        num(&v["p90"]),
        num(&v["p99"]),
        num(&v["min"]),
        num(&v["avg"]),
        num(&v["max"])
    )
}

/// Errors by cause, largest first: `timeout 3, backend 1`.
fn causes(v: &Value) -> String {
    let mut counts: Vec<(&String, u64)> = v
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(cause, n)| Some((cause, n.as_u64()?)))
        .collect();
    if counts.is_empty() {
        return "none".into();
    }
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    counts
        .iter()
        .map(|(cause, n)| format!("{cause} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The text view of a `/stats` object.
pub fn render(s: &Value) -> String {
    let mut out = String::new();
    let p = &s["pool"];
    let _ = writeln!(
        out,
        "pool      size {} (min {}, max {})  workers {}  busy {}  queued {}  refused {}",
        num(&p["current"]),
        num(&p["min"]),
        num(&p["max"]),
        num(&p["workers"]),
        num(&p["busy"]),
        num(&p["queued"]),
        num(&p["refused"])
    );
    if let Some(r) = p.get("last_resize").filter(|r| !r.is_null()) {
        let _ = writeln!(
            out,
            "          last resize {} -> {}: {}",
            num(&r["from"]),
            num(&r["to"]),
            num(&r["why"])
        );
    }
    let _ = writeln!(
        out,
        "\nendpoints (policy {})",
        num(&s["balancer"]["policy"])
    );
    let probes = s["health"]["endpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for e in s["balancer"]["endpoints"].as_array().into_iter().flatten() {
        let probe = probes
            .iter()
            .find(|p| p["id"] == e["id"])
            .cloned()
            .unwrap_or(Value::Null);
        let load = &probe["load"];
        let _ = writeln!(
            out,
            "  {:<28} {:<9} circuit {:<9} ejections {:>3}  weight {:>5}  latency {} ms  in-flight {:>4}  probe {} (ok {} / fail {})  backend running {} waiting {}",
            num(&e["url"]),
            if e["draining"].as_bool() == Some(true) {
                "draining"
            } else if e["healthy"].as_bool() == Some(true) {
                "healthy"
            } else {
                "DOWN"
            },
            num(&e["circuit"]),
            num(&e["ejections_total"]),
            num(&e["weight"]),
            num(&e["latency_ewma_ms"]),
            num(&e["in_flight"]),
            num(&probe["last_result"]),
            num(&probe["consecutive_successes"]),
            num(&probe["consecutive_failures"]),
            num(&load["running"]),
            num(&load["waiting"]),
        );
    }
    let c = &s["cache"];
    let _ = writeln!(
        out,
        "\ncache     entries {}  bytes {}  hits {}  misses {}  coalesced {}  evictions {}  expirations {}",
        num(&c["entries"]),
        num(&c["bytes"]),
        num(&c["hits"]),
        num(&c["misses"]),
        num(&c["coalesced"]),
        num(&c["evictions"]),
        num(&c["expirations"])
    );
    let budget = &s["balancer"]["retry_budget"];
    let _ = writeln!(
        out,
        "retries   {}  denied by the budget {}  budget left {}",
        num(&budget["retries"]),
        num(&budget["denied"]),
        num(&budget["tokens"])
    );
    let m = &s["metrics"];
    let series = |out: &mut String, name: &str, v: &Value| {
        let recent = &v["last_minute"];
        let _ = writeln!(
            out,
            "  {:<28} requests {}  errors {} ({:.2}%)  client errors {}  cancelled {}  rps {}\n  {:<28} errors by cause: {}\n  {:<28} latency {}\n  {:<28} ttft    {}\n  {:<28} last minute: requests {}  errors {}  latency {}\n  {:<28}              ttft    {}",
            name,
            num(&v["requests"]),
            num(&v["errors"]),
            v["error_rate"].as_f64().unwrap_or(0.0) * 100.0,
            num(&v["client_errors"]),
            num(&v["cancelled"]),
            num(&v["rps"]),
            "",
            causes(&v["by_cause"]),
            "",
            latency(&v["latency_ms"]),
            "",
            latency(&v["ttft_ms"]),
            "",
            num(&recent["requests"]),
            num(&recent["errors"]),
            latency(&recent["latency_ms"]),
            "",
            latency(&recent["ttft_ms"]),
        );
        let (tokens, rate) = (&v["tokens"], &recent["tokens_per_second"]);
        if !tokens.is_null() {
            let _ = writeln!(
                out,
                "  {:<28} tokens  prompt {}  completion {}  cached {}  (estimated answers {})  last minute {} prompt/s {} completion/s",
                "",
                num(&tokens["prompt"]),
                num(&tokens["completion"]),
                num(&tokens["cached"]),
                num(&tokens["estimated_answers"]),
                num(&rate["prompt"]),
                num(&rate["completion"]),
            );
        }
    };
    let _ = writeln!(out, "\ntraffic (since start, and the last minute)");
    series(&mut out, "all", &m["overall"]);
    for section in ["endpoints", "models", "keys"] {
        if let Some(map) = m[section].as_object() {
            for (name, v) in map {
                series(&mut out, name, v);
            }
        }
    }
    let u = &s["usage_log"];
    let _ = writeln!(
        out,
        "
usage log {}  written {}  buffered {} (peak {}, at most {})  dropped {}  failed writes {}  pruned {} (kept {} days)  database up {}",
        num(&u["store"]),
        num(&u["written"]),
        num(&u["buffered"]),
        num(&u["peak_buffered"]),
        num(&u["buffer_records"]),
        num(&u["dropped"]),
        num(&u["failed_writes"]),
        num(&u["pruned"]),
        num(&u["retention_days"]),
        num(&u["database_up"]),
    );
    out
}

/// `nanogate usage`: `GET {url}/admin/usage` as a table.
pub async fn usage(
    url: &str,
    token: &str,
    query: &[(&str, Option<String>)],
) -> Result<String, String> {
    let params: Vec<(&str, &str)> = query
        .iter()
        .filter_map(|(k, v)| Some((*k, v.as_deref()?)))
        .collect();
    let (status, body) =
        get_json(url, "/admin/usage", &params, Some(token), 64 * 1024 * 1024).await?;
    if !status.is_success() {
        return Err(format!(
            "{}/admin/usage: {status} {}",
            url.trim_end_matches('/'),
            body["error"]["message"]
        ));
    }
    Ok(usage_table(&body))
}

fn usage_table(body: &Value) -> String {
    let mut out = String::new();
    let group = body["group_by"].as_str().unwrap_or("all");
    let _ = writeln!(
        out,
        "{:<28} {:>9} {:>7} {:>12} {:>12} {:>10} {:>9} {:>10} {:>10} {:>10}",
        group,
        "requests",
        "errors",
        "prompt",
        "completion",
        "cached",
        "estimated",
        "p50 ms",
        "p99 ms",
        "ttft p50"
    );
    for row in body["rows"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:<28} {:>9} {:>7} {:>12} {:>12} {:>10} {:>9} {:>10} {:>10} {:>10}",
            row["group"]
                .as_str()
                .unwrap_or(if group == "all" { "all" } else { "-" }),
            num(&row["requests"]),
            num(&row["errors"]),
            num(&row["prompt_tokens"]),
            num(&row["completion_tokens"]),
            num(&row["cached_tokens"]),
            num(&row["estimated"]),
            num(&row["p50_latency_ms"]),
            num(&row["p99_latency_ms"]),
            num(&row["p50_ttft_ms"]),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_section() {
        let stats = serde_json::json!({
            "pool": {"current": 10, "min": 10, "max": 5000, "workers": 3, "busy": 1, "queued": 0, "refused": 0, "last_resize": null},
            "balancer": {"policy": "weighted", "endpoints": [{"id": 3, "url": "http://a", "healthy": true, "circuit": "closed", "weight": 1.1, "in_flight": 2}]},
            "health": {"endpoints": [{"id": 3, "last_result": "200 OK", "consecutive_successes": 4, "consecutive_failures": 0, "load": {"running": 3.0, "waiting": 0.0}}]},
            "cache": {"entries": 1, "hits": 5},
            "metrics": {"overall": {"requests": 9, "errors": 1, "error_rate": 0.111, "rps": 2.5, "latency_ms": {"p50": 1.5},
                "by_cause": {"timeout": 1, "client_error": 2}, "last_minute": {"requests": 4, "latency_ms": {"p99": 7.5}}},
                "endpoints": {}, "models": {"sim": {"requests": 9}}}
        });
        let text = render(&stats);
        for needle in [
            "size 10",
            "http://a",
            "healthy",
            "200 OK",
            "hits 5",
            "requests 9",
            "11.10%",
            "sim",
            "client_error 2, timeout 1",
            "last minute: requests 4",
            "p99 7.5",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }

    #[test]
    fn renders_the_usage_table_by_group() {
        let body = serde_json::json!({"group_by": "model", "rows": [
            {"group": "sim", "requests": 12, "errors": 1, "prompt_tokens": 340, "completion_tokens": 99,
             "cached_tokens": 0, "estimated": 2, "p50_latency_ms": 4.5, "p99_latency_ms": 20.25, "p50_ttft_ms": null}]});
        let text = usage_table(&body);
        assert!(text.starts_with("model"), "{text}");
        for needle in ["sim", "12", "340", "99", "4.50", "20.25"] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
