//! Client connections: how many are open, and what one beyond the limit may do. Each connection
//! carries a [`ConnectionSlot`] in its connection data from accept to close. Up to
//! `server.max_connections` carry API requests; the `server.ops_connections` beyond them may only
//! reach the operator's routes (`/health`, `/ready`, `/metrics`, `/stats`), so an operator can
//! still see a gateway whose clients saturate it: an API request on such a connection is answered
//! 503 with `Retry-After` and the connection closed. Beyond both, actix stops accepting and new
//! connections wait in the kernel's backlog, so accept never fails for lack of descriptors.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use actix_web::http::header::HeaderValue;
use actix_web::http::{header, Method};
use actix_web::HttpRequest;
use nanogate_actors::keys::LastKey;
use serde::Serialize;

use crate::error::GatewayError;

/// The gateway-wide count of client connections.
#[derive(Debug)]
pub struct ConnectionLimit {
    open: AtomicUsize,
    peak: AtomicUsize,
    api_limit: usize,
    ops_reserve: usize,
    refused: AtomicU64,
}

/// One open client connection, counted until it closes.
#[derive(Debug)]
pub struct ConnectionSlot {
    limit: Arc<ConnectionLimit>,
    /// Opened beyond `server.max_connections`: only the operator's routes are served on it.
    over_limit: bool,
    /// What the gateway tells backends about this connection's peer, worked out once.
    pub peer: Option<PeerHeaders>,
    /// The API key this connection last authenticated with.
    pub last_key: LastKey,
}

/// `X-Forwarded-For` and `Forwarded` (RFC 7239) values naming a connection's peer.
#[derive(Debug, Clone)]
pub struct PeerHeaders {
    pub ip: IpAddr,
    pub forwarded_for: HeaderValue,
    pub forwarded: HeaderValue,
}

impl PeerHeaders {
    pub fn new(ip: IpAddr) -> Option<Self> {
        Some(Self {
            ip,
            forwarded_for: HeaderValue::from_str(&ip.to_string()).ok()?,
            forwarded: HeaderValue::from_str(&Self::forwarded_element(ip)).ok()?,
        })
    }

    /// `for=...;proto=http`, an IPv6 address quoted and bracketed as RFC 7239 asks.
    pub fn forwarded_element(ip: IpAddr) -> String {
        match ip {
            IpAddr::V4(ip) => format!("for={ip};proto=http"),
            IpAddr::V6(ip) => format!("for=\"[{ip}]\";proto=http"),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ConnectionStats {
    pub open: usize,
    pub peak: usize,
    pub max_connections: usize,
    pub ops_connections: usize,
    /// API requests refused because their connection was over the limit.
    pub refused: u64,
}

impl ConnectionLimit {
    pub fn new(api_limit: usize, ops_reserve: usize) -> Arc<Self> {
        Arc::new(Self {
            open: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            api_limit,
            ops_reserve,
            refused: AtomicU64::new(0),
        })
    }

    /// Counts a connection that was just accepted from `peer`.
    pub fn open(self: &Arc<Self>, peer: Option<IpAddr>) -> ConnectionSlot {
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(open, Ordering::Relaxed);
        ConnectionSlot {
            limit: self.clone(),
            over_limit: open > self.api_limit,
            peer: peer.and_then(PeerHeaders::new),
            last_key: LastKey::default(),
        }
    }

    /// The most connections each of `threads` HTTP threads accepts: the API connections and the
    /// operator's reserve, shared out.
    pub fn per_thread(&self, threads: usize) -> usize {
        (self.api_limit + self.ops_reserve).div_ceil(threads.max(1))
    }

    pub fn stats(&self) -> ConnectionStats {
        ConnectionStats {
            open: self.open.load(Ordering::Relaxed),
            peak: self.peak.load(Ordering::Relaxed),
            max_connections: self.api_limit,
            ops_connections: self.ops_reserve,
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.limit.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether an API request may be served on its connection: not one opened over the limit, and
/// not a WebSocket upgrade (whose body HTTP/1.1 reads to the close, so it would hold the
/// connection until the client hangs up).
pub fn admit(req: &HttpRequest) -> Result<(), GatewayError> {
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if upgrade || req.method() == Method::CONNECT {
        return Err(GatewayError::UpgradeNotSupported);
    }
    if let Some(slot) = req.conn_data::<ConnectionSlot>() {
        if slot.over_limit {
            slot.limit.refused.fetch_add(1, Ordering::Relaxed);
            return Err(GatewayError::TooManyConnections);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_beyond_the_limit_are_marked_and_counted_until_closed() {
        let limit = ConnectionLimit::new(2, 1);
        let a = limit.open(None);
        let b = limit.open(None);
        let c = limit.open(Some("::1".parse().unwrap()));
        assert_eq!(
            c.peer.as_ref().unwrap().forwarded,
            "for=\"[::1]\";proto=http"
        );
        assert!(!a.over_limit && !b.over_limit && c.over_limit);
        assert_eq!(limit.per_thread(2), 2);
        drop(a);
        drop(c);
        assert_eq!(limit.stats().open, 1);
        assert!(!limit.open(None).over_limit);
        assert_eq!(limit.stats().peak, 3);
    }
}
