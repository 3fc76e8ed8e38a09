//! Micro-benchmarks of what every request pays on the way to a backend: each policy's pick at
//! 4, 64 and 256 endpoints, request classification (with and without prompt block keys), the
//! prefix index, and a response-cache lookup. `cargo bench` runs them; `cargo bench -- pick`
//! runs one group. The figures are in BENCHMARKS.md.

use std::hint::black_box;
use std::sync::Arc;

use actix_web::http::header::HeaderMap;
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use nanogate::config::Config;
use nanogate::ingress::request::{classify_with_blocks, Operation};
use nanogate_actors::cache::{CacheSettings, CachedResponse, ResponseCache};
use nanogate_actors::clock;
use nanogate_actors::endpoint::{Bits, Endpoint, EndpointSpec, PickRequest, RoutingTable};
use nanogate_actors::policy::{PolicyKind, PolicySettings};
use nanogate_actors::prefix_index::{block_keys, PrefixIndex};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use serde_json::json;

const POLICIES: [PolicyKind; 6] = [
    PolicyKind::CacheAware,
    PolicyKind::RoundRobin,
    PolicyKind::P2c,
    PolicyKind::LeastLoad,
    PolicyKind::Affinity,
    PolicyKind::Weighted,
];

/// A system prompt of about 2,000 tokens, as in the routing benchmark.
fn system_prompt(n: usize) -> String {
    let mut text = format!("System prompt {n}. You are assistant number {n}; ");
    while text.len() < 8000 {
        text.push_str("the assistant must answer politely and cite sources when asked ");
    }
    text.truncate(8000);
    text
}

fn chat_body(system: &str, question: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "model": "m",
        "stream": true,
        "max_tokens": 32,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ],
    }))
    .expect("encodes")
}

/// `n` endpoints serving model `m`, each with a prefix index of 8,192 blocks in which endpoint
/// `i` holds system prompt `i % 16` (or, `everywhere`, all 16).
fn table(policy: PolicyKind, n: usize, everywhere: bool) -> (RoutingTable, Vec<Vec<u64>>) {
    let prompts: Vec<Vec<u64>> = (0..16)
        .map(|i| {
            let mut keys = Vec::new();
            block_keys(system_prompt(i).as_bytes(), 512, &mut keys);
            keys
        })
        .collect();
    let endpoints: Vec<Arc<Endpoint>> = (0..n)
        .map(|id| {
            let spec = EndpointSpec::new(format!("http://10.0.{}.{}:8000", id / 250, id % 250));
            let endpoint = Arc::new(Endpoint::new(id, &spec, true).with_prefix_index(8192));
            if everywhere {
                prompts.iter().for_each(|p| endpoint.prefix.insert(p));
            } else {
                endpoint.prefix.insert(&prompts[id % 16]);
            }
            endpoint
        })
        .collect();
    let models = vec![Some(vec!["m".to_string()]); n];
    let settings = PolicySettings {
        policy,
        ..PolicySettings::default()
    };
    (RoutingTable::new(endpoints, &models, &settings), prompts)
}

/// Each policy's pick where one endpoint in 16 holds the request's prompt; and `cache_aware`'s
/// where every endpoint does (`pick_everywhere`: each prefix match searches the whole prompt).
fn pick(c: &mut Criterion) {
    let cases = POLICIES
        .iter()
        .map(|&policy| ("pick", policy, false))
        .chain([("pick_everywhere", PolicyKind::CacheAware, true)]);
    for (name, policy, everywhere) in cases {
        pick_group(c, name, policy, everywhere);
    }
}

fn pick_group(c: &mut Criterion, name: &str, policy: PolicyKind, everywhere: bool) {
    let mut group = c.benchmark_group(name);
    for n in [4, 64, 256] {
        let (table, prompts) = table(policy, n, everywhere);
        // Keep a few requests in flight, as under load.
        let _busy: Vec<_> = table
            .endpoints
            .iter()
            .step_by(3)
            .map(|e| e.begin())
            .collect();
        let mut rng = SmallRng::seed_from_u64(1);
        let mut i = 0usize;
        group.bench_with_input(BenchmarkId::new(policy.name(), n), &n, |b, _| {
            b.iter(|| {
                i = i.wrapping_add(1);
                let request = PickRequest {
                    model: "m",
                    exclude: Bits::default(),
                    affinity: Some(i as u64 % 16),
                    blocks: &prompts[i % 16],
                };
                black_box(table.pick(&request, &mut rng).map(|p| p.slot))
            })
        });
    }
    group.finish();
}

fn classification(c: &mut Criterion) {
    let affinity = Config::defaults().affinity;
    let headers = HeaderMap::new();
    let long = chat_body(
        &system_prompt(0),
        "question 7: what should I know about refunds?",
    );
    let short = chat_body("You are helpful.", "Say hello");
    let mut group = c.benchmark_group("classify");
    for (name, body, blocks) in [
        ("short", &short, 0),
        ("8k_prompt", &long, 0),
        ("8k_prompt_with_blocks", &long, 512),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                black_box(
                    classify_with_blocks(
                        Operation::ChatCompletions,
                        black_box(body),
                        &headers,
                        &affinity,
                        blocks,
                    )
                    .map(|c| c.blocks.len()),
                )
            })
        });
    }
    group.finish();
}

fn prefix_index(c: &mut Criterion) {
    let prompt = system_prompt(3);
    let mut keys = Vec::with_capacity(512);
    block_keys(prompt.as_bytes(), 512, &mut keys);
    let index = PrefixIndex::new(8192);
    for i in 0..64 {
        let mut other = Vec::new();
        block_keys(system_prompt(100 + i).as_bytes(), 512, &mut other);
        index.insert(&other);
    }
    index.insert(&keys);
    let mut group = c.benchmark_group("prefix_index");
    group.bench_function("block_keys_8k", |b| {
        let mut out = Vec::with_capacity(512);
        b.iter(|| {
            out.clear();
            block_keys(black_box(prompt.as_bytes()), 512, &mut out);
            black_box(out.len())
        })
    });
    group.bench_function("matched_125_blocks", |b| {
        b.iter(|| black_box(index.matched(black_box(&keys))))
    });
    group.bench_function("insert_125_blocks", |b| {
        b.iter(|| index.insert(black_box(&keys)))
    });
    group.finish();
}

fn cache_lookup(c: &mut Criterion) {
    let mut cache = ResponseCache::new(CacheSettings::default(), clock::system());
    // Keys as the ingress builds them: route, credential digest, body.
    let key = |n: usize| {
        let mut key = b"/v1/chat/completions\n".to_vec();
        key.extend_from_slice(&[7u8; 32]);
        key.extend_from_slice(&chat_body(&system_prompt(n % 16), &format!("question {n}")));
        key
    };
    for n in 0..2000 {
        cache.put(
            key(n),
            CachedResponse {
                status: 200,
                content_type: Some("application/json".into()),
                body: Bytes::from_static(b"{\"choices\":[]}"),
            },
        );
    }
    let (hit, miss) = (key(1234), key(99_999));
    let mut group = c.benchmark_group("cache_lookup_8k_key");
    group.bench_function("hit", |b| {
        b.iter(|| black_box(cache.get(black_box(&hit)).is_some()))
    });
    group.bench_function("miss", |b| {
        b.iter(|| black_box(cache.get(black_box(&miss)).is_some()))
    });
    group.finish();
}

criterion_group!(benches, pick, classification, prefix_index, cache_lookup);
criterion_main!(benches);
