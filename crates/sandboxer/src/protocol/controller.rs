//! The zero-shim mode: containerd's Sandbox Controller
//! (`containerd.services.sandbox.v1.Controller`, gRPC), which containerd 2.x
//! calls for a `[proxy_plugins.<name>] type = "sandbox"` plugin, so that no
//! shim process runs per pod. Start gives containerd a task API v3 address
//! (`ttrpc+unix://`) that this process serves for that sandbox alone.
//!
//! Converts messages to the domain calls the shim's sandbox API uses
//! (`sandbox_api.rs`) and back; no pod logic of its own.
use std::collections::HashMap;
use std::os::fd::IntoRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use kuasar_api::grpc::sandbox::controller_server::Controller;
use kuasar_api::grpc::sandbox::*;
use kuasar_api::grpc::types::{Metric, Platform};
use kuasar_api::services;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::io::streaming::StreamingService;
use crate::protocol::sandbox_api::{self, STATE_NOT_READY, STATE_READY};
use crate::protocol::task::TaskService;
use crate::protocol::task_conn::TaskConns;
use crate::registry::Registry;
use crate::sandbox::{Sandbox, SandboxInfo};

/// gRPC metadata key of the containerd namespace of a request.
const NAMESPACE_HEADER: &str = "containerd-namespace";
/// The namespace assumed when a request names none (CRI's).
const DEFAULT_NAMESPACE: &str = "k8s.io";
/// The task API version served on a sandbox's task socket.
pub const TASK_API_VERSION: u32 = 3;
/// Name of a sandbox's task socket inside its directory.
const TASK_SOCKET: &str = "task.sock";
/// Name of the private socket of a sandbox's task API server.
const INNER_SOCKET: &str = "task.inner.sock";
/// sockaddr_un holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// A sandbox's own task API: containerd's socket, its connections relayed
/// to a ttrpc server on a private socket.
struct TaskSocket {
    path: PathBuf,
    inner: PathBuf,
    server: ttrpc::r#async::Server,
    conns: TaskConns,
}

pub struct ControllerService {
    registry: Arc<Registry>,
    /// The task socket of each started sandbox, by sandbox id.
    tasks: Mutex<HashMap<String, TaskSocket>>,
}

type GrpcResult<T> = Result<Response<T>, Status>;

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let ts = crate::events::timestamp(t);
    prost_types::Timestamp {
        seconds: ts.seconds,
        nanos: ts.nanos,
    }
}

/// Where a sandbox's task socket lives: `task.sock` in its directory, or,
/// when that path is too long for a socket, a short name derived from the
/// id in `<state_dir>/t/`.
pub fn task_socket_path(state_dir: &Path, sandbox_dir: &Path, id: &str) -> PathBuf {
    socket_path(state_dir, sandbox_dir, id, TASK_SOCKET)
}

/// Where kuasar-vmm's own ttrpc server of a sandbox's task API listens (the
/// relay of [`TaskConns`] connects there), placed like the task socket.
fn inner_socket_path(state_dir: &Path, sandbox_dir: &Path, id: &str) -> PathBuf {
    socket_path(state_dir, sandbox_dir, id, INNER_SOCKET)
}

fn socket_path(state_dir: &Path, sandbox_dir: &Path, id: &str, name: &str) -> PathBuf {
    let path = sandbox_dir.join(name);
    if path.as_os_str().len() <= MAX_SOCKET_PATH {
        return path;
    }
    let short = name.replacen("task", &format!("{:016x}", id_hash(id)), 1);
    state_dir.join("t").join(short)
}

