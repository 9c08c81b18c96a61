//! The connection: one authenticated QUIC connection to a delivery server,
//! and the client's only module that knows Cap'n Proto (the tidy test
//! `only_proto_and_one_adapter_per_side_know_capnp` enforces it).
//!
//! The RPC session (capnp-rpc) is `!Send`, so it lives on a worker thread of
//! its own, on a current-thread runtime inside a `LocalSet`.  [`Client`] is
//! the `Send` handle in front of it.  Every RPC is one method of `Client`:
//! it hands [`Client::call`] a closure that captures only `Send` data (the
//! arguments); the closure travels to the worker over the bounded command
//! queue, and the future it returns is spawned there as a task of its own
//! (so independent calls pipeline).  That future builds the request, awaits
//! the answer, turns it into Rust types (the server's typed errors through
//! `check!`) and the job sends the result back over a oneshot channel.
//! Adding an RPC is adding one method.
//!
//! Push: [`Client::subscribe`] serves a `Listener` on the worker that passes
//! each envelope into a bounded channel and returns only when all are in, so
//! a slow reader slows the server down instead of filling memory.
//!
//! The plain Rust types the methods take and return (configuration,
//! results) are in `types.rs`.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::future::LocalBoxFuture;
use quicnprotochat_core::{Identity, IdentityKey};
use quicnprotochat_proto::auth;
use quicnprotochat_proto::capnp;
use quicnprotochat_proto::capnp_rpc;
use quicnprotochat_proto::limits::{
    DELIVERY_TOKEN_LEN, KEY_LEN, MAX_BATCH_RECIPIENTS, MAX_ENQUEUE_BATCH, NONCE_LEN,
};
use quicnprotochat_proto::rpc::{Side, default_frame_limits, rpc_system};
use quicnprotochat_proto::schema::{ErrorCode, error, listener, service, session, subscription};
use quicnprotochat_proto::transport;
use tokio::sync::{mpsc, oneshot};

use crate::error::{ClientError, ServerErrorCode};
use crate::types::{
    AuthChallenge, ClientConfig, EnqueueResult, Envelope, Fetched, Health, OutgoingMessage,
};

/// Pushed messages buffered per subscription before the server is slowed down.
const SUBSCRIPTION_BUFFER: usize = 1024;

/// Commands queued to the worker before callers wait.
const COMMAND_QUEUE: usize = 1024;

/// Work for the worker thread, sent over the bounded command queue.
enum Cmd {
    /// One RPC: a job the worker runs as a task of its own.
    Call(Job),
    /// One message to enqueue, sent with whatever else is waiting.
    Send(PendingSend),
    /// Cancels the subscription with this id (sent by `Subscription::drop`).
    Unsubscribe(u64),
}

/// One message waiting to be enqueued, and where its outcome goes.
struct PendingSend {
    message: OutgoingMessage,
    reply: oneshot::Sender<Result<EnqueueResult, ClientError>>,
}

/// Enqueue calls one connection keeps in flight (wire version 3 and up).
/// While they are all out, new sends wait and leave together in the next
/// `enqueueBatch`: a lone message goes at once, and under load each call
/// carries more of them (and costs the server one commit for all).
const SEND_WINDOW: usize = 2;

/// Payload bytes gathered into one `enqueueBatch` before it is sent (a
/// larger message travels alone): well inside the frame limit.
const BATCH_PAYLOAD_BYTES: usize = 1024 * 1024;

/// One RPC for the worker.  The closure is built on the caller's thread and
/// captures only `Send` data (the arguments and the oneshot reply sender);
/// the future it returns runs on the worker, where it builds the Cap'n Proto
/// request (which is `!Send`), awaits the answer and sends the result back.
type Job = Box<dyn FnOnce(Rc<Worker>) -> LocalBoxFuture<'static, ()> + Send>;

/// A connection to a delivery server.  Cheap to share (`Arc` inside); every
/// method is a `Send` future.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    tx: mpsc::Sender<Cmd>,
    config: ClientConfig,
    identity: OnceLock<IdentityKey>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.inner.config.server_addr)
            .field("identity", &self.inner.identity.get())
            .finish()
    }
}

/// A live push subscription.  Dropping it cancels the subscription.
pub struct Subscription {
    rx: mpsc::Receiver<Envelope>,
    id: u64,
    tx: mpsc::Sender<Cmd>,
    incarnation: Vec<u8>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .finish()
    }
}

impl Subscription {
    /// The store incarnation the pushed sequence numbers belong to (empty
    /// from a server of wire version 1).
    pub fn incarnation(&self) -> &[u8] {
        &self.incarnation
    }

    /// The next pushed message; `None` once the connection is gone.
    pub async fn next(&mut self) -> Option<Envelope> {
        self.rx.recv().await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self.tx.try_send(Cmd::Unsubscribe(self.id));
    }
}

// ---------------------------------------------------------------------------
// From the wire: the server's typed errors and the values calls return

