//! A scriptable backend for reproducing what a particular real server sends: the test gives a
//! handler from request to response (status, headers, a body sent whole or as timed chunks), and
//! reads back every request the backend received, headers included. HTTP/1.1 with keep-alive,
//! one thread per connection, on 127.0.0.1.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct FakeRequest {
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Header names lowercased, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl FakeRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

pub enum FakeBody {
    /// Sent whole with a `Content-Length`.
    Whole(Vec<u8>),
    /// Sent chunked, each piece after its pause; `complete: false` drops the connection instead
    /// of ending the body (a server that dies mid-answer).
    Chunked {
        pieces: Vec<(Duration, Vec<u8>)>,
        complete: bool,
    },
}

pub struct FakeResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: FakeBody,
    /// Wait before answering at all.
    pub delay: Duration,
}

impl FakeResponse {
    pub fn new(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            headers: vec![("content-type".into(), content_type.into())],
            body: FakeBody::Whole(body.into()),
            delay: Duration::ZERO,
        }
    }

    pub fn json(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self::new(status, "application/json", body)
    }

    /// An empty body with no content type (vLLM's and TGI's `/health`).
    pub fn empty(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: FakeBody::Whole(Vec::new()),
            delay: Duration::ZERO,
        }
    }

    /// An SSE stream of these frames, each its own chunk.
    pub fn sse(frames: Vec<String>, complete: bool) -> Self {
        Self {
            status: 200,
            headers: vec![("content-type".into(), "text/event-stream".into())],
            body: FakeBody::Chunked {
                pieces: frames
                    .into_iter()
                    .map(|f| (Duration::from_millis(1), f.into_bytes()))
                    .collect(),
                complete,
            },
            delay: Duration::ZERO,
        }
    }

    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

type Handler = dyn Fn(&FakeRequest) -> FakeResponse + Send + Sync;

pub struct Fake {
    pub url: String,
    requests: Arc<Mutex<Vec<FakeRequest>>>,
}

impl Fake {
    pub fn start(handler: impl Fn(&FakeRequest) -> FakeResponse + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (log, handler): (_, Arc<Handler>) = (requests.clone(), Arc::new(handler));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                let (log, handler) = (log.clone(), handler.clone());
                std::thread::spawn(move || serve(stream, &*handler, &log));
            }
        });
        Self { url, requests }
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<FakeRequest> {
        self.requests.lock().unwrap().clone()
    }

    /// The requests received on `path` (without the query).
    pub fn on(&self, path: &str) -> Vec<FakeRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.path.split('?').next() == Some(path))
            .collect()
    }
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<FakeRequest> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    let length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(FakeRequest {
        method,
        path,
        headers,
        body,
    })
}

fn serve(stream: TcpStream, handler: &Handler, log: &Mutex<Vec<FakeRequest>>) {
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::new(stream);
    while let Some(request) = read_request(&mut reader) {
        let response = handler(&request);
        log.lock().unwrap().push(request);
        std::thread::sleep(response.delay);
        let mut head = format!("HTTP/1.1 {} X\r\n", response.status);
        for (name, value) in &response.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        let written = match response.body {
            FakeBody::Whole(body) => {
                head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
                writer.write_all(head.as_bytes()).is_ok() && writer.write_all(&body).is_ok()
            }
            FakeBody::Chunked { pieces, complete } => {
                head.push_str("transfer-encoding: chunked\r\n\r\n");
                let mut ok = writer.write_all(head.as_bytes()).is_ok();
                for (pause, piece) in pieces {
                    std::thread::sleep(pause);
                    let chunk =
                        [format!("{:x}\r\n", piece.len()).as_bytes(), &piece, b"\r\n"].concat();
                    ok = ok && writer.write_all(&chunk).is_ok();
                }
                ok && complete && writer.write_all(b"0\r\n\r\n").is_ok()
            }
        };
        if !written {
            return;
        }
    }
}
