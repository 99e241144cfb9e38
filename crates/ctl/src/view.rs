//! The JSON objects kuasarctl prints (`list -o json`, `inspect`).
use kuasar_api::sandboxer::{ContainerSummary, SandboxSummary};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Sandbox {
    pub id: String,
    pub namespace: String,
    /// podsandbox, shim or zero-shim.
    pub mode: String,
    /// created, running or stopped.
    pub state: String,
    /// The VMM's pid, null when it does not run.
    pub vmm_pid: Option<u32>,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u32>,
    pub ips: Vec<String>,
    pub hostname: String,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    pub containers: Vec<Container>,
    pub files: Files,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Container {
    pub id: String,
    /// The init process's pid in the guest.
    pub pid: u32,
    pub state: String,
    /// Set once it stopped.
    pub exit_status: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Files {
    pub state_dir: String,
    pub console_log: Option<String>,
    pub task_socket: Option<String>,
}

fn nonzero(v: u32) -> Option<u32> {
    (v != 0).then_some(v)
}

fn nonempty(v: String) -> Option<String> {
    (!v.is_empty()).then_some(v)
}

impl From<ContainerSummary> for Container {
    fn from(c: ContainerSummary) -> Self {
        Container {
            exit_status: (c.state == "stopped").then_some(c.exit_status),
            id: c.id,
            pid: c.pid,
            state: c.state,
        }
    }
}

impl From<SandboxSummary> for Sandbox {
    fn from(s: SandboxSummary) -> Self {
        Sandbox {
            id: s.id,
            namespace: s.namespace,
            mode: s.mode,
            state: s.state,
            vmm_pid: nonzero(s.vmm_pid),
            vcpus: nonzero(s.vcpus),
            memory_mib: nonzero(s.memory_mib),
            ips: s.ips,
            hostname: s.hostname,
            created_at: s.created_at,
            containers: s.containers.into_iter().map(Container::from).collect(),
            files: Files {
                state_dir: s.state_dir,
                console_log: nonempty(s.console_log),
                task_socket: nonempty(s.task_socket),
            },
        }
    }
}
