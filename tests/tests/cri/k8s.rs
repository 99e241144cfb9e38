//! Kubernetes behaviours a VM pod must share with runc: SIGTERM on stop,
//! pod sysctls, DNS / host name / hosts files in every sandbox mode, and the
//! host namespaces a VM cannot join (refused, naming the field).
use std::time::{Duration, Instant};

use kuasar_e2e::cri::proto::{
    Capability, ContainerConfig, ContainerState, DnsConfig, MountPropagation, NamespaceMode,
    NamespaceOption, PodSandboxConfig,
};
use kuasar_e2e::cri::{spec, PodGuard};
use kuasar_e2e::{cmd, BUSYBOX};

use super::{Handler, SHARED_PODS};

/// A container sharing the pod's PID namespace (`shareProcessNamespace`,
/// CRI NamespaceMode POD for pid, also what a config without namespace
/// options gets) or having its own (the kubelet's default).
fn with_pid_mode(mut c: ContainerConfig, mode: NamespaceMode) -> ContainerConfig {
    spec::security(&mut c).namespace_options = Some(NamespaceOption {
        pid: mode as i32,
        ..Default::default()
    });
    c
}

/// StopContainer of a process without a SIGTERM handler of its own
/// (`sleep`, and `sh -c` which execs it). In the pod's shared PID namespace
/// it is not the namespace's init, so SIGTERM ends it: runc ends it in well
/// under a second with 143, and so must a VM handler, not wait out the grace
/// period and SIGKILL (137). In a PID namespace of its own it is the init,
/// which only receives signals it handles: SIGKILL after the grace period,
/// under runc as in a VM.
pub fn stop_sends_sigterm(h: &Handler) {
    let pod = h.shared_pod();
    let cases = [
        ("sleeper-pid1", vec!["sleep", "1000"]),
        ("sh-sleeper", vec!["sh", "-c", "sleep 1000"]),
    ];
    for (name, argv) in cases {
        let config = with_pid_mode(spec::container(name, BUSYBOX, &argv), NamespaceMode::Pod);
        let c = h.start(&pod, &config);
        h.wait_state(&c.id, ContainerState::ContainerRunning);
        // The namespace's init is the pod's: pause under runc, the agent's
        // pod init in a VM (which also stands for podsandbox's pause).
        let pid1 = h.sh(&c.id, "cat /proc/1/comm");
        let pod_init = if h.vm { "pod-init" } else { "pause" };
        assert_eq!(pid1.trim(), pod_init, "{}: PID 1 of the pod", h.name);
        let t0 = Instant::now();
        h.cri
            .stop_container(&c.id, 20)
            .unwrap_or_else(|e| panic!("StopContainer {name}: {e:?}\n{}", h.diag()));
        let took = t0.elapsed();
        let st = h.status(&c.id);
        eprintln!(
            "StopContainer ({}) of `{}` (pod PID namespace) with a 20 s grace period: exit {} \
             after {took:?}",
            h.name,
            argv.join(" "),
            st.exit_code
        );
        assert_eq!(st.state, ContainerState::ContainerExited as i32, "{st:?}");
        assert_eq!(st.exit_code, 143, "not ended by SIGTERM: {st:?}");
        assert!(
            took < Duration::from_secs(5),
            "SIGTERM took {took:?} to end `{}`",
            argv.join(" ")
        );
    }

    let config = with_pid_mode(
        spec::container("own-pidns", BUSYBOX, &["sleep", "1000"]),
        NamespaceMode::Container,
    );
    let c = h.start(&pod, &config);
    h.wait_state(&c.id, ContainerState::ContainerRunning);
    let pid1 = h.sh(&c.id, "cat /proc/1/comm");
    assert_eq!(pid1.trim(), "sleep", "the container's own PID namespace");
    let t0 = Instant::now();
    h.cri
        .stop_container(&c.id, 2)
        .unwrap_or_else(|e| panic!("StopContainer own-pidns: {e:?}\n{}", h.diag()));
    let took = t0.elapsed();
    let st = h.status(&c.id);
    eprintln!(
        "StopContainer ({}) of `sleep 1000` (own PID namespace) with a 2 s grace period: exit {} \
         after {took:?}",
        h.name, st.exit_code
    );
    assert_eq!(
        st.exit_code, 137,
        "an init without a handler ignores SIGTERM: {st:?}"
    );
    assert!(
        took >= Duration::from_millis(1500),
        "killed before the grace period: {took:?}"
    );
}

