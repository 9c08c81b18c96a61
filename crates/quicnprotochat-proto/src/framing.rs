//! A guard on the incoming Cap'n Proto byte stream.
//!
//! [`FrameGuard`] watches the standard Cap'n Proto stream framing (segment
//! table, then segments) as bytes pass through, before the RPC layer parses
//! anything, and fails the stream when
//!
//! - a frame declares 0 segments or more than [`MAX_SEGMENTS`](crate::limits::MAX_SEGMENTS),
//! - a frame declares more bytes than the configured maximum (checked on the
//!   segment table, before the body is read or allocated), or
//! - a frame that has started does not finish within the frame deadline
//!   (a peer trickling bytes to hold resources: QUIC's idle timeout is reset
//!   by every byte, so this deadline is the application's job).
//!
//! Time between frames is not limited here; idle connections are governed by
//! QUIC's idle timeout and the server's authentication deadline.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::io::AsyncRead;
use tokio::time::{Instant, Sleep};

use crate::limits::MAX_SEGMENTS;

/// Largest segment table: count word, one size word per segment, padding.
const MAX_HEADER_BYTES: usize = 4 + 4 * MAX_SEGMENTS as usize + 4;

/// Limits enforced by [`FrameGuard`].
#[derive(Debug, Clone, Copy)]
pub struct FrameLimits {
    /// Largest frame body, in bytes.
    pub max_frame_bytes: usize,
    /// Longest time from a frame's first byte to its last.
    pub frame_timeout: Duration,
}

#[derive(Debug)]
enum Phase {
    /// Reading the segment table; `have` bytes of `need` so far.
    Header { have: usize, need: usize },
    /// Reading the body; `remaining` bytes left.
    Body { remaining: u64 },
}

/// An [`AsyncRead`] adapter enforcing [`FrameLimits`] on Cap'n Proto framing.
pub struct FrameGuard<R> {
    inner: R,
    limits: FrameLimits,
    phase: Phase,
    header: [u8; MAX_HEADER_BYTES],
    deadline: Pin<Box<Sleep>>,
    in_frame: bool,
    failed: Option<io::ErrorKind>,
}

impl<R> std::fmt::Debug for FrameGuard<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameGuard")
            .field("limits", &self.limits)
            .field("phase", &self.phase)
            .field("in_frame", &self.in_frame)
            .finish_non_exhaustive()
    }
}

impl<R> FrameGuard<R> {
    /// Wraps `inner`.  Must be created inside a tokio runtime (it owns a timer).
    pub fn new(inner: R, limits: FrameLimits) -> Self {
        Self {
            inner,
            limits,
            phase: Phase::Header { have: 0, need: 4 },
            header: [0; MAX_HEADER_BYTES],
            deadline: Box::pin(tokio::time::sleep(limits.frame_timeout)),
            in_frame: false,
            failed: None,
        }
    }

    /// Feeds bytes that passed through to the framing state machine.
    fn observe(&mut self, mut bytes: &[u8]) -> Result<(), &'static str> {
        while !bytes.is_empty() {
            if !self.in_frame {
                self.in_frame = true;
                let when = deadline(self.limits.frame_timeout);
                self.deadline.as_mut().reset(when);
            }
            match &mut self.phase {
                Phase::Header { have, need } => {
                    let take = (*need - *have).min(bytes.len());
                    self.header[*have..*have + take].copy_from_slice(&bytes[..take]);
                    *have += take;
                    bytes = &bytes[take..];
                    if *have < *need {
                        continue;
                    }
                    if *need == 4 {
                        let count = u32::from_le_bytes(word(&self.header, 0)).wrapping_add(1);
                        if count == 0 || count > MAX_SEGMENTS {
                            return Err("segment count out of range");
                        }
                        // Count word plus one size word per segment, padded to 8 bytes.
                        let need_total = (4 + 4 * count as usize + 7) & !7;
                        *need = need_total;
                        continue;
                    }
                    let count = u32::from_le_bytes(word(&self.header, 0)).wrapping_add(1) as usize;
                    let words: u64 = (0..count)
                        .map(|i| u64::from(u32::from_le_bytes(word(&self.header, 4 + 4 * i))))
                        .sum();
                    let body = words * 8;
                    if body > self.limits.max_frame_bytes as u64 {
                        return Err("frame larger than the limit");
                    }
                    if body == 0 {
                        self.finish_frame();
                    } else {
                        self.phase = Phase::Body { remaining: body };
                    }
                }
                Phase::Body { remaining } => {
                    let take = (*remaining).min(bytes.len() as u64);
                    *remaining -= take;
                    // `take` is at most `bytes.len()`, so it fits in usize.
                    bytes = &bytes[usize::try_from(take).unwrap_or(bytes.len())..];
                    if *remaining == 0 {
                        self.finish_frame();
                    }
                }
            }
        }
        Ok(())
    }

    fn finish_frame(&mut self) {
        self.phase = Phase::Header { have: 0, need: 4 };
        self.in_frame = false;
    }
}

