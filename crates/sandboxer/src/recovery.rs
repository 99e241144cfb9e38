//! What the sandboxer finds of earlier runs at start-up. Sandboxes are not
//! yet re-adopted after a restart: each one left behind is reported, its VMM
//! stopped and its directory removed, so that nothing leaks.
use std::path::Path;

use crate::state::SandboxRecord;

/// Cleans every sandbox directory under `state_dir`; returns how many.
pub fn clean_all(state_dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(state_dir) else {
        return 0;
    };
    let mut n = 0;
    for entry in entries.flatten() {
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            clean_leftover(&entry.path());
            n += 1;
        }
    }
    n
}

/// Stops the VMM a sandbox directory names (when it still runs and really is
/// that sandbox's QEMU) and removes the directory.
pub fn clean_leftover(dir: &Path) {
    let id = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match SandboxRecord::load(dir) {
        Ok(record) => {
            if let Some(pid) = record.vmm_pid {
                kill_vmm(pid, &id);
            }
        }
        Err(e) => {
            tracing::warn!(sandbox = %id, "unreadable sandbox state: {}", crate::error::chain(&e))
        }
    }
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
