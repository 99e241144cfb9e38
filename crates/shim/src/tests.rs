//! In-process tests of the relay: a fake sandboxer (a real ttrpc sync
//! server implementing containerd's Task service), the shim's relay server
//! on a temp socket, and containerd's side played by a ttrpc `TaskClient`.

use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kuasar_api::containerd::api::Empty;
use kuasar_api::containerd::shim::shim::*;
use kuasar_api::containerd::shim::shim_ttrpc::{create_task, Task, TaskClient};
use kuasar_api::protobuf::Message;
use kuasar_api::ttrpc::{self, context, Code, TtrpcContext};
use kuasar_api::{services, NAMESPACE_METADATA, SANDBOX_ID_METADATA, TTRPC_ADDRESS_METADATA};

use crate::relay::TaskRelay;
use crate::sandboxer::{status, Vmm};
use crate::serve;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A fresh short temp dir (socket paths must fit in 108 bytes).
fn tmpdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "ksh-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("mkdir");
    d
}

fn first(ctx: &TtrpcContext, key: &str) -> String {
    ctx.metadata
        .get(key)
        .and_then(|v| v.first())
        .cloned()
        .unwrap_or_default()
}

/// Fake sandboxer task service. `incarnation` tells instances apart.
struct FakeVmm {
    incarnation: u32,
    /// Wait: report arrival, then block until told to "crash".
    wait_arrived: Mutex<Option<Sender<()>>>,
    wait_crash: Mutex<Option<Receiver<()>>>,
}

impl FakeVmm {
    fn new(incarnation: u32) -> Self {
        FakeVmm {
            incarnation,
            wait_arrived: Mutex::new(None),
            wait_crash: Mutex::new(None),
        }
    }
}

impl Task for FakeVmm {
    /// Echoes what it received: metadata in the string fields, the
    /// request timeout (ms) in exit_status, its incarnation in pid.
    fn state(&self, ctx: &TtrpcContext, req: StateRequest) -> ttrpc::Result<StateResponse> {
        let mut r = StateResponse::new();
        r.id = req.id;
        r.exec_id = req.exec_id;
        r.bundle = first(ctx, SANDBOX_ID_METADATA);
        r.stdin = first(ctx, NAMESPACE_METADATA);
        r.stdout = first(ctx, TTRPC_ADDRESS_METADATA);
        r.stderr = first(ctx, "x-caller");
        r.pid = self.incarnation;
        r.exit_status = (ctx.timeout_nano / 1_000_000) as u32;
        Ok(r)
    }
    fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> ttrpc::Result<Empty> {
        Err(ttrpc::Error::RpcStatus(status(
            Code::NOT_FOUND,
            format!("container {} not found", req.id),
        )))
    }
    fn connect(&self, _ctx: &TtrpcContext, _req: ConnectRequest) -> ttrpc::Result<ConnectResponse> {
        let mut r = ConnectResponse::new();
        r.task_pid = 7;
        r.shim_pid = 1;
        r.version = "fake".into();
        Ok(r)
    }
    fn shutdown(&self, _ctx: &TtrpcContext, req: ShutdownRequest) -> ttrpc::Result<Empty> {
        if req.id == "gone" {
            return Err(ttrpc::Error::RpcStatus(status(
                Code::NOT_FOUND,
                "no sandbox",
            )));
        }
        if req.id == "busy" {
            return Err(ttrpc::Error::RpcStatus(status(
                Code::FAILED_PRECONDITION,
                "sandbox has containers",
            )));
        }
        Ok(Empty::new())
    }
    fn wait(&self, ctx: &TtrpcContext, _req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        let crash = self.wait_crash.lock().expect("lock").take();
        if let Some(crash) = crash {
            if let Some(tx) = self.wait_arrived.lock().expect("lock").take() {
                let _ = tx.send(());
            }
            let _ = crash.recv();
            // Simulate the sandboxer dying mid-call: the client sees EOF.
            // SAFETY: shutdown(2) on the connection fd ttrpc gave us.
            unsafe {
                libc::shutdown(ctx.fd, libc::SHUT_RDWR);
            }
            return Err(ttrpc::Error::RpcStatus(status(Code::UNKNOWN, "crashed")));
        }
        let mut r = WaitResponse::new();
        r.exit_status = 40 + self.incarnation;
        Ok(r)
    }
}

/// Stops a fake sandboxer like a dying process would: ttrpc's
/// `Server::shutdown` leaves the listening socket open (connections would
/// queue in its backlog forever), so close it, and remove the socket file.
fn stop_fake(server: ttrpc::Server, path: &Path) {
    stop_listening(server, path).disconnect();
}

fn stop_listening(server: ttrpc::Server, path: &Path) -> ttrpc::Server {
    let listener = server.as_raw_fd();
    let server = server.stop_listen();
    // SAFETY: the listener fd belongs to the server whose accept thread
    // has just been joined; nothing else uses or closes it.
    unsafe {
        libc::close(listener);
    }
    let _ = std::fs::remove_file(path);
    server
}

