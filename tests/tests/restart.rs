//! The sandboxer restarts under running pods (issue 5, point 1): kuasar-vmm
//! is killed (SIGKILL, a crash) and later stopped cleanly (SIGTERM) while 5
//! pods run a container that prints a numbered line every second. Each time
//! it comes back, every pod is still Ready, every container still running
//! (containerd saw no exit), each log goes on without a missing number
//! (lines written while kuasar-vmm was down included), ExecSync works, and
//! the pods stop and go away cleanly afterwards.
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use kuasar_e2e::cri::logs::{self, LogStream};
use kuasar_e2e::cri::proto::{ContainerState, PodSandboxState};
use kuasar_e2e::cri::{spec, Code, Cri, PodGuard};
use kuasar_e2e::{cmd, Env, EnvOptions, BUSYBOX};

const PODS: usize = 5;
/// How long kuasar-vmm stays down: the containers write lines meanwhile.
const DOWN: Duration = Duration::from_secs(3);
const LINE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long containerd may take to reconnect to the restarted sandboxer.
const RECONNECT: Duration = Duration::from_secs(30);

struct Pod<'a> {
    guard: PodGuard<'a>,
    container: String,
    log: PathBuf,
}

/// The numbers the container printed so far, in log order.
fn numbers(pod: &Pod) -> Vec<u64> {
    let entries = logs::read(&pod.log).unwrap_or_default();
    logs::lines(&entries, LogStream::Stdout)
        .iter()
        .filter_map(|l| l.strip_prefix("line ")?.trim().parse().ok())
        .collect()
}

/// Asserts that the log holds every number from 0 to its highest, and
/// returns the highest. (A number may appear twice: a chunk read from the
/// guest just before the crash can be delivered again; none may be lost.)
fn check_contiguous(pod: &Pod, what: &str) -> u64 {
    let seen = numbers(pod);
    let max = seen.iter().copied().max().unwrap_or(0);
    let set: BTreeSet<u64> = seen.iter().copied().collect();
    let missing: Vec<u64> = (0..=max).filter(|n| !set.contains(n)).collect();
    assert!(
        missing.is_empty(),
        "{what}: lines {missing:?} of pod {} are missing from its log: {seen:?}",
        pod.guard.id
    );
    max
}

/// Waits until the log of `pod` reaches line `n`.
fn wait_line(env: &Env, pod: &Pod, n: u64) {
    let found = cmd::wait_until(LINE_TIMEOUT, || numbers(pod).contains(&n));
    assert!(
        found,
        "pod {}: line {n} never reached the log: {:?}\n{}",
        pod.guard.id,
        numbers(pod),
        env.diagnostics()
    );
}

fn check_alive(cri: &Cri, pods: &[Pod], what: &str) {
    for pod in pods {
        // containerd's gRPC client of the sandbox controller (zero-shim
        // mode) reconnects with a back-off: Unavailable until it has.
        let mut status = cri.pod_status(&pod.guard.id);
        cmd::wait_until(RECONNECT, || {
            status = cri.pod_status(&pod.guard.id);
            !matches!(&status, Err(e) if e.code() == Code::Unavailable)
        });
        let st = status.unwrap_or_else(|e| panic!("{what}: PodSandboxStatus: {e:?}"));
        assert_eq!(
            st.state,
            PodSandboxState::SandboxReady as i32,
            "{what}: pod {} not ready: {st:?}",
            pod.guard.id
        );
        let cs = cri
            .container_status(&pod.container)
            .unwrap_or_else(|e| panic!("{what}: ContainerStatus: {e:?}"));
        assert_eq!(
            cs.state,
            ContainerState::ContainerRunning as i32,
            "{what}: container of pod {} not running: {cs:?}",
            pod.guard.id
        );
        assert_eq!(cs.finished_at, 0, "{what}: an exit was recorded: {cs:?}");
        let r = cri
            .exec_sync(&pod.container, &["echo", "exec works"], 30)
            .unwrap_or_else(|e| panic!("{what}: ExecSync in pod {}: {e:?}", pod.guard.id));
        assert_eq!(String::from_utf8_lossy(&r.stdout), "exec works\n", "{what}");
    }
}

