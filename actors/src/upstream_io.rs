//! Upstream connections as the HTTP client reads them, with one correction. HTTP/1.1 lets a server
//! send a response body without `Content-Length` or `Transfer-Encoding` and end it by closing the
//! connection (RFC 9112 §6.3, rule 8). actix-http's client reads such an HTTP/1.1 answer as having
//! no body at all (it reads to the close only for HTTP/1.0), so a legal answer became an empty
//! 200. [`UpstreamIo`] sits between the TCP stream and the client's HTTP codec: when a response
//! head that can carry a body has neither header, it presents the status line as `HTTP/1.0`, which
//! makes the codec read the body to the close (and not reuse the connection). Everything else
//! passes through untouched: the common case costs a search for the end of the head in bytes the
//! reader already has, no copy.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use actix_rt::net::{ActixStream, Ready, TcpStream};
use actix_service::Service;
use actix_tls::connect::{ConnectError, ConnectInfo, Connection, ConnectorService};
use awc::http::Uri;
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A response head longer than this is passed on as it is (the codec refuses it anyway).
const MAX_HEAD: usize = 64 * 1024;

/// Where the connection is in its exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A request is being written (the client does not pipeline: a write after reading starts
    /// a new exchange).
    Request,
    /// Reading a response head.
    Head,
    /// Reading a response body.
    Body,
}

/// A stream to a backend (TCP in the gateway); see the module doc.
pub struct UpstreamIo<Io = TcpStream> {
    io: Io,
    phase: Phase,
    /// Whether anything was written yet: the connection's first write starts its first request.
    written: bool,
    /// Whether the request being answered is a `HEAD` (whose answer has no body whatever its
    /// headers say).
    head_request: bool,
    /// A response head that arrived in pieces, held back until it is whole; then served.
    held: BytesMut,
    served: usize,
}

impl<Io> fmt::Debug for UpstreamIo<Io> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamIo")
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

impl<Io> UpstreamIo<Io> {
    pub fn new(io: Io) -> Self {
        Self {
            io,
            phase: Phase::Request,
            written: false,
            head_request: false,
            held: BytesMut::new(),
            served: 0,
        }
    }

    fn start_request(&mut self, first: &[u8]) {
        if self.phase != Phase::Request || !self.written {
            self.phase = Phase::Request;
            self.written = true;
            self.head_request = first.starts_with(b"HEAD ");
        }
    }

    /// Serves held bytes; `true` when there were any.
    fn serve_held(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        if self.served >= self.held.len() {
            return false;
        }
        let n = (self.held.len() - self.served).min(buf.remaining());
        buf.put_slice(&self.held[self.served..self.served + n]);
        self.served += n;
        if self.served == self.held.len() {
            self.held.clear();
            self.served = 0;
        }
        true
    }

    /// A complete response head arrived: correct it and move on to the body.
    fn head_done(&mut self, head: &mut [u8]) {
        if close_delimited(head, self.head_request) {
            head[7] = b'0';
            log::debug!("a backend sent an HTTP/1.1 body delimited by closing the connection");
        }
        self.phase = Phase::Body;
    }
}

/// Where a response head ends (just past its blank line), if it is complete. Lines may end in a
/// bare `\n`, as the client's parser (httparse) accepts: waiting for `\r\n\r\n` alone held
/// such a backend's answers until 64 KiB or the connection's end.
fn head_end(bytes: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', bytes)
        .find(|&i| i >= 1 && (bytes[i - 1] == b'\n' || (i >= 2 && &bytes[i - 2..i] == b"\n\r")))
        .map(|i| i + 1)
}

/// Whether an HTTP/1.1 head announces a body that ends when the connection closes: a status
/// that can carry a body, not an answer to `HEAD`, and neither `Content-Length` nor
/// `Transfer-Encoding`.
pub fn close_delimited(head: &[u8], head_request: bool) -> bool {
    if head_request || !head.starts_with(b"HTTP/1.1 ") || head.len() < 12 {
        return false;
    }
    let status = &head[9..12];
    if !status.iter().all(u8::is_ascii_digit)
        || status[0] == b'1'
        || matches!(status, b"204" | b"304")
    {
        return false;
    }
    let has = |line: &[u8], name: &[u8]| {
        line.len() > name.len() && line[..name.len()].eq_ignore_ascii_case(name)
    };
    // Each header line starts just after a line feed: look only at those starts.
    !memchr::memchr_iter(b'\n', head).any(|end| {
        let line = &head[end + 1..];
        match line.first() {
            Some(b'c' | b'C') => has(line, b"content-length:"),
            Some(b't' | b'T') => has(line, b"transfer-encoding:"),
            _ => false,
        }
    })
}

