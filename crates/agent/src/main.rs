//! kuasar-agent: PID 1 of a kuasar sandbox VM. It prepares the guest (mounts,
//! kernel modules, cgroups), then serves `kuasar.agent.v1.Agent` over the
//! `kuasar.agent` virtio-serial port and runs containers with crun (an OCI
//! runtime driven through its runc-compatible CLI).
mod channel;
mod console;
mod container;
mod debug;
mod error;
mod init;
mod net;
mod pod;
mod podns;
mod portforward;
mod process;
mod proxy;
mod reaper;
mod runtime;
mod service;
mod sysctl;
mod warmup;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kuasar_api::agent::agent_ttrpc_async::create_agent;
use kuasar_api::ttrpc::r#async::Server;
use tracing::{debug, error, info, warn};

use crate::error::{Context, Error, Result};

/// The ttrpc server's socket inside the guest (the port is proxied to it).
const SERVER_SOCKET: &str = "/run/kuasar/agent.sock";
/// The OCI runtime, its state directory (`--root`) and where its per-call
/// JSON logs go.
const OCI_RUNTIME: &str = "/usr/bin/crun";
const RUNTIME_ROOT: &str = "/run/crun";
const RUNTIME_LOGS: &str = "/run/kuasar/crun-logs";
/// How long to wait for the virtio-serial port to show up.
const PORT_TIMEOUT: Duration = Duration::from_secs(20);

fn main() {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == podns::POD_INIT_ARG)
    {
        podns::pod_init_main();
    }
    let started = Instant::now();
    let pid1 = std::process::id() == 1;
    let early = if pid1 {
        init::switch_root().and_then(|()| init::mount_filesystems())
    } else {
        Ok(())
    };
    if pid1 {
        init::ensure_console();
    }
    init_logging();
    tracing::debug!(
        elapsed_us = started.elapsed().as_micros() as u64,
        "early setup done"
    );
    if let Err(e) = early {
        error!("guest setup failed: {e}");
        std::process::exit(1);
    }
    // Modules load (the channel's first, see build-guest.sh) while the agent
    // starts serving; container creation waits for `guest_ready`.
    let (ready_tx, guest_ready) = tokio::sync::watch::channel(!pid1);
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let channel = channel::Channel::from_cmdline(&cmdline);
    let fault = proxy::Fault::from_cmdline(&cmdline);
    let share = kuasar_api::guest::Share::from_cmdline(&cmdline);
    let sealed = runtime::SealedCopy::new(Path::new(OCI_RUNTIME));
    if pid1 {
        let sealed = sealed.clone();
        let vsock = matches!(channel, channel::Channel::Vsock(_));
        let setup = std::thread::Builder::new()
            .name("guest-setup".into())
            .spawn(move || {
                // Containers share the VM's network namespace: its loopback
                // serves a pod's containers talking over 127.0.0.1.
                if let Err(e) = net::loopback_up() {
                    warn!("{e}");
                }
                let list = Path::new(init::MODULES_LIST);
                init::load_modules(list, vsock, init::ModuleSet::ForContainers);
                init::enable_controllers();
                init::mount_shared(share);
                // Containers wait for `guest_ready`, so the first one runs
                // from the sealed copy too.
                let t = Instant::now();
                match sealed.make() {
                    Ok(()) => debug!(elapsed_us = t.elapsed().as_micros() as u64, "crun sealed"),
                    Err(e) => warn!("{e} (crun copies itself at every call instead)"),
                }
                ready_tx.send_replace(true);
                info!("guest ready");
                // The rest (overlay, PCI, ...) must not slow the first
                // container down: load it only when the vCPU is otherwise idle.
                init::become_idle_priority();
                init::report_small_free_pages();
                init::load_modules(list, vsock, init::ModuleSet::Rest);
                init::drop_module_files();
            });
        if let Err(e) = setup {
            error!("spawn guest setup: {e}");
            std::process::exit(1);
        }
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(serve(started, channel, fault, guest_ready, sealed)) {
        error!("agent failed: {e}");
    }
    // As PID 1, exiting panics the kernel, and the VM stops (-no-reboot).
    std::process::exit(1);
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KUASAR_AGENT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_timer(tracing_subscriber::fmt::time::uptime())
        .init();
}

async fn serve(
    started: Instant,
    channel: channel::Channel,
    fault: Option<proxy::Fault>,
    guest_ready: tokio::sync::watch::Receiver<bool>,
    sealed: runtime::SealedCopy,
) -> Result<()> {
    let reaper = reaper::Reaper::start().context("install SIGCHLD handler")?;
    let runtime = runtime::OciRuntime::new(
        sealed,
        Path::new(RUNTIME_ROOT),
        Path::new(RUNTIME_LOGS),
        reaper.clone(),
    );
    let agent = Arc::new(service::AgentService::new(reaper, runtime, guest_ready));
    std::fs::create_dir_all(service::CONTAINERS_DIR).context("create containers dir")?;
    let address = match channel {
        channel::Channel::Serial => {
            let _ = std::fs::remove_file(SERVER_SOCKET);
            format!("unix://{SERVER_SOCKET}")
        }
        channel::Channel::Vsock(port) => format!("vsock://-1:{port}"),
    };
    // A vsock socket can be made only once the vsock module is loaded.
    let deadline = Instant::now() + PORT_TIMEOUT;
    let server = loop {
        match Server::new().bind(&address) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                return Err(Error::Internal(format!("bind {address}: {e}")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    };
    let mut server = server.register_service(create_agent(agent));
    server
        .start()
        .await
        .map_err(|e| Error::Internal(format!("start ttrpc server: {e}")))?;
    let where_ = match channel {
        channel::Channel::Serial => {
            let port = channel::find_port(channel::PORT_NAME, PORT_TIMEOUT).await?;
            channel::start_proxy(&port, Path::new(SERVER_SOCKET), fault)?;
            port.display().to_string()
        }
        channel::Channel::Vsock(_) => address,
    };
    info!(
        channel = %where_,
        agent_ms = started.elapsed().as_millis() as u64,
        kernel_uptime = %kernel_uptime(),
        "agent ready"
    );
    std::future::pending::<()>().await;
    warn!("unreachable");
    Ok(())
}

fn kernel_uptime() -> String {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(|s| format!("{s}s")))
        .unwrap_or_default()
}
