//! `kuasar-vmm`, the resident sandboxer: one process for the node, one
//! microVM per sandbox. See docs/design.md for the contracts it serves.
use std::os::fd::IntoRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

pub(crate) mod agent;
pub(crate) mod cgroup;
pub mod config;
pub(crate) mod container;
pub mod containerd_config;
pub(crate) mod containerd_version;
pub mod error;
pub(crate) mod events;
pub(crate) mod host;
pub(crate) mod io;
pub(crate) mod metrics;
pub(crate) mod mount;
pub(crate) mod net;
pub(crate) mod pod;
pub(crate) mod pool;
pub(crate) mod portforward;
pub(crate) mod protocol;
pub(crate) mod recovery;
pub(crate) mod registry;
pub(crate) mod sandbox;
pub(crate) mod spec;
pub mod state;
pub(crate) mod vmm;

use config::Config;
use protocol::{admin, controller, panic_guard, sandbox_api, service, task};
use registry::Registry;

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let result = runtime.block_on(serve(config));
    // Tasks blocked on a fifo (a stdin nobody opened) must not hold the exit.
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    result
}

/// How long stopping may take: connections still open (every shim keeps
/// one) and blocked tasks are dropped after it.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Binds the socket owner-only: created under a restrictive umask, then
/// chmod'ed, so that no other user can ever connect.
pub(crate) fn bind(socket: &Path) -> anyhow::Result<std::os::unix::net::UnixListener> {
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            anyhow::bail!(
                "{} is in use: another kuasar-vmm is running",
                socket.display()
            );
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("remove stale {}", socket.display()))?;
    }
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = std::os::unix::net::UnixListener::bind(socket);
    nix::sys::stat::umask(old);
    let listener = listener.with_context(|| format!("bind {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", socket.display()))?;
    Ok(listener)
}

/// kuasar-vmm's life: recover the sandboxes of the state directory, serve
/// the sockets, tell systemd, run until SIGTERM or SIGINT, then stop
/// serving (the VMs keep running, for the next kuasar-vmm to adopt).
async fn serve(config: Config) -> anyhow::Result<()> {
    prepare_state_dir(&config)?;
    agent::set_call_timeout(std::time::Duration::from_secs(config.vm.call_timeout_secs));
    let socket = config.socket.clone();
    let grpc_socket = config.grpc_socket.clone();
    // Bound first: a taken address stops us before any VM is touched.
    let metrics_listener = match config.metrics.socket_addr()? {
        Some(address) => Some(metrics::bind(address)?),
        None => None,
    };
    let host = Arc::new(host::Host::new(config));
    pool::clean_leftovers(&host);
    // Recovery comes before the sockets are bound: nothing is served, and
    // readiness is not reported, until every sandbox is back or cleaned.
    let (registry, ready) = recover(host).await;
    // The zero-shim task sockets too: containerd's connections held across
    // the restart are taken back before anything answers.
    let controller = Arc::new(controller::ControllerService::new(registry.clone()));
    controller.resume_task_sockets().await;
    let mut server = ttrpc_server(bind(&socket)?, &registry)?;
    server.start().await.context("start the ttrpc server")?;
    let grpc_listener = bind(&grpc_socket)?;
    grpc_listener
        .set_nonblocking(true)
        .context("set the gRPC socket non-blocking")?;
    let grpc_listener =
        tokio::net::UnixListener::from_std(grpc_listener).context("serve the gRPC socket")?;
    let grpc = tokio::spawn(controller::serve(grpc_listener, controller.clone()));
    let metrics_server = metrics_listener.and_then(|l| serve_metrics(l, &registry));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    tracing::info!(
        socket = %socket.display(),
        grpc_socket = %grpc_socket.display(),
        "kuasar-vmm ready"
    );
    sd_notify(&ready);
    if let Some(pool) = &registry.host.pool {
        pool.start(registry.host.clone());
    }
    let version_check = tokio::spawn(containerd_version::check(
        registry.host.config.containerd_ttrpc_address.clone(),
    ));

    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!(
        sandboxes = registry.len(),
        "shutting down; VMs keep running"
    );
    sd_notify(&format!(
        "STOPPING=1\nSTATUS=stopping; the VMs of {} sandboxes keep running",
        registry.len()
    ));
    if tokio::time::timeout(SHUTDOWN_GRACE, server.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("connections still open at exit");
    }
    grpc.abort();
    version_check.abort();
    if let Some(server) = metrics_server {
        server.abort();
    }
    controller.close_task_sockets().await;
    if let Some(pool) = &registry.host.pool {
        pool.shutdown().await;
    }
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&grpc_socket);
    Ok(())
}

