//! What survives the sandboxer: the persisted record of a sandbox, taking a
//! running sandbox back after a restart (its VMM, agent, network and
//! containers with their stdio), and the stdio descriptors its VMM holds
//! meanwhile so that containerd never sees a container's output end.
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::phase::{Ended, Held, Live, Phase};
use super::*;
use crate::state::{ContainerRecord, NetRecord, ProcRecord, SandboxRecord, RECORD_VERSION};

/// How long a re-adopted VM's agent may take to answer.
const ADOPT_TIMEOUT: Duration = Duration::from_secs(10);

/// The names under which the VMM holds a container's stdio fifos. QEMU
/// wants a letter first and then letters, digits, `-`, `.` or `_`.
fn held_names(cid: &str) -> Vec<String> {
    let cid: String = cid
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '.' | '_' => c,
            _ => '_',
        })
        .collect();
    ["out", "err"]
        .iter()
        .map(|s| format!("c.{cid}.{s}"))
        .collect()
}

fn proc_record(p: &Process) -> ProcRecord {
    match p.state() {
        ProcState::Created => ProcRecord::Created,
        ProcState::Running => ProcRecord::Running,
        ProcState::Stopped {
            exit_status,
            exited_at,
        } => ProcRecord::Exited {
            status: exit_status,
            at_ns: exited_at
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as u64,
        },
    }
}

impl Sandbox {
    /// The sandbox as persisted.
    pub(super) fn record(&self) -> SandboxRecord {
        let live = self.live();
        let mut containers: Vec<ContainerRecord> = self
            .containers()
            .values()
            .map(|c| ContainerRecord {
                id: c.id.clone(),
                pid: c.init.pid(),
                bundle: c.bundle.clone(),
                stdio: c.init.stdio.clone(),
                state: proc_record(&c.init),
            })
            .collect();
        containers.sort_by(|a, b| a.id.cmp(&b.id));
        let net = live.as_ref().and_then(|live| {
            let held = live.held.lock().unwrap_or_else(|p| p.into_inner());
            match &held.net {
                Some(net) => Some(NetRecord {
                    netns: net.netns.display().to_string(),
                    links: net.links(),
                }),
                None => held.adopted_net.clone(),
            }
        });
        SandboxRecord {
            version: RECORD_VERSION,
            id: self.info.id.clone(),
            namespace: self.info.namespace.clone(),
            bundle: self.info.bundle.clone(),
            ttrpc_address: self.info.ttrpc_address.clone(),
            vmm_pid: live.as_ref().map(|live| live.pid).filter(|&pid| pid != 0),
            vm_name: live.as_ref().and_then(|live| live.vm_name.clone()),
            agent_address: live
                .as_ref()
                .map(|live| live.agent_address.clone())
                .unwrap_or_default(),
            created_at: self.created_at,
            managed: self.is_managed(),
            task_socket: self
                .task_socket
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            pod: self.pod(),
            net,
            containers,
        }
    }

    fn from_record(host: Arc<Host>, record: &SandboxRecord) -> Arc<Self> {
        let sandbox = Sandbox::created_at(
            host,
            SandboxInfo {
                id: record.id.clone(),
                namespace: record.namespace.clone(),
                bundle: record.bundle.clone(),
                ttrpc_address: record.ttrpc_address.clone(),
            },
            record.created_at,
        );
        sandbox
            .managed
            .store(record.managed, std::sync::atomic::Ordering::SeqCst);
        *sandbox.pod.lock().unwrap_or_else(|p| p.into_inner()) = record.pod.clone();
        sandbox
    }

    /// Registers a record's containers with the states it gives them;
    /// `lost` replaces the state of those not exited (their VM is gone).
    fn restore_containers(&self, record: &SandboxRecord, lost: Option<u32>) {
        for c in &record.containers {
            let init = Process::new(&c.id, "", c.stdio.clone(), Vec::new());
            init.set_pid(c.pid);
            match (c.state, lost) {
                (ProcRecord::Exited { status, at_ns }, _) => {
                    init.set_exited(status, UNIX_EPOCH + Duration::from_nanos(at_ns));
                }
                (_, Some(status)) => {
                    init.set_exited(status, SystemTime::now());
                }
                (ProcRecord::Running, None) => init.set_running(),
                (ProcRecord::Created, None) => {}
            }
            let container = Arc::new(Container {
                id: c.id.clone(),
                bundle: if c.bundle.is_empty() {
                    record.bundle.clone()
                } else {
                    c.bundle.clone()
                },
                dir: self.dir.join("shared").join(&c.id),
                init,
                execs: Mutex::new(HashMap::new()),
            });
            self.containers().insert(c.id.clone(), container);
        }
    }

    /// A sandbox of an earlier run whose VM is gone: its containers are
    /// known, stopped (those that had not exited with `lost_status`), and
    /// can only be deleted.
    pub fn stopped(host: Arc<Host>, record: SandboxRecord, lost_status: u32) -> Arc<Self> {
        let sandbox = Self::from_record(host, &record);
        sandbox.restore_containers(&record, Some(lost_status));
        sandbox.phase.send_replace(Phase::Stopped(Ended {
            status: lost_status,
            at: SystemTime::now(),
            shape: None,
        }));
        sandbox
    }

