//! The CRI suite: pods and containers through containerd's CRI (our own
//! client, src/cri) against a private containerd, ONE suite run once per
//! runtime handler:
//!
//! - `runc`: the known-good runtime; proves the client and the expectations;
//! - `kuasar-vmm`: our runtime, CRI `sandboxer = "podsandbox"`;
//! - `kuasar-vmm-shim`: our runtime, CRI `sandboxer = "shim"` (the shim serves
//!   containerd's sandbox API; no pause container);
//! - `kuasar-vmm-zero`: our runtime, CRI `sandboxer = "kuasar-vmm"`, the proxy
//!   plugin kuasar-vmm serves itself (gRPC sandbox controller; no shim at all).
//!
//! Another handler is one more `handler_suite!` line at the bottom.
//! Tests that can share a pod share one per handler (VM boots are slow under
//! emulation); it is removed when the test binary exits. Every other pod and
//! container is removed by a guard, also when a test fails.
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use kuasar_e2e::cri::logs::{self, LogStream};
use kuasar_e2e::cri::proto::{
    AttachRequest, ContainerConfig, ContainerFilter, ContainerState, ContainerStateValue,
    ContainerStatus, ExecRequest, Int64Value, LinuxContainerResources, PodSandboxConfig,
    PodSandboxFilter, PodSandboxState, PodSandboxStateValue,
};
use kuasar_e2e::cri::{spec, stream, Code, ContainerGuard, Cri, PodGuard};
use kuasar_e2e::{cmd, shared, EnvOptions, BUSYBOX};

#[path = "cri/confinement.rs"]
mod confinement;
#[path = "cri/k8s.rs"]
mod k8s;
#[path = "cri/portforward.rs"]
mod portforward;
use confinement::qemu_is_confined;
use k8s::{
    host_namespaces, mount_propagation, pod_settings_reach_containers, privileged_and_net_admin,
    readonly_host_path_with_submount, stop_after_a_stop_timed_out, stop_sends_sigterm,
    target_pid_namespace,
};
use portforward::port_forward;

/// How long a container may take to reach a state.
const STATE_TIMEOUT: Duration = Duration::from_secs(60);

/// One runtime handler under test.
struct Handler {
    env: kuasar_e2e::env::Shared,
    cri: &'static Cri,
    name: &'static str,
    /// Pods run in a VM (not on the host's kernel).
    vm: bool,
}

static CRI: OnceLock<Cri> = OnceLock::new();

/// The shared pod of each handler: (pod id, its config).
static SHARED_PODS: Mutex<Vec<(String, PodSandboxConfig)>> = Mutex::new(Vec::new());

extern "C" fn remove_shared_pods() {
    let _ = std::panic::catch_unwind(|| {
        let Some(cri) = CRI.get() else { return };
        let pods = std::mem::take(&mut *SHARED_PODS.lock().unwrap_or_else(|e| e.into_inner()));
        for (id, _) in pods {
            if let Err(e) = cri.stop_and_remove_pod(&id) {
                eprintln!("kuasar-e2e: removing shared pod {id}: {e}");
            }
        }
    });
}

impl Handler {
    fn new(name: &'static str) -> Self {
        let env = shared(EnvOptions { sandboxer: true });
        let cri = CRI.get_or_init(|| {
            let cri = Cri::connect(&env.address()).unwrap_or_else(|e| panic!("{e}"));
            // Registered after the environment's own exit hook, so it runs
            // first: the pods go while containerd and kuasar-vmm still run.
            // SAFETY: a plain extern "C" fn that catches panics.
            if unsafe { libc::atexit(remove_shared_pods) } != 0 {
                eprintln!("kuasar-e2e: atexit failed; shared pods may be left behind");
            }
            cri
        });
        Self {
            env,
            cri,
            name,
            vm: name != "runc",
        }
    }

    fn diag(&self) -> String {
        self.env.diagnostics()
    }

    fn log_dir(&self, pod: &str) -> PathBuf {
        let d = self.env.dir().join("pod-logs").join(pod);
        std::fs::create_dir_all(&d).expect("create the pod log dir");
        d
    }

    fn pod_config(&self, what: &str) -> PodSandboxConfig {
        let name = format!("{}-{}", self.name, self.env.unique_id(what));
        spec::pod(&name, &self.log_dir(&name))
    }

