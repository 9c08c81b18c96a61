//! The RPC surface: `Service` (bootstrap) and `Session` (after
//! authentication), and push subscriptions.
//!
//! Capabilities here are `Rc`-based (Cap'n Proto RPC is single-threaded); they
//! run on the server's `LocalSet`.  Store work happens on the store's own
//! threads.  Every method validates its input before touching the store and
//! answers failures through [`ApiError::write`].

use std::cell::Cell;
use std::collections::HashSet;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quicnprotochat_core::IdentityKey;
use quicnprotochat_proto::capnp;
use quicnprotochat_proto::limits::{
    KEY_LEN, MAX_FETCH_BYTES, MAX_FETCH_MESSAGES, MAX_KEY_PACKAGE_BYTES,
    MAX_KEY_PACKAGES_PER_BATCH, MAX_RECIPIENTS, MAX_USERNAME_LEN, MESSAGE_ID_LEN, NONCE_LEN,
    SIGNATURE_LEN,
};
use quicnprotochat_proto::schema::{envelope, listener, service, session, subscription};
use quicnprotochat_proto::{SOFTWARE_VERSION, WIRE_VERSION, auth};
use ring::rand::SecureRandom;
use tokio::sync::{oneshot, watch};

use crate::config::Limits;
use crate::error::ApiError;
use crate::hub::{Hub, Pushed};
use crate::ratelimit::Limiters;
use crate::store::{
    EnqueueOutcome, EnqueueRequest, NewKeyPackage, PublishOutcome, QueuedMessage, RegisterOutcome,
    Store,
};

/// Minor wire versions this server accepts (the major version is in the ALPN).
const SUPPORTED_WIRE_VERSIONS: std::ops::RangeInclusive<u16> = 1..=WIRE_VERSION;

/// Most live subscriptions on one connection (one per device queue is normal).
const MAX_SUBSCRIPTIONS_PER_CONNECTION: usize = 4;

/// State shared by every connection of one server.
pub(crate) struct Shared {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) limits: Limits,
    pub(crate) token_hash: [u8; 32],
    pub(crate) limiters: Limiters,
    pub(crate) hub: Hub,
    pub(crate) rng: ring::rand::SystemRandom,
}

impl Shared {
    fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.limits.request_timeout_secs)
    }

    /// Runs a store operation under the request deadline.
    async fn store_call<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, crate::store::StoreError>>,
    ) -> Result<T, ApiError> {
        match tokio::time::timeout(self.request_timeout(), fut).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(ApiError::Internal("store operation timed out".into())),
        }
    }
}

/// Per-connection state.
pub(crate) struct ConnCtx {
    pub(crate) shared: Rc<Shared>,
    pub(crate) conn: quinn::Connection,
    pub(crate) ip: IpAddr,
    nonce: Cell<Option<[u8; NONCE_LEN]>>,
    identity: Cell<Option<IdentityKey>>,
    subscriptions: Cell<usize>,
}

