//! Builds QEMU's command line for one sandbox (see docs/design.md).
use std::path::{Path, PathBuf};

pub use kuasar_api::guest::Share;
use kuasar_api::guest::{Channel, AGENT_PORT_NAME, AGENT_VSOCK_PORT, SHARE_TAG};

/// The accelerator actually used, after `auto` was resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    /// With its translation cache's size, MiB.
    Tcg {
        cache_mib: u32,
    },
}

/// `-sandbox`: QEMU's seccomp filter with every optional denial on.
const SECCOMP_SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The host<->guest channel actually used, after `auto` was resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentChannel {
    /// A virtio-serial port backed by a Unix socket on the host.
    Serial,
    /// virtio-vsock (vhost-vsock) with this guest CID.
    Vsock { cid: u32 },
}

/// A virtio-net NIC backed by a tap device whose fd QEMU inherits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicSpec {
    /// The tap's fd number in QEMU's process.
    pub fd: i32,
    /// The guest NIC's MAC address (`aa:bb:cc:dd:ee:ff`).
    pub mac: String,
}

/// Everything the command line depends on.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub name: String,
    pub accel: Accel,
    pub channel: AgentChannel,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub kernel_params: String,
    /// `tsc_early_khz` for the guest under TCG.
    pub tsc_khz: Option<u64>,
    /// QEMU's seccomp filter (see `QemuConfig::seccomp`).
    pub seccomp: bool,
    pub dir: PathBuf,
    /// How the shared directory reaches the guest.
    pub share: Share,
    /// The pod's NICs, in order (none without a pod network).
    pub nics: Vec<NicSpec>,
}

impl VmSpec {
    pub fn agent_socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    pub fn console_log(&self) -> PathBuf {
        self.dir.join(crate::vmm::CONSOLE_LOG)
    }
    pub fn shared_dir(&self) -> PathBuf {
        self.dir.join("shared")
    }
    /// virtiofsd's vhost-user socket (virtio-fs), which QEMU connects to.
    pub fn virtiofsd_socket(&self) -> PathBuf {
        self.dir.join("fs.sock")
    }

    /// The ttrpc address of the guest agent.
    pub fn agent_address(&self) -> String {
        match self.channel {
            AgentChannel::Serial => format!("unix://{}", self.agent_socket().display()),
            AgentChannel::Vsock { cid } => format!("vsock://{cid}:{AGENT_VSOCK_PORT}"),
        }
    }

    /// The guest kernel's command line.
    pub fn kernel_cmdline(&self) -> String {
        let mut p = vec![
            "console=ttyS0".to_owned(),
            "quiet".into(),
            "panic=-1".into(),
            "cryptomgr.notests".into(),
            "reboot=t".into(),
            // Measured with initcall_debug under TCG: the KDF self-test and
            // kprobe trace events cost ~190 ms of boot and serve no guest use.
            "initcall_blacklist=crypto_kdf108_init,init_kprobe_trace".into(),
        ];
        if matches!(self.accel, Accel::Tcg { .. }) {
            if let Some(khz) = self.tsc_khz {
                // Without it microvm under TCG hangs in ~5% of boots while
                // calibrating its timer.
                p.push(format!("tsc_early_khz={khz}"));
            }
        }
        if let AgentChannel::Vsock { .. } = self.channel {
            p.push(Channel::Vsock(AGENT_VSOCK_PORT).cmdline_param());
        }
        p.push(self.share.cmdline_param());
        if !self.kernel_params.trim().is_empty() {
            p.push(self.kernel_params.trim().to_owned());
        }
        p.join(" ")
    }

    /// QEMU's command line: the machine, then the guest's kernel and
    /// console, then its devices (agent channel, shared directory, balloon,
    /// NICs), then the QMP socket.
    pub fn args(&self) -> Vec<String> {
        let mut a = self.machine_args();
        a.extend(self.device_args());
        a.push("-qmp".into());
        a.push(format!(
            "unix:{},server=on,wait=off",
            self.qmp_socket().display()
        ));
        a
    }

