//! Response bodies the native host sends: a reply of the gateway's own, or the provider's
//! body streamed frame by frame through the core's `on_response_chunk`, with an idle timeout.
//! Whatever way the body ends — completed, upstream error, timeout, or the client going away
//! (the body is dropped) — the exchange is finished exactly once.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Sleep;
use tollgate_core::exchange::Chunk;
use tollgate_core::Exchange;

use crate::access_log::Ending;
use crate::proxy::Gateway;
use crate::upstream::ProviderBody;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub enum GatewayBody {
    Local(Option<Bytes>),
    Upstream(Box<UpstreamBody>),
}

impl GatewayBody {
    pub fn local(bytes: Vec<u8>) -> Self {
        Self::Local(Some(Bytes::from(bytes)))
    }
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Local(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Upstream(body) => Pin::new(body.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Local(bytes) => bytes.is_none(),
            Self::Upstream(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Local(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Self::Local(None) => SizeHint::with_exact(0),
            Self::Upstream(_) => SizeHint::default(),
        }
    }
}

pub struct UpstreamBody {
    inner: ProviderBody,
    exchange: Exchange,
    /// For the store the exchange settles its limits in.
    gateway: Arc<Gateway>,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    started: Instant,
    key_id: Option<String>,
    ended: bool,
    /// The provider's body failed: the error, given to hyper on the next poll.
    failed: Option<BoxError>,
    /// When the first bytes of the body went to the client.
    first_byte: Option<Instant>,
}

impl UpstreamBody {
    pub fn new(
        inner: ProviderBody,
        exchange: Exchange,
        gateway: Arc<Gateway>,
        idle: Duration,
        started: Instant,
        key_id: Option<String>,
    ) -> Self {
        Self {
            inner,
            exchange,
            gateway,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            started,
            key_id,
            ended: false,
            failed: None,
            first_byte: None,
        }
    }

    fn end(&mut self, ending: Ending) {
        if !self.ended {
            self.ended = true;
            self.gateway.finished(
                &mut self.exchange,
                self.key_id.as_deref(),
                self.started,
                ending,
                self.first_byte,
            );
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(e) = this.failed.take() {
            return Poll::Ready(Some(Err(e)));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        // `ended` is only set with the last frame or an error, both returned already.
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if this.first_byte.is_none() {
                    this.first_byte = Some(Instant::now());
                }
                let deadline = tokio::time::Instant::now() + this.idle;
                this.timer.as_mut().reset(deadline);
                // A body of known length is over with its last frame: hyper may never poll
                // again once it has written that many bytes, so the end is handled here.
                let last = this.inner.is_end_stream();
                let frame = match frame.into_data() {
                    Ok(data) => match this.exchange.on_response_chunk(&data, last) {
                        Chunk::Unchanged => Frame::data(data),
                        Chunk::Replace(bytes) => Frame::data(Bytes::from(bytes)),
                    },
                    // Trailers pass through untouched; as the last frame they end the body,
                    // so the exchange is told (a held partial event cannot go after them).
                    Err(frame) => {
                        if last {
                            let _ = this.exchange.on_response_chunk(&[], true);
                        }
                        frame
                    }
                };
                if last {
                    this.end(Ending::Completed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.end(Ending::UpstreamError);
                // Not at once: an error on hyper's first poll of the body makes it drop the
                // connection with the response head still unsent, and the client sees no
                // answer at all. One pending poll lets it flush the head and what came
                // before; the error then cuts the body, as in Envoy.
                this.failed = Some(e.into());
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Ready(None) => {
                let tail = match this.exchange.on_response_chunk(&[], true) {
                    Chunk::Replace(bytes) if !bytes.is_empty() => Some(Bytes::from(bytes)),
                    _ => None,
                };
                this.end(Ending::Completed);
                Poll::Ready(tail.map(|b| Ok(Frame::data(b))))
            }
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.end(Ending::UpstreamTimeout);
                    Poll::Ready(Some(
                        Err("the provider stopped sending the response".into()),
                    ))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // Dropped before its end: the client went away mid-response.
        self.end(Ending::ClientGone);
    }
}
