//! The OCI runtime's `--console-socket`: for a process with a terminal, crun
//! creates the pty and sends its master over this Unix socket (SCM_RIGHTS).
use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use tokio::io::Interest;
use tokio::net::UnixListener;

use crate::error::{Context, Error, Result};

/// Where console sockets are made (paths must stay short: 108 bytes).
const CONSOLE_DIR: &str = "/run/kuasar/console";
/// How long the runtime gets to send the pty after it returned.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(5);

static COUNTER: AtomicU64 = AtomicU64::new(0);

pub struct ConsoleSocket {
    path: PathBuf,
    listener: UnixListener,
}

impl ConsoleSocket {
    pub fn bind() -> Result<Self> {
        std::fs::create_dir_all(CONSOLE_DIR).context("create console socket directory")?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = Path::new(CONSOLE_DIR).join(format!("{n}.sock"));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).context("bind console socket")?;
        Ok(ConsoleSocket { path, listener })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pty master the runtime sent (call after it returned successfully).
    pub async fn receive(self) -> Result<OwnedFd> {
        let accept = async {
            let (stream, _) = self.listener.accept().await?;
            loop {
                stream.readable().await?;
                match stream.try_io(Interest::READABLE, || recv_fd(stream.as_raw_fd())) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    res => return res,
                }
            }
        };
        match tokio::time::timeout(RECEIVE_TIMEOUT, accept).await {
            Ok(res) => res.context("receive pty master from the OCI runtime"),
            Err(_) => Err(Error::Internal(
                "the OCI runtime did not send the pty master on the console socket".into(),
            )),
        }
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Receives one message and returns the first fd it carries.
fn recv_fd(sock: RawFd) -> io::Result<OwnedFd> {
    let mut buf = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut received: Vec<OwnedFd> = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            // SAFETY: SCM_RIGHTS hands us new fds that nothing else owns.
            received.extend(
                fds.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    if received.is_empty() {
        return Err(io::Error::other("no fd in the console socket message"));
    }
    Ok(received.swap_remove(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{sendmsg, ControlMessage};
    use std::io::IoSlice;
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn receives_a_passed_fd() {
        let (a, b) = UnixDatagram::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        let fds = [file.as_raw_fd()];
        let iov = [IoSlice::new(b"/dev/pts/0")];
        sendmsg::<()>(
            a.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let fd = recv_fd(b.as_raw_fd()).unwrap();
        assert_ne!(fd.as_raw_fd(), file.as_raw_fd());
    }
}
