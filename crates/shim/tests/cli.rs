//! The built binary as containerd runs it: `start` without a sandboxer,
//! `delete` without a sandboxer, and `start` -> serving daemon -> task
//! calls -> `Shutdown` against a fake kuasar-vmm (a ttrpc server in this
//! test process serving the Sandboxer and Task services on one socket).

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kuasar_api::containerd::api::Empty as TaskEmpty;
use kuasar_api::containerd::shim::shim::*;
use kuasar_api::containerd::shim::shim_ttrpc::{create_task, Task, TaskClient};
use kuasar_api::protobuf::Message;
use kuasar_api::sandboxer::{
    create_sandboxer, DeleteSandboxRequest, Empty, PingResponse, RegisterSandboxRequest, Sandboxer,
};
use kuasar_api::ttrpc::{self, context, Code, TtrpcContext};
use kuasar_api::{NAMESPACE_METADATA, SANDBOX_ID_METADATA, TTRPC_ADDRESS_METADATA};

const BIN: &str = env!("CARGO_BIN_EXE_containerd-shim-kuasar-vmm-v2");
const ADDRESS: &str = "/run/containerd/containerd.sock";
const TTRPC_ADDRESS: &str = "/run/containerd/containerd.sock.ttrpc";

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn tmpdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "kshc-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("mkdir");
    d
}

/// `bin <args>` in `bundle` with the sandboxer and socket dir of `dir`;
/// fails the test if it does not finish (with stdout/stderr at EOF: a
/// daemon holding them would hang here) within 20 s.
fn run(dir: &Path, bundle: &Path, vmm: &Path, args: &[&str]) -> (Output, Duration) {
    let mut c = Command::new(BIN);
    c.args(args)
        .current_dir(bundle)
        .env(kuasar_api::VMM_SOCKET_ENV, vmm)
        .env("KUASAR_SHIM_SOCKET_DIR", dir.join("s"))
        .env("TTRPC_ADDRESS", TTRPC_ADDRESS)
        .env_remove("KUASAR_SHIM_LOG")
        .stdin(Stdio::null());
    let (tx, rx) = std::sync::mpsc::channel();
    let t = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(c.output());
    });
    let out = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the shim did not finish (or kept stdout/stderr open)")
        .expect("run the shim");
    (out, t.elapsed())
}

fn shim_args<'a>(id: &'a str, verb: &'a str) -> Vec<&'a str> {
    vec![
        "-namespace",
        "k8s.io",
        "-address",
        ADDRESS,
        "-publish-binary",
        "/usr/bin/containerd",
        "-id",
        id,
        verb,
    ]
}

