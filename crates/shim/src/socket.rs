//! The shim's own listening socket: where it lives and how it is bound.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Directory of the shims' sockets (short, so paths fit in `sun_path`).
pub const DEFAULT_SOCKET_DIR: &str = "/run/kuasar/s";
/// Overrides [`DEFAULT_SOCKET_DIR`] (tests, non-root setups).
pub const SOCKET_DIR_ENV: &str = "KUASAR_SHIM_SOCKET_DIR";

/// `sun_path` holds 108 bytes including the terminating NUL.
const SUN_PATH_MAX: usize = 107;

pub fn socket_dir() -> PathBuf {
    std::env::var_os(SOCKET_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET_DIR))
}

/// The socket of the shim serving sandbox `id` of namespace `ns` for the
/// containerd at `address`: `<dir>/<first 32 hex digits of
/// sha256("<address>/<ns>/<id>")>` (the same input containerd's own shims
/// hash, so two containerd instances never share a shim).
pub fn socket_path(dir: &Path, address: &str, ns: &str, id: &str) -> PathBuf {
    let digest = Sha256::digest(format!("{address}/{ns}/{id}").as_bytes());
    let mut hex = String::with_capacity(32);
    for b in digest.iter().take(16) {
        hex.push_str(&format!("{b:02x}"));
    }
    dir.join(hex)
}

/// The address containerd gets for a socket path.
pub fn address_of(path: &Path) -> String {
    format!("unix://{}", path.display())
}

/// True when something accepts connections on `path`.
pub fn is_serving(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

/// Binds and listens on `path`, creating its directory (mode 0711).
/// Returns `Ok(None)` when a live shim already serves there; a stale
/// socket file (nobody accepting) is replaced.
pub fn bind(path: &Path) -> Result<Option<UnixListener>> {
    if path.as_os_str().len() > SUN_PATH_MAX {
        return Err(Error::Other(format!(
            "socket path {} is longer than {SUN_PATH_MAX} bytes",
            path.display()
        )));
    }
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    }
    for _ in 0..2 {
        match UnixListener::bind(path) {
            Ok(l) => {
                // Only the owner (containerd runs as root) may connect.
                let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
                return Ok(Some(l));
            }
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                if is_serving(path) {
                    return Ok(None);
                }
                // Stale socket of a dead shim.
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io(format!("remove {}", path.display()), e)),
                }
            }
            Err(e) => return Err(Error::io(format!("bind {}", path.display()), e)),
        }
    }
    Err(Error::Other(format!(
        "{} is in use but nobody accepts on it",
        path.display()
    )))
}

/// Removes the socket file, ignoring "not found".
pub fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_is_stable_short_and_distinct() {
        let dir = Path::new(DEFAULT_SOCKET_DIR);
        let a = socket_path(dir, "/run/containerd/containerd.sock", "k8s.io", "abc");
        // Fixed vector: the path must never change between versions, or a
        // new `start` would not find a running shim.
        // sha256("/run/containerd/containerd.sock/k8s.io/abc")
        let expect = {
            let d = Sha256::digest(b"/run/containerd/containerd.sock/k8s.io/abc");
            d.iter()
                .take(16)
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        assert_eq!(a, dir.join(&expect));
        assert_eq!(expect.len(), 32);
        assert_eq!(
            a,
            socket_path(dir, "/run/containerd/containerd.sock", "k8s.io", "abc")
        );
        assert_ne!(
            a,
            socket_path(dir, "/run/containerd/containerd.sock", "default", "abc")
        );
        assert_ne!(
            a,
            socket_path(dir, "/run/containerd/containerd.sock", "k8s.io", "abd")
        );
        assert_ne!(a, socket_path(dir, "/other.sock", "k8s.io", "abc"));
        // 14 + 32 bytes: far below sun_path's limit.
        assert_eq!(a.as_os_str().len(), DEFAULT_SOCKET_DIR.len() + 1 + 32);
        assert_eq!(
            address_of(&a),
            format!("unix://{DEFAULT_SOCKET_DIR}/{expect}")
        );
    }

    #[test]
    fn known_digest() {
        // `printf a/b/c | sha256sum` = d76a7b72669c9cec266b566bdec68efb...
        let p = socket_path(Path::new("/d"), "a", "b", "c");
        assert_eq!(p, Path::new("/d/d76a7b72669c9cec266b566bdec68efb"));
    }

    #[test]
    fn bind_replaces_stale_socket_and_detects_live_one() {
        let dir = std::env::temp_dir().join(format!("kuasar-shim-sock-{}", std::process::id()));
        let path = dir.join("s").join("x");
        let l = bind(&path).expect("bind").expect("listener");
        // Live: a second bind reports the running shim.
        assert!(bind(&path).expect("bind").is_none());
        drop(l);
        // Stale file left behind: replaced.
        assert!(path.exists());
        let l2 = bind(&path).expect("bind").expect("listener");
        drop(l2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