fn server_error(e: error::Reader<'_>) -> ClientError {
    let code = match e.get_code() {
        Ok(ErrorCode::Unauthenticated) => ServerErrorCode::Unauthenticated,
        Ok(ErrorCode::Forbidden) => ServerErrorCode::Forbidden,
        Ok(ErrorCode::InvalidArgument) => ServerErrorCode::InvalidArgument,
        Ok(ErrorCode::TooLarge) => ServerErrorCode::TooLarge,
        Ok(ErrorCode::RateLimited) => ServerErrorCode::RateLimited,
        Ok(ErrorCode::QueueFull) => ServerErrorCode::QueueFull,
        Ok(ErrorCode::NotFound) => ServerErrorCode::NotFound,
        Ok(ErrorCode::VersionMismatch) => ServerErrorCode::VersionMismatch,
        Ok(ErrorCode::Internal) => ServerErrorCode::Internal,
        Ok(ErrorCode::Conflict) => ServerErrorCode::Conflict,
        Ok(ErrorCode::StaleEpoch) => ServerErrorCode::StaleEpoch,
        Ok(ErrorCode::Unspecified) | Err(_) => ServerErrorCode::Unknown,
    };
    let message = e
        .get_message()
        .ok()
        .and_then(|m| m.to_string().ok())
        .unwrap_or_default();
    let retry_after = match e.get_retry_after_ms() {
        0 => None,
        ms => Some(Duration::from_millis(u64::from(ms))),
    };
    ClientError::Server {
        code,
        message,
        retry_after,
    }
}

/// Returns the server's typed error if the result carries one.
macro_rules! check {
    ($r:expr) => {
        if $r.has_error() {
            return Err(server_error($r.get_error()?));
        }
    };
}

/// How long a call waits out `rateLimited` answers in all before it
/// reports the refusal: long enough that a person typing never sees one,
/// bounded so that a server that keeps refusing is reported.
pub const RATE_LIMIT_PATIENCE: Duration = Duration::from_secs(10);

/// Waits out a `rateLimited` refusal (and returns to retry) while the total
/// stays within [`RATE_LIMIT_PATIENCE`]; any other error, or one past the
/// budget, is returned.
pub(crate) async fn wait_out(e: ClientError, waited: &mut Duration) -> Result<(), ClientError> {
    match e.rate_limited_for() {
        Some(wait) if *waited + wait <= RATE_LIMIT_PATIENCE => {
            tracing::debug!(?wait, "rate limited; waiting as the server asks");
            tokio::time::sleep(wait).await;
            *waited += wait;
            Ok(())
        }
        _ => Err(e),
    }
}

impl From<quicnprotochat_proto::capnp::Error> for ClientError {
    fn from(e: quicnprotochat_proto::capnp::Error) -> Self {
        Self::Rpc(e.to_string())
    }
}

fn key_from(bytes: &[u8]) -> Result<IdentityKey, ClientError> {
    if bytes.len() != KEY_LEN {
        return Err(ClientError::InvalidResponse(
            "identity key of the wrong length",
        ));
    }
    IdentityKey::from_slice(bytes).map_err(|_| ClientError::InvalidResponse("identity key"))
}

fn read_envelopes(
    list: capnp::struct_list::Reader<'_, quicnprotochat_proto::schema::envelope::Owned>,
) -> Result<Vec<Envelope>, ClientError> {
    list.iter()
        .map(|e| {
            Ok(Envelope {
                seq: e.get_seq(),
                message_id: e.get_message_id()?.to_vec(),
                payload: e.get_payload()?.to_vec(),
                enqueued_at_ms: e.get_enqueued_at_ms(),
                incarnation: e.get_incarnation()?.to_vec(),
            })
        })
        .collect()
}

impl Client {
    /// Connects (QUIC + TLS + RPC bootstrap).  Nothing is authenticated yet:
    /// call [`Client::init_auth`] before any session method.
    pub async fn connect(config: ClientConfig) -> Result<Self, ClientError> {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let (ready_tx, ready_rx) = oneshot::channel();
        let worker_config = config.clone();
        std::thread::Builder::new()
            .name("quicnprotochat-client".into())
            .spawn(move || worker_main(worker_config, rx, ready_tx))
            .map_err(|e| ClientError::Connect {
                addr: config.server_addr,
                reason: e.to_string(),
            })?;
        ready_rx.await.map_err(|_| ClientError::Disconnected)??;
        Ok(Self {
            inner: Arc::new(Inner {
                tx,
                config,
                identity: OnceLock::new(),
            }),
        })
    }

    /// The authenticated identity, once [`Client::init_auth`] succeeded.
    pub fn identity(&self) -> Option<IdentityKey> {
        self.inner.identity.get().copied()
    }

    /// Runs `rpc` on the worker thread and waits for its result: the one
    /// path from a `Send` method to the `!Send` RPC session.  `rpc` moves to
    /// the worker with its (`Send`) arguments; the future it returns builds
    /// the request there.  A full queue makes the caller wait; a worker that
    /// is gone (or drops the job) is [`ClientError::Disconnected`].
    async fn call<T, F, Fut>(&self, rpc: F) -> Result<T, ClientError>
    where
        T: Send + 'static,
        F: FnOnce(Rc<Worker>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, ClientError>> + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let job: Job = Box::new(move |worker| {
            Box::pin(async move {
                let _ = reply.send(rpc(worker).await);
            })
        });
        self.submit(Cmd::Call(job), rx).await
    }

