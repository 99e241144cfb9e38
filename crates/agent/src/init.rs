//! PID 1 duties: the root switch, the basic mounts, kernel modules, cgroups
//! and the shared directory's mount (virtio-fs or 9p).
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};
use nix::mount::{mount, MsFlags};
use nix::unistd::{chdir, chroot};
use tracing::{debug, info, warn};

use kuasar_api::guest::{Share, SHARE_TAG};

use crate::error::{Context, Result};

/// Kernel modules to load, one path per line, in order.
pub const MODULES_LIST: &str = "/etc/kuasar/modules";
/// Where the host's shared directory (tag [`SHARE_TAG`]) is mounted.
pub const SHARED_DIR: &str = "/run/kuasar/shared";
const NINEP_OPTIONS: &str = "trans=virtio,version=9p2000.L,msize=524288";

/// Makes `/` a mount of its own (a bind mount of the initramfs, a tmpfs) on
/// top of the kernel's rootfs, switch_root style: `pivot_root(2)`, which
/// crun uses, refuses to work when the root is rootfs itself. Binding instead
/// of copying costs nothing and keeps every file of the initramfs.
pub fn switch_root() -> Result<()> {
    let staging = Path::new("/.root");
    std::fs::create_dir_all(staging).context("mkdir /.root")?;
    mount(
        Some("/"),
        staging,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .context("bind / to /.root")?;
    chdir(staging).context("chdir /.root")?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .context("move /.root to /")?;
    chroot(".").context("chroot")?;
    chdir("/").context("chdir /")?;
    let _ = std::fs::remove_dir(staging);
    Ok(())
}

struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: &'static str,
}

fn basic_mounts() -> Vec<Mount> {
    let nosuid = MsFlags::MS_NOSUID;
    let nodev = MsFlags::MS_NODEV;
    let noexec = MsFlags::MS_NOEXEC;
    let m = |source, target, fstype, flags, data| Mount {
        source,
        target,
        fstype,
        flags,
        data,
    };
    vec![
        m("proc", "/proc", "proc", nosuid | nodev | noexec, ""),
        m("sysfs", "/sys", "sysfs", nosuid | nodev | noexec, ""),
        m("devtmpfs", "/dev", "devtmpfs", nosuid, "mode=0755"),
        m(
            "devpts",
            "/dev/pts",
            "devpts",
            nosuid | noexec,
            "newinstance,ptmxmode=0666,mode=0620,gid=5",
        ),
        m("shm", "/dev/shm", "tmpfs", nosuid | nodev, "mode=1777"),
        m("tmpfs", "/run", "tmpfs", nosuid | nodev, "mode=0755"),
        m("tmpfs", "/tmp", "tmpfs", nosuid | nodev, "mode=1777"),
        m(
            "cgroup2",
            "/sys/fs/cgroup",
            "cgroup2",
            nosuid | nodev | noexec,
            "",
        ),
    ]
}

/// Mounts /proc, /sys, /dev, /dev/pts, /dev/shm, /run, /tmp and cgroup2.
pub fn mount_filesystems() -> Result<()> {
    for m in basic_mounts() {
        std::fs::create_dir_all(m.target).with_context(|| format!("mkdir {}", m.target))?;
        let data = (!m.data.is_empty()).then_some(m.data);
        match mount(Some(m.source), m.target, Some(m.fstype), m.flags, data) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(e) => return Err(e).with_context(|| format!("mount {}", m.target)),
        }
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, link);
    }
    Ok(())
}

/// Points fds 0-2 at /dev/console when the kernel could not open it.
pub fn ensure_console() {
    // SAFETY: fcntl(F_GETFD) only queries whether fd 1 is open.
    let open = unsafe { libc::fcntl(1, libc::F_GETFD) } != -1;
    if open {
        return;
    }
    if let Ok(console) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        for fd in 0..3 {
            // SAFETY: dup2 of an fd we own onto the standard descriptors.
            unsafe { libc::dup2(console.as_raw_fd(), fd) };
        }
    }
}

