//! The Cap'n Proto adapter: `Service` (bootstrap), `Session` (after
//! authentication) and push subscriptions.
//!
//! Each method decodes its parameters, calls one method of the
//! [`Delivery`] service and encodes the result; [`answer`] writes either the
//! result or the error.  No delivery logic lives here.  This module and
//! [`crate::server`] (the QUIC side) are the server's only users of the
//! generated schema types.
//!
//! Capabilities are `Rc`-based (Cap'n Proto RPC is single-threaded); they
//! run on the server's `LocalSet`.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use quicnprotochat_core::IdentityKey;
use quicnprotochat_proto::framing::FrameLimits;
use quicnprotochat_proto::rpc::{Side, default_frame_limits, rpc_system};
use quicnprotochat_proto::schema::{ErrorCode, envelope, error, listener, service, session};
use quicnprotochat_proto::{auth, capnp, capnp_rpc};
use tokio::sync::oneshot;

use crate::delivery::{
    AuthFields, AuthRequest, Decoded, Delivery, EnqueueCall, Peer, Subscription,
};
use crate::drain::{CallGuard, Calls, DrainSignal};
use crate::error::ApiError;
use crate::health::HealthReport;
use crate::metrics::Metrics;
use crate::store::{EnqueueOutcome, QueuedMessage};

/// One connection's RPC session, running as a task of its own on the
/// `LocalSet`; dropping it ends the session at once.
pub(crate) struct Rpc {
    task: tokio::task::JoinHandle<Result<(), capnp::Error>>,
    disconnector: capnp_rpc::Disconnector<Side>,
}

impl Rpc {
    /// Serves the connection's RPC stream (`Service` is the bootstrap
    /// capability) until the client or the stream ends, counting each call
    /// in `calls`.
    pub(crate) fn start(
        delivery: Rc<Delivery>,
        peer: Rc<Peer>,
        conn: quinn::Connection,
        (send, recv): (quinn::SendStream, quinn::RecvStream),
        frame: FrameLimits,
        calls: Rc<Calls>,
    ) -> Self {
        let bootstrap: service::Client = capnp_rpc::new_client(ServiceImpl {
            delivery,
            peer,
            conn,
            calls,
        });
        let system = rpc_system(recv, send, Side::Server, Some(bootstrap.client), frame);
        let disconnector = system.get_disconnector();
        Self {
            task: tokio::task::spawn_local(system),
            disconnector,
        }
    }