/// Sysctls a pod asks for (one safe IPC, one unsafe IPC, two net ones).
const SYSCTLS: [(&str, &str); 4] = [
    ("kernel.shm_rmid_forced", "1"),
    ("kernel.msgmax", "65536"),
    ("net.ipv4.ip_local_port_range", "20000\t40000"),
    ("net.ipv4.ip_unprivileged_port_start", "80"),
];

fn pod_with_settings(h: &Handler) -> PodSandboxConfig {
    let mut config = h.pod_config("settings");
    let linux = config.linux.get_or_insert_with(Default::default);
    linux.sysctls = SYSCTLS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    config.dns_config = Some(DnsConfig {
        servers: vec!["192.0.2.53".into(), "192.0.2.54".into()],
        searches: vec!["svc.example.test".into(), "example.test".into()],
        options: vec!["ndots:5".into(), "timeout:2".into()],
    });
    config
}

/// A pod's sysctls, DNS configuration, host name and hosts file: what each
/// of its containers sees, in every sandbox mode (the files come from the
/// pod, not from the image).
pub fn pod_settings_reach_containers(h: &Handler) {
    let config = pod_with_settings(h);
    let guard = PodGuard::run(h.cri, config.clone(), h.name)
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e:?}\n{}", h.diag()));
    let c = h.start(
        &(guard.id.clone(), config.clone()),
        &super::sleeper("reader"),
    );
    h.wait_state(&c.id, ContainerState::ContainerRunning);

    for (key, want) in SYSCTLS {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let got = h.sh(&c.id, &format!("cat {path}"));
        assert_eq!(
            got.split_whitespace().collect::<Vec<_>>(),
            want.split_whitespace().collect::<Vec<_>>(),
            "sysctl {key} as a container of the pod reads it ({})",
            h.name
        );
    }

    let resolv = h.sh(&c.id, "cat /etc/resolv.conf");
    for want in [
        "nameserver 192.0.2.53",
        "nameserver 192.0.2.54",
        "search svc.example.test example.test",
        "options ndots:5 timeout:2",
    ] {
        assert!(
            resolv.lines().any(|l| l.trim() == want),
            "/etc/resolv.conf ({}) lacks {want:?}:\n{resolv}",
            h.name
        );
    }
    let hostname = h.sh(&c.id, "hostname");
    assert_eq!(hostname.trim(), config.hostname, "hostname ({})", h.name);
    let etc_hostname = h.sh(&c.id, "cat /etc/hostname");
    assert_eq!(
        etc_hostname.trim(),
        config.hostname,
        "/etc/hostname ({})",
        h.name
    );
    let hosts = h.sh(&c.id, "cat /etc/hosts");
    assert!(
        hosts.lines().any(|l| {
            let mut f = l.split_whitespace();
            f.next() == Some("127.0.0.1") && f.any(|n| n == "localhost")
        }),
        "/etc/hosts ({}) has no localhost line:\n{hosts}",
        h.name
    );
    drop(c);
    guard
        .remove()
        .unwrap_or_else(|e| panic!("remove the pod: {e:?}"));
}

