//! One sandbox: its VM, its agent connection, its containers.
mod adopt;
mod debug;
mod forward;
mod lifecycle;
mod phase;
mod pooled;
mod view;
mod vm;

pub use view::{Mode, SandboxState, VmShape};
pub(crate) use vm::boot_agent;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kuasar_api::agent::{CreateContainerRequest, ExecProcessRequest, StatsResponse};
use kuasar_api::containerd::events::task as ev;
use kuasar_api::containerd::topics;

use crate::agent::Agent;
use crate::container::{validate_id, Container, ProcState, Process};
use crate::error::{Error, Result};
use crate::events::timestamp;
use crate::host::Host;
use crate::io::{Pumps, StdioPaths};
use crate::mount::{self, MountSpec};
use crate::pod::{self, PodConfig};
use crate::vmm::GUEST_SHARED_DIR;

/// Largest OCI spec (config.json) accepted from a bundle.
const MAX_SPEC: u64 = 4 << 20;
/// How long an exited process's output may still take to arrive.
/// After it, output copies still running are stopped (their fifos closed):
/// long enough that a loaded machine still delivers all of it (with 2 s, an
/// Exec through CRI's streaming server once lost its output under a full
/// test run), short enough that a stream the guest never ends does not hang
/// an ExecSync for long.
const OUTPUT_DRAIN: Duration = Duration::from_secs(10);

/// Who a sandbox belongs to, as the shim registered it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxInfo {
    pub id: String,
    pub namespace: String,
    pub bundle: String,
    /// containerd's ttrpc address, where events go.
    pub ttrpc_address: String,
}

/// A container to create, in domain terms.
pub struct CreateSpec {
    pub id: String,
    pub bundle: String,
    pub rootfs: Vec<MountSpec>,
    pub stdio: StdioPaths,
}

/// A process's state as reported to containerd.
pub struct ProcessStatus {
    pub pid: u32,
    pub state: ProcState,
    pub stdio: StdioPaths,
    pub bundle: String,
}

pub struct Sandbox {
    pub info: SandboxInfo,
    pub dir: PathBuf,
    host: Arc<Host>,
    created_at: u64,
    /// Where the sandbox is in its life, with the VM, agent and network it
    /// holds while it runs: one lock, transitions in phase.rs. A watch
    /// channel, so that a request can wait for a boot or a stop to end.
    phase: tokio::sync::watch::Sender<phase::Phase>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    /// Guest-side removals of deleted containers still running, by id.
    removals: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    /// The Kubernetes pod this sandbox runs, once known (CRI only).
    pod: Mutex<Option<PodConfig>>,
    /// Set when containerd drives the sandbox through the sandbox API
    /// (CreateSandbox ... ShutdownSandbox) rather than a pause container.
    managed: std::sync::atomic::AtomicBool,
    /// The zero-shim task socket, while it is served.
    task_socket: Mutex<Option<String>>,
}

