//! Hostile and bad input never panics kuasar-vmm nor disturbs other pods:
//! malformed bytes on each of its sockets (its ttrpc socket, its gRPC
//! socket, a zero-shim pod's task socket), ids that try to escape on every
//! entry point that takes one, and real guests that answer garbage or stop
//! answering (the agent's `kuasar.fault=` knob, set for one VM at a time by a
//! QEMU wrapper). Throughout, one "witness" pod keeps running; after every
//! attack it must still answer ExecSync through CRI, and kuasar-vmm must be
//! the same process.
//!
//! One containerd and one kuasar-vmm for the whole file (call timeout 5 s,
//! boot timeout 20 s); the witness pod is removed when the binary exits.
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kuasar_api::services::{CONTROLLER, SANDBOX, SANDBOXER, TASK_V2, TASK_V3};
use kuasar_api::{NAMESPACE_METADATA, SANDBOX_ID_METADATA, TTRPC_ADDRESS_METADATA};
use kuasar_e2e::cri::proto::PodSandboxConfig;
use kuasar_e2e::cri::{spec, Cri};
use kuasar_e2e::env::Shared;
use kuasar_e2e::wire::{self, code, Msg};
use kuasar_e2e::{paths, procs, shared, EnvOptions, BUSYBOX};

/// The zero-shim handler: its pods have a task socket served by kuasar-vmm.
const ZERO: &str = "kuasar-vmm-zero";
/// `[vm] call_timeout_secs` of this file's kuasar-vmm.
const CALL_TIMEOUT_SECS: u64 = 5;
/// `[vm] boot_timeout_secs` of this file's kuasar-vmm.
const BOOT_TIMEOUT_SECS: u64 = 20;
const GRPC_INVALID_ARGUMENT: i32 = 3;

/// The pod that must keep working whatever the other tests do.
struct Witness {
    cri: Cri,
    pod: String,
    container: String,
    task_socket: PathBuf,
    sandboxer_pid: i32,
}

static WITNESS: OnceLock<Witness> = OnceLock::new();

extern "C" fn remove_witness() {
    let _ = std::panic::catch_unwind(|| {
        if let Some(w) = WITNESS.get() {
            let _ = w.cri.stop_and_remove_pod(&w.pod);
        }
    });
}

