//! Container root filesystems on the host: mounting containerd's mount list
//! into the shared directory, and unmounting everything under a directory.
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mount {fstype} {source} on {target}")]
    Mount {
        fstype: String,
        source: String,
        target: PathBuf,
        #[source]
        errno: nix::Error,
    },
    #[error("unsupported mount type {0:?}")]
    Unsupported(String),
}

/// One mount as containerd describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub fstype: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Splits mount(8)-style options into flags and the filesystem's data.
fn parse_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" | "defaults" => {}
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
            other => data.push(other),
        }
    }
    (flags, data.join(","))
}

/// What every mount kuasar-vmm makes in a share carries: the guest writes
/// the share, and a set-uid program or a device node it leaves there must
/// mean nothing on the host (QEMU keeps CAP_MKNOD for the guest's images).
pub const SHARE_FLAGS: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);

/// Mounts `mounts` in order on `target` (a container's rootfs directory),
/// each nosuid and nodev ([`SHARE_FLAGS`]).
pub fn mount_all(mounts: &[MountSpec], target: &Path) -> Result<(), MountError> {
    for m in mounts {
        let (mut flags, data) = parse_options(&m.options);
        flags |= SHARE_FLAGS;
        let fstype = match m.fstype.as_str() {
            "bind" | "rbind" => {
                flags |= MsFlags::MS_BIND;
                None
            }
            "overlay" | "tmpfs" | "ext4" | "xfs" | "btrfs" => Some(m.fstype.as_str()),
            "" if flags.contains(MsFlags::MS_BIND) => None,
            other => return Err(MountError::Unsupported(other.to_owned())),
        };
        let data = (!data.is_empty()).then_some(data.as_str());
        let err = |errno| MountError::Mount {
            fstype: m.fstype.clone(),
            source: m.source.clone(),
            target: target.to_owned(),
            errno,
        };
        if flags.contains(MsFlags::MS_BIND) {
            let readonly = if flags.contains(MsFlags::MS_RDONLY) {
                Readonly::Top
            } else {
                Readonly::No
            };
            let recursive = flags.contains(MsFlags::MS_REC);
            bind(Path::new(&m.source), target, recursive, readonly)
                .map_err(|e| err(nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO))))?;
        } else {
            mount(Some(m.source.as_str()), target, fstype, flags, data).map_err(err)?;
        }
    }
    Ok(())
}

/// A mount below a directory: its path relative to the directory and
/// whether it is read-only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submount {
    pub relative: PathBuf,
    pub readonly: bool,
}

/// The mounts strictly below `dir`, shallowest first, from a mountinfo text
/// (each mount point once: the last mount on it, the one seen, wins).
pub fn parse_submounts(mountinfo: &str, dir: &Path) -> Vec<Submount> {
    let mut found: Vec<Submount> = Vec::new();
    for (point, opts) in mount_table(mountinfo) {
        let Ok(relative) = point.strip_prefix(dir) else {
            continue;
        };
        if relative.as_os_str().is_empty() {
            continue;
        }
        let readonly = opts.split(',').any(|o| o == "ro");
        let relative = relative.to_owned();
        found.retain(|m| m.relative != relative);
        found.push(Submount { relative, readonly });
    }
    found.sort_by_key(|m| m.relative.components().count());
    found
}

/// The mounts strictly below `dir` (see [`parse_submounts`]).
pub fn submounts(dir: &Path) -> Vec<Submount> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    parse_submounts(&info, dir)
}

/// How much of a bind is read-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readonly {
    No,
    /// The bind itself; mounts below it stay as they are.
    Top,
    /// The bind and every mount below it.
    Recursive,
}

/// Binds `source` (with the mounts below it when `recursive`) on `target`,
/// nosuid and nodev ([`SHARE_FLAGS`]), read-only as `readonly` says, a
/// slave of `source` (mounts made below `source` later reach it; none made
/// below it reach `source`).
///
/// The bind is made detached (open_tree(2)), given its flags and
/// propagation there (mount_setattr(2)), and only then attached
/// (move_mount(2); Linux 5.12 for all three): mount propagation copies a
/// mount as it is when attached, and a confined QEMU sees its share
/// through such a copy, which a remount after attaching would not reach
/// (a read-only volume would stay writable there).
pub fn bind(
    source: &Path,
    target: &Path,
    recursive: bool,
    readonly: Readonly,
) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
    let source_c = c_path(source)?;
    let target_c = c_path(target)?;
    let mut flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint;
    if recursive {
        flags |= AT_RECURSIVE;
    }
    // SAFETY: open_tree reads a NUL-terminated path alive across the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            source_c.as_ptr(),
            flags,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: open_tree returned a new fd that nothing else owns.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut all = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
    if readonly == Readonly::Recursive {
        all |= MOUNT_ATTR_RDONLY;
    }
    let empty = libc::AT_EMPTY_PATH as libc::c_uint;
    let slave = libc::MS_SLAVE;
    set_attr(tree.as_raw_fd(), empty | AT_RECURSIVE, all, slave)?;
    if readonly == Readonly::Top {
        set_attr(tree.as_raw_fd(), empty, MOUNT_ATTR_RDONLY, 0)?;
    }
    // SAFETY: move_mount reads the NUL-terminated paths alive across the
    // call; `tree` is open.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target_c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// mount_setattr(2)'s MOUNT_ATTR_* flags used here.
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const AT_RECURSIVE: libc::c_uint = 0x8000;

