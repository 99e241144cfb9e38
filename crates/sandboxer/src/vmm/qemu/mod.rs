//! QEMU `microvm`: PVH kernel boot, virtio-serial agent channel, shared
//! directory over virtio-fs (a [`virtiofsd`] per VM) or virtio-9p, QMP
//! control.
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::watch;

use super::{StartVmError, StopVmError, VmExit, Vmm};

pub mod cmdline;
mod hypervisor;
pub mod jail;
pub mod qmp;
pub mod uids;
pub mod virtiofsd;

pub use hypervisor::Qemu;

pub use cmdline::{Accel, AgentChannel, NicSpec, Share, VmSpec};

/// Bound on one QMP exchange about held descriptors.
const QMP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long QEMU may take to create its sockets after being spawned.
const SOCKET_WAIT: Duration = Duration::from_secs(10);

pub struct QemuVm {
    binary: PathBuf,
    spec: VmSpec,
    console_log: PathBuf,
    pid: Option<u32>,
    exited: watch::Receiver<Option<VmExit>>,
    exited_tx: Option<watch::Sender<Option<VmExit>>>,
    /// The NICs' tap fds, held until QEMU has inherited them.
    tap_fds: Vec<OwnedFd>,
    /// The cgroup QEMU joins before it execs (its `cgroup.procs` files).
    cgroup_procs: Vec<PathBuf>,
    /// Started at [`BACKGROUND_NICE`] (a pooled VM).
    background: bool,
    /// Confined ([`jail`]): None when `[qemu] confine = false`.
    confinement: Option<Confinement>,
    /// The virtiofsd binary (with [`Share::VirtioFs`]).
    virtiofsd: PathBuf,
    /// The pid of this VM's virtiofsd, when this run started it.
    virtiofsd_pid: Option<u32>,
}

/// How a confined QEMU runs: its uid (None: every uid of the range is
/// held, and the VM is refused) and the device nodes it sees.
struct Confinement {
    lease: Option<uids::UidLease>,
    devices: Vec<PathBuf>,
}

/// The nice value of a pooled VM's QEMU until a pod takes it.
pub const BACKGROUND_NICE: i32 = 10;

impl QemuVm {
    pub fn new(binary: PathBuf, spec: VmSpec) -> Self {
        let (tx, rx) = watch::channel(None);
        QemuVm {
            binary,
            console_log: spec.console_log(),
            spec,
            pid: None,
            exited: rx,
            exited_tx: Some(tx),
            tap_fds: Vec::new(),
            cgroup_procs: Vec::new(),
            background: false,
            confinement: None,
            virtiofsd: PathBuf::new(),
            virtiofsd_pid: None,
        }
    }

    /// Serves the share with this virtiofsd binary (with [`Share::VirtioFs`]).
    pub fn set_virtiofsd(&mut self, binary: PathBuf) {
        self.virtiofsd = binary;
    }

    /// The confined QEMU's uid and gid (None: not confined).
    fn owner(&self) -> Option<(u32, u32)> {
        let uid = self.confinement.as_ref()?.lease.as_ref()?.uid();
        Some((uid, uid))
    }

    /// Confines QEMU ([`jail`]) as uid `lease` (None: none was free), with
    /// `devices` in its view.
    pub fn confine(&mut self, lease: Option<uids::UidLease>, devices: Vec<PathBuf>) {
        self.confinement = Some(Confinement { lease, devices });
    }

    /// Keeps an adopted QEMU's uid held until this VM is dropped.
    pub fn hold_uid(&mut self, lease: uids::UidLease) {
        self.confinement = Some(Confinement {
            lease: Some(lease),
            devices: Vec::new(),
        });
    }

    /// The planned confinement, if QEMU is confined.
    fn jail(&self) -> Result<Option<jail::Jail>, StartVmError> {
        let Some(c) = &self.confinement else {
            return Ok(None);
        };
        let lease = c.lease.as_ref().ok_or(StartVmError::NoUid)?;
        let files = [
            self.binary.as_path(),
            self.spec.kernel.as_path(),
            self.spec.initrd.as_path(),
        ];
        let devices: Vec<&Path> = c.devices.iter().map(PathBuf::as_path).collect();
        let ids = (lease.uid(), lease.uid());
        jail::Jail::plan(&self.spec.dir, &files, &devices, ids, self.spec.share)
            .map(Some)
            .map_err(|source| StartVmError::Prepare {
                path: self.spec.dir.join("jail"),
                source,
            })
    }

    /// Makes QEMU start at a lower CPU priority ([`BACKGROUND_NICE`]).
    pub fn set_background(&mut self, background: bool) {
        self.background = background;
    }

    /// Makes QEMU join the cgroup of these `cgroup.procs` files before it
    /// starts, so that all its memory is charged there.
    pub fn join_cgroup(&mut self, procs: Vec<PathBuf>) {
        self.cgroup_procs = procs;
    }

