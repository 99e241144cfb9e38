//! The metrics endpoint's HTTP side: `GET /metrics` over HTTP/1 on a TCP
//! address, nothing else (404 elsewhere, 405 for another method). Whoever
//! reaches the address may scrape: bind it to a loopback or management
//! address. Bounded: a few connections at a time, one request each, each
//! connection closed after a deadline.
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};

use super::{Format, Metrics};
use crate::registry::Registry;

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 4;
/// How long one connection (request and response) may take.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// The most a request's head may take (hyper's minimum).
const MAX_REQUEST_BUFFER: usize = 8192;
/// The pause after a failed accept (such as too many open files).
const ACCEPT_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum BindMetricsError {
    #[error("bind the metrics endpoint to {address} (`metrics.address`)")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// Binds the endpoint's address (at start-up, before anything else is
/// done, so that a taken address stops kuasar-vmm before it touches a VM).
pub fn bind(address: SocketAddr) -> Result<tokio::net::TcpListener, BindMetricsError> {
    let err = |source| BindMetricsError::Bind { address, source };
    let listener = std::net::TcpListener::bind(address).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    tokio::net::TcpListener::from_std(listener).map_err(err)
}

/// Serves scrapes on `listener` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    sandboxes: Arc<Registry>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("accept on the metrics endpoint: {e}");
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        let (metrics, sandboxes) = (metrics.clone(), sandboxes.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let res = respond(&req, &metrics, &sandboxes);
                async move { Ok::<_, Infallible>(res) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .max_buf_size(MAX_REQUEST_BUFFER)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!("metrics connection: {e}"),
                Err(_) => tracing::debug!("metrics connection timed out"),
            }
            drop(slot);
        });
    }
}

/// The answer to one request.
fn respond(req: &Request<Incoming>, metrics: &Metrics, sandboxes: &Registry) -> Response<String> {
    if req.uri().path() != "/metrics" {
        return plain(StatusCode::NOT_FOUND, "not found: try GET /metrics\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut res = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        res.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return res;
    }
    let accept = req.headers().get(ACCEPT).and_then(|v| v.to_str().ok());
    let format = Format::from_accept(accept);
    match metrics.render(&sandboxes.all(), sandboxes.host.pool.as_deref(), format) {
        Ok(text) => {
            let mut res = Response::new(text);
            res.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(format.content_type()),
            );
            res
        }
        Err(e) => {
            tracing::warn!("encode the metrics: {e}");
            plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot encode the metrics\n",
            )
        }
    }
}

fn plain(status: StatusCode, text: &str) -> Response<String> {
    let mut res = Response::new(text.to_owned());
    *res.status_mut() = status;
    res.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Sends `request` and reads the whole answer (the server closes).
    async fn ask(address: SocketAddr, request: &str) -> String {
        let mut conn = tokio::net::TcpStream::connect(address).await.unwrap();
        conn.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        conn.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn only_get_metrics_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let host = Arc::new(crate::host::Host::for_tests(dir.path()));
        let sandboxes = Arc::new(Registry::new(host));
        let metrics = Arc::new(Metrics::new());
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, metrics, sandboxes));

        let res = ask(address, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(res.starts_with("HTTP/1.1 200 OK\r\n"), "{res}");
        assert!(
            res.contains("content-type: text/plain; version=0.0.4"),
            "{res}"
        );
        assert!(
            res.contains("kuasar_sandboxes{mode=\"shim\",state=\"running\"} 0"),
            "{res}"
        );
        assert!(!res.contains("# EOF"), "{res}");

        let res = ask(
            address,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0\r\n\r\n",
        )
        .await;
        assert!(
            res.contains("content-type: application/openmetrics-text"),
            "{res}"
        );
        assert!(res.ends_with("# EOF\n"), "{res}");

        let res = ask(address, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(res.starts_with("HTTP/1.1 404 Not Found\r\n"), "{res}");
        let res = ask(
            address,
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        assert!(
            res.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{res}"
        );
        assert!(res.contains("allow: GET, HEAD"), "{res}");
        let res = ask(address, "not http at all\r\n\r\n").await;
        assert!(res.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{res}");
        server.abort();
    }

    #[tokio::test]
    async fn a_taken_address_names_the_setting() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = taken.local_addr().unwrap();
        let err = bind(address).unwrap_err();
        let text = crate::error::chain(&err);
        assert!(text.contains("`metrics.address`"), "{text}");
        assert!(text.contains(&address.to_string()), "{text}");
    }
}
