//! `kuasar-vmm`, the resident sandboxer: one process for the node, one
//! microVM per sandbox. See docs/design.md for the contracts it serves.
use std::os::fd::IntoRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

pub mod admin;
pub mod agent;
pub mod config;
pub mod container;
pub mod containerd_config;
pub mod controller;
pub mod error;
pub mod events;
pub mod host;
pub mod io;
pub mod metrics;
pub mod mount;
pub mod net;
pub mod panic_guard;
pub mod pod;
pub mod portforward;
pub mod recovery;
pub mod registry;
pub mod sandbox;
pub mod sandbox_api;
pub mod service;
pub mod spec;
pub mod state;
pub mod task;
pub mod vmm;

use config::Config;
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

async fn serve(config: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("create state directory {}", config.state_dir.display()))?;
    std::fs::set_permissions(&config.state_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod {}", config.state_dir.display()))?;
    agent::set_call_timeout(std::time::Duration::from_secs(
        config.qemu.call_timeout_secs,
    ));
    let socket = config.socket.clone();
    let grpc_socket = config.grpc_socket.clone();
    // Bound first: a taken address stops us before any VM is touched.
    let metrics_listener = match config.metrics.socket_addr()? {
        Some(address) => Some(metrics::bind(address)?),
        None => None,
    };
    let host = Arc::new(host::Host::new(config));
    // Recovery comes before the sockets are bound: nothing is served, and
    // readiness is not reported, until every sandbox is back or cleaned.
    let recovered = recovery::recover_all(&host).await;
    let registry = Arc::new(Registry::new(host));
    tracing::info!(
        adopted = recovered.adopted.len(),
        stopped = recovered.stopped.len(),
        unreadable = recovered.unreadable,
        "recovery done"
    );
    if let Some(m) = &registry.host.metrics {
        m.count_recoveries(&recovered);
    }
    for sandbox in recovered.adopted.into_iter().chain(recovered.stopped) {
        registry.insert(sandbox);
    }
    let listener = bind(&socket)?;
    let sandboxer = service::SandboxerService::new(registry.clone());
    let tasks = task::TaskService::new(registry.clone());
    let mut server = ttrpc::r#async::Server::new()
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
        ));
    server.start().await.context("start the ttrpc server")?;
    let grpc_listener = bind(&grpc_socket)?;
    grpc_listener
        .set_nonblocking(true)
        .context("set the gRPC socket non-blocking")?;
    let grpc_listener =
        tokio::net::UnixListener::from_std(grpc_listener).context("serve the gRPC socket")?;
    let controller = Arc::new(controller::ControllerService::new(registry.clone()));
    controller.resume_task_sockets().await;
    let grpc = tokio::spawn(controller::serve(grpc_listener, controller.clone()));
    let metrics_server = metrics_listener.and_then(|l| serve_metrics(l, &registry));
    tracing::info!(
        socket = %socket.display(),
        grpc_socket = %grpc_socket.display(),
        "kuasar-vmm ready"
    );
    notify_ready();

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!(
        sandboxes = registry.len(),
        "shutting down; VMs keep running"
    );
    if tokio::time::timeout(SHUTDOWN_GRACE, server.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("connections still open at exit");
    }
    grpc.abort();
    if let Some(server) = metrics_server {
        server.abort();
    }
    controller.close_task_sockets().await;
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&grpc_socket);
    Ok(())
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

/// Tells systemd (when it started us with Type=notify) that we are ready.
fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let path = path.to_string_lossy().into_owned();
    let res = if let Some(abstract_name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
            .and_then(|addr| sock.send_to_addr(b"READY=1", &addr))
    } else {
        sock.send_to(b"READY=1", &path)
    };
    if let Err(e) = res {
        tracing::warn!("sd_notify: {e}");
    }
}
