//! The hypervisor seam: a [`Hypervisor`] makes [`Vmm`]s from a neutral
//! [`VmPlan`] and takes running ones back after a restart; one module per
//! hypervisor (`qemu/`) implements both, and owns its files, its command
//! line and the marker by which its processes are recognised. What a
//! second hypervisor implements: docs/design.md, "Adding a hypervisor".
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

pub mod held;
pub mod probe;
pub mod qemu;

/// How the VMM process ended: the exit code, or the signal that killed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExit {
    Code(i32),
    Signal(i32),
    /// It ended, how is unknown: a VMM adopted from an earlier run of the
    /// sandboxer is not our child, and only a parent learns the status.
    Unknown,
}

#[derive(Debug, thiserror::Error)]
pub enum StartVmError {
    #[error("{what} {path} does not exist")]
    Missing { what: &'static str, path: PathBuf },
    #[error("prepare sandbox directory {path}")]
    Prepare {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("spawn {binary}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("the VMM exited during start ({exit:?}): {log}")]
    Exited { exit: VmExit, log: String },
    #[error("the VMM did not create {path} within {after:?}")]
    NoSocket { path: PathBuf, after: Duration },
    #[error(
        "the guest agent did not come up within {after:?}; guest console ends with: {console}"
    )]
    BootTimeout { after: Duration, console: String },
    #[error("the VMM exited while the guest booted ({exit:?}); guest console ends with: {console}; VMM log: {log}")]
    DiedDuringBoot {
        exit: VmExit,
        console: String,
        log: String,
    },
    #[error("no free uid for a confined QEMU: every one of [qemu] uid_base .. uid_base + uid_count is in use")]
    NoUid,
    #[error("connect to the guest agent")]
    Agent(#[source] crate::agent::AgentError),
}

#[derive(Debug, thiserror::Error)]
pub enum StopVmError {
    #[error("the VMM (pid {pid}) did not exit after SIGKILL")]
    Unkillable { pid: u32 },
}

/// A VM to boot for one sandbox, in no hypervisor's terms.
#[derive(Debug)]
pub struct VmPlan {
    /// The sandbox's id (the VM's name; what recognises its process).
    pub id: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The sandbox's directory: the VMM's sockets, logs and pid file, and
    /// `shared/`, the directory the guest mounts at [`GUEST_SHARED_DIR`].
    pub dir: PathBuf,
    /// The pod's NICs, in order (none without a pod network).
    pub nics: Vec<PlanNic>,
    /// The `cgroup.procs` files of the cgroup the VMM runs in (it joins
    /// them before it starts); none to stay in kuasar-vmm's.
    pub cgroup_procs: Vec<PathBuf>,
    /// A pooled VM, booted ahead of its pod: the VMM runs at a lower CPU
    /// priority (the pod that takes it raises it) so that refilling the
    /// pool never starves running pods.
    pub background: bool,
}

impl VmPlan {
    /// Where the guest's console is logged.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join(CONSOLE_LOG)
    }
}

/// A guest NIC on a tap device of the pod's network namespace.
#[derive(Debug)]
pub struct PlanNic {
    /// An open queue of the tap; the VMM process inherits it.
    pub tap: OwnedFd,
    /// The guest NIC's MAC address (`aa:bb:cc:dd:ee:ff`): the pod
    /// interface's, so that the pod's neighbours see no change.
    pub mac: String,
}

/// One hypervisor: the factory of its VMs. kuasar-vmm holds one, chosen by
/// the configuration, resolved against the host once at start-up.
pub trait Hypervisor: Send + Sync {
    /// Its name, as sandbox status reports show it (`info["vmm"]`).
    fn name(&self) -> &'static str;
    /// A VM for `plan`, not yet started ([`Vmm::start`] boots it).
    fn prepare(&self, plan: VmPlan) -> Box<dyn Vmm>;
    /// Takes over the VMM process `pid` that an earlier kuasar-vmm started
    /// for `plan` (the caller checked it with [`Hypervisor::owns`]); its
    /// exit is followed although it is not our child.
    fn adopt(&self, plan: VmPlan, pid: u32) -> std::io::Result<Box<dyn Vmm>>;
    /// True when process `pid` is the VMM of sandbox `id`: a recycled pid
    /// is never mistaken for it.
    fn owns(&self, pid: u32, id: &str) -> bool;
    /// The pid a VMM started in sandbox directory `dir` wrote down, for
    /// cleaning up after a run that died before recording the sandbox.
    fn recorded_pid(&self, dir: &Path) -> Option<u32>;
}

/// A VM running one sandbox.
#[async_trait]
pub trait Vmm: Send + Sync {
    /// Spawns the VMM; returns once its control and agent endpoints exist.
    async fn start(&mut self) -> Result<(), StartVmError>;
    /// Stops the VM: a graceful request first, a kill after `grace`. Idempotent.
    async fn stop(&mut self, grace: Duration) -> Result<(), StopVmError>;
    /// The VMM's host process id while it runs.
    fn pid(&self) -> Option<u32>;
    /// The VMM's helper processes on the host that this run started
    /// (virtiofsd and its sandboxed child), which go where the VMM goes
    /// (a pooled VM's into its pod's cgroup).
    fn helper_pids(&self) -> Vec<u32> {
        Vec::new()
    }
    /// Where the guest agent is reached (a ttrpc address).
    fn agent_address(&self) -> String;
    /// The guest's console log.
    fn console_log(&self) -> &Path;
    /// Changes to `Some` when the VMM process has exited.
    fn exited(&self) -> watch::Receiver<Option<VmExit>>;
    /// Keeps each descriptor open inside the VMM process, under its name,
    /// until released or the VMM exits. What must outlive a sandboxer
    /// restart (the write ends of a container's output fifos, which tell
    /// containerd the output ended when the last one closes) is held there.
    async fn hold_fds(&self, fds: Vec<(String, std::os::fd::OwnedFd)>) -> Result<(), String>;
    /// Closes what [`Vmm::hold_fds`] holds under these names (unknown names
    /// are ignored).
    async fn release_fds(&self, names: Vec<String>) -> Result<(), String>;
    /// The VM's directory was moved to `dir` (a pooled VM taken by a pod:
    /// its files now live in the sandbox's directory).
    fn relocate(&mut self, dir: &Path);
}

/// In a VM's directory: the name its VMM process is recognised by, when it
/// is not the directory's own (a pooled VM's, which keeps the name it was
/// booted with after a pod took it).
pub const VM_NAME_FILE: &str = "vm.name";

/// The name the VM in directory `dir` was booted with: [`VM_NAME_FILE`]'s,
/// else the directory's name (the sandbox id).
pub fn vm_name(dir: &Path) -> String {
    match std::fs::read_to_string(dir.join(VM_NAME_FILE)) {
        Ok(name) if !name.trim().is_empty() => name.trim().to_owned(),
        _ => dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
}

/// The guest's console log, in the sandbox's directory, whatever the
/// hypervisor (kuasarctl console reads it).
pub const CONSOLE_LOG: &str = "console.log";

/// Where the guest mounts the host's shared directory.
pub const GUEST_SHARED_DIR: &str = "/run/kuasar/shared";