    /// Queues `cmd` for the worker and waits for its answer on `rx`, within
    /// the call deadline: a full queue makes the caller wait; a worker that
    /// is gone (or drops the reply) is [`ClientError::Disconnected`].
    async fn submit<T>(
        &self,
        cmd: Cmd,
        rx: oneshot::Receiver<Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        let after = self.inner.config.call_timeout;
        let answer = async {
            self.inner
                .tx
                .send(cmd)
                .await
                .map_err(|_| ClientError::Disconnected)?;
            rx.await.map_err(|_| ClientError::Disconnected)?
        };
        tokio::time::timeout(after, answer)
            .await
            .map_err(|_| ClientError::Timeout { after })?
    }

    fn own_identity(&self) -> Result<IdentityKey, ClientError> {
        self.identity().ok_or(ClientError::NotAuthenticated)
    }

    /// `Service.health`: needs no authentication.
    pub async fn health(&self) -> Result<Health, ClientError> {
        self.call(|w| async move { health(&w.svc).await }).await
    }

    /// The minor wire version this connection speaks: the configured one,
    /// or the server's older one once `challenge` has fallen back to it.
    pub async fn wire_version(&self) -> Result<u16, ClientError> {
        self.call(|w| async move { Ok(w.wire_version.get()) }).await
    }

    /// Authenticates `identity`: fetches a nonce, signs the transcript bound
    /// to this connection, and presents it with the access token.
    ///
    /// A `rateLimited` answer is waited out as the protocol says (section
    /// 5.4): `challenge` is asked again, `authenticate` retried with the same
    /// proof, for at most [`RATE_LIMIT_PATIENCE`] of waiting in all.
    pub async fn init_auth(&self, identity: &Identity) -> Result<(), ClientError> {
        let key = identity.public_key();
        let mut waited = Duration::ZERO;
        let challenge = loop {
            match self.auth_challenge().await {
                Err(e) => wait_out(e, &mut waited).await?,
                Ok(c) => break c,
            }
        };
        let signature = identity.sign(&challenge.transcript(&key))?;
        loop {
            match self.auth_respond(key, signature.clone()).await {
                Err(e) => wait_out(e, &mut waited).await?,
                Ok(()) => return Ok(()),
            }
        }
    }

    /// First half of [`Client::init_auth`]: a fresh server nonce and this
    /// connection's TLS exporter value.
    pub async fn auth_challenge(&self) -> Result<AuthChallenge, ClientError> {
        self.call(|w| async move { challenge(&w.svc, &w.conn, &w.wire_version).await })
            .await
    }

    /// Second half of [`Client::init_auth`]: presents the token, the identity
    /// key and its signature over [`AuthChallenge::transcript`].
    pub async fn auth_respond(
        &self,
        key: IdentityKey,
        signature: Vec<u8>,
    ) -> Result<(), ClientError> {
        self.call(move |w| async move {
            let session =
                authenticate(&w.svc, &w.token, w.wire_version.get(), key, &signature).await?;
            *w.session.borrow_mut() = Some(session);
            Ok(())
        })
        .await?;
        let _ = self.inner.identity.set(key);
        Ok(())
    }

    /// Binds this identity to `username`.
    pub async fn register(&self, username: &str) -> Result<(), ClientError> {
        let username = username.to_string();
        self.call(move |w| async move {
            let mut req = w.session()?.register_request();
            req.get().set_username(username.as_str());
            let resp = req.send().promise.await?;
            check!(resp.get()?);
            Ok(())
        })
        .await
    }

    /// Looks a username up.
    pub async fn resolve(&self, username: &str) -> Result<IdentityKey, ClientError> {
        let username = username.to_string();
        self.call(move |w| async move {
            let mut req = w.session()?.resolve_request();
            req.get().set_username(username.as_str());
            let resp = req.send().promise.await?;
            let r = resp.get()?;
            check!(r);
            key_from(r.get_identity_key()?)
        })
        .await
    }

    /// Publishes TLS-serialized key packages; returns how many were stored.
    pub async fn publish_key_packages(&self, packages: Vec<Vec<u8>>) -> Result<u32, ClientError> {
        self.call(move |w| async move {
            let mut req = w.session()?.publish_key_packages_request();
            let mut list = req
                .get()
                .init_key_packages(u32::try_from(packages.len()).unwrap_or(u32::MAX));
            for (i, p) in packages.iter().enumerate() {
                list.set(u32::try_from(i).unwrap_or(u32::MAX), p);
            }
            let resp = req.send().promise.await?;
            let r = resp.get()?;
            check!(r);
            Ok(r.get_stored())
        })
        .await
    }

    /// Claims one key package of `identity`: `(package, is_last_resort)`.
    pub async fn fetch_key_package(
        &self,
        identity: IdentityKey,
    ) -> Result<(Vec<u8>, bool), ClientError> {
        self.call(move |w| async move {
            let mut req = w.session()?.fetch_key_package_request();
            req.get().set_identity_key(identity.as_bytes());
            let resp = req.send().promise.await?;
            let r = resp.get()?;
            check!(r);
            Ok((r.get_key_package()?.to_vec(), r.get_last_resort()))
        })
        .await
    }

