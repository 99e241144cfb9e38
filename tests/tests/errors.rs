//! Failure paths: no sandboxer, shim `delete` without a sandboxer, bad
//! configurations, a kernel that vanished, a guest that never comes up, and
//! ids that try to escape the state directory. One containerd for all; each
//! test starts the kuasar-vmm it needs (or none) and stops it at the end.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kuasar_api::services::SANDBOXER;
use kuasar_api::services::TASK_V2 as TASK_SERVICE;
use kuasar_api::{NAMESPACE_METADATA, SANDBOX_ID_METADATA, TTRPC_ADDRESS_METADATA, VMM_SOCKET_ENV};
use kuasar_e2e::env::Shared;
use kuasar_e2e::sandboxer::{run_expecting_exit, SandboxerConfig};
use kuasar_e2e::wire::{self, code, Msg, Value};
use kuasar_e2e::{cmd, paths, procs, shared, EnvOptions};

const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// (tests/hostile.rs covers the other entry points, and NUL bytes, which
/// cannot be passed on the shim's command line.)
const BAD_IDS: &[&str] = &[
    "../evil",
    "..",
    "a/b",
    "/abs",
    "",
    "a-very-long-id-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
];

fn env() -> Shared {
    shared(EnvOptions { sandboxer: false })
}

/// Stops the test's sandboxer when the test ends, however it ends.
struct StopSandboxer<'a>(&'a Shared);

impl Drop for StopSandboxer<'_> {
    fn drop(&mut self) {
        self.0.stop_sandboxer();
    }
}

fn start_sandboxer<'a>(env: &'a Shared, config: SandboxerConfig) -> StopSandboxer<'a> {
    if let Err(e) = env.start_sandboxer(config) {
        panic!("{e}");
    }
    StopSandboxer(env)
}

/// A copy of the guest image in the environment's directory.
fn image_copy(env: &Shared, name: &str) -> PathBuf {
    let dst = env.dir().join(format!("img-{name}"));
    fs::create_dir_all(&dst).expect("create image copy dir");
    for f in ["vmlinux", "initramfs.cpio", "kernel-release", "virtiofsd"] {
        let src = paths::image_dir().join(f);
        fs::copy(&src, dst.join(f))
            .unwrap_or_else(|e| panic!("copy {} to {}: {e}", src.display(), dst.display()));
    }
    dst
}

fn contains(haystack: &str, needle: &Path) -> bool {
    haystack.contains(&*needle.to_string_lossy())
}

#[test]
fn run_without_sandboxer_fails_and_names_the_socket() {
    let env = env();
    env.stop_sandboxer();
    let id = env.unique_id("nosb");
    let _g = env.guard(&id);
    let out = env.run_vm_with(&id, &["true"], None, Duration::from_secs(60));
    println!("{out}");
    assert!(!out.success() && !out.timed_out, "{out}");
    assert!(
        contains(&out.combined(), &env.vmm_socket()),
        "the error does not name {}:\n{out}",
        env.vmm_socket().display()
    );
    env.assert_clean();
}

#[test]
fn shim_delete_works_without_sandboxer() {
    let env = env();
    let bundle = env.dir().join("bundle-foo");
    fs::create_dir_all(&bundle).expect("create bundle");
    let mut c = Command::new(paths::bin_dir().join("containerd-shim-kuasar-vmm-v2"));
    c.args([
        "-namespace",
        "default",
        "-address",
        "x",
        "-id",
        "foo",
        "-bundle",
    ])
    .arg(&bundle)
    .arg("delete")
    .current_dir(&bundle)
    .env(VMM_SOCKET_ENV, env.dir().join("dead/vmm.sock"))
    .env("KUASAR_SHIM_SOCKET_DIR", env.dir().join("s"))
    .env("KUASAR_TEST_DIR", env.dir());
    let out = cmd::run(&mut c, None, Duration::from_secs(30));
    assert_eq!(out.code, Some(0), "{out}");
    assert!(
        out.elapsed < Duration::from_secs(10),
        "delete took {:?}",
        out.elapsed
    );
    // A containerd.task.v2.DeleteResponse: pid = 1, exit_status = 2,
    // exited_at = 3 (a Timestamp).
    let raw = &out.raw_stdout;
    let fields = wire::decode(raw).unwrap_or_else(|e| panic!("not protobuf ({e}): {raw:?}"));
    for (f, _) in &fields {
        assert!((1..=3).contains(f), "unexpected field {f} in {fields:?}");
    }
    assert_eq!(
        wire::field(&fields, 2),
        Some(&Value::Varint(137)),
        "{fields:?}"
    );
    assert!(
        matches!(wire::field(&fields, 3), Some(Value::Bytes(_))),
        "no exited_at: {fields:?}"
    );
    let _ = fs::remove_dir_all(&bundle);
}

