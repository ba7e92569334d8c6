//! [`Replayable`]: a request body recorded (up to a limit) as it streams to
//! one try, so that a failed try can be replayed on another backend.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::combinators::UnsyncBoxBody;

use super::{BoxError, ProxyBody};

/// Keeps what a request body has sent so far (up to a limit) so that a
/// failed try can be replayed on another backend, while the body streams
/// to the current try as it arrives (no waiting for the whole body, which
/// would deadlock bidirectional streams such as gRPC).
///
/// Each try gets a [`ReplayReader`]; it first replays the recorded frames,
/// then pulls new ones from the source, recording them. Starting a new
/// reader retires the previous one (it fails with "superseded"), so only
/// one task pulls from the source at a time.
pub struct Replayable {
    shared: std::sync::Arc<std::sync::Mutex<ReplayState>>,
}

struct ReplayState {
    source: ProxyBody,
    recorded: Vec<Frame<Bytes>>,
    recorded_bytes: u64,
    limit: u64,
    /// Recording stopped: frames were sent that are no longer kept.
    overflowed: bool,
    /// The source ended (`None` seen).
    ended: bool,
    generation: u64,
}

/// How much of the body a replay could reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayStatus {
    /// Nothing was sent yet, or everything sent is recorded.
    Replayable,
    /// More was sent than the limit allowed keeping.
    Overflowed,
}

impl Replayable {
    /// Wraps `source`, keeping at most `limit` bytes of data for replays.
    pub fn new(source: ProxyBody, limit: u64) -> Self {
        Self {
            shared: std::sync::Arc::new(std::sync::Mutex::new(ReplayState {
                source,
                recorded: Vec::new(),
                recorded_bytes: 0,
                limit,
                overflowed: false,
                ended: false,
                generation: 0,
            })),
        }
    }

    /// A body for the next try, replaying from the start.
    pub fn reader(&self) -> ProxyBody {
        let generation = match self.shared.lock() {
            Ok(mut s) => {
                s.generation += 1;
                s.generation
            }
            Err(_) => u64::MAX,
        };
        let reader = ReplayReader {
            shared: self.shared.clone(),
            generation,
            pos: 0,
        };
        UnsyncBoxBody::new(reader)
    }

    /// Whether a new try could get the whole body.
    pub fn status(&self) -> ReplayStatus {
        match self.shared.lock() {
            Ok(s) if !s.overflowed => ReplayStatus::Replayable,
            _ => ReplayStatus::Overflowed,
        }
    }
}

struct ReplayReader {
    shared: std::sync::Arc<std::sync::Mutex<ReplayState>>,
    generation: u64,
    pos: usize,
}

fn clone_frame(f: &Frame<Bytes>) -> Frame<Bytes> {
    if let Some(d) = f.data_ref() {
        Frame::data(d.clone())
    } else if let Some(t) = f.trailers_ref() {
        Frame::trailers(t.clone())
    } else {
        Frame::data(Bytes::new())
    }
}

impl Body for ReplayReader {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Ok(mut s) = this.shared.lock() else {
            return Poll::Ready(Some(Err("request body state poisoned".into())));
        };
        if s.generation != this.generation {
            return Poll::Ready(Some(Err("request body superseded by a retry".into())));
        }
        if this.pos < s.recorded.len() {
            let f = clone_frame(&s.recorded[this.pos]);
            this.pos += 1;
            return Poll::Ready(Some(Ok(f)));
        }
        // Only the reader that overflowed the recording (pos == MAX) may go
        // on; any later one would miss the unrecorded frames.
        if s.overflowed && this.pos != usize::MAX {
            return Poll::Ready(Some(Err("request body cannot be replayed".into())));
        }
        if s.ended {
            return Poll::Ready(None);
        }
        let frame = ready!(Pin::new(&mut s.source).poll_frame(cx));
        match frame {
            None => {
                s.ended = true;
                Poll::Ready(None)
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e))),
            Some(Ok(f)) => {
                let len = f.data_ref().map_or(0, |d| d.len() as u64);
                if !s.overflowed && s.recorded_bytes + len <= s.limit {
                    s.recorded_bytes += len;
                    s.recorded.push(clone_frame(&f));
                    this.pos = s.recorded.len();
                } else if !s.overflowed {
                    // From here on frames stream through unrecorded.
                    s.overflowed = true;
                    s.recorded.clear();
                    this.pos = usize::MAX;
                }
                Poll::Ready(Some(Ok(f)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;
    use crate::body::boxed;

    fn chunks(n: usize, size: usize) -> ProxyBody {
        let frames =
            (0..n).map(move |i| Ok::<_, BoxError>(Frame::data(Bytes::from(vec![i as u8; size]))));
        boxed(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )))
    }

    #[tokio::test]
    async fn a_second_try_replays_what_the_first_consumed() {
        let r = Replayable::new(chunks(4, 10), 100);
        let mut first = r.reader();
        let a = first.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(a, vec![0u8; 10]);
        // First try fails; the second reads everything from the start.
        let second = r.reader();
        let err = first.frame().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("superseded"));
        let all = second.collect().await.unwrap().to_bytes();
        assert_eq!(all.len(), 40);
        assert_eq!(&all[..10], &[0u8; 10]);
        assert_eq!(&all[30..], &[3u8; 10]);
        assert_eq!(r.status(), ReplayStatus::Replayable);
    }

    #[tokio::test]
    async fn past_the_limit_it_streams_and_cannot_replay() {
        let r = Replayable::new(chunks(4, 10), 25);
        let all = r.reader().collect().await.unwrap().to_bytes();
        assert_eq!(all.len(), 40, "the first try still gets every byte");
        assert_eq!(r.status(), ReplayStatus::Overflowed);
        let mut again = r.reader();
        assert!(again.frame().await.unwrap().is_err());
    }
}
