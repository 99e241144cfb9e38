//! QEMU as kuasar-vmm's [`Hypervisor`]: the host's facts resolved once
//! (accelerator, agent channel, TSC frequency), and what recognises a QEMU
//! of ours (its `-name kuasar-<id>,` and its pid file).
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use super::uids::{uid_of, Uids};
use super::{Accel, AgentChannel, QemuVm, Share, VmSpec};
use crate::config::{Accelerator, Channel, Config, SharedDir};
use crate::vmm::{probe, Hypervisor, VmPlan, Vmm};

/// Where a started QEMU's pid is written in the sandbox's directory.
pub const PID_FILE: &str = "qemu.pid";

/// QEMU, configured by `[qemu]` and resolved against this host.
pub struct Qemu {
    binary: PathBuf,
    accel: Accel,
    tsc_khz: Option<u64>,
    /// True: agents are reached over vsock; false: over virtio-serial.
    vsock: bool,
    kernel: PathBuf,
    initrd: PathBuf,
    kernel_params: String,
    seccomp: bool,
    share: Share,
    virtiofsd: PathBuf,
    /// The uids of confined QEMUs (None: `[qemu] confine = false`).
    uids: Option<Arc<Uids>>,
    next_cid: AtomicU32,
}

/// The device nodes a confined QEMU sees: what QEMU and its libraries may
/// open, and the accelerator's and the vsock channel's when in use.
fn devices(accel: Accel, vsock: bool) -> Vec<PathBuf> {
    let mut d: Vec<PathBuf> = ["null", "zero", "random", "urandom"]
        .iter()
        .map(|n| Path::new("/dev").join(n))
        .collect();
    if accel == Accel::Kvm {
        d.push("/dev/kvm".into());
    }
    if vsock {
        d.push("/dev/vhost-vsock".into());
    }
    d
}

impl Qemu {
    /// Resolves `auto` settings against the host (KVM usable? vhost-vsock
    /// there? the TSC's frequency) and logs what it found.
    pub fn new(config: &Config) -> Self {
        let q = &config.qemu;
        let tcg = Accel::Tcg {
            cache_mib: q.tcg_cache_mib,
        };
        let accel = match q.accelerator {
            Accelerator::Kvm => Accel::Kvm,
            Accelerator::Tcg => tcg,
            Accelerator::Auto if probe::kvm_usable() => Accel::Kvm,
            Accelerator::Auto => tcg,
        };
        let tsc_khz = match q.tsc_khz {
            0 => probe::tsc_khz(),
            khz => Some(khz),
        };
        let vsock = match q.channel {
            Channel::Vsock => true,
            Channel::Serial => false,
            Channel::Auto => Path::new("/dev/vhost-vsock").exists(),
        };
        tracing::info!(?accel, ?tsc_khz, vsock, "QEMU: host probed");
        // Guest CIDs are host-wide: start from a per-process offset so that
        // two sandboxers (or a restart) are unlikely to collide.
        let first_cid = 3 + (std::process::id() % 1000) * 1000;
        Qemu {
            binary: q.binary.clone(),
            accel,
            tsc_khz,
            vsock,
            kernel: config.kernel_path(),
            initrd: config.initrd_path(),
            kernel_params: config.vm.kernel_params.clone(),
            seccomp: q.seccomp,
            share: match q.share {
                SharedDir::VirtioFs => Share::VirtioFs,
                SharedDir::NineP => Share::NineP,
            },
            virtiofsd: config.virtiofsd_path(),
            uids: q.confine.then(|| Uids::new(q.uid_base, q.uid_count)),
            next_cid: AtomicU32::new(first_cid),
        }
    }

    /// The channel for a new VM.
    fn agent_channel(&self) -> AgentChannel {
        if self.vsock {
            AgentChannel::Vsock {
                cid: self.next_cid.fetch_add(1, Ordering::Relaxed),
            }
        } else {
            AgentChannel::Serial
        }
    }

    /// QEMU's terms for `plan` (without its NICs, which go to the VM with
    /// their fds).
    fn spec(&self, plan: &VmPlan) -> VmSpec {
        VmSpec {
            name: plan.id.clone(),
            accel: self.accel,
            channel: self.agent_channel(),
            vcpus: plan.vcpus,
            memory_mib: plan.memory_mib,
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            kernel_params: self.kernel_params.clone(),
            tsc_khz: self.tsc_khz,
            seccomp: self.seccomp,
            dir: plan.dir.clone(),
            share: self.share,
            nics: Vec::new(),
        }
    }
}

impl Hypervisor for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn prepare(&self, plan: VmPlan) -> Box<dyn Vmm> {
        let mut vm = QemuVm::new(self.binary.clone(), self.spec(&plan));
        vm.set_virtiofsd(self.virtiofsd.clone());
        if let Some(uids) = &self.uids {
            vm.confine(uids.take(), devices(self.accel, self.vsock));
        }
        vm.join_cgroup(plan.cgroup_procs);
        vm.set_background(plan.background);
        for nic in plan.nics {
            vm.add_nic(nic.tap, nic.mac);
        }
        Box::new(vm)
    }

    fn adopt(&self, plan: VmPlan, pid: u32) -> std::io::Result<Box<dyn Vmm>> {
        let mut vm = QemuVm::adopt(self.binary.clone(), self.spec(&plan), pid)?;
        // Its uid stays held while it runs: no new VM is given it.
        if let Some(lease) = self
            .uids
            .as_ref()
            .zip(uid_of(pid))
            .and_then(|(u, uid)| u.claim(uid))
        {
            vm.hold_uid(lease);
        }
        Ok(Box::new(vm))
    }

    fn owns(&self, pid: u32, id: &str) -> bool {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        String::from_utf8_lossy(&cmdline).contains(&name_marker(id))
    }

    fn recorded_pid(&self, dir: &Path) -> Option<u32> {
        std::fs::read_to_string(dir.join(PID_FILE))
            .ok()
            .and_then(|p| p.trim().parse().ok())
    }
}

/// What QEMU's command line carries for sandbox `id` (`-name
/// kuasar-<id>,debug-threads=on`): the comma ends the id, so that one id
/// is never taken for a prefix of another.
pub fn name_marker(id: &str) -> String {
    format!("kuasar-{id},")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_is_on_the_command_line_and_ends_the_id() {
        let spec = VmSpec {
            name: "abc".into(),
            accel: Accel::Tcg { cache_mib: 32 },
            channel: AgentChannel::Serial,
            vcpus: 1,
            memory_mib: 256,
            kernel: "/k".into(),
            initrd: "/i".into(),
            kernel_params: String::new(),
            tsc_khz: None,
            seccomp: true,
            dir: "/run/x/abc".into(),
            share: Share::VirtioFs,
            nics: Vec::new(),
        };
        let args = spec.args().join(" ");
        assert!(args.contains(&name_marker("abc")), "{args}");
        assert!(!args.contains(&name_marker("ab")), "{args}");
    }
}
