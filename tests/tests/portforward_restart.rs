//! Port forwarding across kuasar-vmm's life: a restarted kuasar-vmm takes the
//! pod back and sets its relay up again (a new listener, one redirect, not
//! two), and a VM that dies takes its relay and redirect with it while the
//! pod (and its network namespace) is still there.
use std::time::Duration;

use kuasar_e2e::cri::proto::{ContainerState, PodSandboxState};
use kuasar_e2e::cri::{spec, Cri, PodGuard, PortForwardSession};
use kuasar_e2e::netns::{in_netns, recorded_netns, relay_socket, PORTFORWARD_CHAIN as CHAIN};
use kuasar_e2e::{cmd, Env, EnvOptions, BUSYBOX};

const ECHO_PORT: i32 = 18080;
const TIMEOUT: Duration = Duration::from_secs(30);

/// Echoes `what` through PortForward; panics when it does not come back.
fn echo(env: &Env, cri: &Cri, pod_id: &str, what: &str) {
    let url = cri
        .port_forward(pod_id, &[ECHO_PORT])
        .unwrap_or_else(|e| panic!("{what}: PortForward: {e:?}\n{}", env.diagnostics()));
    let mut s = PortForwardSession::open(&url, TIMEOUT).expect("open the session");
    let sent = format!("echo {what}\n").into_bytes();
    s.send(&sent).expect("send");
    let got = s
        .read_until(TIMEOUT, |f| f.data.len() >= sent.len())
        .unwrap_or_else(|e| panic!("{what}: {e}\n{}", env.diagnostics()))
        .clone();
    assert_eq!(got.data, sent, "{what}: {got:?}");
    s.close();
}

fn count(text: &str, needle: &str) -> usize {
    text.lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn relay_is_set_up_again_after_a_restart_and_goes_with_the_vm() {
    let env = Env::start(EnvOptions { sandboxer: true }).expect("start the environment");
    let cri = Cri::connect(&env.address()).expect("connect to CRI");
    let name = env.unique_id("pf-restart");
    let log_dir = env.dir().join("pod-logs").join(&name);
    std::fs::create_dir_all(&log_dir).unwrap();
    let cfg = spec::pod(&name, &log_dir);
    let pod = PodGuard::run(&cri, cfg.clone(), "kuasar-vmm")
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e:?}\n{}", env.diagnostics()));
    let c = spec::container("echo", BUSYBOX, &["nc", "-ll", "-p", "18080", "-e", "cat"]);
    let cid = cri
        .create_container(&pod.id, &c, &cfg)
        .expect("CreateContainer");
    cri.start_container(&cid).expect("StartContainer");
    let running = cmd::wait_until(TIMEOUT, || {
        cri.container_status(&cid)
            .is_ok_and(|s| s.state == ContainerState::ContainerRunning as i32)
    });
    assert!(
        running,
        "the echo server does not run\n{}",
        env.diagnostics()
    );
    let wait = "for i in $(seq 200); do cat /proc/net/tcp /proc/net/tcp6 | \
         grep -qiE ':46A0 [0-9A-F]+:0000 0A' && exit 0; sleep 0.1; done; exit 1";
    let listening = cri
        .exec_sync(&cid, &["sh", "-c", wait], 60)
        .expect("ExecSync");
    assert_eq!(listening.exit_code, 0, "the echo server does not listen");
    echo(&env, &cri, &pod.id, "before the restart");
    let netns = recorded_netns(&env.state_dir(), &pod.id);
    let before = relay_socket(&netns).expect("a relay before the restart");

    env.restart_sandboxer(libc::SIGKILL, Duration::from_secs(1))
        .unwrap_or_else(|e| panic!("restart kuasar-vmm: {e}\n{}", env.diagnostics()));
    echo(&env, &cri, &pod.id, "after the restart");
    let after = relay_socket(&netns).expect("a relay after the restart");
    assert_ne!(before, after, "the relay was not set up again");
    let rules = in_netns(&netns, "iptables", &["-t", "nat", "-S"]);
    assert_eq!(
        count(&rules, &format!("-A OUTPUT -j {CHAIN}")),
        1,
        "{rules}"
    );
    assert_eq!(count(&rules, "REDIRECT"), 1, "{rules}");
    eprintln!("port-forward after a kuasar-vmm restart: relay {before} -> {after}, one redirect");

    // The VM dies: the relay and its redirect go, the pod stays (NotReady).
    let vmm: i32 = std::fs::read_to_string(env.state_dir().join(&pod.id).join("qemu.pid"))
        .expect("qemu.pid")
        .trim()
        .parse()
        .expect("a pid");
    // SAFETY: kill(2) with a pid and a signal touches no memory.
    unsafe { libc::kill(vmm, libc::SIGKILL) };
    let not_ready = cmd::wait_until(TIMEOUT, || {
        cri.pod_status(&pod.id)
            .is_ok_and(|s| s.state == PodSandboxState::SandboxNotready as i32)
    });
    assert!(not_ready, "the pod stays ready\n{}", env.diagnostics());
    let gone = cmd::wait_until(Duration::from_secs(10), || {
        relay_socket(&netns).is_none()
            && !in_netns(&netns, "iptables", &["-t", "nat", "-S"]).contains(CHAIN)
    });
    assert!(
        gone,
        "the relay outlived the VM: {:?} {}",
        relay_socket(&netns),
        in_netns(&netns, "iptables", &["-t", "nat", "-S"])
    );
    eprintln!("port-forward after the VM died: no relay, no redirect in {netns}");
    pod.remove().expect("RemovePodSandbox");
    assert!(
        cmd::wait_until(TIMEOUT, || env.qemu_count() == 0),
        "VMs outlived the pod:\n{}",
        env.diagnostics()
    );
    env.assert_clean();
}