impl Sandbox {
    pub fn new(host: Arc<Host>, info: SandboxInfo) -> Arc<Self> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        Self::created_at(host, info, now)
    }

    fn created_at(host: Arc<Host>, info: SandboxInfo, created_at: u64) -> Arc<Self> {
        Arc::new(Sandbox {
            dir: host.config.state_dir.join(&info.id),
            info,
            host,
            created_at,
            phase: tokio::sync::watch::channel(phase::Phase::Created).0,
            containers: Mutex::new(HashMap::new()),
            removals: Mutex::new(HashMap::new()),
            pod: Mutex::new(None),
            managed: std::sync::atomic::AtomicBool::new(false),
            task_socket: Mutex::new(None),
        })
    }

    /// Records the pod this sandbox runs; the VM boots to its measure.
    pub fn set_pod(&self, pod: PodConfig) {
        *self.pod.lock().unwrap_or_else(|p| p.into_inner()) = Some(pod);
    }

    pub fn pod(&self) -> Option<PodConfig> {
        self.pod.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The container of this sandbox whose init has guest pid `pid`, other
    /// than the pod's pause container (whose id is the sandbox's): a spec
    /// naming its PID namespace asks for CRI's TARGET mode.
    fn container_by_init_pid(&self, pid: u32) -> Option<String> {
        if pid == 0 {
            return None;
        }
        self.containers()
            .values()
            .find(|c| c.id != self.info.id && c.init.pid() == pid)
            .map(|c| c.id.clone())
    }

    fn containers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_empty(&self) -> bool {
        self.containers().is_empty()
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        self.containers()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("container {id}")))
    }

    fn process(&self, id: &str, exec_id: &str) -> Result<(Arc<Container>, Arc<Process>)> {
        let c = self.container(id)?;
        let p = c
            .process(exec_id)
            .ok_or_else(|| Error::NotFound(format!("process {exec_id} of container {id}")))?;
        Ok((c, p))
    }

    /// The running VM, if the sandbox is running.
    fn live(&self) -> Option<Arc<phase::Live>> {
        self.phase.borrow().live().cloned()
    }

    fn agent(&self) -> Result<Agent> {
        self.live().map(|live| live.agent.clone()).ok_or_else(|| {
            Error::FailedPrecondition(format!("sandbox {} has no running VM", self.info.id))
        })
    }

    async fn publish<E: protobuf::MessageFull>(&self, topic: &str, event: E) {
        self.host
            .publisher
            .publish(&self.info.ttrpc_address, &self.info.namespace, topic, event)
            .await;
    }

    /// Creates a container (booting the VM first when it is the first), in
    /// phases: admit the request, read its spec, have the VM, share its
    /// files with the guest and create it there (a failure removes what was
    /// shared), then register it and tell containerd.
    pub async fn create_container(self: &Arc<Self>, spec: CreateSpec) -> Result<u32> {
        if let Some(pid) = self.admit_container(&spec)? {
            return Ok(pid);
        }
        let (oci, pod_init_stands_in) = self.container_spec(&spec)?;
        let agent = self.ensure_vm().await?;
        let pending = self
            .removals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&spec.id);
        if let Some(removal) = pending {
            let _ = removal.await;
        }
        let dir = self.dir.join("shared").join(&spec.id);
        let created = self
            .create_in_guest(&agent, &spec, &dir, oci, pod_init_stands_in)
            .await;
        let pid = match created {
            Ok(pid) => pid,
            Err(e) => {
                if let Err(e) = mount::remove_dir(&dir) {
                    tracing::warn!(dir = %dir.display(), "remove container directory: {e}");
                }
                return Err(e);
            }
        };
        self.register_container(&agent, &spec, dir, pid).await;
        self.publish_create(&spec, pid).await;
        Ok(pid)
    }

    /// Checks a new container's request: a valid id, a sandbox not stopped,
    /// an id not taken. Some(pid): the request is a resend of one done.
    fn admit_container(&self, spec: &CreateSpec) -> Result<Option<u32>> {
        validate_id("container", &spec.id)?;
        if self.phase.borrow().ended().is_some() {
            return Err(Error::FailedPrecondition(format!(
                "sandbox {} is stopped: no container can be created in it",
                self.info.id
            )));
        }
        if let Some(c) = self.containers().get(&spec.id) {
            // The shim resends a request once after a lost connection: the
            // same container again is that, not a conflict.
            if c.bundle == spec.bundle && c.init.stdio == spec.stdio {
                return Ok(Some(c.init.pid()));
            }
            return Err(Error::AlreadyExists(format!("container {}", spec.id)));
        }
        Ok(None)
    }

    /// The container's OCI spec from its bundle, and whether the agent's
    /// pod init stands in for it. The pod's sandbox container (podsandbox
    /// mode) brings the pod's settings, recorded here.
    fn container_spec(&self, spec: &CreateSpec) -> Result<(serde_json::Value, bool)> {
        let oci = read_spec(Path::new(&spec.bundle))?;
        let mut oci: serde_json::Value = serde_json::from_slice(&oci).map_err(|e| {
            Error::InvalidArgument(format!("OCI spec of container {}: {e}", spec.id))
        })?;
        // When the sandbox container runs pause, the agent's pod init
        // stands for it. Its rootfs is shared all the same, for an agent
        // from before `sandbox_container`, which runs it.
        let sandbox_container = pod::from_sandbox_spec(&oci)?;
        let pod_init_stands_in = sandbox_container.is_some() && pod::runs_pause(&oci);
        if let Some(pod) = sandbox_container {
            // The pod's sysctls are the VM's (SetupSandbox), not the pause
            // container's alone.
            if let Some(linux) = oci.get_mut("linux").and_then(|l| l.as_object_mut()) {
                linux.remove("sysctl");
            }
            self.set_pod(pod);
        }
        Ok((oci, pod_init_stands_in))
    }

    /// Shares the container's rootfs and bind mounts with the guest under
    /// `dir`, rewrites its spec for the guest, and creates it there;
    /// returns its init's pid. What it shared stays for the caller to
    /// remove on failure.
    async fn create_in_guest(
        &self,
        agent: &Agent,
        spec: &CreateSpec,
        dir: &Path,
        mut oci: serde_json::Value,
        pod_init_stands_in: bool,
    ) -> Result<u32> {
        make_container_dir(dir)?;
        let guest = crate::spec::for_guest(
            &mut oci,
            &dir.join("mounts"),
            &format!("{GUEST_SHARED_DIR}/{}/mounts", spec.id),
        )?;
        prepare_rootfs(spec, &dir.join("rootfs"))?;
        let carried = crate::spec::share(&guest.binds)?;
        crate::spec::carry_submounts(&mut oci, &guest.binds, &carried);
        let oci = serde_json::to_vec(&oci)
            .map_err(|e| Error::InvalidArgument(format!("OCI spec: {e}")))?;
        let pid = agent
            .create_container(CreateContainerRequest {
                container_id: spec.id.clone(),
                spec_json: oci,
                rootfs_path: format!("{GUEST_SHARED_DIR}/{}/rootfs", spec.id),
                stdin: !spec.stdio.stdin.is_empty(),
                stdout: !spec.stdio.stdout.is_empty(),
                stderr: !spec.stdio.stderr.is_empty(),
                terminal: spec.stdio.terminal,
                pod_pid_namespace: guest.pid_namespace_of.is_some(),
                pid_namespace_of: guest
                    .pid_namespace_of
                    .and_then(|pid| self.container_by_init_pid(pid))
                    .unwrap_or_default(),
                sandbox_container: pod_init_stands_in,
                ..Default::default()
            })
            .await?;
        Ok(pid)
    }

    /// Registers a container created in the guest: its init process with
    /// its output copies, the stdio the VMM holds, the persisted record.
    async fn register_container(&self, agent: &Agent, spec: &CreateSpec, dir: PathBuf, pid: u32) {
        let init = Process::new(&spec.id, "", spec.stdio.clone(), Vec::new());
        init.set_pid(pid);
        *init.pumps.lock().await = Pumps::start(agent, &self.info.id, &spec.id, "", &spec.stdio);
        self.hold_stdio(&spec.id, &spec.stdio).await;
        let container = Arc::new(Container {
            id: spec.id.clone(),
            bundle: spec.bundle.clone(),
            dir,
            init,
            execs: Mutex::new(HashMap::new()),
        });
        self.containers().insert(spec.id.clone(), container);
        self.save_record();
    }

    /// Tells containerd of a created container (TaskCreate).
    async fn publish_create(&self, spec: &CreateSpec, pid: u32) {
        let rootfs = spec
            .rootfs
            .iter()
            .map(|m| kuasar_api::containerd::types::mount::Mount {
                type_: m.fstype.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
                ..Default::default()
            })
            .collect();
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            ev::TaskCreate {
                container_id: spec.id.clone(),
                bundle: spec.bundle.clone(),
                rootfs,
                io: Some(ev::TaskIO {
                    stdin: spec.stdio.stdin.clone(),
                    stdout: spec.stdio.stdout.clone(),
                    stderr: spec.stdio.stderr.clone(),
                    terminal: spec.stdio.terminal,
                    ..Default::default()
                })
                .into(),
                pid,
                ..Default::default()
            },
        )
        .await;
    }

    /// Starts a container's init process or a registered exec.
    pub async fn start(self: &Arc<Self>, id: &str, exec_id: &str) -> Result<u32> {
        let (_, process) = self.process(id, exec_id)?;
        if process.state() != ProcState::Created && process.pid() != 0 {
            // A resent Start (see create_container).
            return Ok(process.pid());
        }
        if process.state() != ProcState::Created {
            return Err(Error::FailedPrecondition(format!(
                "process {} of container {id} was already started",
                process.id()
            )));
        }
        let agent = self.agent()?;
        let pid = if exec_id.is_empty() {
            agent.start_container(id).await?
        } else {
            let pid = agent
                .exec_process(ExecProcessRequest {
                    container_id: id.to_owned(),
                    exec_id: exec_id.to_owned(),
                    process_json: process.spec.clone(),
                    stdin: !process.stdio.stdin.is_empty(),
                    stdout: !process.stdio.stdout.is_empty(),
                    stderr: !process.stdio.stderr.is_empty(),
                    terminal: process.stdio.terminal,
                    ..Default::default()
                })
                .await?;
            *process.pumps.lock().await =
                Pumps::start(&agent, &self.info.id, id, exec_id, &process.stdio);
            pid
        };
        process.set_pid(pid);
        process.set_running();
        if exec_id.is_empty() {
            self.save_record();
        }
        self.spawn_waiter(agent, process.clone());
        if exec_id.is_empty() {
            self.publish(
                topics::TASK_START_EVENT_TOPIC,
                ev::TaskStart {
                    container_id: id.to_owned(),
                    pid,
                    ..Default::default()
                },
            )
            .await;
        } else {
            self.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                ev::TaskExecStarted {
                    container_id: id.to_owned(),
                    exec_id: exec_id.to_owned(),
                    pid,
                    ..Default::default()
                },
            )
            .await;
        }
        Ok(pid)
    }

    /// Follows a started process until it exits, then reports the exit
    /// once all of its output has been delivered.
    fn spawn_waiter(self: &Arc<Self>, agent: Agent, process: Arc<Process>) {
        let sandbox = self.clone();
        tokio::spawn(async move {
            let (status, at, oom) = match agent
                .wait_process(&process.container_id, &process.exec_id)
                .await
            {
                // The host's clock, not the guest's: a guest's wall clock
                // starts from a one-second RTC and drifts under emulation,
                // and containerd compares exit times with its own.
                Ok(exit) => (exit.status, SystemTime::now(), exit.oom_killed),
                Err(e) => {
                    tracing::warn!(
                        sandbox = %sandbox.info.id,
                        container = %process.container_id,
                        exec = %process.exec_id,
                        "lost the process: {e}"
                    );
                    (255, SystemTime::now(), false)
                }
            };
            process.pumps.lock().await.drain(OUTPUT_DRAIN).await;
            if process.exec_id.is_empty() {
                sandbox.release_stdio(&process.container_id).await;
            }
            if oom && process.exec_id.is_empty() && process.state() == ProcState::Running {
                // containerd's CRI marks the container OOMKilled when this
                // event comes before the exit (as runc's shim sends it).
                tracing::info!(sandbox = %sandbox.info.id, container = %process.container_id, "OOM killed");
                sandbox
                    .publish(
                        topics::TASK_OOM_EVENT_TOPIC,
                        ev::TaskOOM {
                            container_id: process.container_id.clone(),
                            ..Default::default()
                        },
                    )
                    .await;
            }
            sandbox.report_exit(&process, status, at).await;
        });
    }

    async fn report_exit(&self, process: &Process, status: u32, at: SystemTime) {
        if !process.set_exited(status, at) {
            return;
        }
        if process.exec_id.is_empty() && !self.phase.borrow().is_ending() {
            // Recorded before containerd hears of it: a restarted sandboxer
            // must not report this exit a second time.
            self.save_record();
        }
        tracing::info!(sandbox = %self.info.id, container = %process.container_id, exec = %process.exec_id, status, "process exited");
        self.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            ev::TaskExit {
                container_id: process.container_id.clone(),
                id: process.id().to_owned(),
                pid: process.pid(),
                exit_status: status,
                exited_at: Some(timestamp(at)).into(),
                ..Default::default()
            },
        )
        .await;
    }

    /// Registers an exec process; it runs on `start`.
    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        spec: Vec<u8>,
        stdio: StdioPaths,
    ) -> Result<()> {
        validate_id("exec", exec_id)?;
        let c = self.container(id)?;
        if !matches!(c.init.state(), ProcState::Running) {
            return Err(Error::FailedPrecondition(format!(
                "container {id} is not running"
            )));
        }
        {
            let mut execs = c.execs.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(p) = execs.get(exec_id) {
                if p.spec == spec && p.stdio == stdio {
                    // A resent Exec (see create_container).
                    return Ok(());
                }
                return Err(Error::AlreadyExists(format!(
                    "exec {exec_id} of container {id}"
                )));
            }
            execs.insert(exec_id.to_owned(), Process::new(id, exec_id, stdio, spec));
        }
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            ev::TaskExecAdded {
                container_id: id.to_owned(),
                exec_id: exec_id.to_owned(),
                ..Default::default()
            },
        )
        .await;
        Ok(())
    }

    pub async fn kill(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let (_, process) = self.process(id, exec_id)?;
        if let ProcState::Stopped { .. } = process.state() {
            return Err(Error::NotFound(format!(
                "process {} already finished",
                process.id()
            )));
        }
        if process.state() == ProcState::Created && !exec_id.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "exec {exec_id} was not started"
            )));
        }
        match self.agent()?.signal_process(id, exec_id, signal, all).await {
            Ok(()) => Ok(()),
            // A guest that stopped answering (or broke the protocol) cannot
            // deliver a SIGKILL, and containerd cannot stop the pod without
            // one: stopping the VM is the only way to honor it (every
            // process of the pod is then reported killed, as for a VM that
            // died).
            Err(
                e @ (crate::agent::AgentError::Timeout { .. }
                | crate::agent::AgentError::Protocol { .. }),
            ) if signal == libc::SIGKILL as u32 => {
                tracing::error!(
                    sandbox = %self.info.id,
                    container = id,
                    exec = exec_id,
                    "SIGKILL not delivered ({e}); stopping the VM instead"
                );
                if let Some(live) = self.live() {
                    if let Err(e) = live.vmm.lock().await.stop(Duration::ZERO).await {
                        tracing::error!(sandbox = %self.info.id, "{e}");
                    }
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<(u32, SystemTime)> {
        let (_, process) = self.process(id, exec_id)?;
        Ok(process.wait().await)
    }

    pub fn status(&self, id: &str, exec_id: &str) -> Result<ProcessStatus> {
        let (c, p) = self.process(id, exec_id)?;
        Ok(ProcessStatus {
            pid: p.pid(),
            state: p.state(),
            stdio: p.stdio.clone(),
            bundle: c.bundle.clone(),
        })
    }

    /// Deletes an exited exec, or a container that is not running.
    /// Returns (pid, exit status, exited at).
    pub async fn delete(&self, id: &str, exec_id: &str) -> Result<(u32, u32, SystemTime)> {
        let (c, p) = self.process(id, exec_id)?;
        let (status, at) = match p.state() {
            ProcState::Running => {
                return Err(Error::FailedPrecondition(format!(
                    "process {} is running; stop it first",
                    p.id()
                )))
            }
            ProcState::Created => (0, SystemTime::now()),
            ProcState::Stopped {
                exit_status,
                exited_at,
            } => (exit_status, exited_at),
        };
        if !exec_id.is_empty() {
            c.execs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(exec_id);
            p.pumps.lock().await.abort();
            return Ok((p.pid(), status, at));
        }
        if let Ok(agent) = self.agent() {
            // Every process of the container has exited: what is left in the
            // guest is the runtime's bookkeeping. Remove it off the request's
            // path; a new container with this id waits for it.
            let sandbox = self.info.id.clone();
            let cid = id.to_owned();
            let removal = tokio::spawn(async move {
                match agent.remove_container(&cid).await {
                    Ok(()) => {}
                    Err(e) if e.is_not_found() => {}
                    // The VM stopped meanwhile: nothing is left to remove.
                    Err(e @ crate::agent::AgentError::Transport { .. }) => {
                        tracing::debug!(%sandbox, container = %cid, "remove from the guest: {e}")
                    }
                    Err(e) => {
                        tracing::warn!(%sandbox, container = %cid, "remove from the guest: {e}")
                    }
                }
            });
            let mut removals = self.removals.lock().unwrap_or_else(|p| p.into_inner());
            removals.retain(|_, h| !h.is_finished());
            removals.insert(id.to_owned(), removal);
        }
        for process in c.all_processes() {
            process.pumps.lock().await.abort();
        }
        self.release_stdio(id).await;
        if let Err(e) = mount::remove_dir(&c.dir) {
            tracing::warn!(dir = %c.dir.display(), "remove container directory: {e}");
        }
        self.containers().remove(id);
        self.save_record();
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            ev::TaskDelete {
                container_id: id.to_owned(),
                id: id.to_owned(),
                pid: p.pid(),
                exit_status: status,
                exited_at: Some(timestamp(at)).into(),
                ..Default::default()
            },
        )
        .await;
        Ok((p.pid(), status, at))
    }

    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        let (_, p) = self.process(id, exec_id)?;
        p.pumps.lock().await.stop_stdin();
        if p.state() == ProcState::Running {
            self.agent()?.close_stdin(id, exec_id).await?;
        }
        Ok(())
    }

    pub async fn resize_pty(&self, id: &str, exec_id: &str, width: u32, height: u32) -> Result<()> {
        let (_, p) = self.process(id, exec_id)?;
        if !p.stdio.terminal {
            return Err(Error::FailedPrecondition(format!(
                "process {} has no terminal",
                p.id()
            )));
        }
        Ok(self.agent()?.resize_tty(id, exec_id, width, height).await?)
    }

    pub async fn pids(&self, id: &str) -> Result<Vec<u32>> {
        self.container(id)?;
        Ok(self.agent()?.list_pids(id).await?)
    }

    /// The processes of the pod's running containers in the guest (their
    /// cgroups' pids.current, summed; a container whose stats fail counts
    /// none).
    pub async fn guest_pids(&self) -> u64 {
        let Ok(agent) = self.agent() else {
            return 0;
        };
        let running: Vec<String> = self
            .containers()
            .values()
            .filter(|c| matches!(c.init.state(), ProcState::Running))
            .map(|c| c.id.clone())
            .collect();
        let mut pids = 0;
        for id in running {
            if let Ok(s) = agent.stats(&id).await {
                pids += s.pids_current;
            }
        }
        pids
    }

    pub async fn stats(&self, id: &str) -> Result<StatsResponse> {
        self.container(id)?;
        Ok(self.agent()?.stats(id).await?)
    }

    /// Applies new resources (OCI LinuxResources, JSON) to a running container.
    pub async fn update(&self, id: &str, resources_json: Vec<u8>) -> Result<()> {
        let c = self.container(id)?;
        if !matches!(c.init.state(), ProcState::Running | ProcState::Created) {
            return Err(Error::FailedPrecondition(format!(
                "container {id} is not running"
            )));
        }
        Ok(self.agent()?.update_container(id, resources_json).await?)
    }

    pub fn init_pid(&self, id: &str) -> Result<u32> {
        Ok(self.container(id)?.init.pid())
    }
}

