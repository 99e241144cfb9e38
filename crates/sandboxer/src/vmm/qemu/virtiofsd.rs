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
/// How long QEMU's end may take to be seen once its virtiofsd has ended.
const QEMU_GRACE: Duration = Duration::from_secs(1);

/// Sends `signal` to the process of pidfd `fd` (`pidfd_send_signal(2)`).
fn signal_pidfd(fd: &OwnedFd, signal: libc::c_int) {
    // SAFETY: pidfd_send_signal takes a descriptor we hold open, a signal
    // number, no siginfo and no flags; no memory of ours is passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc != 0 {
        tracing::debug!("pidfd_send_signal: {}", std::io::Error::last_os_error());
    }
}

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

/// A running virtiofsd: this run's child, or one an earlier run started
/// (followed through a pidfd).
pub enum Process {
    Child(tokio::process::Child),
    Adopted {
        pid: u32,
        exit: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    },
}

impl Process {
    async fn wait(&mut self) {
        match self {
            Process::Child(c) => {
                let _ = c.wait().await;
            }
            Process::Adopted { exit, .. } => exit.as_mut().await,
        }
    }

    async fn kill(&mut self) {
        match self {
            Process::Child(c) => {
                let _ = c.kill().await;
            }
            Process::Adopted { pid, exit } => {
                kill(*pid);
                exit.as_mut().await;
            }
        }
    }
}

fn kill(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// The virtiofsd an earlier run started for the sandbox directory `dir`:
/// its pid file's process, when that is a virtiofsd working in `dir`.
pub fn adopt(dir: &Path) -> Option<(u32, Process)> {
    use std::os::unix::fs::MetadataExt;
    let pid: u32 = std::fs::read_to_string(dir.join(PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cwd = std::fs::metadata(format!("/proc/{pid}/cwd")).ok()?;
    let here = std::fs::metadata(dir).ok()?;
    let ours = String::from_utf8_lossy(&cmdline).contains("--shared-dir=")
        && (cwd.dev(), cwd.ino()) == (here.dev(), here.ino());
    if !ours {
        return None;
    }
    let exit = crate::vmm::held::exit_of(pid).ok()?;
    Some((
        pid,
        Process::Adopted {
            pid,
            exit: Box::pin(exit),
        },
    ))
}

/// Follows virtiofsd `process` of the QEMU `qemu_pid`: when virtiofsd ends
/// and QEMU has not within [`QEMU_GRACE`] (virtiofsd ends as soon as a
/// dying QEMU's connection closes, before QEMU's end is seen), QEMU is
/// killed: its guest lost its files. When QEMU ends, virtiofsd is given
/// [`EXIT_GRACE`] to follow, then killed.
pub fn watch(mut process: Process, qemu_pid: u32, qemu_exited: watch::Receiver<Option<VmExit>>) {
    let mut qemu_ended = qemu_exited.clone();
    // QEMU is killed through a pidfd, never by a pid that may be reused.
    let qemu = crate::vmm::held::pidfd_open(qemu_pid).ok();
    tokio::spawn(async move {
        let mut qemu_exited = qemu_exited;
        let qemu_ends = async move {
            // The borrow it returns is not held across an await.
            let _ = qemu_exited.wait_for(Option::is_some).await.map(drop);
        };
        tokio::select! {
            () = process.wait() => {
                let ended = tokio::time::timeout(QEMU_GRACE, qemu_ended.wait_for(Option::is_some))
                    .await
                    .is_ok_and(|r| r.is_ok());
                if !ended {
                    tracing::warn!(qemu_pid, "virtiofsd ended before its QEMU: killing QEMU");
                    if let Some(fd) = &qemu {
                        signal_pidfd(fd, libc::SIGKILL);
                    }
                }
            }
            () = qemu_ends => {
                if tokio::time::timeout(EXIT_GRACE, process.wait()).await.is_err() {
                    tracing::warn!(qemu_pid, "virtiofsd outlived its QEMU: killing it");
                    process.kill().await;
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

    #[tokio::test]
    async fn a_qemu_whose_virtiofsd_ended_is_killed() {
        use std::os::unix::process::ExitStatusExt;
        let mut qemu = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let virtiofsd = tokio::process::Command::new("true").spawn().unwrap();
        let (_tx, rx) = watch::channel(None);
        watch(Process::Child(virtiofsd), qemu.id(), rx);
        let status = tokio::task::spawn_blocking(move || qemu.wait())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    }

    #[tokio::test]
    async fn an_earlier_runs_virtiofsd_is_adopted_only_in_its_own_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, other) = (tmp.path().join("sb"), tmp.path().join("other"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        assert!(adopt(&dir).is_none(), "no pid file");
        // A stand-in: its command line names a shared directory, it works in `dir`.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30; :", "--shared-dir=/x"])
            .current_dir(&dir)
            .spawn()
            .unwrap();
        let pid = child.id();
        // Until it has exec'd, its command line is ours.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
            .unwrap_or_default()
            .contains("--shared-dir")
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        for d in [&dir, &other] {
            std::fs::write(d.join(PID_FILE), pid.to_string()).unwrap();
        }
        assert!(adopt(&other).is_none(), "it works elsewhere");
        let (adopted, mut process) = adopt(&dir).expect("adopted");
        assert_eq!(adopted, pid);
        process.kill().await;
        let _ = child.wait();
        assert!(adopt(&dir).is_none(), "it is gone");
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