/// The module paths of a module list, in the order to load them: as listed
/// (the list puts the channel's modules early), except that the vsock
/// modules (`/net/vmw_vsock/`) go last unless the agent channel is vsock.
pub fn module_order(list: &str, vsock: bool) -> Vec<&str> {
    let paths = list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    if vsock {
        return paths.collect();
    }
    let (vsock_mods, others): (Vec<&str>, Vec<&str>) =
        paths.partition(|p| p.contains("/net/vmw_vsock/"));
    others.into_iter().chain(vsock_mods).collect()
}

/// Which modules to load: those containers need (up to and including the
/// shared directory's file systems, 9p and virtiofs; the guest image lists
/// the NIC driver, virtio_net, among them, loaded there only when the VM
/// has a NIC) or the others (overlay, PCI, ..., and the NIC driver when
/// there is no NIC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleSet {
    ForContainers,
    Rest,
}

/// Splits a load order after the last of the shared directory's file
/// system modules (9p, virtiofs): what must be loaded before the shared
/// directory can be mounted, and the rest.
pub fn split_after_shared_fs(order: Vec<&str>) -> (Vec<&str>, Vec<&str>) {
    let shared_fs = |p: &&str| p.ends_with("/fs/9p/9p.ko") || p.ends_with("/fs/fuse/virtiofs.ko");
    match order.iter().rposition(shared_fs) {
        Some(i) => {
            let mut first = order;
            let rest = first.split_off(i + 1);
            (first, rest)
        }
        None => (order, Vec::new()),
    }
}

/// The NIC driver and its dependencies (virtio_net, net_failover, failover).
pub fn is_nic_module(path: &str) -> bool {
    path.contains("/drivers/net/") || path.ends_with("/net/core/failover.ko")
}

/// virtio device id of a network card.
const VIRTIO_ID_NET: &str = "0x0001";

/// Whether the VM has a virtio NIC: the virtio bus lists its devices once
/// the transport (virtio_mmio) is loaded, before their drivers are.
fn has_virtio_nic() -> bool {
    std::fs::read_dir("/sys/bus/virtio/devices")
        .map(|entries| {
            entries.flatten().any(|e| {
                std::fs::read_to_string(e.path().join("device"))
                    .is_ok_and(|id| id.trim() == VIRTIO_ID_NET)
            })
        })
        .unwrap_or(false)
}

/// Moves the calling thread to SCHED_IDLE: it runs only when nothing else
/// wants the CPU.
pub fn become_idle_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler only reads `param`, which lives across the
    // call; pid 0 names the calling thread.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if rc != 0 {
        warn!("SCHED_IDLE: {}", std::io::Error::last_os_error());
    }
}

/// Where the kernel's free page reporting takes its smallest order from.
const REPORTING_ORDER: &str = "/sys/module/page_reporting/parameters/page_reporting_order";
/// Where the image's kernel modules live (only Debian's kernel has any).
const MODULES_DIR: &str = "/lib/modules";

/// Has the balloon report free pages to the host from single pages up,
/// not only free 2 MiB blocks (the kernel's default): what the guest frees
/// in small pieces (the kernel's init memory, files removed from the
/// initramfs, an exited container's memory) then leaves QEMU's memory too.
/// The guest memory is 4 KiB pages on the host (a shared memfd), so there
/// is no huge page for small reports to split. Set at run time: 6.1 resets
/// a command-line value when the balloon driver registers.
pub fn report_small_free_pages() {
    match std::fs::write(REPORTING_ORDER, "0") {
        Ok(()) => debug!("free page reporting from order 0"),
        // No balloon driver or no reporting in this kernel: nothing to tune.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!("set {REPORTING_ORDER}: {e}"),
    }
}

