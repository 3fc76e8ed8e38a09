//! Backends that misbehave on purpose, on raw TCP, each in its own thread: what a broken or
//! hostile server really sends, byte for byte, which a well-behaved HTTP library would not let a
//! test send. Every one answers `GET /health` with 200 so the gateway keeps it in rotation, and
//! counts the connections it holds, so a test can see the gateway let go of them.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the backend does with each request (other than `GET /health`).
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// 200 JSON with `Transfer-Encoding: chunked`, `chunk` bytes a chunk, forever.
    EndlessChunked { chunk: usize },
    /// 200 SSE, `chunk` bytes an event, as fast as the connection takes them, forever.
    EndlessStream { chunk: usize },
    /// HTTP/1.1 200 with neither `Content-Length` nor `Transfer-Encoding`: the body ends when the
    /// connection closes (RFC 9112 §6.3 rule 8; what a minimal HTTP/1.1 server does).
    CloseDelimited { body: &'static str },
    /// A status line, then one header line a second, never a blank line.
    HeadNeverEnds,
    /// Two SSE events, then half an event, then the connection closes mid-line.
    StreamBrokenMidLine,
    /// Reads the request and never answers.
    Hang,
    /// 200 JSON answer, recording each request head.
    Record,
    /// These bytes, then the connection closes.
    Raw(&'static [u8]),
    /// These bytes, then silence until the gateway closes the connection.
    RawThenSilence(&'static [u8]),
}

#[derive(Default)]
pub struct RogueStats {
    pub accepted: AtomicUsize,
    pub open: AtomicUsize,
    /// Requests (other than health probes) being answered right now.
    pub serving: AtomicUsize,
    /// Request heads (lowercased header names), in arrival order.
    pub heads: Mutex<Vec<String>>,
}

pub struct Rogue {
    pub url: String,
    pub stats: Arc<RogueStats>,
}

impl Rogue {
    pub fn start(behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let stats = Arc::new(RogueStats::default());
        let shared = stats.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                let (behaviour, stats) = (behaviour.clone(), shared.clone());
                stats.accepted.fetch_add(1, Ordering::SeqCst);
                stats.open.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    serve(stream, &behaviour, &stats);
                    stats.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Self { url, stats }
    }

    pub fn open(&self) -> usize {
        self.stats.open.load(Ordering::SeqCst)
    }

    pub fn serving(&self) -> usize {
        self.stats.serving.load(Ordering::SeqCst)
    }

    pub fn heads(&self) -> Vec<String> {
        self.stats.heads.lock().unwrap().clone()
    }
}

/// Reads one request: its head (returned) and its body (by `Content-Length`).
fn read_request(reader: &mut BufReader<TcpStream>) -> Option<String> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let length = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(head)
}

const JSON: &str = r#"{"id":"r","object":"chat.completion","model":"sim","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}"#;

fn serve(stream: TcpStream, behaviour: &Behaviour, stats: &RogueStats) {
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::new(stream);
    while let Some(head) = read_request(&mut reader) {
        if head.starts_with("GET /health") {
            let _ = writer.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
            continue;
        }
        if head.starts_with("GET /metrics") {
            let _ = writer.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n");
            continue;
        }
        stats.heads.lock().unwrap().push(head);
        stats.serving.fetch_add(1, Ordering::SeqCst);
        let keep_going = answer(&mut reader, &mut writer, behaviour);
        stats.serving.fetch_sub(1, Ordering::SeqCst);
        if !keep_going {
            return;
        }
    }
}

/// Answers one request; `false` when the connection is done.
fn answer(
    reader: &mut BufReader<TcpStream>,
    writer: &mut TcpStream,
    behaviour: &Behaviour,
) -> bool {
    let mut write = |bytes: &[u8]| writer.write_all(bytes).is_ok();
    match behaviour {
        Behaviour::EndlessChunked { chunk } => {
            let piece = format!("{chunk:x}\r\n{}\r\n", " ".repeat(*chunk));
            if write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n") {
                while write(piece.as_bytes()) {}
            }
            false
        }
        Behaviour::EndlessStream { chunk } => {
            let event = format!("data: {{\"pad\":\"{}\"}}\n\n", "x".repeat(*chunk));
            let piece = format!("{:x}\r\n{event}\r\n", event.len());
            if write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n") {
                while write(piece.as_bytes()) {}
            }
            false
        }
        Behaviour::CloseDelimited { body } => {
            write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n");
            let (first, rest) = body.split_at(body.len() / 2);
            write(first.as_bytes());
            std::thread::sleep(Duration::from_millis(20));
            write(rest.as_bytes());
            false
        }
        Behaviour::HeadNeverEnds => {
            let mut i = 0;
            if write(b"HTTP/1.1 200 OK\r\n") {
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                    i += 1;
                    if !write(format!("x-wait-{i}: 1\r\n").as_bytes()) {
                        break;
                    }
                }
            }
            false
        }
        Behaviour::StreamBrokenMidLine => {
            write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n\
                  data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n\
                  data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n\
                  data: {\"choices\":[{\"del",
            );
            false
        }
        Behaviour::Hang => {
            // Returns when the gateway closes the connection.
            let _ = reader.read(&mut [0u8; 1]);
            false
        }
        Behaviour::Raw(bytes) => {
            write(bytes);
            false
        }
        Behaviour::RawThenSilence(bytes) => {
            if write(bytes) {
                let _ = reader.read(&mut [0u8; 1]);
            }
            false
        }
        Behaviour::Record => write(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{JSON}",
                JSON.len()
            )
            .as_bytes(),
        ),
    }
}
