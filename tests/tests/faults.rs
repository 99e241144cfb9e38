//! Faults through CRI against the real containerd, kuasar-vmm and QEMU:
//!
//! - a pod's VMM killed (SIGKILL): its containers are reported exited within
//!   one second of the kill, the pod becomes NotReady, what its VM held on
//!   the host is released at once (QEMU, mounts, sockets, tap), the other
//!   pod is untouched, and the dead pod then stops and goes cleanly;
//! - a pod's shim killed (SIGKILL): containerd's cleanup (`shim delete`)
//!   stops the pod's VM and frees everything; the pod ends NotReady with its
//!   containers exited, RemovePodSandbox works and leaves nothing; the other
//!   pod is untouched;
//! - pod cycles: RunPodSandbox -> (a container on some cycles) ->
//!   StopPodSandbox -> RemovePodSandbox, 300 times (fewer, but at least 100,
//!   when they take longer than the time budget), leaves exactly what was
//!   there before (processes, mounts, netns, bridge ports, IPs, sockets and
//!   directories in the state dir, kuasar-vmm's fds and threads).
//!
//! The first two run once per VM handler: `kuasar-vmm` (CRI's podsandbox
//! mode: a pause container boots the VM) and `kuasar-vmm-shim` (the shim
//! serves containerd's sandbox API). Every pod is removed by a guard, also
//! when a test fails; the environment goes when the binary exits.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use kuasar_e2e::census::Census;
use kuasar_e2e::cri::proto::{ContainerState, ContainerStatus, PodSandboxConfig, PodSandboxState};
use kuasar_e2e::cri::{spec, Cri, PodGuard};
use kuasar_e2e::env::Shared;
use kuasar_e2e::{cmd, procs, shared, EnvOptions, BUSYBOX};

/// The bound: the tasks of a killed VM are reported exited within
/// one second of the kill.
const EXIT_REPORT_BOUND: Duration = Duration::from_secs(1);
/// How often CRI is polled while a fault is being reacted to.
const POLL: Duration = Duration::from_millis(50);
/// Bounds for what has no timing requirement (failure diagnostics only).
const SLOW: Duration = Duration::from_secs(30);
/// The tap kuasar-vmm creates in a pod's network namespace.
const TAP: &str = "tap0_kuasar";

static CRI: OnceLock<Cri> = OnceLock::new();

struct Fx {
    env: Shared,
    cri: &'static Cri,
    handler: &'static str,
}

/// The handlers that ran a warm-up cycle in this test binary.
static WARMED: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());

/// The shared environment and CRI client for `handler`; the first time a
/// handler is used, one pod cycle with a container runs first, so that what
/// kuasar-vmm makes once and keeps (its connections to containerd) is there
/// before a test takes its first census.
fn fixture(handler: &'static str) -> Fx {
    let env = shared(EnvOptions { sandboxer: true });
    let cri = CRI.get_or_init(|| Cri::connect(&env.address()).unwrap_or_else(|e| panic!("{e}")));
    let fx = Fx { env, cri, handler };
    let mut warmed = WARMED.lock().unwrap_or_else(|e| e.into_inner());
    if !warmed.contains(&handler) {
        pod_cycle(&fx, cri, 0, &mut Phases::default());
        warmed.push(handler);
    }
    drop(warmed);
    fx
}

/// A pod with one running `sleep` container.
struct Pod<'a> {
    guard: PodGuard<'a>,
    cid: String,
    netns: PathBuf,
}

impl Pod<'_> {
    fn id(&self) -> &str {
        &self.guard.id
    }
}

impl Fx {
    fn diag(&self) -> String {
        self.env.diagnostics()
    }

    fn pod_config(&self, what: &str) -> PodSandboxConfig {
        let name = format!("{}-{}", self.handler, self.env.unique_id(what));
        let log_dir = self.env.dir().join("pod-logs").join(&name);
        std::fs::create_dir_all(&log_dir).expect("create the pod log dir");
        spec::pod(&name, &log_dir)
    }