    /// Gives the guest a virtio-net NIC with MAC `mac` on the tap device
    /// `tap` (a queue fd of it; QEMU inherits it at the same number).
    pub fn add_nic(&mut self, tap: OwnedFd, mac: String) {
        self.spec.nics.push(NicSpec {
            fd: tap.as_raw_fd(),
            mac,
        });
        self.tap_fds.push(tap);
    }

    fn log_path(&self) -> PathBuf {
        self.spec.dir.join("qemu.log")
    }

    fn spawn(&mut self) -> Result<(), StartVmError> {
        let prepare = |path: &Path, source| StartVmError::Prepare {
            path: path.to_owned(),
            source,
        };
        let shared = self.spec.shared_dir();
        std::fs::create_dir_all(&shared).map_err(|e| prepare(&shared, e))?;
        if let Some(owner) = self.owner() {
            open_dir_to(&self.spec.dir, owner).map_err(|e| prepare(&self.spec.dir, e))?;
        }
        let mut cmd = self.command(&self.binary, self.spec.args(), &self.log_path())?;
        let fds: Vec<RawFd> = self.tap_fds.iter().map(AsRawFd::as_raw_fd).collect();
        inherit(&mut cmd, fds);
        if let Some(jail) = self.jail()? {
            // SAFETY: Jail::enter makes system calls on the C strings it
            // planned (no allocation); it runs last, after the cgroup was
            // joined and the fds were readied, as it changes the child's
            // root and drops its privileges.
            unsafe {
                cmd.pre_exec(move || jail.enter());
            }
        }
        let mut virtiofsd = match self.spec.share {
            Share::VirtioFs => Some(self.spawn_virtiofsd()?),
            Share::NineP => None,
        };
        let spawned = tokio::process::Command::from(cmd)
            .kill_on_drop(false)
            .spawn();
        // QEMU has its own copies now (or never will): ours go.
        self.tap_fds.clear();
        let mut child = match spawned {
            Ok(child) => child,
            Err(source) => {
                if let Some(v) = virtiofsd.as_mut() {
                    let _ = v.start_kill();
                }
                return Err(StartVmError::Spawn {
                    binary: self.binary.clone(),
                    source,
                });
            }
        };
        self.pid = child.id();
        if let (Some(v), Some(pid)) = (virtiofsd, self.pid) {
            virtiofsd::watch(virtiofsd::Process::Child(v), pid, self.exited.clone());
        }
        if let Some(pid) = self.pid {
            let _ = std::fs::write(self.spec.dir.join(hypervisor::PID_FILE), pid.to_string());
        }
        let tx = self.exited_tx.take().expect("spawn runs once");
        tokio::spawn(async move {
            let exit = match child.wait().await {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    match (status.code(), status.signal()) {
                        (Some(code), _) => VmExit::Code(code),
                        (None, Some(sig)) => VmExit::Signal(sig),
                        (None, None) => VmExit::Code(-1),
                    }
                }
                Err(_) => VmExit::Code(-1),
            };
            let _ = tx.send(Some(exit));
        });
        Ok(())
    }

    /// `binary` with `args`, working in the sandbox directory, its output
    /// to `log` (created anew), detached ([`detach`]) into this VM's
    /// cgroup and at its priority: how QEMU and virtiofsd are started.
    fn command(
        &self,
        binary: &Path,
        args: Vec<String>,
        log: &Path,
    ) -> Result<std::process::Command, StartVmError> {
        let prepare = |source| StartVmError::Prepare {
            path: log.to_owned(),
            source,
        };
        let out = std::fs::File::create(log).map_err(prepare)?;
        let err = out.try_clone().map_err(prepare)?;
        let mut cmd = std::process::Command::new(binary);
        cmd.args(args)
            .current_dir(&self.spec.dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        detach(&mut cmd, &self.cgroup_procs, self.background);
        Ok(cmd)
    }

    /// Starts this VM's virtiofsd on its share, listening on a socket only
    /// QEMU may connect to, in QEMU's cgroup and at its priority.
    fn spawn_virtiofsd(&mut self) -> Result<tokio::process::Child, StartVmError> {
        let prepare = |path: &Path, source| StartVmError::Prepare {
            path: path.to_owned(),
            source,
        };
        let socket = self.spec.virtiofsd_socket();
        let listener = virtiofsd::listen(&socket, self.owner()).map_err(|e| prepare(&socket, e))?;
        let args = virtiofsd::args(&listener, &self.spec.shared_dir());
        let mut cmd = self.command(&self.virtiofsd, args, &self.spec.dir.join(virtiofsd::LOG))?;
        inherit(&mut cmd, vec![listener.as_raw_fd()]);
        let child = tokio::process::Command::from(cmd)
            .kill_on_drop(false)
            .spawn()
            .map_err(|source| StartVmError::Spawn {
                binary: self.virtiofsd.clone(),
                source,
            })?;
        self.virtiofsd_pid = child.id();
        if let Some(pid) = self.virtiofsd_pid {
            let _ = std::fs::write(self.spec.dir.join(virtiofsd::PID_FILE), pid.to_string());
        }
        Ok(child)
    }

    /// Takes over the QEMU `pid` that an earlier run of the sandboxer
    /// started for `spec` (the caller checked that it is that VM). Its exit
    /// is followed with a pidfd: it is not our child.
    pub fn adopt(binary: PathBuf, spec: VmSpec, pid: u32) -> std::io::Result<Self> {
        let mut vm = QemuVm::new(binary, spec);
        let exit = crate::vmm::held::exit_of(pid)?;
        vm.pid = Some(pid);
        let tx = vm.exited_tx.take().expect("a new QemuVm has its sender");
        tokio::spawn(async move {
            exit.await;
            let _ = tx.send(Some(VmExit::Unknown));
        });
        // Its virtiofsd (virtio-fs), started by the same earlier run.
        if let Some((vpid, process)) = virtiofsd::adopt(&vm.spec.dir) {
            vm.virtiofsd_pid = Some(vpid);
            virtiofsd::watch(process, pid, vm.exited.clone());
        }
        Ok(vm)
    }

    /// Waits until QEMU has created the agent and QMP sockets.
    async fn wait_sockets(&self) -> Result<(), StartVmError> {
        let started = Instant::now();
        let mut sockets = vec![self.spec.qmp_socket()];
        if self.spec.channel == AgentChannel::Serial {
            sockets.push(self.spec.agent_socket());
        }
        loop {
            if let Some(exit) = *self.exited.borrow() {
                return Err(StartVmError::Exited {
                    exit,
                    log: self.logs_tail(),
                });
            }
            if sockets.iter().all(|s| s.exists()) {
                return Ok(());
            }
            if started.elapsed() > SOCKET_WAIT {
                return Err(StartVmError::NoSocket {
                    path: sockets[0].clone(),
                    after: SOCKET_WAIT,
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The end of QEMU's log, and of virtiofsd's when it wrote anything
    /// (a QEMU that could not reach its virtiofsd says only that).
    fn logs_tail(&self) -> String {
        let qemu = log_tail(&self.log_path(), 2048);
        let path = self.spec.dir.join(virtiofsd::LOG);
        match std::fs::metadata(&path) {
            Ok(m) if m.len() > 0 => format!("{qemu} | virtiofsd: {}", log_tail(&path, 1024)),
            _ => qemu,
        }
    }

    async fn wait_exit(&self, timeout: Duration) -> bool {
        let mut rx = self.exited.clone();
        let exited = tokio::time::timeout(timeout, rx.wait_for(|e| e.is_some())).await;
        exited.is_ok()
    }
}

#[async_trait]
impl Vmm for QemuVm {
    async fn start(&mut self) -> Result<(), StartVmError> {
        for (what, path) in [
            ("QEMU binary", &self.binary),
            ("guest kernel", &self.spec.kernel),
            ("guest initramfs", &self.spec.initrd),
        ]
        .into_iter()
        .chain((self.spec.share == Share::VirtioFs).then_some(("virtiofsd", &self.virtiofsd)))
        {
            if !path.is_file() {
                return Err(StartVmError::Missing {
                    what,
                    path: path.clone(),
                });
            }
        }
        self.spawn()?;
        if let Err(e) = self.wait_sockets().await {
            let _ = self.stop(Duration::ZERO).await;
            return Err(e);
        }
        Ok(())
    }

    async fn stop(&mut self, grace: Duration) -> Result<(), StopVmError> {
        let Some(pid) = self.pid else { return Ok(()) };
        if self.exited.borrow().is_some() {
            return Ok(());
        }
        if !grace.is_zero() {
            match qmp::Qmp::connect(&self.spec.qmp_socket(), grace).await {
                Ok(q) => {
                    if let Err(e) = q.quit().await {
                        tracing::debug!(pid, "QMP quit: {e}");
                    }
                }
                Err(e) => tracing::debug!(pid, "QMP connect: {e}"),
            }
            if self.wait_exit(grace).await {
                return Ok(());
            }
            tracing::warn!(pid, "QEMU did not quit within {grace:?}; killing it");
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        if self.wait_exit(Duration::from_secs(5)).await {
            Ok(())
        } else {
            Err(StopVmError::Unkillable { pid })
        }
    }

    fn pid(&self) -> Option<u32> {
        self.pid
    }

    fn helper_pids(&self) -> Vec<u32> {
        self.virtiofsd_pid
            .map(virtiofsd::with_children)
            .unwrap_or_default()
    }

    fn agent_address(&self) -> String {
        self.spec.agent_address()
    }

    fn console_log(&self) -> &Path {
        &self.console_log
    }

    fn exited(&self) -> watch::Receiver<Option<VmExit>> {
        self.exited.clone()
    }

    async fn hold_fds(&self, fds: Vec<(String, OwnedFd)>) -> Result<(), String> {
        if fds.is_empty() {
            return Ok(());
        }
        let mut qmp = qmp::Qmp::connect(&self.spec.qmp_socket(), QMP_TIMEOUT)
            .await
            .map_err(|e| crate::error::chain(&e))?;
        for (name, fd) in &fds {
            tokio::time::timeout(QMP_TIMEOUT, qmp.getfd(name, fd.as_fd()))
                .await
                .map_err(|_| format!("QMP getfd {name} timed out"))?
                .map_err(|e| crate::error::chain(&e))?;
        }
        Ok(())
    }

    fn relocate(&mut self, dir: &Path) {
        self.spec.dir = dir.to_owned();
        self.console_log = self.spec.console_log();
    }

    async fn release_fds(&self, names: Vec<String>) -> Result<(), String> {
        if names.is_empty() || self.exited.borrow().is_some() {
            return Ok(());
        }
        let mut qmp = qmp::Qmp::connect(&self.spec.qmp_socket(), QMP_TIMEOUT)
            .await
            .map_err(|e| crate::error::chain(&e))?;
        for name in &names {
            tokio::time::timeout(QMP_TIMEOUT, qmp.closefd(name))
                .await
                .map_err(|_| format!("QMP closefd {name} timed out"))?
                .map_err(|e| crate::error::chain(&e))?;
        }
        Ok(())
    }
}

/// Makes the child of `cmd` a process that outlives kuasar-vmm (a session
/// of its own), in the cgroup of `cgroup_procs`, at [`BACKGROUND_NICE`]
/// when `background`.
fn detach(cmd: &mut std::process::Command, cgroup_procs: &[PathBuf], background: bool) {
    // SAFETY: setsid is async-signal-safe and touches no memory of the
    // parent; the process gets its own session so that it survives the
    // sandboxer's restart and never receives the sandboxer's signals.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
    join_cgroup_at_exec(cmd, cgroup_procs);
    if background {
        // SAFETY: setpriority is async-signal-safe and touches no memory;
        // it lowers the child's own priority before exec (every thread
        // it starts inherits it).
        unsafe {
            cmd.pre_exec(|| {
                if libc::setpriority(libc::PRIO_PROCESS, 0, BACKGROUND_NICE) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

/// Makes the child of `cmd` inherit `fds` at their numbers.
fn inherit(cmd: &mut std::process::Command, fds: Vec<RawFd>) {
    if fds.is_empty() {
        return;
    }
    // SAFETY: fcntl(F_SETFD) is async-signal-safe; the closure only reads
    // the captured vector (no allocation). It clears FD_CLOEXEC on the fds
    // in the child alone, so that it inherits them at the numbers its
    // command line names (`-netdev tap,fd=N`, `--fd=N`) while no other
    // child of the daemon does. The caller keeps them open until the child
    // has been exec'd.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Lets a confined QEMU (`owner`, uid and gid) create its sockets and
/// console log in the sandbox directory `dir` without owning it: group
/// `owner`'s, group-writable, sticky (it can remove only what it made).
fn open_dir_to(dir: &Path, (_, gid): (u32, u32)) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(dir, None, Some(gid))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1770))
}

/// Makes the child of `cmd` join the cgroup of these `cgroup.procs` files
/// before it execs, so that all its memory is charged there.
fn join_cgroup_at_exec(cmd: &mut std::process::Command, procs: &[PathBuf]) {
    if procs.is_empty() {
        return;
    }
    let files: Vec<std::ffi::CString> = procs
        .iter()
        .filter_map(|p| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).ok())
        .collect();
    // SAFETY: open(2), write(2) and close(2) are async-signal-safe; the
    // closure reads the captured C strings (no allocation). Writing "0" to
    // cgroup.procs moves the writing process (the child, before exec) into
    // that cgroup.
    unsafe {
        cmd.pre_exec(move || {
            for f in &files {
                let fd = libc::open(f.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let wrote = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if wrote != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// The last `max` bytes of a log file, lossily decoded, lines joined with
/// " | " so that the text fits in one error message.
pub fn log_tail(path: &Path, max: usize) -> String {
    let data = std::fs::read(path).unwrap_or_default();
    let start = data.len().saturating_sub(max);
    let text = String::from_utf8_lossy(&data[start..]);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        "(nothing)".to_owned()
    } else {
        lines.join(" | ")
    }
}