    /// This identity's unexpired one-time packages on the server, and whether
    /// a last-resort package is there.
    pub async fn key_package_count(&self) -> Result<(u32, bool), ClientError> {
        self.call(|w| async move {
            let resp = w
                .session()?
                .key_package_count_request()
                .send()
                .promise
                .await?;
            let r = resp.get()?;
            check!(r);
            Ok((r.get_count(), r.get_has_last_resort()))
        })
        .await
    }

    /// Stores `payload` for every recipient (atomically).
    pub async fn enqueue(
        &self,
        recipients: &[IdentityKey],
        message_id: [u8; 16],
        payload: Vec<u8>,
    ) -> Result<EnqueueResult, ClientError> {
        self.enqueue_with_tokens(recipients, &[], message_id, payload)
            .await
    }

    /// Stores `payload` for every recipient (atomically), presenting
    /// `tokens[i]`, the delivery token `recipients[i]` announced to us, where
    /// we have one (`tokens` is empty or one per recipient).
    pub async fn enqueue_with_tokens(
        &self,
        recipients: &[IdentityKey],
        tokens: &[Option<[u8; DELIVERY_TOKEN_LEN]>],
        message_id: [u8; 16],
        payload: Vec<u8>,
    ) -> Result<EnqueueResult, ClientError> {
        // Sent only when there is one to present (saves 8 bytes a recipient).
        let tokens = if tokens.iter().any(Option::is_some) {
            tokens.to_vec()
        } else {
            Vec::new()
        };
        let (reply, rx) = oneshot::channel();
        let send = PendingSend {
            message: OutgoingMessage {
                recipients: recipients.to_vec(),
                tokens,
                message_id,
                payload,
            },
            reply,
        };
        self.submit(Cmd::Send(send), rx).await
    }

    /// Stores several messages in one call (`enqueueBatch`, wire version
    /// 3): each as [`Client::enqueue_with_tokens`] would, with an outcome
    /// of its own, in order.  The call fails as a whole only when the batch
    /// breaks its caps (at most 64 messages and 1 024 recipients in all) or
    /// the connection does.  [`Client::enqueue_with_tokens`] batches by
    /// itself when several sends are waiting; this is for a caller that
    /// has its batch in hand.
    pub async fn enqueue_batch(
        &self,
        messages: Vec<OutgoingMessage>,
    ) -> Result<Vec<Result<EnqueueResult, ClientError>>, ClientError> {
        self.call(move |w| async move { enqueue_many(&w, &messages).await })
            .await
    }

    /// Registers `token` as this identity's delivery token (protocol
    /// section 9.10); the one it replaces stays valid as the previous one.
    pub async fn set_delivery_token(
        &self,
        token: &[u8; DELIVERY_TOKEN_LEN],
    ) -> Result<(), ClientError> {
        let token = *token;
        self.call(move |w| async move {
            let mut req = w.session()?.set_delivery_token_request();
            req.get().set_token(&token);
            let resp = req.send().promise.await?;
            let r = resp.get()?;
            check!(r);
            Ok(())
        })
        .await
    }

    /// Reads this identity's queue from `from_seq`.
    pub async fn fetch(&self, from_seq: u64, limit: u32) -> Result<Vec<Envelope>, ClientError> {
        Ok(self.fetch_batch(from_seq, limit).await?.messages)
    }

    /// Reads this identity's queue from `from_seq`, with the store
    /// incarnation the sequence numbers belong to.
    pub async fn fetch_batch(&self, from_seq: u64, limit: u32) -> Result<Fetched, ClientError> {
        let recipient = self.own_identity()?;
        self.fetch_of(recipient, from_seq, limit).await
    }

    /// Reads the queue of `recipient` (the server refuses any but one's own;
    /// exposed for tests of exactly that).
    pub async fn fetch_queue(
        &self,
        recipient: IdentityKey,
        from_seq: u64,
        limit: u32,
    ) -> Result<Vec<Envelope>, ClientError> {
        Ok(self.fetch_of(recipient, from_seq, limit).await?.messages)
    }

    async fn fetch_of(
        &self,
        recipient: IdentityKey,
        from_seq: u64,
        limit: u32,
    ) -> Result<Fetched, ClientError> {
        self.call(move |w| async move {
            let mut req = w.session()?.fetch_request();
            {
                let mut p = req.get();
                p.set_recipient(recipient.as_bytes());
                p.set_from_seq(from_seq);
                p.set_limit(limit);
            }
            let resp = req.send().promise.await?;
            let r = resp.get()?;
            check!(r);
            Ok(Fetched {
                incarnation: r.get_incarnation()?.to_vec(),
                messages: read_envelopes(r.get_messages()?)?,
            })
        })
        .await
    }

    /// Deletes this identity's messages up to `up_to` (inclusive).
    pub async fn ack(&self, up_to: u64) -> Result<u32, ClientError> {
        let recipient = self.own_identity()?;
        self.ack_queue(recipient, up_to).await
    }

