//! The operator's HTTP endpoint (`--metrics-listen`): Prometheus metrics
//! at `/metrics`, and the liveness and readiness probes Kubernetes expects
//! at `/livez` and `/readyz`.
//!
//! It is off by default and meant for a loopback or private address (it
//! has no authentication; production mode refuses a public address unless
//! the operator says so with `metrics_public`).  Whoever reaches it is
//! still treated as a stranger: `GET` on three paths only, small headers,
//! a few connections at a time, each for a bounded time.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::delivery::Delivery;
use crate::drain::DrainSignal;

/// Connections served at once; more are closed at once.  Prometheus and a
/// probe or two need a handful.
const MAX_CONNECTIONS: usize = 16;

/// Longest life of one connection, keep-alive included: a client that
/// trickles its request or idles is cut off.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// Time to read a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest request head taken (hyper's smallest allowed buffer).
const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// The OpenMetrics text format's media type.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves the endpoint on `listener` until the task is dropped.  Runs on
/// the server's `LocalSet`.
pub(crate) async fn serve(listener: TcpListener, delivery: Rc<Delivery>, drain: DrainSignal) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors, most likely: wait, do not spin.
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let delivery = delivery.clone();
        let drain = drain.clone();
        tokio::task::spawn_local(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let delivery = delivery.clone();
                let drain = drain.clone();
                async move { Ok::<_, Infallible>(respond(&delivery, &drain, req).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_REQUEST_BYTES)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
        });
    }
}

/// Binds the endpoint's address (at start-up, so a taken port stops the
/// server before it serves).
pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpListener, std::io::Error> {
    TcpListener::bind(addr).await
}

async fn respond(
    delivery: &Delivery,
    drain: &DrainSignal,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match req.uri().path() {
        "/livez" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            if drain.started() {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: shutting down\n",
                );
            }
            let health = delivery.health().await;
            if health.ok {
                text(StatusCode::OK, "ready\n")
            } else if health.store_reachable {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: the database is damaged\n",
                )
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: the store does not take writes\n",
                )
            }
        }
        "/metrics" => {
            delivery.refresh_gauges().await;
            match delivery.metrics.encode() {
                Ok(body) => {
                    let mut r = Response::new(Full::new(Bytes::from(body)));
                    r.headers_mut()
                        .insert(CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS));
                    r
                }
                Err(_) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the metrics could not be encoded\n",
                ),
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /metrics, /livez, /readyz\n",
        ),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