/// A QEMU that gives the next VM's guest `kuasar.fault=<contents of
/// DIR/fault-next>` on its command line (once), and is plain QEMU otherwise.
fn write_qemu_wrapper(dir: &Path) -> PathBuf {
    let path = dir.join("qemu-fault.sh");
    let script = format!(
        r#"#!/bin/sh
trigger={dir}/fault-next
fault=
if mv "$trigger" "$trigger.$$" 2>/dev/null; then
  fault=$(cat "$trigger.$$")
  rm -f "$trigger.$$"
fi
if [ -n "$fault" ]; then
  n=$#
  append=0
  for a in "$@"; do
    if [ $append = 1 ]; then a="$a kuasar.fault=$fault"; append=0; fi
    [ "$a" = "-append" ] && append=1
    set -- "$@" "$a"
  done
  shift $n
fi
exec /usr/bin/qemu-system-x86_64 "$@"
"#,
        dir = dir.display()
    );
    std::fs::write(&path, script).expect("write the QEMU wrapper");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

fn pod_config(env: &Shared, what: &str) -> PodSandboxConfig {
    let name = env.unique_id(what);
    let log_dir = env.dir().join("pod-logs").join(&name);
    std::fs::create_dir_all(&log_dir).expect("create the pod log dir");
    spec::pod(&name, &log_dir)
}

/// The environment and the witness pod (started on first use).
fn world() -> (Shared, &'static Witness) {
    let env = shared(EnvOptions { sandboxer: false });
    let w = WITNESS.get_or_init(|| {
        // The fault knob lives in the guest agent: an image built before it
        // would make the fault tests fail for the wrong reason. (Its log
        // messages name it; the option's own text is compiled away.)
        let initrd = paths::image_dir().join("initramfs.cpio");
        let image = std::fs::read(&initrd).unwrap_or_else(|e| panic!("{}: {e}", initrd.display()));
        assert!(
            image.windows(14).any(|w| w == b"(kuasar.fault)"),
            "the guest image {} predates the agent's kuasar.fault knob: run `bash scripts/build-guest.sh`",
            initrd.display()
        );
        let mut config = env.sandboxer_config();
        config.qemu_binary = Some(write_qemu_wrapper(env.dir()));
        // The wrapper reads its trigger beside the environment, out of a
        // confined QEMU's sight; the CRI suite checks confinement.
        config.confine = Some(false);
        config.call_timeout_secs = Some(CALL_TIMEOUT_SECS);
        config.boot_timeout_secs = Some(BOOT_TIMEOUT_SECS);
        env.start_sandboxer(config).unwrap_or_else(|e| panic!("{e}"));
        let sandboxer_pid = sandboxer_pid(&env);
        let cri = Cri::connect(&env.address()).unwrap_or_else(|e| panic!("{e}"));
        let cfg = pod_config(&env, "witness");
        let pod = cri
            .run_pod(&cfg, ZERO)
            .unwrap_or_else(|e| panic!("witness pod: {e}\n{}", env.diagnostics()));
        // SAFETY: `remove_witness` is a plain `extern "C" fn()` that never
        // unwinds; registered after the environment's own teardown, so it
        // runs before it.
        if unsafe { libc::atexit(remove_witness) } != 0 {
            eprintln!("kuasar-e2e: atexit failed; the witness pod may be left behind");
        }
        let c = spec::container("sleep", BUSYBOX, &["sleep", "3600"]);
        let container = cri
            .create_container(&pod, &c, &cfg)
            .unwrap_or_else(|e| panic!("witness container: {e}"));
        cri.start_container(&container)
            .unwrap_or_else(|e| panic!("witness start: {e}"));
        let task_socket = env.state_dir().join(&pod).join("task.sock");
        assert!(
            task_socket.exists(),
            "no task socket at {}",
            task_socket.display()
        );
        Witness {
            cri,
            pod,
            container,
            task_socket,
            sandboxer_pid,
        }
    });
    (env, w)
}

fn sandboxer_pid(env: &Shared) -> i32 {
    let text = std::fs::read_to_string(env.dir().join("kuasar-vmm.pid")).expect("kuasar-vmm.pid");
    text.trim().parse().expect("a pid")
}

/// kuasar-vmm is the same process, answers Ping, and the witness pod still
/// runs commands through CRI.
#[track_caller]
fn assert_unharmed(env: &Shared, w: &Witness, after: &str) {
    assert_eq!(
        sandboxer_pid(env),
        w.sandboxer_pid,
        "kuasar-vmm was restarted after {after}"
    );
    assert!(
        procs::alive(w.sandboxer_pid),
        "kuasar-vmm died after {after}\n{}",
        env.diagnostics()
    );
    let ping = wire::ttrpc_call(
        &env.vmm_socket(),
        SANDBOXER,
        "Ping",
        &Msg::new(),
        &[],
        Duration::from_secs(10),
    );
    assert!(
        matches!(&ping, Ok(r) if r.code == code::OK),
        "kuasar-vmm does not answer Ping after {after}: {ping:?}"
    );
    let started = Instant::now();
    let exec = || {
        w.cri
            .exec_sync(&w.container, &["echo", "alive"], 20)
            .unwrap_or_else(|e| {
                panic!(
                    "the witness pod's ExecSync failed after {after}: {e}\n{}",
                    env.diagnostics()
                )
            })
    };
    let r = exec();
    assert_eq!(r.exit_code, 0, "witness after {after}: {r:?}");
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        "alive\n",
        "witness after {after}: {r:?}\n{}",
        env.diagnostics()
    );
    println!(
        "after {after}: kuasar-vmm pid {} unchanged, witness ExecSync in {:?}",
        w.sandboxer_pid,
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// Raw bytes on the sockets.

fn connect(socket: &Path) -> UnixStream {
    let c =
        UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    c
}

/// Pseudo-random bytes (a fixed sequence).
fn garbage(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

fn ttrpc_header(len: u32, stream: u32, kind: u8) -> Vec<u8> {
    let mut h = len.to_be_bytes().to_vec();
    h.extend(stream.to_be_bytes());
    h.extend([kind, 0]);
    h
}

/// How a connection ended after the client stopped sending.
#[derive(Debug)]
enum Ending {
    /// The server closed it (after `n` bytes of answer).
    Closed(usize),
    /// The server answered with these bytes and kept it open.
    Answered(Vec<u8>),
}

/// Sends `bytes`, half-closes when `close`, then reads what comes back
/// until EOF or a pause; panics when nothing happens within 10 s while the
/// client has closed its side (a server hung on the connection).
fn send_and_see(socket: &Path, bytes: &[u8], close: bool) -> Ending {
    let mut c = connect(socket);
    // The server may close before reading everything: not an error here.
    let _ = c.write_all(bytes);
    if close {
        let _ = c.shutdown(std::net::Shutdown::Write);
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return Ending::Closed(got.len()),
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionReset) => {
                return Ending::Closed(got.len())
            }
            Err(e) if !got.is_empty() => {
                let _ = e;
                return Ending::Answered(got);
            }
            Err(e) => panic!(
                "{}: no answer and no close within 10 s after {} bytes{}: {e}",
                socket.display(),
                bytes.len(),
                if close { " and a half-close" } else { "" }
            ),
        }
    }
}

/// The status code of the first ttrpc response in `bytes`.
fn ttrpc_status(bytes: &[u8]) -> Option<i32> {
    let len = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    if bytes.get(8) != Some(&2) {
        return None;
    }
    let body = bytes.get(10..10 + len)?;
    let fields = wire::decode(body).ok()?;
    let Some(wire::Value::Bytes(status)) = wire::field(&fields, 1) else {
        return Some(code::OK);
    };
    let status = wire::decode(status).ok()?;
    match wire::field(&status, 1) {
        Some(wire::Value::Varint(c)) => Some(*c as i32),
        _ => Some(code::OK),
    }
}

/// A ttrpc request frame (stream 1) for `service`/`method` with `payload`.
fn request_frame(service: &str, method: &str, payload: &[u8]) -> Vec<u8> {
    let req = Msg::new()
        .string(1, service)
        .string(2, method)
        .bytes(3, payload)
        .varint(4, 10_000_000_000);
    let mut f = ttrpc_header(req.0.len() as u32, 1, 1);
    f.extend(&req.0);
    f
}

/// Every malformed-message attack on a ttrpc socket; `service` is one it
/// serves.
fn attack_ttrpc_socket(env: &Shared, w: &Witness, socket: &Path, service: &str, method: &str) {
    let name = socket.display().to_string();
    // Random bytes, then a half-close: the server closes.
    let e = send_and_see(socket, &garbage(64 << 10, 7), true);
    println!("{name}: 64 KiB of random bytes -> {e:?}");
    assert!(
        matches!(e, Ending::Closed(_)),
        "{name}: random bytes: {e:?}"
    );
    assert_unharmed(env, w, "random bytes");

    // A header announcing a 4 GiB request: an error or a close, not an
    // allocation of 4 GiB; the connection kept open meanwhile.
    let mut c = connect(socket);
    c.write_all(&ttrpc_header(u32::MAX, 1, 1)).unwrap();
    c.write_all(&[0u8; 1 << 16]).unwrap();
    assert_unharmed(env, w, "a header announcing 4 GiB (connection still open)");
    drop(c);
    let e = send_and_see(socket, &ttrpc_header(u32::MAX, 1, 1), true);
    println!("{name}: header announcing 4 GiB, then half-close -> {e:?}");
    assert!(
        matches!(e, Ending::Closed(_)),
        "{name}: 4 GiB header: {e:?}"
    );
    assert_unharmed(env, w, "a header announcing 4 GiB");

    // A truncated frame, then a close.
    let mut f = request_frame(service, "State", &Msg::new().string(1, "x").0);
    f.truncate(f.len() - 5);
    let e = send_and_see(socket, &f, true);
    println!("{name}: truncated frame, then half-close -> {e:?}");
    assert!(
        matches!(e, Ending::Closed(0)),
        "{name}: truncated frame: {e:?}"
    );
    assert_unharmed(env, w, "a truncated frame");

    // A valid header with a body that is not a protobuf Request.
    let body = [0xffu8; 64];
    let mut f = ttrpc_header(body.len() as u32, 1, 1);
    f.extend(body);
    let e = send_and_see(socket, &f, false);
    println!("{name}: valid header, garbage protobuf -> {e:?}");
    match &e {
        Ending::Answered(b) => {
            let st = ttrpc_status(b);
            assert!(
                st.is_some_and(|c| c != code::OK),
                "{name}: garbage body answered {st:?}"
            );
        }
        Ending::Closed(_) => {}
    }
    assert_unharmed(env, w, "a garbage protobuf body");

    // A request whose payload is garbage, for a real method.
    let e = send_and_see(socket, &request_frame(service, method, &[0xff; 32]), false);
    println!("{name}: {method} with a garbage payload -> {e:?}");
    let Ending::Answered(b) = &e else {
        panic!("{name}: {method} with a garbage payload: {e:?}")
    };
    assert!(
        ttrpc_status(b).is_some_and(|c| c != code::OK),
        "{name}: {e:?}"
    );
    assert_unharmed(env, w, "a garbage request payload");

    // Unknown service, unknown method: errors.
    for (svc, method) in [("no.such.Service", "Call"), (service, "NoSuchMethod")] {
        let r = wire::ttrpc_call(
            socket,
            svc,
            method,
            &Msg::new(),
            &[],
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{name}: {svc}/{method}: {e}"));
        println!("{name}: {svc}/{method} -> code {} {:?}", r.code, r.message);
        assert_ne!(r.code, code::OK, "{name}: {svc}/{method}");
    }
    // An even stream id (clients use odd ones), and a response sent to the server.
    let mut f = request_frame(service, "State", &[]);
    f[4..8].copy_from_slice(&2u32.to_be_bytes());
    let e = send_and_see(socket, &f, false);
    println!("{name}: request on stream 2 -> {e:?}");
    let mut f = request_frame(service, "State", &[]);
    f[8] = 2;
    let e = send_and_see(socket, &f, true);
    println!("{name}: a response frame sent to the server -> {e:?}");
    assert_unharmed(env, w, "unknown services, methods and frame kinds");
}

#[test]
fn malformed_ttrpc_on_the_sandboxer_socket() {
    let (env, w) = world();
    attack_ttrpc_socket(&env, w, &env.vmm_socket(), TASK_V2, "State");
    attack_ttrpc_socket(&env, w, &env.vmm_socket(), SANDBOXER, "RegisterSandbox");
    attack_ttrpc_socket(&env, w, &env.vmm_socket(), SANDBOX, "SandboxStatus");
}

#[test]
fn malformed_ttrpc_on_a_zero_shim_task_socket() {
    let (env, w) = world();
    attack_ttrpc_socket(&env, w, &w.task_socket, TASK_V3, "State");
}

#[test]
fn malformed_http2_on_the_grpc_socket() {
    let (env, w) = world();
    let socket = env.sandboxer_config().grpc_socket();
    let name = socket.display().to_string();
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let attacks: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", garbage(64 << 10, 11)),
        ("the HTTP/2 preface then random bytes", {
            let mut b = PREFACE.to_vec();
            b.extend(garbage(4096, 13));
            b
        }),
        ("the preface, SETTINGS, then a frame announcing 16 MiB", {
            let mut b = PREFACE.to_vec();
            b.extend([0, 0, 0, 4, 0, 0, 0, 0, 0]);
            b.extend([0xff, 0xff, 0xff, 1, 4, 0, 0, 0, 1]);
            b.extend(garbage(1024, 17));
            b
        }),
        (
            "the preface, SETTINGS, HEADERS with a garbage HPACK block",
            {
                let mut b = PREFACE.to_vec();
                b.extend([0, 0, 0, 4, 0, 0, 0, 0, 0]);
                let block = garbage(64, 19);
                b.extend([0, 0, block.len() as u8, 1, 4, 0, 0, 0, 1]);
                b.extend(block);
                b
            },
        ),
        (
            "an HTTP/1.1 request",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        ("a truncated preface", PREFACE[..10].to_vec()),
    ];
    for (what, bytes) in attacks {
        let e = send_and_see(&socket, &bytes, true);
        println!("{name}: {what} -> {e:?}");
        assert!(matches!(e, Ending::Closed(_)), "{name}: {what}: {e:?}");
        assert_unharmed(&env, w, what);
    }
    // A well-formed call of an unknown method, and one with a body that is
    // not the message: gRPC errors.
    let r = grpc_call(&socket, &format!("/{CONTROLLER}/NoSuchMethod"), vec![]);
    println!("{name}: unknown method -> {r:?}");
    assert_eq!(
        r.as_ref().err().map(|s| s.code()),
        Some(tonic::Code::Unimplemented),
        "{r:?}"
    );
    let r = grpc_call(&socket, &format!("/{CONTROLLER}/Status"), vec![0xff; 32]);
    println!("{name}: Status with a garbage body -> {r:?}");
    assert!(r.is_err(), "{r:?}");
    assert_unharmed(&env, w, "bad gRPC calls");
}

#[test]
fn many_idle_connections_on_every_socket() {
    let (env, w) = world();
    let sockets = [
        env.vmm_socket(),
        env.sandboxer_config().grpc_socket(),
        w.task_socket.clone(),
    ];
    let mut idle = Vec::new();
    for s in &sockets {
        for _ in 0..200 {
            idle.push(connect(s));
        }
        // Half of them say a few bytes of a header first.
        for c in idle.iter_mut().rev().take(100) {
            let _ = c.write_all(&[0, 0, 0]);
        }
    }
    println!("{} idle connections open", idle.len());
    assert_unharmed(&env, w, "600 idle connections (still open)");
    let r = grpc_call(
        &sockets[1],
        &format!("/{CONTROLLER}/Status"),
        Msg::new().string(1, &w.pod).0,
    );
    assert!(
        r.is_ok(),
        "gRPC Status of the witness with idle connections open: {r:?}"
    );
    drop(idle);
    assert_unharmed(&env, w, "600 idle connections closed");
}

// ---------------------------------------------------------------------------
// gRPC without the CRI client's types: raw protobuf bodies.

mod raw_grpc {
    use bytes::{Buf, BufMut};
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
    use tonic::Status;

    #[derive(Debug, Clone, Default)]
    pub struct Raw;

    impl Codec for Raw {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = Raw;
        type Decoder = Raw;
        fn encoder(&mut self) -> Raw {
            Raw
        }
        fn decoder(&mut self) -> Raw {
            Raw
        }
    }

    impl Encoder for Raw {
        type Item = Vec<u8>;
        type Error = Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            dst.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for Raw {
        type Item = Vec<u8>;
        type Error = Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
            let mut v = vec![0u8; src.remaining()];
            src.copy_to_slice(&mut v);
            Ok(Some(v))
        }
    }
}

/// One unary gRPC call with a raw protobuf body on a Unix socket.
fn grpc_call(socket: &Path, path: &str, body: Vec<u8>) -> Result<Vec<u8>, tonic::Status> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let socket = socket.to_path_buf();
    let path: tonic::codegen::http::uri::PathAndQuery = path.parse().expect("a gRPC path");
    rt.block_on(async move {
        let endpoint = tonic::transport::Endpoint::try_from("http://[::1]:50051")
            .expect("endpoint")
            .connect_timeout(Duration::from_secs(10));
        let channel = endpoint
            .connect_with_connector(tower::service_fn(move |_: tonic::codegen::http::Uri| {
                let socket = socket.clone();
                async move {
                    tokio::net::UnixStream::connect(socket)
                        .await
                        .map(hyper_util::rt::TokioIo::new)
                }
            }))
            .await
            .map_err(|e| tonic::Status::unavailable(format!("connect: {e:?}")))?;
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("ready: {e}")))?;
        let call = grpc.unary(tonic::Request::new(body), path, raw_grpc::Raw);
        match tokio::time::timeout(Duration::from_secs(30), call).await {
            Ok(r) => r.map(tonic::Response::into_inner),
            Err(_) => Err(tonic::Status::deadline_exceeded("no answer within 30 s")),
        }
    })
}