    /// Deletes this identity's messages up to `up_to` (inclusive) if the
    /// store's incarnation is still `incarnation`, the one `up_to` was read
    /// in; otherwise fails with `conflict` and deletes nothing.
    pub async fn ack_in(&self, incarnation: &[u8], up_to: u64) -> Result<u32, ClientError> {
        let recipient = self.own_identity()?;
        let incarnation = incarnation.to_vec();
        self.call(move |w| async move {
            let mut req = w.session()?.ack_request();
            req.get().set_recipient(recipient.as_bytes());
            req.get().set_up_to_seq(up_to);
            req.get().set_incarnation(&incarnation);
            let resp = req.send().promise.await?;
            let r = resp.get()?;
            check!(r);
            Ok(r.get_removed())
        })
        .await
    }

    /// Acknowledges on the queue of `recipient` (only one's own is allowed).
    pub async fn ack_queue(&self, recipient: IdentityKey, up_to: u64) -> Result<u32, ClientError> {
        self.call(move |w| async move {
            let mut req = w.session()?.ack_request();
            req.get().set_recipient(recipient.as_bytes());
            req.get().set_up_to_seq(up_to);
            let resp = req.send().promise.await?;
            let r = resp.get()?;
            check!(r);
            Ok(r.get_removed())
        })
        .await
    }

    /// Subscribes to this identity's queue from `from_seq`: the backlog first,
    /// then new messages as they arrive.
    pub async fn subscribe(&self, from_seq: u64) -> Result<Subscription, ClientError> {
        let recipient = self.own_identity()?;
        self.subscribe_queue(recipient, from_seq).await
    }

    /// Subscribes to the queue of `recipient` (only one's own is allowed).
    pub async fn subscribe_queue(
        &self,
        recipient: IdentityKey,
        from_seq: u64,
    ) -> Result<Subscription, ClientError> {
        let (events, rx) = mpsc::channel(SUBSCRIPTION_BUFFER);
        let (id, incarnation) = self
            .call(move |w| async move {
                let mut req = w.session()?.subscribe_request();
                let listener: listener::Client = capnp_rpc::new_client(ListenerImpl { events });
                {
                    let mut p = req.get();
                    p.set_recipient(recipient.as_bytes());
                    p.set_from_seq(from_seq);
                    p.set_listener(listener);
                }
                let resp = req.send().promise.await?;
                let r = resp.get()?;
                check!(r);
                let sub = r.get_subscription()?;
                let incarnation = r.get_incarnation()?.to_vec();
                let id = w.next_sub.get();
                w.next_sub.set(id + 1);
                w.subs.borrow_mut().insert(id, sub);
                Ok((id, incarnation))
            })
            .await?;
        Ok(Subscription {
            rx,
            id,
            tx: self.inner.tx.clone(),
            incarnation,
        })
    }
}

// ---------------------------------------------------------------------------
// The worker thread (single-threaded: Cap'n Proto RPC is !Send)

/// The RPC objects of one connection, shared by the worker's tasks (`Rc`:
/// they all run on the worker thread; `RefCell`s are never held across an
/// await).
struct Worker {
    /// the bootstrap capability (`health`, `challenge`, `authenticate`)
    svc: service::Client,
    /// the session capability, once authenticated
    session: RefCell<Option<session::Client>>,
    /// the access token presented on `authenticate`
    token: Vec<u8>,
    /// the wire version announced: the configured one, lowered to the
    /// server's by `challenge` when the server is older
    wire_version: Cell<u16>,
    /// the QUIC connection (for the TLS exporter)
    conn: quinn::Connection,
    /// live subscriptions by id: dropping one cancels it on the server
    subs: RefCell<HashMap<u64, subscription::Client>>,
    /// the next subscription id
    next_sub: Cell<u64>,
    /// messages waiting for a place in the send window
    sends: RefCell<VecDeque<PendingSend>>,
    /// enqueue calls in flight
    sending: Cell<usize>,
}

impl Worker {
    fn session(&self) -> Result<session::Client, ClientError> {
        self.session
            .borrow()
            .clone()
            .ok_or(ClientError::NotAuthenticated)
    }
}

fn worker_main(
    config: ClientConfig,
    rx: mpsc::Receiver<Cmd>,
    ready: oneshot::Sender<Result<(), ClientError>>,
) {
    let addr = config.server_addr;
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(ClientError::Connect {
                addr,
                reason: e.to_string(),
            }));
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let opened = tokio::time::timeout(config.connect_timeout, open(&config)).await;
        let (endpoint, worker, rpc) = match opened {
            Ok(Ok(parts)) => parts,
            Ok(Err(e)) => {
                let _ = ready.send(Err(e));
                return;
            }
            Err(_) => {
                let _ = ready.send(Err(ClientError::Unreachable {
                    addr,
                    after: config.connect_timeout,
                }));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        let rpc_task = tokio::task::spawn_local(rpc);
        run_commands(Rc::new(worker), rx).await;
        rpc_task.abort();
        endpoint.close(0u32.into(), b"bye");
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    });
}

/// An authenticated session that only stays open, for holding many in one
/// process (the load generator's `connections` scenario): it shares its
/// caller's QUIC endpoint and runs its RPC on the caller's `LocalSet`,
/// where a [`Client`] has a thread and an endpoint of its own.  Dropping it
/// closes the connection.
pub struct IdleSession {
    conn: quinn::Connection,
    _session: session::Client,
    rpc: tokio::task::JoinHandle<Result<(), capnp::Error>>,
}

