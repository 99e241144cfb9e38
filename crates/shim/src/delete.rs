//! `delete`: containerd's cleanup after a shim died (or `start` failed).
//! Works with the sandboxer down: `DeleteSandbox` is best-effort with a
//! short timeout; the answer is always a `DeleteResponse` (exit 137).

use std::sync::mpsc;
use std::time::Duration;

use kuasar_api::containerd::api::Empty;
use kuasar_api::containerd::shim::shim::{DeleteResponse, ShutdownRequest};
use kuasar_api::protobuf::well_known_types::timestamp::Timestamp;
use kuasar_api::protobuf::Message;
use kuasar_api::sandboxer::{DeleteSandboxRequest, Empty as SbEmpty};
use kuasar_api::services;

use crate::args::Args;
use crate::error::{Error, Result};
use crate::sandboxer::{vmm_socket, Conn};
use crate::{bundle, log, logger, socket};

const DELETE_TIMEOUT: Duration = Duration::from_secs(3);
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a shim that accepted `Shutdown` is given to stop serving.
const GONE_WAIT: Duration = Duration::from_millis(200);
/// What containerd reports for a task whose shim is gone (128 + SIGKILL).
pub const EXIT_STATUS: u32 = 137;

pub fn run(args: &Args) -> Result<Vec<u8>> {
    let bundle = bundle::dir(args.bundle.as_deref()).ok();
    logger::init(&args.id, args.debug, bundle.as_deref());

    if let Err(e) = delete_sandbox(&args.id) {
        eprintln!(
            "warning: kuasar-vmm at {}: DeleteSandbox {}: {e} (ignored)",
            vmm_socket().display(),
            args.id
        );
        log!("warn", "DeleteSandbox {}: {e} (ignored)", args.id);
    }

    let group = bundle
        .as_deref()
        .and_then(bundle::group_id)
        .unwrap_or_else(|| args.id.clone());
    let path = socket::socket_path(
        &socket::socket_dir(),
        &args.address,
        &args.namespace,
        &group,
    );
    if path.exists() {
        // A shim still serving its own (now deleted) sandbox would idle
        // forever: ask it to exit. A pod's shim serving other containers
        // (group != id) is left alone.
        if group == args.id && socket::is_serving(&path) {
            if let Err(e) = shutdown_shim(&path, &args.id) {
                log!("warn", "Shutdown of the running shim: {e}");
            }
            wait_gone(&path);
        }
        if !socket::is_serving(&path) {
            socket::remove(&path);
        }
    }

    let mut resp = DeleteResponse::new();
    resp.exit_status = EXIT_STATUS;
    resp.exited_at = Some(Timestamp::now()).into();
    resp.write_to_bytes()
        .map_err(|e| Error::Other(format!("encode DeleteResponse: {e}")))
}

/// DeleteSandbox in a helper thread, so that nothing (a hung sandboxer, a
/// connect blocked on a full backlog) holds `delete` past the timeout.
fn delete_sandbox(id: &str) -> std::result::Result<(), String> {
    let (tx, rx) = mpsc::channel();
    let id = id.to_string();
    std::thread::Builder::new()
        .name("delete".into())
        .spawn(move || {
            let res = Conn::connect(&vmm_socket())
                .map_err(|e| format!("not reachable: {e}"))
                .and_then(|conn| {
                    let mut req = DeleteSandboxRequest::new();
                    req.sandbox_id = id;
                    conn.unary::<_, SbEmpty>(
                        services::SANDBOXER,
                        "DeleteSandbox",
                        &req,
                        DELETE_TIMEOUT,
                    )
                    .map(drop)
                    .map_err(|e| e.to_string())
                });
            let _ = tx.send(res);
        })
        .map_err(|e| format!("spawn: {e}"))?;
    match rx.recv_timeout(DELETE_TIMEOUT + Duration::from_millis(200)) {
        Ok(res) => res,
        Err(_) => Err(format!("no answer within {DELETE_TIMEOUT:?}")),
    }
}

/// Waits (at most [`GONE_WAIT`]) until nothing serves `path`: a shim
/// removes its socket as it accepts `Shutdown`, so this is usually at once.
fn wait_gone(path: &std::path::Path) {
    let deadline = std::time::Instant::now() + GONE_WAIT;
    while socket::is_serving(path) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn shutdown_shim(path: &std::path::Path, id: &str) -> std::result::Result<(), String> {
    let conn = Conn::connect(path).map_err(|e| e.to_string())?;
    let mut req = ShutdownRequest::new();
    req.id = id.to_string();
    conn.unary::<_, Empty>(services::TASK_V2, "Shutdown", &req, SHUTDOWN_TIMEOUT)
        .map(drop)
        .map_err(|e| e.to_string())
}