// ---------------------------------------------------------------------------
// Ids.

/// Ids that are not ids: traversal, separators, empty, too long, NUL.
fn bad_ids() -> Vec<String> {
    vec![
        "../x".into(),
        "..".into(),
        ".".into(),
        "a/b".into(),
        "/abs".into(),
        "".into(),
        "a".repeat(300),
        "a\0b".into(),
        "a b".into(),
    ]
}

#[test]
#[allow(clippy::too_many_lines)] // a test scenario, read top to bottom
fn ids_that_escape_on_every_entry_point() {
    let (env, w) = world();
    let socket = env.vmm_socket();
    let grpc = env.sandboxer_config().grpc_socket();
    let ttrpc_address = format!("{}.ttrpc", env.address().display());
    let t = Duration::from_secs(30);
    let before = env.state_entries();
    // A registered sandbox without a VM, for container ids on the
    // sandboxer's own task API.
    let holder = env.unique_id("idholder");
    let bundle = env.dir().join("bundle-hostile-ids");
    std::fs::create_dir_all(&bundle).unwrap();
    let register = Msg::new()
        .string(1, &holder)
        .string(2, "default")
        .string(3, &bundle.to_string_lossy())
        .string(4, &ttrpc_address);
    let r = wire::ttrpc_call(&socket, SANDBOXER, "RegisterSandbox", &register, &[], t)
        .expect("RegisterSandbox");
    assert_eq!(r.code, code::OK, "{r:?}");

    let mut checked = 0;
    for bad in bad_ids() {
        let shown = format!(
            "{:?}",
            if bad.len() > 20 {
                format!("{}...({} bytes)", &bad[..8], bad.len())
            } else {
                bad.clone()
            }
        );
        // The sandboxer's API: the sandbox id.
        for method in ["RegisterSandbox", "DeleteSandbox"] {
            let body = Msg::new()
                .string(1, &bad)
                .string(2, "default")
                .string(3, &bundle.to_string_lossy())
                .string(4, &ttrpc_address);
            let r = wire::ttrpc_call(&socket, SANDBOXER, method, &body, &[], t)
                .unwrap_or_else(|e| panic!("{method} {shown}: {e}"));
            assert_eq!(r.code, code::INVALID_ARGUMENT, "{method} {shown}: {r:?}");
            checked += 1;
        }
        // containerd's sandbox API (the shim's sandbox mode): field 1 is the
        // sandbox id of every request.
        for method in [
            "CreateSandbox",
            "StartSandbox",
            "Platform",
            "StopSandbox",
            "WaitSandbox",
            "SandboxStatus",
            "ShutdownSandbox",
            "SandboxMetrics",
        ] {
            let md = [
                (NAMESPACE_METADATA, "default"),
                (TTRPC_ADDRESS_METADATA, ttrpc_address.as_str()),
            ];
            let body = Msg::new()
                .string(1, &bad)
                .string(2, &bundle.to_string_lossy());
            let r = wire::ttrpc_call(&socket, SANDBOX, method, &body, &md, t)
                .unwrap_or_else(|e| panic!("{method} {shown}: {e}"));
            assert_eq!(
                r.code,
                code::INVALID_ARGUMENT,
                "sandbox API {method} {shown}: {r:?}"
            );
            checked += 1;
        }
        // The task API on the sandboxer's socket: a bad sandbox id in the
        // metadata, then a bad container id (and exec id) in a good sandbox.
        let task_methods = [
            "Start",
            "State",
            "Wait",
            "Kill",
            "Delete",
            "Exec",
            "CloseIO",
            "Pids",
            "Connect",
            "Stats",
            "ResizePty",
            "Update",
        ];
        for method in task_methods {
            let md = [
                (SANDBOX_ID_METADATA, bad.as_str()),
                (NAMESPACE_METADATA, "default"),
                (TTRPC_ADDRESS_METADATA, ttrpc_address.as_str()),
            ];
            let body = Msg::new().string(1, "c1");
            let r = wire::ttrpc_call(&socket, TASK_V2, method, &body, &md, t)
                .unwrap_or_else(|e| panic!("{method} in sandbox {shown}: {e}"));
            assert_eq!(
                r.code,
                code::INVALID_ARGUMENT,
                "task {method} in sandbox {shown}: {r:?}"
            );
            let md = [
                (SANDBOX_ID_METADATA, holder.as_str()),
                (NAMESPACE_METADATA, "default"),
                (TTRPC_ADDRESS_METADATA, ttrpc_address.as_str()),
            ];
            let body = Msg::new().string(1, &bad);
            let r = wire::ttrpc_call(&socket, TASK_V2, method, &body, &md, t)
                .unwrap_or_else(|e| panic!("{method} of container {shown}: {e}"));
            assert_eq!(
                r.code,
                code::INVALID_ARGUMENT,
                "task {method} of container {shown}: {r:?}"
            );
            checked += 2;
        }
        // A zero-shim pod's own task socket: container ids, and exec ids in
        // the witness's running container.
        for method in task_methods {
            let body = Msg::new().string(1, &bad);
            let r = wire::ttrpc_call(&w.task_socket, TASK_V3, method, &body, &[], t)
                .unwrap_or_else(|e| panic!("task socket {method} {shown}: {e}"));
            assert_eq!(
                r.code,
                code::INVALID_ARGUMENT,
                "task socket {method} of container {shown}: {r:?}"
            );
            checked += 1;
        }
        if !bad.is_empty() {
            for method in [
                "Exec",
                "Start",
                "State",
                "Kill",
                "Delete",
                "ResizePty",
                "CloseIO",
                "Wait",
            ] {
                let spec = Msg::new()
                    .string(
                        1,
                        "types.containerd.io/opencontainers/runtime-spec/1/Process",
                    )
                    .bytes(2, b"{\"args\":[\"true\"],\"cwd\":\"/\"}");
                let body = Msg::new()
                    .string(1, &w.container)
                    .string(2, &bad)
                    .message(7, &spec);
                let r = wire::ttrpc_call(&w.task_socket, TASK_V3, method, &body, &[], t)
                    .unwrap_or_else(|e| panic!("task socket {method} exec {shown}: {e}"));
                assert_eq!(
                    r.code,
                    code::INVALID_ARGUMENT,
                    "task socket {method} of exec {shown}: {r:?}"
                );
                checked += 1;
            }
        }
        // containerd's sandbox Controller (gRPC): field 1 is the sandbox id.
        for method in [
            "Create", "Start", "Platform", "Stop", "Wait", "Status", "Shutdown", "Metrics",
            "Update",
        ] {
            let r = grpc_call(
                &grpc,
                &format!("/{CONTROLLER}/{method}"),
                Msg::new().string(1, &bad).0,
            );
            let code = r.as_ref().err().map(|s| s.code() as i32);
            assert_eq!(
                code,
                Some(GRPC_INVALID_ARGUMENT),
                "Controller/{method} {shown}: {r:?}"
            );
            checked += 1;
        }
    }
    println!("{checked} calls with bad ids, each InvalidArgument");
    let r = wire::ttrpc_call(
        &socket,
        SANDBOXER,
        "DeleteSandbox",
        &Msg::new().string(1, &holder),
        &[],
        t,
    )
    .expect("DeleteSandbox");
    assert_eq!(r.code, code::OK, "{r:?}");
    // Nothing created anywhere a bad id could point to.
    assert_eq!(env.state_entries(), before, "the state dir changed");
    for p in [
        env.dir().join("x"),
        env.dir().join("c1"),
        PathBuf::from("/abs"),
        env.dir().join("a"),
    ] {
        assert!(!p.exists(), "{} exists", p.display());
    }
    assert_unharmed(&env, w, "bad ids on every entry point");
    let _ = std::fs::remove_dir_all(&bundle);
}