#[test]
fn sandboxer_refuses_missing_paths() {
    let env = env();
    let no_kernel = image_copy(&env, "nokernel");
    fs::remove_file(no_kernel.join("vmlinux")).expect("remove vmlinux");
    let no_initrd = image_copy(&env, "noinitrd");
    fs::remove_file(no_initrd.join("initramfs.cpio")).expect("remove initramfs");
    let base = || {
        let mut c = SandboxerConfig::for_dir(env.dir());
        c.socket = env.dir().join("bad.sock");
        c.state_dir = env.dir().join("bad");
        c
    };
    let qemu = PathBuf::from("/nonexistent/qemu-system-x86_64");
    let absent_dir = PathBuf::from("/nonexistent/kuasar-images");
    let cases: Vec<(&str, SandboxerConfig, PathBuf)> = vec![
        (
            "kernel",
            SandboxerConfig {
                image_dir: no_kernel.clone(),
                ..base()
            },
            no_kernel.join("vmlinux"),
        ),
        (
            "kernel-setting",
            SandboxerConfig {
                image_dir: no_initrd.clone(),
                kernel: Some("vmlinux-debian".into()),
                ..base()
            },
            no_initrd.join("vmlinux-debian"),
        ),
        (
            "initramfs",
            SandboxerConfig {
                image_dir: no_initrd.clone(),
                ..base()
            },
            no_initrd.join("initramfs.cpio"),
        ),
        (
            "qemu",
            SandboxerConfig {
                qemu_binary: Some(qemu.clone()),
                ..base()
            },
            qemu,
        ),
        (
            "image_dir",
            SandboxerConfig {
                image_dir: absent_dir.clone(),
                ..base()
            },
            absent_dir,
        ),
    ];
    for (what, config, path) in cases {
        let out = run_expecting_exit(
            env.dir(),
            &config,
            &format!("bad-{what}"),
            Duration::from_secs(20),
        );
        println!("{out}");
        assert!(
            !out.timed_out && out.code.is_some_and(|c| c != 0),
            "kuasar-vmm with a missing {what} did not refuse to start:\n{out}"
        );
        assert!(
            contains(&out.combined(), &path),
            "the error for a missing {what} does not name {}:\n{out}",
            path.display()
        );
        assert!(!config.socket.exists(), "{what}: socket created anyway");
    }
    assert_eq!(env.qemu_count(), 0);
    let _ = fs::remove_dir_all(&no_kernel);
    let _ = fs::remove_dir_all(&no_initrd);
}

#[test]
fn kernel_removed_after_start_fails_cleanly() {
    let env = env();
    let images = image_copy(&env, "vanish");
    let mut config = env.sandboxer_config();
    config.image_dir = images.clone();
    let _sb = start_sandboxer(&env, config);
    let kernel = images.join("vmlinux");
    fs::remove_file(&kernel).expect("remove vmlinux");

    let id = env.unique_id("vanish");
    let _g = env.guard(&id);
    let out = env.run_vm(&id, &["true"]);
    println!("{out}");
    assert!(!out.success() && !out.timed_out, "{out}");
    assert!(
        contains(&out.combined(), &kernel),
        "the error does not name {}:\n{out}\n{}",
        kernel.display(),
        env.diagnostics()
    );
    env.assert_clean();
    let _ = fs::remove_dir_all(&images);
}

