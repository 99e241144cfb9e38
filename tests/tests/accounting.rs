//! Each VM accounted in its pod's cgroup (issue 15, accounting): in every
//! sandbox mode, a pod whose PodSandboxConfig names a cgroup parent gets
//! its QEMU in `<parent>/kuasar-<sandbox id>` (every mounted controller),
//! limited to the VM's memory plus the VMM's overhead, and the cgroup goes
//! with the pod; a guest that drives its QEMU past that limit is stopped
//! there, alone, and its pod reported as a VM death.
use std::path::{Path, PathBuf};
use std::time::Duration;

use kuasar_e2e::cri::proto::PodSandboxState;
use kuasar_e2e::cri::{spec, Cri, PodGuard};
use kuasar_e2e::{cmd, procs, Env, EnvOptions, BUSYBOX};

const HANDLERS: &[&str] = &["kuasar-vmm", "kuasar-vmm-shim", "kuasar-vmm-zero"];
/// kuasar-vmm's default `[vm] memory_mib` and `vmm_overhead_mib`.
const VM_MIB: u64 = 256;
const OVERHEAD_MIB: u64 = 128;

/// Where the memory controller's hierarchy is (v1), or the unified one (v2).
fn memory_root() -> PathBuf {
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    if v2 {
        PathBuf::from("/sys/fs/cgroup")
    } else {
        PathBuf::from("/sys/fs/cgroup/memory")
    }
}

fn qemu_of(env: &Env, id: &str) -> procs::Proc {
    let pid = env.vmm_pid(id);
    procs::find(env.dir(), &[procs::QEMU])
        .into_iter()
        .find(|p| Some(p.pid) == pid)
        .unwrap_or_else(|| panic!("no QEMU for sandbox {id}\n{}", env.diagnostics()))
}

/// The memory cgroup of process `pid` (v1 `memory` line, or v2 `0::`).
fn memory_cgroup(pid: i32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    text.lines()
        .find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let memory = controllers.split(',').any(|c| c == "memory") || controllers.is_empty();
            memory.then(|| path.to_owned())
        })
        .unwrap_or_default()
}

/// Removes the test's parent cgroups (empty once the pods are gone).
struct Parents(Vec<PathBuf>);

impl Drop for Parents {
    fn drop(&mut self) {
        for rel in self.0.iter().rev() {
            for root in ["memory", "cpu", "cpuacct", "pids", ""] {
                let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(root).join(rel));
            }
        }
    }
}

#[test]
fn vmm_runs_in_the_pods_cgroup() {
    let env = Env::start(EnvOptions { sandboxer: true }).expect("start the environment");
    let cri = Cri::connect(&env.address()).expect("connect to CRI");
    let top = PathBuf::from(format!("kuasar-e2e-{}", std::process::id()));
    let mut parents = Parents(vec![top.clone()]);
    for handler in HANDLERS {
        let name = env.unique_id("acct");
        let log_dir = env.dir().join("pod-logs").join(&name);
        std::fs::create_dir_all(&log_dir).unwrap();
        let parent = top.join(format!("pod-{handler}"));
        parents.0.push(parent.clone());
        let mut cfg = spec::pod(&name, &log_dir);
        cfg.linux.as_mut().unwrap().cgroup_parent = format!("/{}", parent.display());
        let pod = cri
            .run_pod(&cfg, handler)
            .unwrap_or_else(|e| panic!("{handler}: RunPodSandbox: {e:?}\n{}", env.diagnostics()));
        // The podsandbox mode boots the VM with the pod's first container
        // (the pause container, already started); the others at start.
        let qemu = qemu_of(&env, &pod);
        let cgroup = memory_cgroup(qemu.pid);
        let want = format!("/{}/kuasar-{pod}", parent.display());
        assert_eq!(cgroup, want, "{handler}: QEMU's memory cgroup");
        let dir = memory_root().join(want.trim_start_matches('/'));
        let limit_file = ["memory.limit_in_bytes", "memory.max"]
            .iter()
            .map(|f| dir.join(f))
            .find(|f| f.exists())
            .expect("a memory limit file");
        let limit: u64 = std::fs::read_to_string(&limit_file)
            .unwrap()
            .trim()
            .parse()
            .expect("a number");
        assert_eq!(
            limit,
            (VM_MIB + OVERHEAD_MIB) << 20,
            "{handler}: {}",
            limit_file.display()
        );
        eprintln!(
            "{handler}: QEMU pid {} in {cgroup}, memory limit {} MiB",
            qemu.pid,
            limit >> 20
        );
        // CRI's pod stats (`crictl statsp`) read the pod's cgroup: the VM
        // is in it now.
        match cri.pod_stats(&pod) {
            Ok(st) => {
                let linux = st.linux.unwrap_or_default();
                let memory = linux
                    .memory
                    .and_then(|m| m.working_set_bytes)
                    .map_or(0, |v| v.value);
                let cpu = linux
                    .cpu
                    .and_then(|c| c.usage_core_nano_seconds)
                    .map_or(0, |v| v.value);
                eprintln!(
                    "{handler}: PodSandboxStats: memory working set {memory} B, cpu {cpu} ns"
                );
                assert!(memory > 1 << 20, "{handler}: pod memory {memory}");
                assert!(cpu > 0, "{handler}: pod cpu {cpu}");
            }
            Err(e) => panic!("{handler}: PodSandboxStats: {e:?}"),
        }
        cri.stop_and_remove_pod(&pod)
            .unwrap_or_else(|e| panic!("{handler}: remove the pod: {e:?}"));
        assert!(
            cmd::wait_until(Duration::from_secs(10), || !dir.exists()),
            "{handler}: {} outlived its pod",
            dir.display()
        );
    }
    drop(parents);
    env.assert_clean();
}