/// FNV-1a of a sandbox id: stable across runs (containerd persists the
/// task address).
fn id_hash(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl ControllerService {
    pub fn new(registry: Arc<Registry>) -> Self {
        ControllerService {
            registry,
            tasks: Mutex::new(HashMap::new()),
        }
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, HashMap<String, TaskSocket>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The task address containerd reaches a sandbox at, once it serves one.
    fn task_address(&self, id: &str) -> Option<String> {
        self.tasks()
            .get(id)
            .map(|t| format!("ttrpc+unix://{}", t.path.display()))
    }

    /// Serves the task API of one sandbox on its own socket (once).
    async fn serve_tasks(&self, sandbox: &Arc<Sandbox>) -> Result<String, Error> {
        let id = sandbox.info.id.clone();
        if let Some(address) = self.task_address(&id) {
            return Ok(address);
        }
        let state_dir = &self.registry.host.config.state_dir;
        let path = task_socket_path(state_dir, &sandbox.dir, &id);
        let inner = inner_socket_path(state_dir, &sandbox.dir, &id);
        let listener = crate::bind(&inner)
            .map_err(|e| Error::Internal(format!("task socket of sandbox {id}: {e:#}")))?;
        let service = Arc::new(TaskService::for_sandbox(self.registry.clone(), &id));
        let mut services = kuasar_api::containerd::shim_async::create_task(service.clone());
        // The same methods under the v3 name, which containerd uses for a
        // sandbox address of version 3.
        if let Some(v3) =
            kuasar_api::containerd::shim_async::create_task(service).remove(services::TASK_V2)
        {
            services.insert(services::TASK_V3.to_owned(), v3);
        }
        // Process stdio for CRI's io_type = "streaming": containerd opens
        // the streams on this address.
        services.extend(
            kuasar_api::streaming::streaming_ttrpc_async::create_streaming(Arc::new(
                StreamingService::new(&id),
            )),
        );
        let mut server = ttrpc::r#async::Server::new()
            .set_domain_unix()
            .add_listener(listener.into_raw_fd())
            .map_err(|e| Error::Internal(format!("task socket of sandbox {id}: {e}")))?
            .register_service(crate::protocol::panic_guard::ttrpc_services(
                services,
                Some(&id),
            ));
        server
            .start()
            .await
            .map_err(|e| Error::Internal(format!("serve the task socket of sandbox {id}: {e}")))?;
        let conns = TaskConns::start(sandbox.clone(), &path, &inner)
            .await
            .map_err(|e| Error::Internal(format!("task socket of sandbox {id}: {e}")))?;
        let address = format!("ttrpc+unix://{}", path.display());
        tracing::info!(sandbox = %id, %address, "task API served");
        let mut tasks = self.tasks();
        if let Some(other) = tasks.get(&id) {
            // A concurrent Start got there first (cannot bind twice: it bound).
            return Ok(format!("ttrpc+unix://{}", other.path.display()));
        }
        tasks.insert(
            id,
            TaskSocket {
                path: path.clone(),
                inner,
                server,
                conns,
            },
        );
        drop(tasks);
        sandbox.set_task_socket(Some(path.display().to_string()));
        Ok(address)
    }

    /// Serves again the task sockets of the sandboxes an earlier run of the
    /// sandboxer served and that were taken back running (containerd
    /// reconnects to the same address).
    pub async fn resume_task_sockets(&self) {
        for sandbox in self.registry.all() {
            if sandbox.task_socket().is_none() || !sandbox.is_running() {
                continue;
            }
            if let Err(e) = self.serve_tasks(&sandbox).await {
                tracing::error!(sandbox = %sandbox.info.id, "{}", crate::error::chain(&e));
            }
        }
    }

    /// Stops serving a sandbox's task socket (the sandbox goes away): its
    /// connections close, the socket is removed.
    async fn stop_tasks(&self, id: &str) {
        let Some(t) = self.tasks().remove(id) else {
            return;
        };
        t.conns.stop().await;
        Self::stop_server(id, t.server, &t.inner).await;
        let _ = std::fs::remove_file(&t.path);
    }

    async fn stop_server(id: &str, mut server: ttrpc::r#async::Server, inner: &Path) {
        if tokio::time::timeout(std::time::Duration::from_secs(1), server.shutdown())
            .await
            .is_err()
        {
            tracing::debug!(sandbox = %id, "task connections still open at shutdown");
        }
        let _ = std::fs::remove_file(inner);
    }

    /// Stops serving every task socket because kuasar-vmm exits: the VMMs
    /// keep holding containerd's connections, for the next kuasar-vmm.
    pub async fn close_task_sockets(&self) {
        let tasks: Vec<(String, TaskSocket)> = self.tasks().drain().collect();
        for (id, t) in tasks {
            t.conns.detach();
            Self::stop_server(&id, t.server, &t.inner).await;
        }
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create(
        &self,
        request: Request<ControllerCreateRequest>,
    ) -> GrpcResult<ControllerCreateResponse> {
        let namespace = request
            .metadata()
            .get(NAMESPACE_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(DEFAULT_NAMESPACE)
            .to_owned();
        let req = request.into_inner();
        crate::container::validate_id("sandbox", &req.sandbox_id)?;
        if self.registry.get(&req.sandbox_id).is_ok() {
            return Err(Error::AlreadyExists(format!("sandbox {}", req.sandbox_id)).into());
        }
        let options = req
            .options
            .as_ref()
            .map(|a| (a.type_url.as_str(), a.value.as_slice()));
        let info = SandboxInfo {
            id: req.sandbox_id.clone(),
            namespace,
            bundle: String::new(),
            ttrpc_address: self.registry.host.config.containerd_ttrpc_address.clone(),
        };
        sandbox_api::create(&self.registry, info, &req.netns_path, options)?;
        Ok(Response::new(ControllerCreateResponse {
            sandbox_id: req.sandbox_id,
        }))
    }

    async fn start(
        &self,
        request: Request<ControllerStartRequest>,
    ) -> GrpcResult<ControllerStartResponse> {
        let req = request.into_inner();
        let sandbox = self.registry.get(&req.sandbox_id)?;
        let (pid, created) = sandbox.start_pod().await?;
        let address = self.serve_tasks(&sandbox).await?;
        Ok(Response::new(ControllerStartResponse {
            sandbox_id: req.sandbox_id,
            pid,
            created_at: Some(timestamp(created)),
            labels: HashMap::new(),
            address,
            version: TASK_API_VERSION,
            spec: sandbox.pod().map(|pod| {
                let (type_url, value) = crate::pod::runtime_spec::encoded(&pod);
                prost_types::Any { type_url, value }
            }),
        }))
    }

    async fn platform(
        &self,
        request: Request<ControllerPlatformRequest>,
    ) -> GrpcResult<ControllerPlatformResponse> {
        self.registry.get(&request.get_ref().sandbox_id)?;
        Ok(Response::new(ControllerPlatformResponse {
            platform: Some(Platform {
                os: sandbox_api::PLATFORM_OS.into(),
                architecture: sandbox_api::platform_architecture(),
                ..Default::default()
            }),
        }))
    }

    async fn stop(
        &self,
        request: Request<ControllerStopRequest>,
    ) -> GrpcResult<ControllerStopResponse> {
        let req = request.into_inner();
        match self.registry.get(&req.sandbox_id) {
            Ok(sandbox) => {
                sandbox
                    .stop_pod(sandbox_api::stop_grace(req.timeout_secs))
                    .await?
            }
            // Stopping a sandbox that is gone is done.
            Err(Error::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(Response::new(ControllerStopResponse {}))
    }

    async fn wait(
        &self,
        request: Request<ControllerWaitRequest>,
    ) -> GrpcResult<ControllerWaitResponse> {
        let sandbox = self.registry.get(&request.get_ref().sandbox_id)?;
        let (exit_status, at) = sandbox.wait_pod().await;
        Ok(Response::new(ControllerWaitResponse {
            exit_status,
            exited_at: Some(timestamp(at)),
        }))
    }

    async fn status(
        &self,
        request: Request<ControllerStatusRequest>,
    ) -> GrpcResult<ControllerStatusResponse> {
        let req = request.into_inner();
        let sandbox = self.registry.get(&req.sandbox_id)?;
        let s = sandbox.pod_status();
        let mut info = HashMap::new();
        if req.verbose {
            info.insert(
                "vmm".to_owned(),
                self.registry.host.hypervisor.name().to_owned(),
            );
            info.insert("dir".to_owned(), sandbox.dir.display().to_string());
        }
        let address = self.task_address(&req.sandbox_id);
        Ok(Response::new(ControllerStatusResponse {
            pid: s.pid,
            state: if s.ready {
                STATE_READY
            } else {
                STATE_NOT_READY
            }
            .into(),
            info,
            created_at: Some(timestamp(s.created_at)),
            exited_at: s.exited_at.map(timestamp),
            extra: None,
            version: if address.is_some() {
                TASK_API_VERSION
            } else {
                0
            },
            address: address.unwrap_or_default(),
            sandbox_id: req.sandbox_id,
        }))
    }

    async fn shutdown(
        &self,
        request: Request<ControllerShutdownRequest>,
    ) -> GrpcResult<ControllerShutdownResponse> {
        let id = request.into_inner().sandbox_id;
        // Idempotent: shutting down an unknown sandbox succeeds.
        self.stop_tasks(&id).await;
        self.registry.delete(&id).await?;
        tracing::info!(sandbox = %id, "sandbox shut down");
        Ok(Response::new(ControllerShutdownResponse {}))
    }

    async fn metrics(
        &self,
        request: Request<ControllerMetricsRequest>,
    ) -> GrpcResult<ControllerMetricsResponse> {
        let id = request.into_inner().sandbox_id;
        let sandbox = self.registry.get(&id)?;
        let (type_url, value) = sandbox_api::pod_metrics(&sandbox).await?;
        Ok(Response::new(ControllerMetricsResponse {
            metrics: Some(Metric {
                timestamp: Some(timestamp(SystemTime::now())),
                id,
                data: Some(prost_types::Any { type_url, value }),
            }),
        }))
    }

    async fn update(
        &self,
        request: Request<ControllerUpdateRequest>,
    ) -> GrpcResult<ControllerUpdateResponse> {
        // Nothing of the sandbox record (labels, extensions) changes the VM.
        self.registry.get(&request.get_ref().sandbox_id)?;
        Ok(Response::new(ControllerUpdateResponse {}))
    }
}

/// Serves the controller on `listener` until the task is dropped: HTTP/2
/// (gRPC) on each accepted connection.
pub async fn serve(listener: tokio::net::UnixListener, controller: Arc<ControllerService>) {
    use kuasar_api::grpc::sandbox::controller_server::ControllerServer;
    let service =
        ControllerServer::new(crate::protocol::panic_guard::GuardedController(controller));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("accept on the gRPC socket: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            let conn =
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!("gRPC connection: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller(dir: &Path) -> ControllerService {
        let host = Arc::new(crate::host::Host::for_tests(dir));
        ControllerService::new(Arc::new(Registry::new(host)))
    }

    fn create_request(
        id: &str,
        options: Option<prost_types::Any>,
    ) -> Request<ControllerCreateRequest> {
        Request::new(ControllerCreateRequest {
            sandbox_id: id.into(),
            options,
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn bad_input_gets_typed_codes() {
        let dir = tempfile::tempdir().unwrap();
        let c = controller(dir.path());
        // Unknown ids: NotFound, except the idempotent Stop and Shutdown.
        fn status<T>(r: Result<T, Status>) -> tonic::Code {
            r.map(|_| ()).unwrap_err().code()
        }
        let start = c.start(Request::new(ControllerStartRequest {
            sandbox_id: "nope".into(),
            ..Default::default()
        }));
        assert_eq!(status(start.await), tonic::Code::NotFound);
        let st = c.status(Request::new(ControllerStatusRequest {
            sandbox_id: "nope".into(),
            ..Default::default()
        }));
        assert_eq!(status(st.await), tonic::Code::NotFound);
        let wait = c.wait(Request::new(ControllerWaitRequest {
            sandbox_id: "nope".into(),
            ..Default::default()
        }));
        assert_eq!(status(wait.await), tonic::Code::NotFound);
        let platform = c.platform(Request::new(ControllerPlatformRequest {
            sandbox_id: "nope".into(),
            ..Default::default()
        }));
        assert_eq!(status(platform.await), tonic::Code::NotFound);
        c.stop(Request::new(ControllerStopRequest {
            sandbox_id: "nope".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
        c.shutdown(Request::new(ControllerShutdownRequest {
            sandbox_id: "nope".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
        // A malformed options Any, a bad id.
        let bad = prost_types::Any {
            type_url: "type.googleapis.com/runtime.v1.ContainerConfig".into(),
            value: vec![1, 2, 3],
        };
        let r = c.create(create_request("s1", Some(bad))).await;
        assert_eq!(status(r), tonic::Code::InvalidArgument);
        let garbage = prost_types::Any {
            type_url: "type.googleapis.com/runtime.v1.PodSandboxConfig".into(),
            value: vec![0xff, 0xff, 0xff],
        };
        let r = c.create(create_request("s1", Some(garbage))).await;
        assert_eq!(status(r), tonic::Code::InvalidArgument);
        let r = c.create(create_request("../x", None)).await;
        assert_eq!(status(r), tonic::Code::InvalidArgument);
        // Created once; the same id again is AlreadyExists.
        c.create(create_request("s1", None)).await.unwrap();
        let r = c.create(create_request("s1", None)).await;
        assert_eq!(status(r), tonic::Code::AlreadyExists);
        // Cheap status of a sandbox not started: NOTREADY, no task address.
        let st = c
            .status(Request::new(ControllerStatusRequest {
                sandbox_id: "s1".into(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (st.state.as_str(), st.address.as_str()),
            (STATE_NOT_READY, "")
        );
        c.shutdown(Request::new(ControllerShutdownRequest {
            sandbox_id: "s1".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
        let st = c.status(Request::new(ControllerStatusRequest {
            sandbox_id: "s1".into(),
            ..Default::default()
        }));
        assert_eq!(status(st.await), tonic::Code::NotFound);
    }

    #[test]
    fn task_socket_fits_sockaddr_un() {
        let state = Path::new("/run/kuasar/vmm");
        let id = "a".repeat(64);
        let p = task_socket_path(state, &state.join(&id), &id);
        assert_eq!(p, state.join(&id).join(TASK_SOCKET));
        // The longest state_dir (40 bytes) and id (76 bytes).
        let state = Path::new("/run/a-state-directory-of-forty-bytes-xx");
        assert_eq!(state.as_os_str().len(), 40);
        let id = "b".repeat(76);
        let p = task_socket_path(state, &state.join(&id), &id);
        assert!(p.as_os_str().len() <= MAX_SOCKET_PATH, "{}", p.display());
        assert!(p.starts_with(state.join("t")));
        // Stable, and distinct per id.
        assert_eq!(p, task_socket_path(state, &state.join(&id), &id));
        let other = "c".repeat(76);
        assert_ne!(p, task_socket_path(state, &state.join(&other), &other));
        // The private socket of the same sandbox: short too, and another.
        let inner = inner_socket_path(state, &state.join(&id), &id);
        assert!(
            inner.as_os_str().len() <= MAX_SOCKET_PATH,
            "{}",
            inner.display()
        );
        assert_ne!(inner, p);
        let state = Path::new("/run/kuasar/vmm");
        let id = "a".repeat(64);
        assert_eq!(
            inner_socket_path(state, &state.join(&id), &id),
            state.join(&id).join(INNER_SOCKET)
        );
    }
}