    /// A pod of its own (for tests that stop it or change pod settings).
    fn own_pod(&self, what: &str) -> PodGuard<'static> {
        let config = self.pod_config(what);
        PodGuard::run(self.cri, config, self.name).unwrap_or_else(|e| {
            panic!(
                "RunPodSandbox ({}) failed: {e:?}\n{}",
                self.name,
                self.diag()
            )
        })
    }

    /// The handler's shared pod (created on first use, re-created if it is
    /// no longer ready).
    fn shared_pod(&self) -> (String, PodSandboxConfig) {
        let mut pods = SHARED_PODS.lock().unwrap_or_else(|e| e.into_inner());
        let prefix = format!("{}-shared-", self.name);
        if let Some(i) = pods.iter().position(|(_, c)| {
            c.metadata
                .as_ref()
                .is_some_and(|m| m.name.starts_with(&prefix))
        }) {
            let ready = self
                .cri
                .pod_status(&pods[i].0)
                .map(|s| s.state == PodSandboxState::SandboxReady as i32)
                .unwrap_or(false);
            if ready {
                return pods[i].clone();
            }
            let (id, _) = pods.remove(i);
            eprintln!("kuasar-e2e: shared pod {id} is not ready any more; a new one is made");
            let _ = self.cri.stop_and_remove_pod(&id);
        }
        let config = self.pod_config("shared");
        let id = self.cri.run_pod(&config, self.name).unwrap_or_else(|e| {
            panic!(
                "RunPodSandbox ({}) failed: {e:?}\n{}",
                self.name,
                self.diag()
            )
        });
        pods.push((id.clone(), config.clone()));
        (id, config)
    }

    /// Creates and starts a container; panics with diagnostics on failure.
    fn start(
        &self,
        pod: &(String, PodSandboxConfig),
        config: &ContainerConfig,
    ) -> ContainerGuard<'static> {
        let g = self.create(pod, config);
        if let Err(e) = self.cri.start_container(&g.id) {
            panic!("StartContainer failed: {e:?}\n{}", self.diag());
        }
        g
    }

    fn create(
        &self,
        pod: &(String, PodSandboxConfig),
        config: &ContainerConfig,
    ) -> ContainerGuard<'static> {
        let id = self
            .cri
            .create_container(&pod.0, config, &pod.1)
            .unwrap_or_else(|e| panic!("CreateContainer failed: {e:?}\n{}", self.diag()));
        ContainerGuard::new(self.cri, id)
    }

    fn status(&self, id: &str) -> ContainerStatus {
        self.cri
            .container_status(id)
            .unwrap_or_else(|e| panic!("ContainerStatus {id}: {e:?}\n{}", self.diag()))
    }

    fn wait_state(&self, id: &str, state: ContainerState) -> ContainerStatus {
        let mut last = None;
        let ok = cmd::wait_until(STATE_TIMEOUT, || {
            let s = self.status(id);
            let done = s.state == state as i32;
            last = Some(s);
            done
        });
        let last = last.expect("polled once");
        assert!(
            ok,
            "container {id} not {state:?} after {STATE_TIMEOUT:?}: {last:?}\n{}",
            self.diag()
        );
        last
    }

    fn wait_exited(&self, id: &str) -> ContainerStatus {
        self.wait_state(id, ContainerState::ContainerExited)
    }

    /// ExecSync that must succeed (exit 0); returns stdout.
    fn sh(&self, id: &str, script: &str) -> String {
        let r = self
            .cri
            .exec_sync(id, &["sh", "-c", script], 60)
            .unwrap_or_else(|e| panic!("ExecSync `{script}`: {e:?}\n{}", self.diag()));
        assert_eq!(
            r.exit_code,
            0,
            "`{script}` exited {}: stdout {:?} stderr {:?}",
            r.exit_code,
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr)
        );
        String::from_utf8_lossy(&r.stdout).into_owned()
    }

    fn log_path(&self, pod: &PodSandboxConfig, c: &ContainerConfig) -> PathBuf {
        Path::new(&pod.log_directory).join(&c.log_path)
    }

    /// A host directory for volumes, removed with the environment.
    fn host_dir(&self, what: &str) -> PathBuf {
        let d = self
            .env
            .dir()
            .join("volumes")
            .join(self.env.unique_id(what));
        std::fs::create_dir_all(&d).expect("create a volume dir");
        d
    }
}

/// A long-running busybox container.
fn sleeper(name: &str) -> ContainerConfig {
    spec::container(name, BUSYBOX, &["sleep", "3600"])
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

// --- pods ----------------------------------------------------------------------------------

#[allow(clippy::too_many_lines)] // a test scenario, read top to bottom
fn pod_lifecycle(h: &Handler) {
    let config = h.pod_config("life");
    let started = Instant::now();
    let pod = PodGuard::run(h.cri, config.clone(), h.name)
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e:?}\n{}", h.diag()));
    eprintln!("RunPodSandbox ({}) took {:?}", h.name, started.elapsed());
    let st = h.cri.pod_status(&pod.id).expect("PodSandboxStatus");
    assert_eq!(st.state, PodSandboxState::SandboxReady as i32, "{st:?}");
    let ip = st
        .network
        .as_ref()
        .map(|n| n.ip.clone())
        .unwrap_or_default();
    assert!(ip.parse::<Ipv4Addr>().is_ok(), "no pod IP: {st:?}");
    assert_eq!(st.runtime_handler, h.name, "{st:?}");
    assert_eq!(st.metadata, config.metadata, "{st:?}");
    assert!(st.created_at > 0, "{st:?}");

    // Lists: by id, by label, by state.
    let by_id = h
        .cri
        .list_pods(Some(PodSandboxFilter {
            id: pod.id.clone(),
            ..Default::default()
        }))
        .expect("ListPodSandbox by id");
    assert_eq!(by_id.len(), 1, "{by_id:?}");
    let name = config.metadata.as_ref().map(|m| m.name.as_str()).unwrap();
    let by_label = h
        .cri
        .list_pods(Some(PodSandboxFilter {
            label_selector: spec::label_selector("kuasar-e2e/pod", name),
            ..Default::default()
        }))
        .expect("ListPodSandbox by label");
    assert_eq!(
        by_label.iter().map(|p| &p.id).collect::<Vec<_>>(),
        vec![&pod.id]
    );
    let state_filter = |state: PodSandboxState| PodSandboxFilter {
        id: pod.id.clone(),
        state: Some(PodSandboxStateValue {
            state: state as i32,
        }),
        ..Default::default()
    };
    let ready = h
        .cri
        .list_pods(Some(state_filter(PodSandboxState::SandboxReady)))
        .unwrap();
    assert_eq!(ready.len(), 1);
    let not_ready = h
        .cri
        .list_pods(Some(state_filter(PodSandboxState::SandboxNotready)))
        .unwrap();
    assert!(not_ready.is_empty(), "{not_ready:?}");

    // Stop (twice), remove (twice).
    h.cri
        .stop_pod(&pod.id)
        .unwrap_or_else(|e| panic!("StopPodSandbox: {e:?}\n{}", h.diag()));
    let st = h.cri.pod_status(&pod.id).expect("status of a stopped pod");
    assert_eq!(st.state, PodSandboxState::SandboxNotready as i32, "{st:?}");
    let not_ready = h
        .cri
        .list_pods(Some(state_filter(PodSandboxState::SandboxNotready)))
        .unwrap();
    assert_eq!(not_ready.len(), 1);
    h.cri
        .stop_pod(&pod.id)
        .expect("StopPodSandbox is idempotent");
    h.cri.remove_pod(&pod.id).expect("RemovePodSandbox");
    h.cri
        .remove_pod(&pod.id)
        .expect("RemovePodSandbox is idempotent");
    let err = h
        .cri
        .pod_status(&pod.id)
        .expect_err("status of a removed pod");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let left = h
        .cri
        .list_pods(Some(PodSandboxFilter {
            id: pod.id.clone(),
            ..Default::default()
        }))
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
    drop(pod);
    if h.vm {
        // The VM of a removed pod is gone (the shared pod's may remain).
        let shared = SHARED_PODS.lock().map(|p| p.len()).unwrap_or(0);
        let ok = cmd::wait_until(Duration::from_secs(30), || h.env.qemu_count() <= shared);
        assert!(ok, "QEMU left after RemovePodSandbox\n{}", h.diag());
    }
}