/// The host namespaces (PID, IPC) a microVM pod cannot share with the node:
/// a VM handler refuses such a pod naming the field (as for hostNetwork),
/// leaving no VM; runc runs it.
pub fn host_namespaces(h: &Handler) {
    type Set = fn(&mut kuasar_e2e::cri::proto::NamespaceOption);
    let cases: [(&str, &str, Set); 2] = [
        ("hostpid", "hostPID", |ns| {
            ns.pid = NamespaceMode::Node as i32
        }),
        ("hostipc", "hostIPC", |ns| {
            ns.ipc = NamespaceMode::Node as i32
        }),
    ];
    for (what, field, set) in cases {
        let mut config = h.pod_config(what);
        if let Some(ns) = config
            .linux
            .as_mut()
            .and_then(|l| l.security_context.as_mut())
            .and_then(|s| s.namespace_options.as_mut())
        {
            set(ns);
        }
        let r = PodGuard::run(h.cri, config, h.name);
        if !h.vm {
            let pod = r.unwrap_or_else(|e| panic!("{field} pod: {e:?}\n{}", h.diag()));
            pod.remove().unwrap();
            continue;
        }
        let err = match r {
            Ok(pod) => panic!("a {field} pod started on {}: {}", h.name, pod.id),
            Err(e) => e,
        };
        assert!(
            err.message().contains(field),
            "the refusal of a {field} pod does not name the field: {err:?}"
        );
        let ok = cmd::wait_until(Duration::from_secs(30), || {
            h.env.qemu_count() <= SHARED_PODS.lock().map(|p| p.len()).unwrap_or(0)
        });
        assert!(ok, "the refused {field} pod left a VM\n{}", h.diag());
    }
}

/// A tmpfs mounted on the host for a test, unmounted when dropped.
struct HostTmpfs(std::path::PathBuf);

impl HostTmpfs {
    fn mount(dir: &std::path::Path) -> Self {
        std::fs::create_dir_all(dir).expect("create the submount dir");
        let out = cmd::run(
            std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=1m", "kuasar-e2e-sub"])
                .arg(dir),
            None,
            Duration::from_secs(10),
        );
        assert!(out.success(), "mount a tmpfs on {}: {out:?}", dir.display());
        HostTmpfs(dir.to_owned())
    }

    /// Unmounts and removes the directory: what fails while anything of the
    /// runtime still holds the mount.
    fn remove(&self) -> Result<(), String> {
        if self.0.exists() {
            let out = cmd::run(
                std::process::Command::new("umount").arg(&self.0),
                None,
                Duration::from_secs(10),
            );
            let unmounted = out.success() || out.stderr.contains("not mounted");
            if !unmounted {
                return Err(format!("umount {}: {out:?}", self.0.display()));
            }
        }
        match std::fs::remove_dir(&self.0) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(format!("rmdir {}: {e}", self.0.display()))
            }
            _ => Ok(()),
        }
    }
}

