//! virtiofsd: the daemon serving one VM's shared directory over virtio-fs
//! (vhost-user), so that QEMU itself touches none of the share's files and
//! keeps no capability. One per VM, started just before its QEMU, in the
//! same cgroup; it sandboxes itself (`--sandbox=namespace`: mount, pid and
//! network namespaces of its own, the share its root, seccomp) and ends
//! when QEMU's connection closes. Should it end first, its QEMU is killed:
//! a guest whose files are gone is a dead VM.
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use tokio::sync::watch;

use crate::vmm::VmExit;

/// The log of a VM's virtiofsd, in the sandbox's directory.
pub const LOG: &str = "virtiofsd.log";
/// Where its pid is written, in the sandbox's directory.
pub const PID_FILE: &str = "virtiofsd.pid";

/// How long virtiofsd may take to end once its QEMU has.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// virtiofsd's command line: serve `shared` on the listening socket `fd`.
pub fn args(fd: &OwnedFd, shared: &Path) -> Vec<String> {
    vec![
        format!("--fd={}", fd.as_raw_fd()),
        format!("--shared-dir={}", shared.display()),
        // Mount, pid and network namespaces of its own, the share its root.
        "--sandbox=namespace".into(),
        // Each mount below the share (a container's root filesystem, a
        // volume) is a file system of its own in the guest too: inode
        // numbers of two of them never collide.
        "--announce-submounts".into(),
        // The images' extended attributes (file capabilities) reach the guest.
        "--xattr".into(),
        "--log-level=warn".into(),
    ]
}

/// Binds the vhost-user socket at `path` for virtiofsd to listen on, mode
/// 0600, owned by `owner` (a confined QEMU's uid and gid) so that QEMU
/// alone can connect to it.
pub fn listen(path: &Path, owner: Option<(u32, u32)>) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(OwnedFd::from(listener))
}

/// Follows virtiofsd `child` of the QEMU `qemu_pid`: when virtiofsd ends
/// first, QEMU is killed (its guest lost its files); when QEMU ends,
/// virtiofsd is given [`EXIT_GRACE`] to follow, then killed.
pub fn watch(
    mut child: tokio::process::Child,
    qemu_pid: u32,
    qemu_exited: watch::Receiver<Option<VmExit>>,
) {
    let qemu_ended = qemu_exited.clone();
    tokio::spawn(async move {
        let mut qemu_exited = qemu_exited;
        let qemu_ends = async move {
            // The borrow it returns is not held across an await.
            let _ = qemu_exited.wait_for(Option::is_some).await.map(drop);
        };
        tokio::select! {
            status = child.wait() => {
                if qemu_ended.borrow().is_none() {
                    tracing::warn!(qemu_pid, ?status, "virtiofsd ended before its QEMU: killing QEMU");
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(qemu_pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            () = qemu_ends => {
                if tokio::time::timeout(EXIT_GRACE, child.wait()).await.is_err() {
                    tracing::warn!(qemu_pid, "virtiofsd outlived its QEMU: killing it");
                    let _ = child.kill().await;
                }
            }
        }
    });
}

/// `pid` and its children (virtiofsd's sandbox runs in a child of the
/// process started), for moving them all into a cgroup.
pub fn with_children(pid: u32) -> Vec<u32> {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    std::iter::once(pid)
        .chain(children.split_whitespace().filter_map(|c| c.parse().ok()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_is_qemus_alone() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("fs.sock");
        std::fs::write(&path, b"stale").unwrap();
        let fd = listen(&path, Some((4242, 4343))).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o777),
            (4242, 4343, 0o600)
        );
        let args = args(&fd, Path::new("/s/shared")).join(" ");
        assert!(args.contains(&format!("--fd={}", fd.as_raw_fd())), "{args}");
        assert!(
            args.contains("--shared-dir=/s/shared --sandbox=namespace"),
            "{args}"
        );
    }

    #[test]
    fn a_process_comes_with_its_children() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & wait"])
            .spawn()
            .unwrap();
        let pid = child.id();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut found = with_children(pid);
        while found.len() < 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            found = with_children(pid);
        }
        for p in found.iter().skip(1) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*p as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0], pid);
    }
}
