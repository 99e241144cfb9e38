//! QEMU's confinement on the node (see docs/operations.md, "Trust
//! boundaries"): QEMU parses the untrusted guest's device traffic, so it
//! runs
//! - in a mount namespace of its own whose root is a small tmpfs holding
//!   only its sandbox's directory (and, with 9p, the share in it), the
//!   kernel, the initramfs, `/usr` read-only and a few device nodes: the
//!   rest of the node's files are out of its sight;
//! - as a uid and gid of its own (one per VM, see [`super::uids`]), so
//!   that it can neither signal nor trace another VM's QEMU or any
//!   process of root; its only supplementary groups are those that open
//!   its device nodes (`/dev/kvm`'s, say);
//! - with no capability at all when virtiofsd serves the share
//!   ([`Share::VirtioFs`]); with 9p (`security_model=none`), with those
//!   of root's capabilities serving the guest's files takes
//!   ([`KEPT_CAPS`]); in its bounding set too, and with no_new_privs.
//!
//! Everything is planned in kuasar-vmm ([`Jail::plan`]: each path a C
//! string) and entered in the forked child before exec ([`Jail::enter`]:
//! system calls only, no allocation).
use std::ffi::CString;
use std::path::{Path, PathBuf};

use super::cmdline::Share;
use crate::mount::c_path;

/// Capabilities QEMU keeps when it serves the share over 9p, and why: 9p with `security_model=none` creates
/// the guest's files with the guest's owner (CAP_CHOWN), reads and writes
/// files of any owner (CAP_DAC_OVERRIDE), sets modes, times and extended
/// attributes of files it does not own (CAP_FOWNER), keeps set-group-id
/// bits (CAP_FSETID), creates device nodes (CAP_MKNOD) and file
/// capabilities (CAP_SETFCAP) of the container's image. They reach only
/// what QEMU's mount namespace holds, and every mount there that QEMU can
/// write is nosuid and nodev.
pub const KEPT_CAPS: [u32; 6] = [
    0,  // CAP_CHOWN
    1,  // CAP_DAC_OVERRIDE
    3,  // CAP_FOWNER
    4,  // CAP_FSETID
    27, // CAP_MKNOD
    31, // CAP_SETFCAP
];

/// `KEPT_CAPS` as a capability mask (what `CapEff:` shows).
pub fn kept_mask() -> u64 {
    KEPT_CAPS.iter().fold(0, |m, c| m | 1 << c)
}

const CAP_SETPCAP: u32 = 8;
/// Size of the tmpfs QEMU's root is built on (it holds only mount points).
const ROOT_TMPFS: &std::ffi::CStr = c"mode=0755,size=1m";

/// Options of QEMU's procfs (see [`Step::Proc`]).
const PROC_OPTIONS: &std::ffi::CStr = c"hidepid=invisible,subset=pid";

/// Where a planned step puts its result in QEMU's view, and what is put.
enum Step {
    Dir(CString),
    /// An empty file, to bind a file or a device node on.
    File(CString),
    Symlink {
        target: CString,
        link: CString,
    },
    /// A procfs showing QEMU only its own processes (`hidepid=invisible`,
    /// as it is the only process of its uid) and no host-wide files
    /// (`subset=pid`): 9p changes modes through `/proc/self/fd`.
    Proc(CString),
    Bind {
        source: CString,
        target: CString,
        /// MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC as wanted.
        flags: libc::c_ulong,
        /// With the mounts below `source` (MS_REC).
        recursive: bool,
    },
    /// A mount made private: what is mounted below its source later (the
    /// containers' root filesystems in a share virtiofsd serves) does not
    /// reach QEMU's view.
    Private(CString),
}

/// A planned confinement for one QEMU.
pub struct Jail {
    /// The directory the tmpfs root is mounted on before the pivot.
    root: CString,
    steps: Vec<Step>,
    /// The working directory after the pivot (the sandbox's directory).
    workdir: CString,
    uid: u32,
    gid: u32,
    /// Supplementary groups: those of the device nodes QEMU opens.
    groups: Vec<libc::gid_t>,
    /// The capabilities QEMU keeps (a mask; 0 with virtio-fs).
    caps: u64,
}

/// The groups that open `devices` (those whose group, and not everyone,
/// may read and write them: `/dev/kvm`'s `kvm`, say).
fn device_groups(devices: &[&Path]) -> Vec<libc::gid_t> {
    use std::os::unix::fs::MetadataExt;
    let mut groups: Vec<libc::gid_t> = devices
        .iter()
        .filter_map(|d| std::fs::metadata(d).ok())
        .filter(|m| m.mode() & 0o006 != 0o006 && m.mode() & 0o060 == 0o060)
        .map(|m| m.gid())
        .filter(|&g| g != 0)
        .collect();
    groups.sort_unstable();
    groups.dedup();
    groups
}