    /// Runs a pod with one container running `sleep 3600`.
    fn pod_with_sleeper(&self, what: &str) -> Pod<'static> {
        let guard = PodGuard::run(self.cri, self.pod_config(what), self.handler)
            .unwrap_or_else(|e| panic!("RunPodSandbox ({}): {e:?}\n{}", self.handler, self.diag()));
        let c = spec::container("sleeper", BUSYBOX, &["sleep", "3600"]);
        let cid = self
            .cri
            .create_container(&guard.id, &c, &guard.config)
            .unwrap_or_else(|e| panic!("CreateContainer: {e:?}\n{}", self.diag()));
        self.cri
            .start_container(&cid)
            .unwrap_or_else(|e| panic!("StartContainer: {e:?}\n{}", self.diag()));
        let netns = self.netns_of(&guard.id);
        assert_eq!(
            self.container_state(&cid),
            ContainerState::ContainerRunning as i32
        );
        Pod { guard, cid, netns }
    }

    fn container_status(&self, id: &str) -> ContainerStatus {
        self.cri
            .container_status(id)
            .unwrap_or_else(|e| panic!("ContainerStatus {id}: {e:?}\n{}", self.diag()))
    }

    fn container_state(&self, id: &str) -> i32 {
        self.container_status(id).state
    }

    fn pod_ready(&self, id: &str) -> bool {
        let s = self
            .cri
            .pod_status(id)
            .unwrap_or_else(|e| panic!("PodSandboxStatus {id}: {e:?}\n{}", self.diag()));
        s.state == PodSandboxState::SandboxReady as i32
    }

    /// The pod's network namespace: as containerd reports it (verbose
    /// PodSandboxStatus of the podsandbox mode: a path below containerd's
    /// state dir), else as kuasar-vmm logged it when it attached the pod's
    /// network (in the shim mode the verbose info is our controller's).
    fn netns_of(&self, pod: &str) -> PathBuf {
        let (_, info) = self
            .cri
            .pod_status_verbose(pod)
            .unwrap_or_else(|e| panic!("PodSandboxStatus {pod}: {e:?}"));
        let mut found = Vec::new();
        for v in info.values() {
            if let Ok(json) = serde_json::from_str::<serde_json::Value>(v) {
                strings_with(&json, "/netns/", &mut found);
            }
        }
        let log =
            std::fs::read_to_string(self.env.dir().join("kuasar-vmm.log")).unwrap_or_default();
        let sandbox = format!("sandbox={pod} ");
        found.extend(
            log.lines()
                .filter(|l| l.contains("pod network attached") && l.contains(&sandbox))
                .filter_map(|l| l.split("netns=").nth(1))
                .filter_map(|rest| rest.split_whitespace().next())
                .map(str::to_string),
        );
        found
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap_or_else(|| {
                panic!(
                    "no network namespace of pod {pod} in {info:?} or kuasar-vmm's log\n{}",
                    self.diag()
                )
            })
    }

    /// The QEMU of sandbox `id` (its `-name kuasar-<id>,...`).
    fn qemu_of(&self, id: &str) -> Option<procs::Proc> {
        let marker = format!("kuasar-{id},");
        procs::find(self.env.dir(), &[procs::QEMU])
            .into_iter()
            .find(|p| p.cmdline.contains(&marker))
    }

    /// The shim serving sandbox `id` (`-id <id>`).
    fn shim_of(&self, id: &str) -> Option<procs::Proc> {
        procs::find(self.env.dir(), &[procs::SHIM])
            .into_iter()
            .find(|p| {
                let args: Vec<&str> = p.cmdline.split(' ').collect();
                args.windows(2).any(|w| w[0] == "-id" && w[1] == id)
            })
    }

    /// What sandbox `id` still holds on the host: its QEMU, mounts and
    /// sockets below its state directory, the tap in its netns.
    fn held_by(&self, id: &str, netns: &Path) -> Vec<String> {
        let dir = self.env.state_dir().join(id);
        let mut held = Vec::new();
        if let Some(q) = self.qemu_of(id) {
            held.push(format!("QEMU pid {}", q.pid));
        }
        held.extend(
            procs::mounts_under(&dir)
                .into_iter()
                .map(|m| format!("mount {m}")),
        );
        // In the zero-shim mode `task.sock` is the sandbox's task API (what
        // the shim is in the other modes; `task.inner.sock` is its server
        // behind the relay): containerd still deletes the dead pod's tasks
        // through it; it goes with the sandbox (Shutdown), which
        // `assert_back_to` checks.
        let task_api = |s: &str| s.ends_with("/task.sock") || s.ends_with("/task.inner.sock");
        held.extend(
            sockets_below(&dir)
                .into_iter()
                .filter(|s| !(self.handler == "kuasar-vmm-zero" && task_api(s)))
                .map(|s| format!("socket {s}")),
        );
        if netns.exists() && links_in(netns).iter().any(|l| l == TAP) {
            held.push(format!("{TAP} in {}", netns.display()));
        }
        held
    }

    /// Checks that pod `p` is untouched by the other pod's fault: Ready,
    /// its container running, ExecSync works, its VM and tap still there.
    fn assert_untouched(&self, p: &Pod) {
        assert!(
            self.pod_ready(p.id()),
            "the other pod is not ready\n{}",
            self.diag()
        );
        assert_eq!(
            self.container_state(&p.cid),
            ContainerState::ContainerRunning as i32,
            "the other pod's container\n{}",
            self.diag()
        );
        let r = self
            .cri
            .exec_sync(&p.cid, &["echo", "still here"], 30)
            .unwrap_or_else(|e| panic!("ExecSync in the other pod: {e:?}\n{}", self.diag()));
        assert_eq!(r.exit_code, 0, "{r:?}");
        assert_eq!(String::from_utf8_lossy(&r.stdout), "still here\n");
        assert!(
            self.qemu_of(p.id()).is_some(),
            "the other pod's QEMU is gone"
        );
        assert!(
            links_in(&p.netns).iter().any(|l| l == TAP),
            "the other pod's tap is gone"
        );
    }

    /// Stops and removes the faulted pod through CRI, then checks that
    /// nothing of it is left (state directory, shim, QEMU, netns).
    fn remove_dead_pod(&self, p: Pod) {
        let id = p.id().to_string();
        self.cri
            .stop_pod(&id)
            .unwrap_or_else(|e| panic!("StopPodSandbox of the dead pod: {e:?}\n{}", self.diag()));
        self.cri
            .remove_pod(&id)
            .unwrap_or_else(|e| panic!("RemovePodSandbox of the dead pod: {e:?}\n{}", self.diag()));
        let dir = self.env.state_dir().join(&id);
        let gone = cmd::wait_until(SLOW, || {
            !dir.exists()
                && self.shim_of(&id).is_none()
                && self.qemu_of(&id).is_none()
                && !p.netns.exists()
        });
        assert!(
            gone,
            "after RemovePodSandbox: state dir exists {}, shim {:?}, QEMU {:?}, netns exists {}\n{}",
            dir.exists(),
            self.shim_of(&id),
            self.qemu_of(&id),
            p.netns.exists(),
            self.diag()
        );
        let _ = p.guard.remove();
    }

    /// Polls CRI every [`POLL`] until container `cid` is exited and pod
    /// `pod` NotReady; returns the container's status and how long after
    /// `since` each was first seen.
    fn wait_fault_seen(
        &self,
        cid: &str,
        pod: &str,
        since: Instant,
    ) -> (ContainerStatus, Duration, Duration) {
        let mut exited: Option<(ContainerStatus, Duration)> = None;
        let mut not_ready = None;
        let mut status_errors = 0;
        loop {
            if exited.is_none() {
                let s = self.container_status(cid);
                if s.state == ContainerState::ContainerExited as i32 {
                    exited = Some((s, since.elapsed()));
                }
            }
            if not_ready.is_none() {
                // In the shim mode containerd asks the pod's shim for the
                // status until it has processed the shim's death: a dead
                // shim's pod fails PodSandboxStatus (Unknown, "ttrpc:
                // closed") for a moment. Reported, not a failure.
                match self.cri.pod_status(pod) {
                    Ok(s) if s.state != PodSandboxState::SandboxReady as i32 => {
                        not_ready = Some(since.elapsed())
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if status_errors == 0 {
                            eprintln!(
                                "PodSandboxStatus {:?} after the fault: {e:?}",
                                since.elapsed()
                            );
                        }
                        status_errors += 1;
                    }
                }
            }
            if let (Some((s, e)), Some(n)) = (&exited, not_ready) {
                if status_errors > 0 {
                    eprintln!("PodSandboxStatus failed {status_errors} times meanwhile");
                }
                return (s.clone(), *e, n);
            }
            assert!(
                since.elapsed() < SLOW,
                "{SLOW:?} after the fault: container {cid} exited {:?}, pod {pod} NotReady \
                 after {not_ready:?}\n{}",
                exited.as_ref().map(|e| e.1),
                self.diag()
            );
            std::thread::sleep(POLL);
        }
    }

    /// Checks (waiting a bounded time) that the environment is back to the
    /// census `before`, kuasar-vmm's fds included.
    fn assert_back_to(&self, before: &Census) {
        let (after, took) = Census::settle(
            self.env.dir(),
            before,
            Census::diff_threads_may_shrink,
            SLOW,
        );
        eprintln!("{}: census before: {}", self.handler, before.summary());
        eprintln!("{}: census after:  {}", self.handler, after.summary());
        let diff = after.diff_threads_may_shrink(before);
        assert!(
            diff.is_empty(),
            "left behind after both pods were removed (waited {took:?}):\n{}\n{}",
            diff.join("\n"),
            self.diag()
        );
    }
}

