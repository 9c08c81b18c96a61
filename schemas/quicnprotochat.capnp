@0x8c3621f714c7a694;
# quicnprotochat wire contract, wire version 1 (minor version 2).
#
# Transport: QUIC (RFC 9000) with TLS 1.3, ALPN "quicnprotochat/1".
# The client opens exactly one bidirectional stream and runs a Cap'n Proto
# two-party RPC session (rpc.capnp, standard framing) on it; the server's
# bootstrap capability is a `Service`.  docs/protocol.md is the normative
# description of every method, limit and error code.
#
# Conventions:
# - Every method result that can fail carries `error :Error`.  A null
#   `error` means success; a non-null one means the call failed and the other
#   result fields are meaningless.  Cap'n Proto exceptions are reserved for
#   transport and framing failures.
# - Keys are raw 32-byte Ed25519 public keys.  Sequence numbers start at 1.
# - Fields and methods added in a later minor version are optional: a server
#   of minor version N accepts clients of minor versions 1 to N.
# - The store incarnation is a 16-byte id of the server's store; it changes
#   when the store is restored from a backup, and then sequence numbers may
#   have gone back: a client that sees it change reads its queue from the
#   start (docs/protocol.md, "Store incarnation").

const wireVersion :UInt16 = 3;
# Minor wire version spoken by this schema.  The major version is in the ALPN.

enum ErrorCode {
  unspecified @0;     # never sent by a conforming server
  unauthenticated @1; # bad access token or identity proof, or no challenge outstanding
  forbidden @2;       # authenticated, but not allowed (e.g. someone else's queue)
  invalidArgument @3; # malformed or out-of-range argument
  tooLarge @4;        # payload, list or batch above its cap
  rateLimited @5;     # token bucket empty; see retryAfterMs
  queueFull @6;       # a recipient's queue is at its depth cap; nothing was stored
  notFound @7;        # unknown username, no key package, ...
  versionMismatch @8; # client and server wire versions are incompatible
  internal @9;        # server-side failure; details are in the server log only
  conflict @10;       # e.g. username taken, identity already registered under another name
  staleEpoch @11;     # a commit for an MLS group epoch that already has an accepted commit
}

struct Error {
  code @0 :ErrorCode;
  message @1 :Text;        # safe, human-readable; never contains secrets
  retryAfterMs @2 :UInt32; # set with rateLimited: earliest useful retry
}

struct Health {
  ok @0 :Bool;             # server is ready to serve
  serverVersion @1 :Text;  # e.g. "0.1.0"
  wireVersion @2 :UInt16;  # the server's wireVersion
  storeReachable @3 :Bool; # the store answered a probe query
}

struct AuthRequest {
  wireVersion @0 :UInt16;  # the client's wireVersion
  accessToken @1 :Data;    # the server access token (shared secret of the deployment)
  identityKey @2 :Data;    # 32-byte Ed25519 public key
  signature @3 :Data;      # 64-byte Ed25519 signature over the auth transcript (docs/protocol.md)
}

struct Envelope {
  seq @0 :UInt64;          # per-recipient sequence number, strictly increasing
  messageId @1 :Data;      # the 16-byte id the sender chose
  payload @2 :Data;        # opaque ciphertext
  enqueuedAtMs @3 :UInt64; # server receive time, Unix milliseconds
  incarnation @4 :Data;    # since 2: the store incarnation `seq` belongs to
}

struct Outgoing {
  # One message of `Session.enqueueBatch` (since 3): the arguments of one
  # `enqueue`.
  recipients @0 :List(Data);
  messageId @1 :Data;
  payload @2 :Data;
  tokens @3 :List(Data);
}

struct EnqueueResult {
  # The outcome of one message of `Session.enqueueBatch` (since 3): the
  # results of one `enqueue`.
  error @0 :Error;
  duplicate @1 :Bool;
  seqs @2 :List(UInt64);
}

interface Service {
  # Bootstrap capability.  Nothing but these three methods is reachable
  # before authentication.

  health @0 () -> (health :Health);
  # Readiness probe; needs no authentication.

