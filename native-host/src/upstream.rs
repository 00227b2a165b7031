//! Connections to the providers: HTTP/1.1 (as Envoy's provider clusters), one request at a
//! time per connection, kept idle per worker thread and driven by the request that uses it.
//!
//! Why not hyper-util's pooled client: it runs each connection in a task of its own, which
//! hands the answer's body to the request one chunk per wake-up, so a streamed answer went
//! to the client one `writev` per event. Polled from the request's own body, the connection
//! decodes every event one read brought, and hyper's server writes them out together.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::client::conn::TrySendError;
use hyper::{Request, Response, Uri};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

use crate::body::BoxError;

type Conn = http1::Connection<MaybeHttpsStream<TokioIo<TcpStream>>, Full<Bytes>>;

/// How long a connection may wait idle before it is closed rather than used.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Idle connections kept per provider and thread; more are closed when their answer ends.
const MAX_IDLE_PER_ORIGIN: usize = 256;

/// How often each worker closes its idle connections that are past the timeout or that the
/// provider closed: unswept, their sockets would wait (in CLOSE_WAIT) for the provider's
/// next request, however long that is.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// The connector for the providers: TLS for `https`, and `TCP_NODELAY`, as Envoy's provider
/// clusters have it: with Nagle's algorithm, the last segment of a request larger than one
/// segment waits for the provider's (perhaps delayed) ACK of the others (docs/benchmarks.md).
pub fn connector() -> Result<HttpsConnector<HttpConnector>, rustls::Error> {
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp))
}

/// A connection with its sender, between requests or carrying one.
struct Link {
    send: SendRequest<Full<Bytes>>,
    conn: Conn,
    origin: String,
}

struct Idle {
    link: Box<Link>,
    since: Instant,
}

/// This thread's idle connections by origin (`scheme://authority`).
#[derive(Default)]
struct Pool {
    connector: Option<HttpsConnector<HttpConnector>>,
    idle: HashMap<String, Vec<Idle>>,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// Sends `request` (absolute URI, `host` set) on an idle connection to its origin, or a new
/// one, and gives the answer with a body that drives the connection.
pub async fn send(request: Request<Full<Bytes>>) -> Result<Response<ProviderBody>, BoxError> {
    let (mut parts, body) = request.into_parts();
    let target = parts.uri.clone();
    let origin = origin(&target);
    // The request line carries the path: the origin form a client sends to a server.
    if let Some(path) = target.path_and_query() {
        parts.uri = Uri::from(path.clone());
    }
    let mut request = Request::from_parts(parts, body);
    // An idle connection the provider closed just now fails before the request was written:
    // the request is given back and goes on the next connection.
    while let Some(link) = take_idle(&origin) {
        match call(link, request).await {
            Ok(answer) => return Ok(answer),
            Err(mut e) => match e.take_message() {
                Some(unsent) => request = unsent,
                None => return Err(e.into_error().into()),
            },
        }
    }
    let link = connect(target, origin).await?;
    call(link, request).await.map_err(|e| e.into_error().into())
}

fn origin(uri: &Uri) -> String {
    let scheme = uri.scheme_str().unwrap_or("http");
    let authority = uri.authority().map_or("", |a| a.as_str());
    format!("{scheme}://{authority}")
}

async fn connect(target: Uri, origin: String) -> Result<Box<Link>, BoxError> {
    let mut connector = POOL.with(|p| {
        let mut p = p.borrow_mut();
        match &p.connector {
            Some(c) => Ok(c.clone()),
            None => connector().map(|c| p.connector.insert(c).clone()),
        }
    })?;
    let io = connector.call(target).await?;
    let (send, conn) = http1::handshake(io).await?;
    Ok(Box::new(Link { send, conn, origin }))
}

/// The most recently idle connection to `origin` that is still open; older ones past the
/// idle timeout are closed on the way.
fn take_idle(origin: &str) -> Option<Box<Link>> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let idle = p.idle.get_mut(origin)?;
        let now = Instant::now();
        idle.retain(|i| now.duration_since(i.since) < IDLE_TIMEOUT);
        while let Some(Idle { mut link, .. }) = idle.pop() {
            if is_open(&mut link) {
                return Some(link);
            }
        }
        None
    })
}

/// Whether an idle connection can carry a request. A poll reads what came meanwhile: the
/// provider's close, most often.
fn is_open(link: &mut Link) -> bool {
    let polled = Pin::new(&mut link.conn).poll(&mut Context::from_waker(Waker::noop()));
    polled.is_pending() && link.send.is_ready()
}