/// Where containerd's and kuasar-vmm's logs ended at some point, to show
/// what they said about a fault.
struct LogMark {
    files: Vec<(PathBuf, u64)>,
}

impl LogMark {
    fn new(dir: &Path) -> Self {
        let files = ["containerd.log", "kuasar-vmm.log"]
            .iter()
            .map(|f| {
                let p = dir.join(f);
                let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                (p, len)
            })
            .collect();
        Self { files }
    }

    fn since(&self) -> String {
        let mut out = String::new();
        for (p, off) in &self.files {
            let text = std::fs::read(p).unwrap_or_default();
            let text = &text[(*off as usize).min(text.len())..];
            out.push_str(&format!(
                "--- {} since the fault ---\n{}",
                p.display(),
                String::from_utf8_lossy(text)
            ));
        }
        out
    }
}

/// String values anywhere in `v` that contain `needle`.
fn strings_with(v: &serde_json::Value, needle: &str, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) if s.contains(needle) => out.push(s.clone()),
        serde_json::Value::Array(a) => a.iter().for_each(|x| strings_with(x, needle, out)),
        serde_json::Value::Object(o) => o.values().for_each(|x| strings_with(x, needle, out)),
        _ => {}
    }
}

/// Names of the network interfaces in the namespace at `netns`.
fn links_in(netns: &Path) -> Vec<String> {
    let out = cmd::run(
        std::process::Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .args(["ip", "-o", "link", "show"]),
        None,
        Duration::from_secs(10),
    );
    // "2: eth0@if7: <...> ..." -> "eth0"
    out.stdout
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
        .collect()
}

