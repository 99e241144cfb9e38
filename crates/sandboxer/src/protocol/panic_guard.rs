//! A panic in one request must cost that request only: the caller gets an
//! INTERNAL error, the panic is logged with the sandbox it concerned, and
//! the daemon and every other sandbox go on.
//!
//! Without this, tokio would still contain the panic (each ttrpc request and
//! each gRPC stream runs in a task), but the caller would get no status:
//! ttrpc drops the request silently (containerd waits for ever on calls
//! without a deadline), and a gRPC caller sees a broken stream.
//! The release profile keeps `panic = "unwind"` for this (an abort would
//! take every pod's sandboxer down), and std mutexes are locked with
//! `unwrap_or_else(|p| p.into_inner())` throughout, so a lock poisoned by a
//! panicking request does not poison the requests after it.
use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use async_trait::async_trait;
use kuasar_api::grpc::sandbox::controller_server::Controller;
use kuasar_api::grpc::sandbox::*;
use kuasar_api::SANDBOX_ID_METADATA;
use ttrpc::r#async::{MethodHandler, Service, TtrpcContext};

/// Polls a future, turning a panic in it into `Err(panic message)`.
struct CatchUnwind<F>(F);

impl<F: Future + Unpin> Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = &mut self.0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| Pin::new(inner).poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(payload) => Poll::Ready(Err(panic_message(payload.as_ref()))),
        }
    }
}

