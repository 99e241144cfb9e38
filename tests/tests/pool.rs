//! Warm start (`[pool]`): pods take pre-booted VMs instead of booting one.
//! One kuasar-vmm with a pool of 2 serves every case, in order: a pod of
//! each sandbox mode takes a pooled VM and gets everything of its own (the
//! pod's MAC and IP on the guest NIC, its host name, its cgroup, the
//! default CPU priority); the pool refills; a pod too big for the pooled
//! VMs boots its own; after a crash of kuasar-vmm the pooled VMs of the
//! old run are gone and pods keep running; a graceful stop takes the
//! waiting VMs with it and leaves the pods' running.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kuasar_e2e::cri::proto::LinuxContainerResources;
use kuasar_e2e::cri::{spec, Cri, PodGuard};
use kuasar_e2e::{cmd, Env, EnvOptions, BUSYBOX};

const POOL: usize = 2;
const HANDLERS: &[&str] = &["kuasar-vmm", "kuasar-vmm-shim", "kuasar-vmm-zero"];
/// How long the pool may take to fill (each boot ~1-2 s under emulation).
const FILL_TIMEOUT: Duration = Duration::from_secs(90);

fn pool_env() -> Env {
    let env = Env::start(EnvOptions { sandboxer: false }).expect("start the environment");
    let mut config = env.sandboxer_config();
    config.pool_size = Some(POOL as u32);
    env.start_sandboxer(config).expect("start kuasar-vmm");
    env
}

/// Waits until `n` VMs wait in the pool, each with its agent ready.
#[track_caller]
fn wait_full(env: &Env, n: usize) -> Vec<String> {
    let full = cmd::wait_until(FILL_TIMEOUT, || env.pool_full(n));
    assert!(full, "the pool did not fill to {n}\n{}", env.diagnostics());
    env.pooled_waiting()
}

/// The line kuasar-vmm logged when sandbox `id` took a pooled VM.
fn taken_line(env: &Env, id: &str) -> Option<String> {
    env.sandboxer_log()
        .lines()
        .find(|l| l.contains("pooled VM taken") && l.contains(&format!("sandbox={id} ")))
        .map(str::to_owned)
}

/// Removes a pod's cgroup parent (and the test's top one) once the pod is
/// gone, whatever the test's outcome.
struct Parent(String);

impl Drop for Parent {
    fn drop(&mut self) {
        let top = self.0.rsplit_once('/').map_or("", |(t, _)| t).to_owned();
        for root in ["memory", "cpu", "cpuacct", "pids", ""] {
            let dir = format!("/sys/fs/cgroup/{root}{}", self.0);
            let _ = cmd::wait_until(Duration::from_secs(10), || {
                std::fs::remove_dir(&dir).is_ok() || !std::path::Path::new(&dir).exists()
            });
            // Gone once the last handler's parent is.
            let _ = std::fs::remove_dir(format!("/sys/fs/cgroup/{root}{top}"));
        }
    }
}

/// Whether process `pid` is gone within 10 s.
fn ends(pid: i32) -> bool {
    cmd::wait_until(Duration::from_secs(10), || {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    })
}

fn nice_of(pid: i32) -> i64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces): nice is the 19th
    // field of the line, the 17th after ") ".
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    rest.split(' ')
        .nth(16)
        .and_then(|n| n.parse().ok())
        .unwrap_or(i64::MIN)
}

/// The pod's network namespace, as kuasar-vmm recorded it.
fn pod_netns(env: &Env, id: &str) -> PathBuf {
    let text =
        std::fs::read_to_string(env.state_dir().join(id).join("state.json")).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    PathBuf::from(v["net"]["netns"].as_str().unwrap_or_default())
}