/// Top-level entries of `/` that hold programs and libraries: QEMU's
/// dynamic loader and libraries are found through them.
const SYSTEM_DIRS: [&str; 6] = ["bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// A read-only, nosuid, nodev bind.
const RO: libc::c_ulong = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
/// A writable bind QEMU can neither run from nor use a device node of.
const RW: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

struct Planner {
    root: PathBuf,
    steps: Vec<Step>,
    made: Vec<PathBuf>,
}

impl Planner {
    fn inside(&self, path: &Path) -> PathBuf {
        self.root.join(path.strip_prefix("/").unwrap_or(path))
    }

    /// `dir` and its ancestors, in QEMU's view.
    fn dirs(&mut self, dir: &Path) -> std::io::Result<()> {
        for a in dir.ancestors().collect::<Vec<_>>().into_iter().rev() {
            if a == Path::new("/") || self.made.iter().any(|m| m == a) {
                continue;
            }
            self.made.push(a.to_owned());
            self.steps.push(Step::Dir(c_path(&self.inside(a))?));
        }
        Ok(())
    }

    /// `path` bound at the same path in QEMU's view.
    fn bind(&mut self, path: &Path, flags: libc::c_ulong) -> std::io::Result<()> {
        self.bind_tree(path, flags, false)
    }

    /// `path` bound at the same path in QEMU's view; with the mounts below
    /// it when `recursive`.
    fn bind_tree(
        &mut self,
        path: &Path,
        flags: libc::c_ulong,
        recursive: bool,
    ) -> std::io::Result<()> {
        let meta = std::fs::metadata(path)?;
        if meta.is_dir() {
            self.dirs(path)?;
        } else {
            if let Some(parent) = path.parent() {
                self.dirs(parent)?;
            }
            self.steps.push(Step::File(c_path(&self.inside(path))?));
        }
        self.steps.push(Step::Bind {
            source: c_path(path)?,
            target: c_path(&self.inside(path))?,
            flags,
            recursive,
        });
        Ok(())
    }
}

impl Jail {
    /// Plans QEMU's view for the sandbox directory `dir` (its share is
    /// `dir/shared`, in the view only when QEMU serves it, over 9p):
    /// `files` (binary, kernel, initramfs) read-only where `/usr` does not
    /// hold them already, `devices` that exist.
    pub fn plan(
        dir: &Path,
        files: &[&Path],
        devices: &[&Path],
        (uid, gid): (u32, u32),
        share: Share,
    ) -> std::io::Result<Jail> {
        let root = dir.join("jail");
        std::fs::create_dir_all(&root)?;
        let mut p = Planner {
            root: root.clone(),
            steps: Vec::new(),
            made: Vec::new(),
        };
        p.bind_tree(Path::new("/usr"), RO, true)?;
        for name in SYSTEM_DIRS {
            let host = Path::new("/").join(name);
            match std::fs::symlink_metadata(&host) {
                Ok(m) if m.file_type().is_symlink() => p.steps.push(Step::Symlink {
                    target: c_path(&std::fs::read_link(&host)?)?,
                    link: c_path(&p.inside(&host))?,
                }),
                Ok(m) if m.is_dir() => p.bind(&host, RO)?,
                _ => {}
            }
        }
        let proc = Path::new("/proc");
        p.dirs(proc)?;
        p.steps.push(Step::Proc(c_path(&p.inside(proc))?));
        let ld_cache = Path::new("/etc/ld.so.cache");
        if ld_cache.is_file() {
            p.bind(ld_cache, RO)?;
        }
        for f in files {
            if !f.starts_with("/usr") {
                p.bind(f, RO)?;
            }
        }
        for d in devices {
            if d.exists() {
                p.bind(d, libc::MS_NOSUID | libc::MS_NOEXEC)?;
            }
        }
        p.bind(dir, RW)?;
        if share == Share::VirtioFs {
            p.steps.push(Step::Private(c_path(&p.inside(dir))?));
        }
        if share == Share::NineP {
            // The share apart: a mount of its own, whose root is the share's
            // directory wherever it moves (a pooled VM's does), so that the
            // containers' root filesystems kuasar-vmm mounts there later
            // reach QEMU's view by propagation (the state directory is a
            // shared mount).
            p.bind_tree(&dir.join("shared"), RW, true)?;
        }
        Ok(Jail {
            root: c_path(&root)?,
            steps: p.steps,
            workdir: c_path(dir)?,
            uid,
            gid,
            groups: device_groups(devices),
            caps: match share {
                Share::NineP => kept_mask(),
                Share::VirtioFs => 0,
            },
        })
    }

    /// Enters the planned confinement. Called in the child between fork and
    /// exec: each step is a system call on the planned C strings; a failed
    /// step writes its name to stderr (QEMU's log) and returns its errno.
    ///
    /// # Safety
    /// Only in a forked child about to exec: it changes the calling
    /// process's mount namespace, root, credentials and capabilities.
    pub unsafe fn enter(&self) -> std::io::Result<()> {
        // SAFETY: in the child, as the caller guarantees.
        unsafe {
            self.enter_mounts()?;
            self.drop_privileges()
        }
    }

    unsafe fn enter_mounts(&self) -> std::io::Result<()> {
        // SAFETY: system calls on planned C strings, alive across them.
        unsafe {
            let null = std::ptr::null::<libc::c_char>();
            check(
                libc::unshare(libc::CLONE_NEWNS),
                "unshare the mount namespace",
            )?;
            let slave = libc::MS_REC | libc::MS_SLAVE;
            check(
                libc::mount(null, c"/".as_ptr(), null, slave, std::ptr::null()),
                "make / a slave",
            )?;
            check(
                libc::mount(
                    c"tmpfs".as_ptr(),
                    self.root.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    ROOT_TMPFS.as_ptr().cast(),
                ),
                "mount the root tmpfs",
            )?;
            for step in &self.steps {
                step.apply()?;
            }
            check(libc::chdir(self.root.as_ptr()), "enter the root")?;
            let dot = c".".as_ptr();
            check(
                libc::syscall(libc::SYS_pivot_root, dot, dot) as libc::c_int,
                "pivot_root",
            )?;
            check(libc::umount2(dot, libc::MNT_DETACH), "detach the old root")?;
            check(libc::chdir(self.workdir.as_ptr()), "enter the sandbox dir")
        }
    }

    unsafe fn drop_privileges(&self) -> std::io::Result<()> {
        // SAFETY: system calls on planned C strings, alive across them.
        unsafe {
            let kept = self.caps;
            check(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0), "keep caps")?;
            // CAP_SETPCAP last: dropping from the bounding set takes it.
            for cap in (0..64).filter(|&c| c != CAP_SETPCAP).chain([CAP_SETPCAP]) {
                if kept & (1 << cap) != 0 {
                    continue;
                }
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
                    && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
                {
                    return fail("drop from the bounding set");
                }
            }
            check(
                libc::setgroups(self.groups.len(), self.groups.as_ptr()),
                "setgroups",
            )?;
            check(libc::setresgid(self.gid, self.gid, self.gid), "setresgid")?;
            check(libc::setresuid(self.uid, self.uid, self.uid), "setresuid")?;
            set_caps(kept)?;
            for cap in KEPT_CAPS.into_iter().filter(|c| kept & (1 << c) != 0) {
                let raise = libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong;
                check(
                    libc::prctl(libc::PR_CAP_AMBIENT, raise, cap as libc::c_ulong, 0, 0),
                    "raise an ambient capability",
                )?;
            }
            check(
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
                "no_new_privs",
            )
        }
    }
}

