//! The host channel: which one the kernel command line asks for, and the
//! virtio-serial port (found by name, proxied to the ttrpc server by
//! [`crate::proxy`]).
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
pub fn start_proxy(port: &Path, server: &Path, fault: Option<crate::proxy::Fault>) -> Result<()> {
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
        .spawn(move || crate::proxy::run(&file, &port, &server, fault))
        .context("spawn proxy thread")?;
    Ok(())
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
}