impl fmt::Debug for IdleSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdleSession")
            .field("remote", &self.conn.remote_address())
            .finish_non_exhaustive()
    }
}

impl IdleSession {
    /// A client endpoint on `bind` for sessions to `config`'s server: its
    /// server authentication, ALPN and keep-alive.  One UDP socket carries
    /// every session opened from it.
    pub fn endpoint(
        bind: SocketAddr,
        config: &ClientConfig,
    ) -> Result<quinn::Endpoint, ClientError> {
        client_endpoint(bind, config)
    }

    /// Connects from `endpoint` (made by [`IdleSession::endpoint`]) and
    /// authenticates `identity`; a `rateLimited` answer is an error here,
    /// not waited out.  Must run inside a `LocalSet`.
    pub async fn open(
        endpoint: &quinn::Endpoint,
        config: &ClientConfig,
        identity: &Identity,
    ) -> Result<Self, ClientError> {
        let (conn, rpc, svc) = rpc_session(endpoint, config).await?;
        let rpc = tokio::task::spawn_local(rpc);
        let authenticated = async {
            let key = identity.public_key();
            let version = Cell::new(config.wire_version);
            let c = challenge(&svc, &conn, &version).await?;
            let signature = identity.sign(&c.transcript(&key))?;
            authenticate(&svc, &config.access_token, version.get(), key, &signature).await
        };
        match authenticated.await {
            Ok(session) => Ok(Self {
                conn,
                _session: session,
                rpc,
            }),
            Err(e) => {
                rpc.abort();
                conn.close(0u32.into(), b"bye");
                Err(e)
            }
        }
    }

    /// Whether the connection has closed (the server closed it, or it
    /// timed out).
    pub fn is_closed(&self) -> bool {
        self.conn.close_reason().is_some()
    }
}

impl Drop for IdleSession {
    fn drop(&mut self) {
        self.rpc.abort();
        self.conn.close(0u32.into(), b"bye");
    }
}

/// The client's local address: loopback for a loopback server (tests never
/// listen on other interfaces), otherwise the unspecified address.
fn bind_addr(server: SocketAddr) -> SocketAddr {
    match (server.is_ipv6(), server.ip().is_loopback()) {
        (false, true) => SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        (false, false) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        (true, true) => SocketAddr::from((Ipv6Addr::LOCALHOST, 0)),
        (true, false) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    }
}

type RpcSystem = capnp_rpc::RpcSystem<Side>;

/// `Service.health`.
async fn health(svc: &service::Client) -> Result<Health, ClientError> {
    let resp = svc.health_request().send().promise.await?;
    let h = resp.get()?.get_health()?;
    Ok(Health {
        ok: h.get_ok(),
        server_version: h.get_server_version()?.to_string().unwrap_or_default(),
        wire_version: h.get_wire_version(),
        store_reachable: h.get_store_reachable(),
    })
}

/// `Service.challenge` at `wire_version`.  A server of an older minor
/// version refuses it with `versionMismatch`; then the client asks
/// `health` for the server's version and, when it is one this client
/// speaks too (any from 1 up), challenges again at it and keeps it in
/// `wire_version` for `authenticate` and the calls that follow (protocol
/// section 5.4).  A server that announces a version as new as ours, or 0,
/// gets the refusal reported.
async fn challenge(
    svc: &service::Client,
    conn: &quinn::Connection,
    wire_version: &Cell<u16>,
) -> Result<AuthChallenge, ClientError> {
    let ours = wire_version.get();
    match challenge_at(svc, conn, ours).await {
        Err(e) if e.server_code() == Some(ServerErrorCode::VersionMismatch) => {
            let theirs = health(svc).await?.wire_version;
            if !(1..ours).contains(&theirs) {
                return Err(e);
            }
            tracing::info!(
                ours,
                theirs,
                "the server speaks an older minor wire version; using it"
            );
            let c = challenge_at(svc, conn, theirs).await?;
            wire_version.set(theirs);
            Ok(c)
        }
        r => r,
    }
}

/// `Service.challenge`: a fresh nonce, with this connection's TLS exporter
/// value.
async fn challenge_at(
    svc: &service::Client,
    conn: &quinn::Connection,
    wire_version: u16,
) -> Result<AuthChallenge, ClientError> {
    let mut req = svc.challenge_request();
    req.get().set_wire_version(wire_version);
    let resp = req.send().promise.await?;
    let r = resp.get()?;
    check!(r);
    let nonce: [u8; NONCE_LEN] = r
        .get_nonce()?
        .try_into()
        .map_err(|_| ClientError::InvalidResponse("nonce of the wrong length"))?;
    let mut exporter = [0; auth::EXPORTER_LEN];
    conn.export_keying_material(&mut exporter, auth::EXPORTER_LABEL, b"")
        .map_err(|_| ClientError::InvalidResponse("TLS exporter unavailable"))?;
    Ok(AuthChallenge { nonce, exporter })
}