/// Runs `fut`, turning a panic in it into `Err(panic message)`.
pub async fn catch<T>(fut: impl Future<Output = T> + Send) -> Result<T, String> {
    CatchUnwind(Box::pin(fut)).await
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

/// What the caller of a request that panicked is told.
fn internal_message(method: &str, sandbox: &str, panic: &str) -> String {
    if sandbox.is_empty() {
        format!("internal error: {method} panicked: {panic}")
    } else {
        format!("internal error: {method} for sandbox {sandbox} panicked: {panic}")
    }
}

fn log_panic(method: &str, sandbox: &str, id: &str, panic: &str) {
    tracing::error!(
        sandbox,
        id,
        method,
        panic,
        "request handler panicked; answered INTERNAL, other requests and sandboxes go on"
    );
}

/// Wraps every method of ttrpc services so that a panic answers INTERNAL.
/// `sandbox` names the sandbox a per-sandbox server serves (zero-shim task
/// sockets); otherwise the request's [`SANDBOX_ID_METADATA`] metadata does.
pub fn ttrpc_services(
    services: HashMap<String, Service>,
    sandbox: Option<&str>,
) -> HashMap<String, Service> {
    services
        .into_iter()
        .map(|(name, service)| {
            let methods = service
                .methods
                .into_iter()
                .map(|(method, inner)| {
                    let path = format!("/{name}/{method}");
                    let guarded: Box<dyn MethodHandler + Send + Sync> = Box::new(GuardedMethod {
                        inner,
                        path,
                        sandbox: sandbox.map(str::to_owned),
                    });
                    (method, guarded)
                })
                .collect();
            // Streams (CRI's streaming stdio) run in tasks of their own in
            // ttrpc: a panic there ends that stream, and nothing else.
            let service = Service {
                methods,
                streams: service.streams,
            };
            (name, service)
        })
        .collect()
}

struct GuardedMethod {
    inner: Box<dyn MethodHandler + Send + Sync>,
    path: String,
    sandbox: Option<String>,
}

#[async_trait]
impl MethodHandler for GuardedMethod {
    async fn handler(
        &self,
        ctx: TtrpcContext,
        req: ttrpc::Request,
    ) -> ttrpc::Result<ttrpc::Response> {
        let sandbox = self.sandbox.clone().unwrap_or_else(|| {
            ctx.metadata
                .get(SANDBOX_ID_METADATA)
                .and_then(|v| v.first())
                .cloned()
                .unwrap_or_default()
        });
        let id = first_string_field(&req.payload);
        match catch(self.inner.handler(ctx, req)).await {
            Ok(res) => res,
            Err(panic) => {
                // A sandbox-level request names its sandbox in field 1.
                let sandbox = if sandbox.is_empty() { &id } else { &sandbox };
                log_panic(&self.path, sandbox, &id, &panic);
                let mut res = ttrpc::Response::new();
                res.set_status(ttrpc::get_status(
                    ttrpc::Code::INTERNAL,
                    internal_message(&self.path, sandbox, &panic),
                ));
                Ok(res)
            }
        }
    }
}

/// Field 1 of a protobuf message when it is a short printable string (the
/// sandbox or container id of every request that has one), for the log.
fn first_string_field(payload: &[u8]) -> String {
    // Tag: field 1, wire type 2 (length-delimited), then a one-byte length.
    match payload {
        [0x0a, len, rest @ ..] if (*len as usize) <= rest.len() && *len < 0x80 => {
            let s = &rest[..*len as usize];
            if s.iter().all(|b| b.is_ascii_graphic()) {
                String::from_utf8_lossy(s).into_owned()
            } else {
                String::new()
            }
        }
        _ => String::new(),
    }
}

/// containerd's Sandbox Controller with every call guarded: a panic answers
/// `Status::internal` naming the sandbox.
pub struct GuardedController<C>(pub std::sync::Arc<C>);

type GrpcResult<T> = Result<tonic::Response<T>, tonic::Status>;

async fn guarded_grpc<T>(
    method: &str,
    sandbox: String,
    fut: impl Future<Output = GrpcResult<T>> + Send,
) -> GrpcResult<T> {
    match catch(fut).await {
        Ok(res) => res,
        Err(panic) => {
            let path = format!("/{}/{method}", kuasar_api::services::CONTROLLER);
            log_panic(&path, &sandbox, &sandbox, &panic);
            Err(tonic::Status::internal(internal_message(
                &path, &sandbox, &panic,
            )))
        }
    }
}

macro_rules! guarded {
    ($($method:ident($req:ty) -> $res:ty, $name:literal;)*) => {
        #[tonic::async_trait]
        impl<C: Controller> Controller for GuardedController<C> {
            $(
                async fn $method(&self, request: tonic::Request<$req>) -> GrpcResult<$res> {
                    let sandbox = request.get_ref().sandbox_id.clone();
                    guarded_grpc($name, sandbox, self.0.$method(request)).await
                }
            )*
        }
    };
}

guarded! {
    create(ControllerCreateRequest) -> ControllerCreateResponse, "Create";
    start(ControllerStartRequest) -> ControllerStartResponse, "Start";
    platform(ControllerPlatformRequest) -> ControllerPlatformResponse, "Platform";
    stop(ControllerStopRequest) -> ControllerStopResponse, "Stop";
    wait(ControllerWaitRequest) -> ControllerWaitResponse, "Wait";
    status(ControllerStatusRequest) -> ControllerStatusResponse, "Status";
    shutdown(ControllerShutdownRequest) -> ControllerShutdownResponse, "Shutdown";
    metrics(ControllerMetricsRequest) -> ControllerMetricsResponse, "Metrics";
    update(ControllerUpdateRequest) -> ControllerUpdateResponse, "Update";
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A ttrpc method that panics when asked "boom" and echoes otherwise.
    struct Fragile;

    #[async_trait]
    impl MethodHandler for Fragile {
        async fn handler(
            &self,
            _ctx: TtrpcContext,
            req: ttrpc::Request,
        ) -> ttrpc::Result<ttrpc::Response> {
            tokio::task::yield_now().await;
            if req.payload.ends_with(b"boom") {
                panic!("injected panic in a handler");
            }
            let mut res = ttrpc::Response::new();
            res.set_status(ttrpc::get_status(ttrpc::Code::OK, ""));
            res.payload = req.payload;
            Ok(res)
        }
    }

    fn request(payload: &[u8]) -> ttrpc::Request {
        let mut req = ttrpc::Request::new();
        req.service = "test.Fragile".into();
        req.method = "Call".into();
        req.payload = payload.to_vec();
        req.timeout_nano = 5_000_000_000;
        req
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_ttrpc_handler_answers_internal_and_the_server_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let mut methods: HashMap<String, Box<dyn MethodHandler + Send + Sync>> = HashMap::new();
        methods.insert("Call".into(), Box::new(Fragile));
        let mut services = HashMap::new();
        services.insert(
            "test.Fragile".to_owned(),
            Service {
                methods,
                streams: HashMap::new(),
            },
        );
        let mut services = ttrpc_services(services, Some("pod-1"));
        // The same method unguarded, to show what the guard is for.
        let mut methods: HashMap<String, Box<dyn MethodHandler + Send + Sync>> = HashMap::new();
        methods.insert("Call".into(), Box::new(Fragile));
        services.insert(
            "test.Unguarded".to_owned(),
            Service {
                methods,
                streams: HashMap::new(),
            },
        );
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mut server = ttrpc::r#async::Server::new()
            .set_domain_unix()
            .add_listener(std::os::fd::IntoRawFd::into_raw_fd(listener))
            .unwrap()
            .register_service(services);
        server.start().await.unwrap();

        let client =
            ttrpc::r#async::Client::connect(&format!("unix://{}", path.display())).unwrap();
        // The panicking request is answered (not left hanging) with INTERNAL.
        let res = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            client.request(request(b"\x0a\x04boom")),
        )
        .await
        .expect("a panicking request must be answered, not dropped");
        let Err(ttrpc::Error::RpcStatus(status)) = res else {
            panic!("not an error status: {res:?}");
        };
        assert_eq!(status.code(), ttrpc::Code::INTERNAL, "{status:?}");
        assert!(status.message.contains("pod-1"), "{status:?}");
        assert!(status.message.contains("injected panic"), "{status:?}");
        // The same connection and the server go on.
        for _ in 0..3 {
            let res = client.request(request(b"\x0a\x02ok")).await.unwrap();
            assert_eq!(res.status.as_ref().unwrap().code(), ttrpc::Code::OK);
            assert_eq!(res.payload, b"\x0a\x02ok");
        }
        // Unguarded, ttrpc (0.8) contains the panic in the request's task
        // but never answers: the caller hangs until its own deadline.
        let mut req = request(b"\x0a\x04boom");
        req.service = "test.Unguarded".into();
        let res =
            tokio::time::timeout(std::time::Duration::from_secs(2), client.request(req)).await;
        assert!(res.is_err(), "an unguarded panic was answered: {res:?}");
        // A second connection too.
        let other = ttrpc::r#async::Client::connect(&format!("unix://{}", path.display())).unwrap();
        let res = other.request(request(b"\x0a\x02ok")).await.unwrap();
        assert_eq!(res.status.as_ref().unwrap().code(), ttrpc::Code::OK);
        let _ = server.shutdown().await;
    }

    #[test]
    fn the_log_finds_the_id_in_field_1() {
        assert_eq!(first_string_field(b"\x0a\x03abc\x12\x01x"), "abc");
        assert_eq!(first_string_field(b"\x0a\x09abc"), "");
        assert_eq!(first_string_field(b"\x0a\x02\x00\x01"), "");
        assert_eq!(first_string_field(b""), "");
        assert_eq!(first_string_field(b"\x12\x01x"), "");
    }

    /// A controller whose Create panics and whose other calls answer.
    struct FragileController;

    macro_rules! answer {
        ($($method:ident($req:ty) -> $res:ty;)*) => {
            #[tonic::async_trait]
            impl Controller for FragileController {
                async fn create(
                    &self,
                    request: tonic::Request<ControllerCreateRequest>,
                ) -> GrpcResult<ControllerCreateResponse> {
                    let id = request.into_inner().sandbox_id;
                    tokio::task::yield_now().await;
                    panic!("injected panic creating {id}");
                }
                $(
                    async fn $method(&self, _r: tonic::Request<$req>) -> GrpcResult<$res> {
                        Ok(tonic::Response::new(<$res>::default()))
                    }
                )*
            }
        };
    }

    answer! {
        start(ControllerStartRequest) -> ControllerStartResponse;
        platform(ControllerPlatformRequest) -> ControllerPlatformResponse;
        stop(ControllerStopRequest) -> ControllerStopResponse;
        wait(ControllerWaitRequest) -> ControllerWaitResponse;
        status(ControllerStatusRequest) -> ControllerStatusResponse;
        shutdown(ControllerShutdownRequest) -> ControllerShutdownResponse;
        metrics(ControllerMetricsRequest) -> ControllerMetricsResponse;
        update(ControllerUpdateRequest) -> ControllerUpdateResponse;
    }

    #[tokio::test]
    async fn a_panicking_controller_call_answers_internal_with_the_sandbox() {
        let c = GuardedController(Arc::new(FragileController));
        let err = c
            .create(tonic::Request::new(ControllerCreateRequest {
                sandbox_id: "pod-7".into(),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Internal, "{err:?}");
        assert!(err.message().contains("pod-7"), "{err:?}");
        assert!(err.message().contains("injected panic"), "{err:?}");
        let ok = c
            .status(tonic::Request::new(ControllerStatusRequest {
                sandbox_id: "pod-8".into(),
                ..Default::default()
            }))
            .await;
        assert!(ok.is_ok());
    }
}
