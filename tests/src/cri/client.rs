//! [`Cri`]: a blocking client of CRI's RuntimeService and ImageService over
//! a Unix socket (containerd's gRPC socket). Every call has a deadline; a call
//! that passes it fails with `DeadlineExceeded`. Errors are the gRPC status
//! containerd answered, so that tests can check codes (NotFound, ...) and
//! messages.
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Status;

use super::proto::image_service_client::ImageServiceClient;
use super::proto::runtime_service_client::RuntimeServiceClient;
use super::proto::*;

/// Default deadline of a call (a pod start boots a VM under emulation).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Extra time a call that waits by itself (StopContainer's grace period,
/// ExecSync's timeout) gets on top of that wait.
const WAIT_SLACK: Duration = Duration::from_secs(60);

pub struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    socket: PathBuf,
    timeout: Duration,
}

impl std::fmt::Debug for Cri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cri({})", self.socket.display())
    }
}

impl Cri {
    /// Connects to the CRI server on `socket` (and checks that it answers
    /// `Version`).
    pub fn connect(socket: &Path) -> Result<Self, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        let path = socket.to_path_buf();
        let channel = rt
            .block_on(async {
                // The URI is required by the API and unused: the connector
                // dials the socket.
                let endpoint = Endpoint::try_from("http://[::1]:50051")
                    .map_err(|e| e.to_string())?
                    .connect_timeout(Duration::from_secs(10));
                let connect = endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move { UnixStream::connect(path).await.map(TokioIo::new) }
                }));
                tokio::time::timeout(Duration::from_secs(20), connect)
                    .await
                    .map_err(|_| "timed out".to_string())?
                    .map_err(|e| format!("{e:?}"))
            })
            .map_err(|e| format!("connect to CRI at {}: {e}", socket.display()))?;
        let cri = Self {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            socket: socket.to_path_buf(),
            timeout: CALL_TIMEOUT,
        };
        cri.version()
            .map_err(|e| format!("CRI at {} does not answer: {e}", socket.display()))?;
        Ok(cri)
    }

    /// The same client with another default deadline.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn call<T, F>(&self, timeout: Duration, fut: F) -> Result<T, Status>
    where
        F: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.rt.block_on(async {
            match tokio::time::timeout(timeout, fut).await {
                Ok(r) => r.map(tonic::Response::into_inner),
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "no answer within {timeout:?} (client deadline)"
                ))),
            }
        })
    }

    fn rs(&self) -> RuntimeServiceClient<Channel> {
        self.runtime.clone()
    }

    fn is(&self) -> ImageServiceClient<Channel> {
        self.images.clone()
    }

    pub fn version(&self) -> Result<VersionResponse, Status> {
        let mut c = self.rs();
        self.call(self.timeout, c.version(VersionRequest::default()))
    }

    /// Status, with the runtime handlers and their features.
    pub fn status(&self) -> Result<StatusResponse, Status> {
        let mut c = self.rs();
        self.call(self.timeout, c.status(StatusRequest { verbose: false }))
    }

    // --- pods --------------------------------------------------------------------------------

    /// RunPodSandbox; returns the pod's id.
    pub fn run_pod(&self, config: &PodSandboxConfig, handler: &str) -> Result<String, Status> {
        let mut c = self.rs();
        let req = RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.to_string(),
        };
        self.call(self.timeout, c.run_pod_sandbox(req))
            .map(|r| r.pod_sandbox_id)
    }

    pub fn stop_pod(&self, id: &str) -> Result<(), Status> {
        let mut c = self.rs();
        let req = StopPodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        };
        self.call(self.timeout, c.stop_pod_sandbox(req)).map(drop)
    }

    pub fn remove_pod(&self, id: &str) -> Result<(), Status> {
        let mut c = self.rs();
        let req = RemovePodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        };
        self.call(self.timeout, c.remove_pod_sandbox(req)).map(drop)
    }

    /// Stops and removes a pod, ignoring NotFound (for cleanup).
    pub fn stop_and_remove_pod(&self, id: &str) -> Result<(), Status> {
        let ignore_nf = |r: Result<(), Status>| match r {
            Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
            r => r,
        };
        ignore_nf(self.stop_pod(id))?;
        ignore_nf(self.remove_pod(id))
    }

    pub fn pod_status(&self, id: &str) -> Result<PodSandboxStatus, Status> {
        let mut c = self.rs();
        let req = PodSandboxStatusRequest {
            pod_sandbox_id: id.to_string(),
            verbose: false,
        };
        self.call(self.timeout, c.pod_sandbox_status(req))?
            .status
            .ok_or_else(|| Status::internal("PodSandboxStatus without a status"))
    }

    /// PodSandboxStatus with `verbose`: also containerd's `info` map (JSON
    /// values: the runtime spec, the network namespace, ...).
    pub fn pod_status_verbose(
        &self,
        id: &str,
    ) -> Result<(PodSandboxStatus, std::collections::HashMap<String, String>), Status> {
        let mut c = self.rs();
        let req = PodSandboxStatusRequest {
            pod_sandbox_id: id.to_string(),
            verbose: true,
        };
        let r = self.call(self.timeout, c.pod_sandbox_status(req))?;
        let status = r
            .status
            .ok_or_else(|| Status::internal("PodSandboxStatus without a status"))?;
        Ok((status, r.info))
    }

    pub fn list_pods(&self, filter: Option<PodSandboxFilter>) -> Result<Vec<PodSandbox>, Status> {
        let mut c = self.rs();
        let req = ListPodSandboxRequest { filter };
        self.call(self.timeout, c.list_pod_sandbox(req))
            .map(|r| r.items)
    }

    // --- containers --------------------------------------------------------------------------

    /// CreateContainer in pod `pod_id` (created with `pod_config`); returns
    /// the container's id.
    pub fn create_container(
        &self,
        pod_id: &str,
        config: &ContainerConfig,
        pod_config: &PodSandboxConfig,
    ) -> Result<String, Status> {
        let mut c = self.rs();
        let req = CreateContainerRequest {
            pod_sandbox_id: pod_id.to_string(),
            config: Some(config.clone()),
            sandbox_config: Some(pod_config.clone()),
        };
        self.call(self.timeout, c.create_container(req))
            .map(|r| r.container_id)
    }

    pub fn start_container(&self, id: &str) -> Result<(), Status> {
        let mut c = self.rs();
        let req = StartContainerRequest {
            container_id: id.to_string(),
        };
        self.call(self.timeout, c.start_container(req)).map(drop)
    }

    /// StopContainer with a grace period of `grace_secs` before SIGKILL.
    pub fn stop_container(&self, id: &str, grace_secs: i64) -> Result<(), Status> {
        let mut c = self.rs();
        let req = StopContainerRequest {
            container_id: id.to_string(),
            timeout: grace_secs,
        };
        let wait = Duration::from_secs(grace_secs.max(0) as u64) + WAIT_SLACK;
        self.call(self.timeout.max(wait), c.stop_container(req))
            .map(drop)
    }

    /// StopContainer whose caller gives up after `deadline` (as a kubelet
    /// or a test with a deadline of its own does).
    pub fn stop_container_within(
        &self,
        id: &str,
        grace_secs: i64,
        deadline: Duration,
    ) -> Result<(), Status> {
        let mut c = self.rs();
        let req = StopContainerRequest {
            container_id: id.to_string(),
            timeout: grace_secs,
        };
        self.call(deadline, c.stop_container(req)).map(drop)
    }

    pub fn remove_container(&self, id: &str) -> Result<(), Status> {
        let mut c = self.rs();
        let req = RemoveContainerRequest {
            container_id: id.to_string(),
        };
        self.call(self.timeout, c.remove_container(req)).map(drop)
    }

    pub fn container_status(&self, id: &str) -> Result<ContainerStatus, Status> {
        let mut c = self.rs();
        let req = ContainerStatusRequest {
            container_id: id.to_string(),
            verbose: false,
        };
        self.call(self.timeout, c.container_status(req))?
            .status
            .ok_or_else(|| Status::internal("ContainerStatus without a status"))
    }

    pub fn list_containers(
        &self,
        filter: Option<ContainerFilter>,
    ) -> Result<Vec<Container>, Status> {
        let mut c = self.rs();
        let req = ListContainersRequest { filter };
        self.call(self.timeout, c.list_containers(req))
            .map(|r| r.containers)
    }

    /// ExecSync `cmd` with the runtime-side timeout `timeout_secs` (0: none).
    pub fn exec_sync(
        &self,
        id: &str,
        cmd: &[&str],
        timeout_secs: i64,
    ) -> Result<ExecSyncResponse, Status> {
        let mut c = self.rs();
        let req = ExecSyncRequest {
            container_id: id.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: timeout_secs,
        };
        let wait = Duration::from_secs(timeout_secs.max(0) as u64) + WAIT_SLACK;
        self.call(self.timeout.max(wait), c.exec_sync(req))
    }

    /// Exec: returns the streaming server's URL for the session.
    pub fn exec(&self, req: ExecRequest) -> Result<String, Status> {
        let mut c = self.rs();
        self.call(self.timeout, c.exec(req)).map(|r| r.url)
    }

    /// Attach: returns the streaming server's URL for the session.
    pub fn attach(&self, req: AttachRequest) -> Result<String, Status> {
        let mut c = self.rs();
        self.call(self.timeout, c.attach(req)).map(|r| r.url)
    }

    /// PortForward of `ports` of pod `pod_id`: returns the streaming
    /// server's URL for the session.
    pub fn port_forward(&self, pod_id: &str, ports: &[i32]) -> Result<String, Status> {
        let mut c = self.rs();
        let req = PortForwardRequest {
            pod_sandbox_id: pod_id.to_string(),
            port: ports.to_vec(),
        };
        self.call(self.timeout, c.port_forward(req)).map(|r| r.url)
    }

    pub fn container_stats(&self, id: &str) -> Result<ContainerStats, Status> {
        let mut c = self.rs();
        let req = ContainerStatsRequest {
            container_id: id.to_string(),
        };
        self.call(self.timeout, c.container_stats(req))?
            .stats
            .ok_or_else(|| Status::internal("ContainerStats without stats"))
    }

    /// PodSandboxStats (what `crictl statsp` shows).
    pub fn pod_stats(&self, id: &str) -> Result<PodSandboxStats, Status> {
        let mut c = self.rs();
        let req = PodSandboxStatsRequest {
            pod_sandbox_id: id.to_string(),
        };
        self.call(self.timeout, c.pod_sandbox_stats(req))?
            .stats
            .ok_or_else(|| Status::internal("PodSandboxStats without stats"))
    }

    pub fn list_container_stats(
        &self,
        filter: Option<ContainerStatsFilter>,
    ) -> Result<Vec<ContainerStats>, Status> {
        let mut c = self.rs();
        let req = ListContainerStatsRequest { filter };
        self.call(self.timeout, c.list_container_stats(req))
            .map(|r| r.stats)
    }

    pub fn update_container_resources(
        &self,
        id: &str,
        linux: LinuxContainerResources,
    ) -> Result<(), Status> {
        let mut c = self.rs();
        let req = UpdateContainerResourcesRequest {
            container_id: id.to_string(),
            linux: Some(linux),
            ..Default::default()
        };
        self.call(self.timeout, c.update_container_resources(req))
            .map(drop)
    }

    pub fn reopen_container_log(&self, id: &str) -> Result<(), Status> {
        let mut c = self.rs();
        let req = ReopenContainerLogRequest {
            container_id: id.to_string(),
        };
        self.call(self.timeout, c.reopen_container_log(req))
            .map(drop)
    }

    // --- images ------------------------------------------------------------------------------

    /// ImageStatus: `None` when the image is not present.
    pub fn image_status(&self, image: &str) -> Result<Option<Image>, Status> {
        let mut c = self.is();
        let req = ImageStatusRequest {
            image: Some(ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
            verbose: false,
        };
        self.call(self.timeout, c.image_status(req))
            .map(|r| r.image)
    }

    /// PullImage; returns the image reference. (No registry is reachable on
    /// the test machines: images are imported, see scripts/containerd.sh.)
    pub fn pull_image(&self, image: &str) -> Result<String, Status> {
        let mut c = self.is();
        let req = PullImageRequest {
            image: Some(ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.call(self.timeout, c.pull_image(req))
            .map(|r| r.image_ref)
    }

    pub fn list_images(&self) -> Result<Vec<Image>, Status> {
        let mut c = self.is();
        self.call(self.timeout, c.list_images(ListImagesRequest::default()))
            .map(|r| r.images)
    }
}