/// Runs on each worker for as long as it serves: sweeps its idle connections.
pub async fn sweep_idle() {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        sweep(Instant::now());
    }
}

/// Closes this thread's idle connections that are past the idle timeout at `now`, or that
/// their provider closed.
fn sweep(now: Instant) {
    let _ = POOL.try_with(|p| {
        let mut p = p.borrow_mut();
        for idle in p.idle.values_mut() {
            idle.retain_mut(|i| now.duration_since(i.since) < IDLE_TIMEOUT && is_open(&mut i.link));
        }
        p.idle.retain(|_, idle| !idle.is_empty());
    });
}

fn put_idle(link: Box<Link>) {
    let _ = POOL.try_with(|p| {
        let mut p = p.borrow_mut();
        let idle = p.idle.entry(link.origin.clone()).or_default();
        let now = Instant::now();
        idle.retain(|i| now.duration_since(i.since) < IDLE_TIMEOUT);
        if idle.len() < MAX_IDLE_PER_ORIGIN {
            idle.push(Idle { link, since: now });
        }
    });
}

/// Sends the request and drives the connection until the answer's head is in. (The link
/// stays boxed: a connection is a large value, moved with the answer several times.)
async fn call(
    mut link: Box<Link>,
    request: Request<Full<Bytes>>,
) -> Result<Response<ProviderBody>, TrySendError<Request<Full<Bytes>>>> {
    let mut answer = pin!(link.send.try_send_request(request));
    let mut link = Some(link);
    let head = poll_fn(|cx| {
        if let Poll::Ready(r) = answer.as_mut().poll(cx) {
            return Poll::Ready(r);
        }
        if let Some(l) = link.as_mut() {
            if Pin::new(&mut l.conn).poll(cx).is_ready() {
                // Closed or failed: dropped, hyper answers the request with why.
                link = None;
            }
            return answer.as_mut().poll(cx);
        }
        Poll::Pending
    })
    .await?;
    let (parts, incoming) = head.into_parts();
    Ok(Response::from_parts(
        parts,
        ProviderBody {
            incoming,
            link,
            ended: false,
        },
    ))
}

/// A provider's answer body. Polling it polls its connection first, so the frames a read
/// decoded come out in one go; at its end the connection goes back to the thread's idle ones.
pub struct ProviderBody {
    incoming: Incoming,
    link: Option<Box<Link>>,
    /// The whole body came (a chunked body's end is not `is_end_stream`).
    ended: bool,
}

impl ProviderBody {
    /// Lets the connection read and decode; once it is closed it is dropped (the body has
    /// what it sent, or its error).
    fn drive(&mut self, cx: &mut Context<'_>) {
        if let Some(link) = self.link.as_mut() {
            if Pin::new(&mut link.conn).poll(cx).is_ready() {
                self.link = None;
            }
        }
    }
}