fn unknown_ids_give_not_found(h: &Handler) {
    let nope = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let nf = |what: &str, r: Result<(), kuasar_e2e::cri::Status>| {
        let e = r.expect_err(what);
        assert_eq!(e.code(), Code::NotFound, "{what}: {e:?}");
    };
    nf("PodSandboxStatus", h.cri.pod_status(nope).map(drop));
    nf("ContainerStatus", h.cri.container_status(nope).map(drop));
    nf("StartContainer", h.cri.start_container(nope));
    nf("ExecSync", h.cri.exec_sync(nope, &["true"], 5).map(drop));
    // Stopping and removing what does not exist succeed (kubelet retries).
    h.cri.stop_pod(nope).expect("StopPodSandbox of unknown id");
    h.cri
        .stop_container(nope, 1)
        .expect("StopContainer of unknown id");
    h.cri
        .remove_container(nope)
        .expect("RemoveContainer of unknown id");
    h.cri
        .remove_pod(nope)
        .expect("RemovePodSandbox of unknown id");
}

fn container_in_stopped_pod_is_refused(h: &Handler) {
    let pod = h.own_pod("stopped");
    h.cri
        .stop_pod(&pod.id)
        .unwrap_or_else(|e| panic!("StopPodSandbox: {e:?}\n{}", h.diag()));
    // containerd accepts the Create (it only records the container); the
    // Start must fail and say why.
    let c = sleeper("late");
    let err = match h.cri.create_container(&pod.id, &c, &pod.config) {
        Err(e) => e,
        Ok(id) => {
            let _g = ContainerGuard::new(h.cri, id.clone());
            h.cri
                .start_container(&id)
                .expect_err("StartContainer in a stopped pod")
        }
    };
    eprintln!("container in a stopped pod: {err:?}");
    assert!(
        err.message().contains("not running") || err.message().contains("not ready"),
        "unclear error: {err:?}"
    );
    pod.remove().expect("remove the stopped pod");
}

fn host_network_pod(h: &Handler) {
    if h.name == "kuasar-vmm-shim" {
        // containerd 2.1.9 itself dies (nil pointer in runtime/v2.NewBundle,
        // called from the sandbox controller's Create) on a hostNetwork pod
        // whose handler uses the `shim` sandboxer, before any shim runs.
        eprintln!(
            "SKIPPED host_network_pod on {}: containerd 2.1.9 panics on hostNetwork pods in the \
             `shim` sandboxer mode (runtime/v2/bundle.go:106) before kuasar is reached",
            h.name
        );
        return;
    }
    let config = spec::host_network(h.pod_config("hostnet"));
    let r = PodGuard::run(h.cri, config, h.name);
    if h.vm {
        let err = match r {
            Ok(pod) => panic!(
                "a hostNetwork pod started on {} (VM pods cannot share the node's network): {}",
                h.name, pod.id
            ),
            Err(e) => e,
        };
        let msg = err.message().to_lowercase();
        assert!(
            msg.contains("host network") || msg.contains("hostnetwork"),
            "unclear error for a hostNetwork pod: {err:?}"
        );
        let ok = cmd::wait_until(Duration::from_secs(30), || {
            h.env.qemu_count() <= SHARED_PODS.lock().map(|p| p.len()).unwrap_or(0)
        });
        assert!(ok, "the refused pod left a VM\n{}", h.diag());
    } else {
        let pod = r.unwrap_or_else(|e| panic!("hostNetwork pod: {e:?}\n{}", h.diag()));
        let st = h.cri.pod_status(&pod.id).unwrap();
        assert_eq!(st.state, PodSandboxState::SandboxReady as i32, "{st:?}");
        pod.remove().unwrap();
    }
}

