//! The server's Prometheus metrics (OpenMetrics text, through the
//! Prometheus project's `prometheus-client`), served by [`crate::http`].
//!
//! **No label carries a user's identity, username, address or message id.**
//! Every label value is a `&'static str` (the [`Labels`] types), so only
//! names written in this source can become label values: nothing a peer
//! sends or owns can.  Metrics about users are counts and distributions
//! over all of them.
//!
//! Every metric is described in the operations guide ("Metrics"), beside
//! the alert it feeds (`docs/monitoring/alerts.yml`); a test checks that
//! the dashboard and the alerts name only metrics the server exports.

use std::fmt;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

/// The prefix of every metric name.
pub const PREFIX: &str = "quicnprotochat";

/// The git revision the server was built from (`unknown` outside a git
/// checkout, unless the build sets `QUICNPROTOCHAT_GIT_REVISION`).
pub const GIT_REVISION: &str = env!("QUICNPROTOCHAT_GIT_REVISION");

/// One label whose value is a name from this source.
pub type Labels = [(&'static str, &'static str); 1];
/// Two such labels.
pub type Labels2 = [(&'static str, &'static str); 2];

type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// The RPC methods, as the protocol names them.
pub const METHODS: [&str; 14] = [
    "health",
    "challenge",
    "authenticate",
    "register",
    "resolve",
    "publishKeyPackages",
    "fetchKeyPackage",
    "keyPackageCount",
    "enqueue",
    "enqueueBatch",
    "setDeliveryToken",
    "fetch",
    "ack",
    "subscribe",
];

/// Why a connection is turned away.
pub const REFUSAL_REASONS: [&str; 5] = [
    "max_connections",
    "max_connections_per_ip",
    "shutting_down",
    "handshake_failed",
    "handshake_timeout",
];

/// How a connection ends: the client closed its session (`normal`), the
/// connection was lost or timed out (`lost`), the stream broke the
/// protocol's limits, the client did not log in in time, the server
/// stopped.
pub const CLOSE_REASONS: [&str; 5] = [
    "normal",
    "lost",
    "protocol_error",
    "auth_timeout",
    "shutdown",
];

/// Outcomes of `authenticate` a client meets: `ok` or an error code.
pub const LOGIN_OUTCOMES: [&str; 5] = [
    "ok",
    "unauthenticated",
    "rateLimited",
    "versionMismatch",
    "invalidArgument",
];

/// The rate-limit buckets, named as their settings (`limits.rates.*`).
pub const RATE_BUCKETS: [&str; 6] = [
    "auth_per_ip",
    "auth_per_identity",
    "enqueue_per_identity",
    "enqueue_per_ip",
    "key_package_fetch_per_identity",
    "key_package_fetch_per_ip",
];

/// Kinds of failed store operations: the database is damaged; no
/// database connection or store worker; no answer within the request
/// deadline; anything else.
pub const STORE_ERROR_KINDS: [&str; 4] = ["damaged", "unavailable", "timeout", "other"];

/// Latency buckets: 100 µs to about 6.5 s, doubling.
fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.000_1, 2.0, 17))
}

/// Push lag buckets: 1 ms to about 65 s, doubling (a message waits for
/// its recipient's next push, which an overloaded node delays).
fn lag_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Jobs per store transaction: 1 to 1024, doubling.
fn batch_buckets() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 11))
}

/// What the store reports about its commits, shared with the store's
/// threads (every handle counts into the same metrics).
#[derive(Debug, Clone)]
pub struct StoreMetrics {
    /// a write transaction, from its start to its commit's end
    pub transaction_seconds: Histogram,
    /// the COMMIT alone: writing the log and the fsync that makes it
    /// durable
    pub commit_seconds: Histogram,
    /// jobs (client writes) made durable by one commit
    pub batch_size: Histogram,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        Self {
            transaction_seconds: latency_buckets(),
            commit_seconds: latency_buckets(),
            batch_size: batch_buckets(),
        }
    }
}

