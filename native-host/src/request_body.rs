//! Reading a client's request body within its own limit (`server.max_body_bytes`) and a
//! budget shared by every request (`server.max_body_memory_bytes`), so that many clients
//! sending large bodies at once cannot take more memory than the budget.
//!
//! A body takes its memory from the budget before it is read when its length is declared
//! (`content-length`), else as its bytes arrive, and gives it back when the request no longer
//! holds it (once the response head is sent: until then it may be sent to the provider
//! again). A request whose body does not fit in what is left is refused at once with 503 and
//! `retry-after: 1`, never queued: waiting would hold its connection and its bytes in the
//! kernel's buffers, and a client retrying after a second is the better queue.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes taken from the budget at least at a time while a body of unknown length arrives.
const GROW_STEP: usize = 64 * 1024;

/// The process-wide budget of request body memory.
pub struct BodyBudget {
    bytes: Arc<Semaphore>,
}

impl BodyBudget {
    pub fn new(bytes: u64) -> Self {
        let bytes = usize::try_from(bytes)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Self {
            bytes: Arc::new(Semaphore::new(bytes)),
        }
    }

    /// Adds `more` bytes to what `held` holds, if the budget has them.
    fn grow(&self, held: &mut BodyMemory, more: usize) -> Result<(), ReadError> {
        if more == 0 {
            return Ok(());
        }
        let n = u32::try_from(more).map_err(|_| ReadError::Busy)?;
        let permit = Arc::clone(&self.bytes)
            .try_acquire_many_owned(n)
            .map_err(|_| ReadError::Busy)?;
        held.bytes += more;
        match &mut held.permit {
            Some(p) => p.merge(permit),
            None => held.permit = Some(permit),
        }
        Ok(())
    }
}

/// Memory of the budget held by one request's body; given back when dropped.
#[derive(Default)]
pub struct BodyMemory {
    permit: Option<OwnedSemaphorePermit>,
    bytes: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ReadError {
    /// Larger than the request's limit: 413.
    TooLarge,
    /// The budget has no room for it now: 503.
    Busy,
    /// The client's body failed (reset, malformed framing): 400.
    Failed,
}

/// Reads `body` whole, up to `limit` bytes, taking its memory from `budget`.
pub async fn read(
    mut body: Incoming,
    limit: usize,
    budget: &BodyBudget,
) -> Result<(Bytes, BodyMemory), ReadError> {
    let mut memory = BodyMemory::default();
    let declared = body.size_hint().exact();
    if let Some(n) = declared {
        let n = usize::try_from(n).map_err(|_| ReadError::TooLarge)?;
        if n > limit {
            return Err(ReadError::TooLarge);
        }
        // All of it before reading any: with `expect: 100-continue`, a refused client does
        // not even send it.
        budget.grow(&mut memory, n)?;
    }
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| ReadError::Failed)?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers: not part of the body
        };
        len += data.len();
        if len > limit {
            return Err(ReadError::TooLarge);
        }
        if len > memory.bytes {
            let more = (len - memory.bytes)
                .max(GROW_STEP)
                .min(limit - memory.bytes);
            budget.grow(&mut memory, more)?;
        }
        if !data.is_empty() {
            chunks.push(data);
        }
    }
    let bytes = match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => {
            let mut all = BytesMut::with_capacity(len);
            for chunk in chunks {
                all.extend_from_slice(&chunk);
            }
            all.freeze()
        }
    };
    Ok((bytes, memory))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_shared_and_given_back() {
        let budget = BodyBudget::new(100);
        let mut a = BodyMemory::default();
        budget.grow(&mut a, 60).unwrap();
        let mut b = BodyMemory::default();
        assert_eq!(budget.grow(&mut b, 50), Err(ReadError::Busy));
        budget.grow(&mut b, 40).unwrap();
        budget.grow(&mut a, 0).unwrap();
        assert_eq!(budget.grow(&mut a, 1), Err(ReadError::Busy));
        drop(a);
        budget.grow(&mut b, 60).unwrap();
        assert_eq!(b.bytes, 100);
    }
}