    /// The machine: name (the pid marker recovery looks for), microvm,
    /// accelerator, size, sandbox, kernel, initramfs, command line, console.
    fn machine_args(&self) -> Vec<String> {
        let path = |p: &Path| p.display().to_string();
        let (accel, cpu) = match self.accel {
            Accel::Kvm => ("kvm".to_owned(), "host"),
            Accel::Tcg { cache_mib } => (format!("tcg,tb-size={cache_mib}"), "max"),
        };
        let mut a: Vec<String> = Vec::new();
        let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
        push(&[
            "-name",
            &format!(
                "{}debug-threads=on",
                super::hypervisor::name_marker(&self.name)
            ),
        ]);
        let machine = "microvm,acpi=on,pit=off,pic=off,rtc=on";
        match self.share {
            Share::NineP => push(&["-machine", machine]),
            Share::VirtioFs => {
                // vhost-user: virtiofsd reads and writes the guest's buffers
                // itself, so the guest's memory is a shareable memfd.
                push(&["-machine", &format!("{machine},memory-backend=mem")]);
                push(&[
                    "-object",
                    &format!(
                        "memory-backend-memfd,id=mem,size={}M,share=on",
                        self.memory_mib
                    ),
                ]);
            }
        }
        push(&["-accel", &accel, "-cpu", cpu]);
        push(&[
            "-m",
            &self.memory_mib.to_string(),
            "-smp",
            &self.vcpus.to_string(),
        ]);
        push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
        if self.seccomp {
            // Whatever a guest makes of QEMU's device emulation, the
            // process can neither exec nor fork, change its ids, nor use
            // obsolete system calls or change its scheduling and memory
            // policy. QMP fd passing (getfd) is plain socket I/O.
            push(&["-sandbox", SECCOMP_SANDBOX]);
        }
        push(&[
            "-kernel",
            &path(&self.kernel),
            "-initrd",
            &path(&self.initrd),
        ]);
        push(&["-append", &self.kernel_cmdline()]);
        push(&["-serial", &format!("file:{}", path(&self.console_log()))]);
        a
    }