impl StoreMetrics {
    /// Records one transaction of `jobs` jobs that took `total`, of which
    /// its COMMIT took `commit`.
    pub fn transaction(&self, jobs: usize, total: Duration, commit: Duration) {
        self.transaction_seconds.observe(total.as_secs_f64());
        self.commit_seconds.observe(commit.as_secs_f64());
        self.batch_size.observe(jobs as f64);
    }
}

/// Every metric of one server.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// QUIC connections open now
    pub(crate) connections_open: Gauge,
    /// connections admitted (the handshake may still fail)
    pub(crate) connections_accepted: Counter,
    /// connections turned away, by `reason`
    pub(crate) connections_refused: Family<Labels, Counter>,
    /// connections ended, by `reason`
    pub(crate) connections_closed: Family<Labels, Counter>,
    /// `authenticate` answers, by `outcome` (`ok` or the error code)
    pub(crate) authentications: Family<Labels, Counter>,
    /// RPC calls answered, by `method`
    pub(crate) rpc_calls: Family<Labels, Counter>,
    /// RPC calls refused, by `method` and error `code`
    pub(crate) rpc_errors: Family<Labels2, Counter>,
    /// time from a call's start to its answer, by `method`
    pub(crate) rpc_seconds: Histograms,
    /// queue entries stored (one per recipient of each message)
    pub(crate) messages_enqueued: Counter,
    /// sends that were retries of a stored message
    pub(crate) enqueue_duplicates: Counter,
    /// messages handed out by `fetch`
    pub(crate) messages_fetched: Counter,
    /// messages removed by `ack`
    pub(crate) messages_acknowledged: Counter,
    /// messages written to subscribers
    pub(crate) messages_pushed: Counter,
    /// enqueue to push written
    pub(crate) push_lag_seconds: Histogram,
    /// reads of the store by push subscriptions (what the hub's buffer
    /// did not hold)
    pub(crate) push_store_reads: Counter,
    /// live push subscriptions
    pub(crate) subscriptions: Gauge,
    /// messages waiting in all queues (read from the store at a scrape)
    pub(crate) queued_messages: Gauge,
    /// messages in the fullest queue
    pub(crate) largest_queue: Gauge,
    /// the configured per-queue cap
    pub(crate) queue_depth_limit: Gauge,
    /// requests refused by a rate limit, by `bucket`
    pub(crate) rate_limited: Family<Labels, Counter>,
    /// key packages handed out
    pub(crate) key_packages_served: Counter,
    /// of which the identity's last-resort package (its one-time stock
    /// was empty)
    pub(crate) key_packages_last_resort: Counter,
    /// store operations that failed, by `kind`
    pub(crate) store_errors: Family<Labels, Counter>,
    /// 1 when ready (the store takes writes, nothing found damaged)
    pub(crate) ready: Gauge,
    /// the store's commit figures
    pub(crate) store: StoreMetrics,
}