impl Step {
    /// Carries the step out (in the child, QEMU's root tmpfs mounted).
    ///
    /// # Safety
    /// As [`Jail::enter`].
    unsafe fn apply(&self) -> std::io::Result<()> {
        let null = std::ptr::null::<libc::c_char>();
        // SAFETY: system calls on planned C strings, alive across them.
        unsafe {
            match self {
                Step::Dir(d) => {
                    if libc::mkdir(d.as_ptr(), 0o755) != 0
                        && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
                    {
                        return fail("create a directory");
                    }
                }
                Step::File(f) => {
                    let fd = libc::open(
                        f.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o644,
                    );
                    check(fd, "create a bind target")?;
                    libc::close(fd);
                }
                Step::Proc(target) => {
                    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
                    check(
                        libc::mount(
                            c"proc".as_ptr(),
                            target.as_ptr(),
                            c"proc".as_ptr(),
                            flags,
                            PROC_OPTIONS.as_ptr().cast(),
                        ),
                        "mount proc",
                    )?;
                }
                Step::Private(target) => {
                    check(
                        libc::mount(
                            null,
                            target.as_ptr(),
                            null,
                            libc::MS_PRIVATE,
                            std::ptr::null(),
                        ),
                        "make a mount private",
                    )?;
                }
                Step::Symlink { target, link } => {
                    check(libc::symlink(target.as_ptr(), link.as_ptr()), "symlink")?;
                }
                Step::Bind {
                    source,
                    target,
                    flags,
                    recursive,
                } => {
                    let rec = if *recursive { libc::MS_REC } else { 0 };
                    let bind = libc::MS_BIND | rec;
                    check(
                        libc::mount(
                            source.as_ptr(),
                            target.as_ptr(),
                            null,
                            bind,
                            std::ptr::null(),
                        ),
                        "bind mount",
                    )?;
                    let remount = libc::MS_BIND | libc::MS_REMOUNT | flags;
                    check(
                        libc::mount(null, target.as_ptr(), null, remount, std::ptr::null()),
                        "remount a bind",
                    )?;
                }
            }
        }
        Ok(())
    }
}

