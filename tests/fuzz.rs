//! Property tests of the code that reads what clients and backends send, on inputs nobody wrote by
//! hand: the request classifier, the `/v1` path normaliser, the SSE tail the relay scans, and the
//! upstream reader that corrects close-delimited heads. Each property runs 256 cases in the
//! default test run; `scripts/hostile.sh` runs them far longer (`PROPTEST_CASES`).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use actix_web::http::header::{HeaderMap, HeaderName};
use futures_util::FutureExt;
use nanogate::config::AffinitySettings;
use nanogate::ingress::path::normalize_v1;
use nanogate::ingress::request::{classify, Operation};
use nanogate_actors::exchange::StreamTail;
use nanogate_actors::upstream_io::{close_delimited, UpstreamIo};
use proptest::prelude::*;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

fn affinity() -> AffinitySettings {
    AffinitySettings {
        headers: vec![HeaderName::from_static("x-session-id")],
        prefix_bytes: 64,
    }
}

/// JSON values of any shape, a few levels deep.
fn json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        ".{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("model".to_string()),
                    Just("messages".to_string()),
                    Just("prompt".to_string()),
                    Just("input".to_string()),
                    Just("stream".to_string()),
                    Just("temperature".to_string()),
                    Just("seed".to_string()),
                    Just("user".to_string()),
                    "[a-z]{1,6}",
                ],
                inner,
                0..8
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// The data of each event an SSE parser dispatches (WHATWG: lines end at CR, LF or CRLF; a blank
/// line dispatches the data gathered so far, if any).
fn sse_events(text: &str) -> Vec<String> {
    let mut events = Vec::new();
    let mut data: Option<String> = None;
    for line in text.replace("\r\n", "\n").replace('\r', "\n").split('\n') {
        if line.is_empty() {
            events.extend(data.take());
        } else if let Some(value) = line.strip_prefix("data:") {
            let value = value.strip_prefix(' ').unwrap_or(value);
            match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => data = Some(value.to_string()),
            }
        }
    }
    events
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_classifier_takes_any_bytes_without_panicking(body in prop::collection::vec(any::<u8>(), 0..512)) {
        for operation in [Operation::ChatCompletions, Operation::Completions, Operation::Embeddings] {
            let _ = classify(operation, &body, &HeaderMap::new(), &affinity());
        }
    }

    #[test]
    fn the_classifier_accepts_only_requests_with_their_fields(value in json()) {
        let body = serde_json::to_vec(&value).unwrap();
        if let Ok(classified) = classify(Operation::ChatCompletions, &body, &HeaderMap::new(), &affinity()) {
            prop_assert!(!classified.model.is_empty());
            prop_assert_eq!(value.get("model").and_then(|m| m.as_str()), Some(classified.model.as_str()));
            prop_assert!(value.get("messages").is_some_and(|m| m.is_array()));
            if value.get("stream") == Some(&serde_json::Value::Bool(true)) {
                prop_assert!(!classified.cacheable, "streams are never cached");
            }
        }
    }

    #[test]
    fn a_normalised_path_stays_in_v1_and_is_a_fixed_point(raw in "(/|v1|\\.\\.|\\.|%2[eEfF]|%5[cC]|[a-z]{1,4}|\\?|%00){0,12}") {
        let raw = format!("/{raw}");
        if let Ok(path) = normalize_v1("GET", &raw) {
            prop_assert!(path.starts_with("/v1/"), "{} -> {}", raw, path);
            prop_assert!(!path.split('/').any(|s| s == ".." || s == "."), "{} -> {}", raw, path);
            prop_assert!(!path.to_ascii_lowercase().contains("%2f"));
            prop_assert_eq!(normalize_v1("GET", &path).ok(), Some(path.clone()));
        }
    }

    #[test]
    fn the_stream_tail_sees_the_end_however_the_stream_is_cut(
        events in prop::collection::vec("[a-z {}\":]{0,20}", 0..6),
        done in any::<bool>(),
        crlf in any::<bool>(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let end = if crlf { "\r\n\r\n" } else { "\n\n" };
        let mut stream: String = events.iter().map(|e| format!("data: {e}{end}")).collect();
        if done {
            stream.push_str(&format!("data: [DONE]{end}"));
        }
        let bytes = stream.as_bytes();
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        points.sort();
        let mut tail = StreamTail::default();
        let mut from = 0;
        for point in points.into_iter().chain([bytes.len()]) {
            tail.push(&bytes[from..point]);
            from = point;
        }
        prop_assert_eq!(tail.is_done(), done);
        prop_assert_eq!(tail.open_lines(), 0, "every event is complete");
    }

    #[test]
    fn an_error_event_after_any_prefix_is_an_event_of_its_own(prefix in "(data: [a-z{}]{0,10}|\n|\r\n|: c){0,6}") {
        let mut tail = StreamTail::default();
        tail.push(prefix.as_bytes());
        let open = tail.open_lines();
        let text = format!("{prefix}{}data: {{\"error\":1}}\n\n", &"\n\n"[..open]);
        let events = sse_events(&text);
        prop_assert_eq!(events.last().map(String::as_str), Some("{\"error\":1}"));
    }

    #[test]
    fn the_upstream_reader_passes_every_byte_and_corrects_only_close_delimited_heads(
        version in prop_oneof![Just("HTTP/1.1"), Just("HTTP/1.0")],
        status in prop_oneof![Just(200u16), Just(204), Just(304), Just(404), Just(500), Just(101)],
        length in prop_oneof![Just(""), Just("content-length: 4\r\n"), Just("Transfer-Encoding: chunked\r\n")],
        padding in prop::collection::vec("[a-z]{1,8}: [a-z0-9]{0,30}\r\n", 0..40),
        body in "[a-z{}\":,]{0,300}",
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        read_size in 1usize..600,
    ) {
        let head = format!("{version} {status} X\r\n{}{length}\r\n", padding.concat());
        let response = format!("{head}{body}");
        let bytes = response.as_bytes();
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        points.sort();
        points.dedup();
        let mut pieces = VecDeque::new();
        let mut from = 0;
        for point in points.into_iter().chain([bytes.len()]) {
            pieces.push_back(bytes[from..point].to_vec());
            from = point;
        }
        let mut io = UpstreamIo::new(Scripted(pieces));
        let mut out = Vec::new();
        let mut buf = vec![0u8; read_size];
        loop {
            let mut read = ReadBuf::new(&mut buf);
            let polled = futures_util::future::poll_fn(|cx| Pin::new(&mut io).poll_read(cx, &mut read))
                .now_or_never()
                .expect("the scripted stream is always ready");
            polled.unwrap();
            if read.filled().is_empty() {
                break;
            }
            out.extend_from_slice(read.filled());
        }
        let mut expected = bytes.to_vec();
        if close_delimited(head.as_bytes(), false) {
            expected[7] = b'0';
        }
        prop_assert_eq!(out, expected);
    }
}

/// A stream that yields the given pieces one read at a time, then the end.
struct Scripted(VecDeque<Vec<u8>>);

impl AsyncRead for Scripted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while let Some(mut piece) = self.0.pop_front() {
            if piece.is_empty() {
                continue;
            }
            let n = piece.len().min(buf.remaining());
            buf.put_slice(&piece[..n]);
            if n < piece.len() {
                self.0.push_front(piece.split_off(n));
            }
            break;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Scripted {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