/// With `vmm_overhead_mib = 8` a 256 MiB guest that fills its memory takes
/// QEMU past its cgroup's limit (VM + 8 MiB): the kernel's OOM killer
/// stops that QEMU inside that cgroup; kuasar-vmm reports the VM's death
/// (the pod not ready, its container exited), and another pod and
/// kuasar-vmm itself go on.
#[test]
fn a_vm_past_its_cgroup_limit_dies_alone() {
    let env = Env::start(EnvOptions { sandboxer: false }).expect("start the environment");
    let mut config = env.sandboxer_config();
    config.vmm_overhead_mib = Some(8);
    config.pool_size = None;
    env.start_sandboxer(config).expect("start kuasar-vmm");
    let cri = Cri::connect(&env.address()).expect("connect to CRI");
    let top = PathBuf::from(format!("kuasar-e2e-oom-{}", std::process::id()));
    let mut parents = Parents(vec![top.clone()]);
    let pod = |what: &str| {
        let name = env.unique_id(what);
        let log_dir = env.dir().join("pod-logs").join(&name);
        std::fs::create_dir_all(&log_dir).unwrap();
        let mut cfg = spec::pod(&name, &log_dir);
        let parent = top.join(&name);
        cfg.linux.as_mut().unwrap().cgroup_parent = format!("/{}", parent.display());
        (cfg, parent)
    };
    let (by_cfg, parent) = pod("bystander");
    parents.0.push(parent);
    let bystander = PodGuard::run(&cri, by_cfg.clone(), "kuasar-vmm-zero")
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e:?}\n{}", env.diagnostics()));
    let sleeper = start(&cri, &env, &bystander.id, &by_cfg, &["sleep", "1000"]);
    let sandboxer = env.sandboxer_pid();
    for handler in HANDLERS {
        let (cfg, parent) = pod("oom");
        parents.0.push(parent);
        let victim = PodGuard::run(&cri, cfg.clone(), handler)
            .unwrap_or_else(|e| panic!("{handler}: RunPodSandbox: {e:?}\n{}", env.diagnostics()));
        // busybox tail keeps what it reads from /dev/zero, looking for a
        // line end: the guest's memory fills as fast as it copies.
        let hog = start(
            &cri,
            &env,
            &victim.id,
            &cfg,
            &["sh", "-c", "exec tail /dev/zero"],
        );
        assert_vm_died(&env, &cri, handler, &victim.id, &hog);
        // The bystander and kuasar-vmm go on.
        let out = cri
            .exec_sync(&sleeper, &["echo", "alive"], 20)
            .unwrap_or_else(|e| panic!("{handler}: bystander exec: {e:?}\n{}", env.diagnostics()));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "alive");
        assert_eq!(env.sandboxer_pid(), sandboxer, "kuasar-vmm restarted");
        let _ = cri.remove_container(&hog);
        drop(victim);
    }
    let _ = cri.stop_container(&sleeper, 0);
    let _ = cri.remove_container(&sleeper);
    drop(bystander);
    // The cgroups go once their QEMUs are gone.
    std::thread::sleep(Duration::from_secs(1));
    drop(parents);
    env.assert_clean();
}

/// Creates and starts a busybox container running `command` in `pod`.
fn start(
    cri: &Cri,
    env: &Env,
    pod: &str,
    cfg: &kuasar_e2e::cri::proto::PodSandboxConfig,
    command: &[&str],
) -> String {
    cri.create_container(pod, &spec::container("c", BUSYBOX, command), cfg)
        .and_then(|c| cri.start_container(&c).map(|()| c))
        .unwrap_or_else(|e| panic!("start {command:?}: {e:?}\n{}", env.diagnostics()))
}

/// Pod `victim`'s VM was killed (SIGKILL, by the OOM killer): kuasar-vmm
/// reported it, the container `hog` is exited and the pod not ready.
fn assert_vm_died(env: &Env, cri: &Cri, handler: &str, victim: &str, hog: &str) {
    let died = format!("sandbox={} ", victim);
    let reported = cmd::wait_until(Duration::from_secs(120), || {
        env.sandboxer_log()
            .lines()
            .any(|l| l.contains("the VM exited unexpectedly") && l.contains(&died))
    });
    assert!(
        reported,
        "{handler}: no VM death reported\n{}",
        env.diagnostics()
    );
    let line = env
        .sandboxer_log()
        .lines()
        .find(|l| l.contains("the VM exited unexpectedly") && l.contains(&died))
        .unwrap_or_default()
        .to_owned();
    assert!(line.contains("Signal(9)"), "{handler}: not killed: {line}");
    eprintln!("{handler}: {line}");
    let exited = cmd::wait_until(Duration::from_secs(30), || {
        cri.container_status(hog).is_ok_and(|s| {
            s.state == kuasar_e2e::cri::proto::ContainerState::ContainerExited as i32
        })
    });
    assert!(exited, "{handler}: the hog is not reported exited");
    let not_ready = cmd::wait_until(Duration::from_secs(30), || {
        cri.pod_status(victim)
            .is_ok_and(|s| s.state == PodSandboxState::SandboxNotready as i32)
    });
    assert!(
        not_ready,
        "{handler}: the pod of a dead VM is still ready\n{}",
        env.diagnostics()
    );
}