#[test]
fn bogus_kernel_fails_and_leaves_nothing() {
    let env = env();
    let images = image_copy(&env, "bogus");
    fs::write(images.join("vmlinux"), b"this is not a kernel\n").expect("write bogus vmlinux");
    let mut config = env.sandboxer_config();
    config.image_dir = images.clone();
    config.boot_timeout_secs = Some(3);
    let _sb = start_sandboxer(&env, config);

    let id = env.unique_id("bogus");
    let _g = env.guard(&id);
    let out = env.run_vm_with(&id, &["true"], None, Duration::from_secs(90));
    println!("{out}");
    assert!(!out.success() && !out.timed_out, "{out}");
    assert!(
        out.elapsed < Duration::from_secs(60),
        "took {:?}",
        out.elapsed
    );
    // QEMU refuses the kernel and exits: the error should say so (e.g. "the
    // VMM exited during start ...: <QEMU's message>"), not report a broken
    // agent connection.
    let text = out.combined().to_lowercase();
    assert!(
        text.contains("exited") || text.contains("qemu") || text.contains("vmm"),
        "the error does not say that the VMM failed:\n{out}\n{}",
        env.diagnostics()
    );
    env.assert_clean();
    let _ = fs::remove_dir_all(&images);
}

#[test]
fn hanging_guest_times_out() {
    let env = env();
    let mut config = env.sandboxer_config();
    config.boot_timeout_secs = Some(3);
    // No init and no root filesystem: the kernel panics, and with panic=0
    // (the last panic= wins) it hangs instead of rebooting.
    config.kernel_params = Some("rdinit=/kuasar-e2e-no-such-init panic=0".into());
    let _sb = start_sandboxer(&env, config);

    let id = env.unique_id("hang");
    let _g = env.guard(&id);
    let out = env.run_vm_with(&id, &["true"], None, Duration::from_secs(90));
    println!("{out}");
    assert!(!out.success() && !out.timed_out, "{out}");
    assert!(
        out.elapsed < Duration::from_secs(45),
        "took {:?}",
        out.elapsed
    );
    // Something like "the guest agent did not come up within 3s": a
    // transport error ("Receive packet timeout") does not say what happened.
    let text = out.combined().to_lowercase();
    assert!(
        text.contains("within") || text.contains("timed out"),
        "the error does not say the guest missed its boot deadline:\n{out}\n{}",
        env.diagnostics()
    );
    env.assert_clean();
}

fn ping(socket: &Path) -> u64 {
    let reply = wire::ttrpc_call(socket, SANDBOXER, "Ping", &Msg::new(), &[], CALL_TIMEOUT)
        .unwrap_or_else(|e| panic!("Ping: {e}"));
    assert_eq!(reply.code, code::OK, "Ping: {reply:?}");
    let fields = wire::decode(&reply.payload).expect("PingResponse");
    match wire::field(&fields, 2) {
        Some(Value::Varint(n)) => *n,
        _ => 0,
    }
}