    /// Resolves when the session ended by itself: the client closed it
    /// (`Ok`) or it failed (framing limits, malformed messages).
    pub(crate) async fn ended(&mut self) -> Result<(), String> {
        match (&mut self.task).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Ends the session cleanly: the answers already queued are written to
    /// the stream, then the session stops and the stream is finished.
    /// Answers of calls still running are lost, so call it once none is
    /// in flight ([`Calls::idle`]).
    pub(crate) async fn disconnect(&mut self) {
        if let Err(e) = (&mut self.disconnector).await {
            tracing::debug!(error = %e, "RPC session did not end cleanly");
        }
        // Dropping the session finishes the QUIC stream; what it wrote is
        // still delivered.
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Rpc {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The refusal of a call that arrives while the server drains: a
/// `disconnected` exception, which clients treat like a lost connection
/// (reconnect, then retry).
fn shutting_down() -> capnp::Error {
    capnp::Error::disconnected("server shutting down".into())
}

/// The `health` subcommand's side: calls `Service.health` over `send` and
/// `recv` of a connection to a running server.  Must run in a `LocalSet`.
pub(crate) async fn call_health(
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) -> Result<HealthReport, capnp::Error> {
    let mut rpc = rpc_system(recv, send, Side::Client, None, default_frame_limits());
    let svc: service::Client = rpc.bootstrap(Side::Server);
    let rpc_task = tokio::task::spawn_local(rpc);
    let result = async {
        let reply = svc.health_request().send().promise.await?;
        let h = reply.get()?.get_health()?;
        Ok(HealthReport {
            ok: h.get_ok(),
            server_version: h.get_server_version()?.to_string().unwrap_or_default(),
            wire_version: h.get_wire_version(),
            store_reachable: h.get_store_reachable(),
        })
    }
    .await;
    rpc_task.abort();
    result
}

impl ApiError {
    /// The wire code of this error.
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            Self::Unauthenticated(_) => ErrorCode::Unauthenticated,
            Self::Forbidden(_) => ErrorCode::Forbidden,
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::TooLarge(_) => ErrorCode::TooLarge,
            Self::RateLimited { .. } => ErrorCode::RateLimited,
            Self::QueueFull(_) => ErrorCode::QueueFull,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::VersionMismatch { .. } => ErrorCode::VersionMismatch,
            Self::Conflict(_) => ErrorCode::Conflict,
            Self::StaleEpoch(_) => ErrorCode::StaleEpoch,
            Self::Internal(_) => ErrorCode::Internal,
        }
    }

    /// The wire code's name in the protocol, for the metrics' `code` label.
    pub(crate) fn code_name(&self) -> &'static str {
        match self {
            Self::Unauthenticated(_) => "unauthenticated",
            Self::Forbidden(_) => "forbidden",
            Self::InvalidArgument(_) => "invalidArgument",
            Self::TooLarge(_) => "tooLarge",
            Self::RateLimited { .. } => "rateLimited",
            Self::QueueFull(_) => "queueFull",
            Self::NotFound(_) => "notFound",
            Self::VersionMismatch { .. } => "versionMismatch",
            Self::Conflict(_) => "conflict",
            Self::StaleEpoch(_) => "staleEpoch",
            Self::Internal(_) => "internal",
        }
    }

    /// Writes the wire form.  The one place domain errors meet the wire.
    fn write(&self, mut out: error::Builder<'_>, method: &'static str) {
        match self {
            Self::Internal(detail) => tracing::error!(method, %detail, "request failed"),
            other => tracing::debug!(method, code = ?other.code(), "request refused"),
        }
        out.set_code(self.code());
        out.set_message(self.message().as_str());
        if let Self::RateLimited { retry_after } = self {
            out.set_retry_after_ms(
                u32::try_from(retry_after.as_millis())
                    .unwrap_or(u32::MAX)
                    .max(1),
            );
        }
    }
}

impl From<capnp::Error> for ApiError {
    fn from(e: capnp::Error) -> Self {
        Self::InvalidArgument(format!("malformed request: {}", e.extra))
    }
}

/// Results that carry an `error` field.
trait ErrorSlot {
    fn error_slot(&mut self) -> error::Builder<'_>;
}

macro_rules! error_slot {
    ($($results:ty),* $(,)?) => {$(
        impl ErrorSlot for $results {
            fn error_slot(&mut self) -> error::Builder<'_> {
                self.get().init_error()
            }
        }
    )*};
}

error_slot!(
    service::ChallengeResults,
    service::AuthenticateResults,
    session::RegisterResults,
    session::ResolveResults,
    session::PublishKeyPackagesResults,
    session::FetchKeyPackageResults,
    session::KeyPackageCountResults,
    session::EnqueueResults,
    session::FetchResults,
    session::AckResults,
    session::SubscribeResults,
    session::SetDeliveryTokenResults,
    session::EnqueueBatchResults,
);

/// Answers one call: `ok` encodes a success; an error goes in the results'
/// `error` field.  Every call answers at the RPC level (a refused request
/// is a normal reply).
fn answer<R: ErrorSlot, T>(
    results: &mut R,
    method: &'static str,
    outcome: Result<T, ApiError>,
    ok: impl FnOnce(&mut R, T),
) -> Result<(), capnp::Error> {
    match outcome {
        Ok(v) => ok(results, v),
        Err(e) => e.write(results.error_slot(), method),
    }
    Ok(())
}

