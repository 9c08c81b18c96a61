//! The delivery service: authentication, the user and key-package
//! directories, per-recipient queues and push, in Rust types.
//!
//! It knows nothing of Cap'n Proto or QUIC.  The RPC adapter
//! ([`crate::rpc`]) decodes a call's parameters, calls one method here and
//! encodes its result or [`ApiError`]; the connection loop
//! ([`crate::server`]) owns the QUIC side and hands in what it knows of the
//! peer ([`Peer`]: its address, and the TLS exporter at authentication).
//! Every method validates its input before touching the store, so a second
//! transport or a second store is a local change.
//!
//! Everything here runs on the server's `LocalSet` (`Rc`, `Cell`); store
//! work happens on the store's own threads.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use quicnprotochat_core::IdentityKey;
use quicnprotochat_core::clock::SharedClock;
use quicnprotochat_core::mls_header::{self, FrameKind};
use quicnprotochat_proto::limits::{
    DELIVERY_TOKEN_LEN, KEY_LEN, MAX_BATCH_RECIPIENTS, MAX_ENQUEUE_BATCH, MAX_FETCH_BYTES,
    MAX_FETCH_MESSAGES, MAX_KEY_PACKAGE_BYTES, MAX_KEY_PACKAGES_PER_BATCH, MAX_RECIPIENTS,
    MAX_USERNAME_LEN, MESSAGE_ID_LEN, NONCE_LEN, SIGNATURE_LEN,
};
use quicnprotochat_proto::{SOFTWARE_VERSION, WIRE_VERSION, auth};
use ring::rand::SecureRandom;
use tokio::sync::watch;

use crate::config::Limits;
use crate::error::ApiError;
use crate::hub::{Announced, Hub, Pushed};
use crate::metrics::{Metrics, gauge_value};
use crate::ratelimit::Limiters;
use crate::store::{
    EnqueueOutcome, EnqueueRequest, NewKeyPackage, Presented, PublishOutcome, QueueChange,
    QueuedMessage, RegisterOutcome, Store, TakenKeyPackage,
};

/// Minor wire versions this server accepts (the major version is in the ALPN).
const SUPPORTED_WIRE_VERSIONS: std::ops::RangeInclusive<u16> = 1..=WIRE_VERSION;

/// Most live subscriptions on one connection (one per device queue is normal).
const MAX_SUBSCRIPTIONS_PER_CONNECTION: usize = 4;

/// Least time between two reads of the queue gauges from the store.
const GAUGE_READ_INTERVAL: Duration = Duration::from_secs(1);

/// The `kind` label of a failed store operation's metric.
fn store_error_kind(e: &crate::store::StoreError) -> &'static str {
    use crate::store::StoreError;
    if e.is_damage() {
        "damaged"
    } else if matches!(e, StoreError::Unavailable(_) | StoreError::WorkerGone) {
        "unavailable"
    } else {
        "other"
    }
}

/// How long a health probe waits for the store.
const HEALTH_STORE_DEADLINE: Duration = Duration::from_secs(2);

/// The service shared by every connection of one server.
pub(crate) struct Delivery {
    store: Arc<dyn Store>,
    pub(crate) limits: Limits,
    /// SHA-256 of each access token accepted (replaced on reload)
    token_hashes: RefCell<Vec<[u8; 32]>>,
    limiters: Limiters,
    hub: Hub,
    rng: ring::rand::SystemRandom,
    clock: SharedClock,
    /// what is damaged in the database, once anything was found to be
    /// (sticky: damage does not heal; readiness stays false until restart)
    damage: RefCell<Option<String>>,
    /// the last health probe failed (logged once per change)
    probe_failing: Cell<bool>,
    /// the key of the sender tags stored with strangers' messages, made on
    /// first use and never stored: after a restart the tags of queued
    /// messages no longer match anyone (protocol section 9.10)
    sender_tag_key: std::cell::OnceCell<ring::hmac::Key>,
    /// the server's metrics
    pub(crate) metrics: Arc<Metrics>,
    /// when the queue gauges were last read from the store
    gauges_read: Cell<Option<tokio::time::Instant>>,
}

/// What the service knows of one connection: its address, the outstanding
/// challenge, the identity it authenticated as, its live subscriptions.
pub(crate) struct Peer {
    pub(crate) ip: IpAddr,
    nonce: Cell<Option<[u8; NONCE_LEN]>>,
    identity: Cell<Option<IdentityKey>>,
    subscriptions: Cell<usize>,
}

impl Peer {
    pub(crate) fn new(ip: IpAddr) -> Self {
        Self {
            ip,
            nonce: Cell::new(None),
            identity: Cell::new(None),
            subscriptions: Cell::new(0),
        }
    }

    pub(crate) fn is_authenticated(&self) -> bool {
        self.identity.get().is_some()
    }
}

/// A value the transport could not decode is an `invalidArgument`; methods
/// take such values undecoded where the protocol checks something else
/// first (a rate limit, a count), so the checks keep their documented order.
pub(crate) type Decoded<T> = Result<T, ApiError>;

/// `Service.authenticate`'s request.
#[derive(Debug)]
pub(crate) struct AuthRequest<'a> {
    pub(crate) wire_version: u16,
    pub(crate) fields: Decoded<AuthFields<'a>>,
}

/// The fields of an [`AuthRequest`] after its version.
#[derive(Debug)]
pub(crate) struct AuthFields<'a> {
    pub(crate) access_token: &'a [u8],
    pub(crate) identity_key: &'a [u8],
    pub(crate) signature: &'a [u8],
}

/// `Session.enqueue`'s parameters.
#[derive(Debug)]
pub(crate) struct EnqueueCall<'a> {
    pub(crate) recipients: Vec<Decoded<&'a [u8]>>,
    pub(crate) message_id: Decoded<&'a [u8]>,
    pub(crate) payload: Decoded<&'a [u8]>,
    /// empty, or one per recipient (empty: no token)
    pub(crate) tokens: Vec<Decoded<&'a [u8]>>,
}

