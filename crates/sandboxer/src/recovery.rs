//! What the sandboxer finds of earlier runs at start-up. Sandboxes are not
//! yet re-adopted after a restart: each one left behind is reported, its VMM
//! stopped, its directory removed, and its containers' exits published; the
//! caller keeps the sandbox registered with its containers stopped, so that
//! containerd can still query and delete them and the shim can exit.
use std::path::Path;
use std::time::SystemTime;

use kuasar_api::containerd::events::task::TaskExit;
use kuasar_api::containerd::topics::TASK_EXIT_EVENT_TOPIC;

use crate::events::{timestamp, Publisher};
use crate::state::SandboxRecord;

/// Exit status reported for a container whose VM was stopped at recovery.
pub const LOST_EXIT_STATUS: u32 = 255;

/// Cleans every sandbox directory under `state_dir`; returns the records of
/// those whose state was readable.
pub async fn clean_all(state_dir: &Path, publisher: &Publisher) -> Vec<SandboxRecord> {
    let Ok(entries) = std::fs::read_dir(state_dir) else {
        return Vec::new();
    };
    let mut records = Vec::new();
    for entry in entries.flatten() {
        if !entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            continue;
        }
        let Some(record) = clean_leftover(&entry.path()) else {
            continue;
        };
        for c in &record.containers {
            let exit = TaskExit {
                container_id: c.id.clone(),
                id: c.id.clone(),
                pid: c.pid,
                exit_status: LOST_EXIT_STATUS,
                exited_at: Some(timestamp(SystemTime::now())).into(),
                ..Default::default()
            };
            publisher
                .publish(
                    &record.ttrpc_address,
                    &record.namespace,
                    TASK_EXIT_EVENT_TOPIC,
                    exit,
                )
                .await;
        }
        records.push(record);
    }
    records
}

/// Stops the VMM a sandbox directory names (when it still runs and really is
/// that sandbox's QEMU) and removes the directory. Returns the sandbox's
/// record when it was readable.
pub fn clean_leftover(dir: &Path) -> Option<SandboxRecord> {
    let id = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let record = match SandboxRecord::load(dir) {
        Ok(record) => {
            if let Some(pid) = record.vmm_pid {
                kill_vmm(pid, &id);
            }
            Some(record)
        }
        Err(e) => {
            tracing::warn!(sandbox = %id, "unreadable sandbox state: {}", crate::error::chain(&e));
            None
        }
    };
    // A VMM that started but never got its state recorded.
    if let Some(pid) = std::fs::read_to_string(dir.join("qemu.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
    {
        kill_vmm(pid, &id);
    }
    match crate::mount::remove_dir(dir) {
        Ok(()) => tracing::warn!(sandbox = %id, "removed a sandbox left by an earlier run"),
        Err(e) => tracing::error!(sandbox = %id, "remove {}: {e}", dir.display()),
    }
    record
}

fn kill_vmm(pid: u32, id: &str) {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let marker = format!("kuasar-{id},");
    if String::from_utf8_lossy(&cmdline).contains(&marker) {
        tracing::warn!(sandbox = %id, pid, "stopping a VMM left by an earlier run");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}