fn start_fake(path: &Path, fake: FakeVmm) -> ttrpc::Server {
    let _ = std::fs::remove_file(path);
    let mut s = ttrpc::Server::new()
        .bind(&format!("unix://{}", path.display()))
        .expect("bind fake")
        .register_service(create_task(Arc::new(fake)));
    s.start().expect("start fake");
    s
}

struct Shim {
    server: ttrpc::Server,
    addr: String,
    shutdowns: Arc<AtomicUsize>,
}

fn start_shim(dir: &Path, vmm: Vmm) -> Shim {
    let shutdowns = Arc::new(AtomicUsize::new(0));
    let count = shutdowns.clone();
    let relay = TaskRelay::new(
        Arc::new(vmm),
        "sb1",
        "k8s.io",
        "/run/containerd/containerd.sock.ttrpc",
        Box::new(move || {
            count.fetch_add(1, Ordering::SeqCst);
        }),
    );
    let addr = format!("unix://{}", dir.join("shim.sock").display());
    let mut server = serve::server(Arc::new(relay))
        .bind(&addr)
        .expect("bind shim");
    server.start().expect("start shim");
    Shim {
        server,
        addr,
        shutdowns,
    }
}

fn client(addr: &str) -> TaskClient {
    TaskClient::new(ttrpc::Client::connect(addr).expect("connect shim"))
}

fn ctx(timeout: Duration) -> context::Context {
    let mut c = context::with_timeout(timeout.as_nanos() as i64);
    c.add("x-caller".into(), "containerd".into());
    // A caller cannot spoof the sandbox: the relay overrides this.
    c.add(SANDBOX_ID_METADATA.into(), "evil".into());
    c
}

fn state_req(id: &str) -> StateRequest {
    let mut r = StateRequest::new();
    r.id = id.into();
    r
}

fn rpc_code(e: &ttrpc::Error) -> (Code, String) {
    match e {
        ttrpc::Error::RpcStatus(s) => (s.code(), s.message.clone()),
        other => panic!("not a status: {other:?}"),
    }
}

