//! Chunked request bodies a handler leaves unread. actix-http drains such a body after the
//! answer, with no timer, when the handler has dropped it (`should_close_for_unread_payload`:
//! a dropped chunked payload is "drainable"), so a client that sent a chunked head and then
//! nothing kept its connection, and its connection place, for good: after a refusal given before
//! the body is read (unknown route, bad path, missing key, admin token), after a body that timed
//! out (408) or outgrew its limit (413), on a route that reads no body (`GET /v1/models` with
//! one), and on what the CORS layer answers itself (a preflight). Held until the answer is handed
//! over, the body is still wanted, and actix closes the connection instead. Bodies with a
//! `Content-Length` are not drained after a refusal, so only chunked ones are held.

use std::cell::RefCell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::dev::{forward_ready, Payload, Service, ServiceRequest, ServiceResponse, Transform};
use actix_web::error::PayloadError;
use actix_web::http::header;
use actix_web::HttpMessage;
use bytes::Bytes;
use futures_util::future::{ready, Either, LocalBoxFuture, MapOk, Ready};
use futures_util::{Stream, TryFutureExt};

/// The request's body as actix gave it, shared by the handler's reader and the middleware.
struct Shared {
    payload: Payload,
    ended: bool,
}

/// The handler's view of the body.
struct Reader(Rc<RefCell<Shared>>);

impl Stream for Reader {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut shared = self.0.borrow_mut();
        let next = Pin::new(&mut shared.payload).poll_next(cx);
        if let Poll::Ready(None) = next {
            shared.ended = true;
        }
        next
    }
}

/// An answer that holds its request's unread body until actix has taken its head.
struct Holding {
    body: BoxBody,
    _unread: Rc<RefCell<Shared>>,
}

impl MessageBody for Holding {
    type Error = <BoxBody as MessageBody>::Error;

    /// Never `None`: `BoxBody::new` drops a body of no size at once, and with it the request's
    /// body before actix has taken the answer's head.
    fn size(&self) -> BodySize {
        match self.body.size() {
            BodySize::None => BodySize::Sized(0),
            size => size,
        }
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_next(cx)
    }
}

/// Middleware: a chunked request's body the handler did not read to its end is held by the
/// answer, so the connection is closed after it rather than drained for as long as the client
/// likes. A request without a chunked body costs a header lookup (written out rather than with
/// `middleware::from_fn`, which boxes a future for every request).
pub struct HoldUnread;

impl<S, B> Transform<S, ServiceRequest> for HoldUnread
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<BoxBody>;
    type Error = actix_web::Error;
    type Transform = HoldUnreadService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(HoldUnreadService { service }))
    }
}

pub struct HoldUnreadService<S> {
    service: S,
}

type Answer = Result<ServiceResponse<BoxBody>, actix_web::Error>;

impl<S, B> Service<ServiceRequest> for HoldUnreadService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<BoxBody>;
    type Error = actix_web::Error;
    type Future = Either<
        MapOk<S::Future, fn(ServiceResponse<B>) -> ServiceResponse<BoxBody>>,
        LocalBoxFuture<'static, Answer>,
    >;

    forward_ready!(service);

    fn call(&self, mut req: ServiceRequest) -> Self::Future {
        if !req.headers().contains_key(header::TRANSFER_ENCODING) {
            return Either::Left(
                self.service
                    .call(req)
                    .map_ok(ServiceResponse::map_into_boxed_body as fn(_) -> _),
            );
        }
        let shared = Rc::new(RefCell::new(Shared {
            payload: req.take_payload(),
            ended: false,
        }));
        let reader: Pin<Box<dyn Stream<Item = _>>> = Box::pin(Reader(Rc::clone(&shared)));
        req.set_payload(Payload::from(reader));
        let answer = self.service.call(req);
        Either::Right(Box::pin(async move {
            // The routes answer their errors themselves; an `Err` would be answered by actix
            // after the body is dropped (the request cannot be kept to answer it here: routing
            // needs the only reference to it).
            let response = answer.await?.map_into_boxed_body();
            if shared.borrow().ended {
                return Ok(response);
            }
            Ok(response.map_body(|_, body| {
                BoxBody::new(Holding {
                    body,
                    _unread: shared,
                })
            }))
        }))
    }
}