/// Restarts kuasar-vmm with `signal` under the running pods and checks that
/// nothing was lost.
fn restart_and_check(env: &Env, cri: &Cri, pods: &[Pod], signal: i32, what: &str) {
    restart_and_check_with(env, cri, pods, signal, what, || {})
}

fn restart_and_check_with(
    env: &Env,
    cri: &Cri,
    pods: &[Pod],
    signal: i32,
    what: &str,
    meanwhile: impl FnOnce(),
) {
    let before: Vec<u64> = pods.iter().map(|p| check_contiguous(p, what)).collect();
    let old_pid = env.sandboxer_pid();
    env.restart_sandboxer_with(signal, DOWN, meanwhile)
        .unwrap_or_else(|e| panic!("{what}: {e}\n{}", env.diagnostics()));
    // Ready is reported only once recovery is done.
    let log = env.sandboxer_log();
    let run = &log[log.rfind("host probed").unwrap_or(0)..];
    let (recovered, ready) = (run.find("recovery done"), run.find("kuasar-vmm ready"));
    assert!(
        recovered.is_some() && recovered < ready,
        "{what}: not recovered before ready:\n{run}"
    );
    assert_ne!(env.sandboxer_pid(), old_pid);
    let vms = cmd::wait_until(Duration::from_secs(10), || env.qemu_count() == pods.len());
    assert!(
        vms,
        "{what}: {} VMs for {} pods",
        env.qemu_count(),
        pods.len()
    );
    check_alive(cri, pods, what);
    // The lines printed while kuasar-vmm was down, and later ones, arrive.
    for (pod, before) in pods.iter().zip(before) {
        wait_line(env, pod, before + DOWN.as_secs() + 2);
        let max = check_contiguous(pod, what);
        eprintln!(
            "{what}: pod {}: line {before} before, {max} now, none missing",
            pod.guard.id
        );
    }
}

fn start_pods<'a>(env: &Env, cri: &'a Cri, handler: &str, count: usize) -> Vec<Pod<'a>> {
    let mut pods = Vec::new();
    for i in 0..count {
        let name = env.unique_id(&format!("restart{i}"));
        let log_dir = env.dir().join("pod-logs").join(&name);
        std::fs::create_dir_all(&log_dir).unwrap();
        let cfg = spec::pod(&name, &log_dir);
        let guard = PodGuard::run(cri, cfg.clone(), handler)
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e:?}\n{}", env.diagnostics()));
        let c = spec::container(
            "ticker",
            BUSYBOX,
            &[
                "sh",
                "-c",
                "i=0; while true; do echo line $i; i=$((i+1)); sleep 1; done",
            ],
        );
        let container = cri
            .create_container(&guard.id, &c, &cfg)
            .expect("CreateContainer");
        cri.start_container(&container).expect("StartContainer");
        let log = log_dir.join(&c.log_path);
        pods.push(Pod {
            guard,
            container,
            log,
        });
    }
    for pod in &pods {
        wait_line(env, pod, 2);
    }
    pods
}

fn remove_all(env: &Env, pods: Vec<Pod>) {
    for pod in pods {
        pod.guard
            .remove()
            .unwrap_or_else(|e| panic!("remove the pod after the restarts: {e:?}"));
    }
    assert!(
        cmd::wait_until(Duration::from_secs(30), || env.qemu_count() == 0),
        "VMs outlived their pods:\n{}",
        env.diagnostics()
    );
    env.assert_clean();
}