impl Body for ProviderBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let mut polled = Pin::new(&mut this.incoming).poll_frame(cx);
        if polled.is_pending() {
            this.drive(cx);
            polled = Pin::new(&mut this.incoming).poll_frame(cx);
        }
        // Trailers are the last frame: hyper's server polls no further after them.
        let last = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(frame))) => frame.is_trailers(),
            _ => false,
        };
        if last || this.incoming.is_end_stream() {
            this.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

impl Drop for ProviderBody {
    fn drop(&mut self) {
        // Dropped before its end (the client left, or a failed answer's body was read only
        // in part), the connection is closed with it: what is left of the answer is unread.
        // (An empty body, a 204's, is over without a poll.)
        if !self.is_end_stream() {
            return;
        }
        // One more poll lets the connection take in the end of the answer and ready itself
        // for the next request.
        self.drive(&mut Context::from_waker(Waker::noop()));
        if let Some(link) = self.link.take() {
            if link.send.is_ready() {
                put_idle(link);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use super::*;

    const CHUNKED: &str = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
        6\r\ndata: \r\n3\r\none\r\n6\r\ndata: \r\n3\r\ntwo\r\n0\r\n\r\n";
    const SIZED: &str = "HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nonetwo";

    /// A provider answering each request (heads only: the tests send no body) with
    /// `answer`, closing the connection after it if `close`. Gives its origin, a count of
    /// connections accepted and the request heads it read.
    async fn provider(
        answer: &'static str,
        close: bool,
    ) -> (String, Arc<AtomicUsize>, mpsc::UnboundedReceiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let (heads, seen) = mpsc::unbounded_channel();
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let heads = heads.clone();
                tokio::spawn(async move {
                    let mut read = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        let n = match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        read.extend_from_slice(&buf[..n]);
                        while let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head: Vec<u8> = read.drain(..end + 4).collect();
                            let _ = heads.send(String::from_utf8_lossy(&head).into_owned());
                            if socket.write_all(answer.as_bytes()).await.is_err() || close {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (origin, accepted, seen)
    }

    fn request(origin: &str) -> Request<Full<Bytes>> {
        Request::post(format!("{origin}/v1/chat/completions?x=1"))
            .header("host", "provider.test")
            .header("content-length", "0")
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    async fn body_of(origin: &str) -> Bytes {
        let answer = send(request(origin)).await.unwrap();
        answer.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn a_connection_carries_the_next_request_once_its_answer_was_read() {
        for answer in [CHUNKED, SIZED] {
            let (origin, accepted, mut heads) = provider(answer, false).await;
            for _ in 0..3 {
                let body = body_of(&origin).await;
                assert!(body.ends_with(b"two"), "{body:?}");
            }
            assert_eq!(accepted.load(Ordering::SeqCst), 1, "{answer}");
            let head = heads.recv().await.unwrap();
            assert!(
                head.starts_with("POST /v1/chat/completions?x=1 HTTP/1.1\r\n"),
                "the request line carries the path only: {head}"
            );
            assert!(head.contains("host: provider.test\r\n"), "{head}");
        }
    }

    #[tokio::test]
    async fn an_answer_ended_by_trailers_or_empty_frees_its_connection() {
        const TRAILED: &str = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\
            trailer: x-done\r\n\r\n3\r\none\r\n0\r\nx-done: yes\r\n\r\n";
        const EMPTY: &str = "HTTP/1.1 204 No Content\r\n\r\n";
        let (origin, accepted, _heads) = provider(TRAILED, false).await;
        let mut body = send(request(&origin)).await.unwrap().into_body();
        // Read as hyper's server does: up to the trailers, and no further.
        loop {
            let frame = body.frame().await.unwrap().unwrap();
            if frame.is_trailers() {
                break;
            }
        }
        assert!(body.is_end_stream());
        drop(body);
        assert_eq!(&body_of(&origin).await[..], b"one");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);

        let (origin, accepted, _heads) = provider(EMPTY, false).await;
        for _ in 0..3 {
            // Dropped without a poll, as an answer the gateway replaces.
            drop(send(request(&origin)).await.unwrap());
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_answer_left_unread_closes_its_connection() {
        let (origin, accepted, _heads) = provider(CHUNKED, false).await;
        let answer = send(request(&origin)).await.unwrap();
        drop(answer);
        assert!(body_of(&origin).await.ends_with(b"two"));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_provider_closed_while_idle_is_not_used() {
        let (origin, accepted, _heads) = provider(SIZED, true).await;
        for _ in 0..3 {
            assert_eq!(&body_of(&origin).await[..], b"onetwo");
            // Time for the provider's close to arrive: the idle connection is then seen
            // closed, and the request goes on a new one.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    fn idle_count() -> usize {
        POOL.with(|p| p.borrow().idle.values().map(Vec::len).sum())
    }

    #[tokio::test]
    async fn the_sweep_closes_idle_connections_the_provider_closed_or_past_the_timeout() {
        // A provider that closes its connection a while after its answer: idle by then.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closing = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = socket.read(&mut buf).await;
            socket.write_all(SIZED.as_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        });
        body_of(&closing).await;
        assert_eq!(idle_count(), 1);
        tokio::time::sleep(Duration::from_millis(300)).await;
        sweep(Instant::now());
        assert_eq!(idle_count(), 0, "the provider closed it");

        let (open, _, _heads) = provider(SIZED, false).await;
        body_of(&open).await;
        sweep(Instant::now());
        assert_eq!(idle_count(), 1, "open and in time: kept");
        sweep(Instant::now() + IDLE_TIMEOUT);
        assert_eq!(idle_count(), 0, "past the timeout");
    }

    #[tokio::test]
    async fn a_provider_that_is_not_there_is_an_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        assert!(send(request(&origin)).await.is_err());
    }
}