/// The answer to a health probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Health {
    /// ready to serve
    pub(crate) ok: bool,
    pub(crate) store_reachable: bool,
    pub(crate) server_version: &'static str,
    pub(crate) wire_version: u16,
}

/// A live subscription's registration in the hub; dropping it releases the
/// recipient's buffer (when it was the last) and the connection's slot.
pub(crate) struct Subscription {
    delivery: Rc<Delivery>,
    peer: Rc<Peer>,
    recipient: IdentityKey,
    next: u64,
    rx: watch::Receiver<Announced>,
    /// read the store on the next call, whatever was announced: at the
    /// start, after a wake to resynchronise, and after a read that
    /// returned messages (it may have stopped at its limits)
    read_store: bool,
    /// the resynchronisations seen (`Announced::resyncs`)
    resyncs: u64,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.delivery.metrics.subscriptions.dec();
        self.delivery.hub.release(&self.recipient);
        self.peer
            .subscriptions
            .set(self.peer.subscriptions.get().saturating_sub(1));
    }
}

impl Subscription {
    /// The store incarnation the pushed sequence numbers belong to.
    pub(crate) fn incarnation(&self) -> [u8; 16] {
        self.delivery.incarnation()
    }

    /// The next batch to push, from the position after the last one:
    /// from memory when the hub holds it, else read from the store; empty
    /// when the queue holds nothing new yet.  Marks the current notification
    /// seen *before* reading, so a message committed after the read still
    /// wakes [`Subscription::changed`]: no lost wake-ups.
    ///
    /// When everything announced has been pushed, nothing is read: every
    /// commit to the queue is announced once it is visible (by this node
    /// after its commit, by the store's notifications for other nodes' and
    /// with a resynchronisation when those may have been lost), so the
    /// store holds nothing past the newest announced sequence number that
    /// a read would find.  The store is read until it has nothing more
    /// whenever the hub's buffer lacks the next message.
    pub(crate) async fn next_batch(&mut self) -> Result<Vec<QueuedMessage>, ApiError> {
        let announced = *self.rx.borrow_and_update();
        if announced.resyncs != self.resyncs {
            self.resyncs = announced.resyncs;
            self.read_store = true;
        }
        if !self.read_store && self.next > announced.newest {
            return Ok(Vec::new());
        }
        let buffered = self.delivery.hub.buffered(
            &self.recipient,
            self.next,
            usize::try_from(MAX_FETCH_MESSAGES).unwrap_or(usize::MAX),
            MAX_FETCH_BYTES,
        );
        let batch = match buffered {
            Some(b) => b,
            None => {
                let d = &self.delivery;
                d.metrics.push_store_reads.inc();
                let read = d
                    .store_call(d.store.fetch(
                        self.recipient,
                        self.next,
                        MAX_FETCH_MESSAGES,
                        MAX_FETCH_BYTES,
                    ))
                    .await?;
                self.read_store = !read.is_empty();
                read
            }
        };
        if let Some(last) = batch.last() {
            self.next = last.seq + 1;
        }
        Ok(batch)
    }

    /// Counts `batch` as pushed, and each message's time since its enqueue.
    pub(crate) fn pushed(&self, batch: &[QueuedMessage]) {
        let metrics = &self.delivery.metrics;
        let now_ms = self.delivery.clock.unix_ms();
        metrics.messages_pushed.inc_by(batch.len() as u64);
        for m in batch {
            let lag_ms = now_ms.saturating_sub(m.enqueued_at_ms);
            metrics.push_lag_seconds.observe(lag_ms as f64 / 1000.0);
        }
    }

    /// Waits until the queue may have grown; `false` when the hub is gone.
    pub(crate) async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }
}

fn parse_key(bytes: &[u8], what: &str) -> Result<IdentityKey, ApiError> {
    if bytes.len() != KEY_LEN {
        return Err(ApiError::InvalidArgument(format!(
            "{what} must be {KEY_LEN} bytes, got {}",
            bytes.len()
        )));
    }
    IdentityKey::from_slice(bytes).map_err(|e| ApiError::InvalidArgument(e.to_string()))
}

fn parse_username(name: &str) -> Result<String, ApiError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_USERNAME_LEN
        && name.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || (i > 0 && matches!(b, b'_' | b'.' | b'-'))
        });
    if !valid {
        return Err(ApiError::InvalidArgument(format!(
            "username must be 1-{MAX_USERNAME_LEN} characters of [a-z0-9_.-], starting with [a-z0-9]"
        )));
    }
    Ok(name.to_string())
}

fn check_wire_version(client: u16) -> Result<(), ApiError> {
    if SUPPORTED_WIRE_VERSIONS.contains(&client) {
        Ok(())
    } else {
        Err(ApiError::VersionMismatch { client })
    }
}

/// An enqueue ready for the store.
struct PreparedEnqueue {
    request: EnqueueRequest,
    recipients: Vec<IdentityKey>,
    /// what a push subscription of a recipient gets, if any has one
    pushed: Option<Rc<Pushed>>,
}

/// An enqueue's arguments after validation.
struct Checked<'a> {
    recipients: Vec<IdentityKey>,
    message_id: [u8; MESSAGE_ID_LEN],
    payload: &'a [u8],
    /// SHA-256 of each recipient's presented token, if any
    token_hashes: Vec<Option<[u8; 32]>>,
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

/// SHA-256(sender ‖ message id), from which the store derives the
/// idempotency key.
fn dedup_key(sender: IdentityKey, message_id: &[u8; MESSAGE_ID_LEN]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(sender.as_bytes());
    ctx.update(message_id);
    let mut key = [0; 32];
    key.copy_from_slice(ctx.finish().as_ref());
    key
}

/// (group id, epoch) when `payload` is an MLS commit: the store accepts one
/// per group epoch (protocol 9.8).
fn commit_of(payload: &[u8]) -> Option<(Vec<u8>, u64)> {
    let frame = mls_header::inspect(payload);
    match (frame.kind, frame.group_id, frame.epoch) {
        (FrameKind::Commit, Some(group_id), Some(epoch)) => Some((group_id, epoch)),
        _ => None,
    }
}

