//! Runs work inside a network namespace on a dedicated OS thread: `setns`
//! changes only the calling thread, and the thread ends with the work, so
//! no thread of the daemon ever moves.
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sched::{setns, CloneFlags};

use super::NetError;

/// Runs `work` in a new thread inside the network namespace at `netns`;
/// waits at most `timeout` for it. A thread still busy after the timeout is
/// left to finish on its own (every netlink receive it makes is bounded).
pub async fn run_in<T, F>(netns: &Path, timeout: Duration, work: F) -> Result<T, NetError>
where
    T: Send + 'static,
    F: FnOnce(&Path) -> Result<T, NetError> + Send + 'static,
{
    let path: PathBuf = netns.to_owned();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("kuasar-netns".into())
        .spawn(move || {
            let _ = tx.send(enter(&path).and_then(|()| work(&path)));
        })
        .map_err(|source| NetError::Worker {
            netns: netns.to_owned(),
            source,
        })?;
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(res)) => res,
        // The sender was dropped without a send: the work panicked.
        Ok(Err(_)) => Err(NetError::Panicked {
            netns: netns.to_owned(),
        }),
        Err(_) => Err(NetError::Timeout {
            netns: netns.to_owned(),
            after: timeout,
        }),
    }
}

/// Moves the calling thread into the network namespace at `netns`.
fn enter(netns: &Path) -> Result<(), NetError> {
    let file = std::fs::File::open(netns).map_err(|source| NetError::OpenNetns {
        netns: netns.to_owned(),
        source,
    })?;
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| NetError::EnterNetns {
        netns: netns.to_owned(),
        source: e.into(),
    })
}