    /// Takes back a sandbox whose VMM (pid `vmm_pid`, checked to be this
    /// sandbox's by the caller) still runs: connects to its agent, follows
    /// the VMM, and resumes every live container's stdio and exit watch.
    pub async fn adopt(host: Arc<Host>, record: SandboxRecord, vmm_pid: u32) -> Result<Arc<Self>> {
        let sandbox = Self::from_record(host.clone(), &record);
        // The size the VM was booted with (what the operator's view shows).
        let size = sandbox.pod_vm_size(record.pod.as_ref()).ok().flatten();
        let plan = sandbox.vm_plan(size);
        let shape = VmShape::of(&plan);
        let vm = host
            .hypervisor
            .adopt(plan, vmm_pid)
            .map_err(|e| Error::io(format!("follow VMM pid {vmm_pid}"), e))?;
        let deadline = Instant::now() + ADOPT_TIMEOUT;
        let (agent, _) =
            Agent::connect(&record.agent_address, deadline, host.metrics.clone()).await?;
        *sandbox
            .task_socket
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = record.task_socket.clone();
        sandbox.restore_containers(&record, None);
        let exited = vm.exited();
        let mut held = Held {
            adopted_net: record.net.clone(),
            cgroup: sandbox
                .vmm_cgroup(record.pod.as_ref())
                .ok()
                .flatten()
                .map(|rel| crate::cgroup::VmmCgroup::at(&host.cgroups, &rel)),
            ..Held::default()
        };
        if let Some(net) = &record.net {
            held.port_forward = sandbox
                .start_port_forward(Path::new(&net.netns), &agent)
                .await;
        }
        sandbox.phase.send_replace(Phase::Running(Arc::new(Live {
            vmm: tokio::sync::Mutex::new(vm),
            agent: agent.clone(),
            pid: vmm_pid,
            agent_address: record.agent_address.clone(),
            shape,
            held: Mutex::new(held),
            vm_name: record.vm_name.clone(),
        })));
        let containers: Vec<_> = sandbox.containers().values().cloned().collect();
        for c in containers {
            let p = &c.init;
            match p.state() {
                ProcState::Stopped { .. } => sandbox.release_stdio(&c.id).await,
                state => {
                    *p.pumps.lock().await =
                        Pumps::start(&agent, &sandbox.info.id, &c.id, "", &p.stdio);
                    if state == ProcState::Running {
                        sandbox.spawn_waiter(agent.clone(), p.clone());
                    }
                }
            }
        }
        sandbox.watch_vm(exited);
        sandbox.save_record();
        Ok(sandbox)
    }

    /// Hands the VMM a copy (read-write) of the container's output fifos to
    /// keep until [`Sandbox::release_stdio`]: while the sandboxer restarts,
    /// containerd's reader of the container's output sees no end. Best
    /// effort: a failure costs only that protection. (Not stdin: a reader
    /// held there would let containerd's writer come and go before our own
    /// reader opens the fifo, which then waits for a writer forever.)
    pub(super) async fn hold_stdio(&self, cid: &str, stdio: &crate::io::StdioPaths) {
        let mut fds = Vec::new();
        for (path, name) in [&stdio.stdout, &stdio.stderr]
            .into_iter()
            .zip(held_names(cid))
        {
            if path.is_empty() || crate::io::streaming::is_stream(path) {
                continue;
            }
            let opened = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(path);
            match opened {
                Ok(f) => fds.push((name, std::os::fd::OwnedFd::from(f))),
                Err(e) => tracing::debug!(sandbox = %self.info.id, path, "hold fifo: {e}"),
            }
        }
        if fds.is_empty() {
            return;
        }
        if let Some(live) = self.live() {
            if let Err(e) = live.vmm.lock().await.hold_fds(fds).await {
                tracing::warn!(sandbox = %self.info.id, container = cid, "the VMM does not hold the stdio (a sandboxer restart would end its output): {e}");
            }
        }
    }

    /// Hands the VMM a copy of `fd` to keep under `name` until released
    /// or the VM ends (see [`crate::vmm::Vmm::hold_fds`]).
    pub async fn hold_fd(
        &self,
        name: String,
        fd: std::os::fd::OwnedFd,
    ) -> std::result::Result<(), String> {
        let live = self.live().ok_or("the sandbox has no running VM")?;
        let held = live.vmm.lock().await.hold_fds(vec![(name, fd)]).await;
        held
    }

    /// Closes the VMM's copies held under `names` (best effort: a VM that
    /// is gone holds nothing).
    pub async fn release_fds(&self, names: Vec<String>) {
        if let Some(live) = self.live() {
            if let Err(e) = live.vmm.lock().await.release_fds(names).await {
                tracing::debug!(sandbox = %self.info.id, "release held descriptors: {e}");
            }
        }
    }

    /// Copies back the sockets the VMM holds, by inode (after a restart).
    pub fn take_back_sockets(
        &self,
        inodes: &[u64],
    ) -> std::io::Result<std::collections::HashMap<u64, std::os::fd::OwnedFd>> {
        let live = self
            .live()
            .ok_or_else(|| std::io::Error::other("the sandbox has no running VM"))?;
        crate::vmm::held::take_back(live.pid, inodes)
    }

    /// Closes the VMM's copies of a container's stdio fifos.
    pub(super) async fn release_stdio(&self, cid: &str) {
        if let Some(live) = self.live() {
            if let Err(e) = live.vmm.lock().await.release_fds(held_names(cid)).await {
                tracing::warn!(sandbox = %self.info.id, container = cid, "release held stdio: {e}");
            }
        }
    }

    /// Records the zero-shim task socket (None once no longer served).
    pub fn set_task_socket(&self, path: Option<String>) {
        *self.task_socket.lock().unwrap_or_else(|p| p.into_inner()) = path;
        if self.is_running() {
            self.save_record();
        }
    }

    pub fn task_socket(&self) -> Option<String> {
        self.task_socket
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn held_names_are_qemu_ids() {
        let names = super::held_names("0abc_d.e-f:g");
        assert_eq!(names, ["c.0abc_d.e-f_g.out", "c.0abc_d.e-f_g.err"]);
    }
}