fn in_netns(netns: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(args)
        .output()
        .expect("run nsenter");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Runs `script` in container `c`; its trimmed stdout.
fn sh(cri: &Cri, c: &str, script: &str) -> String {
    let r = cri
        .exec_sync(c, &["sh", "-c", script], 20)
        .unwrap_or_else(|e| panic!("exec {script} in {c}: {e:?}"));
    String::from_utf8_lossy(&r.stdout).trim().to_owned()
}

/// The guest's eth0 has the pod's IP and MAC (read in the pod's netns over
/// netlink: /sys would show nsenter the host's), and reaches the gateway.
fn assert_pod_network(env: &Env, cri: &Cri, handler: &str, pod: &str, c: &str) {
    let ip = cri
        .pod_status(pod)
        .ok()
        .and_then(|s| s.network)
        .map(|n| n.ip)
        .unwrap_or_default();
    assert!(!ip.is_empty(), "{handler}: the pod has no IP");
    let addrs = sh(cri, c, "ip -o -4 addr show eth0");
    assert!(
        addrs.contains(&format!("{ip}/")),
        "{handler}: eth0 {addrs} lacks {ip}"
    );
    let netns = pod_netns(env, pod);
    let link = in_netns(&netns, &["ip", "-o", "link", "show", "eth0"]);
    let pod_mac = link
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    assert_eq!(
        sh(cri, c, "cat /sys/class/net/eth0/address"),
        pod_mac,
        "{handler}: guest MAC"
    );
    let gw = in_netns(&netns, &["ip", "-4", "route", "show", "default"]);
    if let Some(via) = gw.split_whitespace().skip_while(|w| *w != "via").nth(1) {
        let ping = sh(
            cri,
            c,
            &format!("ping -c 1 -W 5 {via} >/dev/null && echo ok"),
        );
        assert_eq!(ping, "ok", "{handler}: ping {via} from the pod");
    }
}

/// A pod of `handler` with a long-running container; checks that it took
/// a pooled VM and got everything of its own.
fn pod_takes_a_pooled_vm(env: &Env, cri: &Cri, handler: &str) {
    let waiting = wait_full(env, POOL);
    let name = env.unique_id("pool");
    let log_dir = env.dir().join("pod-logs").join(&name);
    std::fs::create_dir_all(&log_dir).unwrap();
    let mut cfg = spec::pod(&name, &log_dir);
    cfg.hostname = format!("{name}-host");
    let parent = format!("/kuasar-e2e-pool-{}/{handler}", std::process::id());
    cfg.linux.as_mut().unwrap().cgroup_parent = parent.clone();
    let _parent = Parent(parent.clone());
    let t0 = Instant::now();
    let pod = PodGuard::run(cri, cfg.clone(), handler)
        .unwrap_or_else(|e| panic!("{handler}: RunPodSandbox: {e:?}\n{}", env.diagnostics()));
    let c = cri
        .create_container(
            &pod.id,
            &spec::container("c", BUSYBOX, &["sleep", "1000"]),
            &cfg,
        )
        .unwrap_or_else(|e| panic!("{handler}: CreateContainer: {e:?}\n{}", env.diagnostics()));
    cri.start_container(&c)
        .unwrap_or_else(|e| panic!("{handler}: StartContainer: {e:?}\n{}", env.diagnostics()));
    eprintln!("{handler}: pod and container started in {:?}", t0.elapsed());
    let line = taken_line(env, &pod.id)
        .unwrap_or_else(|| panic!("{handler}: no pooled VM taken\n{}", env.diagnostics()));
    assert!(
        waiting.iter().any(|w| line.contains(&format!("vm={w} "))),
        "{handler}: took a VM that was not waiting ({waiting:?}): {line}"
    );
    assert_eq!(
        sh(cri, &c, "hostname"),
        cfg.hostname,
        "{handler}: host name"
    );
    assert_pod_network(env, cri, handler, &pod.id, &c);
    let pid = env.vmm_pid(&pod.id).expect("the pod's VMM pid");
    assert_eq!(
        nice_of(pid),
        0,
        "{handler}: the taken VM runs at normal priority"
    );
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    assert!(
        cgroup.contains(&format!("{parent}/kuasar-{}", pod.id)),
        "{handler}: QEMU not in the pod's cgroup: {cgroup}"
    );
    let _ = cri.stop_container(&c, 0);
    let _ = cri.remove_container(&c);
    drop(pod);
    // Every pooled VM waiting now is a fresh one, and the pool is full again.
    let refilled = wait_full(env, POOL);
    assert!(
        !line.contains(&format!("vm={} ", refilled[0]))
            && !line.contains(&format!("vm={} ", refilled[1])),
        "{handler}: a used VM went back to the pool: {line} / {refilled:?}"
    );
}

#[test]
fn pods_start_from_the_pool() {
    let env = pool_env();
    let cri = Cri::connect(&env.address()).expect("connect to CRI");
    for handler in HANDLERS {
        pod_takes_a_pooled_vm(&env, &cri, handler);
    }

    // Too big for the pooled VMs (256 MiB): a VM of its own.
    let name = env.unique_id("big");
    let log_dir = env.dir().join("pod-logs").join(&name);
    std::fs::create_dir_all(&log_dir).unwrap();
    let mut cfg = spec::pod(&name, &log_dir);
    cfg.linux.as_mut().unwrap().resources = Some(LinuxContainerResources {
        memory_limit_in_bytes: 512 << 20,
        ..Default::default()
    });
    let big = PodGuard::run(&cri, cfg, "kuasar-vmm-zero")
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e:?}\n{}", env.diagnostics()));
    assert!(
        taken_line(&env, &big.id).is_none(),
        "a 512 MiB pod took a pooled VM"
    );
    assert_eq!(env.pooled_waiting().len(), POOL, "the pool was not touched");

    crash_keeps_pods(&env, &cri, &big.id);
    graceful_stop(&env, &big.id);
    drop(big);
    env.assert_clean();
}