#[test]
fn start_without_sandboxer_fails_naming_the_socket() {
    let dir = tmpdir();
    let vmm = PathBuf::from(format!("/tmp/nonexistent-{}.sock", std::process::id()));
    let (out, _) = run(&dir, &dir, &vmm, &shim_args("sb1", "start"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty(), "stdout: {:?}", out.stdout);
    assert!(
        stderr.contains(&format!("kuasar-vmm is not reachable at {}", vmm.display())),
        "{stderr}"
    );
    // Nothing left behind.
    assert!(!dir.join("address").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_flags_and_ids_are_rejected() {
    let dir = tmpdir();
    let vmm = dir.join("vmm.sock");
    let (out, _) = run(&dir, &dir, &vmm, &["-namespace", "n", "-bogus", "start"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("flag provided but not defined: -bogus"),
        "{stderr}"
    );
    for bad in ["..", "../evil", "a/b"] {
        let (out, _) = run(&dir, &dir, &vmm, &shim_args(bad, "start"));
        assert_eq!(out.status.code(), Some(1), "{bad}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("invalid id"), "{bad}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn delete_without_sandboxer_prints_a_delete_response() {
    let dir = tmpdir();
    let vmm = dir.join("no-vmm.sock");
    let (out, took) = run(&dir, &dir, &vmm, &shim_args("sb1", "delete"));
    assert!(out.status.success(), "{out:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("warning"), "{stderr}");
    let r = DeleteResponse::parse_from_bytes(&out.stdout).expect("a DeleteResponse");
    assert_eq!(r.exit_status, 137);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let at = r.exited_at.seconds;
    assert!(
        (now - 60..=now + 1).contains(&at),
        "exited_at {at}, now {now}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The fake kuasar-vmm.
#[derive(Default)]
struct Fake {
    registered: Mutex<Vec<RegisterSandboxRequest>>,
    deleted: Mutex<Vec<String>>,
}

impl Sandboxer for Fake {
    fn ping(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<PingResponse> {
        let mut r = PingResponse::new();
        r.version = "fake".into();
        Ok(r)
    }
    fn register_sandbox(
        &self,
        _: &TtrpcContext,
        req: RegisterSandboxRequest,
    ) -> ttrpc::Result<Empty> {
        self.registered.lock().expect("lock").push(req);
        Ok(Empty::new())
    }
    fn delete_sandbox(&self, _: &TtrpcContext, req: DeleteSandboxRequest) -> ttrpc::Result<Empty> {
        self.deleted.lock().expect("lock").push(req.sandbox_id);
        Ok(Empty::new())
    }
}

fn md(ctx: &TtrpcContext, k: &str) -> String {
    ctx.metadata
        .get(k)
        .and_then(|v| v.first())
        .cloned()
        .unwrap_or_default()
}

impl Task for Fake {
    fn state(&self, ctx: &TtrpcContext, req: StateRequest) -> ttrpc::Result<StateResponse> {
        let mut r = StateResponse::new();
        r.id = req.id;
        r.bundle = md(ctx, SANDBOX_ID_METADATA);
        r.stdin = md(ctx, NAMESPACE_METADATA);
        r.stdout = md(ctx, TTRPC_ADDRESS_METADATA);
        Ok(r)
    }
    fn connect(&self, _: &TtrpcContext, _: ConnectRequest) -> ttrpc::Result<ConnectResponse> {
        let mut r = ConnectResponse::new();
        r.task_pid = 1;
        Ok(r)
    }
    fn shutdown(&self, ctx: &TtrpcContext, _: ShutdownRequest) -> ttrpc::Result<TaskEmpty> {
        let id = md(ctx, SANDBOX_ID_METADATA);
        if self.deleted.lock().expect("lock").contains(&id) {
            return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                Code::NOT_FOUND,
                format!("sandbox {id} not found"),
            )));
        }
        Ok(TaskEmpty::new())
    }
}

fn start_fake(path: &Path) -> (ttrpc::Server, Arc<Fake>) {
    let fake = Arc::new(Fake::default());
    let mut s = ttrpc::Server::new()
        .bind(&format!("unix://{}", path.display()))
        .expect("bind")
        .register_service(create_sandboxer(fake.clone()))
        .register_service(create_task(fake.clone()));
    s.start().expect("start fake");
    (s, fake)
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

fn wait_gone(pid: u32) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Kills the serving daemon if a test fails before shutting it down.
struct Reap(u32);
impl Drop for Reap {
    fn drop(&mut self) {
        if self.0 != 0 && alive(self.0) {
            // SAFETY: kill(2) of the daemon this test started (pid known
            // from Connect, checked alive just above).
            unsafe {
                libc::kill(self.0 as i32, libc::SIGKILL);
            }
        }
    }
}

fn started_address(out: &Output) -> String {
    assert!(
        out.status.success(),
        "start failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("utf-8 address")
}

#[test]
#[allow(clippy::too_many_lines)] // a test scenario, read top to bottom
fn start_serves_relays_and_exits_on_shutdown() {
    let dir = tmpdir();
    let vmm = dir.join("vmm.sock");
    let (fake_server, fake) = start_fake(&vmm);
    let bundle = dir.join("bundle-sb1");
    std::fs::create_dir_all(&bundle).expect("mkdir bundle");

    // A pipe inherited without CLOEXEC (as containerd passes on what it
    // inherited): the daemon must not keep it open.
    let mut pipe = [0i32; 2];
    // SAFETY: pipe(2) fills the two-element array.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    let stray = std::fs::read_link(format!("/proc/self/fd/{}", pipe[1])).expect("pipe link");
    let (out, _) = run(&dir, &bundle, &vmm, &shim_args("sb1", "start"));
    // SAFETY: closing the two fds pipe(2) gave us, used nowhere else.
    unsafe {
        libc::close(pipe[0]);
        libc::close(pipe[1]);
    }
    let address = started_address(&out);
    let sock = address.strip_prefix("unix://").expect("unix:// address");
    let name = Path::new(sock).file_name().expect("name").to_string_lossy();
    assert_eq!(Path::new(sock).parent(), Some(dir.join("s").as_path()));
    assert_eq!(name.len(), 32, "{address}");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(bundle.join("address")).expect("address file"),
        address
    );
    {
        let reg = fake.registered.lock().expect("lock");
        assert_eq!(reg.len(), 1);
        assert_eq!(reg[0].sandbox_id, "sb1");
        assert_eq!(reg[0].namespace, "k8s.io");
        assert_eq!(Path::new(&reg[0].bundle), bundle.as_path());
        assert_eq!(reg[0].ttrpc_address, TTRPC_ADDRESS);
    }

    let client = TaskClient::new(ttrpc::Client::connect(&address).expect("connect"));
    let ctx = || context::with_timeout(5_000_000_000);
    let c = client
        .connect(ctx(), &ConnectRequest::new())
        .expect("Connect");
    let pid = c.shim_pid;
    let _reap = Reap(pid);
    assert!(pid > 0 && pid != std::process::id());
    assert_eq!(c.task_pid, 1);
    // Detached: its own session, stdio on /dev/null, named like the shim.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = stat.rsplit(") ").next().expect("stat fields");
    let sid: u32 = after.split(' ').nth(3).expect("sid").parse().expect("sid");
    assert_eq!(sid, pid, "daemon is a session leader");
    for fd in 0..3 {
        let t = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).expect("fd");
        assert_eq!(t, Path::new("/dev/null"), "fd {fd}");
    }
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .flatten()
    {
        let target = std::fs::read_link(e.path()).unwrap_or_default();
        assert_ne!(
            target,
            stray,
            "inherited pipe kept open as fd {:?}",
            e.file_name()
        );
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    assert!(cmdline.starts_with(b"containerd-shim-kuasar-vmm-v2\0"));

    let mut req = StateRequest::new();
    req.id = "c1".into();
    let s = client.state(ctx(), &req).expect("State");
    assert_eq!(
        (
            s.id.as_str(),
            s.bundle.as_str(),
            s.stdin.as_str(),
            s.stdout.as_str()
        ),
        ("c1", "sb1", "k8s.io", TTRPC_ADDRESS)
    );

    // Idempotent start: same address, no second registration.
    let (out2, _) = run(&dir, &bundle, &vmm, &shim_args("sb1", "start"));
    assert_eq!(started_address(&out2), address);
    // A CRI container of the pod (grouped by annotation) joins this shim.
    let bundle2 = dir.join("bundle-c2");
    std::fs::create_dir_all(&bundle2).expect("mkdir bundle2");
    std::fs::write(
        bundle2.join("config.json"),
        br#"{"annotations":{"io.kubernetes.cri.sandbox-id":"sb1"}}"#,
    )
    .expect("write config.json");
    let (out3, _) = run(&dir, &bundle2, &vmm, &shim_args("c2", "start"));
    assert_eq!(started_address(&out3), address);
    assert_eq!(
        std::fs::read_to_string(bundle2.join("address")).expect("address file"),
        address
    );
    assert_eq!(fake.registered.lock().expect("lock").len(), 1);

    // Shutdown: answered, then the daemon exits and removes its socket.
    let mut sd = ShutdownRequest::new();
    sd.id = "sb1".into();
    client.shutdown(ctx(), &sd).expect("Shutdown");
    assert!(wait_gone(pid), "shim {pid} still running after Shutdown");
    assert!(!Path::new(sock).exists(), "socket file left behind");
    assert!(UnixStream::connect(sock).is_err());

    fake_server.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn delete_stops_an_orphaned_shim() {
    let dir = tmpdir();
    let vmm = dir.join("vmm.sock");
    let (fake_server, fake) = start_fake(&vmm);
    let bundle = dir.join("bundle-sb2");
    std::fs::create_dir_all(&bundle).expect("mkdir bundle");
    let (out, _) = run(&dir, &bundle, &vmm, &shim_args("sb2", "start"));
    let address = started_address(&out);
    let client = TaskClient::new(ttrpc::Client::connect(&address).expect("connect"));
    let pid = client
        .connect(context::with_timeout(5_000_000_000), &ConnectRequest::new())
        .expect("Connect")
        .shim_pid;
    let _reap = Reap(pid);
    drop(client);

    let (out, took) = run(&dir, &bundle, &vmm, &shim_args("sb2", "delete"));
    assert!(out.status.success(), "{out:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let r = DeleteResponse::parse_from_bytes(&out.stdout).expect("a DeleteResponse");
    assert_eq!(r.exit_status, 137);
    assert_eq!(*fake.deleted.lock().expect("lock"), vec!["sb2".to_string()]);
    assert!(wait_gone(pid), "shim {pid} still running after delete");
    let sock = address.strip_prefix("unix://").expect("unix://");
    assert!(!Path::new(sock).exists(), "socket file left behind");

    fake_server.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn version_and_info() {
    let out = Command::new(BIN).arg("-v").output().expect("run");
    assert!(out.status.success());
    let mut s = String::new();
    out.stdout.as_slice().read_to_string(&mut s).expect("utf-8");
    assert!(s.contains("Version:"), "{s}");
    let out = Command::new(BIN).arg("-info").output().expect("run");
    assert!(out.status.success());
    let info =
        kuasar_api::containerd::types::introspection::RuntimeInfo::parse_from_bytes(&out.stdout)
            .expect("RuntimeInfo");
    assert_eq!(info.name, "io.containerd.kuasar-vmm.v2");
}