impl ConnCtx {
    pub(crate) fn new(shared: Rc<Shared>, conn: quinn::Connection) -> Self {
        let ip = conn.remote_address().ip();
        Self {
            shared,
            conn,
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

/// The bootstrap capability.
pub(crate) struct ServiceImpl {
    pub(crate) ctx: Rc<ConnCtx>,
}

impl ServiceImpl {
    fn challenge_impl(
        &self,
        params: service::ChallengeParams,
    ) -> Result<[u8; NONCE_LEN], ApiError> {
        self.ctx.shared.limiters.auth_per_ip.check(&self.ctx.ip)?;
        let client = params.get()?.get_wire_version();
        if !SUPPORTED_WIRE_VERSIONS.contains(&client) {
            return Err(ApiError::VersionMismatch { client });
        }
        let mut nonce = [0; NONCE_LEN];
        self.ctx
            .shared
            .rng
            .fill(&mut nonce)
            .map_err(|_| ApiError::Internal("system RNG failed".into()))?;
        self.ctx.nonce.set(Some(nonce));
        Ok(nonce)
    }

    fn authenticate_impl(
        &self,
        params: service::AuthenticateParams,
    ) -> Result<IdentityKey, ApiError> {
        let ctx = &self.ctx;
        // The nonce is single-use whatever happens next, refusals included.
        let nonce = ctx.nonce.take();
        if ctx.is_authenticated() {
            return Err(ApiError::Forbidden(
                "this connection is already authenticated",
            ));
        }
        ctx.shared.limiters.auth_per_ip.check(&ctx.ip)?;
        let req = params.get()?.get_request()?;
        let client = req.get_wire_version();
        if !SUPPORTED_WIRE_VERSIONS.contains(&client) {
            return Err(ApiError::VersionMismatch { client });
        }
        let nonce = nonce.ok_or(ApiError::Unauthenticated("no challenge outstanding"))?;
        let token = req.get_access_token()?;
        let identity = req.get_identity_key()?;
        let signature = req.get_signature()?;
        if identity.len() != KEY_LEN {
            return Err(ApiError::InvalidArgument(format!(
                "identityKey must be {KEY_LEN} bytes"
            )));
        }
        if signature.len() != SIGNATURE_LEN {
            return Err(ApiError::InvalidArgument(format!(
                "signature must be {SIGNATURE_LEN} bytes"
            )));
        }
        let identity = IdentityKey::from_slice(identity)
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        // A weak key (small order, non-canonical) has no private key behind
        // it; plain Ed25519 would let a crafted signature pass under it.
        identity
            .check()
            .map_err(|e| ApiError::InvalidArgument(format!("identityKey: {e}")))?;
        ctx.shared.limiters.auth_per_identity.check(&identity)?;
        // Constant time, and length-independent: compare SHA-256 digests.
        let presented = ring::digest::digest(&ring::digest::SHA256, token);
        let token_ok: bool =
            subtle::ConstantTimeEq::ct_eq(presented.as_ref(), &ctx.shared.token_hash[..]).into();
        let mut exporter = [0; auth::EXPORTER_LEN];
        ctx.conn
            .export_keying_material(&mut exporter, auth::EXPORTER_LABEL, b"")
            .map_err(|_| ApiError::Internal("TLS exporter unavailable".into()))?;
        let transcript = auth::transcript(&nonce, &exporter, identity.as_bytes());
        let proof_ok = identity.verify(&transcript, signature).is_ok();
        if !(token_ok && proof_ok) {
            tracing::info!(ip = %ctx.ip, token_ok, proof_ok, "authentication failed");
            return Err(ApiError::Unauthenticated(
                "invalid access token or identity proof",
            ));
        }
        ctx.identity.set(Some(identity));
        tracing::debug!(ip = %ctx.ip, identity = ?identity, "authenticated");
        Ok(identity)
    }
}

impl service::Server for ServiceImpl {
    async fn health(
        self: Rc<Self>,
        _params: service::HealthParams,
        mut results: service::HealthResults,
    ) -> Result<(), capnp::Error> {
        let reachable = matches!(
            tokio::time::timeout(Duration::from_secs(2), self.ctx.shared.store.ping()).await,
            Ok(Ok(()))
        );
        let mut h = results.get().init_health();
        h.set_ok(reachable);
        h.set_server_version(SOFTWARE_VERSION);
        h.set_wire_version(WIRE_VERSION);
        h.set_store_reachable(reachable);
        Ok(())
    }

    async fn challenge(
        self: Rc<Self>,
        params: service::ChallengeParams,
        mut results: service::ChallengeResults,
    ) -> Result<(), capnp::Error> {
        match self.challenge_impl(params) {
            Ok(nonce) => results.get().set_nonce(&nonce),
            Err(e) => e.write(results.get().init_error(), "challenge"),
        }
        Ok(())
    }

    async fn authenticate(
        self: Rc<Self>,
        params: service::AuthenticateParams,
        mut results: service::AuthenticateResults,
    ) -> Result<(), capnp::Error> {
        match self.authenticate_impl(params) {
            Ok(identity) => {
                let session: session::Client = capnp_rpc::new_client(SessionImpl {
                    ctx: self.ctx.clone(),
                    identity,
                });
                results.get().set_session(session);
            }
            Err(e) => e.write(results.get().init_error(), "authenticate"),
        }
        Ok(())
    }
}

use quicnprotochat_proto::capnp_rpc;

/// An authenticated session, bound to one identity.
pub(crate) struct SessionImpl {
    ctx: Rc<ConnCtx>,
    identity: IdentityKey,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn parse_username(name: capnp::text::Reader<'_>) -> Result<String, ApiError> {
    let name = name
        .to_str()
        .map_err(|_| ApiError::InvalidArgument("username is not UTF-8".into()))?;
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

fn parse_key(bytes: &[u8], what: &str) -> Result<IdentityKey, ApiError> {
    if bytes.len() != KEY_LEN {
        return Err(ApiError::InvalidArgument(format!(
            "{what} must be {KEY_LEN} bytes, got {}",
            bytes.len()
        )));
    }
    IdentityKey::from_slice(bytes).map_err(|e| ApiError::InvalidArgument(e.to_string()))
}

fn write_envelopes(
    mut list: capnp::struct_list::Builder<'_, envelope::Owned>,
    msgs: &[QueuedMessage],
) {
    for (i, m) in msgs.iter().enumerate() {
        let mut e = list.reborrow().get(u32::try_from(i).unwrap_or(u32::MAX));
        e.set_seq(m.seq);
        e.set_message_id(&m.message_id);
        e.set_payload(&m.payload);
        e.set_enqueued_at_ms(m.enqueued_at_ms);
    }
}

fn list_len(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl SessionImpl {
    fn own_queue(&self, recipient: &[u8]) -> Result<(), ApiError> {
        let key = parse_key(recipient, "recipient")?;
        if key != self.identity {
            return Err(ApiError::Forbidden("a queue can only be read by its owner"));
        }
        Ok(())
    }

    async fn register_impl(&self, params: session::RegisterParams) -> Result<(), ApiError> {
        let username = parse_username(params.get()?.get_username()?)?;
        let shared = &self.ctx.shared;
        match shared
            .store_call(shared.store.register(username, self.identity))
            .await?
        {
            RegisterOutcome::Registered | RegisterOutcome::AlreadyRegistered => Ok(()),
            RegisterOutcome::UsernameTaken => Err(ApiError::Conflict("username is taken")),
            RegisterOutcome::IdentityTaken => Err(ApiError::Conflict(
                "identity is registered under another username",
            )),
        }
    }

    async fn resolve_impl(&self, params: session::ResolveParams) -> Result<IdentityKey, ApiError> {
        let username = parse_username(params.get()?.get_username()?)?;
        let shared = &self.ctx.shared;
        shared
            .store_call(shared.store.resolve(username))
            .await?
            .ok_or(ApiError::NotFound("no such username"))
    }

    async fn publish_impl(
        &self,
        params: session::PublishKeyPackagesParams,
    ) -> Result<u32, ApiError> {
        let list = params.get()?.get_key_packages()?;
        if list.is_empty() {
            return Err(ApiError::InvalidArgument("no key packages given".into()));
        }
        if list.len() as usize > MAX_KEY_PACKAGES_PER_BATCH {
            return Err(ApiError::TooLarge(format!(
                "at most {MAX_KEY_PACKAGES_PER_BATCH} key packages per call"
            )));
        }
        let mut raw = Vec::with_capacity(list.len() as usize);
        for kp in list.iter() {
            let kp = kp?;
            if kp.len() > MAX_KEY_PACKAGE_BYTES {
                return Err(ApiError::TooLarge(format!(
                    "a key package is at most {MAX_KEY_PACKAGE_BYTES} bytes"
                )));
            }
            raw.push(kp.to_vec());
        }
        // Signature checks cost ~0.1 ms each: keep them off the RPC thread.
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
            if info.identity != self.identity {
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
        let shared = &self.ctx.shared;
        let max = shared.limits.max_key_packages_per_identity;
        match shared
            .store_call(
                shared
                    .store
                    .publish_key_packages(self.identity, packages, max),
            )
            .await?
        {
            PublishOutcome::Stored(n) => Ok(n),
            PublishOutcome::OverCap { .. } => Err(ApiError::TooLarge(format!(
                "at most {max} key packages per identity may be stored"
            ))),
        }
    }

    async fn fetch_kp_impl(
        &self,
        params: session::FetchKeyPackageParams,
    ) -> Result<crate::store::TakenKeyPackage, ApiError> {
        let shared = &self.ctx.shared;
        shared
            .limiters
            .kp_fetch_per_identity
            .check(&self.identity)?;
        shared.limiters.kp_fetch_per_ip.check(&self.ctx.ip)?;
        let target = parse_key(params.get()?.get_identity_key()?, "identityKey")?;
        let now = quicnprotochat_core::keypackage::unix_now();
        shared
            .store_call(shared.store.take_key_package(target, now))
            .await?
            .ok_or(ApiError::NotFound(
                "no key package available for this identity",
            ))
    }

    async fn enqueue_impl(
        &self,
        params: session::EnqueueParams,
    ) -> Result<EnqueueOutcome, ApiError> {
        let shared = &self.ctx.shared;
        shared.limiters.enqueue_per_identity.check(&self.identity)?;
        shared.limiters.enqueue_per_ip.check(&self.ctx.ip)?;
        let p = params.get()?;
        let list = p.get_recipients()?;
        if list.is_empty() {
            return Err(ApiError::InvalidArgument("no recipients".into()));
        }
        if list.len() as usize > MAX_RECIPIENTS {
            return Err(ApiError::TooLarge(format!(
                "at most {MAX_RECIPIENTS} recipients"
            )));
        }
        let mut recipients = Vec::with_capacity(list.len() as usize);
        let mut seen = HashSet::with_capacity(list.len() as usize);
        for r in list.iter() {
            let key = parse_key(r?, "recipient key")?;
            if !seen.insert(key) {
                return Err(ApiError::InvalidArgument(
                    "a recipient is listed twice".into(),
                ));
            }
            recipients.push(key);
        }
        let message_id: [u8; MESSAGE_ID_LEN] = p.get_message_id()?.try_into().map_err(|_| {
            ApiError::InvalidArgument(format!("messageId must be {MESSAGE_ID_LEN} bytes"))
        })?;
        let payload = p.get_payload()?;
        if payload.is_empty() {
            return Err(ApiError::InvalidArgument("empty payload".into()));
        }
        if payload.len() > shared.limits.max_payload_bytes {
            return Err(ApiError::TooLarge(format!(
                "payload is at most {} bytes",
                shared.limits.max_payload_bytes
            )));
        }
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(self.identity.as_bytes());
        ctx.update(&message_id);
        let mut dedup_key = [0; 32];
        dedup_key.copy_from_slice(ctx.finish().as_ref());
        let frame = quicnprotochat_core::framing::inspect(payload);
        let commit = match (frame.kind, frame.group_id, frame.epoch) {
            (quicnprotochat_core::framing::FrameKind::Commit, Some(group_id), Some(epoch)) => {
                Some((group_id, epoch))
            }
            _ => None,
        };
        let request = EnqueueRequest {
            recipients: recipients.clone(),
            message_id,
            dedup_key,
            payload: payload.to_vec(),
            now_ms: unix_ms(),
            max_depth: shared.limits.queue_depth,
            dedup_window_ms: shared.limits.dedup_window_secs.saturating_mul(1000),
            commit,
        };
        // Kept for push subscriptions only if a recipient has one.
        let pushed = shared.hub.any_subscribed(&recipients).then(|| {
            Rc::new(Pushed {
                message_id,
                payload: Rc::from(payload),
                enqueued_at_ms: request.now_ms,
            })
        });
        let outcome = shared.store_call(shared.store.enqueue(request)).await?;
        match &outcome {
            EnqueueOutcome::Stored { seqs } => {
                for (r, seq) in recipients.iter().zip(seqs) {
                    shared.hub.notify(r, *seq, pushed.as_ref());
                }
            }
            EnqueueOutcome::QueueFull { index } => {
                return Err(ApiError::QueueFull(format!(
                    "the queue of recipient {index} is full; nothing was stored"
                )));
            }
            EnqueueOutcome::StaleEpoch { last_commit_epoch } => {
                return Err(ApiError::StaleEpoch(format!(
                    "a commit for this epoch was already accepted (last accepted commit epoch {last_commit_epoch}); process it and retry"
                )));
            }
            EnqueueOutcome::UnknownRecipient { .. } => {
                return Err(ApiError::NotFound(
                    "a recipient is not a registered identity",
                ));
            }
            EnqueueOutcome::Duplicate => {}
        }
        Ok(outcome)
    }

    async fn fetch_impl(
        &self,
        params: session::FetchParams,
    ) -> Result<Vec<QueuedMessage>, ApiError> {
        let p = params.get()?;
        self.own_queue(p.get_recipient()?)?;
        let limit = match p.get_limit() {
            0 => MAX_FETCH_MESSAGES,
            n => n.min(MAX_FETCH_MESSAGES),
        };
        let shared = &self.ctx.shared;
        shared
            .store_call(
                shared
                    .store
                    .fetch(self.identity, p.get_from_seq(), limit, MAX_FETCH_BYTES),
            )
            .await
    }

    async fn ack_impl(&self, params: session::AckParams) -> Result<u32, ApiError> {
        let p = params.get()?;
        self.own_queue(p.get_recipient()?)?;
        let shared = &self.ctx.shared;
        let up_to = p.get_up_to_seq();
        let n = shared
            .store_call(shared.store.ack(self.identity, up_to))
            .await?;
        shared.hub.acked(&self.identity, up_to);
        Ok(n)
    }

    fn subscribe_impl(
        &self,
        params: session::SubscribeParams,
    ) -> Result<subscription::Client, ApiError> {
        let p = params.get()?;
        self.own_queue(p.get_recipient()?)?;
        let listener = p.get_listener()?;
        let ctx = &self.ctx;
        if ctx.subscriptions.get() >= MAX_SUBSCRIPTIONS_PER_CONNECTION {
            return Err(ApiError::TooLarge(format!(
                "at most {MAX_SUBSCRIPTIONS_PER_CONNECTION} subscriptions per connection"
            )));
        }
        ctx.subscriptions.set(ctx.subscriptions.get() + 1);
        let (cancel_tx, cancel_rx) = oneshot::channel();
        let rx = ctx.shared.hub.watch(self.identity);
        tokio::task::spawn_local(run_subscription(
            ctx.clone(),
            self.identity,
            p.get_from_seq().max(1),
            listener,
            rx,
            cancel_rx,
        ));
        Ok(capnp_rpc::new_client(SubscriptionImpl {
            _cancel: cancel_tx,
        }))
    }
}

/// Dropping it (the client released the capability, or the connection ended)
/// cancels the subscription task.
struct SubscriptionImpl {
    _cancel: oneshot::Sender<()>,
}

impl subscription::Server for SubscriptionImpl {}

async fn run_subscription(
    ctx: Rc<ConnCtx>,
    recipient: IdentityKey,
    mut next: u64,
    listener: listener::Client,
    mut rx: watch::Receiver<u64>,
    mut cancel: oneshot::Receiver<()>,
) {
    let shared = ctx.shared.clone();
    loop {
        // Mark the current notification seen *before* reading the store, so a
        // message committed after the read still wakes us: no lost wake-ups.
        rx.borrow_and_update();
        // What was just committed comes from memory; the store only to catch up.
        let buffered = shared.hub.buffered(
            &recipient,
            next,
            usize::try_from(MAX_FETCH_MESSAGES).unwrap_or(usize::MAX),
            MAX_FETCH_BYTES,
        );
        let batch = match buffered {
            Some(b) => b,
            None => match shared
                .store_call(shared.store.fetch(
                    recipient,
                    next,
                    MAX_FETCH_MESSAGES,
                    MAX_FETCH_BYTES,
                ))
                .await
            {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = ?e, "subscription stopped: store read failed");
                    break;
                }
            },
        };
        if let Some(last) = batch.last() {
            let last_seq = last.seq;
            let mut req = listener.deliver_request();
            write_envelopes(req.get().init_messages(list_len(batch.len())), &batch);
            drop(batch);
            tokio::select! {
                r = req.send().promise => if r.is_err() { break },
                _ = &mut cancel => break,
            }
            next = last_seq + 1;
            continue;
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { break },
            _ = &mut cancel => break,
        }
    }
    drop(rx);
    shared.hub.release(&recipient);
    ctx.subscriptions
        .set(ctx.subscriptions.get().saturating_sub(1));
}

impl session::Server for SessionImpl {
    async fn register(
        self: Rc<Self>,
        params: session::RegisterParams,
        mut results: session::RegisterResults,
    ) -> Result<(), capnp::Error> {
        if let Err(e) = self.register_impl(params).await {
            e.write(results.get().init_error(), "register");
        }
        Ok(())
    }

    async fn resolve(
        self: Rc<Self>,
        params: session::ResolveParams,
        mut results: session::ResolveResults,
    ) -> Result<(), capnp::Error> {
        match self.resolve_impl(params).await {
            Ok(key) => results.get().set_identity_key(key.as_bytes()),
            Err(e) => e.write(results.get().init_error(), "resolve"),
        }
        Ok(())
    }

    async fn publish_key_packages(
        self: Rc<Self>,
        params: session::PublishKeyPackagesParams,
        mut results: session::PublishKeyPackagesResults,
    ) -> Result<(), capnp::Error> {
        match self.publish_impl(params).await {
            Ok(n) => results.get().set_stored(n),
            Err(e) => e.write(results.get().init_error(), "publishKeyPackages"),
        }
        Ok(())
    }

    async fn fetch_key_package(
        self: Rc<Self>,
        params: session::FetchKeyPackageParams,
        mut results: session::FetchKeyPackageResults,
    ) -> Result<(), capnp::Error> {
        match self.fetch_kp_impl(params).await {
            Ok(kp) => {
                let mut r = results.get();
                r.set_key_package(&kp.data);
                r.set_last_resort(kp.last_resort);
            }
            Err(e) => e.write(results.get().init_error(), "fetchKeyPackage"),
        }
        Ok(())
    }

    async fn key_package_count(
        self: Rc<Self>,
        _params: session::KeyPackageCountParams,
        mut results: session::KeyPackageCountResults,
    ) -> Result<(), capnp::Error> {
        let shared = &self.ctx.shared;
        let now = quicnprotochat_core::keypackage::unix_now();
        match shared
            .store_call(shared.store.key_package_count(self.identity, now))
            .await
        {
            Ok((count, last_resort)) => {
                let mut r = results.get();
                r.set_count(count);
                r.set_has_last_resort(last_resort);
            }
            Err(e) => e.write(results.get().init_error(), "keyPackageCount"),
        }
        Ok(())
    }

    async fn enqueue(
        self: Rc<Self>,
        params: session::EnqueueParams,
        mut results: session::EnqueueResults,
    ) -> Result<(), capnp::Error> {
        match self.enqueue_impl(params).await {
            Ok(EnqueueOutcome::Stored { seqs }) => {
                let mut list = results.get().init_seqs(list_len(seqs.len()));
                for (i, s) in seqs.iter().enumerate() {
                    list.set(list_len(i), *s);
                }
            }
            Ok(_) => results.get().set_duplicate(true),
            Err(e) => e.write(results.get().init_error(), "enqueue"),
        }
        Ok(())
    }

    async fn fetch(
        self: Rc<Self>,
        params: session::FetchParams,
        mut results: session::FetchResults,
    ) -> Result<(), capnp::Error> {
        match self.fetch_impl(params).await {
            Ok(msgs) => write_envelopes(results.get().init_messages(list_len(msgs.len())), &msgs),
            Err(e) => e.write(results.get().init_error(), "fetch"),
        }
        Ok(())
    }

    async fn ack(
        self: Rc<Self>,
        params: session::AckParams,
        mut results: session::AckResults,
    ) -> Result<(), capnp::Error> {
        match self.ack_impl(params).await {
            Ok(n) => results.get().set_removed(n),
            Err(e) => e.write(results.get().init_error(), "ack"),
        }
        Ok(())
    }

    async fn subscribe(
        self: Rc<Self>,
        params: session::SubscribeParams,
        mut results: session::SubscribeResults,
    ) -> Result<(), capnp::Error> {
        match self.subscribe_impl(params) {
            Ok(sub) => results.get().set_subscription(sub),
            Err(e) => e.write(results.get().init_error(), "subscribe"),
        }
        Ok(())
    }
}