/// One enqueue's parameters, from `enqueue` or one message of
/// `enqueueBatch`.
fn enqueue_call<'a>(
    recipients: capnp::data_list::Reader<'a>,
    message_id: capnp::Result<&'a [u8]>,
    payload: capnp::Result<&'a [u8]>,
    tokens: capnp::data_list::Reader<'a>,
) -> Decoded<EnqueueCall<'a>> {
    Ok(EnqueueCall {
        recipients: recipients
            .iter()
            .map(|r| r.map_err(ApiError::from))
            .collect(),
        message_id: message_id.map_err(ApiError::from),
        payload: payload.map_err(ApiError::from),
        tokens: tokens.iter().map(|t| t.map_err(ApiError::from)).collect(),
    })
}

fn write_seqs(mut list: capnp::primitive_list::Builder<'_, u64>, seqs: &[u64]) {
    for (i, s) in seqs.iter().enumerate() {
        list.set(list_len(i), *s);
    }
}

fn list_len(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn text<'a>(t: capnp::text::Reader<'a>, what: &str) -> Result<&'a str, ApiError> {
    t.to_str()
        .map_err(|_| ApiError::InvalidArgument(format!("{what} is not UTF-8")))
}

fn write_envelopes(
    mut list: capnp::struct_list::Builder<'_, envelope::Owned>,
    msgs: &[QueuedMessage],
    incarnation: &[u8],
) {
    for (i, m) in msgs.iter().enumerate() {
        let mut e = list.reborrow().get(list_len(i));
        e.set_seq(m.seq);
        e.set_message_id(&m.message_id);
        e.set_payload(&m.payload);
        e.set_enqueued_at_ms(m.enqueued_at_ms);
        e.set_incarnation(incarnation);
    }
}

/// The bootstrap capability of one connection.
struct ServiceImpl {
    delivery: Rc<Delivery>,
    peer: Rc<Peer>,
    conn: quinn::Connection,
    calls: Rc<Calls>,
}

/// One call being answered: counted in flight for the drain (most
/// methods), timed and counted for the metrics.
struct Call {
    _in_flight: Option<CallGuard>,
    method: &'static str,
    started: Instant,
    metrics: Arc<Metrics>,
}

/// Counts one call of `method` in flight, or refuses it while the server
/// drains.
fn begin(
    calls: &Rc<Calls>,
    delivery: &Delivery,
    method: &'static str,
) -> Result<Call, capnp::Error> {
    let guard = calls.begin().ok_or_else(shutting_down)?;
    let mut call = Call::timed(delivery, method);
    call._in_flight = Some(guard);
    Ok(call)
}

impl Call {
    /// A call the drain does not wait for, timed for the metrics.
    fn timed(delivery: &Delivery, method: &'static str) -> Self {
        Self {
            _in_flight: None,
            method,
            started: Instant::now(),
            metrics: delivery.metrics.clone(),
        }
    }

    /// Answers the call (see [`answer`]) and counts it.
    fn answer<R: ErrorSlot, T>(
        self,
        results: &mut R,
        outcome: Result<T, ApiError>,
        ok: impl FnOnce(&mut R, T),
    ) -> Result<(), capnp::Error> {
        let code = outcome.as_ref().err().map(ApiError::code_name);
        self.metrics.call(self.method, code, self.started.elapsed());
        answer(results, self.method, outcome, ok)
    }
}

impl service::Server for ServiceImpl {
    async fn health(
        self: Rc<Self>,
        _params: service::HealthParams,
        mut results: service::HealthResults,
    ) -> Result<(), capnp::Error> {
        let call = begin(&self.calls, &self.delivery, "health")?;
        let health = self.delivery.health().await;
        call.metrics.call(call.method, None, call.started.elapsed());
        let mut h = results.get().init_health();
        h.set_ok(health.ok);
        h.set_server_version(health.server_version);
        h.set_wire_version(health.wire_version);
        h.set_store_reachable(health.store_reachable);
        Ok(())
    }

    async fn challenge(
        self: Rc<Self>,
        params: service::ChallengeParams,
        mut results: service::ChallengeResults,
    ) -> Result<(), capnp::Error> {
        let call = begin(&self.calls, &self.delivery, "challenge")?;
        let wire_version = || Ok(params.get()?.get_wire_version());
        let outcome = self.delivery.challenge(&self.peer, wire_version);
        call.answer(&mut results, outcome, |r, nonce| r.get().set_nonce(&nonce))
    }

