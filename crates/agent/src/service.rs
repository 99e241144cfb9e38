//! The `kuasar.agent.v1.Agent` service.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use kuasar_api::agent::agent_ttrpc_async::Agent;
use kuasar_api::agent::*;
use kuasar_api::ttrpc::r#async::TtrpcContext;
use kuasar_api::ttrpc::Result as TtrpcResult;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::container::{
    check_resources, parse_cgroup_path, parse_spec, rewrite_parsed, rewrite_process, validate_id,
    Container, Runner,
};
use crate::debug::DebugCommand;
use crate::error::{Context, Error, Result};
use crate::pod::{PodAdditions, POD_DIR};
use crate::podns::PodPidNamespace;
use crate::process::{make_stdio, validate_signal, Process, ProcessStdio};
use crate::reaper::Reaper;
use crate::runtime::OciRuntime;

/// Where container bundles live: `<dir>/<id>/config.json`.
pub const CONTAINERS_DIR: &str = "/run/kuasar/containers";

/// A container slot: reserved while `crun create` runs, then the container.
type Slot = Option<Arc<Container>>;

/// The service; requests that drive crun run in tasks of their own, so a
/// request dropped half-way (client timeout, disconnect) never leaves a
/// half-made container or exec behind.
pub struct AgentService {
    inner: Arc<Inner>,
    /// Port-forward connections (see [`crate::portforward`]).
    forwards: crate::portforward::Forwards,
}

struct Inner {
    reaper: Arc<Reaper>,
    runtime: OciRuntime,
    containers_dir: PathBuf,
    containers: Mutex<HashMap<String, Slot>>,
    /// Becomes true once the guest is fully set up (modules, shared mount).
    guest_ready: watch::Receiver<bool>,
    /// Numbers the resource files of updates.
    updates: std::sync::atomic::AtomicU64,
    /// The pod's shared PID namespace (made on first use).
    pod_pid: PodPidNamespace,
}

impl AgentService {
    pub fn new(
        reaper: Arc<Reaper>,
        runtime: OciRuntime,
        guest_ready: watch::Receiver<bool>,
    ) -> Self {
        AgentService {
            inner: Arc::new(Inner {
                reaper,
                runtime,
                containers_dir: PathBuf::from(CONTAINERS_DIR),
                containers: Mutex::new(HashMap::new()),
                guest_ready,
                updates: std::sync::atomic::AtomicU64::new(0),
                pod_pid: PodPidNamespace::default(),
            }),
            forwards: crate::portforward::Forwards::default(),
        }
    }

    /// Runs `f` on the inner state in a task of its own and waits for it.
    async fn detached<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Inner>) -> Fut,
        Fut: std::future::Future<Output = Result<T>> + Send + 'static,
    {
        tokio::spawn(f(self.inner.clone()))
            .await
            .map_err(|e| Error::Internal(format!("request task failed: {e}")))?
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        self.inner.container(id)
    }

    fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>> {
        self.inner.container(id)?.process(exec_id)
    }
}

