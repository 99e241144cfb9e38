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

/// Mounts `mounts` in order on `target` (a container's rootfs directory).
pub fn mount_all(mounts: &[MountSpec], target: &Path) -> Result<(), MountError> {
    for m in mounts {
        let (mut flags, data) = parse_options(&m.options);
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
        let ro_bind = flags.contains(MsFlags::MS_BIND | MsFlags::MS_RDONLY);
        let err = |errno| MountError::Mount {
            fstype: m.fstype.clone(),
            source: m.source.clone(),
            target: target.to_owned(),
            errno,
        };
        mount(Some(m.source.as_str()), target, fstype, flags, data).map_err(err)?;
        if ro_bind {
            // A bind mount ignores MS_RDONLY until it is remounted.
            let remount = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
            mount(None::<&str>, target, None::<&str>, remount, None::<&str>).map_err(err)?;
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

/// Makes the mount at `path` and every mount below it read-only
/// (mount_setattr(2) with AT_RECURSIVE; Linux 5.12).
pub fn make_readonly_recursively(path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    /// struct mount_attr of <linux/mount.h>.
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    const AT_RECURSIVE: libc::c_uint = 0x8000;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("path with a NUL byte"))?;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr reads a NUL-terminated path and a mount_attr of
    // the size passed, both alive across the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c_path.as_ptr(),
            AT_RECURSIVE,
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