/// Creates the state directory, private to root.
fn prepare_state_dir(config: &Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("create state directory {}", config.state_dir.display()))?;
    std::fs::set_permissions(&config.state_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod {}", config.state_dir.display()))?;
    if config.qemu.confine || config.qemu.share == crate::config::SharedDir::VirtioFs {
        // virtiofsd (in a mount namespace of its own) and a confined QEMU
        // serving 9p see their share through a slave of this mount: the
        // containers' root filesystems mounted there later reach them.
        mount::make_shared(&config.state_dir)
            .with_context(|| format!("make {} a shared mount", config.state_dir.display()))?;
    }
    Ok(())
}

/// Takes back the sandboxes an earlier kuasar-vmm left (adopted, or
/// stopped when their VM is gone) into a new registry; returns it with the
/// readiness message that tells systemd what recovery found.
async fn recover(host: Arc<host::Host>) -> (Arc<Registry>, String) {
    let recovered = recovery::recover_all(&host).await;
    let registry = Arc::new(Registry::new(host));
    let (adopted, stopped) = (recovered.adopted.len(), recovered.stopped.len());
    tracing::info!(
        adopted,
        stopped,
        unreadable = recovered.unreadable,
        "recovery done"
    );
    if let Some(m) = &registry.host.metrics {
        m.count_recoveries(&recovered);
    }
    let ready = ready_message(adopted, stopped, recovered.unreadable);
    for sandbox in recovered.adopted.into_iter().chain(recovered.stopped) {
        registry.insert(sandbox);
    }
    (registry, ready)
}

/// The ttrpc server of the main socket: the Sandboxer and Admin services,
/// containerd's task API (shim modes) and sandbox API (shim mode), each
/// behind the panic guard.
fn ttrpc_server(
    listener: std::os::unix::net::UnixListener,
    registry: &Arc<Registry>,
) -> anyhow::Result<ttrpc::r#async::Server> {
    let sandboxer = service::SandboxerService::new(registry.clone());
    let tasks = task::TaskService::new(registry.clone());
    Ok(ttrpc::r#async::Server::new()
        .set_domain_unix()
        .add_listener(listener.into_raw_fd())
        .context("serve the socket")?
        .register_service(panic_guard::ttrpc_services(
            kuasar_api::sandboxer::sandboxer_ttrpc_async::create_sandboxer(Arc::new(sandboxer)),
            None,
        ))
        .register_service(panic_guard::ttrpc_services(
            kuasar_api::sandboxer::sandboxer_ttrpc_async::create_admin(Arc::new(
                admin::AdminService::new(registry.clone()),
            )),
            None,
        ))
        .register_service(panic_guard::ttrpc_services(
            kuasar_api::containerd::shim_async::create_task(Arc::new(tasks)),
            None,
        ))
        .register_service(panic_guard::ttrpc_services(
            kuasar_api::sandbox::sandbox_ttrpc_async::create_sandbox(Arc::new(
                sandbox_api::SandboxService::new(registry.clone()),
            )),
            None,
        )))
}

/// Starts serving the metrics endpoint on `listener`.
fn serve_metrics(
    listener: tokio::net::TcpListener,
    registry: &Arc<Registry>,
) -> Option<tokio::task::JoinHandle<()>> {
    let metrics = registry.host.metrics.clone()?;
    if let Ok(address) = listener.local_addr() {
        tracing::info!(%address, "metrics endpoint: GET /metrics");
    }
    Some(tokio::spawn(metrics::serve(
        listener,
        metrics,
        registry.clone(),
    )))
}

/// What systemd hears once recovery is done and the sockets are served:
/// `READY=1`, and a status line that `systemctl status` shows.
fn ready_message(adopted: usize, stopped: usize, unreadable: usize) -> String {
    format!(
        "READY=1\nSTATUS=serving; recovery: {adopted} adopted, {stopped} stopped, {unreadable} unreadable"
    )
}

/// Sends `message` (newline-separated `KEY=value` lines, sd_notify(3)) to
/// systemd when it started us with Type=notify; does nothing otherwise.
fn sd_notify(message: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = notify_socket_send(&path.to_string_lossy(), message) {
        tracing::warn!("sd_notify: {e}");
    }
}

/// One datagram to the notification socket `path` (a file, or `@name` for
/// an abstract socket).
fn notify_socket_send(path: &str, message: &str) -> std::io::Result<()> {
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    if let Some(abstract_name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())?;
        sock.send_to_addr(message.as_bytes(), &addr)?;
    } else {
        sock.send_to(message.as_bytes(), path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    fn received(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn ready_says_ready_and_what_recovery_found() {
        assert_eq!(
            ready_message(2, 1, 0),
            "READY=1\nSTATUS=serving; recovery: 2 adopted, 1 stopped, 0 unreadable"
        );
    }

    #[test]
    fn notifies_a_socket_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        notify_socket_send(path.to_str().unwrap(), &ready_message(0, 0, 0)).unwrap();
        assert!(received(&sock).starts_with("READY=1\nSTATUS="));
    }

    #[test]
    fn notifies_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("kuasar-vmm-test-notify-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        notify_socket_send(&format!("@{name}"), "STOPPING=1").unwrap();
        assert_eq!(received(&sock), "STOPPING=1");
    }
}