impl<Io: AsyncRead + Unpin> AsyncRead for UpstreamIo<Io> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.phase == Phase::Request {
            this.phase = Phase::Head;
        }
        if this.phase == Phase::Body {
            if this.serve_held(buf) {
                return Poll::Ready(Ok(()));
            }
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        if this.held.is_empty() {
            // The usual case: the whole head comes in one read, straight into the reader's buffer.
            let before = buf.filled().len();
            std::task::ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
            let filled = &mut buf.filled_mut()[before..];
            if filled.is_empty() {
                return Poll::Ready(Ok(()));
            }
            if let Some(end) = head_end(filled) {
                this.head_done(&mut filled[..end]);
                return Poll::Ready(Ok(()));
            }
            this.held.extend_from_slice(filled);
            buf.set_filled(before);
        }
        // A head in pieces: gather it, then serve it.
        loop {
            let mut chunk = [0u8; 4096];
            let mut read = ReadBuf::new(&mut chunk);
            std::task::ready!(Pin::new(&mut this.io).poll_read(cx, &mut read))?;
            let eof = read.filled().is_empty();
            this.held.extend_from_slice(read.filled());
            match head_end(&this.held) {
                Some(end) => {
                    let mut head = this.held.split_to(end);
                    this.head_done(&mut head);
                    head.unsplit(std::mem::take(&mut this.held));
                    this.held = head;
                    break;
                }
                None if eof || this.held.len() >= MAX_HEAD => {
                    this.phase = Phase::Body;
                    break;
                }
                None => {}
            }
        }
        this.serve_held(buf);
        Poll::Ready(Ok(()))
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for UpstreamIo<Io> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.start_request(buf);
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            this.start_request(first);
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<Io: ActixStream> ActixStream for UpstreamIo<Io> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<Ready>> {
        ActixStream::poll_read_ready(&self.io, cx)
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<Ready>> {
        ActixStream::poll_write_ready(&self.io, cx)
    }
}

// ===== UpstreamConnector =====

/// The TCP connector of the upstream clients: actix-tls's resolver and connector, with every
/// stream wrapped in an [`UpstreamIo`] and Nagle's algorithm off. A request's head and body go
/// out as separate writes, and with Nagle on, the second small one waits for the backend's ACK of
/// the first, which a delayed ACK holds up to 40 ms (nginx sets `tcp_nodelay` on its upstream
/// keep-alive connections for the same reason).
#[derive(Clone, Default)]
pub struct UpstreamConnector(ConnectorService);

impl Service<ConnectInfo<Uri>> for UpstreamConnector {
    type Response = Connection<Uri, UpstreamIo>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>>>>;

    actix_service::always_ready!();

    fn call(&self, info: ConnectInfo<Uri>) -> Self::Future {
        let connecting = self.0.call(info);
        Box::pin(async move {
            let (io, uri) = connecting.await?.into_parts();
            // Best effort: a socket that refuses the option still carries the exchange.
            let _ = io.set_nodelay(true);
            Ok(Connection::new(uri, UpstreamIo::new(io)))
        })
    }
}

/// An awc connector for backends, with [`UpstreamIo`] streams.
pub fn connector() -> awc::Connector<UpstreamConnector> {
    awc::Connector::new().connector(UpstreamConnector::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bodies_without_a_length_in_http_1_1_are_close_delimited() {
        let head = |s: &str| s.as_bytes().to_vec();
        assert!(close_delimited(
            &head("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"),
            false
        ));
        assert!(!close_delimited(
            &head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
            false
        ));
        assert!(!close_delimited(
            &head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
            false
        ));
        assert!(!close_delimited(&head("HTTP/1.0 200 OK\r\n\r\n"), false));
        for status in ["204 No Content", "304 Not Modified", "101 Switching"] {
            assert!(!close_delimited(
                &head(&format!("HTTP/1.1 {status}\r\n\r\n")),
                false
            ));
        }
        assert!(!close_delimited(&head("HTTP/1.1 200 OK\r\n\r\n"), true));
        assert!(!close_delimited(&head("HTTP/1.1 2"), false));
    }

    #[test]
    fn the_first_request_on_a_connection_may_be_a_head() {
        let mut io = UpstreamIo::new(());
        io.start_request(b"HEAD /v1/models HTTP/1.1\r\n");
        assert!(
            io.head_request,
            "a fresh connection's first request is seen"
        );
        io.start_request(b"GET-like bytes of the same request's body");
        assert!(
            io.head_request,
            "later writes of a request are not a new one"
        );
        io.phase = Phase::Body;
        io.start_request(b"GET / HTTP/1.1\r\n");
        assert!(!io.head_request);
    }

    #[actix_rt::test]
    async fn upstream_connections_have_nagle_off() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let uri: Uri = format!("http://{}/", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let connection = UpstreamConnector::default()
            .call(ConnectInfo::new(uri))
            .await
            .expect("connects");
        assert!(connection.io_ref().io.nodelay().expect("reads the option"));
    }

    #[test]
    fn the_end_of_a_head_is_found() {
        assert_eq!(head_end(b"HTTP/1.1 200 OK\r\n\r\nbody"), Some(19));
        assert_eq!(head_end(b"HTTP/1.1 200 OK\r\n"), None);
        assert_eq!(head_end(b"HTTP/1.1 200 OK\nA: b\n\nbody"), Some(22));
        assert_eq!(head_end(b"HTTP/1.1 200 OK\nA: b\n\r\nbody"), Some(23));
        assert_eq!(head_end(b"HTTP/1.1 200 OK\r\nA: b\r\n"), None);
    }
}
