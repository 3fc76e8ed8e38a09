//! What each request asks: one fixed prompt, or one of the workloads routing quality is measured
//! with.
//!
//! - Shared prefix (`--prefixes N`): N distinct system prompts of `--prefix-chars` characters are
//!   generated once from `--seed`; request `n` sends one of them, picked by a hash of (seed, n),
//!   uniformly or with Zipf popularity (`--zipf s`), followed by a user question unique to `n`.
//!   Servers with a prefix cache (vLLM, SGLang, the simulator) then answer fast only where that
//!   system prompt was seen recently, so a router that keeps each prefix on one backend shows up
//!   in the time to first token.
//! - Multi-turn (`--turns T`, `--sessions S`): S conversations go on at once, each with one of the
//!   system prompts; request `n` is turn `(n / S) % T` of conversation `n % S` (of the current
//!   generation of S), and sends the whole conversation so far: system prompt, then each earlier
//!   question with a stand-in answer, then the new question. A session's prompt grows turn by
//!   turn, so it starts fast only on the backend that served its previous turn.
//! - No shared prefix (`--unique`): every request has its own system prompt.
//!
//! Every pick depends only on (seed, n), so a run is reproducible whatever order requests
//! complete in.
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
        picker: Picker,
    },
    Sessions {
        heads: Vec<Vec<u8>>,
        picker: Picker,
        sessions: u64,
        turns: u32,
        /// Length of each stand-in assistant answer: about what `max_tokens` tokens take.
        answer_chars: usize,
    },
    Unique {
        /// The body without `messages`.
        body: Value,
        chars: usize,
        seed: u64,
    },
}

/// Picks one of the system prompts for a number, uniformly or by Zipf popularity.
pub(crate) struct Picker {
    seed: u64,
    /// Cumulative Zipf weights, normalised to end at 1; `None` picks uniformly.
    cdf: Option<Vec<f64>>,
    len: usize,
}

impl Picker {
    fn new(seed: u64, len: usize, zipf: f64) -> Self {
        let cdf = (zipf > 0.0).then(|| {
            let mut total = 0.0;
            let mut cdf: Vec<f64> = (1..=len)
                .map(|k| {
                    total += (k as f64).powf(-zipf);
                    total
                })
                .collect();
            cdf.iter_mut().for_each(|c| *c /= total);
            cdf
        });
        Self { seed, cdf, len }
    }

    fn pick(&self, n: u64) -> usize {
        let draw = mix(self.seed, n);
        match &self.cdf {
            None => usize::try_from(draw % self.len as u64).unwrap_or(0),
            Some(cdf) => {
                let unit = (draw >> 11) as f64 / (1u64 << 53) as f64;
                cdf.partition_point(|&c| c < unit).min(self.len - 1)
            }
        }
    }
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
        if args.unique {
            return Self::Unique {
                body,
                chars: args.prefix_chars,
                seed: args.seed,
            };
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
        let picker = Picker::new(args.seed, args.prefixes, args.zipf);
        if args.turns > 1 {
            return Self::Sessions {
                heads,
                picker,
                sessions: args.sessions.max(1),
                turns: args.turns,
                answer_chars: usize::try_from(args.max_tokens)
                    .unwrap_or(usize::MAX)
                    .saturating_mul(5)
                    .min(1 << 20),
            };
        }
        Self::SharedPrefix { heads, picker }
    }

    /// The body of request number `n` (from 0).
    pub fn body(&self, n: u64) -> Bytes {
        match self {
            Self::Fixed(body) => body.clone(),
            Self::SharedPrefix { heads, picker } => {
                finish(&heads[picker.pick(n)], &[], &question(n))
            }
            Self::Sessions {
                heads,
                picker,
                sessions,
                turns,
                answer_chars,
            } => {
                let per_generation = sessions.saturating_mul(u64::from(*turns));
                let session = n / per_generation * sessions + n % sessions;
                let turn = (n / sessions) % u64::from(*turns);
                let history: Vec<(String, String)> = (0..turn)
                    .map(|t| (turn_question(session, t), answer(session, t, *answer_chars)))
                    .collect();
                finish(
                    &heads[picker.pick(session)],
                    &history,
                    &turn_question(session, turn),
                )
            }
            Self::Unique { body, chars, seed } => {
                let mut rng = SmallRng::seed_from_u64(mix(*seed, n));
                let index = usize::try_from(n).unwrap_or(usize::MAX);
                let system = system_prompt(&mut rng, index, *chars);
                finish(&head(body, &system), &[], &question(n))
            }
        }
    }
}