/// `Service.authenticate`: the token, the identity key and its signature
/// over the challenge's transcript; the session on success.
async fn authenticate(
    svc: &service::Client,
    token: &[u8],
    wire_version: u16,
    key: IdentityKey,
    signature: &[u8],
) -> Result<session::Client, ClientError> {
    let mut req = svc.authenticate_request();
    {
        let mut a = req.get().init_request();
        a.set_wire_version(wire_version);
        a.set_access_token(token);
        a.set_identity_key(key.as_bytes());
        a.set_signature(signature);
    }
    let resp = req.send().promise.await?;
    let r = resp.get()?;
    check!(r);
    Ok(r.get_session()?)
}

/// A client endpoint on `bind` for `config`'s server: its server
/// authentication, ALPN and keep-alive.
fn client_endpoint(
    bind: SocketAddr,
    config: &ClientConfig,
) -> Result<quinn::Endpoint, ClientError> {
    let addr = config.server_addr;
    let connect_err = |reason: String| ClientError::Connect { addr, reason };
    let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| connect_err(e.to_string()))?;
    let mut client_config = transport::client_config(&config.server_auth, &config.alpn)
        .map_err(|e| connect_err(e.to_string()))?;
    let mut transport_config = quinn::TransportConfig::default();
    transport_config.keep_alive_interval(Some(config.keep_alive));
    client_config.transport_config(Arc::new(transport_config));
    endpoint.set_default_client_config(client_config);
    Ok(endpoint)
}

/// Connects from `endpoint` to `config`'s server and starts the RPC
/// session on one bidirectional stream: the connection, the RPC system
/// (to be run) and the bootstrap `Service`.
async fn rpc_session(
    endpoint: &quinn::Endpoint,
    config: &ClientConfig,
) -> Result<(quinn::Connection, RpcSystem, service::Client), ClientError> {
    let addr = config.server_addr;
    let connect_err = |reason: String| ClientError::Connect { addr, reason };
    let conn = endpoint
        .connect(addr, &config.server_name)
        .map_err(|e| connect_err(e.to_string()))?
        .await
        .map_err(|e| connect_err(e.to_string()))?;
    let (send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| connect_err(e.to_string()))?;
    let mut rpc = rpc_system(recv, send, Side::Client, None, default_frame_limits());
    let svc: service::Client = rpc.bootstrap(Side::Server);
    Ok((conn, rpc, svc))
}

async fn open(config: &ClientConfig) -> Result<(quinn::Endpoint, Worker, RpcSystem), ClientError> {
    let endpoint = client_endpoint(bind_addr(config.server_addr), config)?;
    let (conn, rpc, svc) = rpc_session(&endpoint, config).await?;
    let worker = Worker {
        svc,
        session: RefCell::new(None),
        token: config.access_token.clone(),
        wire_version: Cell::new(config.wire_version),
        conn,
        subs: RefCell::new(HashMap::new()),
        next_sub: Cell::new(1),
        sends: RefCell::new(VecDeque::new()),
        sending: Cell::new(0),
    };
    Ok((endpoint, worker, rpc))
}

async fn run_commands(worker: Rc<Worker>, mut rx: mpsc::Receiver<Cmd>) {
    while let Some(cmd) = rx.recv().await {
        match cmd {
            // Calls run as tasks of their own, so independent calls pipeline.
            Cmd::Call(job) => {
                tokio::task::spawn_local(job(worker.clone()));
            }
            Cmd::Send(send) => {
                worker.sends.borrow_mut().push_back(send);
                pump_sends(&worker);
            }
            Cmd::Unsubscribe(id) => {
                worker.subs.borrow_mut().remove(&id);
            }
        }
    }
}

/// Sends waiting messages while the send window has room: each call
/// takes as many as are waiting, within the batch caps.  A server of wire
/// version 2 or less gets one `enqueue` per message, all at once.
fn pump_sends(worker: &Rc<Worker>) {
    loop {
        let batched = worker.wire_version.get() >= 3;
        if batched && worker.sending.get() >= SEND_WINDOW {
            return;
        }
        let batch = take_batch(&mut worker.sends.borrow_mut(), batched);
        if batch.is_empty() {
            return;
        }
        worker.sending.set(worker.sending.get() + 1);
        let w = worker.clone();
        tokio::task::spawn_local(async move {
            send_batch(&w, batch).await;
            w.sending.set(w.sending.get().saturating_sub(1));
            pump_sends(&w);
        });
    }
}

/// The next call's messages from the front of `waiting`: one, or (when
/// `batched`) up to the protocol's caps and [`BATCH_PAYLOAD_BYTES`].
/// Messages whose caller stopped waiting are dropped unsent.
fn take_batch(waiting: &mut VecDeque<PendingSend>, batched: bool) -> Vec<PendingSend> {
    let (mut recipients, mut bytes) = (0, 0);
    let mut batch = Vec::new();
    while let Some(next) = waiting.front() {
        if next.reply.is_closed() {
            waiting.pop_front();
            continue;
        }
        let m = &next.message;
        let fits = batch.is_empty()
            || (batched
                && batch.len() < MAX_ENQUEUE_BATCH
                && recipients + m.recipients.len() <= MAX_BATCH_RECIPIENTS
                && bytes + m.payload.len() <= BATCH_PAYLOAD_BYTES);
        if !fits {
            break;
        }
        recipients += m.recipients.len();
        bytes += m.payload.len();
        if let Some(send) = waiting.pop_front() {
            batch.push(send);
        }
    }
    batch
}