// ---------------------------------------------------------------------------
// Guests that misbehave: the agent's `kuasar.fault=` knob, given to the next
// VM only by the QEMU wrapper.

/// Makes the next VM's guest misbehave (`silent`, `garbage`, `MODE@METHOD`).
fn arm_fault(env: &Shared, fault: &str) -> PathBuf {
    let trigger = env.dir().join("fault-next");
    std::fs::write(&trigger, fault).expect("write the fault trigger");
    trigger
}

/// Removes the trigger if no VM took it (so that it cannot hit a later test).
struct Disarm(PathBuf);

impl Drop for Disarm {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Nothing is left of pods other than the witness: no QEMU, no state
/// directory, no mount under the state directory.
#[track_caller]
fn assert_only_witness_left(env: &Shared, w: &Witness) {
    let state = env.state_dir();
    // Mounts below the state directory (kuasar-vmm's bind of the
    // directory itself, which makes it a shared mount, stays).
    let below = format!("{}/", state.to_string_lossy());
    let foreign_mounts = || -> Vec<String> {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                l.split(' ').nth(4).is_some_and(|m| m.starts_with(&below)) && !l.contains(&w.pod)
            })
            .map(str::to_owned)
            .collect()
    };
    let clean = kuasar_e2e::cmd::wait_until(Duration::from_secs(30), || {
        env.qemu_count() == 1
            && env.state_entries() == [w.pod.clone()]
            && foreign_mounts().is_empty()
    });
    assert!(
        clean,
        "left behind: {} QEMU (1 expected: the witness), state entries {:?}, mounts {:?}\n{}",
        env.qemu_count(),
        env.state_entries(),
        foreign_mounts(),
        env.diagnostics()
    );
}