fn sockets_below(dir: &Path) -> Vec<String> {
    use std::os::unix::fs::FileTypeExt;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_socket() => out.push(e.path().display().to_string()),
                Ok(t) if t.is_dir() => stack.push(e.path()),
                _ => {}
            }
        }
    }
    out
}

/// Point 2: a pod's VMM dies.
#[allow(clippy::too_many_lines)] // a test scenario, read top to bottom
fn vmm_killed(handler: &'static str) {
    let fx = fixture(handler);
    let before = Census::take(fx.env.dir());
    let victim = fx.pod_with_sleeper("vmm-dies");
    let other = fx.pod_with_sleeper("vmm-lives");
    for p in [&victim, &other] {
        assert!(
            links_in(&p.netns).iter().any(|l| l == TAP),
            "no {TAP} in {} of a running pod",
            p.netns.display()
        );
    }
    let qemu = fx
        .qemu_of(victim.id())
        .unwrap_or_else(|| panic!("no QEMU for {}\n{}", victim.id(), fx.diag()));
    // An ExecSync (no timeout) is running in the victim when its VM dies:
    // it must end, not wait for its `sleep 600`.
    let (exec_tx, exec_rx) = std::sync::mpsc::channel();
    {
        let address = fx.env.address();
        let cid = victim.cid.clone();
        std::thread::spawn(move || {
            let res = Cri::connect(&address)
                .map_err(|e| e.to_string())
                .and_then(|cri| {
                    cri.exec_sync(&cid, &["sleep", "600"], 0)
                        .map_err(|e| format!("{e:?}"))
                });
            let _ = exec_tx.send(res);
        });
    }
    // Until the exec's `sleep 600` runs (the container's processes are in
    // one pid namespace).
    assert!(
        cmd::wait_until(SLOW, || {
            fx.cri
                .exec_sync(&victim.cid, &["ps", "-o", "args"], 30)
                .map(|r| String::from_utf8_lossy(&r.stdout).contains("sleep 600"))
                .unwrap_or(false)
        }),
        "the ExecSync never ran in the guest\n{}",
        fx.diag()
    );

    let logs = LogMark::new(fx.env.dir());
    procs::signal(qemu.pid, libc::SIGKILL);
    let killed = Instant::now();
    let (status, exit_latency, not_ready_latency) =
        fx.wait_fault_seen(&victim.cid, victim.id(), killed);
    let released = cmd::wait_until(SLOW, || fx.held_by(victim.id(), &victim.netns).is_empty());
    let release_latency = killed.elapsed();
    let exec = exec_rx.recv_timeout(SLOW);
    let exec_latency = killed.elapsed();
    eprintln!(
        "{handler}: QEMU {} killed: container exited after {exit_latency:?} (exit code {}, \
         reason {:?}), pod NotReady after {not_ready_latency:?}, host resources released \
         after at most {release_latency:?}; the ExecSync in flight ended after at most \
         {exec_latency:?}: {:?}",
        qemu.pid,
        status.exit_code,
        status.reason,
        exec.as_ref().map(|r| r.as_ref().map(|r| r.exit_code))
    );
    assert!(
        exec.is_ok(),
        "an ExecSync into the killed VM still runs {SLOW:?} after the kill\n{}",
        fx.diag()
    );
    assert!(
        exit_latency <= EXIT_REPORT_BOUND,
        "the container of a killed VM was reported exited after {exit_latency:?} \
         (bound {EXIT_REPORT_BOUND:?})\n{}\n{}",
        logs.since(),
        fx.diag()
    );
    assert!(
        [137, 255].contains(&status.exit_code),
        "exit code of a container whose VM was killed: {status:?}"
    );
    assert!(
        released,
        "the killed VM's sandbox still holds {:?}\n{}",
        fx.held_by(victim.id(), &victim.netns),
        fx.diag()
    );
    assert!(!fx.pod_ready(victim.id()));

    fx.assert_untouched(&other);
    fx.remove_dead_pod(victim);
    fx.assert_untouched(&other);
    other.guard.remove().expect("remove the other pod");
    fx.assert_back_to(&before);
}

