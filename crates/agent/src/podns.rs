//! The pod's shared PID namespace.
//!
//! Kubernetes shares one PID namespace between a pod's containers when the
//! pod asks for it (`shareProcessNamespace`, CRI NamespaceMode POD for pid);
//! under runc the pause process is its PID 1. A container's main process is
//! then not its namespace's init, so a SIGTERM without a handler ends it,
//! as it would anywhere else (an init only receives signals it handles).
//! In the VM the agent keeps such a namespace for the pod: a small init of
//! its own (`kuasar-agent pod-init`) that reaps orphans and, like pause,
//! exits on SIGTERM or SIGINT. Containers join it through its
//! `/proc/<pid>/ns/pid`.
//!
//! In containerd's podsandbox mode that init also stands for the pod's
//! sandbox (pause) container: a pause container run by the OCI runtime would
//! only repeat it, at the cost of a runtime create and start on every pod
//! start (~0.3 s under emulation).
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use tokio::sync::{oneshot, Mutex};
use tracing::{info, warn};

use crate::error::{Context, Error, Result};
use crate::process::Process;
use crate::reaper::{ExitInfo, Reaper};

/// The agent's argument that makes it the pod's PID namespace init.
pub const POD_INIT_ARG: &str = "pod-init";
/// How long the namespace's init may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The pod's PID namespace, made on first use.
#[derive(Default)]
pub struct PodPidNamespace {
    init: Mutex<Option<PodInit>>,
}

/// A running pod init: the namespace's init, by its pid in the VM's
/// namespace, and its supervisor (the agent's child, which ends with it).
#[derive(Clone, Copy)]
struct PodInit {
    init: i32,
    supervisor: i32,
    /// The reaper's mark taken before the supervisor was spawned.
    since: u64,
}

impl PodPidNamespace {
    /// The path a container's spec joins the pod's PID namespace by;
    /// starts the namespace's init when there is none (or it ended).
    pub async fn path(&self, reaper: &Arc<Reaper>) -> Result<PathBuf> {
        Ok(ns_path(self.running(reaper).await?.init))
    }

    /// The namespace's init for the pod's sandbox container to stand for
    /// (started when there is none): its pid, and its exit as its
    /// supervisor reports it.
    pub async fn sandbox_init(
        &self,
        reaper: &Arc<Reaper>,
    ) -> Result<(i32, oneshot::Receiver<ExitInfo>)> {
        let running = self.running(reaper).await?;
        Ok((
            running.init,
            reaper.watch(running.supervisor, running.since),
        ))
    }

    async fn running(&self, reaper: &Arc<Reaper>) -> Result<PodInit> {
        let mut init = self.init.lock().await;
        if let Some(running) = *init {
            if pid_is_ours(running.init) {
                return Ok(running);
            }
        }
        let running = start(reaper).await?;
        info!(pid = running.init, "pod PID namespace started");
        *init = Some(running);
        Ok(running)
    }
}

fn ns_path(pid: i32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/ns/pid"))
}

/// Whether `pid` still is a pod init of ours (not ended, not reused).
fn pid_is_ours(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c.split(|b| *b == 0).any(|a| a == POD_INIT_ARG.as_bytes()))
        .unwrap_or(false)
}