fn read_spec(bundle: &Path) -> Result<Vec<u8>> {
    let path = bundle.join("config.json");
    let meta = std::fs::metadata(&path)
        .map_err(|e| Error::io(format!("read OCI spec {}", path.display()), e))?;
    if meta.len() > MAX_SPEC {
        return Err(Error::InvalidArgument(format!(
            "OCI spec {} is larger than {MAX_SPEC} bytes",
            path.display()
        )));
    }
    std::fs::read(&path).map_err(|e| Error::io(format!("read OCI spec {}", path.display()), e))
}

/// Creates a new container's directory in the share. The guest writes the
/// share too: an entry already there (which only the guest can have made,
/// a symlink to a host path, say) is refused rather than used, so that no
/// mount of the container ever lands where the guest pointed it.
fn make_container_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir(dir).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::FailedPrecondition(format!(
                "{} exists already (made in the guest, or left by an earlier container of this id); refused",
                dir.display()
            ))
        } else {
            Error::io(format!("create {}", dir.display()), e)
        }
    })
}

/// Mounts the container's rootfs at `target`: containerd's mounts, or the
/// bundle's own `rootfs` directory when containerd mounted it already.
fn prepare_rootfs(spec: &CreateSpec, target: &Path) -> Result<()> {
    // In the container's new directory: created, never found.
    std::fs::create_dir(target)
        .map_err(|e| Error::io(format!("create {}", target.display()), e))?;
    let mounts = if spec.rootfs.is_empty() {
        vec![MountSpec {
            fstype: "bind".into(),
            source: Path::new(&spec.bundle).join("rootfs").display().to_string(),
            options: vec!["rbind".into()],
        }]
    } else {
        spec.rootfs.clone()
    };
    Ok(mount::mount_all(&mounts, target)?)
}
