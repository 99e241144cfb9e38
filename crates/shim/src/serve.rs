//! The detached serving process (`serve`, spawned by `start`): a sync
//! ttrpc server on the socket inherited from `start`, relaying the task
//! service to kuasar-vmm, until `Shutdown` or SIGTERM/SIGINT.

use std::os::unix::io::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kuasar_api::ttrpc;

use crate::args::{ttrpc_address, Args};
use crate::error::{Error, Result};
use crate::relay::{self, OnShutdown, TaskRelay};
use crate::sandboxer::{vmm_socket, Vmm};
use crate::{log, logger, socket};

/// Environment variable naming the inherited listening socket's fd.
pub const LISTEN_FD_ENV: &str = "KUASAR_SHIM_LISTEN_FD";
/// Delay between answering `Shutdown` and exiting (lets the answer go out).
const EXIT_DELAY: Duration = Duration::from_millis(100);

/// The ttrpc server (no listener yet) serving `relay` under both task
/// service names. Few threads: one handler per concurrent call plus one
/// spare (`Wait` holds a handler for a task's whole life).
pub fn server(relay: Arc<TaskRelay>) -> ttrpc::Server {
    ttrpc::Server::new()
        .register_service(relay::services(relay))
        .set_thread_count_min(1)
        .set_thread_count_default(2)
        .set_thread_count_max(3)
}

fn sigset(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before
    // sigaddset reads it, and both only write into the local value.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in signals {
            libc::sigaddset(&mut set, *s);
        }
        set
    }
}

fn listen_fd() -> Result<RawFd> {
    let fd: RawFd = std::env::var(LISTEN_FD_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|fd| *fd > 2)
        .ok_or_else(|| {
            Error::Usage(format!(
                "serve is internal: it needs the listening socket in ${LISTEN_FD_ENV}"
            ))
        })?;
    // SAFETY: fstat writes into a zeroed local stat buffer; an invalid fd
    // only makes it fail with EBADF.
    let is_socket = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFSOCK
    };
    if !is_socket {
        return Err(Error::Other(format!(
            "${LISTEN_FD_ENV}={fd} is not a socket"
        )));
    }
    // SAFETY: fcntl on an fd we own (checked above); sets O_NONBLOCK and
    // FD_CLOEXEC, which the ttrpc accept loop (poll + accept4) expects.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
    }
    Ok(fd)
}

/// Memory: one malloc arena for all threads (this process does little
/// and never in parallel; per-thread arenas cost ~10-40 kB RSS each).
fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a glibc tunable; called before any thread
    // exists, as glibc recommends.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Closes every inherited fd but stdio and the listener: containerd's
/// children inherit whatever containerd inherited without CLOEXEC (pipes
/// of whoever started it), and a long-lived shim must not keep them open.
fn close_stray_fds(keep: RawFd) {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<RawFd> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect();
    // The directory's own fd is closed now (and is EBADF below).
    for fd in fds {
        if fd > 2 && fd != keep {
            // SAFETY: single-threaded start-up; nothing in this process
            // owns these fds (Rust objects opened so far are all closed).
            unsafe {
                libc::close(fd);
            }
        }
    }
}

pub fn run(args: &Args) -> Result<()> {
    tune_allocator();
    let fd = listen_fd()?;
    close_stray_fds(fd);
    // Block the termination signals before any thread exists: every
    // thread inherits the mask, and only the sigwait below takes them.
    let term = sigset(&[libc::SIGTERM, libc::SIGINT]);
    // SAFETY: `term` is an initialised sigset; the old mask is not wanted.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &term, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(Error::io(
            "block signals",
            std::io::Error::from_raw_os_error(rc),
        ));
    }
    logger::init(&args.id, args.debug, args.bundle.as_deref());
    let socket_path = args
        .socket
        .clone()
        .ok_or_else(|| Error::Usage("serve is internal: it needs -socket".into()))?;

    let vmm = Arc::new(Vmm::new(vmm_socket()));
    let relay = Arc::new(TaskRelay::new(
        vmm.clone(),
        &args.id,
        &args.namespace,
        &ttrpc_address(&args.address),
        exit_soon(socket_path.clone()),
    ));
    let mut server = server(relay)
        .add_listener(fd)
        .map_err(|e| Error::Other(format!("ttrpc listener: {e}")))?;
    server
        .start()
        .map_err(|e| Error::Other(format!("ttrpc server: {e}")))?;
    log!(
        "info",
        "serving {} for sandbox {} (kuasar-vmm at {})",
        socket_path.display(),
        args.id,
        vmm.path().display()
    );

    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `term` is initialised and `sig` is a valid out pointer.
        let rc = unsafe { libc::sigwait(&term, &mut sig) };
        if rc == 0 && (sig == libc::SIGTERM || sig == libc::SIGINT) {
            break;
        }
    }
    exit(&socket_path)
}

fn exit(socket_path: &Path) -> ! {
    socket::remove(socket_path);
    log!("info", "exiting");
    // No graceful server teardown: nothing is left to flush, and joining
    // ttrpc's threads could block on a handler stuck in Wait.
    std::process::exit(0)
}

/// After `Shutdown` was answered: the socket goes at once (so that
/// containerd's `delete` of this shim finds nothing left serving and need
/// not wait), and SIGTERM is raised at ourselves a little later (the answer
/// is still going out on its connection); the main thread's sigwait then
/// exits.
fn exit_soon(socket_path: PathBuf) -> OnShutdown {
    Box::new(move || {
        socket::remove(&socket_path);
        let spawned = std::thread::Builder::new()
            .name("exit".into())
            .stack_size(32 * 1024)
            .spawn(|| {
                std::thread::sleep(EXIT_DELAY);
                // SAFETY: kill(2) on our own pid with a valid signal number.
                unsafe {
                    libc::kill(libc::getpid(), libc::SIGTERM);
                }
            });
        if spawned.is_err() {
            // Cannot even spawn a thread: exit right away.
            // SAFETY: as above.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGTERM);
            }
        }
    })
}
