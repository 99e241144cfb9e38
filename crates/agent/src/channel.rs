//! The host channel: which one the kernel command line asks for, and the
//! virtio-serial port (found by name, proxied to the ttrpc server by
//! [`crate::proxy`]).
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Context, Error, Result};

pub use kuasar_api::guest::{Channel, AGENT_PORT_NAME as PORT_NAME};

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