/// Point 3: a pod's shim dies.
fn shim_killed(handler: &'static str) {
    let fx = fixture(handler);
    let before = Census::take(fx.env.dir());
    let victim = fx.pod_with_sleeper("shim-dies");
    let other = fx.pod_with_sleeper("shim-lives");
    let shim = fx
        .shim_of(victim.id())
        .unwrap_or_else(|| panic!("no shim for {}\n{}", victim.id(), fx.diag()));
    let logs = LogMark::new(fx.env.dir());

    procs::signal(shim.pid, libc::SIGKILL);
    let killed = Instant::now();
    let (status, exit_latency, not_ready_latency) =
        fx.wait_fault_seen(&victim.cid, victim.id(), killed);
    let released = cmd::wait_until(SLOW, || fx.held_by(victim.id(), &victim.netns).is_empty());
    let release_latency = killed.elapsed();
    eprintln!(
        "{handler}: shim {} killed: container exited after {exit_latency:?} (exit code {}, \
         reason {:?}), pod NotReady after {not_ready_latency:?}, VM and host resources \
         released after at most {release_latency:?}\n{}",
        shim.pid,
        status.exit_code,
        status.reason,
        logs.since()
    );
    assert!(
        released,
        "the dead shim's sandbox still holds {:?}\n{}",
        fx.held_by(victim.id(), &victim.netns),
        fx.diag()
    );
    assert!(!fx.pod_ready(victim.id()));

    fx.assert_untouched(&other);
    fx.remove_dead_pod(victim);
    fx.assert_untouched(&other);
    other.guard.remove().expect("remove the other pod");
    fx.assert_back_to(&before);
}