/// The store's answer to an enqueue as the caller sees it: stored or a
/// duplicate, or the error that says why nothing was stored.
fn refusal(
    outcome: EnqueueOutcome,
    recipients: &[IdentityKey],
) -> Result<EnqueueOutcome, ApiError> {
    match outcome {
        EnqueueOutcome::Stored { .. } | EnqueueOutcome::Duplicate => Ok(outcome),
        EnqueueOutcome::QueueFull { index, stranger } => {
            // Name the recipient as the caller gave it (its key), not by a
            // position the caller has to count.
            let key = recipients
                .get(index)
                .map(|k| k.to_string())
                .unwrap_or_default();
            Err(ApiError::QueueFull(if stranger {
                format!(
                    "the queue of recipient {key} takes no more messages without its delivery token (from this sender, or from all such senders); nothing was stored"
                )
            } else {
                format!("the queue of recipient {key} is full; nothing was stored")
            }))
        }
        EnqueueOutcome::StaleEpoch { last_commit_epoch } => Err(ApiError::StaleEpoch(format!(
            "a commit for this epoch was already accepted (last accepted commit epoch {last_commit_epoch}); process it and retry"
        ))),
        EnqueueOutcome::UnknownRecipient { .. } => Err(ApiError::NotFound(
            "a recipient is not a registered identity",
        )),
    }
}

/// Only a queue's owner reads or acknowledges it.
fn own_queue(me: IdentityKey, recipient: &[u8]) -> Result<(), ApiError> {
    if parse_key(recipient, "recipient")? != me {
        return Err(ApiError::Forbidden("a queue can only be read by its owner"));
    }
    Ok(())
}

impl Delivery {
    /// The service over `store`, admitting clients that present a token
    /// whose SHA-256 is one of `token_hashes`, telling time by `clock`.
    pub(crate) fn new(
        store: Arc<dyn Store>,
        limits: Limits,
        token_hashes: Vec<[u8; 32]>,
        clock: SharedClock,
        metrics: Arc<Metrics>,
    ) -> Self {
        metrics
            .queue_depth_limit
            .set(gauge_value(limits.queue_depth));
        Self {
            store,
            limiters: Limiters::new(&limits.rates, &clock, &metrics),
            limits,
            token_hashes: RefCell::new(token_hashes),
            hub: Hub::default(),
            rng: ring::rand::SystemRandom::new(),
            clock,
            damage: RefCell::new(None),
            probe_failing: Cell::new(false),
            sender_tag_key: std::cell::OnceCell::new(),
            metrics,
            gauges_read: Cell::new(None),
        }
    }

    /// Accepts the tokens hashed in `token_hashes` from now on.
    pub(crate) fn set_token_hashes(&self, token_hashes: Vec<[u8; 32]>) {
        *self.token_hashes.borrow_mut() = token_hashes;
    }

