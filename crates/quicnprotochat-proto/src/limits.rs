//! Protocol limits every conforming peer respects.
//!
//! Servers may be configured tighter for some of them (see the server's
//! configuration); these are the wire contract's ceilings.

/// Length of an identity / recipient key: a raw Ed25519 public key (RFC 8032).
pub const KEY_LEN: usize = 32;

/// Length of an Ed25519 signature (RFC 8032).
pub const SIGNATURE_LEN: usize = 64;

/// Length of a client-chosen message id: 128 random bits make collisions between
/// honest senders negligible (the same size as a UUID).
pub const MESSAGE_ID_LEN: usize = 16;

/// Length of the server's authentication nonce: 256 bits, never reused.
pub const NONCE_LEN: usize = 32;

/// Length of a delivery token: 256 random bits a recipient hands to the
/// members of its groups, so the server can tell their messages from a
/// stranger's without learning who shares a group with whom.
pub const DELIVERY_TOKEN_LEN: usize = 32;

/// Largest opaque payload in one enqueue: 5 MiB.  Large enough for an MLS
/// commit or Welcome of a group of several thousand members; attachments are
/// meant to travel outside the queue.
pub const MAX_PAYLOAD_BYTES: usize = 5 * 1024 * 1024;

/// Most recipients of one enqueue: fan-out to a group of this size in one call.
/// MLS groups of a few hundred members are the design target (RFC 9750 §8).
pub const MAX_RECIPIENTS: usize = 1024;

/// Most messages in one `enqueueBatch` (wire version 3): enough that a
/// client's burst of sends (a typed paragraph, a file's chunks, a commit
/// with its application messages) is one round trip and one durable
/// commit on the server, few enough that one call's work stays small.
pub const MAX_ENQUEUE_BATCH: usize = 64;

/// Most recipients over all the messages of one `enqueueBatch`: a batch
/// costs the server no more queue entries than one largest `enqueue`.
pub const MAX_BATCH_RECIPIENTS: usize = MAX_RECIPIENTS;

/// Largest single TLS-serialized key package.  A KeyPackage with a basic
/// credential is about 300 bytes; 16 KiB leaves room for extensions and
/// X.509 credentials.
pub const MAX_KEY_PACKAGE_BYTES: usize = 16 * 1024;

/// Most key packages in one `publishKeyPackages` call.
pub const MAX_KEY_PACKAGES_PER_BATCH: usize = 100;

/// Most messages one `fetch` or push batch returns.  Signal pushes at most 256
/// unacknowledged messages per stream; we use the same window.
pub const MAX_FETCH_MESSAGES: u32 = 256;

/// Soft cap on the payload bytes of one `fetch` result or push batch.  A batch
/// always carries at least one message, so it may exceed this by one payload.
pub const MAX_FETCH_BYTES: usize = 1024 * 1024;

/// Longest username, in bytes (ASCII).
pub const MAX_USERNAME_LEN: usize = 32;

/// Largest Cap'n Proto frame a peer accepts: the largest payload plus room for
/// the rest of an enqueue (1024 recipients × 32 bytes, ids, pointers) or a
/// fetch result (one maximal payload plus `MAX_FETCH_BYTES`).
pub const MAX_FRAME_BYTES: usize = MAX_PAYLOAD_BYTES + MAX_FETCH_BYTES + 256 * 1024;

/// Cap'n Proto traversal limit, in 8-byte words: twice the largest frame, so
/// a legitimate message always fits while pointer-amplification attacks
/// (many pointers to one object) stay bounded at 2x the frame size.
pub const TRAVERSAL_LIMIT_WORDS: usize = 2 * MAX_FRAME_BYTES / 8;

/// Cap'n Proto nesting limit.  The schema's deepest path is 4 levels
/// (results → list → struct → data) plus the RPC envelope's few; 16 is
/// ample and keeps recursion shallow (the library default is 64).
pub const NESTING_LIMIT: i32 = 16;

/// Most segments in one frame.  Cap'n Proto itself refuses 512 and more;
/// legitimate frames from capnp-rust writers use one or a few.
pub const MAX_SEGMENTS: u32 = 64;