fn oversized_pod_is_refused(h: &Handler) {
    if !h.vm {
        eprintln!(
            "SKIPPED oversized_pod_is_refused on {}: runc pods share the host's memory",
            h.name
        );
        return;
    }
    // 1 PiB of memory: more than any host has.
    let mut config = h.pod_config("huge");
    if let Some(linux) = config.linux.as_mut() {
        linux.resources = Some(LinuxContainerResources {
            memory_limit_in_bytes: 1 << 50,
            ..Default::default()
        });
    }
    let err = match PodGuard::run(h.cri, config, h.name) {
        Ok(pod) => panic!("a 1 PiB pod started on {}: {}", h.name, pod.id),
        Err(e) => e,
    };
    let msg = err.message();
    assert!(
        msg.contains("MiB") && msg.contains("host has"),
        "unclear error for an oversized pod: {err:?}"
    );
    let ok = cmd::wait_until(Duration::from_secs(30), || {
        h.env.qemu_count() <= SHARED_PODS.lock().map(|p| p.len()).unwrap_or(0)
    });
    assert!(ok, "the refused pod left a VM\n{}", h.diag());
}

// --- containers ----------------------------------------------------------------------------

fn container_lifecycle_status_and_logs(h: &Handler) {
    let pod = h.shared_pod();
    let cfg = spec::container(
        "exit3",
        BUSYBOX,
        &["sh", "-c", "echo out-line; echo err-line >&2; exit 3"],
    );
    let c = h.create(&pod, &cfg);
    let st = h.status(&c.id);
    assert_eq!(st.state, ContainerState::ContainerCreated as i32, "{st:?}");
    assert!(st.created_at > 0 && st.started_at == 0, "{st:?}");
    h.cri
        .start_container(&c.id)
        .unwrap_or_else(|e| panic!("StartContainer: {e:?}\n{}", h.diag()));
    let st = h.wait_exited(&c.id);
    assert_eq!(st.exit_code, 3, "{st:?}");
    assert_eq!(st.reason, "Error", "{st:?}");
    // (containerd records started_at when Start returns: a quick exit may
    // finish "before" it started.)
    assert!(st.started_at >= st.created_at, "{st:?}");
    assert!(st.finished_at >= st.created_at, "{st:?}");
    assert_eq!(
        st.log_path,
        h.log_path(&pod.1, &cfg).to_string_lossy(),
        "{st:?}"
    );
    assert_eq!(
        st.image.as_ref().map(|i| i.image.as_str()),
        Some(BUSYBOX),
        "{st:?}"
    );

    // Its output, in CRI format at the log path.
    let path = h.log_path(&pod.1, &cfg);
    let out = logs::wait_for_line(&path, LogStream::Stdout, STATE_TIMEOUT, |l| l == "out-line");
    out.unwrap_or_else(|e| panic!("{e}"));
    let err = logs::wait_for_line(&path, LogStream::Stderr, STATE_TIMEOUT, |l| l == "err-line");
    err.unwrap_or_else(|e| panic!("{e}"));
    let entries = logs::read(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(entries.len(), 2, "{entries:?}");

    // Exec into an exited container is refused.
    let err = h
        .cri
        .exec_sync(&c.id, &["true"], 5)
        .expect_err("ExecSync into an exited container");
    assert!(
        err.message().contains("EXITED") || err.message().contains("not running"),
        "unclear error: {err:?}"
    );

    // A container that exits 0 is Completed.
    let ok = h.start(&pod, &spec::container("exit0", BUSYBOX, &["true"]));
    let st = h.wait_exited(&ok.id);
    assert_eq!(
        (st.exit_code, st.reason.as_str()),
        (0, "Completed"),
        "{st:?}"
    );

    // Remove (twice); the id is then unknown.
    h.cri.remove_container(&c.id).expect("RemoveContainer");
    h.cri
        .remove_container(&c.id)
        .expect("RemoveContainer is idempotent");
    let e = h.cri.container_status(&c.id).expect_err("removed");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
}

fn missing_image_is_a_clear_error(h: &Handler) {
    let pod = h.shared_pod();
    let image = "docker.io/library/kuasar-no-such-image:0";
    let cfg = spec::container("noimage", image, &["true"]);
    let err = h
        .cri
        .create_container(&pod.0, &cfg, &pod.1)
        .expect_err("CreateContainer with a missing image");
    assert!(
        err.message().contains("kuasar-no-such-image") && err.message().contains("not found"),
        "unclear error: {err:?}"
    );
    assert_eq!(
        h.cri.image_status(image).expect("ImageStatus"),
        None,
        "a missing image has no status"
    );
    let img = h
        .cri
        .image_status(BUSYBOX)
        .expect("ImageStatus")
        .expect("busybox is imported");
    assert!(img.id.starts_with("sha256:"), "{img:?}");
    assert!(h.cri.list_images().unwrap().iter().any(|i| i.id == img.id));
}

fn exec_sync_output_exit_code_and_timeout(h: &Handler) {
    let pod = h.shared_pod();
    let c = h.start(&pod, &sleeper("execsync"));
    let r = h
        .cri
        .exec_sync(&c.id, &["sh", "-c", "echo out; echo err >&2; exit 5"], 30)
        .unwrap_or_else(|e| panic!("ExecSync: {e:?}\n{}", h.diag()));
    assert_eq!(
        (
            text(&r.stdout).as_str(),
            text(&r.stderr).as_str(),
            r.exit_code
        ),
        ("out\n", "err\n", 5)
    );
    let started = Instant::now();
    let r = h.cri.exec_sync(&c.id, &["sleep", "30"], 2);
    let took = started.elapsed();
    let err = r.expect_err("ExecSync past its timeout");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        took < Duration::from_secs(20),
        "timeout not honoured: {took:?}"
    );
    // The container is still usable.
    assert_eq!(h.sh(&c.id, "echo again"), "again\n");
}