    async fn authenticate(
        self: Rc<Self>,
        params: service::AuthenticateParams,
        mut results: service::AuthenticateResults,
    ) -> Result<(), capnp::Error> {
        let call = begin(&self.calls, &self.delivery, "authenticate")?;
        let decode = || -> Decoded<AuthRequest<'_>> {
            let req = params.get()?.get_request()?;
            let fields = (|| {
                Ok(AuthFields {
                    access_token: req.get_access_token()?,
                    identity_key: req.get_identity_key()?,
                    signature: req.get_signature()?,
                })
            })();
            Ok(AuthRequest {
                wire_version: req.get_wire_version(),
                fields,
            })
        };
        let exporter = || {
            let mut out = [0; auth::EXPORTER_LEN];
            self.conn
                .export_keying_material(&mut out, auth::EXPORTER_LABEL, b"")
                .ok()
                .map(|()| out)
        };
        let outcome = self.delivery.authenticate(&self.peer, decode, exporter);
        call.answer(&mut results, outcome, |r, identity| {
            let session: session::Client = capnp_rpc::new_client(SessionImpl {
                delivery: self.delivery.clone(),
                peer: self.peer.clone(),
                identity,
                calls: self.calls.clone(),
            });
            r.get().set_session(session);
        })
    }
}

/// An authenticated session, bound to one identity.
struct SessionImpl {
    delivery: Rc<Delivery>,
    peer: Rc<Peer>,
    identity: IdentityKey,
    calls: Rc<Calls>,
}

impl session::Server for SessionImpl {
    async fn register(
        self: Rc<Self>,
        params: session::RegisterParams,
        mut results: session::RegisterResults,
    ) -> Result<(), capnp::Error> {
        let call = begin(&self.calls, &self.delivery, "register")?;
        let outcome = async {
            let name = text(params.get()?.get_username()?, "username")?;
            self.delivery.register(self.identity, name).await
        }
        .await;
        call.answer(&mut results, outcome, |_, ()| {})
    }

    async fn resolve(
        self: Rc<Self>,
        params: session::ResolveParams,
        mut results: session::ResolveResults,
    ) -> Result<(), capnp::Error> {
        let call = begin(&self.calls, &self.delivery, "resolve")?;
        let outcome = async {
            let name = text(params.get()?.get_username()?, "username")?;
            self.delivery.resolve(name).await
        }
        .await;
        call.answer(&mut results, outcome, |r, key| {
            r.get().set_identity_key(key.as_bytes())
        })
    }

    async fn publish_key_packages(
        self: Rc<Self>,
        params: session::PublishKeyPackagesParams,
        mut results: session::PublishKeyPackagesResults,
    ) -> Result<(), capnp::Error> {
        let call = begin(&self.calls, &self.delivery, "publishKeyPackages")?;
        let outcome = async {
            let list = params.get()?.get_key_packages()?;
            let list = list.iter().map(|kp| kp.map_err(ApiError::from)).collect();
            self.delivery
                .publish_key_packages(self.identity, list)
                .await
        }
        .await;
        call.answer(&mut results, outcome, |r, n| r.get().set_stored(n))
    }

    async fn fetch_key_package(
        self: Rc<Self>,
        params: session::FetchKeyPackageParams,
        mut results: session::FetchKeyPackageResults,
    ) -> Result<(), capnp::Error> {
        let call = begin(&self.calls, &self.delivery, "fetchKeyPackage")?;
        let target = || Ok(params.get()?.get_identity_key()?);
        let outcome = self
            .delivery
            .fetch_key_package(self.identity, &self.peer, target)
            .await;
        call.answer(&mut results, outcome, |r, kp| {
            let mut r = r.get();
            r.set_key_package(&kp.data);
            r.set_last_resort(kp.last_resort);
        })
    }