impl Metrics {
    /// The metrics of a server whose store is `store_backend` (`sqlite` or
    /// `postgres`), counting into `store` (the store's own handle).
    pub fn new(store_backend: &'static str, store: StoreMetrics) -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let m = Self {
            registry: Registry::default(),
            connections_open: Gauge::default(),
            connections_accepted: Counter::default(),
            connections_refused: Family::default(),
            connections_closed: Family::default(),
            authentications: Family::default(),
            rpc_calls: Family::default(),
            rpc_errors: Family::default(),
            rpc_seconds: Family::new_with_constructor(latency_buckets),
            messages_enqueued: Counter::default(),
            enqueue_duplicates: Counter::default(),
            messages_fetched: Counter::default(),
            messages_acknowledged: Counter::default(),
            messages_pushed: Counter::default(),
            push_lag_seconds: lag_buckets(),
            push_store_reads: Counter::default(),
            subscriptions: Gauge::default(),
            queued_messages: Gauge::default(),
            largest_queue: Gauge::default(),
            queue_depth_limit: Gauge::default(),
            rate_limited: Family::default(),
            key_packages_served: Counter::default(),
            key_packages_last_resort: Counter::default(),
            store_errors: Family::default(),
            ready: Gauge::default(),
            store,
        };
        let r = &mut registry;
        r.register(
            "build",
            "The running server: version, git revision, store backend",
            Info::new([
                ("version", quicnprotochat_proto::SOFTWARE_VERSION),
                ("revision", GIT_REVISION),
                ("store", store_backend),
            ]),
        );
        r.register(
            "ready",
            "1 when the server is ready: the store takes a write and a read, and nothing in it was found damaged",
            m.ready.clone(),
        );
        r.register(
            "connections_open",
            "QUIC connections open now",
            m.connections_open.clone(),
        );
        r.register(
            "connections_accepted",
            "Connections admitted past the connection caps",
            m.connections_accepted.clone(),
        );
        r.register(
            "connections_refused",
            "Connections turned away, by reason: max_connections, max_connections_per_ip, shutting_down, handshake_failed, handshake_timeout",
            m.connections_refused.clone(),
        );
        r.register(
            "connections_closed",
            "Connections ended by the server or the client, by reason: normal, protocol_error, auth_timeout, shutdown",
            m.connections_closed.clone(),
        );
        r.register(
            "authentications",
            "Answers to authenticate, by outcome: ok or the error code",
            m.authentications.clone(),
        );
        r.register(
            "rpc_calls",
            "RPC calls answered, by method",
            m.rpc_calls.clone(),
        );
        r.register(
            "rpc_errors",
            "RPC calls answered with an error, by method and error code",
            m.rpc_errors.clone(),
        );
        r.register_with_unit(
            "rpc_duration",
            "Time from an RPC call's start to its answer, by method",
            Unit::Seconds,
            m.rpc_seconds.clone(),
        );
        r.register(
            "messages_enqueued",
            "Queue entries stored: one per recipient of each message",
            m.messages_enqueued.clone(),
        );
        r.register(
            "enqueue_duplicates",
            "Sends recognised as retries of a stored message (not stored again)",
            m.enqueue_duplicates.clone(),
        );
        r.register(
            "messages_fetched",
            "Messages handed out by fetch",
            m.messages_fetched.clone(),
        );
        r.register(
            "messages_acknowledged",
            "Messages removed from their queue by ack",
            m.messages_acknowledged.clone(),
        );
        r.register(
            "messages_pushed",
            "Messages written to push subscribers",
            m.messages_pushed.clone(),
        );
        r.register_with_unit(
            "push_lag",
            "Time from a message's enqueue to its push being written to a subscriber",
            Unit::Seconds,
            m.push_lag_seconds.clone(),
        );
        r.register(
            "push_store_reads",
            "Reads of the store by push subscriptions, for what the in-memory push buffer did not hold (a subscription's first read, a resume, a gap after an eviction, another node's commit)",
            m.push_store_reads.clone(),
        );
        r.register(
            "subscriptions",
            "Live push subscriptions",
            m.subscriptions.clone(),
        );
        r.register(
            "queued_messages",
            "Messages waiting in all queues (read from the store at a scrape, at most once a second)",
            m.queued_messages.clone(),
        );
        r.register(
            "largest_queue_messages",
            "Messages waiting in the fullest queue",
            m.largest_queue.clone(),
        );
        r.register(
            "queue_depth_limit_messages",
            "The configured cap of messages per queue (limits.queue_depth)",
            m.queue_depth_limit.clone(),
        );
        r.register(
            "rate_limited",
            "Requests refused by a rate limit, by bucket",
            m.rate_limited.clone(),
        );
        r.register(
            "key_packages_served",
            "Key packages handed out by fetchKeyPackage",
            m.key_packages_served.clone(),
        );
        r.register(
            "key_packages_last_resort",
            "Key packages handed out that were the identity's last-resort package (its one-time stock was empty)",
            m.key_packages_last_resort.clone(),
        );
        r.register(
            "store_errors",
            "Store operations that failed, by kind: damaged, unavailable, timeout, other",
            m.store_errors.clone(),
        );
        r.register_with_unit(
            "store_transaction",
            "Store write transactions, from their start to their commit's end",
            Unit::Seconds,
            m.store.transaction_seconds.clone(),
        );
        r.register_with_unit(
            "store_commit",
            "The COMMIT of each store write transaction: the log write and the fsync that makes it durable",
            Unit::Seconds,
            m.store.commit_seconds.clone(),
        );
        r.register(
            "store_batch_size",
            "Client writes made durable by one store commit (group commit)",
            m.store.batch_size.clone(),
        );
        // Every known series starts at zero, so that it exists before its
        // first event: rates and alerts see a change from 0, not a new
        // series.
        for reason in REFUSAL_REASONS {
            let _ = m.connections_refused.get_or_create(&[("reason", reason)]);
        }
        for reason in CLOSE_REASONS {
            let _ = m.connections_closed.get_or_create(&[("reason", reason)]);
        }
        for outcome in LOGIN_OUTCOMES {
            let _ = m.authentications.get_or_create(&[("outcome", outcome)]);
        }
        for method in METHODS {
            let _ = m.rpc_calls.get_or_create(&[("method", method)]);
            let _ = m.rpc_seconds.get_or_create(&[("method", method)]);
            let _ = m
                .rpc_errors
                .get_or_create(&[("method", method), ("code", "internal")]);
        }
        for bucket in RATE_BUCKETS {
            let _ = m.rate_limited.get_or_create(&[("bucket", bucket)]);
        }
        for kind in STORE_ERROR_KINDS {
            let _ = m.store_errors.get_or_create(&[("kind", kind)]);
        }
        Self { registry, ..m }
    }

    /// The exposition: OpenMetrics text, ending with `# EOF`.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut out = String::with_capacity(16 * 1024);
        encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// Counts a refused connection.
    pub(crate) fn refused(&self, reason: &'static str) {
        self.connections_refused
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// Counts an ended connection.
    pub(crate) fn closed(&self, reason: &'static str) {
        self.connections_closed
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// Counts one answered call of `method`, its error code if it failed,
    /// and how long it took.
    pub(crate) fn call(&self, method: &'static str, error: Option<&'static str>, took: Duration) {
        let m = [("method", method)];
        self.rpc_calls.get_or_create(&m).inc();
        self.rpc_seconds
            .get_or_create(&m)
            .observe(took.as_secs_f64());
        if let Some(code) = error {
            self.rpc_errors
                .get_or_create(&[("method", method), ("code", code)])
                .inc();
        }
        if method == "authenticate" {
            self.authentications
                .get_or_create(&[("outcome", error.unwrap_or("ok"))])
                .inc();
        }
    }

    /// Counts one message of a batch call refused with `code` (the call
    /// itself is counted by [`Self::call`]).
    pub(crate) fn item_refused(&self, method: &'static str, code: &'static str) {
        self.rpc_errors
            .get_or_create(&[("method", method), ("code", code)])
            .inc();
    }

    /// Counts a refusal by the rate limit `bucket`.
    pub(crate) fn rate_limited(&self, bucket: &'static str) {
        self.rate_limited.get_or_create(&[("bucket", bucket)]).inc();
    }

    /// Counts a failed store operation.
    pub(crate) fn store_error(&self, kind: &'static str) {
        self.store_errors.get_or_create(&[("kind", kind)]).inc();
    }
}

/// A gauge's value from a count.
pub(crate) fn gauge_value(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_family_with_its_prefix_and_ends_with_eof() {
        let m = Metrics::new("sqlite", StoreMetrics::default());
        m.call("enqueue", Some("queueFull"), Duration::from_millis(3));
        m.call("authenticate", None, Duration::from_millis(1));
        m.store
            .transaction(4, Duration::from_millis(2), Duration::from_millis(1));
        let text = m.encode().unwrap();
        assert!(text.ends_with("# EOF\n"), "{text}");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("quicnprotochat_"), "{line}");
        }
        assert!(
            text.contains(
                "quicnprotochat_rpc_errors_total{method=\"enqueue\",code=\"queueFull\"} 1"
            )
        );
        assert!(text.contains("quicnprotochat_authentications_total{outcome=\"ok\"} 1"));
        assert!(
            text.contains("quicnprotochat_store_batch_size_sum 4.0"),
            "{text}"
        );
        assert!(
            text.contains("quicnprotochat_build_info{version=\""),
            "{text}"
        );
    }
}
