//! A byte budget for request messages still arriving.
//!
//! tonic buffers each call's message until its last byte is in, up to the
//! decoding limit; nothing else bounds the sum over calls and connections,
//! so clients that send most of a large message and stop could hold any
//! amount of memory. This layer meters every request body: each DATA chunk
//! takes its bytes from a per-connection and a process-wide budget before
//! tonic sees it, and the bytes of a gRPC message go back as soon as that
//! message is complete (or the call ends). A chunk that does not fit is
//! refused with `RESOURCE_EXHAUSTED`; complete messages, the normal case,
//! hold nothing.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body::{Body, Frame};
use tokio::sync::Semaphore;
use tonic::Status;

/// Bytes of unfinished messages one connection and all of them may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub per_connection: usize,
    pub total: usize,
}

/// The tower layer for `Server::builder().layer(..)`.
#[derive(Clone)]
pub struct BudgetLayer {
    limits: Limits,
    total: Arc<Semaphore>,
}

impl BudgetLayer {
    pub fn new(limits: Limits) -> Self {
        BudgetLayer {
            limits,
            total: Arc::new(Semaphore::new(limits.total.min(Semaphore::MAX_PERMITS))),
        }
    }
}

impl<S> tower::Layer<S> for BudgetLayer {
    type Service = Budget<S>;
    fn layer(&self, inner: S) -> Budget<S> {
        Budget {
            inner,
            limits: self.limits,
            total: self.total.clone(),
            conn: Arc::new(Semaphore::new(self.limits.per_connection)),
        }
    }
}

/// The metering service. tonic clones the layered service for each
/// connection, and a clone starts a fresh per-connection budget.
pub struct Budget<S> {
    inner: S,
    limits: Limits,
    total: Arc<Semaphore>,
    conn: Arc<Semaphore>,
}

impl<S: Clone> Clone for Budget<S> {
    fn clone(&self) -> Self {
        Budget {
            inner: self.inner.clone(),
            limits: self.limits,
            total: self.total.clone(),
            conn: Arc::new(Semaphore::new(self.limits.per_connection)),
        }
    }
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for Budget<S>
where
    S: tower::Service<http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let (parts, body) = req.into_parts();
        let metered = Metered {
            inner: body,
            total: self.total.clone(),
            conn: self.conn.clone(),
            header: [0; 5],
            header_len: 0,
            remaining: 0,
            held: 0,
        };
        self.inner.call(http::Request::from_parts(
            parts,
            tonic::body::Body::new(metered),
        ))
    }
}

/// A request body that holds budget for the bytes of its unfinished message.
struct Metered {
    inner: tonic::body::Body,
    total: Arc<Semaphore>,
    conn: Arc<Semaphore>,
    /// The 5-byte gRPC message prefix being read, and how much of it is in.
    header: [u8; 5],
    header_len: usize,
    /// Payload bytes still to come for the current message.
    remaining: u64,
    /// Budget taken for the current (unfinished) message.
    held: usize,
}

impl Metered {
    fn release(&mut self, n: usize) {
        let n = n.min(self.held);
        self.held -= n;
        self.total.add_permits(n);
        self.conn.add_permits(n);
    }

    /// Takes budget for a chunk, then gives back what completed messages held.
    fn account(&mut self, chunk: &[u8]) -> Result<(), Status> {
        let n = chunk.len();
        let refuse = || {
            tracing::debug!(
                bytes = n,
                "request refused: unfinished messages over budget"
            );
            Status::resource_exhausted(
                "too many request bytes in flight (unfinished messages over the server's \
                 budget); retry later",
            )
        };
        let c = u32::try_from(n).map_err(|_| refuse())?;
        let conn = self.conn.try_acquire_many(c).map_err(|_| refuse())?;
        let total = self.total.try_acquire_many(c).map_err(|_| refuse())?;
        conn.forget();
        total.forget();
        self.held += n;

        let mut rest = chunk;
        while !rest.is_empty() {
            if self.header_len < 5 {
                let take = (5 - self.header_len).min(rest.len());
                self.header[self.header_len..self.header_len + take].copy_from_slice(&rest[..take]);
                self.header_len += take;
                rest = &rest[take..];
                if self.header_len < 5 {
                    break;
                }
                let len = u32::from_be_bytes(self.header[1..5].try_into().unwrap());
                self.remaining = len as u64;
            } else {
                let take = (self.remaining as usize).min(rest.len());
                self.remaining -= take as u64;
                rest = &rest[take..];
            }
            if self.header_len == 5 && self.remaining == 0 {
                // A whole message: tonic decodes it now; its bytes are no longer held.
                let done = self.held - rest.len();
                self.release(done);
                self.header_len = 0;
            }
        }
        Ok(())
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        let held = self.held;
        self.release(held);
    }
}

impl Body for Metered {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && let Err(s) = this.account(data)
                {
                    return Poll::Ready(Some(Err(s)));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metered(per_connection: usize, total: usize) -> Metered {
        Metered {
            inner: tonic::body::Body::empty(),
            total: Arc::new(Semaphore::new(total)),
            conn: Arc::new(Semaphore::new(per_connection)),
            header: [0; 5],
            header_len: 0,
            remaining: 0,
            held: 0,
        }
    }

    fn message(len: usize) -> Vec<u8> {
        let mut m = vec![0u8];
        m.extend((len as u32).to_be_bytes());
        m.extend(vec![7u8; len]);
        m
    }

    #[test]
    fn complete_messages_hold_nothing_however_they_are_cut() {
        let mut stream = message(1000);
        stream.extend(message(0));
        stream.extend(message(3000));
        for cut in [1, 2, 5, 6, 7, 333, 4096] {
            let mut m = metered(8192, 8192);
            for chunk in stream.chunks(cut) {
                m.account(chunk).unwrap();
            }
            assert_eq!(m.held, 0, "cut {cut}");
            assert_eq!(m.total.available_permits(), 8192);
        }
    }

    #[test]
    fn an_unfinished_message_holds_its_bytes_until_dropped_and_is_refused_past_the_budget() {
        let budget = Arc::new(Semaphore::new(10_000));
        let mut a = metered(6000, 0);
        a.total = budget.clone();
        let msg = message(20_000);
        a.account(&msg[..5000]).unwrap();
        assert_eq!((a.held, budget.available_permits()), (5000, 5000));
        // Over the connection's budget: refused, nothing more taken.
        let s = a.account(&msg[5000..7000]).unwrap_err();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert_eq!(budget.available_permits(), 5000);
        // Another connection hits the process-wide budget.
        let mut b = metered(100_000, 0);
        b.total = budget.clone();
        b.account(&msg[..4000]).unwrap();
        assert!(b.account(&msg[4000..6000]).is_err());
        drop(a);
        drop(b);
        assert_eq!(budget.available_permits(), 10_000);
    }
}