fn exec_and_attach_through_the_streaming_server(h: &Handler) {
    let pod = h.shared_pod();
    let c = h.start(&pod, &sleeper("exec"));
    let t = Duration::from_secs(60);
    let exec = |cmd: &[&str], stdin: bool| {
        h.cri
            .exec(ExecRequest {
                container_id: c.id.clone(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                tty: false,
                stdin,
                stdout: true,
                stderr: true,
            })
            .unwrap_or_else(|e| panic!("Exec: {e:?}\n{}", h.diag()))
    };
    let url = exec(&["sh", "-c", "echo out; echo err >&2; exit 4"], false);
    let out = stream::run(&url, None, t).unwrap_or_else(|e| panic!("{e}\n{}", h.diag()));
    assert_eq!(out.stdout_text(), "out\n", "{out:?}");
    assert_eq!(out.stderr_text(), "err\n", "{out:?}");
    assert_eq!(out.exit_code(), Some(4), "{out:?}");

    let url = exec(&["sh", "-c", "read l; echo got:$l"], true);
    let out = stream::run(&url, Some(b"hello\n"), t).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.stdout_text(), "got:hello\n", "{out:?}");
    assert_eq!(out.exit_code(), Some(0), "{out:?}");

    // Attach to a container that echoes its stdin.
    let mut cfg = spec::container(
        "attach",
        BUSYBOX,
        &["sh", "-c", "while read l; do echo attach:$l; done"],
    );
    cfg.stdin = true;
    let a = h.start(&pod, &cfg);
    h.wait_state(&a.id, ContainerState::ContainerRunning);
    let url = h
        .cri
        .attach(AttachRequest {
            container_id: a.id.clone(),
            stdin: true,
            tty: false,
            stdout: true,
            stderr: true,
        })
        .unwrap_or_else(|e| panic!("Attach: {e:?}\n{}", h.diag()));
    let mut s = stream::Session::open(&url, t).unwrap_or_else(|e| panic!("{e}"));
    s.send_stdin(b"ping\n").unwrap();
    let got = s
        .read_until(t, |o| o.stdout_text().contains("attach:ping\n"))
        .map(|o| o.stdout_text())
        .unwrap_or_else(|e| panic!("{e}\n{}", h.diag()));
    assert!(got.contains("attach:ping"), "{got:?}");
    s.close();
    let path = h.log_path(&pod.1, &cfg);
    logs::wait_for_line(&path, LogStream::Stdout, t, |l| l == "attach:ping")
        .unwrap_or_else(|e| panic!("{e}"));
    let st = h.status(&a.id);
    assert_eq!(
        st.state,
        ContainerState::ContainerRunning as i32,
        "detaching stopped the container: {st:?}"
    );
}

fn reopen_container_log(h: &Handler) {
    let pod = h.shared_pod();
    let cfg = spec::container(
        "ticker",
        BUSYBOX,
        &[
            "sh",
            "-c",
            "i=0; while true; do echo tick-$i; i=$((i+1)); sleep 0.2; done",
        ],
    );
    let c = h.start(&pod, &cfg);
    let path = h.log_path(&pod.1, &cfg);
    let t = Duration::from_secs(60);
    logs::wait_for_line(&path, LogStream::Stdout, t, |l| l.starts_with("tick-"))
        .unwrap_or_else(|e| panic!("{e}\n{}", h.diag()));
    // Log rotation: rename, then ask for a new file.
    let rotated = path.with_extension("log.1");
    std::fs::rename(&path, &rotated).expect("rotate the log");
    h.cri
        .reopen_container_log(&c.id)
        .unwrap_or_else(|e| panic!("ReopenContainerLog: {e:?}\n{}", h.diag()));
    logs::wait_for_line(&path, LogStream::Stdout, t, |l| l.starts_with("tick-"))
        .unwrap_or_else(|e| panic!("after ReopenContainerLog: {e}\n{}", h.diag()));
    let old = logs::read(&rotated).unwrap_or_else(|e| panic!("{e}"));
    assert!(!old.is_empty());

    h.cri.stop_container(&c.id, 0).expect("StopContainer");
    let err = h
        .cri
        .reopen_container_log(&c.id)
        .expect_err("ReopenContainerLog of a stopped container");
    assert!(err.message().contains("not running"), "{err:?}");
}

