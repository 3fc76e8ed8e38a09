//! What each request asks: one fixed prompt, or the shared-prefix workload that routing quality
//! is measured with.
//!
//! Shared prefix (`--prefixes N`): N distinct system prompts of `--prefix-chars` characters are
//! generated once from `--seed`; request `n` sends one of them, picked uniformly by a hash of
//! (seed, n), followed by a user question unique to `n`. Servers with a prefix cache (vLLM,
//! SGLang, the simulator) then answer fast only where that system prompt was seen recently, so a
//! router that keeps each prefix on one backend shows up in the time to first token. The pick
//! depends only on (seed, n), so a run is reproducible whatever order requests complete in.
//!
//! Bodies are assembled from pre-serialised bytes (the JSON up to the user question, per system
//! prompt), so building one costs a copy, not a JSON encoding of kilobytes of prompt.

use bytes::{BufMut, Bytes, BytesMut};
use rand::{rngs::SmallRng, Rng, SeedableRng};
use serde_json::{json, Value};

use super::LoadtestArgs;

pub(crate) enum Workload {
    /// Every request sends this body, serialised once.
    Fixed(Bytes),
    SharedPrefix {
        /// Per system prompt: the body up to where the user question's JSON string goes.
        heads: Vec<Vec<u8>>,
        seed: u64,
    },
}

/// Words the system prompts are made of: prose-like text, so the prompts read (and compress)
/// like real ones rather than like noise.
const WORDS: &[&str] = &[
    "the",
    "assistant",
    "must",
    "answer",
    "politely",
    "and",
    "cite",
    "sources",
    "when",
    "asked",
    "about",
    "policy",
    "billing",
    "refunds",
    "accounts",
    "never",
    "reveal",
    "internal",
    "tools",
    "use",
    "concise",
    "markdown",
    "tables",
    "for",
    "comparisons",
    "escalate",
    "to",
    "a",
    "human",
    "if",
    "unsure",
    "customer",
    "data",
    "is",
    "private",
    "follow",
    "these",
    "rules",
    "strictly",
];

/// Topics of the unique user questions.
const TOPICS: &[&str] = &[
    "my last invoice",
    "resetting a password",
    "the refund policy",
    "upgrading a plan",
    "exporting my data",
    "closing an account",
];

impl Workload {
    pub fn new(args: &LoadtestArgs) -> Self {
        let mut body = json!({
            "model": args.model,
            "max_tokens": args.max_tokens,
            "stream": args.stream,
        });
        if args.stream {
            body["stream_options"] = json!({"include_usage": true});
        }
        if args.prefixes == 0 {
            body["messages"] = json!([{"role": "user", "content": args.prompt}]);
            return Self::Fixed(Bytes::from(body.to_string()));
        }
        let mut rng = SmallRng::seed_from_u64(args.seed);
        let heads = (0..args.prefixes)
            .map(|index| {
                let system = system_prompt(&mut rng, index, args.prefix_chars);
                head(&body, &system)
            })
            .collect();
        Self::SharedPrefix {
            heads,
            seed: args.seed,
        }
    }

    /// The body of request number `n` (from 0).
    pub fn body(&self, n: u64) -> Bytes {
        match self {
            Self::Fixed(body) => body.clone(),
            Self::SharedPrefix { heads, seed } => {
                let pick = mix(*seed, n) % heads.len() as u64;
                let head = &heads[usize::try_from(pick).unwrap_or(0)];
                let question = Value::from(question(n)).to_string();
                let mut body = BytesMut::with_capacity(head.len() + question.len() + 3);
                body.put_slice(head);
                body.put_slice(question.as_bytes());
                body.put_slice(b"}]}");
                body.freeze()
            }
        }
    }
}

