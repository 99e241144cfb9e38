//! A private test environment: its own containerd (scripts/containerd.sh)
//! and, when asked, its own kuasar-vmm, all under `/run/kuasar-e2e-<pid>`.
//! Everything it started is stopped and removed when it is torn down: on
//! drop, or, for the process-wide [`shared`] one, when the test binary exits
//! (also after failed tests).
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use crate::cmd::{self, Output, Running};
use crate::paths;
use crate::procs;
use crate::sandboxer::{Sandboxer, SandboxerConfig};

/// Default deadline of a `ctr` call (a VM boot under emulation takes 1-2 s,
/// more when several boot at once).
pub const CTR_TIMEOUT: Duration = Duration::from_secs(120);
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(180);
/// How long VMs, shims and state directories may take to go away.
pub const CLEANUP_TIMEOUT: Duration = Duration::from_secs(30);
const DIR_PREFIX: &str = "/run/kuasar-e2e-";

#[derive(Debug, Clone, Copy)]
pub struct EnvOptions {
    /// Start kuasar-vmm (default configuration) with containerd.
    pub sandboxer: bool,
}

impl Default for EnvOptions {
    fn default() -> Self {
        Self { sandboxer: true }
    }
}

pub struct Env {
    dir: PathBuf,
    sandboxer: Mutex<Option<Sandboxer>>,
    torn_down: Mutex<bool>,
    next_id: AtomicU32,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Cleans up environments of test processes that no longer exist.
fn sweep_stale() {
    let Ok(entries) = fs::read_dir("/run") else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = path.to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(DIR_PREFIX) else {
            continue;
        };
        match pid.parse::<i32>() {
            Ok(pid) if procs::alive(pid) => continue,
            Ok(_) => {}
            Err(_) => continue,
        }
        eprintln!("kuasar-e2e: cleaning up {name}, left by a dead test run");
        let _ = script("containerd.sh", "stop", &path);
        for line in procs::sweep(&path) {
            eprintln!("kuasar-e2e: {line}");
        }
    }
}

fn script(name: &str, verb: &str, dir: &Path) -> Output {
    let mut c = Command::new(paths::repo_root().join("scripts").join(name));
    c.arg(verb)
        .arg(dir)
        .env("KUASAR_BIN_DIR", paths::bin_dir())
        .env("KUASAR_IMAGE_DIR", paths::image_dir())
        .env("KUASAR_TEST_IMAGES", paths::test_images_dir());
    cmd::run(&mut c, None, SCRIPT_TIMEOUT)
}

impl Env {
    /// Checks the prerequisites, starts containerd (and kuasar-vmm).
    pub fn start(opts: EnvOptions) -> Result<Env, String> {
        paths::check_prerequisites()?;
        sweep_stale();
        let dir = PathBuf::from(format!("{DIR_PREFIX}{}", std::process::id()));
        if dir.exists() {
            let _ = script("containerd.sh", "stop", &dir);
            procs::sweep(&dir);
        }
        let env = Env {
            dir,
            sandboxer: Mutex::new(None),
            torn_down: Mutex::new(false),
            next_id: AtomicU32::new(0),
        };
        let out = script("containerd.sh", "start", &env.dir);
        if !out.success() {
            return Err(format!("starting the private containerd failed:\n{out}"));
        }
        if opts.sandboxer {
            env.start_sandboxer(env.sandboxer_config())?;
        }
        Ok(env)
    }