/// Farthest deadline: a timeout too long to be added to the clock means no
/// deadline in practice (tokio's own "far future" is 30 years too).
const FAR_FUTURE: Duration = Duration::from_secs(30 * 365 * 24 * 3600);

/// `now + timeout`, or [`FAR_FUTURE`] from now when that overflows the clock.
fn deadline(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .or_else(|| now.checked_add(FAR_FUTURE))
        .unwrap_or(now)
}

fn word(buf: &[u8], at: usize) -> [u8; 4] {
    let mut w = [0; 4];
    if let Some(src) = buf.get(at..at + 4) {
        w.copy_from_slice(src);
    }
    w
}

impl<R: AsyncRead + Unpin> AsyncRead for FrameGuard<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(kind) = this.failed {
            return Poll::Ready(Err(io::Error::new(kind, "stream already failed")));
        }
        if this.in_frame && this.deadline.as_mut().poll(cx).is_ready() {
            this.failed = Some(io::ErrorKind::TimedOut);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "frame not completed before the deadline",
            )));
        }
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(n)) => {
                let got = buf.get(..n).unwrap_or_default();
                match this.observe(got) {
                    Ok(()) => {
                        if this.in_frame {
                            // Register the timer so a stalled frame wakes us.
                            let _ = this.deadline.as_mut().poll(cx);
                        }
                        Poll::Ready(Ok(n))
                    }
                    Err(why) => {
                        this.failed = Some(io::ErrorKind::InvalidData);
                        Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, why)))
                    }
                }
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;
    use futures::io::AsyncReadExt;

    fn limits() -> FrameLimits {
        FrameLimits {
            max_frame_bytes: 1024,
            frame_timeout: Duration::from_secs(5),
        }
    }

    fn frame(segments: &[u32]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(segments.len() as u32 - 1).to_le_bytes());
        for s in segments {
            out.extend_from_slice(&s.to_le_bytes());
        }
        if segments.len().is_multiple_of(2) {
            out.extend_from_slice(&[0; 4]);
        }
        for s in segments {
            out.extend(std::iter::repeat_n(0xAB, *s as usize * 8));
        }
        out
    }

    async fn read_all(bytes: Vec<u8>, limits: FrameLimits) -> io::Result<Vec<u8>> {
        let mut g = FrameGuard::new(futures::io::Cursor::new(bytes), limits);
        let mut out = Vec::new();
        g.read_to_end(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn passes_well_formed_frames_unchanged() {
        let mut bytes = frame(&[3]);
        bytes.extend(frame(&[1, 2]));
        bytes.extend(frame(&[0]));
        assert_eq!(read_all(bytes.clone(), limits()).await.unwrap(), bytes);
    }

    #[tokio::test]
    async fn refuses_oversized_frame_from_its_header() {
        // Only the header is sent: the guard must refuse before any body byte exists.
        let header = frame(&[200])[..8].to_vec();
        let err = read_all(header, limits()).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn refuses_bad_segment_counts() {
        let zero = u32::MAX.to_le_bytes().to_vec(); // count - 1 = u32::MAX => 0 segments
        assert_eq!(
            read_all(zero, limits()).await.unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        let many = (MAX_SEGMENTS).to_le_bytes().to_vec(); // MAX_SEGMENTS + 1 segments
        assert_eq!(
            read_all(many, limits()).await.unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    /// The server_config fuzz target's invariant (every accepted timeout
    /// fits in a deadline) fails on its dictionary's boundary value
    /// `frame_timeout_secs = 9223372036854775807`; with that limit the
    /// first byte of any frame panicked (`now + timeout` overflowed).
    #[tokio::test]
    async fn a_frame_timeout_too_long_for_a_deadline_is_no_deadline() {
        let limits = FrameLimits {
            max_frame_bytes: 1024,
            frame_timeout: Duration::from_secs(9_223_372_036_854_775_807),
        };
        let bytes = frame(&[1]);
        assert_eq!(read_all(bytes.clone(), limits).await.unwrap(), bytes);
    }

    #[tokio::test(start_paused = true)]
    async fn times_out_a_trickled_frame() {
        let (tx, rx) = futures::channel::mpsc::unbounded::<io::Result<Vec<u8>>>();
        let reader = rx.into_async_read();
        let mut g = FrameGuard::new(reader, limits());
        let bytes = frame(&[4]);
        tx.unbounded_send(Ok(bytes[..10].to_vec())).unwrap();
        let mut buf = vec![0; 64];
        assert_eq!(g.read(&mut buf).await.unwrap(), 10);
        // The rest never comes: the next read must fail once the deadline passes.
        let err = g.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_between_frames_is_not_a_timeout() {
        let (tx, rx) = futures::channel::mpsc::unbounded::<io::Result<Vec<u8>>>();
        let mut g = FrameGuard::new(rx.into_async_read(), limits());
        tx.unbounded_send(Ok(frame(&[1]))).unwrap();
        let mut buf = vec![0; 64];
        assert_eq!(g.read(&mut buf).await.unwrap(), 16);
        let tx2 = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            tx2.unbounded_send(Ok(frame(&[1]))).unwrap();
        });
        assert_eq!(g.read(&mut buf).await.unwrap(), 16);
    }
}
