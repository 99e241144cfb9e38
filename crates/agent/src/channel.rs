//! The host channel: a virtio-serial port proxied to the local ttrpc server.
//!
//! ttrpc's server wants a listening socket, so it listens on a Unix socket in
//! the guest and one thread copies bytes between the port and a connection to
//! that socket. The port is non-blocking: while no host is connected, reads
//! return EOF, writes `EAGAIN` and poll reports `POLLHUP`. When the host goes
//! away the connection to the server is dropped (so a half-sent frame never
//! reaches the next host), whatever the host left unread is discarded, and
//! the thread waits (polling every [`RECONNECT_POLL`]) for the next host.
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tracing::{debug, info, warn};

use crate::error::{Context, Error, Result};

/// How the host reaches the agent (`kuasar.channel=` on the kernel command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// The `kuasar.agent` virtio-serial port (default).
    Serial,
    /// virtio-vsock: the ttrpc server listens on this vsock port.
    Vsock(u32),
}

/// The channel named by a kernel command line (`kuasar.channel=vsock:<port>`
/// or `kuasar.channel=serial`; serial when absent or unknown).
pub fn parse_channel(cmdline: &str) -> Channel {
    let value = cmdline
        .split_whitespace()
        .filter_map(|p| p.strip_prefix("kuasar.channel="))
        .next_back();
    match value {
        Some(v) => match v.strip_prefix("vsock:").map(str::parse::<u32>) {
            Some(Ok(port)) => Channel::Vsock(port),
            _ => Channel::Serial,
        },
        None => Channel::Serial,
    }
}

/// Name of the agent's virtio-serial port.
pub const PORT_NAME: &str = "kuasar.agent";
/// How often a disconnected port is polled for a new host connection.
const RECONNECT_POLL: Duration = Duration::from_millis(10);
/// Per-direction buffer of the proxy.
const BUF_SIZE: usize = 256 << 10;
/// Largest single read of the proxy.
const SCRATCH_SIZE: usize = 64 << 10;