/// kill -9, then a new kuasar-vmm: the old pool's VMs are stopped, a new
/// pool fills, and the pods (`big`, and one on a pooled VM) are taken back.
fn crash_keeps_pods(env: &Env, cri: &Cri, big: &str) {
    // A crash: the next kuasar-vmm stops the old pool's VMs and takes the
    // pods back, one on a pooled VM among them.
    let name = env.unique_id("kept");
    let log_dir = env.dir().join("pod-logs").join(&name);
    std::fs::create_dir_all(&log_dir).unwrap();
    let cfg = spec::pod(&name, &log_dir);
    let kept = PodGuard::run(cri, cfg.clone(), "kuasar-vmm-zero")
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e:?}\n{}", env.diagnostics()));
    assert!(taken_line(env, &kept.id).is_some(), "no pooled VM taken");
    let c = cri
        .create_container(
            &kept.id,
            &spec::container("c", BUSYBOX, &["sleep", "1000"]),
            &cfg,
        )
        .and_then(|c| cri.start_container(&c).map(|()| c))
        .unwrap_or_else(|e| panic!("start a container: {e:?}\n{}", env.diagnostics()));
    let old = wait_full(env, POOL);
    let old_pids = env.pooled_pids();
    assert_eq!(old_pids.len(), POOL);
    env.restart_sandboxer(libc::SIGKILL, Duration::from_millis(200))
        .expect("restart kuasar-vmm");
    let new = wait_full(env, POOL);
    assert!(new.iter().all(|n| !old.contains(n)), "{old:?} -> {new:?}");
    for pid in old_pids {
        assert!(ends(pid), "the old pool's QEMU {pid} still runs");
    }
    for id in [big, &kept.id] {
        let ready = cri.pod_status(id).map(|s| s.state).unwrap_or(-1);
        assert_eq!(ready, 0, "pod {id} is not ready after the restart");
    }
    assert!(
        env.sandboxer_log()
            .contains(&format!("sandbox re-adopted sandbox={}", kept.id)),
        "the pod on a pooled VM was not adopted\n{}",
        env.diagnostics()
    );
    let out = cri
        .exec_sync(&c, &["echo", "still here"], 20)
        .unwrap_or_else(|e| panic!("exec after the restart: {e:?}\n{}", env.diagnostics()));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "still here");
    let _ = cri.stop_container(&c, 0);
    let _ = cri.remove_container(&c);
    drop(kept);
}

/// SIGTERM: the waiting VMs go, the VM of pod `big` stays; kuasar-vmm is
/// started again without a pool.
fn graceful_stop(env: &Env, big: &str) {
    // A graceful stop takes the waiting VMs along; the pod's VM stays.
    let waiting = env.pooled_pids();
    env.stop_sandboxer();
    for pid in waiting {
        assert!(ends(pid), "pooled QEMU {pid} outlived kuasar-vmm");
    }
    assert!(env
        .vmm_pid(big)
        .is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists()));
    let mut config = env.sandboxer_config();
    config.pool_size = Some(0);
    env.start_sandboxer(config).expect("start kuasar-vmm again");
}