#[test]
#[allow(clippy::too_many_lines)] // a test scenario, read top to bottom
fn ids_that_escape_are_rejected() {
    let env = env();
    let _sb = start_sandboxer(&env, env.sandboxer_config());
    let socket = env.vmm_socket();
    let bundle = env.dir().join("bundle-ids");
    fs::create_dir_all(&bundle).expect("create bundle");
    // What a path traversal from the state dir would hit.
    let sentinel = env.dir().join("evil");
    fs::create_dir_all(&sentinel).expect("create sentinel");
    fs::write(sentinel.join("keep"), b"keep").expect("write sentinel");
    let ttrpc_address = format!("{}.ttrpc", env.address().display());

    // ctr/containerd refuse such ids themselves; the shim binary and the
    // sandboxer's socket are what else could receive them.
    for bad in BAD_IDS {
        for verb in ["start", "delete"] {
            let mut c = Command::new(paths::bin_dir().join("containerd-shim-kuasar-vmm-v2"));
            c.args(["-namespace", "default", "-address"])
                .arg(env.address())
                .args([
                    "-publish-binary",
                    "/usr/bin/containerd",
                    "-id",
                    bad,
                    "-bundle",
                ])
                .arg(&bundle)
                .arg(verb)
                .current_dir(&bundle)
                .env(VMM_SOCKET_ENV, &socket)
                .env("KUASAR_SHIM_SOCKET_DIR", env.dir().join("s"))
                .env("TTRPC_ADDRESS", &ttrpc_address)
                .env("KUASAR_TEST_DIR", env.dir());
            let out = cmd::run(&mut c, None, Duration::from_secs(30));
            assert!(!out.timed_out, "{out}");
            if verb == "start" {
                assert!(!out.success(), "shim start accepted id {bad:?}:\n{out}");
            }
        }

        let register = Msg::new()
            .string(1, bad)
            .string(2, "default")
            .string(3, &bundle.to_string_lossy())
            .string(4, &ttrpc_address);
        let r = wire::ttrpc_call(
            &socket,
            SANDBOXER,
            "RegisterSandbox",
            &register,
            &[],
            CALL_TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("RegisterSandbox {bad:?}: {e}"));
        assert_eq!(
            r.code,
            code::INVALID_ARGUMENT,
            "RegisterSandbox {bad:?}: {r:?}"
        );

        let delete = Msg::new().string(1, bad);
        let r = wire::ttrpc_call(
            &socket,
            SANDBOXER,
            "DeleteSandbox",
            &delete,
            &[],
            CALL_TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("DeleteSandbox {bad:?}: {e}"));
        assert_eq!(
            r.code,
            code::INVALID_ARGUMENT,
            "DeleteSandbox {bad:?}: {r:?}"
        );

        let create = Msg::new()
            .string(1, "c1")
            .string(2, &bundle.to_string_lossy());
        let md = [
            (SANDBOX_ID_METADATA, *bad),
            (NAMESPACE_METADATA, "default"),
            (TTRPC_ADDRESS_METADATA, ttrpc_address.as_str()),
        ];
        let r = wire::ttrpc_call(&socket, TASK_SERVICE, "Create", &create, &md, CALL_TIMEOUT)
            .unwrap_or_else(|e| panic!("Create in sandbox {bad:?}: {e}"));
        assert_ne!(
            r.code,
            code::OK,
            "Create in sandbox {bad:?} accepted: {r:?}"
        );
    }

    // A container id that escapes, in a valid sandbox.
    let good = env.unique_id("idbox");
    let register = Msg::new()
        .string(1, &good)
        .string(2, "default")
        .string(3, &bundle.to_string_lossy())
        .string(4, &ttrpc_address);
    let r = wire::ttrpc_call(
        &socket,
        SANDBOXER,
        "RegisterSandbox",
        &register,
        &[],
        CALL_TIMEOUT,
    )
    .expect("RegisterSandbox");
    assert_eq!(r.code, code::OK, "RegisterSandbox {good}: {r:?}");
    let md = [
        (SANDBOX_ID_METADATA, good.as_str()),
        (NAMESPACE_METADATA, "default"),
        (TTRPC_ADDRESS_METADATA, ttrpc_address.as_str()),
    ];
    for bad in BAD_IDS {
        let create = Msg::new()
            .string(1, bad)
            .string(2, &bundle.to_string_lossy());
        let r = wire::ttrpc_call(
            &socket,
            TASK_SERVICE,
            "Create",
            &create,
            &md,
            Duration::from_secs(90),
        )
        .unwrap_or_else(|e| panic!("Create {bad:?}: {e}"));
        assert_eq!(
            r.code,
            code::INVALID_ARGUMENT,
            "Create of container {bad:?}: {r:?}"
        );
    }
    let delete = Msg::new().string(1, &good);
    let r = wire::ttrpc_call(
        &socket,
        SANDBOXER,
        "DeleteSandbox",
        &delete,
        &[],
        CALL_TIMEOUT,
    )
    .expect("DeleteSandbox");
    assert_eq!(r.code, code::OK, "DeleteSandbox {good}: {r:?}");

    assert_eq!(ping(&socket), 0, "sandboxes registered after bad ids");
    assert!(
        sentinel.join("keep").exists(),
        "a bad id reached {}",
        sentinel.display()
    );
    assert!(!env.dir().join("c1").exists() && !Path::new("/abs").exists());
    assert_eq!(
        procs::count(env.dir(), procs::SANDBOXER),
        1,
        "kuasar-vmm died"
    );
    env.assert_clean();
    let _ = fs::remove_dir_all(&bundle);
    let _ = fs::remove_dir_all(&sentinel);
}

