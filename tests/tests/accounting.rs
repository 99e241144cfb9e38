//! Each VM accounted in its pod's cgroup (issue 15, accounting): in every
//! sandbox mode, a pod whose PodSandboxConfig names a cgroup parent gets
//! its QEMU in `<parent>/kuasar-<sandbox id>` (every mounted controller),
//! limited to the VM's memory plus the VMM's overhead, and the cgroup goes
//! with the pod.
use std::path::{Path, PathBuf};
use std::time::Duration;

use kuasar_e2e::cri::{spec, Cri};
use kuasar_e2e::{cmd, procs, Env, EnvOptions};

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
