//! The agent's HTTP endpoints: `/healthz` (the process serves), `/readyz`
//! (the initial sync has been applied to the datapath) and `/metrics`.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
#[error("listening on {addr} for /healthz, /readyz and /metrics (choose another --metrics-addr)")]
pub struct ServerError {
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// A [`ServerError`], for tests of how errors print.
pub fn serve_error(addr: SocketAddr, source: std::io::Error) -> ServerError {
    ServerError { addr, source }
}

/// Binds `addr` now, so a port in use fails the start, and serves in the
/// background.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<SocketAddr, ServerError> {
    let listener = TcpListener::bind(addr).await.map_err(|source| ServerError { addr, source })?;
    let bound = listener.local_addr().map_err(|source| ServerError { addr, source })?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, Infallible>(respond(&request, &metrics)) }
                });
                // A client hanging up mid-request is not our problem.
                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    Ok(bound)
}

fn respond<B>(request: &Request<B>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response
    };
    if request.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" if metrics.ready() => text(StatusCode::OK, "ready\n".into()),
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the initial node sync has not been applied to the datapath yet\n".into(),
        ),
        "/metrics" => {
            let mut response = text(StatusCode::OK, metrics.encode());
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            response
        }
        _ => text(StatusCode::NOT_FOUND, "endpoints: /healthz /readyz /metrics\n".into()),
    }
}