    /// The sender tag stored with a stranger's message: the first 16
    /// bytes of HMAC-SHA256 of the sender under a key that lives only in
    /// this process.
    fn sender_tag(&self, sender: IdentityKey) -> Result<[u8; 16], ApiError> {
        let key = match self.sender_tag_key.get() {
            Some(k) => k,
            None => {
                let k = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &self.rng)
                    .map_err(|_| ApiError::Internal("system RNG failed".into()))?;
                self.sender_tag_key.get_or_init(|| k)
            }
        };
        let mut tag = [0; 16];
        tag.copy_from_slice(&ring::hmac::sign(key, sender.as_bytes()).as_ref()[..16]);
        Ok(tag)
    }

    /// `Session.setDeliveryToken`: `token` becomes the caller's current
    /// delivery token (the server keeps its hash only).
    pub(crate) async fn set_delivery_token(
        &self,
        me: IdentityKey,
        token: Decoded<&[u8]>,
    ) -> Result<(), ApiError> {
        let token = token?;
        if token.len() != DELIVERY_TOKEN_LEN {
            return Err(ApiError::InvalidArgument(format!(
                "a delivery token must be {DELIVERY_TOKEN_LEN} bytes, got {}",
                token.len()
            )));
        }
        self.store_call(self.store.set_delivery_token(me, sha256(token)))
            .await
    }

    /// Records that the database is damaged; logs it the first time only.
    fn note_damage(&self, detail: String) {
        if self.damage.borrow().is_some() {
            return;
        }
        tracing::error!(
            %detail,
            "the database is damaged: this server reports not ready; restore the database from a backup (operations guide, \"A damaged database\")"
        );
        *self.damage.borrow_mut() = Some(detail);
    }

    /// Wakes live subscriptions for what other nodes commit to their
    /// queues, until the store stops announcing (runs for the server's life
    /// on a shared store; returns at once on the embedded one).
    pub(crate) async fn follow_changes(&self) {
        let Some(mut changes) = self.store.changes() else {
            return;
        };
        while let Some(change) = changes.recv().await {
            match change {
                QueueChange::Committed { recipient, seq } => {
                    self.hub.notify(&recipient, seq, None);
                }
                QueueChange::Resync => self.hub.wake_all(),
            }
        }
    }

    /// Checks every page of the store (at start-up, in the background):
    /// damage found makes the server not ready.
    pub(crate) async fn check_integrity(&self) {
        match self.store.integrity_check().await {
            Ok(None) => tracing::debug!("store integrity check passed"),
            Ok(Some(detail)) => self.note_damage(detail),
            Err(e) if e.is_damage() => self.note_damage(e.to_string()),
            Err(e) => tracing::warn!(error = %e, "the store integrity check could not run"),
        }
    }

    /// The store's incarnation (protocol section 9.9): returned with every
    /// sequence number a client reads.
    pub(crate) fn incarnation(&self) -> [u8; 16] {
        self.store.incarnation()
    }

    fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.limits.request_timeout_secs)
    }

    /// Runs a store operation under the request deadline.
    pub(crate) async fn store_call<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, crate::store::StoreError>>,
    ) -> Result<T, ApiError> {
        match tokio::time::timeout(self.request_timeout(), fut).await {
            Ok(result) => self.store_result(result),
            Err(_) => {
                self.metrics.store_error("timeout");
                Err(ApiError::Internal("store operation timed out".into()))
            }
        }
    }

    /// A store operation's result as the caller sees it; a failure is
    /// counted, and damage noted.
    fn store_result<T>(&self, result: Result<T, crate::store::StoreError>) -> Result<T, ApiError> {
        result.map_err(|e| {
            self.metrics.store_error(store_error_kind(&e));
            if e.is_damage() {
                self.note_damage(e.to_string());
            }
            e.into()
        })
    }

    /// Probes the store's health (the `ready` gauge) and reads the queue
    /// gauges from it, at most once a second (a scrape calls it; the query
    /// counts every queued message).  A failed read keeps the last values
    /// and counts a store error.
    pub(crate) async fn refresh_gauges(&self) {
        let now = tokio::time::Instant::now();
        if self
            .gauges_read
            .get()
            .is_some_and(|at| now.duration_since(at) < GAUGE_READ_INTERVAL)
        {
            return;
        }
        self.gauges_read.set(Some(now));
        self.health().await;
        if let Ok(depth) = self.store_call(self.store.queue_depth()).await {
            self.metrics
                .queued_messages
                .set(gauge_value(depth.messages));
            self.metrics.largest_queue.set(gauge_value(depth.largest));
        }
    }

    /// `Service.health`: needs no authentication.  Ready means the store
    /// took a write and a read within the deadline and nothing in it was
    /// found damaged; a change of the probe's outcome is logged once.
    pub(crate) async fn health(&self) -> Health {
        let probe = match tokio::time::timeout(HEALTH_STORE_DEADLINE, self.store.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.metrics.store_error(store_error_kind(&e));
                if e.is_damage() {
                    self.note_damage(e.to_string());
                }
                Err(e.to_string())
            }
            Err(_) => Err({
                self.metrics.store_error("timeout");
                format!("no answer within {} s", HEALTH_STORE_DEADLINE.as_secs())
            }),
        };
        match (&probe, self.probe_failing.get()) {
            (Err(reason), false) => tracing::warn!(
                %reason,
                "health: the store does not take a write and a read; this server reports not ready"
            ),
            (Ok(()), true) => tracing::info!("health: the store takes writes and reads again"),
            _ => {}
        }
        self.probe_failing.set(probe.is_err());
        let store_reachable = probe.is_ok();
        let ok = store_reachable && self.damage.borrow().is_none();
        self.metrics.ready.set(i64::from(ok));
        Health {
            ok,
            store_reachable,
            server_version: SOFTWARE_VERSION,
            wire_version: WIRE_VERSION,
        }
    }

    /// `Service.challenge`: a fresh single-use nonce for this peer.
    pub(crate) fn challenge(
        &self,
        peer: &Peer,
        wire_version: impl FnOnce() -> Decoded<u16>,
    ) -> Result<[u8; NONCE_LEN], ApiError> {
        self.limiters.auth_per_ip.check(&peer.ip)?;
        check_wire_version(wire_version()?)?;
        let mut nonce = [0; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| ApiError::Internal("system RNG failed".into()))?;
        peer.nonce.set(Some(nonce));
        Ok(nonce)
    }

    /// `Service.authenticate`.  `exporter` is the connection's TLS exporter
    /// value (protocol section 5.2), asked for only once the request passed
    /// every cheaper check.
    pub(crate) fn authenticate<'a>(
        &self,
        peer: &Peer,
        req: impl FnOnce() -> Decoded<AuthRequest<'a>>,
        exporter: impl FnOnce() -> Option<[u8; auth::EXPORTER_LEN]>,
    ) -> Result<IdentityKey, ApiError> {
        // The nonce is single-use: every outcome consumes it but a rate-limit
        // refusal, which verified nothing (so a client that waits
        // `retryAfterMs` and calls again gets in; protocol 5.4).
        let nonce = peer.nonce.take();
        let outcome = self.authenticate_with(peer, nonce, req, exporter);
        if let (Err(ApiError::RateLimited { .. }), Some(_)) = (&outcome, nonce) {
            peer.nonce.set(nonce);
        }
        outcome
    }

    fn authenticate_with<'a>(
        &self,
        peer: &Peer,
        nonce: Option<[u8; NONCE_LEN]>,
        req: impl FnOnce() -> Decoded<AuthRequest<'a>>,
        exporter: impl FnOnce() -> Option<[u8; auth::EXPORTER_LEN]>,
    ) -> Result<IdentityKey, ApiError> {
        if peer.is_authenticated() {
            return Err(ApiError::Forbidden(
                "this connection is already authenticated",
            ));
        }
        // An attempt costs one `auth_per_ip` token, paid by its challenge:
        // a nonce allows one verification.  Without one, nothing is
        // verified, but the call still costs a token.
        if nonce.is_none() {
            self.limiters.auth_per_ip.check(&peer.ip)?;
        }
        let req = req()?;
        check_wire_version(req.wire_version)?;
        let nonce = nonce.ok_or(ApiError::Unauthenticated("no challenge outstanding"))?;
        let req = req.fields?;
        if req.identity_key.len() != KEY_LEN {
            return Err(ApiError::InvalidArgument(format!(
                "identityKey must be {KEY_LEN} bytes"
            )));
        }
        if req.signature.len() != SIGNATURE_LEN {
            return Err(ApiError::InvalidArgument(format!(
                "signature must be {SIGNATURE_LEN} bytes"
            )));
        }
        let identity = IdentityKey::from_slice(req.identity_key)
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        // A weak key (small order, non-canonical) has no private key behind
        // it; plain Ed25519 would let a crafted signature pass under it.
        identity
            .check()
            .map_err(|e| ApiError::InvalidArgument(format!("identityKey: {e}")))?;
        self.limiters.auth_per_identity.check(&identity)?;
        // Constant time, and length-independent: compare SHA-256 digests.
        // Every accepted token is compared, whichever matches.
        let presented = ring::digest::digest(&ring::digest::SHA256, req.access_token);
        let token_ok: bool = self
            .token_hashes
            .borrow()
            .iter()
            .fold(subtle::Choice::from(0), |ok, h| {
                ok | subtle::ConstantTimeEq::ct_eq(presented.as_ref(), &h[..])
            })
            .into();
        let exporter =
            exporter().ok_or_else(|| ApiError::Internal("TLS exporter unavailable".into()))?;
        let transcript = auth::transcript(&nonce, &exporter, identity.as_bytes());
        let proof_ok = identity.verify(&transcript, req.signature).is_ok();
        if !(token_ok && proof_ok) {
            tracing::info!(ip = %peer.ip, token_ok, proof_ok, "authentication failed");
            return Err(ApiError::Unauthenticated(
                "invalid access token or identity proof",
            ));
        }
        peer.identity.set(Some(identity));
        tracing::debug!(ip = %peer.ip, identity = ?identity, "authenticated");
        Ok(identity)
    }

    /// `Session.register`.
    pub(crate) async fn register(&self, me: IdentityKey, username: &str) -> Result<(), ApiError> {
        let username = parse_username(username)?;
        match self.store_call(self.store.register(username, me)).await? {
            RegisterOutcome::Registered | RegisterOutcome::AlreadyRegistered => Ok(()),
            RegisterOutcome::UsernameTaken => Err(ApiError::Conflict("username is taken")),
            RegisterOutcome::IdentityTaken => Err(ApiError::Conflict(
                "identity is registered under another username",
            )),
        }
    }

    /// `Session.resolve`.
    pub(crate) async fn resolve(&self, username: &str) -> Result<IdentityKey, ApiError> {
        let username = parse_username(username)?;
        self.store_call(self.store.resolve(username))
            .await?
            .ok_or(ApiError::NotFound("no such username"))
    }

    /// `Session.publishKeyPackages`: validates the whole batch, then stores
    /// it atomically.
    pub(crate) async fn publish_key_packages(
        &self,
        me: IdentityKey,
        list: Vec<Decoded<&[u8]>>,
    ) -> Result<u32, ApiError> {
        if list.is_empty() {
            return Err(ApiError::InvalidArgument("no key packages given".into()));
        }
        if list.len() > MAX_KEY_PACKAGES_PER_BATCH {
            return Err(ApiError::TooLarge(format!(
                "at most {MAX_KEY_PACKAGES_PER_BATCH} key packages per call"
            )));
        }
        let mut raw = Vec::with_capacity(list.len());
        for kp in list {
            let kp = kp?;
            if kp.len() > MAX_KEY_PACKAGE_BYTES {
                return Err(ApiError::TooLarge(format!(
                    "a key package is at most {MAX_KEY_PACKAGE_BYTES} bytes"
                )));
            }
            raw.push(kp.to_vec());
        }
        // Signature checks are the costly part: keep them off the RPC thread.
        let inspected = tokio::task::spawn_blocking(move || {
            raw.into_iter()
                .map(|data| {
                    quicnprotochat_core::keypackage::inspect(&data).map(|info| (data, info))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| ApiError::Internal(format!("validation task failed: {e}")))?
        .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        let mut packages = Vec::with_capacity(inspected.len());
        let mut last_resort = 0;
        for (data, info) in inspected {
            if info.identity != me {
                return Err(ApiError::Forbidden(
                    "key packages must carry the caller's identity key",
                ));
            }
            last_resort += usize::from(info.last_resort);
            packages.push(NewKeyPackage {
                data,
                hash_ref: info.hash_ref,
                last_resort: info.last_resort,
                not_after: info.not_after,
            });
        }
        if last_resort > 1 {
            return Err(ApiError::InvalidArgument(
                "at most one last-resort key package per call".into(),
            ));
        }
        let max = self.limits.max_key_packages_per_identity;
        match self
            .store_call(self.store.publish_key_packages(me, packages, max))
            .await?
        {
            PublishOutcome::Stored(n) => Ok(n),
            PublishOutcome::OverCap { .. } => Err(ApiError::TooLarge(format!(
                "at most {max} key packages per identity may be stored"
            ))),
        }
    }

    /// `Session.fetchKeyPackage`: claims one package of `target`.
    pub(crate) async fn fetch_key_package<'a>(
        &self,
        me: IdentityKey,
        peer: &Peer,
        target: impl FnOnce() -> Decoded<&'a [u8]>,
    ) -> Result<TakenKeyPackage, ApiError> {
        self.limiters.kp_fetch_per_identity.check(&me)?;
        self.limiters.kp_fetch_per_ip.check(&peer.ip)?;
        let target = parse_key(target()?, "identityKey")?;
        let now = self.clock.unix_secs();
        let taken = self
            .store_call(self.store.take_key_package(target, now))
            .await?
            .ok_or(ApiError::NotFound(
                "no key package available for this identity",
            ))?;
        self.metrics.key_packages_served.inc();
        if taken.last_resort {
            self.metrics.key_packages_last_resort.inc();
        }
        Ok(taken)
    }

    /// `Session.keyPackageCount`: (one-time packages, has a last-resort one).
    pub(crate) async fn key_package_count(&self, me: IdentityKey) -> Result<(u32, bool), ApiError> {
        let now = self.clock.unix_secs();
        self.store_call(self.store.key_package_count(me, now)).await
    }

    /// `Session.enqueue`: stores one payload for every recipient, or nothing.
    pub(crate) async fn enqueue<'a>(
        &self,
        me: IdentityKey,
        peer: &Peer,
        call: impl FnOnce() -> Decoded<EnqueueCall<'a>>,
    ) -> Result<EnqueueOutcome, ApiError> {
        self.limiters.enqueue_per_identity.check(&me)?;
        self.limiters.enqueue_per_ip.check(&peer.ip)?;
        let prepared = self.prepare_enqueue(me, call()?)?;
        let outcome = self
            .store_call(self.store.enqueue(prepared.request.clone()))
            .await;
        self.enqueued(prepared, outcome)
    }

    /// `Session.enqueueBatch`: each message as `enqueue` would store it,
    /// committed together; one outcome per message, in order.  The call
    /// fails as a whole only when it is malformed or above the batch caps
    /// (then nothing is stored).
    pub(crate) async fn enqueue_batch<'a>(
        &self,
        me: IdentityKey,
        peer: &Peer,
        call: impl FnOnce() -> Decoded<Vec<Decoded<EnqueueCall<'a>>>>,
    ) -> Result<Vec<Result<EnqueueOutcome, ApiError>>, ApiError> {
        let messages = call()?;
        if messages.is_empty() {
            return Err(ApiError::InvalidArgument("no messages".into()));
        }
        if messages.len() > MAX_ENQUEUE_BATCH {
            return Err(ApiError::TooLarge(format!(
                "at most {MAX_ENQUEUE_BATCH} messages in one batch"
            )));
        }
        let recipients: usize = messages
            .iter()
            .map(|m| m.as_ref().map_or(0, |m| m.recipients.len()))
            .sum();
        if recipients > MAX_BATCH_RECIPIENTS {
            return Err(ApiError::TooLarge(format!(
                "at most {MAX_BATCH_RECIPIENTS} recipients over a batch's messages"
            )));
        }
        // Each message is checked (rate limits first, as for `enqueue`)
        // and refused on its own; the rest go to the store together.
        let mut outcomes: Vec<Option<Result<EnqueueOutcome, ApiError>>> =
            Vec::with_capacity(messages.len());
        let mut prepared = Vec::with_capacity(messages.len());
        for message in messages {
            let checked = self
                .limiters
                .enqueue_per_identity
                .check(&me)
                .and_then(|()| self.limiters.enqueue_per_ip.check(&peer.ip))
                .and_then(|()| self.prepare_enqueue(me, message?));
            match checked {
                Ok(p) => {
                    outcomes.push(None);
                    prepared.push(p);
                }
                Err(e) => outcomes.push(Some(Err(e))),
            }
        }
        let requests = prepared.iter().map(|p| p.request.clone()).collect();
        let stored: Vec<Result<EnqueueOutcome, ApiError>> =
            match self.store_call(self.store.enqueue_batch(requests)).await {
                Ok(stored) if stored.len() == prepared.len() => {
                    stored.into_iter().map(|r| self.store_result(r)).collect()
                }
                Ok(_) => {
                    let lost = || Err(ApiError::Internal("the store lost a batch's answer".into()));
                    prepared.iter().map(|_| lost()).collect()
                }
                Err(e) => prepared.iter().map(|_| Err(e.clone())).collect(),
            };
        let mut stored = prepared
            .into_iter()
            .zip(stored)
            .map(|(p, outcome)| self.enqueued(p, outcome));
        Ok(outcomes
            .into_iter()
            .map(|o| match o {
                Some(refused) => refused,
                None => stored.next().unwrap_or_else(|| {
                    Err(ApiError::Internal("the store lost a batch's answer".into()))
                }),
            })
            .collect())
    }

    /// Validates one enqueue and builds its store request.
    fn prepare_enqueue(
        &self,
        me: IdentityKey,
        call: EnqueueCall<'_>,
    ) -> Result<PreparedEnqueue, ApiError> {
        let Checked {
            recipients,
            message_id,
            payload,
            token_hashes,
        } = self.check_enqueue(call)?;
        let presented = recipients
            .iter()
            .zip(&token_hashes)
            .map(|(r, t)| match t {
                _ if *r == me => Presented::Own,
                Some(h) => Presented::Token(*h),
                None => Presented::Nothing,
            })
            .collect();
        let request = EnqueueRequest {
            recipients: recipients.clone(),
            message_id,
            dedup_key: dedup_key(me, &message_id),
            payload: payload.to_vec(),
            now_ms: self.clock.unix_ms(),
            max_depth: self.limits.queue_depth,
            dedup_window_ms: self.limits.dedup_window_secs.saturating_mul(1000),
            commit: commit_of(payload),
            presented,
            sender_tag: self.sender_tag(me)?,
            stranger_depth: self.limits.stranger_queue_depth,
            stranger_per_sender: self.limits.stranger_messages_per_sender,
        };
        // Kept for push subscriptions only if a recipient has one.
        let pushed = self.hub.any_subscribed(&recipients).then(|| {
            Rc::new(Pushed {
                message_id,
                payload: Rc::from(payload),
                enqueued_at_ms: request.now_ms,
            })
        });
        Ok(PreparedEnqueue {
            request,
            recipients,
            pushed,
        })
    }

    /// Counts a stored enqueue and wakes its recipients' subscriptions;
    /// turns a refusal into the caller's error.
    fn enqueued(
        &self,
        prepared: PreparedEnqueue,
        outcome: Result<EnqueueOutcome, ApiError>,
    ) -> Result<EnqueueOutcome, ApiError> {
        let outcome = outcome?;
        match &outcome {
            EnqueueOutcome::Stored { seqs } => {
                self.metrics.messages_enqueued.inc_by(seqs.len() as u64);
                for (r, seq) in prepared.recipients.iter().zip(seqs) {
                    self.hub.notify(r, *seq, prepared.pushed.as_ref());
                }
            }
            EnqueueOutcome::Duplicate => {
                self.metrics.enqueue_duplicates.inc();
            }
            _ => {}
        }
        refusal(outcome, &prepared.recipients)
    }

    /// Validates an enqueue's arguments, in the documented order.
    fn check_enqueue<'a>(&self, call: EnqueueCall<'a>) -> Result<Checked<'a>, ApiError> {
        if call.recipients.is_empty() {
            return Err(ApiError::InvalidArgument("no recipients".into()));
        }
        if call.recipients.len() > MAX_RECIPIENTS {
            return Err(ApiError::TooLarge(format!(
                "at most {MAX_RECIPIENTS} recipients"
            )));
        }
        let mut recipients = Vec::with_capacity(call.recipients.len());
        let mut seen = HashSet::with_capacity(call.recipients.len());
        for r in call.recipients {
            let key = parse_key(r?, "recipient key")?;
            if !seen.insert(key) {
                return Err(ApiError::InvalidArgument(
                    "a recipient is listed twice".into(),
                ));
            }
            recipients.push(key);
        }
        let message_id: [u8; MESSAGE_ID_LEN] = call.message_id?.try_into().map_err(|_| {
            ApiError::InvalidArgument(format!("messageId must be {MESSAGE_ID_LEN} bytes"))
        })?;
        let payload = call.payload?;
        if payload.is_empty() {
            return Err(ApiError::InvalidArgument("empty payload".into()));
        }
        if payload.len() > self.limits.max_payload_bytes {
            return Err(ApiError::TooLarge(format!(
                "payload is at most {} bytes",
                self.limits.max_payload_bytes
            )));
        }
        if !call.tokens.is_empty() && call.tokens.len() != recipients.len() {
            return Err(ApiError::InvalidArgument(
                "tokens must be empty or one per recipient".into(),
            ));
        }
        let mut token_hashes = Vec::with_capacity(recipients.len());
        for t in call.tokens {
            token_hashes.push(match t? {
                [] => None,
                t if t.len() == DELIVERY_TOKEN_LEN => Some(sha256(t)),
                t => {
                    return Err(ApiError::InvalidArgument(format!(
                        "a delivery token must be empty or {DELIVERY_TOKEN_LEN} bytes, got {}",
                        t.len()
                    )));
                }
            });
        }
        token_hashes.resize(recipients.len(), None);
        Ok(Checked {
            recipients,
            message_id,
            payload,
            token_hashes,
        })
    }

    /// `Session.fetch`: up to `limit` (0: the maximum) messages of the
    /// caller's own queue from `from_seq` on.
    pub(crate) async fn fetch(
        &self,
        me: IdentityKey,
        recipient: &[u8],
        from_seq: u64,
        limit: u32,
    ) -> Result<Vec<QueuedMessage>, ApiError> {
        own_queue(me, recipient)?;
        let limit = match limit {
            0 => MAX_FETCH_MESSAGES,
            n => n.min(MAX_FETCH_MESSAGES),
        };
        let msgs = self
            .store_call(self.store.fetch(me, from_seq, limit, MAX_FETCH_BYTES))
            .await?;
        self.metrics.messages_fetched.inc_by(msgs.len() as u64);
        Ok(msgs)
    }

    /// `Session.ack`: deletes the caller's messages up to `up_to`, if
    /// `incarnation` is empty (a client of minor version 1) or the store's:
    /// a sequence number read before a restore must not delete what came
    /// after it.
    pub(crate) async fn ack(
        &self,
        me: IdentityKey,
        recipient: &[u8],
        up_to: u64,
        incarnation: &[u8],
    ) -> Result<u32, ApiError> {
        own_queue(me, recipient)?;
        if !incarnation.is_empty() && incarnation != self.incarnation() {
            return Err(ApiError::Conflict(
                "the store was restored from a backup since these sequence numbers were read (its incarnation changed); nothing was deleted: read the queue from its start",
            ));
        }
        let n = self.store_call(self.store.ack(me, up_to)).await?;
        self.metrics.messages_acknowledged.inc_by(u64::from(n));
        self.hub.acked(&me, up_to);
        Ok(n)
    }

    /// `Session.subscribe`: registers a push subscription of the caller's
    /// own queue from `from_seq` on (at least 1), to push to `listener`.
    pub(crate) fn subscribe<L>(
        self: &Rc<Self>,
        me: IdentityKey,
        peer: &Rc<Peer>,
        recipient: &[u8],
        from_seq: u64,
        listener: Decoded<L>,
    ) -> Result<(Subscription, L), ApiError> {
        own_queue(me, recipient)?;
        let listener = listener?;
        if peer.subscriptions.get() >= MAX_SUBSCRIPTIONS_PER_CONNECTION {
            return Err(ApiError::TooLarge(format!(
                "at most {MAX_SUBSCRIPTIONS_PER_CONNECTION} subscriptions per connection"
            )));
        }
        peer.subscriptions.set(peer.subscriptions.get() + 1);
        self.metrics.subscriptions.inc();
        let rx = self.hub.watch(me);
        let resyncs = rx.borrow().resyncs;
        let sub = Subscription {
            rx,
            delivery: self.clone(),
            peer: peer.clone(),
            recipient: me,
            next: from_seq.max(1),
            read_store: true,
            resyncs,
        };
        Ok((sub, listener))
    }

    /// The periodic sweep: forgets idle rate-limit buckets, deletes what
    /// has expired.
    pub(crate) async fn sweep(&self) {
        self.limiters.retain_recent();
        let now_s = self.clock.unix_secs();
        match self.store.sweep(now_s, now_s.saturating_mul(1000)).await {
            Ok(stats) if stats != Default::default() => {
                tracing::info!(?stats, "swept expired entries")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "sweep failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use quicnprotochat_core::Identity;

    use super::*;
    use crate::store::sqlite::{DbKey, SqliteOptions, SqliteStore};

    const TOKEN: &[u8] = b"unit-test-token";
    const EXPORTER: [u8; auth::EXPORTER_LEN] = [9; auth::EXPORTER_LEN];

    fn service(dir: &Path, limits: Limits) -> Rc<Delivery> {
        let store = SqliteStore::open(SqliteOptions::new(
            dir.join("store.db"),
            DbKey::Raw([7; 32]),
        ))
        .unwrap();
        Rc::new(Delivery::new(
            Arc::new(store),
            limits,
            vec![
                ring::digest::digest(&ring::digest::SHA256, TOKEN)
                    .as_ref()
                    .try_into()
                    .unwrap(),
            ],
            quicnprotochat_core::clock::system(),
            Arc::new(Metrics::new("sqlite", Default::default())),
        ))
    }

    fn auth_request<'a>(key: &'a IdentityKey, signature: &'a [u8]) -> AuthRequest<'a> {
        AuthRequest {
            wire_version: WIRE_VERSION,
            fields: Ok(AuthFields {
                access_token: TOKEN,
                identity_key: key.as_bytes(),
                signature,
            }),
        }
    }

    /// Challenge and authenticate `id` on `peer`, as the adapter would.
    fn login(d: &Delivery, peer: &Peer, id: &Identity) -> Result<IdentityKey, ApiError> {
        let nonce = d.challenge(peer, || Ok(WIRE_VERSION))?;
        let key = id.public_key();
        let sig = id
            .sign(&auth::transcript(&nonce, &EXPORTER, key.as_bytes()))
            .unwrap();
        d.authenticate(peer, || Ok(auth_request(&key, &sig)), || Some(EXPORTER))
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[tokio::test]
    async fn a_message_goes_from_enqueue_to_fetch_to_ack_without_a_network() {
        let dir = tempfile::tempdir().unwrap();
        let d = service(dir.path(), Limits::default());
        let (alice_peer, bob_peer) = (Peer::new(ip(1)), Peer::new(ip(2)));
        let alice = login(&d, &alice_peer, &Identity::generate().unwrap()).unwrap();
        let bob = login(&d, &bob_peer, &Identity::generate().unwrap()).unwrap();
        assert!(alice_peer.is_authenticated() && bob_peer.is_authenticated());
        d.register(alice, "alice").await.unwrap();
        d.register(bob, "bob").await.unwrap();
        assert_eq!(d.resolve("bob").await.unwrap(), bob);

        let id = [1u8; MESSAGE_ID_LEN];
        let call = || {
            Ok(EnqueueCall {
                recipients: vec![Ok(&bob.as_bytes()[..])],
                message_id: Ok(&id[..]),
                payload: Ok(&b"ciphertext"[..]),
                tokens: Vec::new(),
            })
        };
        let stored = d.enqueue(alice, &alice_peer, call).await.unwrap();
        assert_eq!(stored, EnqueueOutcome::Stored { seqs: vec![1] });
        // A retry with the same message id is stored once.
        assert_eq!(
            d.enqueue(alice, &alice_peer, call).await.unwrap(),
            EnqueueOutcome::Duplicate
        );

        // Only the owner reads a queue.
        assert!(matches!(
            d.fetch(alice, bob.as_bytes(), 1, 0).await,
            Err(ApiError::Forbidden(_))
        ));
        let got = d.fetch(bob, bob.as_bytes(), 1, 0).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].payload, b"ciphertext");
        assert_eq!(got[0].message_id, id);
        // An ack for another store incarnation (numbers read before a
        // restore) deletes nothing.
        let incarnation = d.incarnation();
        assert_eq!(got[0].seq, 1);
        assert!(matches!(
            d.ack(bob, bob.as_bytes(), 1, &[0xee; 16]).await,
            Err(ApiError::Conflict(_))
        ));
        assert_eq!(d.fetch(bob, bob.as_bytes(), 1, 0).await.unwrap().len(), 1);
        assert_eq!(
            d.ack(bob, bob.as_bytes(), got[0].seq, &incarnation)
                .await
                .unwrap(),
            1
        );
        assert!(d.fetch(bob, bob.as_bytes(), 1, 0).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn checks_keep_their_documented_order_before_decoding() {
        let dir = tempfile::tempdir().unwrap();
        let mut limits = Limits::default();
        limits.rates.enqueue_per_identity.burst = 1;
        limits.rates.enqueue_per_identity.per_second = 1;
        let d = service(dir.path(), limits);
        let peer = Peer::new(ip(1));
        let me = login(&d, &peer, &Identity::generate().unwrap()).unwrap();
        let malformed = || Err(ApiError::InvalidArgument("malformed request".into()));
        // The first call passes the rate limit and fails to decode ...
        assert!(matches!(
            d.enqueue(me, &peer, malformed).await,
            Err(ApiError::InvalidArgument(_))
        ));
        // ... the second is refused by the limit before it is decoded.
        assert!(matches!(
            d.enqueue(me, &peer, malformed).await,
            Err(ApiError::RateLimited { .. })
        ));
        // authenticate: a second attempt on an authenticated peer is
        // forbidden before anything else is looked at.
        assert!(matches!(
            d.authenticate(
                &peer,
                || Err(ApiError::InvalidArgument("malformed request".into())),
                || None
            ),
            Err(ApiError::Forbidden(_))
        ));
    }

    #[tokio::test]
    async fn a_weak_identity_key_or_a_wrong_exporter_never_authenticates() {
        let dir = tempfile::tempdir().unwrap();
        let d = service(dir.path(), Limits::default());
        let peer = Peer::new(ip(1));
        // The neutral point, with R = neutral point and S = 0.
        let mut weak = [0u8; 32];
        weak[0] = 1;
        let weak = IdentityKey(weak);
        let mut sig = [0u8; 64];
        sig[0] = 1;
        d.challenge(&peer, || Ok(WIRE_VERSION)).unwrap();
        assert!(matches!(
            d.authenticate(&peer, || Ok(auth_request(&weak, &sig)), || Some(EXPORTER)),
            Err(ApiError::InvalidArgument(_))
        ));
        // A proof made for another connection's exporter fails.
        let id = Identity::generate().unwrap();
        let key = id.public_key();
        let nonce = d.challenge(&peer, || Ok(WIRE_VERSION)).unwrap();
        let sig = id
            .sign(&auth::transcript(
                &nonce,
                &[8; auth::EXPORTER_LEN],
                key.as_bytes(),
            ))
            .unwrap();
        assert!(matches!(
            d.authenticate(&peer, || Ok(auth_request(&key, &sig)), || Some(EXPORTER)),
            Err(ApiError::Unauthenticated(_))
        ));
        assert!(!peer.is_authenticated());
    }
}
