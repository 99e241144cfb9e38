//! Which containerd release kuasar-vmm serves, asked once at start over
//! containerd's gRPC socket (`containerd.services.version.v1.Version`, the
//! call `ctr version` makes), to warn about releases known to misbehave
//! with one of the sandbox modes (docs/configuration.md, "containerd
//! releases").
use std::path::{Path, PathBuf};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use kuasar_api::grpc::version::version_client::VersionClient;

/// How long one attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// containerd may start after kuasar-vmm: tries this often, this far apart.
const ATTEMPTS: u32 = 30;
const RETRY_EVERY: Duration = Duration::from_secs(2);

/// A containerd release, as its Version answer names it (`v2.1.9`,
/// `2.3.4`, `v2.4.0-beta.0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Release {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl Release {
    pub fn parse(version: &str) -> Option<Release> {
        let v = version.trim().trim_start_matches('v');
        let core = v.split(['-', '+']).next()?;
        let mut parts = core.split('.').map(str::parse::<u32>);
        Some(Release {
            major: parts.next()?.ok()?,
            minor: parts.next()?.ok()?,
            patch: parts.next().unwrap_or(Ok(0)).ok()?,
        })
    }
}

/// What kuasar-vmm knows of a release's trouble with its sandbox modes, as
/// a warning to log; None for a release with none known.
pub fn known_trouble(r: Release) -> Option<&'static str> {
    // 2.1.9 measured; 2.3.4 measured fixed; 2.0 and 2.2 carry the same
    // bundle code as 2.1.
    if r.major == 2 && r.minor < 3 {
        return Some(
            "in the `shim` sandbox mode this containerd crashes (a nil pointer in \
             runtime/v2.NewBundle, before any runtime is called) on a pod asking for \
             hostNetwork, which takes down the CRI of every pod on the node: keep the \
             admission policy deploy/k8s/host-namespaces-policy.yaml in the cluster, or \
             use the `podsandbox` or zero-shim mode, or containerd 2.3 or later",
        );
    }
    None
}

/// containerd's gRPC socket, from its ttrpc one (`<grpc>.ttrpc`).
pub fn grpc_socket(ttrpc_address: &str) -> Option<PathBuf> {
    let path = ttrpc_address.trim_start_matches("unix://");
    path.strip_suffix(".ttrpc").map(PathBuf::from)
}

/// Asks containerd on `socket` for its version.
pub async fn ask(socket: &Path) -> anyhow::Result<String> {
    let stream = tokio::net::UnixStream::connect(socket).await?;
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    let driver = tokio::spawn(conn);
    let mut client = VersionClient::with_origin(Http2(sender), "http://containerd".parse()?);
    let answer = client.version(()).await;
    driver.abort();
    Ok(answer?.into_inner().version)
}

/// Logs which containerd serves `ttrpc_address` and warns when that
/// release is known to misbehave; retries while containerd is not up yet.
pub async fn check(ttrpc_address: String) {
    let Some(socket) = grpc_socket(&ttrpc_address) else {
        tracing::debug!(%ttrpc_address, "containerd's gRPC socket is not known: its version is not checked");
        return;
    };
    let mut last_error = String::new();
    for _ in 0..ATTEMPTS {
        match tokio::time::timeout(ATTEMPT_TIMEOUT, ask(&socket)).await {
            Ok(Ok(version)) => {
                report(&socket, &version);
                return;
            }
            Ok(Err(e)) => last_error = format!("{e:#}"),
            Err(_) => last_error = format!("no answer within {ATTEMPT_TIMEOUT:?}"),
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
    tracing::info!(socket = %socket.display(), "containerd's version is unknown: {last_error}");
}

fn report(socket: &Path, version: &str) {
    match Release::parse(version).and_then(known_trouble) {
        Some(trouble) => {
            tracing::warn!(socket = %socket.display(), version, "containerd {version}: {trouble}")
        }
        None => tracing::info!(socket = %socket.display(), version, "containerd version"),
    }
}

/// tonic's client on hyper's HTTP/2 connection (one request at a time).
struct Http2(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl tower_service::Service<http::Request<tonic::body::Body>> for Http2 {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases() {
        let r = |major, minor, patch| Release {
            major,
            minor,
            patch,
        };
        assert_eq!(Release::parse("v2.1.9"), Some(r(2, 1, 9)));
        assert_eq!(Release::parse("2.3.4\n"), Some(r(2, 3, 4)));
        assert_eq!(Release::parse("v2.4.0-beta.0"), Some(r(2, 4, 0)));
        assert_eq!(Release::parse("v2.2"), Some(r(2, 2, 0)));
        assert_eq!(Release::parse("1.7.27+unknown"), Some(r(1, 7, 27)));
        assert_eq!(Release::parse("devel"), None);
        assert_eq!(Release::parse(""), None);
    }

    #[test]
    fn trouble_before_2_3_only() {
        for v in ["v2.0.5", "v2.1.9", "2.2.0"] {
            let t = known_trouble(Release::parse(v).unwrap());
            assert!(t.is_some_and(|t| t.contains("hostNetwork")), "{v}");
        }
        for v in ["v2.3.0", "v2.3.4", "v2.4.0-beta.0", "v1.7.27"] {
            assert_eq!(known_trouble(Release::parse(v).unwrap()), None, "{v}");
        }
    }

    #[test]
    fn grpc_socket_from_ttrpc() {
        assert_eq!(
            grpc_socket("/run/containerd/containerd.sock.ttrpc"),
            Some(PathBuf::from("/run/containerd/containerd.sock"))
        );
        assert_eq!(
            grpc_socket("unix:///x/c.sock.ttrpc"),
            Some(PathBuf::from("/x/c.sock"))
        );
        assert_eq!(grpc_socket("/run/other.sock"), None);
    }

    #[tokio::test]
    async fn no_containerd_is_an_error() {
        let e = ask(Path::new("/nonexistent/containerd.sock")).await;
        assert!(e.is_err());
    }
}
