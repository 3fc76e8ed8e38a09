//! One chat-completion request and the verdict on it.
//!
//! Everything that decides whether a single request succeeded, and how long
//! it took, lives here so the scheduler in `mod.rs` only deals in outcomes.
//! Bodies come from the [`Workload`], which never re-encodes JSON per request,
//! because a load generator that does measures itself as much as the server.

use std::io;
use std::time::Duration;

use awc::error::{PayloadError, SendRequestError};
use awc::http::header::{self, HeaderValue};
use bytes::Bytes;
use futures_util::StreamExt as _;
use tokio::time::Instant;

use super::sse::{self, Kind};
use super::workload::Workload;
use super::LoadtestArgs;
use crate::ingress::proxy::ENDPOINT_HEADER;

/// Non-streamed bodies larger than this are reported as "bad body"; real chat
/// completions are far smaller and the cap stops a broken server from
/// exhausting memory.
const BODY_LIMIT: usize = 16 * 1024 * 1024;

/// Error bodies are read only so the connection can go back to the pool.
const ERROR_BODY_LIMIT: usize = 64 * 1024;

/// Why a request failed; `cause()` is the key in `Summary::failures`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    Connect,
    Timeout,
    InvalidUrl,
    Send,
    BadResponse,
    OtherRequest,
    Status(u16),
    Body,
    BadBody,
    StreamError,
    StreamIncomplete,
}

impl Failure {
    pub fn cause(&self) -> String {
        match self {
            Self::Connect => "connect".into(),
            Self::Timeout => "timeout".into(),
            Self::InvalidUrl => "invalid url".into(),
            Self::Send => "send error".into(),
            Self::BadResponse => "bad response".into(),
            Self::OtherRequest => "request error".into(),
            Self::Status(code) => format!("status {code}"),
            Self::Body => "body error".into(),
            Self::BadBody => "bad body".into(),
            Self::StreamError => "stream error".into(),
            Self::StreamIncomplete => "stream incomplete".into(),
        }
    }

    fn from_send(err: &SendRequestError) -> Self {
        match err {
            SendRequestError::Connect(_) => Self::Connect,
            SendRequestError::Timeout => Self::Timeout,
            SendRequestError::Url(_) => Self::InvalidUrl,
            SendRequestError::Send(_) => Self::Send,
            SendRequestError::Response(_) => Self::BadResponse,
            _ => Self::OtherRequest,
        }
    }

    /// The body deadline set via `ClientResponse::timeout` surfaces as an I/O
    /// `TimedOut`; it is the same per-request timeout, so it gets the same cause.
    fn from_payload(err: &PayloadError, otherwise: Self) -> Self {
        match err {
            PayloadError::Io(e) if e.kind() == io::ErrorKind::TimedOut => Self::Timeout,
            _ => otherwise,
        }
    }
}

/// What happened to one request. Durations count from its scheduled start.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// The request's number in the run.
    pub n: u64,
    /// When it was due to start.
    pub due: Instant,
    pub latency: Duration,
    pub ttft: Option<Duration>,
    /// The gateway's `x-nanogate-endpoint`, if the answer had one (a shared buffer: kept for
    /// `--request-log` without a copy per request).
    pub endpoint: Option<HeaderValue>,
    pub result: Result<(), Failure>,
}

/// Everything needed to fire the same request repeatedly.
pub(crate) struct Target {
    client: awc::Client,
    url: String,
    workload: Workload,
    auth: Option<String>,
    stream: bool,
    timeout: Duration,
}

impl Target {
    pub fn new(args: &LoadtestArgs, timeout: Duration) -> Self {
        // The gateway's upstream connector: Nagle off, as the asyncio-based clients (the OpenAI
        // SDK over httpx, aiohttp) have it, so a request's head and body go out together.
        let client = awc::Client::builder()
            .connector(nanogate_actors::upstream_io::connector().limit(0))
            .timeout(timeout)
            .finish();
        Self {
            client,
            url: args.url.clone(),
            workload: Workload::new(args),
            auth: args.api_key.as_ref().map(|key| format!("Bearer {key}")),
            stream: args.stream,
            timeout,
        }
    }

    /// Sends request number `n`. `scheduled` is when it should have started: in open
    /// loop it may lie in the past when the concurrency cap delayed the send,
    /// and counting from it keeps that queueing in the latency
    /// (no coordinated omission).
    pub async fn send(&self, n: u64, scheduled: Instant) -> Outcome {
        let (mut ttft, mut endpoint) = (None, None);
        let result = self
            .exchange(self.workload.body(n), scheduled, &mut ttft, &mut endpoint)
            .await;
        Outcome {
            n,
            due: scheduled,
            latency: scheduled.elapsed(),
            ttft,
            endpoint,
            result,
        }
    }

    async fn exchange(
        &self,
        body: Bytes,
        scheduled: Instant,
        ttft: &mut Option<Duration>,
        endpoint: &mut Option<HeaderValue>,
    ) -> Result<(), Failure> {
        let deadline = Instant::now() + self.timeout;
        let mut req = self
            .client
            .post(&self.url)
            .insert_header((header::CONTENT_TYPE, "application/json"));
        if let Some(auth) = &self.auth {
            req = req.insert_header((header::AUTHORIZATION, auth.as_str()));
        }
        let res = req
            .send_body(body)
            .await
            .map_err(|e| Failure::from_send(&e))?;
        // awc only bounds the wait for the response head; the body stream has
        // no deadline unless one is set here. Give it what is left of the
        // per-request budget so a stream is cut exactly at `--timeout` after
        // the send, never earlier and never hanging forever.
        let mut res = res.timeout(deadline.saturating_duration_since(Instant::now()));
        *endpoint = res.headers().get(ENDPOINT_HEADER).cloned();

        if !res.status().is_success() {
            let status = res.status().as_u16();
            // Draining lets keep-alive reuse the connection; its content is irrelevant.
            let _ = res.body().limit(ERROR_BODY_LIMIT).await;
            return Err(Failure::Status(status));
        }

        if !self.stream {
            let body = res.body().limit(BODY_LIMIT).await.map_err(|e| match e {
                PayloadError::Overflow => Failure::BadBody,
                e => Failure::from_payload(&e, Failure::Body),
            })?;
            return serde_json::from_slice::<serde::de::IgnoredAny>(&body)
                .map(|_| ())
                .map_err(|_| Failure::BadBody);
        }

        let mut parser = sse::Parser::default();
        let mut events = Vec::new();
        let mut done = false;
        loop {
            let chunk = res.next().await;
            match &chunk {
                Some(Ok(bytes)) => parser.feed(bytes, &mut events),
                Some(Err(e)) => return Err(Failure::from_payload(e, Failure::StreamError)),
                None => parser.finish(&mut events),
            }
            for event in events.drain(..) {
                match sse::classify(&event) {
                    Kind::Done => done = true,
                    // Anything after [DONE] is ignored: the stream already finished.
                    _ if done => {}
                    Kind::Error => return Err(Failure::StreamError),
                    Kind::Malformed => return Err(Failure::BadBody),
                    Kind::Content => {
                        ttft.get_or_insert_with(|| scheduled.elapsed());
                    }
                    Kind::Other => {}
                }
            }
            if chunk.is_none() {
                return if done {
                    Ok(())
                } else {
                    Err(Failure::StreamIncomplete)
                };
            }
        }
    }
}
