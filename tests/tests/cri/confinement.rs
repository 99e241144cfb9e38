//! The VM's QEMU confined on the node: it parses the untrusted guest's
//! device traffic, so it runs under its own seccomp filter, as a uid of
//! its own with no capability (its VM's virtiofsd serves the share), in a
//! mount namespace that holds its sandbox's directory and nothing else of
//! the host, not even the share's files.
use std::path::{Path, PathBuf};

use super::Handler;

/// Of root's capabilities, what a confined QEMU keeps: none.
const KEPT_CAPS: &str = "0000000000000000";
/// `[qemu] uid_base`'s default.
const UID_BASE: u64 = 0x7000_0000;

/// A pod's QEMU, with the pod working as usual (the suite's other tests run
/// through the same QEMU: virtio-fs, the agent's channel, networking, fd
/// passing):
/// - seccomp filter mode (`Seccomp: 2`);
/// - a uid and gid of the VMs' range, no_new_privs, no capability
///   (effective, permitted, bounding);
/// - a mount namespace of its own whose root holds the sandbox's directory
///   but none of the host's files (no /etc/passwd, no containerd state),
///   and no mount of the share (the containers' root filesystems);
/// - in its virtiofsd's view, every mount of the share nosuid and nodev,
///   the containers' root filesystems (mounted after virtiofsd started,
///   which reach its view by propagation) among them.
pub fn qemu_is_confined(h: &Handler) {
    if !h.vm {
        eprintln!("{}: skipped: no VM, no QEMU to confine", h.name);
        return;
    }
    let pod_ref = h.shared_pod();
    let pod = pod_ref.0.clone();
    // A container, whose root filesystem reaches QEMU's view after it
    // started.
    let sleeper = h.start(&pod_ref, &super::sleeper("confined"));
    let pid = qemu_pid(h, &pod);
    let pid = pid.as_str();
    let status_path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&status_path)
        .unwrap_or_else(|e| panic!("{}: {status_path}: {e}", h.name));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_else(|| panic!("{}: no {name} in {status_path}", h.name))
            .to_owned()
    };
    assert_eq!(field("Seccomp:"), "2", "{}: QEMU's seccomp mode", h.name);
    let filters: u32 = field("Seccomp_filters:").parse().unwrap_or(0);
    assert!(filters >= 1, "{}: QEMU has no seccomp filter", h.name);
    for ids in ["Uid:", "Gid:"] {
        let all: Vec<u64> = field(ids)
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect();
        assert!(
            all.iter().all(|&v| v == all[0] && v >= UID_BASE),
            "{}: QEMU's {ids} {all:?}: not one id of the VMs' range",
            h.name
        );
    }
    for caps in ["CapEff:", "CapPrm:", "CapBnd:"] {
        assert_eq!(field(caps), KEPT_CAPS, "{}: QEMU's {caps}", h.name);
    }
    assert_eq!(field("NoNewPrivs:"), "1", "{}: QEMU's no_new_privs", h.name);
    sees_only_its_sandbox(h, pid, &pod, &sleeper.id);
    drop(sleeper);
    eprintln!(
        "{}: QEMU pid {pid}: Seccomp 2 ({filters} filters), uid {}, CapEff {KEPT_CAPS}, own mount namespace",
        h.name,
        field("Uid:").split_whitespace().next().unwrap_or("?")
    );
}

/// QEMU `pid`'s mount namespace and root hold no file of the host's but its
/// sandbox directory's, and no mount of the share; the share's mounts in
/// its virtiofsd's view (the containers' root filesystems among them) are
/// nosuid,nodev.
fn sees_only_its_sandbox(h: &Handler, pid: &str, pod: &str, container: &str) {
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/mnt")).unwrap();
    assert_ne!(
        ns(pid),
        ns("self"),
        "{}: QEMU shares our mount namespace",
        h.name
    );
    let root = Path::new("/proc").join(pid).join("root");
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap());
    for hidden in [
        Path::new("/etc/passwd"),
        Path::new("/root"),
        Path::new("/var/log"),
        Path::new("/tmp"),
        &h.env.vmm_socket(),
    ] {
        assert!(
            hidden.exists(),
            "{}: the host has no {}",
            h.name,
            hidden.display()
        );
        assert!(
            !inside(hidden).exists(),
            "{}: QEMU sees the host's {}",
            h.name,
            hidden.display()
        );
    }
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let share_mounts: Vec<&str> = mountinfo
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|m| m.contains("/shared")))
        .collect();
    assert!(
        share_mounts.is_empty(),
        "{}: QEMU's view has mounts of the share: {share_mounts:?}",
        h.name
    );
    let share_fd = share_view(h, pod);
    // The share and, below it, each container's root filesystem and
    // volumes, as virtiofsd sees them.
    let mut seen = vec![share_fd.clone()];
    for c in std::fs::read_dir(&share_fd).unwrap().flatten() {
        seen.push(c.path().join("rootfs"));
        if let Ok(volumes) = std::fs::read_dir(c.path().join("mounts")) {
            seen.extend(volumes.flatten().map(|v| v.path()));
        }
    }
    for path in &seen {
        let flags = mount_flags(path)
            .unwrap_or_else(|e| panic!("{}: statvfs {}: {e}", h.name, path.display()));
        let wanted = libc::ST_NOSUID | libc::ST_NODEV;
        assert!(
            flags & wanted == wanted,
            "{}: {} in virtiofsd's view is not nosuid,nodev (statvfs flags {flags:#x})",
            h.name,
            path.display()
        );
    }
    assert!(
        seen.contains(&share_fd.join(container).join("rootfs")) && seen.iter().all(|p| p.exists()),
        "{}: virtiofsd's view lacks container {container}'s root filesystem: {seen:?}",
        h.name
    );
}