/// `path` as a C string for a system call (an error names a path with a NUL
/// byte).
pub(crate) fn c_path(path: &Path) -> std::io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other(format!("{}: a NUL byte in the path", path.display())))
}

/// mount_setattr(2) on the detached mount `fd` (with `flags`, AT_EMPTY_PATH
/// among them): sets `attr`, and the propagation type `propagation`
/// (MS_SLAVE, ...; 0 leaves it).
fn set_attr(
    fd: libc::c_int,
    flags: libc::c_uint,
    attr: u64,
    propagation: u64,
) -> std::io::Result<()> {
    /// struct mount_attr of <linux/mount.h>.
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    let attr = MountAttr {
        attr_set: attr,
        attr_clr: 0,
        propagation,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr reads a NUL-terminated path and a mount_attr of
    // the size passed, both alive across the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd,
            c"".as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Each mount of a mountinfo text: its mount point and its per-mount
/// options (`rw,relatime`, ...).
fn mount_table(mountinfo: &str) -> impl Iterator<Item = (PathBuf, &str)> {
    mountinfo.lines().filter_map(|line| {
        let mut fields = line.split(' ').skip(4);
        let point = fields.next()?;
        let opts = fields.next().unwrap_or("");
        Some((PathBuf::from(unescape(point)), opts))
    })
}

/// Makes `dir` a shared mount in a peer group of its own (bound on itself
/// first, nosuid and nodev, unless it is a mount point already), so that
/// what is mounted below it later reaches the slave copies of it in
/// confined QEMUs' mount namespaces. Idempotent.
pub fn make_shared(dir: &Path) -> Result<(), nix::Error> {
    let none = None::<&str>;
    if !mounts_under(dir).iter().any(|p| p == dir) {
        mount(Some(dir), dir, none, MsFlags::MS_BIND, none)?;
        let remount = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | SHARE_FLAGS;
        mount(none, dir, none, remount, none)?;
        mount(none, dir, none, MsFlags::MS_PRIVATE, none)?;
    }
    mount(none, dir, none, MsFlags::MS_SHARED, none)
}

/// Mount points at or under `dir`, deepest first, from /proc/self/mountinfo.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = mount_table(&info)
        .map(|(point, _)| point)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            if let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts (lazily) every mount at or under `dir`, deepest first.
pub fn unmount_all(dir: &Path) {
    for _ in 0..4 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            return;
        }
        for m in mounts {
            if let Err(e) = umount2(&m, MntFlags::MNT_DETACH) {
                tracing::warn!(mount = %m.display(), "unmount: {e}");
            }
        }
    }
}

/// Removes `dir` after unmounting everything under it, so that no removal
/// ever reaches into a mounted filesystem.
pub fn remove_dir(dir: &Path) -> std::io::Result<()> {
    unmount_all(dir);
    if !mounts_under(dir).is_empty() {
        return Err(std::io::Error::other(format!(
            "{} still has mounts under it",
            dir.display()
        )));
    }
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submounts_below_a_dir_with_their_flags() {
        let info = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
90 22 0:50 / /srv/vol rw,relatime shared:1 - ext4 /dev/vda rw
91 90 0:51 / /srv/vol/sub rw,relatime shared:5 - tmpfs t rw
92 91 0:52 / /srv/vol/sub/deep ro,relatime shared:6 - tmpfs t rw
93 90 0:53 / /srv/vol/with\\040space ro shared:7 - tmpfs t rw
94 22 0:54 / /srv/volume rw shared:8 - tmpfs t rw
";
        let subs = parse_submounts(info, Path::new("/srv/vol"));
        let got: Vec<(String, bool)> = subs
            .iter()
            .map(|m| (m.relative.display().to_string(), m.readonly))
            .collect();
        assert_eq!(
            got,
            [
                ("sub".to_string(), false),
                ("with space".to_string(), true),
                ("sub/deep".to_string(), true),
            ]
        );
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let opts: Vec<String> = ["ro", "rbind", "lowerdir=/a:/b", "upperdir=/u", "nosuid"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (flags, data) = parse_options(&opts);
        assert!(flags.contains(
            MsFlags::MS_RDONLY | MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_NOSUID
        ));
        assert_eq!(data, "lowerdir=/a:/b,upperdir=/u");
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/trailing\\"), "/trailing\\");
    }

    #[test]
    fn unknown_fstype_is_refused() {
        let m = MountSpec {
            fstype: "nfs".into(),
            source: "x".into(),
            options: vec![],
        };
        let err = mount_all(&[m], Path::new("/nonexistent")).unwrap_err();
        assert!(err.to_string().contains("nfs"));
    }
}