/// System prompt number `index`: its number first, so any two differ within the first cache
/// block (64 characters) and share no prefix at all; then seeded prose up to exactly `chars`
/// characters (all ASCII).
fn system_prompt(rng: &mut SmallRng, index: usize, chars: usize) -> String {
    let mut text = format!("System prompt {index}. You are assistant number {index}; ");
    while text.len() < chars {
        text.push_str(WORDS[rng.gen_range(0..WORDS.len())]);
        text.push(' ');
    }
    text.truncate(chars);
    text
}

/// The user question of request `n`: unique, short, and never sharing the system prompt's text.
fn question(n: u64) -> String {
    let topic = TOPICS[usize::try_from(n % TOPICS.len() as u64).unwrap_or(0)];
    format!("question {n}: what should I know about {topic}?")
}

/// The body JSON with `messages` = [system, user] cut just before the user content string, so
/// each request only appends its question and `}]}`. `body` is an object without `messages`.
fn head(body: &Value, system: &str) -> Vec<u8> {
    let mut head = body.to_string().into_bytes();
    // An object's encoding ends in its closing brace; reopen it to add `messages` last.
    head.pop();
    head.extend_from_slice(br#","messages":[{"role":"system","content":"#);
    head.extend_from_slice(Value::from(system).to_string().as_bytes());
    head.extend_from_slice(br#"},{"role":"user","content":"#);
    head
}

/// splitmix64 of (seed, n): a uniform, stateless pick per request.
fn mix(seed: u64, n: u64) -> u64 {
    let mut z = seed
        .wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn args(prefixes: usize, seed: u64) -> LoadtestArgs {
        LoadtestArgs {
            url: "http://h/".into(),
            requests: 1,
            concurrency: 1,
            rate: None,
            stream: true,
            model: "m".into(),
            max_tokens: 3,
            prompt: "hi".into(),
            timeout: 1.0,
            api_key: None,
            json: false,
            quiet: true,
            prefixes,
            prefix_chars: 500,
            seed,
        }
    }

    fn parse(body: &Bytes) -> Value {
        serde_json::from_slice(body).expect("valid JSON body")
    }

    #[test]
    fn shared_prefix_bodies_are_valid_and_deterministic() {
        let workload = Workload::new(&args(4, 7));
        let mut systems = HashSet::new();
        for n in 0..200 {
            let body = parse(&workload.body(n));
            assert_eq!(
                (body["model"].as_str(), body["max_tokens"].as_u64()),
                (Some("m"), Some(3))
            );
            assert_eq!(body["stream_options"]["include_usage"], true);
            let messages = body["messages"].as_array().expect("messages");
            assert_eq!(
                (messages[0]["role"].as_str(), messages[1]["role"].as_str()),
                (Some("system"), Some("user"))
            );
            let system = messages[0]["content"].as_str().expect("system text");
            assert_eq!(system.chars().count(), 500);
            let user = messages[1]["content"].as_str().expect("user text");
            assert!(user.starts_with(&format!("question {n}: ")), "{user}");
            systems.insert(system.to_owned());
        }
        // Uniform over 200 draws: every system prompt is used.
        assert_eq!(systems.len(), 4);
        let first_blocks: HashSet<String> = systems
            .iter()
            .map(|s| s.chars().take(64).collect())
            .collect();
        assert_eq!(
            first_blocks.len(),
            4,
            "prompts must differ in their first block"
        );
        // Same seed, same bodies; another seed, other prompts.
        let again = Workload::new(&args(4, 7));
        assert_eq!(workload.body(17), again.body(17));
        let other = Workload::new(&args(4, 8));
        assert_ne!(
            parse(&workload.body(17))["messages"][0],
            parse(&other.body(17))["messages"][0]
        );
    }

    #[test]
    fn without_prefixes_every_body_is_the_fixed_prompt() {
        let workload = Workload::new(&args(0, 1));
        assert_eq!(workload.body(0), workload.body(9));
        let body = parse(&workload.body(0));
        assert_eq!(body["messages"], json!([{"role": "user", "content": "hi"}]));
    }
}
