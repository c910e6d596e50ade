//! The bounded HTTP/1 server of the metrics endpoint (hyper).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::{MetricsConfig, Readiness};
use crate::Service;

/// The content type of `/metrics`: what `prometheus-client` writes.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";
/// The classic Prometheus text format, for scrapers that do not ask for OpenMetrics.
const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves the metrics endpoint on `listener` until `shutdown` resolves. Each connection
/// runs in a task of its own, within `config`'s bounds (see the [module](super)).
pub async fn serve(
    listener: TcpListener,
    service: Arc<Service>,
    readiness: Readiness,
    config: MetricsConfig,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let places = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let readiness = Arc::new(readiness);
    let config = Arc::new(config);
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors and the like: back off rather than spin.
                tracing::warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        if !config.allow.iter().any(|c| c.contains(peer.ip())) {
            tracing::debug!("metrics endpoint: refused {peer}: not in the allowed ranges");
            continue;
        }
        // Full: closed at once, so a flood of scrapers holds no more than the cap.
        let Ok(place) = places.clone().try_acquire_owned() else {
            tracing::debug!("metrics endpoint: refused {peer}: all places in use");
            continue;
        };
        let (service, readiness, config) = (service.clone(), readiness.clone(), config.clone());
        tasks.spawn(async move {
            let _place = place;
            let _ = stream.set_nodelay(true);
            let handler = hyper::service::service_fn(move |req| {
                let (service, readiness) = (service.clone(), readiness.clone());
                async move { Ok::<_, Infallible>(respond(req, &service, &readiness).await) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(config.header_timeout)
                .max_buf_size(config.max_request_bytes.max(8192));
            let conn = builder.serve_connection(TokioIo::new(stream), handler);
            // Past the deadline the connection is dropped, whatever it is doing.
            let _ = tokio::time::timeout(config.connection_timeout, conn).await;
        });
        while tasks.try_join_next().is_some() {}
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

/// The answer to one request. Only GET and HEAD of the three paths; the request body,
/// if any, is never read.
async fn respond(
    req: Request<Incoming>,
    service: &Arc<Service>,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "only GET and HEAD\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => {
            let wants_open_metrics = req
                .headers()
                .get_all(hyper::header::ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.contains("application/openmetrics-text"));
            if wants_open_metrics {
                reply(StatusCode::OK, OPENMETRICS, super::render(service))
            } else {
                reply(StatusCode::OK, CLASSIC, super::render_classic(service))
            }
        }
        "/healthz" => reply(StatusCode::OK, TEXT, "alive\n".into()),
        "/readyz" => match readiness.check(service).await {
            Ok(body) => reply(StatusCode::OK, TEXT, format!("ready\n{body}")),
            Err(body) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!("not ready\n{body}"),
            ),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}
