-- The PostgreSQL store's schema: the same tables as the embedded store
-- (crates/quicnprotochat-server/src/store/sqlite.rs, migrations 1 to 5),
-- shared by every server node.  Never edit a released migration: add one.

-- Usernames, each bound to one identity key.
CREATE TABLE users (
    username   text PRIMARY KEY,
    identity   bytea NOT NULL UNIQUE,
    created_at bigint NOT NULL
);

-- The key-package directory: one-time packages are handed out once, the
-- last-resort package (one per identity) is kept.
CREATE TABLE key_packages (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    identity    bytea NOT NULL,
    hash_ref    bytea NOT NULL UNIQUE,
    data        bytea NOT NULL,
    last_resort boolean NOT NULL,
    not_after   bigint NOT NULL
);
CREATE INDEX key_packages_by_identity ON key_packages (identity, last_resort, id);
CREATE INDEX key_packages_by_expiry ON key_packages (not_after);

-- Ciphertext, stored once for all its recipients.
CREATE TABLE payloads (
    id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    refs integer NOT NULL,
    data bytea NOT NULL
);

-- Per-recipient queue heads: the next sequence number (incremented under
-- the row's lock, in the inserting transaction: no gaps, no reuse), the
-- depth, and how many queued messages are strangers'.
CREATE TABLE queue_heads (
    recipient bytea PRIMARY KEY,
    next_seq  bigint NOT NULL,
    depth     bigint NOT NULL,
    strangers bigint NOT NULL
);

CREATE TABLE queue (
    recipient   bytea NOT NULL,
    seq         bigint NOT NULL,
    payload_id  bigint NOT NULL,
    message_id  bytea NOT NULL,
    enqueued_at bigint NOT NULL,
    -- a keyed hash of a stranger's sender, while its message is queued
    stranger    bytea,
    PRIMARY KEY (recipient, seq)
);
CREATE INDEX queue_by_stranger ON queue (recipient, stranger) WHERE stranger IS NOT NULL;

-- Idempotency keys: a message id is stored once per sender within the window.
CREATE TABLE dedup (
    key        bytea PRIMARY KEY,
    expires_at bigint NOT NULL
);
CREATE INDEX dedup_by_expiry ON dedup (expires_at);

-- One accepted commit per MLS group epoch.
CREATE TABLE group_epochs (
    group_id          bytea PRIMARY KEY,
    last_commit_epoch bigint NOT NULL
);

-- Hashes of each identity's current and previous delivery token.
CREATE TABLE delivery_tokens (
    identity bytea PRIMARY KEY,
    current  bytea NOT NULL,
    previous bytea
);

CREATE TABLE meta (
    name  text PRIMARY KEY,
    value bigint NOT NULL
);

-- The store's incarnation: a random id made with the database, changed
-- when it is restored from a backup.
CREATE TABLE incarnation (
    row_id integer PRIMARY KEY CHECK (row_id = 1),
    id   bytea NOT NULL CHECK (length(id) = 16)
);
INSERT INTO incarnation (row_id, id)
    VALUES (1, decode(replace(gen_random_uuid()::text, '-', ''), 'hex'));