/// The status's text, lower-case.
fn text(e: &tonic::Status) -> String {
    format!("{:?} {}", e.code(), e.message()).to_lowercase()
}

#[test]
fn a_guest_that_never_answers_fails_within_the_boot_timeout() {
    let (env, w) = world();
    let _disarm = Disarm(arm_fault(&env, "silent"));
    let cfg = pod_config(&env, "silent-boot");
    let started = Instant::now();
    let r = w.cri.run_pod(&cfg, ZERO);
    let took = started.elapsed();
    println!("RunPodSandbox of a guest that never answers: {took:?}: {r:?}");
    assert!(
        !env.dir().join("fault-next").exists(),
        "no VM took the fault"
    );
    let err = r.expect_err("a pod whose guest never answers became ready");
    let boot = Duration::from_secs(BOOT_TIMEOUT_SECS);
    assert!(
        took >= boot - Duration::from_secs(1) && took < boot + Duration::from_secs(20),
        "failed after {took:?}, not at the boot timeout ({boot:?})"
    );
    assert!(
        text(&err).contains("did not come up within"),
        "the error does not say the guest missed its boot deadline: {err:?}"
    );
    assert_only_witness_left(&env, w);
    assert_unharmed(&env, w, "a guest that never answered");
}

#[test]
fn a_guest_that_sends_garbage_at_boot_is_cut_off() {
    let (env, w) = world();
    let _disarm = Disarm(arm_fault(&env, "garbage"));
    let cfg = pod_config(&env, "garbage-boot");
    let started = Instant::now();
    let r = w.cri.run_pod(&cfg, ZERO);
    let took = started.elapsed();
    println!("RunPodSandbox of a guest that answers garbage: {took:?}: {r:?}");
    assert!(
        !env.dir().join("fault-next").exists(),
        "no VM took the fault"
    );
    let err = r.expect_err("a pod whose guest answers garbage became ready");
    assert!(
        text(&err).contains("broke the agent protocol"),
        "the error does not say the guest broke the protocol: {err:?}"
    );
    // Cut off at the first bad frame, not left to the boot timeout.
    assert!(
        took < Duration::from_secs(BOOT_TIMEOUT_SECS),
        "took {took:?}: the garbage was not noticed before the boot timeout"
    );
    assert_only_witness_left(&env, w);
    assert_unharmed(&env, w, "a guest that answered garbage at boot");
}