    /// The devices: the agent's channel, the shared directory, the
    /// balloon, one NIC per tap.
    fn device_args(&self) -> Vec<String> {
        let path = |p: &Path| p.display().to_string();
        let mut a: Vec<String> = Vec::new();
        let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
        match self.channel {
            AgentChannel::Serial => {
                let socket = path(&self.agent_socket());
                push(&["-device", "virtio-serial-device"]);
                push(&[
                    "-chardev",
                    &format!("socket,id=agent,path={socket},server=on,wait=off"),
                ]);
                push(&[
                    "-device",
                    &format!("virtserialport,chardev=agent,name={AGENT_PORT_NAME}"),
                ]);
            }
            AgentChannel::Vsock { cid } => {
                push(&["-device", &format!("vhost-vsock-device,guest-cid={cid}")]);
            }
        }
        match self.share {
            Share::NineP => {
                push(&[
                    "-fsdev",
                    &format!(
                        "local,id=shared,path={},security_model=none,multidevs=remap",
                        path(&self.shared_dir())
                    ),
                ]);
                push(&[
                    "-device",
                    &format!("virtio-9p-device,fsdev=shared,mount_tag={SHARE_TAG}"),
                ]);
            }
            Share::VirtioFs => {
                let socket = path(&self.virtiofsd_socket());
                push(&["-chardev", &format!("socket,id=fs,path={socket}")]);
                push(&[
                    "-device",
                    &format!("vhost-user-fs-device,chardev=fs,tag={SHARE_TAG}"),
                ]);
            }
        }
        // Free page reporting: pages the guest frees (the initramfs once
        // unpacked, exited containers) go back to the host instead of
        // staying in QEMU's RSS. The project's kernel drives it; a kernel
        // without the driver ignores the device.
        push(&["-device", "virtio-balloon-device,free-page-reporting=on"]);
        for (i, nic) in self.nics.iter().enumerate() {
            // microvm has no PCI: virtio-mmio devices. vhost-net is not
            // available on every host; QEMU's own backend always is.
            push(&[
                "-netdev",
                &format!("tap,id=net{i},fd={},vhost=off", nic.fd),
                "-device",
                &format!("virtio-net-device,netdev=net{i},mac={}", nic.mac),
            ]);
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(accel: Accel) -> VmSpec {
        VmSpec {
            name: "sb1".into(),
            accel,
            channel: AgentChannel::Serial,
            vcpus: 1,
            memory_mib: 256,
            kernel: "/img/vmlinux".into(),
            initrd: "/img/initramfs.cpio".into(),
            kernel_params: String::new(),
            tsc_khz: Some(2_596_138),
            seccomp: true,
            dir: "/run/kuasar/vmm/sb1".into(),
            share: Share::NineP,
            nics: Vec::new(),
        }
    }

    #[test]
    fn virtio_fs_connects_to_virtiofsd_and_shares_the_guest_memory() {
        let mut s = spec(Accel::Tcg { cache_mib: 16 });
        s.share = Share::VirtioFs;
        let args = s.args().join(" ");
        assert!(
            args.contains(
                "-machine microvm,acpi=on,pit=off,pic=off,rtc=on,memory-backend=mem \
                 -object memory-backend-memfd,id=mem,size=256M,share=on"
            ),
            "{args}"
        );
        assert!(
            args.contains(
                "-chardev socket,id=fs,path=/run/kuasar/vmm/sb1/fs.sock \
                 -device vhost-user-fs-device,chardev=fs,tag=kuasar"
            ),
            "{args}"
        );
        assert!(!args.contains("fsdev"), "{args}");
        assert!(s.kernel_cmdline().contains("kuasar.share=virtiofs"));
    }

    #[test]
    fn tcg_gets_tsc_and_small_cache() {
        let s = spec(Accel::Tcg { cache_mib: 16 });
        let args = s.args().join(" ");
        assert!(args.contains("-accel tcg,tb-size=16 -cpu max"), "{args}");
        assert!(s.kernel_cmdline().contains("tsc_early_khz=2596138"));
        assert!(args.contains("path=/run/kuasar/vmm/sb1/agent.sock,server=on,wait=off"));
        assert!(args.contains("mount_tag=kuasar"));
        assert!(!args.contains("memory-backend"));
        assert!(s.kernel_cmdline().contains("kuasar.share=9p"));
        assert!(args.contains("-kernel /img/vmlinux -initrd /img/initramfs.cpio"));
        assert!(args.contains("-device virtio-balloon-device,free-page-reporting=on"));
    }

    #[test]
    fn seccomp_sandbox_unless_turned_off() {
        let mut s = spec(Accel::Tcg { cache_mib: 16 });
        let args = s.args().join(" ");
        assert!(
            args.contains(
                "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
            ),
            "{args}"
        );
        s.seccomp = false;
        assert!(!s.args().join(" ").contains("-sandbox"));
    }

    #[test]
    fn no_nic_without_a_pod_network() {
        assert!(!spec(Accel::Tcg { cache_mib: 16 })
            .args()
            .join(" ")
            .contains("netdev"));
    }

    #[test]
    fn each_nic_is_a_virtio_mmio_device_on_its_inherited_tap_fd() {
        let mut s = spec(Accel::Tcg { cache_mib: 16 });
        s.nics = vec![
            NicSpec {
                fd: 7,
                mac: "02:42:0a:58:00:05".into(),
            },
            NicSpec {
                fd: 9,
                mac: "02:42:0a:59:00:05".into(),
            },
        ];
        let args = s.args().join(" ");
        assert!(
            args.contains(
                "-netdev tap,id=net0,fd=7,vhost=off \
                 -device virtio-net-device,netdev=net0,mac=02:42:0a:58:00:05"
            ),
            "{args}"
        );
        assert!(
            args.contains(
                "-netdev tap,id=net1,fd=9,vhost=off \
                 -device virtio-net-device,netdev=net1,mac=02:42:0a:59:00:05"
            ),
            "{args}"
        );
    }

    #[test]
    fn kvm_gets_host_cpu_and_no_tsc_hint() {
        let s = spec(Accel::Kvm);
        assert!(s.args().join(" ").contains("-accel kvm -cpu host"));
        assert!(!s.kernel_cmdline().contains("tsc_early_khz"));
    }

    #[test]
    fn vsock_channel_replaces_the_serial_port() {
        let mut s = spec(Accel::Kvm);
        s.channel = AgentChannel::Vsock { cid: 42 };
        let args = s.args().join(" ");
        assert!(args.contains("vhost-vsock-device,guest-cid=42"), "{args}");
        assert!(!args.contains("virtserialport"));
        assert!(s.kernel_cmdline().contains("kuasar.channel=vsock:1024"));
        assert_eq!(s.agent_address(), "vsock://42:1024");
        assert_eq!(
            spec(Accel::Tcg { cache_mib: 16 }).agent_address(),
            "unix:///run/kuasar/vmm/sb1/agent.sock"
        );
    }

    #[test]
    fn extra_kernel_params_come_last() {
        let mut s = spec(Accel::Tcg { cache_mib: 16 });
        s.kernel_params = " debug ".into();
        assert!(s.kernel_cmdline().ends_with(" debug"));
    }
}