/// Removes the image's kernel modules once every set was loaded (or none
/// was for the running kernel): the initramfs is guest memory, and no one
/// loads a module later.
pub fn drop_module_files() {
    match std::fs::remove_dir_all(MODULES_DIR) {
        Ok(()) => debug!("{MODULES_DIR} removed"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!("remove {MODULES_DIR}: {e}"),
    }
}

/// The running kernel's release (`uname -r`).
const OSRELEASE: &str = "/proc/sys/kernel/osrelease";

/// The modules of a load order that were built for kernel `release`, i.e.
/// live under `/lib/modules/<release>/`. The image may carry the modules of
/// another kernel than the one running (Debian's, the fallback, while the
/// project's own kernel has everything built in): those are not loaded.
pub fn modules_for_release<'a>(order: Vec<&'a str>, release: &str) -> Vec<&'a str> {
    let prefix = format!("/lib/modules/{release}/");
    order
        .into_iter()
        .filter(|p| p.starts_with(&prefix))
        .collect()
}

/// Loads one set of the modules listed in `list`; already loaded is fine.
/// Modules of another kernel than the running one are skipped: a kernel
/// with everything built in (the project's own) loads nothing.
pub fn load_modules(list: &Path, vsock: bool, set: ModuleSet) {
    let Ok(text) = std::fs::read_to_string(list) else {
        warn!("no module list at {}", list.display());
        return;
    };
    let release = std::fs::read_to_string(OSRELEASE).unwrap_or_default();
    let release = release.trim();
    let listed = module_order(&text, vsock);
    let listed_count = listed.len();
    let order = modules_for_release(listed, release);
    if order.is_empty() {
        if set == ModuleSet::ForContainers {
            info!(
                release,
                listed = listed_count,
                "no modules for the running kernel: everything built in"
            );
        }
        return;
    }
    let (first, rest) = split_after_shared_fs(order);
    // Without a NIC its driver need not delay the guest: it loads with the
    // rest (loading it twice is harmless: EEXIST).
    let nic_modules: Vec<&str> = first.iter().copied().filter(|p| is_nic_module(p)).collect();
    let paths = match set {
        ModuleSet::ForContainers => first,
        ModuleSet::Rest => nic_modules.into_iter().chain(rest).collect(),
    };
    let started = Instant::now();
    let mut loaded = 0;
    let mut nic: Option<bool> = None;
    for path in paths {
        if set == ModuleSet::ForContainers && is_nic_module(path) {
            // Asked once, at the first NIC module: the transport is loaded.
            if !*nic.get_or_insert_with(has_virtio_nic) {
                continue;
            }
        }
        let t = Instant::now();
        let res = File::open(path)
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
            .and_then(|f| finit_module(&f, c"", ModuleInitFlags::empty()));
        debug!(
            path,
            elapsed_us = t.elapsed().as_micros() as u64,
            "finit_module"
        );
        match res {
            Ok(()) => loaded += 1,
            Err(Errno::EEXIST) => {}
            Err(e) => warn!("load module {path}: {e}"),
        }
    }
    info!(
        ?set,
        loaded,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "modules loaded"
    );
}

/// Enables every available cgroup v2 controller for children of the root.
pub fn enable_controllers() {
    let root = Path::new("/sys/fs/cgroup");
    let Ok(controllers) = std::fs::read_to_string(root.join("cgroup.controllers")) else {
        warn!("no cgroup2 controllers");
        return;
    };
    let all: Vec<String> = controllers
        .split_whitespace()
        .map(|c| format!("+{c}"))
        .collect();
    let control = root.join("cgroup.subtree_control");
    if std::fs::write(&control, all.join(" ")).is_ok() {
        return;
    }
    for c in &all {
        if let Err(e) = std::fs::write(&control, c) {
            warn!("enable cgroup controller {c}: {e}");
        }
    }
}