impl Drop for HostTmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Read-only hostPath volumes whose source has a writable submount: with
/// `readonly` alone (not recursive) the submount stays writable, as under
/// runc; with `recursive_read_only` (when the handler advertises it, which
/// every handler here must) it is read-only too. Once the containers are
/// gone the host can unmount and remove the submount: nothing of the
/// runtime holds it.
#[allow(clippy::too_many_lines)] // a test scenario, read top to bottom
pub fn readonly_host_path_with_submount(h: &Handler) {
    let status = h.cri.status().expect("Status");
    let features = status
        .runtime_handlers
        .iter()
        .find(|r| r.name == h.name)
        .and_then(|r| r.features)
        .unwrap_or_default();
    // containerd 2.1 asks only runc-type runtimes for their features (CRI's
    // introspectRuntimeFeatures) and dies on a nil pointer
    // (internal/cri/opts/spec_linux_opts.go:183) when a container of any
    // other runtime type asks for `recursive_read_only`: that part runs on
    // runc only; tests/tests/lifecycle.rs checks `rro` through the task API.
    let rro_through_cri = features.recursive_read_only_mounts;
    if h.vm {
        eprintln!(
            "{}: runtime handler features as containerd reports them: {features:?}; \
             SKIPPED recursive_read_only through CRI (containerd 2.1.9 panics on it for a \
             runtime that is not of the runc type)",
            h.name
        );
    } else {
        assert!(
            rro_through_cri,
            "{} does not advertise recursive read-only mounts: {:?}",
            h.name, status.runtime_handlers
        );
    }
    let pod = h.shared_pod();
    let src = h.host_dir("ro-submount");
    let sub = HostTmpfs::mount(&src.join("sub"));

    let mut ro = super::sleeper("ro-submount");
    ro.mounts = vec![spec::mount(&src, "/data", true)];
    let mut rro = super::sleeper("rro-submount");
    let mut m = spec::mount(&src, "/data", true);
    m.recursive_read_only = true;
    rro.mounts = vec![m];

    let ro = h.start(&pod, &ro);
    let rro = rro_through_cri.then(|| h.start(&pod, &rro));
    h.wait_state(&ro.id, ContainerState::ContainerRunning);
    let attempt = |id: &str, path: &str| {
        let r = h
            .cri
            .exec_sync(id, &["sh", "-c", &format!("echo x > {path}")], 60)
            .unwrap_or_else(|e| panic!("ExecSync: {e:?}\n{}", h.diag()));
        r.exit_code == 0
    };
    assert!(
        attempt(&ro.id, "/data/sub/written"),
        "{}: the writable submount of a read-only (not recursive) volume is not writable",
        h.name
    );
    assert!(
        std::fs::read_to_string(src.join("sub/written")).is_ok_and(|s| s == "x\n"),
        "{}: the write did not reach the host's submount",
        h.name
    );
    assert!(
        !attempt(&ro.id, "/data/top"),
        "{}: the volume is writable",
        h.name
    );
    if let Some(rro) = &rro {
        h.wait_state(&rro.id, ContainerState::ContainerRunning);
        assert!(
            !attempt(&rro.id, "/data/sub/rro"),
            "{}: the submount of a recursively read-only volume is writable",
            h.name
        );
        assert!(!src.join("sub/rro").exists());
    }
    for c in std::iter::once(ro).chain(rro) {
        h.cri.stop_container(&c.id, 0).expect("StopContainer");
        h.cri.remove_container(&c.id).expect("RemoveContainer");
    }
    if h.name == "kuasar-vmm" {
        rro_through_the_task_api(h, &src);
    }
    // containerd and kuasar-vmm may finish the removal just after answering.
    let mut last = Ok(());
    let removed = cmd::wait_until(Duration::from_secs(10), || {
        last = sub.remove();
        last.is_ok()
    });
    assert!(
        removed,
        "{}: the host cannot remove the submount: {last:?}\n{}",
        h.name,
        h.diag()
    );
}

/// `rro` as an OCI mount option through containerd's task API (`ctr run
/// --mount`), where containerd passes it on unchecked: the volume and its
/// submount are both read-only in the VM, and nothing reached the host.
fn rro_through_the_task_api(h: &Handler, src: &std::path::Path) {
    let id = h.env.unique_id("rro");
    let _g = h.env.guard(&id);
    let mount = format!(
        "type=bind,src={},dst=/data,options=rbind:rro",
        src.display()
    );
    let script = "echo x > /data/sub/t && echo sub-writable; echo x > /data/t && echo writable; \
                  cat /data/sub/written";
    let out = h.env.ctr(&[
        "run",
        "--rm",
        "--runtime",
        kuasar_e2e::RUNTIME,
        "--mount",
        &mount,
        BUSYBOX,
        &id,
        "sh",
        "-c",
        script,
    ]);
    assert!(out.success(), "{out}\n{}", h.diag());
    assert!(
        !out.stdout.contains("writable"),
        "rro volume written: {out}"
    );
    assert!(
        out.stdout.contains('x'),
        "the volume is not readable: {out}"
    );
    assert!(!src.join("t").exists() && !src.join("sub/t").exists());
}

/// A privileged pod of its own (a privileged container needs one), with
/// the (id, config) pair the container helpers take.
fn privileged_pod(h: &Handler, what: &str) -> (PodGuard<'static>, (String, PodSandboxConfig)) {
    let mut config = h.pod_config(what);
    config
        .linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
        .privileged = true;
    let pod = PodGuard::run(h.cri, config.clone(), h.name)
        .unwrap_or_else(|e| panic!("RunPodSandbox (privileged): {e:?}\n{}", h.diag()));
    let pod_ref = (pod.id.clone(), config);
    (pod, pod_ref)
}