/// Enqueues `batch` (one message: `enqueue`; more: `enqueueBatch`) and
/// answers each caller.
async fn send_batch(worker: &Worker, batch: Vec<PendingSend>) {
    let (messages, replies): (Vec<_>, Vec<_>) =
        batch.into_iter().map(|s| (s.message, s.reply)).unzip();
    let outcomes = if let [m] = &messages[..] {
        vec![enqueue_one(worker, m).await]
    } else {
        match enqueue_many(worker, &messages).await {
            Ok(outcomes) => outcomes,
            Err(e) => replies.iter().map(|_| Err(copy_error(&e))).collect(),
        }
    };
    let mut outcomes = outcomes.into_iter();
    for reply in replies {
        let outcome = outcomes.next().unwrap_or(Err(ClientError::InvalidResponse(
            "fewer results than messages in a batch",
        )));
        let _ = reply.send(outcome);
    }
}

/// Fills one enqueue's parameters from `$m` (an `OutgoingMessage`): the
/// parameters of `enqueue` or one `Outgoing` of `enqueueBatch`, which
/// Cap'n Proto makes two types with the same setters.
macro_rules! fill_enqueue {
    ($p:expr, $m:expr) => {{
        let m: &OutgoingMessage = $m;
        let mut list = $p
            .reborrow()
            .init_recipients(u32::try_from(m.recipients.len()).unwrap_or(u32::MAX));
        for (i, r) in m.recipients.iter().enumerate() {
            list.set(u32::try_from(i).unwrap_or(u32::MAX), r.as_bytes());
        }
        let mut list = $p
            .reborrow()
            .init_tokens(u32::try_from(m.tokens.len()).unwrap_or(u32::MAX));
        for (i, t) in m.tokens.iter().enumerate() {
            list.set(
                u32::try_from(i).unwrap_or(u32::MAX),
                t.as_ref().map(|t| &t[..]).unwrap_or_default(),
            );
        }
        $p.set_message_id(&m.message_id);
        $p.set_payload(&m.payload);
    }};
}

async fn enqueue_one(worker: &Worker, m: &OutgoingMessage) -> Result<EnqueueResult, ClientError> {
    let mut req = worker.session()?.enqueue_request();
    {
        let mut p = req.get();
        fill_enqueue!(p, m);
    }
    let resp = req.send().promise.await?;
    let r = resp.get()?;
    check!(r);
    if r.get_duplicate() {
        return Ok(EnqueueResult::Duplicate);
    }
    Ok(EnqueueResult::Stored(r.get_seqs()?.iter().collect()))
}

async fn enqueue_many(
    worker: &Worker,
    messages: &[OutgoingMessage],
) -> Result<Vec<Result<EnqueueResult, ClientError>>, ClientError> {
    let mut req = worker.session()?.enqueue_batch_request();
    {
        let mut list = req
            .get()
            .init_messages(u32::try_from(messages.len()).unwrap_or(u32::MAX));
        for (i, m) in messages.iter().enumerate() {
            let mut p = list.reborrow().get(u32::try_from(i).unwrap_or(u32::MAX));
            fill_enqueue!(p, m);
        }
    }
    let resp = req.send().promise.await?;
    let r = resp.get()?;
    check!(r);
    let results = r.get_results()?;
    if results.len() as usize != messages.len() {
        return Err(ClientError::InvalidResponse(
            "a batch's results do not match its messages",
        ));
    }
    Ok(results
        .iter()
        .map(|r| {
            if r.has_error() {
                return Err(server_error(r.get_error()?));
            }
            if r.get_duplicate() {
                return Ok(EnqueueResult::Duplicate);
            }
            Ok(EnqueueResult::Stored(r.get_seqs()?.iter().collect()))
        })
        .collect())
}

/// The same failure for another caller of one batch.
fn copy_error(e: &ClientError) -> ClientError {
    match e {
        ClientError::Server {
            code,
            message,
            retry_after,
        } => ClientError::Server {
            code: *code,
            message: message.clone(),
            retry_after: *retry_after,
        },
        ClientError::NotAuthenticated => ClientError::NotAuthenticated,
        ClientError::Disconnected => ClientError::Disconnected,
        ClientError::InvalidResponse(m) => ClientError::InvalidResponse(m),
        other => ClientError::Rpc(other.to_string()),
    }
}

struct ListenerImpl {
    events: mpsc::Sender<Envelope>,
}

impl listener::Server for ListenerImpl {
    async fn deliver(
        self: Rc<Self>,
        params: listener::DeliverParams,
        _results: listener::DeliverResults,
    ) -> Result<(), capnp::Error> {
        let batch = read_envelopes(params.get()?.get_messages()?)
            .map_err(|e| capnp::Error::failed(e.to_string()))?;
        for env in batch {
            // Waiting here is the flow control: the server pushes the next
            // batch only after this call returns.
            if self.events.send(env).await.is_err() {
                break;
            }
        }
        Ok(())
    }
}