/// The pid of pod `pod`'s QEMU.
fn qemu_pid(h: &Handler, pod: &str) -> String {
    h.env
        .vmm_pid(pod)
        .unwrap_or_else(|| panic!("{}: no qemu.pid for {pod}\n{}", h.name, h.diag()))
        .to_string()
}

/// Pod `pod`'s share as its virtiofsd serves it: the root of virtiofsd's
/// sandboxed process (`/proc/<pid>/root`, the share's directory wherever a
/// pooled VM's files moved since).
fn share_view(h: &Handler, pod: &str) -> PathBuf {
    let pid_file = h.env.state_dir().join(pod).join("virtiofsd.pid");
    let pid = std::fs::read_to_string(&pid_file)
        .unwrap_or_else(|e| panic!("{}: {}: {e}", h.name, pid_file.display()));
    let pid = pid.trim();
    // virtiofsd serves from a child in namespaces of its own.
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let child = children
        .split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("{}: virtiofsd {pid} has no sandboxed child", h.name));
    let root = PathBuf::from(format!("/proc/{child}/root"));
    let share = h.env.state_dir().join(pod).join("shared");
    use std::os::unix::fs::MetadataExt;
    let (a, b) = (
        std::fs::metadata(&root).unwrap(),
        std::fs::metadata(&share).unwrap(),
    );
    assert!(
        a.dev() == b.dev() && a.ino() == b.ino(),
        "{}: virtiofsd {child}'s root is not {}",
        h.name,
        share.display()
    );
    root
}

/// The statvfs(3) flags (ST_NOSUID, ST_NODEV, ...) of the mount `path` is on.
fn mount_flags(path: &Path) -> std::io::Result<libc::c_ulong> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: an all-zero statvfs is a valid value of the plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs reads a NUL-terminated path and writes a statvfs we
    // own, both alive across the call.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_flag)
}

/// From a privileged container (its root filesystem is in the pod's
/// share), attempts to leave the share reach nothing of the host:
/// - symlinks to `/`, to a host file, and `..` chains resolve in the guest
///   (its own `/`), so a host witness file stays unreadable and unchanged;
/// - a hard link to a file outside the root filesystem is refused;
/// - a device node of the host's disk, which the guest can make there,
///   cannot be opened on the host: neither through the share nor in
///   virtiofsd's view, both nodev;
/// - special files work in the share (9p served by QEMU refused FIFOs).
pub fn nothing_leaves_the_share(h: &Handler, pod: &str, container: &str) {
    use std::os::unix::fs::MetadataExt;
    let witness = h.env.dir().join("witness");
    std::fs::write(&witness, "host witness\n").unwrap();
    let dev = std::fs::metadata(&witness).unwrap().dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let w = witness.display();
    let out = h.sh(
        container,
        &format!(
            "set -e; cd /
             ln -s / escape-root; ln -s ../../../../../../.. escape-up; ln -s {w} escape-witness
             test ! -e escape-witness && test ! -e escape-up{w} && test ! -e escape-root{w}
             ! cat ../../../../../..{w} 2>/dev/null
             echo guest > escape-root/written-through-a-link
             ! ln /etc/hostname hard-link-out 2>/dev/null
             mknod host-disk b {major} {minor} 2>/dev/null || echo no device node
             mkfifo fifo-in-rootfs && test -p fifo-in-rootfs
             echo done"
        ),
    );
    assert!(out.contains("done"), "{}: {out}", h.name);
    assert_eq!(
        std::fs::read_to_string(&witness).unwrap(),
        "host witness\n",
        "{}: the host's witness file changed",
        h.name
    );
    let rootfs = h
        .env
        .state_dir()
        .join(pod)
        .join("shared")
        .join(container)
        .join("rootfs");
    assert!(
        rootfs.join("escape-root").is_symlink() && rootfs.join("written-through-a-link").is_file(),
        "{}: the guest's entries are not where its root filesystem is",
        h.name
    );
    let in_virtiofsd = share_view(h, pod).join(container).join("rootfs");
    let made = rootfs.join("host-disk").exists();
    if !made {
        // As if the guest had made it.
        let path = std::ffi::CString::new(
            rootfs
                .join("host-disk")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        // SAFETY: mknod reads a NUL-terminated path alive across the call.
        let rc = unsafe { libc::mknod(path.as_ptr(), libc::S_IFBLK | 0o600, dev) };
        assert_eq!(
            rc,
            0,
            "{}: mknod in the share: {}",
            h.name,
            std::io::Error::last_os_error()
        );
    }
    for node in [rootfs.join("host-disk"), in_virtiofsd.join("host-disk")] {
        let e = std::fs::File::open(&node).expect_err("a device node in the share opened");
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EACCES),
            "{}: opening {}: {e}",
            h.name,
            node.display()
        );
    }
    eprintln!(
        "{}: symlinks, .. chains, a hard link and a device node {major}:{minor} (made: {made}) left the host untouched",
        h.name
    );
}