/// Mounts the host's shared directory (tag [`SHARE_TAG`]) over `share`.
pub fn mount_shared(share: Share) {
    if let Err(e) = std::fs::create_dir_all(SHARED_DIR) {
        warn!("mkdir {SHARED_DIR}: {e}");
        return;
    }
    // The device may be probed a moment after its driver is loaded.
    let (fstype, options) = match share {
        Share::NineP => ("9p", Some(NINEP_OPTIONS)),
        Share::VirtioFs => ("virtiofs", None),
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match mount(
            Some(SHARE_TAG),
            SHARED_DIR,
            Some(fstype),
            MsFlags::empty(),
            options,
        ) {
            Ok(()) => return,
            Err(e) if Instant::now() >= deadline => {
                warn!("mount {fstype} {SHARE_TAG} at {SHARED_DIR}: {e}");
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_after_9p() {
        let order = vec!["/m/virtio.ko", "/m/fs/9p/9p.ko", "/m/overlay.ko"];
        let (first, rest) = split_after_shared_fs(order);
        assert_eq!(first, ["/m/virtio.ko", "/m/fs/9p/9p.ko"]);
        assert_eq!(rest, ["/m/overlay.ko"]);
        let order = vec![
            "/m/fs/9p/9p.ko",
            "/m/fs/fuse/fuse.ko",
            "/m/fs/fuse/virtiofs.ko",
            "/m/overlay.ko",
        ];
        let (first, rest) = split_after_shared_fs(order);
        assert_eq!(first.last(), Some(&"/m/fs/fuse/virtiofs.ko"));
        assert_eq!(rest, ["/m/overlay.ko"]);
        let (first, rest) = split_after_shared_fs(vec!["/m/a.ko"]);
        assert_eq!(first, ["/m/a.ko"]);
        assert!(rest.is_empty());
    }

    #[test]
    fn nic_modules_are_recognised() {
        let m = "/lib/modules/6.1.0-56-amd64/kernel";
        assert!(is_nic_module(&format!("{m}/drivers/net/virtio_net.ko")));
        assert!(is_nic_module(&format!("{m}/drivers/net/net_failover.ko")));
        assert!(is_nic_module(&format!("{m}/net/core/failover.ko")));
        assert!(!is_nic_module(&format!("{m}/net/9p/9pnet.ko")));
        assert!(!is_nic_module(&format!("{m}/net/vmw_vsock/vsock.ko")));
    }

    #[test]
    fn only_the_running_kernels_modules_load() {
        let order = vec![
            "/lib/modules/6.1.0-56-amd64/kernel/drivers/virtio/virtio.ko",
            "/lib/modules/6.1.0-56-amd64/kernel/fs/9p/9p.ko",
        ];
        assert_eq!(modules_for_release(order.clone(), "6.1.0-56-amd64"), order);
        // The project's kernel: everything built in, nothing to load.
        assert!(modules_for_release(order.clone(), "6.1.192-kuasar").is_empty());
        // A release that is a prefix of another matches whole components only.
        assert!(modules_for_release(order.clone(), "6.1.0-56").is_empty());
        assert!(modules_for_release(order, "").is_empty());
    }

    #[test]
    fn vsock_modules_last_unless_vsock() {
        let list =
            "/m/virtio.ko\n/m/net/vmw_vsock/vsock.ko\n\n# c\n/m/net/vmw_vsock/t.ko\n/m/9p.ko\n";
        let serial = [
            "/m/virtio.ko",
            "/m/9p.ko",
            "/m/net/vmw_vsock/vsock.ko",
            "/m/net/vmw_vsock/t.ko",
        ];
        assert_eq!(module_order(list, false), serial);
        let vsock = [
            "/m/virtio.ko",
            "/m/net/vmw_vsock/vsock.ko",
            "/m/net/vmw_vsock/t.ko",
            "/m/9p.ko",
        ];
        assert_eq!(module_order(list, true), vsock);
    }
}
