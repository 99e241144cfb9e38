//! What the operator sees of a sandbox (kuasarctl, through the admin
//! service): read-only accessors, each taking one lock at most.
use super::phase::Phase;
use super::*;

/// How a sandbox came to kuasar-vmm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Registered by a shim; a pause container (or a plain container, as
    /// `ctr run` makes) boots the VM.
    PodSandbox,
    /// containerd's sandbox API, relayed by a shim.
    Shim,
    /// containerd's sandbox controller API, no shim.
    ZeroShim,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::PodSandbox, Mode::Shim, Mode::ZeroShim];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::PodSandbox => "podsandbox",
            Mode::Shim => "shim",
            Mode::ZeroShim => "zero-shim",
        }
    }
}

/// The sandbox's life as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxState {
    /// Known, its VM not (yet) running.
    Created,
    /// The VM runs and its agent answers.
    Running,
    /// The VM stopped or died.
    Stopped,
}

impl SandboxState {
    pub const ALL: [SandboxState; 3] = [
        SandboxState::Created,
        SandboxState::Running,
        SandboxState::Stopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Created => "created",
            SandboxState::Running => "running",
            SandboxState::Stopped => "stopped",
        }
    }
}

/// The VM as it was booted (or adopted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmShape {
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The guest's console log.
    pub console_log: PathBuf,
}

impl VmShape {
    pub(super) fn of(plan: &crate::vmm::VmPlan) -> Self {
        VmShape {
            vcpus: plan.vcpus,
            memory_mib: plan.memory_mib,
            console_log: plan.console_log(),
        }
    }
}

/// One container as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerView {
    pub id: String,
    /// The init process's pid in the guest.
    pub pid: u32,
    pub state: ProcState,
}

impl Sandbox {
    /// How the sandbox came here: the controller (zero-shim) creates its
    /// sandboxes without a bundle; the shim's sandbox API always has one.
    pub fn mode(&self) -> Mode {
        match (self.is_managed(), self.info.bundle.is_empty()) {
            (false, _) => Mode::PodSandbox,
            (true, false) => Mode::Shim,
            (true, true) => Mode::ZeroShim,
        }
    }

    pub fn state(&self) -> SandboxState {
        match &*self.phase.borrow() {
            Phase::Created | Phase::Booting => SandboxState::Created,
            Phase::Running(_) => SandboxState::Running,
            Phase::Stopping | Phase::Stopped(_) => SandboxState::Stopped,
        }
    }

    /// True while the VM runs and its agent is connected.
    pub fn is_running(&self) -> bool {
        self.phase.borrow().live().is_some()
    }

    /// The VMM's pid while it runs, else 0.
    pub fn vmm_pid(&self) -> u32 {
        self.pod_status().pid
    }

    /// Seconds since the Unix epoch.
    pub fn created_at_secs(&self) -> u64 {
        self.created_at
    }

    /// The VM's size and files, once it was booted (also after it ended).
    pub fn vm_shape(&self) -> Option<VmShape> {
        let phase = self.phase.borrow();
        match &*phase {
            Phase::Running(live) => Some(live.shape.clone()),
            Phase::Stopped(ended) => ended.shape.clone(),
            _ => None,
        }
    }

    /// The pod's addresses (CIDR notation) as attached to the VM by this
    /// run of kuasar-vmm (an adopted sandbox's are not known).
    pub fn ips(&self) -> Vec<String> {
        let Some(live) = self.live() else {
            return Vec::new();
        };
        let held = live.held.lock().unwrap_or_else(|p| p.into_inner());
        held.net
            .as_ref()
            .map(|net| net.interfaces().flat_map(|i| i.cidrs()).collect())
            .unwrap_or_default()
    }

    /// The containers, sorted by id.
    pub fn container_views(&self) -> Vec<ContainerView> {
        let mut views: Vec<_> = self
            .containers()
            .values()
            .map(|c| ContainerView {
                id: c.id.clone(),
                pid: c.init.pid(),
                state: c.init.state(),
            })
            .collect();
        views.sort_by(|a, b| a.id.cmp(&b.id));
        views
    }
}
