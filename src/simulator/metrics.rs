//! vLLM-named Prometheus gauges and counters, so the gateway's load-aware balancing scrapes a
//! simulator exactly as it would scrape vLLM.
//!
//! Like vLLM, the `model_name` label is the first served name: aliases share one engine, so
//! one series per alias would count the same load several times.

use std::{fmt::Write, sync::atomic::Ordering::Relaxed};

use super::{control::SimControl, prefix::BLOCK_TOKENS, SimConfig};

/// The `/metrics` body in Prometheus text format 0.0.4.
pub fn render(cfg: &SimConfig, control: &SimControl) -> String {
    let stats = control.snapshot();
    let counters = &control.counters;
    let model = escape_label(cfg.models.first().map_or("", String::as_str));
    let kv_cache_usage = (stats.running as f64 / cfg.max_batch as f64).min(1.0);
    let series: [(&str, &str, &str, String); 8] = [
        (
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            stats.running.to_string(),
        ),
        (
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            stats.waiting.to_string(),
        ),
        (
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            kv_cache_usage.to_string(),
        ),
        (
            "vllm:request_success_total",
            "counter",
            "Count of successfully processed requests.",
            stats.completed.to_string(),
        ),
        (
            "vllm:prompt_tokens_total",
            "counter",
            "Number of prefill tokens processed.",
            counters.prompt_tokens.load(Relaxed).to_string(),
        ),
        (
            "vllm:generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            counters.generation_tokens.load(Relaxed).to_string(),
        ),
        (
            "vllm:prefix_cache_queries_total",
            "counter",
            "Prefix cache queries, in terms of number of queried tokens.",
            stats.prefix_query_tokens.to_string(),
        ),
        (
            "vllm:prefix_cache_hits_total",
            "counter",
            "Prefix cache hits, in terms of number of cached tokens.",
            stats.prefix_hit_tokens.to_string(),
        ),
    ];
    let mut out = String::with_capacity(1280);
    for (name, kind, help, value) in series {
        // Writing to a String cannot fail.
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{model_name=\"{model}\"}} {value}\n"
        );
    }
    // vLLM publishes its KV-cache geometry as an info gauge: a router can size its picture of
    // the prefix cache from it.
    let _ = write!(
        out,
        "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n\
         # TYPE vllm:cache_config_info gauge\n\
         vllm:cache_config_info{{block_size=\"{BLOCK_TOKENS}\",enable_prefix_caching=\"{}\",\
         num_gpu_blocks=\"{}\"}} 1.0\n",
        if cfg.prefix_cache_blocks > 0 {
            "True"
        } else {
            "False"
        },
        cfg.prefix_cache_blocks,
    );
    out
}

/// Label values escape backslash, double quote and newline (text format 0.0.4).
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_vllm_names_with_model_label() {
        let text = render(&SimConfig::default(), &SimControl::new(0.0));
        assert!(text.contains("# TYPE vllm:num_requests_running gauge\n"));
        assert!(text.contains("vllm:num_requests_waiting{model_name=\"sim\"} 0\n"));
        assert!(text.contains("vllm:kv_cache_usage_perc{model_name=\"sim\"} 0\n"));
        assert!(text.contains("# TYPE vllm:generation_tokens_total counter\n"));
        assert!(text.contains("vllm:prefix_cache_queries_total{model_name=\"sim\"} 0\n"));
        assert!(text.contains("vllm:prefix_cache_hits_total{model_name=\"sim\"} 0\n"));
        assert!(text.contains(
            "vllm:cache_config_info{block_size=\"16\",enable_prefix_caching=\"True\",num_gpu_blocks=\"4096\"} 1.0\n"
        ));
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