  challenge @1 (wireVersion :UInt16) -> (error :Error, nonce :Data);
  # Returns a fresh 32-byte nonce for this connection.  A new challenge
  # replaces the outstanding one; `authenticate` consumes it.

  authenticate @2 (request :AuthRequest) -> (error :Error, session :Session);
  # Proves knowledge of the access token and possession of the identity key.
  # On success returns a Session bound to that identity.
}

interface Session {
  # Everything an authenticated identity can do.

  register @0 (username :Text) -> (error :Error);
  # Binds this identity to `username` (1-32 chars of [a-z0-9_.-], starting
  # with [a-z0-9]).  Idempotent for the same pair; `conflict` otherwise.

  resolve @1 (username :Text) -> (error :Error, identityKey :Data);

  publishKeyPackages @2 (keyPackages :List(Data)) -> (error :Error, stored :UInt32);
  # TLS-serialized MLS KeyPackages (RFC 9420) whose leaf signature key is this
  # identity.  A package with the last_resort extension replaces this
  # identity's previous last-resort package.

  fetchKeyPackage @3 (identityKey :Data) -> (error :Error, keyPackage :Data, lastResort :Bool);
  # Hands out one unexpired package of `identityKey`, each exactly once; the
  # last-resort package only when no other is left (it is not consumed).

  keyPackageCount @4 () -> (error :Error, count :UInt32, hasLastResort :Bool);
  # Unexpired one-time packages of this identity still on the server.

  enqueue @5 (recipients :List(Data), messageId :Data, payload :Data,
              tokens :List(Data))
      -> (error :Error, duplicate :Bool, seqs :List(UInt64));
  # Stores `payload` once per recipient (32-byte keys, no repeats).  Atomic:
  # every recipient gets it or none does.  A retried (sender, messageId) is
  # not stored again: `duplicate` is true and `seqs` is empty.  Otherwise
  # `seqs[i]` is the sequence number in recipients[i]'s queue.  Durable when
  # the call returns.  `tokens` (since 2): empty, or one per recipient: the
  # recipient's delivery token (32 bytes) or empty; a message without the
  # recipient's current token counts against its small stranger lane.

  fetch @6 (recipient :Data, fromSeq :UInt64, limit :UInt32)
      -> (error :Error, messages :List(Envelope), incarnation :Data);
  # Messages of the caller's own queue with seq >= fromSeq, ascending.
  # `incarnation` (since 2): the store incarnation, also when `messages` is
  # empty.

  ack @7 (recipient :Data, upToSeq :UInt64, incarnation :Data)
      -> (error :Error, removed :UInt32);
  # Deletes the caller's messages with seq <= upToSeq.  A non-empty
  # `incarnation` (since 2) that is not the store's fails with `conflict` and
  # deletes nothing.

  subscribe @8 (recipient :Data, fromSeq :UInt64, listener :Listener)
      -> (error :Error, subscription :Subscription, incarnation :Data);
  # Pushes every message with seq >= fromSeq to `listener`, first the backlog,
  # then new ones as they are stored, in order and without gaps.  Dropping
  # `subscription` (or the connection) ends it.  `incarnation` (since 2): the
  # store incarnation.

  setDeliveryToken @9 (token :Data) -> (error :Error);
  # Since 2.  Makes `token` (32 bytes) this identity's current delivery
  # token; the one it replaces stays valid as the previous one.  The server
  # keeps only their SHA-256 hashes.

  enqueueBatch @10 (messages :List(Outgoing)) -> (error :Error, results :List(EnqueueResult));
  # Since 3.  Several enqueues in one call: `results[i]` is what
  # `enqueue(messages[i])` would have answered, each message stored (or
  # refused) on its own, in order, and every stored one durable when the
  # call returns.  At most 64 messages and 1024 recipients in all; more is
  # `tooLarge` in `error`, and then nothing is stored.
}

interface Listener {
  # Implemented by the client.  The server waits for each call to return
  # before pushing the next batch (flow control).
  deliver @0 (messages :List(Envelope)) -> ();
}

interface Subscription {
  # Handle of a running subscription; release it to cancel.
}
