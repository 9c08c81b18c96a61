//! Running a Cap'n Proto two-party RPC session over one QUIC stream.

use std::time::Duration;

use capnp::message::ReaderOptions;
use capnp_rpc::{RpcSystem, twoparty};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

use crate::framing::{FrameGuard, FrameLimits};
use crate::limits::{MAX_FRAME_BYTES, NESTING_LIMIT, TRAVERSAL_LIMIT_WORDS};

pub use capnp_rpc::rpc_twoparty_capnp::Side;

/// Default time allowed from a frame's first byte to its last: a 5 MiB frame
/// at 2 Mbit/s takes about 21 s, so 30 s leaves margin for slow links while
/// cutting off peers that trickle bytes.
pub const DEFAULT_FRAME_TIMEOUT: Duration = Duration::from_secs(30);

/// Capacity of an RPC stream's write buffer, which gathers the pieces of
/// each outgoing message (segment table, segments) into one write to the
/// QUIC stream; a larger message goes to the stream directly.  The read
/// side has no buffer of its own: the QUIC stream already holds what
/// arrived, and a message is read in two exact reads (its segment table,
/// then its segments).  Every connection holds these for its whole life,
/// idle or not: with the 8 KiB defaults for both, an idle authenticated
/// connection cost the server 51 KiB; with these, 40 to 41 (the benchmarks
/// page, `idle-memory`).
pub const WRITE_BUFFER_BYTES: usize = 1024;

/// Reader options for every incoming message, sized to the protocol limits.
pub fn reader_options() -> ReaderOptions {
    let mut o = ReaderOptions::new();
    o.traversal_limit_in_words(Some(TRAVERSAL_LIMIT_WORDS))
        .nesting_limit(NESTING_LIMIT);
    o
}

/// Frame limits with the protocol defaults.
pub fn default_frame_limits() -> FrameLimits {
    FrameLimits {
        max_frame_bytes: MAX_FRAME_BYTES,
        frame_timeout: DEFAULT_FRAME_TIMEOUT,
    }
}

/// Builds an RPC system over a QUIC (or any tokio) stream pair.
///
/// The incoming side is wrapped in a [`FrameGuard`] and read with
/// [`reader_options`].  The returned system must be polled (spawned on a
/// `LocalSet`) for any call to progress.
pub fn rpc_system<R, W>(
    recv: R,
    send: W,
    side: Side,
    bootstrap: Option<capnp::capability::Client>,
    limits: FrameLimits,
) -> RpcSystem<Side>
where
    R: tokio::io::AsyncRead + Unpin + 'static,
    W: tokio::io::AsyncWrite + Unpin + 'static,
{
    let guarded = FrameGuard::new(recv.compat(), limits);
    let network = twoparty::VatNetwork::new(
        guarded,
        futures::io::BufWriter::with_capacity(WRITE_BUFFER_BYTES, send.compat_write()),
        side,
        reader_options(),
    );
    RpcSystem::new(Box::new(network), bootstrap)
}