/// Spawns `kuasar-agent pod-init` with a new PID namespace for its
/// children and returns it once the namespace's init runs.
async fn start(reaper: &Arc<Reaper>) -> Result<PodInit> {
    // Close-on-exec: no other child may hold the write end open.
    let (read, write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe for the pod init")?;
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg(POD_INIT_ARG)
        .stdin(Stdio::null())
        .stdout(Stdio::from(write))
        .stderr(Stdio::inherit());
    // SAFETY: unshare(2) is a plain system call, safe between fork and exec.
    unsafe {
        cmd.pre_exec(|| unshare(CloneFlags::CLONE_NEWPID).map_err(std::io::Error::from));
    }
    let since = reaper.mark();
    let (supervisor, _exit) = reaper.spawn(&mut cmd).context("spawn the pod init")?;
    // `cmd` holds the pipe's write end: the read below sees EOF if the
    // supervisor ends without answering.
    drop(cmd);
    let line = tokio::time::timeout(START_TIMEOUT, read_line(read))
        .await
        .map_err(|_| Error::Internal(format!("the pod init (pid {supervisor}) did not start")))??;
    let init = line.trim().parse::<i32>().map_err(|_| {
        Error::Internal(format!(
            "the pod init (pid {supervisor}) answered {line:?}, not its pid"
        ))
    })?;
    Ok(PodInit {
        init,
        supervisor,
        since,
    })
}

async fn read_line(fd: OwnedFd) -> Result<String> {
    tokio::task::spawn_blocking(move || {
        let mut s = String::new();
        std::fs::File::from(fd)
            .take(64)
            .read_to_string(&mut s)
            .context("read the pod init's pid")?;
        Ok(s)
    })
    .await
    .map_err(|e| Error::Internal(format!("pod init reader: {e}")))?
}

/// A container in the pod's PID namespace does not take its processes with
/// it when its init ends (its init is not the namespace's): like
/// containerd's runc shim, kill what is left in its cgroup once the init
/// has exited, or children would live on, orphaned to the pod's init, and
/// hold the container's output open.
pub fn kill_rest_on_exit(init: Arc<Process>, cgroup: PathBuf) {
    tokio::spawn(async move {
        if init.wait().await.is_err() {
            return;
        }
        if let Err(e) = kill_cgroup(&cgroup) {
            warn!(cgroup = %cgroup.display(), "kill what is left of a container: {e}");
        }
    });
}

/// SIGKILLs every process of a cgroup (v2): `cgroup.kill` where the kernel
/// has it (5.14), else each pid of `cgroup.procs`.
fn kill_cgroup(cgroup: &Path) -> std::io::Result<()> {
    match std::fs::write(cgroup.join("cgroup.kill"), "1") {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && cgroup.is_dir() => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        other => return other,
    }
    let procs = match std::fs::read_to_string(cgroup.join("cgroup.procs")) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        other => other?,
    };
    for pid in crate::container::parse_pids(&procs) {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    Ok(())
}

/// `kuasar-agent pod-init`: started with a new PID namespace for its
/// children (see [`start`]). Forks that namespace's init, prints the init's
/// pid (as the VM sees it) on stdout, and stays to end with it.
pub fn pod_init_main() -> ! {
    // Run from /proc/self/exe, it would be named `exe` in the pod's `ps`.
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of up to 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"pod-init".as_ptr()) };
    // SAFETY: this process has one thread (nothing ran before this call in
    // `main`), so the child may do anything.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            // The agent reads stdout until EOF: only the supervisor holds it.
            // SAFETY: fd 1 is not used again by this process.
            unsafe { libc::close(1) };
            namespace_init()
        }
        Ok(ForkResult::Parent { child }) => {
            let mut out = std::io::stdout();
            let _ = writeln!(out, "{child}");
            let _ = out.flush();
            // Close stdout: the agent reads until EOF.
            // SAFETY: fd 1 is not used again by this process.
            unsafe { libc::close(1) };
            supervise(child)
        }
        Err(e) => {
            eprintln!("kuasar-agent pod-init: fork: {e}");
            std::process::exit(1)
        }
    }
}

fn supervise(child: Pid) -> ! {
    loop {
        match waitpid(child, None) {
            Ok(ws) => {
                if let Some((_, status)) = crate::reaper::exit_status(&ws) {
                    std::process::exit(status as i32);
                }
            }
            Err(Errno::EINTR) => {}
            Err(_) => std::process::exit(1),
        }
    }
}

/// PID 1 of the pod's namespace: reaps whatever is re-parented to it and
/// exits on SIGTERM or SIGINT (what pause does).
fn namespace_init() -> ! {
    let all = SigSet::all();
    if let Err(e) = all.thread_block() {
        eprintln!("kuasar-agent pod-init: block signals: {e}");
        std::process::exit(1);
    }
    loop {
        match all.wait() {
            Ok(Signal::SIGCHLD) => {
                while let Ok(ws) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    if ws == WaitStatus::StillAlive {
                        break;
                    }
                }
            }
            Ok(Signal::SIGTERM | Signal::SIGINT) => std::process::exit(0),
            _ => {}
        }
    }
}