    async fn key_package_count(
        self: Rc<Self>,
        _params: session::KeyPackageCountParams,
        mut results: session::KeyPackageCountResults,
    ) -> Result<(), capnp::Error> {
        let call = begin(&self.calls, &self.delivery, "keyPackageCount")?;
        let outcome = self.delivery.key_package_count(self.identity).await;
        call.answer(&mut results, outcome, |r, (count, last_resort)| {
            let mut r = r.get();
            r.set_count(count);
            r.set_has_last_resort(last_resort);
        })
    }

    async fn enqueue(
        self: Rc<Self>,
        params: session::EnqueueParams,
        mut results: session::EnqueueResults,
    ) -> Result<(), capnp::Error> {
        let call = begin(&self.calls, &self.delivery, "enqueue")?;
        let decode = || -> Decoded<EnqueueCall<'_>> {
            let p = params.get()?;
            enqueue_call(
                p.get_recipients()?,
                p.get_message_id(),
                p.get_payload(),
                p.get_tokens()?,
            )
        };
        let outcome = self
            .delivery
            .enqueue(self.identity, &self.peer, decode)
            .await;
        call.answer(&mut results, outcome, |r, outcome| {
            let r = r.get();
            match outcome {
                EnqueueOutcome::Stored { seqs } => {
                    write_seqs(r.init_seqs(list_len(seqs.len())), &seqs)
                }
                _ => {
                    let mut r = r;
                    r.set_duplicate(true);
                }
            }
        })
    }

    async fn enqueue_batch(
        self: Rc<Self>,
        params: session::EnqueueBatchParams,
        mut results: session::EnqueueBatchResults,
    ) -> Result<(), capnp::Error> {
        let call = begin(&self.calls, &self.delivery, "enqueueBatch")?;
        let decode = || -> Decoded<Vec<Decoded<EnqueueCall<'_>>>> {
            let messages = params.get()?.get_messages()?;
            Ok(messages
                .iter()
                .map(|m| {
                    enqueue_call(
                        m.get_recipients()?,
                        m.get_message_id(),
                        m.get_payload(),
                        m.get_tokens()?,
                    )
                })
                .collect())
        };
        let outcome = self
            .delivery
            .enqueue_batch(self.identity, &self.peer, decode)
            .await;
        let metrics = call.metrics.clone();
        call.answer(&mut results, outcome, |r, outcomes| {
            let mut list = r.get().init_results(list_len(outcomes.len()));
            for (i, outcome) in outcomes.into_iter().enumerate() {
                let mut slot = list.reborrow().get(list_len(i));
                match outcome {
                    Ok(EnqueueOutcome::Stored { seqs }) => {
                        write_seqs(slot.init_seqs(list_len(seqs.len())), &seqs);
                    }
                    Ok(_) => slot.set_duplicate(true),
                    Err(e) => {
                        metrics.item_refused("enqueueBatch", e.code_name());
                        e.write(slot.init_error(), "enqueueBatch");
                    }
                }
            }
        })
    }

    async fn set_delivery_token(
        self: Rc<Self>,
        params: session::SetDeliveryTokenParams,
        mut results: session::SetDeliveryTokenResults,
    ) -> Result<(), capnp::Error> {
        let call = Call::timed(&self.delivery, "setDeliveryToken");
        let token = params
            .get()
            .and_then(|p| p.get_token())
            .map_err(ApiError::from);
        let outcome = self.delivery.set_delivery_token(self.identity, token).await;
        call.answer(&mut results, outcome, |_, ()| {})
    }

    async fn fetch(
        self: Rc<Self>,
        params: session::FetchParams,
        mut results: session::FetchResults,
    ) -> Result<(), capnp::Error> {
        let call = begin(&self.calls, &self.delivery, "fetch")?;
        let outcome = async {
            let p = params.get()?;
            self.delivery
                .fetch(
                    self.identity,
                    p.get_recipient()?,
                    p.get_from_seq(),
                    p.get_limit(),
                )
                .await
        }
        .await;
        let incarnation = self.delivery.incarnation();
        call.answer(&mut results, outcome, |r, msgs| {
            let mut r = r.get();
            r.set_incarnation(&incarnation);
            write_envelopes(r.init_messages(list_len(msgs.len())), &msgs, &incarnation)
        })
    }

    async fn ack(
        self: Rc<Self>,
        params: session::AckParams,
        mut results: session::AckResults,
    ) -> Result<(), capnp::Error> {
        let call = begin(&self.calls, &self.delivery, "ack")?;
        let outcome = async {
            let p = params.get()?;
            self.delivery
                .ack(
                    self.identity,
                    p.get_recipient()?,
                    p.get_up_to_seq(),
                    p.get_incarnation()?,
                )
                .await
        }
        .await;
        call.answer(&mut results, outcome, |r, n| r.get().set_removed(n))
    }

    async fn subscribe(
        self: Rc<Self>,
        params: session::SubscribeParams,
        mut results: session::SubscribeResults,
    ) -> Result<(), capnp::Error> {
        let call = begin(&self.calls, &self.delivery, "subscribe")?;
        let outcome = params.get().map_err(ApiError::from).and_then(|p| {
            self.delivery.subscribe(
                self.identity,
                &self.peer,
                p.get_recipient()?,
                p.get_from_seq(),
                p.get_listener().map_err(ApiError::from),
            )
        });
        call.answer(&mut results, outcome, |r, (sub, listener)| {
            let (cancel_tx, cancel_rx) = oneshot::channel();
            let drain = self.calls.drain();
            let mut r = r.get();
            r.set_incarnation(&sub.incarnation());
            tokio::task::spawn_local(push(sub, listener, cancel_rx, drain));
            r.set_subscription(capnp_rpc::new_client(SubscriptionImpl {
                _cancel: cancel_tx,
            }));
        })
    }
}

