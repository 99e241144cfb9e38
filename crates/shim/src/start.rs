//! `start`: run by containerd in the bundle directory. Registers the
//! sandbox with kuasar-vmm, spawns the detached serving process on a fresh
//! socket and returns its address (printed on stdout by `main`).

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use kuasar_api::sandboxer::{Empty, PingResponse, RegisterSandboxRequest};

use crate::args::{validate_id, Args};
use crate::error::{Error, Result};
use crate::sandboxer::{vmm_socket, Conn};
use crate::serve::LISTEN_FD_ENV;
use crate::{bundle, log, logger, socket};
use kuasar_api::services::SANDBOXER;

const PING_TIMEOUT: Duration = Duration::from_secs(5);
const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);
const SERVE_STACK: usize = 256 * 1024;
pub const BINARY_NAME: &str = "containerd-shim-kuasar-vmm-v2";

/// Runs `start`: finds the sandbox this task belongs to, and unless a shim
/// already serves it, registers it with kuasar-vmm and spawns the serving
/// shim. Writes the shim's address to the bundle and returns it.
pub fn run(args: &Args) -> Result<String> {
    let bundle = bundle::dir(args.bundle.as_deref())?;
    let sandbox_id = sandbox_id(args, &bundle)?;
    logger::init(&sandbox_id, args.debug, Some(&bundle));
    let path = socket::socket_path(
        &socket::socket_dir(),
        &args.address,
        &args.namespace,
        &sandbox_id,
    );
    let address = socket::address_of(&path);

    // Idempotent: a shim already serves this sandbox.
    if socket::is_serving(&path) {
        log!(
            "info",
            "start {}: shim already serving at {address}",
            args.id
        );
        bundle::write_address(&bundle, &address)?;
        return Ok(address);
    }

    let (vmm, conn) = ping_vmm()?;
    register_sandbox(&conn, &vmm, args, &sandbox_id, &bundle)?;
    drop(conn);

    spawn_serving_shim(args, &sandbox_id, &bundle, &path, &address)?;
    bundle::write_address(&bundle, &address)?;
    Ok(address)
}

/// Phase 1: the sandbox the task belongs to. A container of a pod joins
/// its pod's sandbox (and shim), named by the bundle's group id; any other
/// task is its own sandbox.
fn sandbox_id(args: &Args, bundle: &Path) -> Result<String> {
    match bundle::group_id(bundle) {
        Some(group) => {
            validate_id(&group)?;
            Ok(group)
        }
        None => Ok(args.id.clone()),
    }
}

/// Phase 2: connects to kuasar-vmm and pings it, logging its version and
/// sandbox count. Returns its socket path and the open connection.
fn ping_vmm() -> Result<(PathBuf, Conn)> {
    let vmm = vmm_socket();
    let unreachable = |reason: String| Error::VmmUnreachable {
        path: vmm.clone(),
        reason,
    };
    let conn = Conn::connect(&vmm).map_err(|e| unreachable(e.to_string()))?;
    let pong: PingResponse = conn
        .unary(SANDBOXER, "Ping", &Empty::new(), PING_TIMEOUT)
        .map_err(|e| unreachable(format!("Ping: {e}")))?;
    log!(
        "info",
        "kuasar-vmm {} at {} ({} sandboxes)",
        pong.version,
        vmm.display(),
        pong.sandboxes
    );
    Ok((vmm, conn))
}

/// Phase 3: registers the sandbox with kuasar-vmm (at `vmm`, over `conn`),
/// with its namespace, bundle and containerd's ttrpc address for events.
fn register_sandbox(
    conn: &Conn,
    vmm: &Path,
    args: &Args,
    sandbox_id: &str,
    bundle: &Path,
) -> Result<()> {
    let mut req = RegisterSandboxRequest::new();
    req.sandbox_id = sandbox_id.to_string();
    req.namespace = args.namespace.clone();
    req.bundle = bundle.to_string_lossy().into_owned();
    req.ttrpc_address = args.ttrpc_address();
    let _: Empty = conn
        .unary(SANDBOXER, "RegisterSandbox", &req, REGISTER_TIMEOUT)
        .map_err(|e| Error::Register {
            path: vmm.to_path_buf(),
            id: sandbox_id.to_string(),
            reason: e.to_string(),
        })?;
    Ok(())
}

/// Phase 4: binds the shim's socket at `path` and spawns the detached
/// serving shim on it. If a concurrent `start` of the same sandbox bound
/// it first, does nothing (that shim serves the same address). If the
/// spawn fails, removes the socket file.
fn spawn_serving_shim(
    args: &Args,
    sandbox_id: &str,
    bundle: &Path,
    path: &Path,
    address: &str,
) -> Result<()> {
    let Some(listener) = socket::bind(path)? else {
        // Lost a race with a concurrent `start` of the same sandbox.
        return Ok(());
    };
    let pid = match spawn_server(&listener, args, sandbox_id, bundle, path) {
        Ok(pid) => pid,
        Err(e) => {
            socket::remove(path);
            return Err(Error::io("spawn the serving shim", e));
        }
    };
    // The child holds its own copy of the listening socket.
    drop(listener);
    log!(
        "info",
        "start {}: shim pid {pid} serving at {address} ({} start protocol)",
        args.id,
        if args.bootstrapped {
            "containerd 2.3 bootstrap"
        } else {
            "legacy"
        }
    );
    Ok(())
}

/// Re-executes this binary as `serve`, detached: new session, stdio on
/// /dev/null (containerd reads our stdout/stderr until EOF), cwd `/`, the
/// listening socket inherited at the fd named by `$KUASAR_SHIM_LISTEN_FD`.
fn spawn_server(
    listener: &UnixListener,
    args: &Args,
    sandbox_id: &str,
    bundle: &Path,
    socket: &Path,
) -> io::Result<u32> {
    let fd: RawFd = listener.as_raw_fd();
    // Exec by name so the process is called "containerd-shim..." in ps and
    // pgrep; /proc/self/exe only if our file is gone (e.g. replaced).
    let exe = std::env::current_exe()
        .ok()
        .filter(|p| p.is_file())
        .unwrap_or_else(|| "/proc/self/exe".into());
    let mut cmd = Command::new(exe);
    cmd.arg0(BINARY_NAME)
        .args(["-namespace", &args.namespace])
        .args(["-address", &args.address])
        .args(["-publish-binary", &args.publish_binary])
        .args(["-id", sandbox_id])
        .arg("-bundle")
        .arg(bundle)
        .arg("-socket")
        .arg(socket);
    if args.debug {
        cmd.arg("-debug");
    }
    if let Some(ttrpc) = &args.ttrpc {
        // Where `serve` finds containerd's ttrpc address (args::ttrpc_address).
        cmd.env("TTRPC_ADDRESS", ttrpc);
    }
    cmd.arg("serve")
        .env(LISTEN_FD_ENV, fd.to_string())
        // Threads (ttrpc's, ours) need little stack: 256 KiB instead of 2 MiB
        // of address space each (resident memory is what they touch).
        .env("RUST_MIN_STACK", SERVE_STACK.to_string())
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe calls (setsid, fcntl) on an fd that stays open in
    // the parent for the whole spawn.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            // Let the listening socket survive exec.
            if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // The child is not waited for: it outlives us and is re-parented.
    let child = cmd.spawn()?;
    Ok(child.id())
}