/// A privileged container, and one granted CAP_NET_ADMIN, manage the pod's
/// network devices: a bridge can be added and removed (`ip link`, `brctl`),
/// as under runc. In a VM pod they act on the VM's network, which is the
/// pod's; a privileged container sees the VM's devices.
pub fn privileged_and_net_admin(h: &Handler) {
    let (pod, pod_ref) = privileged_pod(h, "privileged");
    let mut privileged = super::sleeper("privileged");
    spec::security(&mut privileged).privileged = true;
    let mut net_admin = super::sleeper("net-admin");
    spec::security(&mut net_admin).capabilities = Some(Capability {
        add_capabilities: vec!["NET_ADMIN".into()],
        ..Default::default()
    });
    let privileged = h.start(&pod_ref, &privileged);
    let net_admin = h.start(&pod_ref, &net_admin);
    h.wait_state(&privileged.id, ContainerState::ContainerRunning);
    h.wait_state(&net_admin.id, ContainerState::ContainerRunning);
    h.sh(
        &privileged.id,
        "ip link add foobar type bridge && ip link show foobar && ip link del foobar",
    );
    h.sh(
        &net_admin.id,
        "brctl addbr foobar2 && ip link show foobar2 && brctl delbr foobar2",
    );
    // Without the capability the same is refused.
    let plain = h.start(&pod_ref, &super::sleeper("plain"));
    h.wait_state(&plain.id, ContainerState::ContainerRunning);
    let r = h
        .cri
        .exec_sync(
            &plain.id,
            &["ip", "link", "add", "foobar3", "type", "bridge"],
            60,
        )
        .unwrap_or_else(|e| panic!("ExecSync: {e:?}"));
    assert_ne!(
        r.exit_code, 0,
        "a container without CAP_NET_ADMIN added a bridge"
    );
    if h.vm {
        // The VM's devices, not the node's: no /dev/kvm (the node has one,
        // the VM has none), and the serial console the VM does have.
        let devs = h.sh(&privileged.id, "ls /dev | tr '\\n' ' '");
        eprintln!("{}: a privileged container's /dev: {devs}", h.name);
        h.sh(&privileged.id, "test ! -e /dev/kvm && test -c /dev/ttyS0");
        super::confinement::nothing_leaves_the_share(h, &pod.id, &privileged.id);
    }
    drop((privileged, net_admin, plain));
    pod.remove()
        .unwrap_or_else(|e| panic!("remove the pod: {e:?}"));
}

/// Runs `mount ARGS` on the host; panics with its output on failure.
fn host_mount(args: &[&str]) {
    let out = cmd::run(
        std::process::Command::new("mount").args(args),
        None,
        Duration::from_secs(10),
    );
    assert!(out.success(), "mount {args:?}: {out:?}");
}

/// Unmounts (lazily) the given host paths when dropped, last first.
struct HostMounts(Vec<std::path::PathBuf>);