/// A pod (zero-shim) with a running container whose guest shows `fault`
/// from the first ExecProcess on; then ExecSync into it, and the pod's
/// removal.
fn fault_after_boot(fault: &str, what: &str) -> (tonic::Status, Duration) {
    let (env, w) = world();
    let _disarm = Disarm(arm_fault(&env, &format!("{fault}@ExecProcess")));
    let cfg = pod_config(&env, what);
    let pod = kuasar_e2e::cri::guard::PodGuard::run(&w.cri, cfg.clone(), ZERO)
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", env.diagnostics()));
    assert!(
        !env.dir().join("fault-next").exists(),
        "no VM took the fault"
    );
    let c = spec::container("sleep", BUSYBOX, &["sleep", "3600"]);
    let cid = w
        .cri
        .create_container(&pod.id, &c, &cfg)
        .unwrap_or_else(|e| panic!("CreateContainer: {e}"));
    w.cri
        .start_container(&cid)
        .unwrap_or_else(|e| panic!("StartContainer: {e}"));
    assert_unharmed(
        &env,
        w,
        &format!("starting a pod whose guest will go {fault}"),
    );

    let started = Instant::now();
    let r = w.cri.exec_sync(&cid, &["echo", "hello"], 60);
    let took = started.elapsed();
    println!("ExecSync into a guest gone {fault}: {took:?}: {r:?}");
    let err = r.expect_err("ExecSync into a misbehaving guest succeeded");
    assert_unharmed(&env, w, &format!("a guest that went {fault} after boot"));

    // Stopping and removing the pod does not depend on its guest answering.
    let started = Instant::now();
    let removed = pod.remove();
    println!("removing the pod: {:?}: {removed:?}", started.elapsed());
    removed.unwrap_or_else(|e| panic!("removing the pod: {e}\n{}", env.diagnostics()));
    assert_only_witness_left(&env, w);
    assert_unharmed(&env, w, &format!("removing a pod whose guest went {fault}"));
    (err, took)
}

#[test]
fn a_guest_that_sends_garbage_after_boot_is_cut_off() {
    let (err, took) = fault_after_boot("garbage", "garbage-late");
    assert!(
        text(&err).contains("broke the agent protocol"),
        "the error does not say the guest broke the protocol: {err:?}"
    );
    assert!(
        took < Duration::from_secs(CALL_TIMEOUT_SECS),
        "took {took:?}: cut off only by the call timeout"
    );
}

#[test]
fn a_guest_that_stops_answering_after_boot_fails_calls_within_the_call_timeout() {
    let (err, took) = fault_after_boot("silent", "silent-late");
    let t = Duration::from_secs(CALL_TIMEOUT_SECS);
    assert!(
        took >= t - Duration::from_millis(500) && took < t + Duration::from_secs(15),
        "ExecSync failed after {took:?}, not at the call timeout ({t:?})"
    );
    assert!(
        text(&err).contains("timed out after"),
        "the error does not say the agent call timed out: {err:?}"
    );
}