#[test]
fn relays_state_with_metadata_and_timeout() {
    let dir = tmpdir();
    let vmm_sock = dir.join("vmm.sock");
    let fake = start_fake(&vmm_sock, FakeVmm::new(1));
    let shim = start_shim(&dir, Vmm::new(vmm_sock.clone()));
    let c = client(&shim.addr);

    let r = c
        .state(ctx(Duration::from_secs(5)), &state_req("c1"))
        .expect("State");
    assert_eq!(r.id, "c1");
    assert_eq!(r.bundle, "sb1", "{SANDBOX_ID_METADATA}");
    assert_eq!(r.stdin, "k8s.io", "{NAMESPACE_METADATA}");
    assert_eq!(
        r.stdout, "/run/containerd/containerd.sock.ttrpc",
        "{TTRPC_ADDRESS_METADATA}"
    );
    assert_eq!(r.stderr, "containerd", "caller metadata passed through");
    assert_eq!(r.pid, 1);
    // The remaining part of the caller's 5 s timeout was passed on.
    assert!(
        r.exit_status > 4000 && r.exit_status <= 5000,
        "{}",
        r.exit_status
    );

    // The same service under the v3 name (raw request).
    let raw = ttrpc::Client::connect(&shim.addr).expect("connect");
    let mut req = ttrpc::Request::new();
    req.service = services::TASK_V3.into();
    req.method = "State".into();
    req.payload = state_req("c3").write_to_bytes().expect("encode");
    let resp = raw.request(req).expect("v3 State");
    let r = StateResponse::parse_from_bytes(&resp.payload).expect("decode");
    assert_eq!((r.id.as_str(), r.bundle.as_str()), ("c3", "sb1"));

    // Statuses are relayed unchanged.
    let mut kill = KillRequest::new();
    kill.id = "nope".into();
    let e = c.kill(ctx(Duration::from_secs(5)), &kill).unwrap_err();
    assert_eq!(
        rpc_code(&e),
        (Code::NOT_FOUND, "container nope not found".to_string())
    );
    // Methods the fake does not implement: its own Unimplemented status.
    let e = c
        .pids(ctx(Duration::from_secs(5)), &PidsRequest::new())
        .unwrap_err();
    assert_eq!(rpc_code(&e).0, Code::NOT_FOUND, "{e:?}");

    // Connect: the shim reports itself.
    let r = c
        .connect(ctx(Duration::from_secs(5)), &ConnectRequest::new())
        .expect("Connect");
    assert_eq!((r.shim_pid, r.task_pid), (std::process::id(), 7));

    // Shutdown: refused -> relayed, no exit; accepted or gone -> exit.
    let mut sd = ShutdownRequest::new();
    sd.id = "busy".into();
    let e = c.shutdown(ctx(Duration::from_secs(5)), &sd).unwrap_err();
    assert_eq!(rpc_code(&e).0, Code::FAILED_PRECONDITION);
    assert_eq!(shim.shutdowns.load(Ordering::SeqCst), 0);
    sd.id = "sb1".into();
    c.shutdown(ctx(Duration::from_secs(5)), &sd)
        .expect("Shutdown");
    assert_eq!(shim.shutdowns.load(Ordering::SeqCst), 1);
    sd.id = "gone".into();
    c.shutdown(ctx(Duration::from_secs(5)), &sd)
        .expect("Shutdown of a gone sandbox succeeds");
    assert_eq!(shim.shutdowns.load(Ordering::SeqCst), 2);

    shim.server.shutdown();
    stop_fake(fake, &vmm_sock);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn reconnects_after_sandboxer_restart() {
    let dir = tmpdir();
    let vmm_sock = dir.join("vmm.sock");
    let fake = start_fake(&vmm_sock, FakeVmm::new(1));
    let shim = start_shim(&dir, Vmm::new(vmm_sock.clone()));
    let c = client(&shim.addr);

    let r = c
        .state(ctx(Duration::from_secs(5)), &state_req("c1"))
        .expect("State 1");
    assert_eq!(r.pid, 1);

    // Sandboxer stops; a new one comes up 300 ms later while a call is
    // already waiting: the call reconnects and succeeds.
    stop_fake(fake, &vmm_sock);
    let sock = vmm_sock.clone();
    let restarted = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        start_fake(&sock, FakeVmm::new(2))
    });
    let t = Instant::now();
    let r = c
        .state(ctx(Duration::from_secs(5)), &state_req("c1"))
        .expect("State 2");
    assert_eq!(r.pid, 2, "answered by the restarted sandboxer");
    assert!(t.elapsed() >= Duration::from_millis(250));
    assert_eq!(r.bundle, "sb1");
    let fake2 = restarted.join().expect("join");

    // And again without a pause (stale connection replaced at once).
    stop_fake(fake2, &vmm_sock);
    let fake3 = start_fake(&vmm_sock, FakeVmm::new(3));
    let r = c
        .state(ctx(Duration::from_secs(5)), &state_req("c1"))
        .expect("State 3");
    assert_eq!(r.pid, 3);

    shim.server.shutdown();
    stop_fake(fake3, &vmm_sock);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn wait_survives_sandboxer_restart() {
    let dir = tmpdir();
    let vmm_sock = dir.join("vmm.sock");
    let f1 = FakeVmm::new(1);
    let (arrived_tx, arrived_rx) = channel();
    let (crash_tx, crash_rx) = channel();
    *f1.wait_arrived.lock().expect("lock") = Some(arrived_tx);
    *f1.wait_crash.lock().expect("lock") = Some(crash_rx);
    let fake = start_fake(&vmm_sock, f1);
    let shim = start_shim(&dir, Vmm::new(vmm_sock.clone()));
    let addr = shim.addr.clone();

    let done = Arc::new(AtomicBool::new(false));
    let done2 = done.clone();
    let waiter = std::thread::spawn(move || {
        let c = client(&addr);
        let mut req = WaitRequest::new();
        req.id = "c1".into();
        // No timeout, like containerd's Wait.
        let r = c.wait(context::Context::default(), &req);
        done2.store(true, Ordering::SeqCst);
        r
    });
    arrived_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("Wait reached the sandboxer");
    // The sandboxer "crashes" mid-Wait and stays down for 1.5 s.
    // Stop accepting first (a dead process accepts nothing), then drop
    // the connection that carries the Wait.
    let fake = stop_listening(fake, &vmm_sock);
    crash_tx.send(()).expect("crash");
    fake.disconnect();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !done.load(Ordering::SeqCst),
        "Wait must not fail while kuasar-vmm is down"
    );
    let fake2 = start_fake(&vmm_sock, FakeVmm::new(2));
    let r = waiter.join().expect("join").expect("Wait answered");
    assert_eq!(r.exit_status, 42, "answered by the restarted sandboxer");

    shim.server.shutdown();
    stop_fake(fake2, &vmm_sock);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unreachable_sandboxer_is_unavailable_naming_the_socket() {
    let dir = tmpdir();
    let vmm_sock = dir.join("vmm.sock");
    let shim = start_shim(
        &dir,
        Vmm::new(vmm_sock.clone()).with_window(Duration::from_millis(300)),
    );
    let c = client(&shim.addr);
    let t = Instant::now();
    let e = c
        .state(ctx(Duration::from_secs(5)), &state_req("c1"))
        .unwrap_err();
    let (code, msg) = rpc_code(&e);
    assert_eq!(code, Code::UNAVAILABLE);
    assert!(
        msg.contains(&format!(
            "kuasar-vmm is not reachable at {}",
            vmm_sock.display()
        )),
        "{msg}"
    );
    assert!(t.elapsed() >= Duration::from_millis(250));
    shim.server.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