/// A head (which ends where a user message's content goes), then `history` as (question,
/// answer) turns, then the last question, closed.
fn finish(head: &[u8], history: &[(String, String)], last: &str) -> Bytes {
    let mut body = BytesMut::with_capacity(head.len() + last.len() + 64);
    body.put_slice(head);
    for (question, answer) in history {
        body.put_slice(Value::from(question.as_str()).to_string().as_bytes());
        body.put_slice(br#"},{"role":"assistant","content":"#);
        body.put_slice(Value::from(answer.as_str()).to_string().as_bytes());
        body.put_slice(br#"},{"role":"user","content":"#);
    }
    body.put_slice(Value::from(last).to_string().as_bytes());
    body.put_slice(b"}]}");
    body.freeze()
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

/// Turn `turn` of conversation `session`.
fn turn_question(session: u64, turn: u64) -> String {
    let topic = TOPICS[usize::try_from((session + turn) % TOPICS.len() as u64).unwrap_or(0)];
    format!("session {session}, turn {turn}: and what about {topic}?")
}

/// The stand-in answer to turn `turn` of `session`: `chars` characters of words.
fn answer(session: u64, turn: u64, chars: usize) -> String {
    let mut rng = SmallRng::seed_from_u64(mix(session, turn));
    let mut text = format!("Answer {turn} to session {session}: ");
    while text.len() < chars {
        text.push_str(WORDS[rng.gen_range(0..WORDS.len())]);
        text.push(' ');
    }
    text.truncate(chars);
    text
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
            arrivals: crate::loadtest::Arrivals::Fixed,
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
            zipf: 0.0,
            turns: 1,
            sessions: 64,
            unique: false,
            seed,
            request_log: None,
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

    fn system_of(body: &Bytes) -> String {
        parse(body)["messages"][0]["content"]
            .as_str()
            .expect("system text")
            .to_owned()
    }

    #[test]
    fn zipf_makes_the_first_prompts_the_popular_ones() {
        let mut a = args(16, 3);
        a.zipf = 1.0;
        let workload = Workload::new(&a);
        let first = system_of(&workload.body(0));
        let mut counts = std::collections::HashMap::new();
        for n in 0..4000 {
            *counts.entry(system_of(&workload.body(n))).or_insert(0u32) += 1;
        }
        assert_eq!(counts.len(), 16);
        let top = counts
            .iter()
            .max_by_key(|(_, c)| **c)
            .map(|(s, c)| (s.clone(), *c))
            .expect("counts");
        // Weight 1/H(16) = 0.296 for the first prompt, 1/16/H(16) = 0.019 for the last.
        assert!(top.1 > 1000 && top.1 < 1400, "{}", top.1);
        assert!(top.0.starts_with("System prompt 0."), "{}", top.0);
        assert!(counts.values().all(|c| *c >= 30));
        assert_eq!(first, system_of(&Workload::new(&a).body(0)));
    }

    #[test]
    fn a_session_resends_its_conversation_and_grows_by_one_turn() {
        let mut a = args(4, 5);
        a.turns = 3;
        a.sessions = 10;
        let workload = Workload::new(&a);
        // Request 13 is turn 1 of session 3, request 23 its turn 2, request 33 the first turn of
        // session 13 (the next generation).
        let turn1 = parse(&workload.body(13));
        let turn2 = parse(&workload.body(23));
        let messages = |v: &Value| v["messages"].as_array().expect("messages").clone();
        let (m1, m2) = (messages(&turn1), messages(&turn2));
        assert_eq!((m1.len(), m2.len()), (4, 6));
        assert_eq!(m2[..4], m1[..4]);
        assert_eq!(
            m1[3]["content"],
            "session 3, turn 1: and what about exporting my data?"
        );
        assert_eq!(m2[4]["role"], "assistant");
        assert_eq!(m2[4]["content"].as_str().map(str::len), Some(15));
        let next = messages(&parse(&workload.body(33)));
        assert_eq!(next.len(), 2);
        assert!(next[1]["content"]
            .as_str()
            .is_some_and(|q| q.starts_with("session 13, turn 0:")));
    }

    #[test]
    fn unique_prompts_share_no_first_block() {
        let mut a = args(0, 9);
        a.unique = true;
        let workload = Workload::new(&a);
        let firsts: HashSet<String> = (0..100)
            .map(|n| system_of(&workload.body(n)).chars().take(64).collect())
            .collect();
        assert_eq!(firsts.len(), 100);
        assert_eq!(system_of(&workload.body(7)).len(), 500);
        assert_eq!(workload.body(7), Workload::new(&a).body(7));
    }

    #[test]
    fn without_prefixes_every_body_is_the_fixed_prompt() {
        let workload = Workload::new(&args(0, 1));
        assert_eq!(workload.body(0), workload.body(9));
        let body = parse(&workload.body(0));
        assert_eq!(body["messages"], json!([{"role": "user", "content": "hi"}]));
    }
}