/// capset(2): effective, permitted and inheritable all `mask`.
unsafe fn set_caps(mask: u64) -> std::io::Result<()> {
    // SAFETY: capset reads the header and data, alive across the call.
    unsafe {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: libc::c_int,
        }
        #[repr(C)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const VERSION_3: u32 = 0x2008_0522;
        let header = Header {
            version: VERSION_3,
            pid: 0,
        };
        let half = |m: u32| Data {
            effective: m,
            permitted: m,
            inheritable: m,
        };
        let data = [half(mask as u32), half((mask >> 32) as u32)];
        check(
            libc::syscall(libc::SYS_capset, &header as *const Header, data.as_ptr()) as libc::c_int,
            "capset",
        )
    }
}

/// Err (with the step named on stderr) when a system call returned < 0.
fn check(rc: libc::c_int, step: &str) -> std::io::Result<()> {
    if rc < 0 {
        fail(step)
    } else {
        Ok(())
    }
}

/// Err with the last errno, after naming `step` on stderr (write(2) only).
fn fail(step: &str) -> std::io::Result<()> {
    let err = std::io::Error::last_os_error();
    for part in [
        b"kuasar-vmm: confining QEMU: ".as_slice(),
        step.as_bytes(),
        b" failed\n",
    ] {
        // SAFETY: write(2) reads `part`, alive across the call.
        unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
    }
    Err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kept_capabilities_are_the_file_ones() {
        // CAP_CHOWN, DAC_OVERRIDE, FOWNER, FSETID, MKNOD, SETFCAP.
        assert_eq!(kept_mask(), 0x8800_001b);
    }

    #[test]
    fn the_plan_binds_the_sandbox_and_its_share_apart_and_the_kernel() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("sb");
        std::fs::create_dir_all(dir.join("shared")).unwrap();
        let kernel = tmp.path().join("vmlinux");
        std::fs::write(&kernel, b"k").unwrap();
        let jail = Jail::plan(
            &dir,
            &[&kernel],
            &[Path::new("/dev/null")],
            (5, 6),
            Share::NineP,
        )
        .unwrap();
        assert_eq!(jail.caps, kept_mask());
        assert!(jail.groups.is_empty(), "/dev/null is everyone's");
        let binds: Vec<String> = jail
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Bind { source, .. } => Some(source.to_string_lossy().into_owned()),
                _ => None,
            })
            .collect();
        let has = |p: &Path| binds.iter().any(|b| Path::new(b) == p);
        assert!(has(Path::new("/usr")), "{binds:?}");
        assert!(has(&kernel), "{binds:?}");
        assert!(has(&dir), "{binds:?}");
        assert!(has(&dir.join("shared")), "{binds:?}");
        assert!(has(Path::new("/dev/null")), "{binds:?}");
        let share_at = binds
            .iter()
            .position(|b| Path::new(b) == dir.join("shared"));
        let dir_at = binds.iter().position(|b| Path::new(b) == dir);
        assert!(
            dir_at < share_at,
            "the share is bound on top of its directory"
        );
        assert!(dir.join("jail").is_dir());
    }

    /// Where `dir` is in QEMU's view before the pivot.
    fn jail_view(dir: &Path) -> PathBuf {
        dir.join("jail").join(dir.strip_prefix("/").unwrap())
    }

    #[test]
    fn with_virtio_fs_qemu_keeps_no_capability_and_sees_no_share() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("sb");
        std::fs::create_dir_all(dir.join("shared")).unwrap();
        let jail = Jail::plan(&dir, &[], &[], (5, 6), Share::VirtioFs).unwrap();
        assert_eq!(jail.caps, 0);
        let view = c_path(&jail_view(&dir)).unwrap();
        assert!(
            jail.steps
                .iter()
                .any(|s| matches!(s, Step::Private(t) if *t == view)),
            "the sandbox directory's bind is private"
        );
        let share = c_path(&dir.join("shared")).unwrap();
        assert!(!jail
            .steps
            .iter()
            .any(|s| matches!(s, Step::Bind { source, .. } if *source == share)));
    }

    #[test]
    fn a_device_only_its_group_opens_adds_that_group() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let (kvm, open) = (tmp.path().join("kvm"), tmp.path().join("null"));
        for (f, mode) in [(&kvm, 0o660), (&open, 0o666)] {
            std::fs::write(f, b"").unwrap();
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        std::os::unix::fs::chown(&kvm, None, Some(4242)).unwrap();
        std::os::unix::fs::chown(&open, None, Some(4343)).unwrap();
        assert_eq!(device_groups(&[&kvm, &open]), [4242]);
    }
}