fn stop_container_grace_period(h: &Handler) {
    let pod = h.shared_pod();
    // Exits 0 on SIGTERM.
    let polite = h.start(
        &pod,
        &spec::container(
            "polite",
            BUSYBOX,
            &["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"],
        ),
    );
    // Ignores SIGTERM: needs SIGKILL after the grace period.
    let stubborn = h.start(
        &pod,
        &spec::container(
            "stubborn",
            BUSYBOX,
            &["sh", "-c", "trap '' TERM; while true; do sleep 1; done"],
        ),
    );
    h.wait_state(&polite.id, ContainerState::ContainerRunning);
    h.wait_state(&stubborn.id, ContainerState::ContainerRunning);
    // Let the shells install their traps.
    std::thread::sleep(Duration::from_millis(500));

    let t0 = Instant::now();
    h.cri
        .stop_container(&polite.id, 30)
        .unwrap_or_else(|e| panic!("StopContainer: {e:?}\n{}", h.diag()));
    let took = t0.elapsed();
    let st = h.status(&polite.id);
    assert_eq!(st.state, ContainerState::ContainerExited as i32, "{st:?}");
    assert_eq!(
        (st.exit_code, st.reason.as_str()),
        (0, "Completed"),
        "{st:?}"
    );
    assert!(
        took < Duration::from_secs(10),
        "SIGTERM not delivered? took {took:?}"
    );

    let grace = 3;
    let t0 = Instant::now();
    h.cri
        .stop_container(&stubborn.id, grace)
        .unwrap_or_else(|e| panic!("StopContainer: {e:?}\n{}", h.diag()));
    let took = t0.elapsed();
    let st = h.status(&stubborn.id);
    assert_eq!(st.state, ContainerState::ContainerExited as i32, "{st:?}");
    assert_eq!(st.exit_code, 137, "{st:?}");
    assert!(
        took >= Duration::from_secs(grace as u64 - 1),
        "killed before the grace period ended: {took:?}"
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");
    h.cri
        .stop_container(&stubborn.id, grace)
        .expect("StopContainer is idempotent");
}

fn list_containers_with_filters(h: &Handler) {
    let pod = h.shared_pod();
    let mut a_cfg = sleeper("list-a");
    a_cfg.labels.insert("kuasar-e2e/role".into(), "a".into());
    let a = h.start(&pod, &a_cfg);
    let mut b_cfg = spec::container("list-b", BUSYBOX, &["true"]);
    b_cfg.labels.insert("kuasar-e2e/role".into(), "b".into());
    let b = h.start(&pod, &b_cfg);
    h.wait_exited(&b.id);
    h.wait_state(&a.id, ContainerState::ContainerRunning);

    let list = |f: ContainerFilter| {
        let mut ids: Vec<String> = h
            .cri
            .list_containers(Some(f))
            .expect("ListContainers")
            .into_iter()
            .map(|c| c.id)
            .collect();
        ids.sort();
        ids
    };
    let in_pod = |f: ContainerFilter| ContainerFilter {
        pod_sandbox_id: pod.0.clone(),
        ..f
    };
    let all = list(in_pod(ContainerFilter::default()));
    assert!(all.contains(&a.id) && all.contains(&b.id), "{all:?}");
    let by_label = list(in_pod(ContainerFilter {
        label_selector: spec::label_selector("kuasar-e2e/role", "a"),
        ..Default::default()
    }));
    assert_eq!(by_label, vec![a.id.clone()]);
    let state = |s: ContainerState| ContainerFilter {
        pod_sandbox_id: pod.0.clone(),
        label_selector: spec::label_selector("kuasar-e2e/role", "b"),
        state: Some(ContainerStateValue { state: s as i32 }),
        ..Default::default()
    };
    assert_eq!(
        list(state(ContainerState::ContainerExited)),
        vec![b.id.clone()]
    );
    assert!(list(state(ContainerState::ContainerRunning)).is_empty());
    let by_id = list(ContainerFilter {
        id: a.id.clone(),
        ..Default::default()
    });
    assert_eq!(by_id, vec![a.id.clone()]);
    let none = list(ContainerFilter {
        pod_sandbox_id: "no-such-pod".into(),
        ..Default::default()
    });
    assert!(none.is_empty(), "{none:?}");
}

fn stats_and_update_resources(h: &Handler) {
    let pod = h.shared_pod();
    let c = h.start(&pod, &sleeper("stats"));
    h.wait_state(&c.id, ContainerState::ContainerRunning);
    // Some work, so that CPU use is not zero.
    h.sh(&c.id, "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done");
    let stats = h
        .cri
        .container_stats(&c.id)
        .unwrap_or_else(|e| panic!("ContainerStats: {e:?}\n{}", h.diag()));
    assert_eq!(
        stats.attributes.as_ref().map(|a| a.id.as_str()),
        Some(c.id.as_str())
    );
    let cpu = stats
        .cpu
        .as_ref()
        .and_then(|c| c.usage_core_nano_seconds.as_ref())
        .map(|v| v.value)
        .unwrap_or(0);
    assert!(cpu > 0, "no CPU usage: {stats:?}");
    let mem = stats
        .memory
        .as_ref()
        .and_then(|m| m.working_set_bytes.as_ref())
        .map(|v| v.value)
        .unwrap_or(0);
    assert!(mem > 0, "no memory working set: {stats:?}");
    let listed = h
        .cri
        .list_container_stats(None)
        .expect("ListContainerStats");
    assert!(listed
        .iter()
        .any(|s| s.attributes.as_ref().is_some_and(|a| a.id == c.id)));

    let limit: i64 = 96 << 20;
    h.cri
        .update_container_resources(
            &c.id,
            LinuxContainerResources {
                memory_limit_in_bytes: limit,
                cpu_period: 100_000,
                cpu_quota: 50_000,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("UpdateContainerResources: {e:?}\n{}", h.diag()));
    // cgroup v2 (guest) or v1 (this host).
    let seen = h.sh(
        &c.id,
        "cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes",
    );
    assert_eq!(seen.trim(), limit.to_string(), "memory limit not applied");
    let quota = h.sh(
        &c.id,
        "cat /sys/fs/cgroup/cpu.max 2>/dev/null || cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us",
    );
    assert!(
        quota.trim().starts_with("50000"),
        "cpu quota not applied: {quota:?}"
    );
    let st = h.status(&c.id);
    let mem_in_status = st
        .resources
        .as_ref()
        .and_then(|r| r.linux.as_ref())
        .map(|l| l.memory_limit_in_bytes);
    assert_eq!(mem_in_status, Some(limit), "{st:?}");
}

fn memory_hog_is_oom_killed(h: &Handler) {
    let pod = h.shared_pod();
    let mut cfg = spec::container(
        "hog",
        BUSYBOX,
        &[
            "sh",
            "-c",
            // busybox tail looks for a line end in /dev/zero for ever,
            // keeping what it read: memory grows as fast as the guest
            // copies (a pipe through the shell is 10x slower under TCG).
            "exec tail /dev/zero",
        ],
    );
    let limit: i64 = 32 << 20;
    let r = spec::resources(&mut cfg);
    r.memory_limit_in_bytes = limit;
    r.memory_swap_limit_in_bytes = limit;
    let c = h.start(&pod, &cfg);
    let st = h.wait_exited(&c.id);
    assert_eq!(
        (st.exit_code, st.reason.as_str()),
        (137, "OOMKilled"),
        "{st:?}\n{}",
        h.diag()
    );
}

// --- the container's view ------------------------------------------------------------------

fn env_args_workdir_and_user(h: &Handler) {
    let pod = h.shared_pod();
    let mut cfg = spec::container("whoami", BUSYBOX, &["sh", "-c"]);
    cfg.args = vec![
        "echo \"env=$GREETING args=$0,$1 pwd=$(pwd) uid=$(id -u) gid=$(id -g)\"".into(),
        "first".into(),
        "second".into(),
    ];
    cfg.envs = vec![spec::kv("GREETING", "hello world")];
    cfg.working_dir = "/tmp".into();
    let sec = spec::security(&mut cfg);
    sec.run_as_user = Some(Int64Value { value: 1234 });
    sec.run_as_group = Some(Int64Value { value: 5678 });
    let c = h.start(&pod, &cfg);
    let st = h.wait_exited(&c.id);
    assert_eq!(st.exit_code, 0, "{st:?}");
    let line = logs::wait_for_line(
        &h.log_path(&pod.1, &cfg),
        LogStream::Stdout,
        STATE_TIMEOUT,
        |l| l.starts_with("env="),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        line,
        "env=hello world args=first,second pwd=/tmp uid=1234 gid=5678"
    );
}

fn readonly_root_filesystem(h: &Handler) {
    let pod = h.shared_pod();
    let vol = h.host_dir("rootro");
    let mut cfg = sleeper("rootro");
    cfg.mounts = vec![spec::mount(&vol, "/data", false)];
    spec::security(&mut cfg).readonly_rootfs = true;
    let c = h.start(&pod, &cfg);
    let r = h
        .cri
        .exec_sync(&c.id, &["sh", "-c", "touch /newfile"], 30)
        .expect("ExecSync");
    assert_ne!(r.exit_code, 0, "wrote to a read-only root fs");
    assert!(text(&r.stderr).contains("Read-only"), "{r:?}");
    h.sh(&c.id, "echo ok > /data/f");
    assert_eq!(std::fs::read_to_string(vol.join("f")).unwrap(), "ok\n");
}

fn host_path_volumes(h: &Handler) {
    let pod = h.shared_pod();
    let rw = h.host_dir("rw");
    let ro = h.host_dir("ro");
    std::fs::write(rw.join("from-host"), "host content\n").unwrap();
    std::fs::write(ro.join("ro-file"), "read only\n").unwrap();
    let mut cfg = sleeper("volumes");
    cfg.mounts = vec![
        spec::mount(&rw, "/data", false),
        spec::mount(&ro, "/ro", true),
    ];
    let c = h.start(&pod, &cfg);
    assert_eq!(h.sh(&c.id, "cat /data/from-host"), "host content\n");
    assert_eq!(h.sh(&c.id, "cat /ro/ro-file"), "read only\n");
    h.sh(&c.id, "echo from guest > /data/from-guest");
    assert_eq!(
        std::fs::read_to_string(rw.join("from-guest")).unwrap_or_default(),
        "from guest\n",
        "a write in the container did not land on the host"
    );
    // Host writes after the start are visible too.
    std::fs::write(rw.join("later"), "later\n").unwrap();
    assert_eq!(h.sh(&c.id, "cat /data/later"), "later\n");
    let r = h
        .cri
        .exec_sync(&c.id, &["sh", "-c", "echo x > /ro/new"], 30)
        .unwrap_or_else(|e| panic!("ExecSync: {e:?}\n{}", h.diag()));
    assert_ne!(r.exit_code, 0, "wrote to a read-only volume");
    assert!(!ro.join("new").exists());
}

fn shared_scratch_dir_between_containers(h: &Handler) {
    // An emptyDir as kubelet makes it: a fresh host directory mounted rw
    // into several containers of the pod.
    let pod = h.shared_pod();
    let dir = h.host_dir("emptydir");
    let mut w = sleeper("writer");
    w.mounts = vec![spec::mount(&dir, "/scratch", false)];
    let mut r = sleeper("reader");
    r.mounts = vec![spec::mount(&dir, "/cache", false)];
    let writer = h.start(&pod, &w);
    let reader = h.start(&pod, &r);
    h.sh(&writer.id, "echo shared > /scratch/msg");
    assert_eq!(h.sh(&reader.id, "cat /cache/msg"), "shared\n");
}

// --- networking ----------------------------------------------------------------------------

fn http_get(addr: (Ipv4Addr, u16), timeout: Duration) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr.into(), timeout).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(s, "GET / HTTP/1.0\r\nHost: pod\r\n\r\n").map_err(|e| e.to_string())?;
    let mut body = String::new();
    s.read_to_string(&mut body).map_err(|e| e.to_string())?;
    Ok(body)
}