/// containerd 2.3's bootstrap protocol, as containerd 2.3 drives the shim:
/// `start` with `BootstrapParams` on stdin (here without any flag) answers
/// a protobuf `BootstrapResult` naming the address it serves, and the
/// sandbox is registered under the namespace the parameters give; with
/// 2.1's empty stdin the answer stays the bare address (the CRI suite).
#[test]
fn shim_start_speaks_the_bootstrap_protocol() {
    let env = env();
    let _sb = start_sandboxer(&env, env.sandboxer_config());
    let bundle = env.dir().join("bundle-bootstrap");
    fs::create_dir_all(&bundle).expect("create bundle");
    let grpc = env.address().display().to_string();
    let params = Msg::new()
        .string(1, "boot1")
        .string(2, "default")
        .string(5, &format!("{grpc}.ttrpc"))
        .string(6, &grpc)
        .string(7, "/usr/bin/containerd");
    let shim = |args: &[&str], stdin: Option<&[u8]>| {
        let mut c = Command::new(paths::bin_dir().join("containerd-shim-kuasar-vmm-v2"));
        c.args(args)
            .current_dir(&bundle)
            .env(VMM_SOCKET_ENV, env.vmm_socket())
            .env("KUASAR_SHIM_SOCKET_DIR", env.dir().join("s"))
            .env("KUASAR_TEST_DIR", env.dir());
        cmd::run(&mut c, stdin, Duration::from_secs(30))
    };
    let out = shim(&["start"], Some(&params.0));
    assert!(out.success(), "bootstrap start: {out}");
    let fields = wire::decode(&out.raw_stdout).unwrap_or_else(|e| panic!("{e}: {out}"));
    let text = |n| match wire::field(&fields, n) {
        Some(Value::Bytes(b)) => String::from_utf8_lossy(b).into_owned(),
        other => panic!("BootstrapResult field {n}: {other:?}"),
    };
    assert!(
        matches!(wire::field(&fields, 1), Some(Value::Varint(2))),
        "version: {fields:?}"
    );
    assert_eq!(text(3), "ttrpc");
    let address = text(2);
    let socket = address.strip_prefix("unix://").expect("a unix address");
    assert!(Path::new(socket).exists(), "{address} is not served");
    // The same shim again: the same address, in the same form.
    let again = shim(&["start"], Some(&params.0));
    assert_eq!(again.raw_stdout, out.raw_stdout, "{again}");
    // containerd's cleanup (legacy flags only, as 2.3 still calls it).
    let del = shim(
        &[
            "-namespace",
            "default",
            "-address",
            &grpc,
            "-id",
            "boot1",
            "delete",
        ],
        None,
    );
    assert!(!del.timed_out, "{del}");
    assert!(
        cmd::wait_until(Duration::from_secs(10), || !Path::new(socket).exists()),
        "the shim still serves {address} after delete"
    );
}
