//! What the operator sees of a sandbox (kuasarctl, through the admin
//! service): read-only accessors, each taking one lock at most.
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
        if self.exit.borrow().is_some() {
            SandboxState::Stopped
        } else if self.is_running() {
            SandboxState::Running
        } else {
            SandboxState::Created
        }
    }

    /// The VMM's pid while it runs, else 0.
    pub fn vmm_pid(&self) -> u32 {
        self.pod_status().pid
    }

    /// Seconds since the Unix epoch.
    pub fn created_at_secs(&self) -> u64 {
        self.created_at
    }

    pub(super) fn set_vm_shape(&self, shape: VmShape) {
        *self.vm_shape.lock().unwrap_or_else(|p| p.into_inner()) = Some(shape);
    }

    /// The VM's size and files, once it was booted.
    pub fn vm_shape(&self) -> Option<VmShape> {
        self.vm_shape
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The pod's addresses (CIDR notation) as attached to the VM by this
    /// run of kuasar-vmm (an adopted sandbox's are not known).
    pub fn ips(&self) -> Vec<String> {
        self.net
            .lock()
            .unwrap_or_else(|p| p.into_inner())
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