fn pod_networking(h: &Handler) {
    let pod = h.shared_pod();
    let st = h.cri.pod_status(&pod.0).unwrap();
    let ip: Ipv4Addr = st
        .network
        .as_ref()
        .and_then(|n| n.ip.parse().ok())
        .unwrap_or_else(|| panic!("no pod IP: {st:?}"));

    // The host reaches a server in the pod.
    let server = h.start(
        &pod,
        &spec::container(
            "httpd",
            BUSYBOX,
            &[
                "sh",
                "-c",
                "mkdir -p /www && echo kuasar-page > /www/index.html && exec httpd -f -p 80 -h /www",
            ],
        ),
    );
    h.wait_state(&server.id, ContainerState::ContainerRunning);
    let mut last = String::new();
    let ok = cmd::wait_until(Duration::from_secs(30), || {
        match http_get((ip, 80), Duration::from_secs(5)) {
            Ok(body) if body.contains("kuasar-page") => true,
            Ok(body) => {
                last = body;
                false
            }
            Err(e) => {
                last = e;
                false
            }
        }
    });
    assert!(ok, "no page from {ip}:80: {last}\n{}", h.diag());

    // Two containers of the pod talk over localhost.
    let client = h.start(&pod, &sleeper("client"));
    let page = h.sh(&client.id, "wget -q -O - http://127.0.0.1:80/");
    assert_eq!(page, "kuasar-page\n");

    // The pod reaches a server on the host's bridge address (the gateway:
    // `.1` of the pod's subnet).
    let o = ip.octets();
    let gw = Ipv4Addr::new(o[0], o[1], o[2], 1);
    let listener = TcpListener::bind((gw, 0)).expect("listen on the bridge address");
    let port = listener.local_addr().unwrap().port();
    let accept = std::thread::spawn(move || {
        listener.set_nonblocking(false).ok();
        if let Ok((mut s, _)) = listener.accept() {
            let _ = s.write_all(b"hello-from-host\n");
        }
    });
    let got = h.sh(&client.id, &format!("nc -w 10 {gw} {port} </dev/null"));
    assert_eq!(got, "hello-from-host\n");
    let _ = accept.join();
}

