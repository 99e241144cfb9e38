//! The zero-shim mode (`kuasar-vmm-zero`: kuasar-vmm is containerd's sandbox
//! controller) across a containerd restart: the pod and its container are
//! found again through the controller's Status and the sandbox's task
//! socket, and still work. (The CRI suite covers the rest: cri.rs.) And
//! kuasar-vmm's check of the containerd release it serves, which warns of
//! the one that crashes in the `shim` mode.
use std::time::Duration;

use kuasar_api::containerd::cgroups::metrics::Metrics;
use kuasar_api::protobuf::Message;
use kuasar_api::sandbox::SandboxMetricsResponse;
use kuasar_api::services::SANDBOX;
use kuasar_e2e::cri::proto::{ContainerState, PodSandboxState};
use kuasar_e2e::cri::{spec, Cri};
use kuasar_e2e::wire::{self, code, Msg};
use kuasar_e2e::{cmd, paths, Env, EnvOptions, BUSYBOX};

const HANDLER: &str = "kuasar-vmm-zero";

#[test]
fn containerd_restart_finds_running_pods() {
    let env = Env::start(EnvOptions { sandboxer: true }).expect("start the environment");
    let cri = Cri::connect(&env.address()).expect("connect to CRI");
    let name = env.unique_id("restart");
    let log_dir = env.dir().join("pod-logs").join(&name);
    std::fs::create_dir_all(&log_dir).unwrap();
    let cfg = spec::pod(&name, &log_dir);
    let pod = cri.run_pod(&cfg, HANDLER).expect("RunPodSandbox");
    let c = spec::container("sleep", BUSYBOX, &["sleep", "3600"]);
    let cid = cri
        .create_container(&pod, &c, &cfg)
        .expect("CreateContainer");
    cri.start_container(&cid)
        .unwrap_or_else(|e| panic!("StartContainer: {e:?}\n{}", env.diagnostics()));
    assert_eq!(env.shim_count(), 0, "a shim runs in the zero-shim mode");
    check_metrics(&env, &pod);

    env.restart_containerd().expect("restart containerd");
    let cri = Cri::connect(&env.address()).expect("reconnect to CRI");
    let st = cri
        .pod_status(&pod)
        .expect("PodSandboxStatus after restart");
    assert_eq!(st.state, PodSandboxState::SandboxReady as i32, "{st:?}");
    let cs = cri
        .container_status(&cid)
        .expect("ContainerStatus after restart");
    assert_eq!(cs.state, ContainerState::ContainerRunning as i32, "{cs:?}");
    let r = cri
        .exec_sync(&cid, &["echo", "still here"], 30)
        .expect("ExecSync after restart");
    assert_eq!(String::from_utf8_lossy(&r.stdout), "still here\n");
    assert_eq!(env.shim_count(), 0);
    cri.stop_and_remove_pod(&pod)
        .expect("remove the pod after restart");
    assert_eq!(env.qemu_count(), 0, "the pod's VM outlived its removal");
}

/// The (major, minor) of the containerd the tests run.
fn containerd_release() -> (u32, u32, String) {
    let bin = std::env::var_os(paths::CONTAINERD_ENV).unwrap_or_else(|| "containerd".into());
    let out = std::process::Command::new(&bin)
        .arg("--version")
        .output()
        .expect("containerd --version");
    // "containerd github.com/containerd/containerd/v2 v2.1.9 <revision>"
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let version = text
        .split_whitespace()
        .nth(2)
        .unwrap_or_default()
        .to_owned();
    let mut parts = version.trim_start_matches('v').split(['.', '-', '+']);
    let mut next = || parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (next(), next(), version)
}

#[test]
fn sandboxer_names_the_containerd_release() {
    let env = Env::start(EnvOptions { sandboxer: true }).expect("start the environment");
    let (major, minor, version) = containerd_release();
    let seen = cmd::wait_until(Duration::from_secs(30), || {
        env.sandboxer_log().contains("containerd version")
            || env.sandboxer_log().contains("hostNetwork")
    });
    let log = env.sandboxer_log();
    assert!(seen, "kuasar-vmm did not name containerd's release:\n{log}");
    let warned = log
        .lines()
        .any(|l| l.contains("WARN") && l.contains("hostNetwork") && l.contains("shim"));
    if major == 2 && minor < 3 {
        assert!(
            warned,
            "containerd {version}: no warning about the shim mode:\n{log}"
        );
    } else {
        assert!(
            !warned,
            "containerd {version}: warned although it is safe:\n{log}"
        );
    }
    eprintln!(
        "containerd {version}: warning {}",
        if warned { "logged" } else { "not logged" }
    );
}

/// The pod's metrics as containerd 2.4's CRI reads them (cgroup v1
/// Metrics in the sandbox API's SandboxMetrics, the same as the
/// controller's Metrics): the VMM's CPU and memory, the guest's processes.
fn check_metrics(env: &Env, pod: &str) {
    let reply = wire::ttrpc_call(
        &env.vmm_socket(),
        SANDBOX,
        "SandboxMetrics",
        &Msg::new().string(1, pod),
        &[],
        Duration::from_secs(30),
    )
    .expect("SandboxMetrics");
    assert_eq!(reply.code, code::OK, "{reply:?}");
    let r = SandboxMetricsResponse::parse_from_bytes(&reply.payload).expect("a response");
    let data = &r.metrics.data;
    assert!(
        data.type_url.ends_with("io.containerd.cgroups.v1.Metrics"),
        "{}",
        data.type_url
    );
    let m = Metrics::parse_from_bytes(&data.value).expect("cgroup v1 metrics");
    assert!(m.cpu.usage.total > 0, "{m:?}");
    assert!(m.memory.usage.usage > 0, "{m:?}");
    // `sleep 3600` at least (the pod's init is not a container).
    assert!(m.pids.current >= 1, "{m:?}");
    eprintln!(
        "pod metrics: cpu {} ns, memory {} bytes, {} guest processes",
        m.cpu.usage.total, m.memory.usage.usage, m.pids.current
    );
}