macro_rules! handler_suite {
    ($module:ident, $handler:literal, $($test:ident),+) => {
        mod $module {
            $(
                #[test]
                fn $test() {
                    super::$test($handler);
                }
            )+
        }
    };
}

handler_suite!(kuasar_vmm, "kuasar-vmm", vmm_killed, shim_killed);
handler_suite!(kuasar_vmm_shim, "kuasar-vmm-shim", vmm_killed, shim_killed);
// The zero-shim mode has no shim to kill.
handler_suite!(kuasar_vmm_zero, "kuasar-vmm-zero", vmm_killed);

/// How many pod cycles (`KUASAR_FAULT_CYCLES`, default 300).
fn cycles() -> usize {
    env_number("KUASAR_FAULT_CYCLES").unwrap_or(300)
}

/// After how long no new cycle starts (`KUASAR_FAULT_BUDGET_SECS`, default
/// 600), once [`MIN_CYCLES`] have run: a slow or busy machine runs fewer
/// cycles rather than stretching the suite (300 took 30 min on a 2-core
/// machine busy with builds).
fn budget() -> Duration {
    Duration::from_secs(env_number("KUASAR_FAULT_BUDGET_SECS").unwrap_or(600) as u64)
}

/// The cycles that run whatever the budget.
const MIN_CYCLES: usize = 100;

/// How many cycles run at once (`KUASAR_FAULT_LANES`, default 2: a VM boot
/// under emulation keeps one core busy, the machines have two).
fn lanes() -> usize {
    env_number("KUASAR_FAULT_LANES").unwrap_or(2).max(1)
}

fn env_number(var: &str) -> Option<usize> {
    std::env::var(var).ok().and_then(|v| v.parse().ok())
}

/// Every how many cycles the pod also runs a container (and an ExecSync).
const CONTAINER_EVERY: usize = 5;

/// Time spent in RunPodSandbox, the container, StopPodSandbox and
/// RemovePodSandbox, summed over cycles.
type Phases = [Duration; 4];

/// One cycle: RunPodSandbox -> (a container and an ExecSync every
/// [`CONTAINER_EVERY`] cycles) -> StopPodSandbox -> RemovePodSandbox.
fn pod_cycle(fx: &Fx, cri: &Cri, i: usize, phases: &mut Phases) {
    let mut t = Instant::now();
    let mut lap = |phase: usize| {
        phases[phase] += t.elapsed();
        t = Instant::now();
    };
    let pod = PodGuard::run(cri, fx.pod_config("cycle"), fx.handler)
        .unwrap_or_else(|e| panic!("cycle {i}: RunPodSandbox: {e:?}\n{}", fx.diag()));
    lap(0);
    if i.is_multiple_of(CONTAINER_EVERY) {
        let c = spec::container("c", BUSYBOX, &["sleep", "3600"]);
        let cid = cri
            .create_container(&pod.id, &c, &pod.config)
            .unwrap_or_else(|e| panic!("cycle {i}: CreateContainer: {e:?}\n{}", fx.diag()));
        cri.start_container(&cid)
            .unwrap_or_else(|e| panic!("cycle {i}: StartContainer: {e:?}\n{}", fx.diag()));
        let r = cri
            .exec_sync(&cid, &["echo", "ok"], 30)
            .unwrap_or_else(|e| panic!("cycle {i}: ExecSync: {e:?}\n{}", fx.diag()));
        assert_eq!(String::from_utf8_lossy(&r.stdout), "ok\n", "cycle {i}");
    }
    lap(1);
    cri.stop_pod(&pod.id)
        .unwrap_or_else(|e| panic!("cycle {i}: StopPodSandbox: {e:?}\n{}", fx.diag()));
    lap(2);
    pod.remove()
        .unwrap_or_else(|e| panic!("cycle {i}: RemovePodSandbox: {e:?}\n{}", fx.diag()));
    lap(3);
}