/// Finds `/dev/vportNpM` whose `/sys/class/virtio-ports/*/name` is `name`,
/// waiting up to `timeout` for the port (and its device node) to appear.
pub async fn find_port(name: &str, timeout: Duration) -> Result<PathBuf> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(p) = lookup_port(Path::new("/sys/class/virtio-ports"), name) {
            let dev = Path::new("/dev").join(&p);
            if dev.exists() {
                return Ok(dev);
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::NotFound(format!(
                "no virtio-serial port named {name} after {timeout:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The entry of `class_dir` whose `name` file holds `name`.
pub fn lookup_port(class_dir: &Path, name: &str) -> Option<String> {
    std::fs::read_dir(class_dir).ok()?.flatten().find_map(|e| {
        let text = std::fs::read_to_string(e.path().join("name")).ok()?;
        (text.trim() == name).then(|| e.file_name().to_string_lossy().into_owned())
    })
}

/// Opens the port and starts the proxy thread.
pub fn start_proxy(port: &Path, server: &Path) -> Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(port)
        .with_context(|| format!("open {}", port.display()))?;
    let server = server.to_path_buf();
    let port = port.to_path_buf();
    std::thread::Builder::new()
        .name("port-proxy".into())
        .spawn(move || proxy_loop(&file, &port, &server))
        .context("spawn proxy thread")?;
    Ok(())
}

enum End {
    /// The host disconnected.
    Host,
    /// The ttrpc server closed our connection.
    Server,
}

fn proxy_loop(port: &File, port_path: &Path, server: &Path) {
    let mut first = true;
    loop {
        wait_for_host(port);
        if first {
            info!(port = %port_path.display(), "host channel open");
            first = false;
        } else {
            info!("host reconnected");
        }
        let mut down = Vec::with_capacity(BUF_SIZE);
        loop {
            let sock = connect(server);
            match pump(port, &sock, &mut down) {
                End::Host => break,
                End::Server => {
                    warn!("ttrpc server closed the proxied connection; reconnecting");
                }
            }
        }
        info!("host disconnected");
        discard_input(port);
    }
}

fn connect(server: &Path) -> UnixStream {
    loop {
        match UnixStream::connect(server) {
            Ok(s) => match s.set_nonblocking(true) {
                Ok(()) => return s,
                Err(e) => warn!("set_nonblocking: {e}"),
            },
            Err(e) => warn!("connect {}: {e}", server.display()),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls the port once; returns its revents.
fn poll_port(port: &File, events: PollFlags, timeout: PollTimeout) -> PollFlags {
    let mut fds = [PollFd::new(port.as_fd(), events)];
    match poll(&mut fds, timeout) {
        Ok(_) => fds[0].revents().unwrap_or(PollFlags::empty()),
        Err(Errno::EINTR) => PollFlags::empty(),
        Err(e) => {
            warn!("poll port: {e}");
            std::thread::sleep(RECONNECT_POLL);
            PollFlags::empty()
        }
    }
}

/// Returns once a host is connected to the port.
fn wait_for_host(port: &File) {
    // Nobody connected: the port polls readable (EOF) and hung up.
    while poll_port(port, PollFlags::POLLIN, PollTimeout::ZERO).contains(PollFlags::POLLHUP) {
        std::thread::sleep(RECONNECT_POLL);
    }
}

/// Drops what a departed host left in the port.
fn discard_input(mut port: &File) {
    let mut buf = [0u8; 4096];
    let mut dropped = 0usize;
    while let Ok(n) = port.read(&mut buf) {
        if n == 0 {
            break;
        }
        dropped += n;
    }
    if dropped > 0 {
        debug!(dropped, "discarded input of the departed host");
    }
}

/// Reads what is available from `src` (at most what fits in `buf` up to
/// [`BUF_SIZE`]) into `buf`; `Ok(false)` at EOF.
fn fill(mut src: impl Read, buf: &mut Vec<u8>, scratch: &mut [u8]) -> std::io::Result<bool> {
    let room = BUF_SIZE.saturating_sub(buf.len()).min(scratch.len());
    if room == 0 {
        return Ok(true);
    }
    match src.read(&mut scratch[..room]) {
        Ok(0) => Ok(false),
        Ok(n) => {
            buf.extend_from_slice(&scratch[..n]);
            Ok(true)
        }
        Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
            Ok(true)
        }
        Err(e) => Err(e),
    }
}

/// Writes what it can of `buf` to `dst` and drops it from `buf`.
fn flush(mut dst: impl Write, buf: &mut Vec<u8>) -> std::io::Result<()> {
    match dst.write(buf) {
        Ok(n) => {
            buf.drain(..n);
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => Ok(()),
        Err(e) => Err(e),
    }
}

/// Copies bytes both ways until one side ends. `down` (server -> host) is
/// kept across server reconnects so a complete reply is still delivered.
fn pump(port: &File, sock: &UnixStream, down: &mut Vec<u8>) -> End {
    let mut up: Vec<u8> = Vec::with_capacity(BUF_SIZE);
    let mut scratch = vec![0u8; SCRATCH_SIZE];
    loop {
        let mut pev = PollFlags::empty();
        if up.len() < BUF_SIZE {
            pev |= PollFlags::POLLIN;
        }
        if !down.is_empty() {
            pev |= PollFlags::POLLOUT;
        }
        let mut sev = PollFlags::empty();
        if down.len() < BUF_SIZE {
            sev |= PollFlags::POLLIN;
        }
        if !up.is_empty() {
            sev |= PollFlags::POLLOUT;
        }
        let mut fds = [
            PollFd::new(port.as_fd(), pev),
            PollFd::new(sock.as_fd(), sev),
        ];
        match poll(&mut fds, PollTimeout::from(1000u16)) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                warn!("poll: {e}");
                return End::Host;
            }
        }
        let pr = fds[0].revents().unwrap_or(PollFlags::empty());
        let sr = fds[1].revents().unwrap_or(PollFlags::empty());
        if pr.contains(PollFlags::POLLHUP) {
            down.clear();
            return End::Host;
        }
        if pr.contains(PollFlags::POLLIN) {
            match fill(port, &mut up, &mut scratch) {
                Ok(true) => {}
                Ok(false) => {
                    down.clear();
                    return End::Host;
                }
                Err(e) => {
                    warn!("read port: {e}");
                    down.clear();
                    return End::Host;
                }
            }
        }
        if pr.contains(PollFlags::POLLOUT) {
            if let Err(e) = flush(port, down) {
                warn!("write port: {e}");
                down.clear();
                return End::Host;
            }
        }
        if sr.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
            match fill(sock, down, &mut scratch) {
                Ok(true) => {}
                Ok(false) | Err(_) => return End::Server,
            }
        }
        if sr.contains(PollFlags::POLLOUT) && flush(sock, &mut up).is_err() {
            return End::Server;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_from_cmdline() {
        assert_eq!(parse_channel("console=ttyS0 quiet"), Channel::Serial);
        assert_eq!(
            parse_channel("console=ttyS0 kuasar.channel=vsock:1024 quiet\n"),
            Channel::Vsock(1024)
        );
        assert_eq!(parse_channel("kuasar.channel=serial"), Channel::Serial);
        assert_eq!(parse_channel("kuasar.channel=vsock:x"), Channel::Serial);
    }

    #[test]
    fn finds_port_by_name() {
        let dir = std::env::temp_dir().join(format!("kuasar-ports-{}", std::process::id()));
        for (port, name) in [("vport1p1", "other"), ("vport2p1", "kuasar.agent")] {
            std::fs::create_dir_all(dir.join(port)).unwrap();
            std::fs::write(dir.join(port).join("name"), format!("{name}\n")).unwrap();
        }
        assert_eq!(lookup_port(&dir, PORT_NAME).as_deref(), Some("vport2p1"));
        assert_eq!(lookup_port(&dir, "missing"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fill_and_flush() {
        let mut buf = Vec::new();
        let mut scratch = [0u8; 16];
        assert!(fill(&b"abc"[..], &mut buf, &mut scratch).unwrap());
        assert_eq!(buf, b"abc");
        assert!(!fill(&b""[..], &mut buf, &mut scratch).unwrap());
        assert_eq!(buf, b"abc");
        let mut out = Vec::new();
        flush(&mut out, &mut buf).unwrap();
        assert_eq!(out, b"abc");
        assert!(buf.is_empty());
    }
}