/// Dropping it (the client released the capability, or the connection ended)
/// cancels the subscription's push task.
struct SubscriptionImpl {
    _cancel: oneshot::Sender<()>,
}

impl quicnprotochat_proto::schema::subscription::Server for SubscriptionImpl {}

/// First wait before a subscription reads its queue again after a failed
/// read; it doubles up to [`PUSH_RETRY_MAX`].
const PUSH_RETRY_FIRST: Duration = Duration::from_millis(100);

/// Longest wait between a subscription's reads while the store fails.
const PUSH_RETRY_MAX: Duration = Duration::from_secs(2);

/// Pushes each batch of the subscription to the client's listener, one
/// `deliver` at a time, until the client or the connection goes away or the
/// server drains (the client resubscribes from its last sequence number on
/// its next connection).  A failed read of the queue is tried again, with
/// backoff, for as long as the subscription lives.
async fn push(
    mut sub: Subscription,
    listener: listener::Client,
    mut cancel: oneshot::Receiver<()>,
    mut drain: DrainSignal,
) {
    let mut retry = PUSH_RETRY_FIRST;
    loop {
        let batch = match sub.next_batch().await {
            Ok(b) => {
                retry = PUSH_RETRY_FIRST;
                b
            }
            Err(e) => {
                // The store is down or slow (its outage is logged and
                // makes the node not ready): read again once it may be
                // back, rather than end a subscription the client would
                // have to notice and renew.
                if retry == PUSH_RETRY_FIRST {
                    tracing::warn!(error = ?e, "subscription: store read failed; retrying");
                }
                tokio::select! {
                    () = tokio::time::sleep(retry) => {}
                    _ = &mut cancel => break,
                    _ = drain.wait() => break,
                }
                retry = (retry * 2).min(PUSH_RETRY_MAX);
                continue;
            }
        };
        if !batch.is_empty() {
            let mut req = listener.deliver_request();
            write_envelopes(
                req.get().init_messages(list_len(batch.len())),
                &batch,
                &sub.incarnation(),
            );
            sub.pushed(&batch);
            drop(batch);
            tokio::select! {
                r = req.send().promise => if r.is_err() { break },
                _ = &mut cancel => break,
                _ = drain.wait() => break,
            }
            continue;
        }
        tokio::select! {
            changed = sub.changed() => if !changed { break },
            _ = &mut cancel => break,
            _ = drain.wait() => break,
        }
    }
}