/// Sets `failed` when dropped during a panic: the other lanes stop early.
struct StopOnPanic<'a>(&'a AtomicBool);

impl Drop for StopOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

/// Point 4: pod cycles leave nothing behind. The cycles run in
/// [`lanes`] threads at once, each with its own CRI connection.
#[test]
fn pod_cycles_leave_nothing() {
    let fx = fixture("kuasar-vmm");
    let n = cycles();
    let lanes = lanes();
    let budget = budget();

    // `fixture` ran a warm-up cycle (with a container) for the handler:
    // kuasar-vmm's connections to containerd exist from then on.
    // Blocking-pool threads linger 10 s after their last use.
    std::thread::sleep(Duration::from_secs(11));
    let before = Census::take(fx.env.dir());
    eprintln!("before: {}", before.summary());

    let next = AtomicUsize::new(1);
    let done = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let phases = Mutex::new(Phases::default());
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..lanes {
            scope.spawn(|| {
                let _stop = StopOnPanic(&failed);
                let cri = Cri::connect(&fx.env.address()).unwrap_or_else(|e| panic!("{e}"));
                while !failed.load(Ordering::SeqCst) {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i > n || (i > MIN_CYCLES && start.elapsed() > budget) {
                        break;
                    }
                    let mut mine = Phases::default();
                    pod_cycle(&fx, &cri, i, &mut mine);
                    let p = {
                        let mut p = phases.lock().unwrap_or_else(|e| e.into_inner());
                        for (a, b) in p.iter_mut().zip(mine) {
                            *a += b;
                        }
                        *p
                    };
                    let d = done.fetch_add(1, Ordering::SeqCst) + 1;
                    if d.is_multiple_of(50) || d == n {
                        eprintln!(
                            "{d}/{n} cycles after {:?} (summed over lanes: RunPodSandbox {:?}, \
                             containers {:?}, StopPodSandbox {:?}, RemovePodSandbox {:?}); \
                             census now (other lanes' pods included): {}",
                            start.elapsed(),
                            p[0],
                            p[1],
                            p[2],
                            p[3],
                            Census::take(fx.env.dir()).summary()
                        );
                    }
                }
            });
        }
    });
    let cycles_took = start.elapsed();
    let ran = done.load(Ordering::SeqCst);
    if ran < n {
        eprintln!("{ran} of {n} cycles ran: the time budget ({budget:?}) was spent");
    }
    let n = ran;
    let p = *phases.lock().unwrap_or_else(|e| e.into_inner());
    let (after, settled) = Census::settle(fx.env.dir(), &before, Census::diff, SLOW);
    eprintln!(
        "after {n} cycles in {lanes} lanes: {cycles_took:?} ({:?} per cycle; per phase, \
         summed over lanes: RunPodSandbox {:?}, containers {:?}, StopPodSandbox {:?}, \
         RemovePodSandbox {:?}); settled in {settled:?}: {}",
        cycles_took / n.max(1) as u32,
        p[0],
        p[1],
        p[2],
        p[3],
        after.summary()
    );
    let diff = after.diff(&before);
    assert!(
        diff.is_empty(),
        "{n} pod cycles left behind:\n{}\n{}",
        diff.join("\n"),
        fx.diag()
    );
}