    /// Restarts the private containerd (SIGTERM, wait, start again with the
    /// same root and state), leaving kuasar-vmm and the VMs running.
    pub fn restart_containerd(&self) -> Result<(), String> {
        let pid_file = self.dir.join("containerd.pid");
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .map_err(|e| format!("read {}: {e}", pid_file.display()))?
            .trim()
            .parse()
            .map_err(|e| format!("containerd pid: {e}"))?;
        // SAFETY: kill(2) with a pid read from our own containerd's pid file.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            if std::time::Instant::now() > deadline {
                return Err(format!("containerd {pid} did not stop"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut c = Command::new(paths::repo_root().join("scripts").join("containerd.sh"));
        c.arg("start")
            .arg(&self.dir)
            .env("KUASAR_SKIP_IMAGES", "1")
            .env("KUASAR_BIN_DIR", paths::bin_dir())
            .env("KUASAR_IMAGE_DIR", paths::image_dir());
        let out = cmd::run(&mut c, None, SCRIPT_TIMEOUT);
        if !out.success() {
            return Err(format!("restarting containerd failed:\n{out}"));
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// containerd's gRPC socket.
    pub fn address(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// Where the shims of this containerd look for the sandboxer.
    pub fn vmm_socket(&self) -> PathBuf {
        self.dir.join("vmm.sock")
    }

    /// The sandboxer's state directory (one subdirectory per sandbox).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("vmm")
    }

    /// The default sandboxer configuration of this environment.
    pub fn sandboxer_config(&self) -> SandboxerConfig {
        SandboxerConfig::for_dir(&self.dir)
    }

    /// Starts kuasar-vmm with `config` (stopping the running one first).
    pub fn start_sandboxer(&self, config: SandboxerConfig) -> Result<(), String> {
        let mut slot = lock(&self.sandboxer);
        if let Some(mut old) = slot.take() {
            old.stop();
        }
        *slot = Some(Sandboxer::start(&self.dir, config)?);
        Ok(())
    }

    /// Ends kuasar-vmm with `signal`, leaving its VMs running, waits `gap`,
    /// and starts it again with the same configuration.
    pub fn restart_sandboxer(&self, signal: i32, gap: Duration) -> Result<(), String> {
        self.restart_sandboxer_with(signal, gap, || {})
    }

    /// [`Env::restart_sandboxer`], running `meanwhile` while it is down.
    pub fn restart_sandboxer_with(
        &self,
        signal: i32,
        gap: Duration,
        meanwhile: impl FnOnce(),
    ) -> Result<(), String> {
        let mut slot = lock(&self.sandboxer);
        let Some(mut old) = slot.take() else {
            return Err("kuasar-vmm is not running".into());
        };
        old.end_keeping_vms(signal)?;
        let config = old.config.clone();
        drop(old);
        meanwhile();
        std::thread::sleep(gap);
        *slot = Some(Sandboxer::start(&self.dir, config)?);
        Ok(())
    }

    /// kuasar-vmm's whole log (all its runs in this environment).
    pub fn sandboxer_log(&self) -> String {
        fs::read_to_string(self.dir.join("kuasar-vmm.log")).unwrap_or_default()
    }

    /// The running kuasar-vmm's pid.
    pub fn sandboxer_pid(&self) -> Option<i32> {
        lock(&self.sandboxer).as_ref().and_then(Sandboxer::pid)
    }

    /// Stops kuasar-vmm (and any QEMU of its state dir).
    pub fn stop_sandboxer(&self) {
        if let Some(mut s) = lock(&self.sandboxer).take() {
            s.stop();
        }
    }

    pub fn sandboxer_running(&self) -> bool {
        lock(&self.sandboxer).is_some()
    }

    /// A fresh container id (valid for containerd).
    pub fn unique_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{}-{n}", std::process::id())
    }

    fn ctr_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(self.address()).args(args);
        c
    }

    /// `ctr --address <private socket> ARGS` (namespace `default`).
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_with(args, None, CTR_TIMEOUT)
    }

    pub fn ctr_with(&self, args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> Output {
        cmd::run(&mut self.ctr_command(args), stdin, timeout)
    }

    /// `ctr ARGS` in the background.
    pub fn ctr_spawn(&self, args: &[&str]) -> Running {
        cmd::spawn(&mut self.ctr_command(args), None)
    }

    /// `ctr run --rm --runtime kuasar-vmm busybox ID CMD...`.
    pub fn run_vm(&self, id: &str, command: &[&str]) -> Output {
        self.run_vm_with(id, command, None, CTR_TIMEOUT)
    }

    pub fn run_vm_with(
        &self,
        id: &str,
        command: &[&str],
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Output {
        let mut args = vec![
            "run",
            "--rm",
            "--runtime",
            paths::RUNTIME,
            paths::BUSYBOX,
            id,
        ];
        args.extend_from_slice(command);
        self.ctr_with(&args, stdin, timeout)
    }

    /// `ctr run -d --runtime kuasar-vmm busybox ID CMD...`; the returned
    /// guard removes the container (and its task) when dropped.
    pub fn run_vm_detached(&self, id: &str, command: &[&str]) -> (ContainerGuard<'_>, Output) {
        let guard = self.guard(id);
        let mut args = vec!["run", "-d", "--runtime", paths::RUNTIME, paths::BUSYBOX, id];
        args.extend_from_slice(command);
        (guard, self.ctr(&args))
    }

    /// A guard that force-removes container `id` when dropped.
    pub fn guard(&self, id: &str) -> ContainerGuard<'_> {
        ContainerGuard {
            env: self,
            id: id.to_string(),
        }
    }

    /// Kills and removes task and container `id`, ignoring errors.
    pub fn force_remove(&self, id: &str) {
        let t = Duration::from_secs(30);
        if self.task_status(id).is_some() {
            self.ctr_with(&["tasks", "kill", "-a", "-s", "SIGKILL", id], None, t);
            cmd::wait_until(Duration::from_secs(10), || {
                self.task_status(id).as_deref() != Some("RUNNING")
            });
            self.ctr_with(&["tasks", "rm", "-f", id], None, t);
        }
        if self.containers().iter().any(|c| c == id) {
            self.ctr_with(&["containers", "rm", id], None, t);
        }
    }

    /// The STATUS column of `ctr tasks ls` for `id`.
    pub fn task_status(&self, id: &str) -> Option<String> {
        let out = self.ctr_with(&["tasks", "ls"], None, Duration::from_secs(30));
        out.stdout.lines().skip(1).find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.first() == Some(&id)).then(|| cols.last().unwrap_or(&"").to_string())
        })
    }

    /// Waits until task `id` has status `status`.
    pub fn wait_task_status(&self, id: &str, status: &str, timeout: Duration) -> bool {
        cmd::wait_until(timeout, || self.task_status(id).as_deref() == Some(status))
    }

    /// Container ids (`ctr containers ls -q`).
    pub fn containers(&self) -> Vec<String> {
        let out = self.ctr_with(&["containers", "ls", "-q"], None, Duration::from_secs(30));
        out.stdout.lines().map(str::to_string).collect()
    }

    /// Processes named `name` belonging to this environment.
    pub fn count(&self, name: &str) -> usize {
        procs::count(&self.dir, name)
    }

    /// QEMUs of this environment's sandboxes (VMs waiting in the pool
    /// are not counted: they belong to the running kuasar-vmm).
    pub fn qemu_count(&self) -> usize {
        let waiting = self.pooled_waiting();
        procs::find(&self.dir, &[procs::QEMU])
            .iter()
            .filter(|p| {
                !waiting
                    .iter()
                    .any(|n| p.cmdline.contains(&format!("kuasar-{n},")))
            })
            .count()
    }

    /// Names of the VMs waiting in kuasar-vmm's pool (`<state>/.pool/<name>`).
    pub fn pooled_waiting(&self) -> Vec<String> {
        fs::read_dir(self.state_dir().join(".pool"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// True when exactly `n` VMs wait in the pool, each with its agent
    /// ready (kuasar-vmm logged `pooled VM ready vm=<name>`).
    pub fn pool_full(&self, n: usize) -> bool {
        let log = self.sandboxer_log();
        let waiting = self.pooled_waiting();
        waiting.len() == n
            && waiting
                .iter()
                .all(|name| log.contains(&format!("pooled VM ready vm={name} ")))
    }

    /// The VMM pids of the VMs waiting in the pool.
    pub fn pooled_pids(&self) -> Vec<i32> {
        let pool = self.state_dir().join(".pool");
        self.pooled_waiting()
            .iter()
            .filter_map(|n| qemu_pid_in(&pool.join(n)))
            .collect()
    }

    /// The VMM pid of sandbox `id` (its `qemu.pid`), whether it booted its
    /// own VM or took a pooled one.
    pub fn vmm_pid(&self, id: &str) -> Option<i32> {
        qemu_pid_in(&self.state_dir().join(id))
    }

    pub fn shim_count(&self) -> usize {
        self.count(procs::SHIM)
    }

    pub fn sandboxer_count(&self) -> usize {
        self.count(procs::SANDBOXER)
    }

    /// Entries of the sandboxer's state dir (one per live sandbox; the
    /// pool's directory is not one).
    pub fn state_entries(&self) -> Vec<String> {
        fs::read_dir(self.state_dir())
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n != ".pool")
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits (bounded) until no QEMU, no shim and no sandbox state of this
    /// environment is left; panics with diagnostics otherwise.
    #[track_caller]
    pub fn assert_clean(&self) {
        let clean = cmd::wait_until(CLEANUP_TIMEOUT, || {
            self.qemu_count() == 0 && self.shim_count() == 0 && self.state_entries().is_empty()
        });
        assert!(
            clean,
            "left behind after {CLEANUP_TIMEOUT:?}: {} QEMU, {} shims, state entries {:?}\n{}",
            self.qemu_count(),
            self.shim_count(),
            self.state_entries(),
            self.diagnostics()
        );
    }

    /// The tail of the logs, for failure messages.
    pub fn diagnostics(&self) -> String {
        let tail = |p: PathBuf, n: usize| {
            let text = fs::read_to_string(&p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(n);
            format!(
                "--- {} (last {n} lines) ---\n{}",
                p.display(),
                lines[start..].join("\n")
            )
        };
        let procs: Vec<String> = procs::find(&self.dir, procs::ALL)
            .iter()
            .map(|p| format!("{} {}", p.pid, p.cmdline))
            .collect();
        // The guests' consoles (the agent logs each request there).
        let consoles: Vec<String> = fs::read_dir(self.dir.join("vmm"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| tail(e.path().join("console.log"), 15))
            .collect();
        format!(
            "{}\n{}\n{}\n--- processes of {} ---\n{}",
            tail(self.dir.join("kuasar-vmm.log"), 40),
            tail(self.dir.join("containerd.log"), 15),
            consoles.join("\n"),
            self.dir.display(),
            procs.join("\n")
        )
    }

    /// Stops everything and removes the directory. Idempotent.
    pub fn teardown(&self) {
        let mut done = lock(&self.torn_down);
        if *done {
            return;
        }
        *done = true;
        // Removes tasks and containers through containerd first, so that the
        // shims and the sandboxer stop their VMs the normal way.
        for id in self.containers() {
            self.force_remove(&id);
        }
        // With a pool, how its VMs served (a fallback to a cold boot is
        // correct but should be rare).
        let log = self.sandboxer_log();
        let taken = log.matches("pooled VM taken").count();
        let fallbacks = log.matches("could not take the pod").count();
        if taken + fallbacks > 0 {
            eprintln!(
                "kuasar-e2e: {taken} pods took a pooled VM, {fallbacks} fell back to a cold boot"
            );
        }
        self.stop_sandboxer();
        let out = script("containerd.sh", "stop", &self.dir);
        if !out.success() {
            eprintln!("kuasar-e2e: stopping containerd: {out}");
        }
        for line in procs::sweep(&self.dir) {
            eprintln!("kuasar-e2e: teardown of {}: {line}", self.dir.display());
        }
    }
}

/// The pid a VM's directory records (`qemu.pid`).
fn qemu_pid_in(dir: &Path) -> Option<i32> {
    fs::read_to_string(dir.join("qemu.pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok())
}

impl Drop for Env {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Force-removes a container when dropped (also when the test panics).
pub struct ContainerGuard<'a> {
    env: &'a Env,
    pub id: String,
}

impl Drop for ContainerGuard<'_> {
    fn drop(&mut self) {
        self.env.force_remove(&self.id);
    }
}

static SHARED: OnceLock<Result<Env, String>> = OnceLock::new();
static SERIAL: Mutex<()> = Mutex::new(());

/// The environment of this test binary, shared by its tests, which it runs
/// one at a time (they count VMs), torn down when the process exits.
pub struct Shared {
    env: &'static Env,
    _serial: MutexGuard<'static, ()>,
}

impl std::ops::Deref for Shared {
    type Target = Env;
    fn deref(&self) -> &Env {
        self.env
    }
}

extern "C" fn teardown_shared() {
    let _ = std::panic::catch_unwind(|| {
        if let Some(Ok(env)) = SHARED.get() {
            env.teardown();
        }
    });
}

/// The process-wide environment (started on first use with `opts`); holds
/// a lock so that tests using it never overlap. Panics, failing the test,
/// when it cannot be started (e.g. binaries or the guest image missing).
pub fn shared(opts: EnvOptions) -> Shared {
    let serial = lock(&SERIAL);
    let env = SHARED.get_or_init(|| {
        let env = Env::start(opts);
        // SAFETY: `teardown_shared` is a plain `extern "C" fn()` that never
        // unwinds (it catches panics); atexit only stores the pointer.
        if unsafe { libc::atexit(teardown_shared) } != 0 {
            eprintln!("kuasar-e2e: atexit failed; the environment may be left behind");
        }
        env
    });
    match env {
        Ok(env) => Shared {
            env,
            _serial: serial,
        },
        Err(e) => panic!("{e}"),
    }
}
