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

/// Mount points at or under `dir`, deepest first, from /proc/self/mountinfo.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
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
