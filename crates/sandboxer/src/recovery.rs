//! What the sandboxer finds of earlier runs at start-up, before it serves
//! anything. A sandbox whose VMM still runs is taken back (its containers go
//! on, containerd notices nothing). One whose VMM is gone is cleaned: its
//! directory removed, its containers not yet exited reported exited, and it
//! stays registered, stopped, so that containerd can still query and delete
//! it. A directory whose state cannot be read is reported, its VMM (when
//! its pid file names one of ours) stopped, and removed; the rest recover.
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use kuasar_api::containerd::events::task::TaskExit;
use kuasar_api::containerd::topics::TASK_EXIT_EVENT_TOPIC;

use crate::events::timestamp;
use crate::host::Host;
use crate::sandbox::Sandbox;
use crate::state::{ProcRecord, SandboxRecord};
use crate::vmm::Hypervisor;

/// Exit status reported for a container whose VM was gone at recovery.
pub const LOST_EXIT_STATUS: u32 = 255;

/// What recovery found.
#[derive(Default)]
pub struct Recovered {
    /// Sandboxes whose VM runs on, taken back.
    pub adopted: Vec<Arc<Sandbox>>,
    /// Sandboxes whose VM is gone, their containers stopped.
    pub stopped: Vec<Arc<Sandbox>>,
    /// Directories removed because their state could not be read.
    pub unreadable: usize,
}

/// Recovers every sandbox directory under the host's state directory.
pub async fn recover_all(host: &Arc<Host>) -> Recovered {
    let mut found = Recovered::default();
    let Ok(entries) = std::fs::read_dir(&host.config.state_dir) else {
        return found;
    };
    for entry in entries.flatten() {
        if !entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            continue;
        }
        let dir = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        // The zero-shim mode's short task socket paths live under `t/`.
        if name == "t" || name == crate::pool::POOL_DIR {
            continue;
        }
        let record = match SandboxRecord::load(&dir) {
            Ok(r) if r.id == name && crate::container::validate_id("sandbox", &r.id).is_ok() => r,
            Ok(r) => {
                tracing::error!(sandbox = %name, recorded = %r.id, "sandbox state names another sandbox; cleaning the directory");
                clean_leftover(host, &dir);
                found.unreadable += 1;
                continue;
            }
            Err(e) => {
                tracing::error!(sandbox = %name, "unreadable sandbox state, cleaning the directory: {}", crate::error::chain(&e));
                clean_leftover(host, &dir);
                found.unreadable += 1;
                continue;
            }
        };
        let alive = record
            .vmm_pid
            .filter(|&pid| host.hypervisor.owns(pid, record.vm_name()));
        if let Some(pid) = alive {
            match Sandbox::adopt(host.clone(), record.clone(), pid).await {
                Ok(sandbox) => {
                    tracing::info!(sandbox = %record.id, vmm_pid = pid, containers = record.containers.len(), "sandbox re-adopted");
                    found.adopted.push(sandbox);
                    continue;
                }
                Err(e) => {
                    tracing::error!(sandbox = %record.id, vmm_pid = pid, "cannot take the sandbox back, stopping it: {}", crate::error::chain(&e))
                }
            }
        } else if !record.containers.is_empty() || record.vmm_pid.is_some() {
            tracing::warn!(sandbox = %record.id, "the sandbox's VM is gone");
        }
        clean_leftover(host, &dir);
        report_lost(host, &record).await;
        if let Some(net) = &record.net {
            // The relay died with the earlier run; its rule goes too.
            if let Err(e) = crate::portforward::remove_rules(Path::new(&net.netns)).await {
                tracing::warn!(sandbox = %record.id, "{}", crate::error::chain(&e));
            }
        }
        found
            .stopped
            .push(Sandbox::stopped(host.clone(), record, LOST_EXIT_STATUS));
    }
    found
}

/// Publishes the exit of every container of `record` not yet exited.
async fn report_lost(host: &Host, record: &SandboxRecord) {
    for c in &record.containers {
        if matches!(c.state, ProcRecord::Exited { .. }) {
            continue;
        }
        let exit = TaskExit {
            container_id: c.id.clone(),
            id: c.id.clone(),
            pid: c.pid,
            exit_status: LOST_EXIT_STATUS,
            exited_at: Some(timestamp(SystemTime::now())).into(),
            ..Default::default()
        };
        host.publisher
            .publish(
                &record.ttrpc_address,
                &record.namespace,
                TASK_EXIT_EVENT_TOPIC,
                exit,
            )
            .await;
    }
}

/// Stops the VMM a sandbox directory names (when it still runs and really is
/// that sandbox's VMM) and removes the directory, mounts included. The
/// network a pod's VM took over goes with the pod's netns.
pub fn clean_leftover(host: &Host, dir: &Path) {
    let hypervisor = host.hypervisor.as_ref();
    let id = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A pooled VM taken by this sandbox keeps its own name.
    let vm_name = crate::vmm::vm_name(dir);
    // The VMM's cgroup goes too: named by the record's pod, or read from
    // the VMM process itself.
    let mut cgroups = Vec::new();
    if let Ok(record) = SandboxRecord::load(dir) {
        let parent = record.pod.as_ref().map_or("", |p| p.cgroup_parent.as_str());
        cgroups.extend(crate::cgroup::vmm_cgroup(parent, &id).ok().flatten());
        if let Some(pid) = record.vmm_pid {
            cgroups.extend(crate::cgroup::vmm_cgroup_of(pid, &id));
            kill_vmm(hypervisor, pid, record.vm_name());
        }
    }
    // A VMM that started but never got its state recorded.
    if let Some(pid) = hypervisor.recorded_pid(dir) {
        cgroups.extend(crate::cgroup::vmm_cgroup_of(pid, &id));
        kill_vmm(hypervisor, pid, &vm_name);
    }
    cgroups.sort();
    cgroups.dedup();
    crate::cgroup::remove_when_empty(&host.cgroups, cgroups);
    match crate::mount::remove_dir(dir) {
        Ok(()) => tracing::warn!(sandbox = %id, "removed a sandbox left by an earlier run"),
        Err(e) => tracing::error!(sandbox = %id, "remove {}: {e}", dir.display()),
    }
}

/// Kills process `pid` when it is the VMM of the VM named `name` (a
/// sandbox id, or a pooled VM's name) that an earlier run left.
pub(crate) fn kill_vmm(hypervisor: &dyn Hypervisor, pid: u32, name: &str) {
    if hypervisor.owns(pid, name) {
        tracing::warn!(vm = %name, pid, "stopping a VMM left by an earlier run");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}