impl Inner {
    fn map(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        self.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The PID namespace of container `id` (its init's), for a container
    /// that shares it.
    fn pid_namespace_of(&self, id: &str) -> Result<PathBuf> {
        let target = self.container(id)?;
        if target.init.exited().is_some() {
            return Err(Error::FailedPrecondition(format!(
                "container {id}, whose PID namespace was asked for, has exited"
            )));
        }
        Ok(PathBuf::from(format!("/proc/{}/ns/pid", target.init.pid)))
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        validate_id("container", id)?;
        match self.map().get(id) {
            Some(Some(c)) => Ok(c.clone()),
            Some(None) => Err(Error::NotFound(format!(
                "container {id} is still being created"
            ))),
            None => Err(Error::NotFound(format!("container {id} not found"))),
        }
    }

    async fn create(&self, req: CreateContainerRequest) -> Result<u32> {
        let id = req.container_id.as_str();
        validate_id("container", id)?;
        if req.sandbox_container {
            return self.create_sandbox_container(&req).await;
        }
        let mut spec = parse_spec(&req.spec_json)?;
        let sysctls = crate::sysctl::take_pod_sysctls(&mut spec)?;
        let pid_namespace = if !req.pid_namespace_of.is_empty() {
            Some(self.pid_namespace_of(&req.pid_namespace_of)?)
        } else if req.pod_pid_namespace {
            Some(self.pod_pid.path(&self.reaper).await?)
        } else {
            None
        };
        let pod = PodAdditions {
            pid_namespace,
            files: crate::pod::files(Path::new(POD_DIR)),
        };
        let spec = rewrite_parsed(spec, &req.rootfs_path, req.terminal, &pod)?;
        crate::sysctl::apply(&sysctls)?;
        // The shared directory is mounted once the guest is set up.
        let mut ready = self.guest_ready.clone();
        let _ = ready.wait_for(|r| *r).await;
        self.reserve(id)?;
        let bundle = self.containers_dir.join(id);
        let made = self.create_in(&req, &bundle, &spec).await;
        self.settle(id, &bundle, made)
    }

    /// Reserves id `id` (a slot without a container) for a create.
    fn reserve(&self, id: &str) -> Result<()> {
        let mut map = self.map();
        if map.contains_key(id) {
            return Err(Error::AlreadyExists(format!(
                "container {id} already exists"
            )));
        }
        map.insert(id.to_string(), None);
        Ok(())
    }

    /// Ends a create: the container takes its reserved slot, or a failed
    /// one leaves neither slot nor bundle behind.
    fn settle(&self, id: &str, bundle: &Path, made: Result<Container>) -> Result<u32> {
        match made {
            Ok(c) => {
                let pid = c.init.pid as u32;
                self.map().insert(id.to_string(), Some(Arc::new(c)));
                Ok(pid)
            }
            Err(e) => {
                self.map().remove(id);
                let _ = std::fs::remove_dir_all(bundle);
                Err(e)
            }
        }
    }

    /// The pod's sandbox container: the pod init stands for it (see
    /// [`crate::podns`]); its stdio, if asked for, ends at once.
    async fn create_sandbox_container(&self, req: &CreateContainerRequest) -> Result<u32> {
        let id = req.container_id.as_str();
        if let Some(other) = self
            .map()
            .values()
            .flatten()
            .find(|c| c.runner == Runner::PodInit && c.init.exited().is_none())
        {
            return Err(Error::AlreadyExists(format!(
                "the pod's sandbox container is {}; {id} cannot be another",
                other.id
            )));
        }
        self.reserve(id)?;
        let bundle = self.containers_dir.join(id);
        let made = async {
            let (io, _child_ends) = make_stdio(req.stdin, req.stdout, req.stderr)?;
            let (pid, exited) = self.pod_pid.sandbox_init(&self.reaper).await?;
            std::fs::create_dir_all(&bundle).context("create bundle")?;
            let init = Arc::new(Process::new(pid, io, exited));
            info!(id, pid, "the pod init stands for the sandbox container");
            Ok(Container::pod_init(id, bundle.clone(), init))
        }
        .await;
        self.settle(id, &bundle, made)
    }

    async fn create_in(
        &self,
        req: &CreateContainerRequest,
        bundle: &Path,
        spec: &[u8],
    ) -> Result<Container> {
        let id = req.container_id.as_str();
        if bundle.exists() {
            std::fs::remove_dir_all(bundle).context("remove stale bundle")?;
        }
        std::fs::create_dir_all(bundle).context("create bundle")?;
        std::fs::write(bundle.join("config.json"), spec).context("write config.json")?;
        let ProcessStdio { child, io } =
            ProcessStdio::new(req.terminal, req.stdin, req.stdout, req.stderr)?;
        let pid_file = bundle.join("init.pid");
        let mark = self.reaper.mark();
        let res = self
            .runtime
            .create(id, bundle, &pid_file, child, io.console_path())
            .await;
        let io = match res {
            Ok(()) => io.finish(req.stdin).await,
            Err(e) => Err(e),
        };
        let io = match io {
            Ok(io) => io,
            Err(e) => {
                if let Err(de) = self.runtime.delete(id).await {
                    warn!(id, "cleanup after failed create: {de}");
                }
                return Err(e);
            }
        };
        let pid = read_pid(&pid_file)?;
        let exited = self.reaper.watch(pid, mark);
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .ok()
            .and_then(|t| parse_cgroup_path(&t));
        let init = Arc::new(Process::new(pid, io, exited));
        let own_pid_namespace = !req.pod_pid_namespace && req.pid_namespace_of.is_empty();
        if let (false, Some(cgroup)) = (own_pid_namespace, &cgroup) {
            crate::podns::kill_rest_on_exit(init.clone(), cgroup.clone());
        }
        Ok(Container::new(id, bundle.to_path_buf(), init, cgroup))
    }

    async fn exec(&self, req: ExecProcessRequest) -> Result<u32> {
        let c = self.container(&req.container_id)?;
        validate_id("exec", &req.exec_id)?;
        if c.runner == Runner::PodInit {
            return Err(Error::FailedPrecondition(format!(
                "container {} is the pod's sandbox container, which the agent's pod init \
                 stands for: nothing can be executed in it",
                c.id
            )));
        }
        let process_json = rewrite_process(&req.process_json, req.terminal)?;
        c.reserve_exec(&req.exec_id)?;
        let res = self.exec_in(&c, &req, &process_json).await;
        match res {
            Ok(p) => {
                let pid = p.pid as u32;
                c.finish_exec(&req.exec_id, Some(p));
                Ok(pid)
            }
            Err(e) => {
                c.finish_exec(&req.exec_id, None);
                Err(e)
            }
        }
    }

    async fn exec_in(
        &self,
        c: &Container,
        req: &ExecProcessRequest,
        process_json: &[u8],
    ) -> Result<Arc<Process>> {
        let json_path = c.bundle.join(format!("exec-{}.json", req.exec_id));
        let pid_file = c.bundle.join(format!("exec-{}.pid", req.exec_id));
        let _ = std::fs::remove_file(&pid_file);
        std::fs::write(&json_path, process_json).context("write process.json")?;
        let ProcessStdio { child, io } =
            ProcessStdio::new(req.terminal, req.stdin, req.stdout, req.stderr)?;
        let mark = self.reaper.mark();
        let res = self
            .runtime
            .exec(&c.id, &json_path, &pid_file, child, io.console_path())
            .await;
        let _ = std::fs::remove_file(&json_path);
        res?;
        let io = io.finish(req.stdin).await?;
        let pid = read_pid(&pid_file)?;
        let _ = std::fs::remove_file(&pid_file);
        let exited = self.reaper.watch(pid, mark);
        Ok(Arc::new(Process::new(pid, io, exited)))
    }

    async fn signal(&self, req: &SignalProcessRequest) -> Result<()> {
        let c = self.container(&req.container_id)?;
        if req.all {
            if !req.exec_id.is_empty() {
                return Err(Error::InvalidArgument(
                    "signalling all processes is for the init process only".into(),
                ));
            }
            validate_signal(req.signal)?;
            if c.runner == Runner::PodInit {
                // It is its PID namespace's init: when it ends, so does
                // everything in that namespace.
                return c.init.kill(req.signal);
            }
            return self.runtime.kill(&c.id, req.signal, true).await;
        }
        c.process(&req.exec_id)?.kill(req.signal)
    }

    /// Applies new resources (OCI LinuxResources) with `crun update`.
    async fn update(&self, id: &str, resources_json: &[u8]) -> Result<()> {
        let c = self.container(id)?;
        let resources = check_resources(resources_json)?;
        if c.init.exited().is_some() {
            return Err(Error::FailedPrecondition(format!(
                "container {id} has exited"
            )));
        }
        if c.runner == Runner::PodInit {
            // Nothing runs in it: there is nothing to size (the VM is sized
            // for the pod).
            return Ok(());
        }
        let n = self
            .updates
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = c.bundle.join(format!("resources-{n}.json"));
        std::fs::write(&path, resources).context("write resources.json")?;
        let res = self.runtime.update(id, &path).await;
        let _ = std::fs::remove_file(&path);
        res
    }

    async fn remove(&self, id: &str) -> Result<()> {
        let c = self.container(id)?;
        match c.runner {
            Runner::Runtime => self.runtime.delete(id).await?,
            Runner::PodInit if c.init.exited().is_none() => c.init.kill(libc::SIGKILL as u32)?,
            Runner::PodInit => {}
        }
        self.map().remove(id);
        if let Err(e) = std::fs::remove_dir_all(&c.bundle) {
            warn!(id, "remove bundle: {e}");
        }
        Ok(())
    }
}

fn read_pid(path: &Path) -> Result<i32> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    text.trim()
        .parse()
        .map_err(|_| Error::Internal(format!("bad pid file {}: {text:?}", path.display())))
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Logs a failed request and converts the error.
fn reply<T>(method: &str, res: Result<T>) -> TtrpcResult<T> {
    res.map_err(|e| {
        info!(method, "error: {e}");
        e.into()
    })
}

#[async_trait]
impl Agent for AgentService {
    async fn ping(&self, _: &TtrpcContext, _: Empty) -> TtrpcResult<PingResponse> {
        Ok(PingResponse {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            kernel_release: kernel_release(),
            ..Default::default()
        })
    }

    async fn create_container(
        &self,
        _: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> TtrpcResult<CreateContainerResponse> {
        info!(id = %req.container_id, rootfs = %req.rootfs_path, "create container");
        let (id, started) = (req.container_id.clone(), std::time::Instant::now());
        let res = self.detached(|i| async move { i.create(req).await }).await;
        let pid = reply("CreateContainer", res)?;
        info!(id = %id, elapsed_ms = started.elapsed().as_millis() as u64, "container created");
        Ok(CreateContainerResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> TtrpcResult<StartContainerResponse> {
        info!(id = %req.container_id, "start container");
        let (id, started) = (req.container_id.clone(), std::time::Instant::now());
        let res = self
            .detached(|i| async move {
                let c = i.container(&req.container_id)?;
                if c.runner == Runner::Runtime {
                    i.runtime.start(&c.id).await?;
                }
                Ok(c.init.pid as u32)
            })
            .await;
        let pid = reply("StartContainer", res)?;
        info!(id = %id, elapsed_ms = started.elapsed().as_millis() as u64, "container started");
        Ok(StartContainerResponse {
            pid,
            ..Default::default()
        })
    }

    async fn remove_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> TtrpcResult<Empty> {
        info!(id = %req.container_id, "remove container");
        let res = self
            .detached(|i| async move { i.remove(&req.container_id).await })
            .await;
        reply("RemoveContainer", res)?;
        Ok(Empty::default())
    }

    async fn exec_process(
        &self,
        _: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> TtrpcResult<ExecProcessResponse> {
        info!(id = %req.container_id, exec = %req.exec_id, "exec process");
        let res = self.detached(|i| async move { i.exec(req).await }).await;
        let pid = reply("ExecProcess", res)?;
        Ok(ExecProcessResponse {
            pid,
            ..Default::default()
        })
    }

    async fn signal_process(
        &self,
        _: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> TtrpcResult<Empty> {
        info!(id = %req.container_id, exec = %req.exec_id, signal = req.signal, all = req.all, "signal");
        let res = self.detached(|i| async move { i.signal(&req).await }).await;
        reply("SignalProcess", res)?;
        Ok(Empty::default())
    }

    async fn wait_process(
        &self,
        _: &TtrpcContext,
        req: ProcessRequest,
    ) -> TtrpcResult<WaitProcessResponse> {
        let res = async {
            let c = self.container(&req.container_id)?;
            let process = c.process(&req.exec_id)?;
            let exit = if req.wait_timeout_ms == 0 {
                process.wait().await?
            } else {
                let bound = std::time::Duration::from_millis(req.wait_timeout_ms.into());
                match tokio::time::timeout(bound, process.wait()).await {
                    Ok(exit) => exit?,
                    Err(_) => return Ok(None),
                }
            };
            // Read once the init process has exited: its cgroup stays until
            // the container is removed.
            let oom_killed = req.exec_id.is_empty() && c.oom_killed();
            if oom_killed {
                info!(id = %c.id, status = exit.status, "container was OOM killed");
            }
            Ok(Some((exit, oom_killed)))
        }
        .await;
        let Some((exit, oom_killed)) = reply("WaitProcess", res)? else {
            return Ok(WaitProcessResponse {
                still_running: true,
                ..Default::default()
            });
        };
        Ok(WaitProcessResponse {
            exit_status: exit.status,
            exited_at_ns: exit.at_ns,
            oom_killed,
            ..Default::default()
        })
    }

    async fn write_stdin(
        &self,
        _: &TtrpcContext,
        req: WriteStreamRequest,
    ) -> TtrpcResult<WriteStreamResponse> {
        let res = async {
            let p = self.process(&req.container_id, &req.exec_id)?;
            p.write_stdin(&req.data).await
        }
        .await;
        let len = reply("WriteStdin", res)?;
        Ok(WriteStreamResponse {
            len: len as u32,
            ..Default::default()
        })
    }

    async fn close_stdin(&self, _: &TtrpcContext, req: ProcessRequest) -> TtrpcResult<Empty> {
        let res = async {
            let p = self.process(&req.container_id, &req.exec_id)?;
            p.close_stdin().await;
            Ok(())
        }
        .await;
        reply("CloseStdin", res)?;
        Ok(Empty::default())
    }

    async fn read_stdout(
        &self,
        _: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> TtrpcResult<ReadStreamResponse> {
        let res = async {
            let p = self.process(&req.container_id, &req.exec_id)?;
            match req.delivered {
                Some(d) => p.stdout.read_acked(req.len as usize, d).await,
                None => p.stdout.read(req.len as usize).await.map(|data| (0, data)),
            }
        }
        .await;
        let (offset, data) = reply("ReadStdout", res)?;
        Ok(ReadStreamResponse {
            data,
            offset,
            ..Default::default()
        })
    }

    async fn read_stderr(
        &self,
        _: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> TtrpcResult<ReadStreamResponse> {
        let res = async {
            let p = self.process(&req.container_id, &req.exec_id)?;
            match req.delivered {
                Some(d) => p.stderr.read_acked(req.len as usize, d).await,
                None => p.stderr.read(req.len as usize).await.map(|data| (0, data)),
            }
        }
        .await;
        let (offset, data) = reply("ReadStderr", res)?;
        Ok(ReadStreamResponse {
            data,
            offset,
            ..Default::default()
        })
    }

    async fn resize_tty(&self, _: &TtrpcContext, req: ResizeTtyRequest) -> TtrpcResult<Empty> {
        let res = self
            .process(&req.container_id, &req.exec_id)
            .and_then(|p| p.resize(req.width, req.height));
        reply("ResizeTty", res)?;
        Ok(Empty::default())
    }

    async fn list_pids(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> TtrpcResult<ListPidsResponse> {
        let c = reply("ListPids", self.container(&req.container_id))?;
        Ok(ListPidsResponse {
            pids: c.pids(),
            ..Default::default()
        })
    }

    async fn stats(&self, _: &TtrpcContext, req: ContainerRequest) -> TtrpcResult<StatsResponse> {
        let c = reply("Stats", self.container(&req.container_id))?;
        let s = c.stats();
        Ok(StatsResponse {
            memory_usage_bytes: s.memory_usage_bytes,
            memory_limit_bytes: s.memory_limit_bytes,
            cpu_usage_ns: s.cpu_usage_ns,
            pids_current: s.pids_current,
            memory_inactive_file_bytes: s.memory_inactive_file_bytes,
            cpu_user_ns: s.cpu_user_ns,
            cpu_system_ns: s.cpu_system_ns,
            oom_kills: s.oom_kills,
            ..Default::default()
        })
    }

    async fn setup_sandbox(
        &self,
        _: &TtrpcContext,
        req: SetupSandboxRequest,
    ) -> TtrpcResult<Empty> {
        // The NICs' driver is among the modules loaded before the guest is
        // ready.
        let mut ready = self.inner.guest_ready.clone();
        let _ = ready.wait_for(|r| *r).await;
        let res = tokio::task::spawn_blocking(move || {
            if !req.hostname.is_empty() {
                nix::unistd::sethostname(&req.hostname).map_err(|e| {
                    Error::InvalidArgument(format!("host name {:?}: {e}", req.hostname))
                })?;
            }
            crate::net::setup(&req.interfaces, &req.routes)?;
            crate::pod::write_files(
                Path::new(POD_DIR),
                &req.hostname,
                &req.resolv_conf,
                &req.hosts,
            )?;
            let mut sysctls: Vec<(String, String)> = req.sysctls.into_iter().collect();
            sysctls.sort();
            crate::sysctl::check(&sysctls)?;
            crate::sysctl::apply(&sysctls)?;
            if !req.interfaces.is_empty() {
                info!(
                    interfaces = ?req
                        .interfaces
                        .iter()
                        .map(|i| (&i.name, &i.addresses))
                        .collect::<Vec<_>>(),
                    routes = req.routes.len(),
                    "pod network set up"
                );
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|e| Err(Error::Internal(format!("SetupSandbox worker: {e}"))));
        reply("SetupSandbox", res)?;
        Ok(Empty::default())
    }

    async fn update_container(
        &self,
        _: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> TtrpcResult<Empty> {
        info!(id = %req.container_id, "update container");
        let res = self
            .detached(|i| async move { i.update(&req.container_id, &req.resources_json).await })
            .await;
        reply("UpdateContainer", res)?;
        Ok(Empty::default())
    }

    async fn port_forward_open(
        &self,
        _: &TtrpcContext,
        req: PortForwardOpenRequest,
    ) -> TtrpcResult<PortForwardOpenResponse> {
        let res = self.forwards.open(req.port, req.connect_timeout_ms).await;
        Ok(PortForwardOpenResponse {
            connection_id: reply("PortForwardOpen", res)?,
            ..Default::default()
        })
    }

    async fn port_forward_write(
        &self,
        _: &TtrpcContext,
        req: PortForwardWriteRequest,
    ) -> TtrpcResult<WriteStreamResponse> {
        let res = self.forwards.write(req.connection_id, &req.data).await;
        Ok(WriteStreamResponse {
            len: reply("PortForwardWrite", res)? as u32,
            ..Default::default()
        })
    }

    async fn port_forward_read(
        &self,
        _: &TtrpcContext,
        req: PortForwardReadRequest,
    ) -> TtrpcResult<PortForwardReadResponse> {
        let res = self.forwards.read(req.connection_id, req.len).await;
        Ok(PortForwardReadResponse {
            data: reply("PortForwardRead", res)?,
            ..Default::default()
        })
    }

    async fn port_forward_shutdown(
        &self,
        _: &TtrpcContext,
        req: PortForwardConnection,
    ) -> TtrpcResult<Empty> {
        let res = self.forwards.shutdown(req.connection_id).await;
        reply("PortForwardShutdown", res)?;
        Ok(Empty::default())
    }

    async fn port_forward_close(
        &self,
        _: &TtrpcContext,
        req: PortForwardConnection,
    ) -> TtrpcResult<Empty> {
        reply("PortForwardClose", self.forwards.close(req.connection_id))?;
        Ok(Empty::default())
    }

    async fn port_forward_reset(&self, _: &TtrpcContext, _: Empty) -> TtrpcResult<Empty> {
        let closed = self.forwards.reset();
        info!(closed, "port-forward connections reset");
        Ok(Empty::default())
    }

    async fn debug_exec(
        &self,
        _: &TtrpcContext,
        req: DebugExecRequest,
    ) -> TtrpcResult<DebugExecResponse> {
        info!(argv = ?req.argv, timeout_ms = req.timeout_ms, "debug exec");
        // In a task of its own: a request the host gives up on still ends
        // with its command killed at the timeout.
        let res = self
            .detached(|i| async move {
                let command = DebugCommand::new(req.argv, req.stdin, req.timeout_ms)?;
                crate::debug::run(i.reaper.as_ref(), command).await
            })
            .await;
        let o = reply("DebugExec", res)?;
        info!(
            status = o.exit_status,
            timed_out = o.timed_out,
            "debug exec done"
        );
        Ok(DebugExecResponse {
            exit_status: o.exit_status,
            stdout: o.stdout.data,
            stderr: o.stderr.data,
            stdout_truncated: o.stdout.truncated,
            stderr_truncated: o.stderr.truncated,
            timed_out: o.timed_out,
            ..Default::default()
        })
    }

    async fn warm_up(&self, _: &TtrpcContext, _: Empty) -> TtrpcResult<WarmUpResponse> {
        // Like a pod's containers: on the set-up guest (cgroup controllers
        // enabled, crun's sealed copy made).
        let mut ready = self.inner.guest_ready.clone();
        let _ = ready.wait_for(|r| *r).await;
        let res = self
            .detached(|i| async move { crate::warmup::warm_up(&i.runtime).await })
            .await;
        let elapsed = reply("WarmUp", res)?;
        let elapsed_ms = elapsed.as_millis() as u64;
        info!(elapsed_ms, "warmed up");
        Ok(WarmUpResponse {
            elapsed_ms,
            ..Default::default()
        })
    }
}