/// The scenario on the default handler (`podsandbox` mode), then a
/// corrupted state file: that sandbox alone is reported and cleaned.
#[test]
fn sandboxer_restarts_under_running_pods() {
    let env = Env::start(EnvOptions { sandboxer: true }).expect("start the environment");
    let cri = Cri::connect(&env.address()).expect("connect to CRI");
    let mut pods = start_pods(&env, &cri, "kuasar-vmm", PODS);

    restart_and_check(&env, &cri, &pods, libc::SIGKILL, "after kill -9");
    restart_and_check(&env, &cri, &pods, libc::SIGTERM, "after SIGTERM");

    // One sandbox's state is garbage at the next start, and another one's
    // VM dies while kuasar-vmm is down.
    let broken = pods.pop().expect("a pod");
    let dead = pods.pop().expect("a pod");
    let broken_dir = env.state_dir().join(&broken.guard.id);
    let dead_dir = env.state_dir().join(&dead.guard.id);
    std::fs::write(
        broken_dir.join("state.json"),
        b"{\"version\": 2, \"id\": [garbage",
    )
    .expect("corrupt the state file");
    let dead_vmm: i32 = std::fs::read_to_string(dead_dir.join("qemu.pid"))
        .expect("qemu.pid")
        .trim()
        .parse()
        .expect("a pid");
    restart_and_check_with(
        &env,
        &cri,
        &pods,
        libc::SIGKILL,
        "after a corrupted state and a dead VM",
        || {
            // SAFETY: kill(2) with a pid and a signal touches no memory.
            unsafe { libc::kill(dead_vmm, libc::SIGKILL) };
        },
    );
    let log = env.sandboxer_log();
    assert!(
        log.contains("unreadable sandbox state") && log.contains(&broken.guard.id),
        "the broken sandbox was not reported:\n{log}"
    );
    for (pod, dir) in [(&broken, &broken_dir), (&dead, &dead_dir)] {
        assert!(
            cmd::wait_until(Duration::from_secs(10), || !dir.exists()),
            "the directory of {} is left",
            pod.guard.id
        );
        // containerd learns that its container is gone; the pod can go.
        let exited = cmd::wait_until(Duration::from_secs(30), || {
            cri.container_status(&pod.container)
                .map(|s| s.state == ContainerState::ContainerExited as i32)
                .unwrap_or(false)
        });
        assert!(
            exited,
            "the container of {} is not reported exited",
            pod.guard.id
        );
    }
    pods.push(dead);
    pods.push(broken);
    remove_all(&env, pods);
}

/// The same crash under the `shim` sandbox mode (containerd's sandbox API
/// through the shim).
#[test]
fn sandboxer_crash_under_shim_mode_pods() {
    let env = Env::start(EnvOptions { sandboxer: true }).expect("start the environment");
    let cri = Cri::connect(&env.address()).expect("connect to CRI");
    let pods = start_pods(&env, &cri, "kuasar-vmm-shim", 2);
    restart_and_check(
        &env,
        &cri,
        &pods,
        libc::SIGKILL,
        "kuasar-vmm-shim: after kill -9",
    );
    remove_all(&env, pods);
}

/// The zero-shim mode, where containerd holds the task API connection to
/// kuasar-vmm itself: the VMMs hold those connections across the crash
/// (and a clean restart), and the `Wait` containerd had in flight for each
/// container is answered by the next kuasar-vmm, so containerd records no
/// exit.
#[test]
fn sandboxer_crash_under_zero_shim_pods() {
    let env = Env::start(EnvOptions { sandboxer: true }).expect("start the environment");
    let cri = Cri::connect(&env.address()).expect("connect to CRI");
    let pods = start_pods(&env, &cri, "kuasar-vmm-zero", PODS);
    restart_and_check(
        &env,
        &cri,
        &pods,
        libc::SIGKILL,
        "kuasar-vmm-zero: after kill -9",
    );
    restart_and_check(
        &env,
        &cri,
        &pods,
        libc::SIGTERM,
        "kuasar-vmm-zero: after SIGTERM",
    );
    // The Wait answered after the restarts still reports a real exit.
    let pod = &pods[0];
    cri.stop_container(&pod.container, 0)
        .expect("StopContainer after the restarts");
    let cs = cri
        .container_status(&pod.container)
        .expect("ContainerStatus");
    assert_eq!(cs.state, ContainerState::ContainerExited as i32, "{cs:?}");
    assert_ne!(cs.finished_at, 0, "{cs:?}");
    remove_all(&env, pods);
}