// --- one suite per handler -----------------------------------------------------------------

/// One `#[test]` per suite function, for handler `$handler`, each with the
/// attribute `$attr`.
macro_rules! suite_tests {
    ($handler:expr, $attr:meta; $($test:ident),* $(,)?) => {$(
        #[test]
        #[$attr]
        fn $test() {
            super::$test(&super::Handler::new($handler));
        }
    )*};
}

/// The whole suite for one runtime handler, in module `$module`; `$attr`
/// (optional) goes on each test, e.g. to ignore a handler still in the works.
macro_rules! handler_suite {
    ($module:ident, $handler:expr) => {
        handler_suite!($module, $handler, doc = concat!("CRI suite, handler ", $handler));
    };
    ($module:ident, $handler:expr, $attr:meta) => {
        mod $module {
            suite_tests!(
                $handler, $attr;
                pod_lifecycle,
                unknown_ids_give_not_found,
                container_in_stopped_pod_is_refused,
                host_network_pod,
                oversized_pod_is_refused,
                container_lifecycle_status_and_logs,
                missing_image_is_a_clear_error,
                exec_sync_output_exit_code_and_timeout,
                exec_and_attach_through_the_streaming_server,
                reopen_container_log,
                stop_container_grace_period,
                list_containers_with_filters,
                stats_and_update_resources,
                memory_hog_is_oom_killed,
                env_args_workdir_and_user,
                readonly_root_filesystem,
                host_path_volumes,
                shared_scratch_dir_between_containers,
                pod_networking,
                stop_sends_sigterm,
                pod_settings_reach_containers,
                host_namespaces,
                readonly_host_path_with_submount,
                port_forward,
                privileged_and_net_admin,
                mount_propagation,
                stop_after_a_stop_timed_out,
                target_pid_namespace,
                qemu_is_confined,
            );
        }
    };
}

handler_suite!(runc, "runc");
handler_suite!(kuasar_vmm, "kuasar-vmm");
handler_suite!(kuasar_vmm_shim, "kuasar-vmm-shim");
handler_suite!(kuasar_vmm_zero, "kuasar-vmm-zero");
handler_suite!(kuasar_vmm_zero_streaming, "kuasar-vmm-zero-streaming");