impl Drop for HostMounts {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(p)
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// Mount propagation of hostPath volumes. HostToContainer (`rslave`): a
/// mount the node makes below the volume after the container started shows
/// in the container, under runc and in a VM. Bidirectional (`rshared`):
/// under runc a mount made in the container reaches the node; a VM cannot
/// do that, so a VM handler refuses the container, naming the setting.
pub fn mount_propagation(h: &Handler) {
    let src = h.host_dir("propagation");
    // containerd wants the source on a shared mount for either mode.
    host_mount(&["--bind", &src.to_string_lossy(), &src.to_string_lossy()]);
    let mut mounts = HostMounts(vec![src.clone()]);
    host_mount(&["--make-shared", &src.to_string_lossy()]);

    let (pod, pod_ref) = privileged_pod(h, "propagation");

    let mut slave = super::sleeper("host-to-container");
    let mut m = spec::mount(&src, "/data", false);
    m.propagation = MountPropagation::PropagationHostToContainer as i32;
    slave.mounts = vec![m];
    let slave = h.start(&pod_ref, &slave);
    h.wait_state(&slave.id, ContainerState::ContainerRunning);
    let late = src.join("late");
    std::fs::create_dir_all(&late).unwrap();
    host_mount(&[
        "-t",
        "tmpfs",
        "-o",
        "size=1m",
        "kuasar-e2e-late",
        &late.to_string_lossy(),
    ]);
    mounts.0.push(late.clone());
    std::fs::write(late.join("f"), "from the node\n").unwrap();
    let seen = h.sh(&slave.id, "cat /data/late/f");
    assert_eq!(seen.trim(), "from the node", "{}: HostToContainer", h.name);

    let mut shared = super::sleeper("bidirectional");
    spec::security(&mut shared).privileged = true;
    let mut m = spec::mount(&src, "/data", false);
    m.propagation = MountPropagation::PropagationBidirectional as i32;
    shared.mounts = vec![m];
    if h.vm {
        // CRI creates the container without the runtime; the task is ours.
        let c = h.create(&pod_ref, &shared);
        let err = h
            .cri
            .start_container(&c.id)
            .expect_err("a Bidirectional mount in a VM pod");
        assert!(
            err.message().contains("Bidirectional"),
            "the refusal does not name the setting: {err:?}"
        );
    } else {
        let shared = h.start(&pod_ref, &shared);
        h.wait_state(&shared.id, ContainerState::ContainerRunning);
        h.sh(
            &shared.id,
            "mkdir -p /data/inner && mount -t tmpfs t /data/inner && echo x > /data/inner/f",
        );
        mounts.0.push(src.join("inner"));
        assert!(src.join("inner/f").exists(), "runc: Bidirectional");
    }
    drop(slave);
    pod.remove()
        .unwrap_or_else(|e| panic!("remove the pod: {e:?}"));
}

/// A caller that gives up on StopContainer before the grace period ends (a
/// container that ignores SIGTERM): a second StopContainer without a grace
/// period, then RemoveContainer, must still work, as under runc.
pub fn stop_after_a_stop_timed_out(h: &Handler) {
    let pod = h.shared_pod();
    let c = h.start(
        &pod,
        &spec::container(
            "stubborn-timeout",
            BUSYBOX,
            &["sh", "-c", "trap '' TERM; while true; do sleep 1; done"],
        ),
    );
    h.wait_state(&c.id, ContainerState::ContainerRunning);
    // Let the shell install its trap.
    std::thread::sleep(Duration::from_millis(500));
    let err = h
        .cri
        .stop_container_within(&c.id, 8, Duration::from_secs(2))
        .expect_err("StopContainer answered before the grace period ended");
    eprintln!("{}: StopContainer given up by the caller: {err:?}", h.name);
    let t0 = Instant::now();
    h.cri
        .stop_container(&c.id, 0)
        .unwrap_or_else(|e| panic!("a second StopContainer: {e:?}\n{}", h.diag()));
    let st = h.status(&c.id);
    assert_eq!(st.state, ContainerState::ContainerExited as i32, "{st:?}");
    assert_eq!(st.exit_code, 137, "{st:?}");
    eprintln!(
        "{}: the second StopContainer took {:?}",
        h.name,
        t0.elapsed()
    );
    h.cri
        .remove_container(&c.id)
        .unwrap_or_else(|e| panic!("RemoveContainer: {e:?}\n{}", h.diag()));
}

/// CRI's TARGET PID mode (`kubectl debug --target=APP`): a container joins
/// another container's PID namespace and sees its processes (PID 1 is the
/// target's), in a VM pod as under runc.
pub fn target_pid_namespace(h: &Handler) {
    let pod = h.shared_pod();
    let app = with_pid_mode(
        spec::container("target-app", BUSYBOX, &["sleep", "3601"]),
        NamespaceMode::Container,
    );
    let app = h.start(&pod, &app);
    h.wait_state(&app.id, ContainerState::ContainerRunning);
    let mut debug = super::sleeper("debugger");
    spec::security(&mut debug).namespace_options = Some(NamespaceOption {
        pid: NamespaceMode::Target as i32,
        target_id: app.id.clone(),
        ..Default::default()
    });
    let debug = h.start(&pod, &debug);
    h.wait_state(&debug.id, ContainerState::ContainerRunning);
    let pid1 = h.sh(&debug.id, "tr '\\0' ' ' < /proc/1/cmdline");
    assert_eq!(
        pid1.trim(),
        "sleep 3601",
        "{}: PID 1 seen by the debugger",
        h.name
    );
    let ps = h.sh(&debug.id, "ps -o args");
    assert!(
        ps.contains("sleep 3600"),
        "{}: the debugger's own process: {ps}",
        h.name
    );
}
