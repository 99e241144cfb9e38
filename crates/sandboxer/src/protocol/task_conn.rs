//! Zero-shim task connections that outlive kuasar-vmm.
//!
//! In the zero-shim mode containerd holds its task API connection to
//! kuasar-vmm itself; if it broke with kuasar-vmm, containerd would record
//! every task of the pod exited. So each sandbox's task socket, and every
//! connection accepted on it, is also held open inside the sandbox's VMM
//! process ([`Sandbox::hold_fd`]): when kuasar-vmm dies containerd sees no
//! end, and its requests wait in the socket. The restarted kuasar-vmm
//! copies them back out of the VMM ([`Sandbox::take_back_sockets`]).
//!
//! kuasar-vmm relays each connection, frame by frame, to its own ttrpc
//! server on a private socket. A `Wait` request is written to disk (its
//! raw frame) before it is taken from the socket, and removed once
//! answered; after a restart the recorded ones are sent again on the new
//! relay, so that containerd's `Wait` calls in flight are answered as the
//! containers exit.
//!
//! On disk, in `<sandbox dir>/task-conns/`: `listener` (the inode of the
//! task socket's listener), and a directory per held connection, named by
//! its socket's inode, holding one file per unanswered `Wait` (its stream
//! id; the frame).
use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kuasar_api::frame::{Header, HEADER_LEN, MAX_PAYLOAD, TYPE_REQUEST, TYPE_RESPONSE};
use kuasar_api::services;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

use crate::sandbox::Sandbox;
use crate::vmm::held::socket_inode;

/// The directory of a sandbox's held task connections.
const DIR: &str = "task-conns";
/// The file naming the listener's inode.
const LISTENER_FILE: &str = "listener";
/// The VMM's name for the held listener.
const LISTENER_NAME: &str = "t.listener";
/// Frames up to this size are peeked whole before they are consumed (a
/// `Wait` is a few hundred bytes).
const PEEK_MAX: usize = 256 * 1024;

/// The VMM's name for a held connection.
fn conn_name(inode: u64) -> String {
    format!("t.{inode}")
}

/// What every relay of one sandbox shares.
struct Shared {
    sandbox: Arc<Sandbox>,
    dir: PathBuf,
    inner: PathBuf,
    relays: Mutex<HashMap<u64, JoinHandle<()>>>,
}

/// A sandbox's task socket, its connections relayed to `inner`.
pub struct TaskConns {
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl TaskConns {
    /// Serves containerd on `public` for `sandbox`, each connection relayed
    /// to the ttrpc server listening on `inner`. What an earlier kuasar-vmm
    /// left held (the listener, the connections and their unanswered
    /// `Wait`s) is taken back; otherwise `public` is bound anew.
    pub async fn start(sandbox: Arc<Sandbox>, public: &Path, inner: &Path) -> io::Result<Self> {
        let dir = sandbox.dir.join(DIR);
        let shared = Arc::new(Shared {
            sandbox,
            dir,
            inner: inner.to_owned(),
            relays: Mutex::new(HashMap::new()),
        });
        let listener = match shared.take_back().await {
            Some(listener) => listener,
            None => shared.bind(public).await?,
        };
        let accept = tokio::spawn(shared.clone().accept(listener));
        Ok(TaskConns { shared, accept })
    }

    /// The sandbox goes away: closes every connection (the VMM's copies
    /// too) and forgets them.
    pub async fn stop(self) {
        self.accept.abort();
        let inodes: Vec<u64> = {
            let mut relays = self.shared.relays();
            relays.values().for_each(JoinHandle::abort);
            relays.drain().map(|(inode, _)| inode).collect()
        };
        let mut names: Vec<String> = inodes.into_iter().map(conn_name).collect();
        names.push(LISTENER_NAME.to_owned());
        self.shared.sandbox.release_fds(names).await;
        let _ = std::fs::remove_dir_all(&self.shared.dir);
    }

    /// kuasar-vmm exits: stops relaying but leaves the VMM holding the
    /// socket and its connections, for the next kuasar-vmm to take back.
    pub fn detach(self) {
        self.accept.abort();
        self.shared.relays().values().for_each(JoinHandle::abort);
    }
}

impl Shared {
    fn relays(&self) -> std::sync::MutexGuard<'_, HashMap<u64, JoinHandle<()>>> {
        self.relays.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn id(&self) -> &str {
        &self.sandbox.info.id
    }

    /// Binds `public` and hands the VMM a copy of the listener.
    async fn bind(&self, public: &Path) -> io::Result<UnixListener> {
        let _ = std::fs::remove_dir_all(&self.dir);
        std::fs::create_dir_all(&self.dir)?;
        let listener = crate::bind(public).map_err(io::Error::other)?;
        let inode = socket_inode(&listener)?;
        match listener.try_clone() {
            Ok(copy) => {
                if let Err(e) = self
                    .sandbox
                    .hold_fd(LISTENER_NAME.to_owned(), OwnedFd::from(copy))
                    .await
                {
                    tracing::warn!(sandbox = %self.id(), "the VMM does not hold the task socket (a kuasar-vmm restart would break containerd's connections): {e}");
                }
            }
            Err(e) => tracing::warn!(sandbox = %self.id(), "copy the task socket: {e}"),
        }
        std::fs::write(self.dir.join(LISTENER_FILE), inode.to_string())?;
        listener.set_nonblocking(true)?;
        UnixListener::from_std(listener)
    }

    /// Takes back what an earlier kuasar-vmm left held: the listener (the
    /// answer), and each connection, relayed again with its unanswered
    /// `Wait`s sent anew. None when there is no listener to take back (the
    /// VMM's copies are then released).
    async fn take_back(self: &Arc<Self>) -> Option<UnixListener> {
        let listener_inode: u64 = std::fs::read_to_string(self.dir.join(LISTENER_FILE))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let conns = recorded_conns(&self.dir);
        let mut wanted: Vec<u64> = conns.keys().copied().collect();
        wanted.push(listener_inode);
        let mut fds = match self.sandbox.take_back_sockets(&wanted) {
            Ok(fds) => fds,
            Err(e) => {
                tracing::warn!(sandbox = %self.id(), "take the task connections back from the VMM: {e}");
                HashMap::new()
            }
        };
        let Some(listener) = fds
            .remove(&listener_inode)
            .and_then(|fd| into_listener(fd).ok())
        else {
            let mut names: Vec<String> = conns.keys().copied().map(conn_name).collect();
            names.push(LISTENER_NAME.to_owned());
            self.sandbox.release_fds(names).await;
            return None;
        };
        for (inode, replay) in conns {
            let Some(stream) = fds.remove(&inode).and_then(|fd| into_stream(fd).ok()) else {
                let _ = std::fs::remove_dir_all(self.dir.join(inode.to_string()));
                self.sandbox.release_fds(vec![conn_name(inode)]).await;
                continue;
            };
            tracing::info!(sandbox = %self.id(), inode, waits = replay.len(), "task connection taken back");
            self.spawn_relay(stream, inode, replay);
        }
        Some(listener)
    }

    async fn accept(self: Arc<Self>, listener: UnixListener) {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(sandbox = %self.id(), "accept on the task socket: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let inode = match socket_inode(&stream) {
                Ok(inode) => inode,
                Err(e) => {
                    tracing::warn!(sandbox = %self.id(), "task connection: {e}");
                    continue;
                }
            };
            self.hold(&stream, inode).await;
            self.spawn_relay(stream, inode, Vec::new());
        }
    }

    /// Hands the VMM a copy of an accepted connection.
    async fn hold(&self, stream: &UnixStream, inode: u64) {
        let held = async {
            std::fs::create_dir_all(self.dir.join(inode.to_string()))?;
            let copy = nix::unistd::dup(stream.as_raw_fd()).map_err(io::Error::from)?;
            // SAFETY: a descriptor dup just returned, owned here alone.
            let copy = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(copy) };
            self.sandbox
                .hold_fd(conn_name(inode), copy)
                .await
                .map_err(io::Error::other)
        };
        if let Err(e) = held.await {
            tracing::warn!(sandbox = %self.id(), "the VMM does not hold a task connection (a kuasar-vmm restart would break it): {e}");
        }
        // QEMU makes a descriptor it receives blocking, and the flag is the
        // open file's, which our copy shares: make it non-blocking again.
        if let Err(e) = set_nonblocking(stream) {
            tracing::warn!(sandbox = %self.id(), "task connection: {e}");
        }
    }

    fn spawn_relay(self: &Arc<Self>, stream: UnixStream, inode: u64, replay: Vec<Vec<u8>>) {
        let shared = self.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = shared.relay(&stream, inode, replay).await {
                tracing::debug!(sandbox = %shared.id(), inode, "task connection: {e}");
            }
            // Ended by either side (not aborted): containerd must see the
            // end, so the VMM's copy goes too.
            shared.relays().remove(&inode);
            shared.sandbox.release_fds(vec![conn_name(inode)]).await;
            let _ = std::fs::remove_dir_all(shared.dir.join(inode.to_string()));
        });
        self.relays().insert(inode, task);
    }

    /// Relays one containerd connection to the ttrpc server until either
    /// side ends it, after sending `replay` (recorded `Wait` frames).
    async fn relay(&self, outer: &UnixStream, inode: u64, replay: Vec<Vec<u8>>) -> io::Result<()> {
        let conn_dir = self.dir.join(inode.to_string());
        let inner = UnixStream::connect(&self.inner).await?;
        let (mut inner_r, mut inner_w) = inner.into_split();
        let waits = Mutex::new(HashSet::new());
        for frame in &replay {
            if let Some(h) = Header::decode(frame) {
                waits
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(h.stream_id);
            }
            inner_w.write_all(frame).await?;
        }
        let up = async {
            loop {
                let frame = next_frame(outer, |frame| {
                    if let Some(stream_id) = wait_request(frame) {
                        record(&conn_dir, stream_id, frame)?;
                        waits
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(stream_id);
                    }
                    Ok(())
                })
                .await?;
                let Some(frame) = frame else {
                    // containerd closed its side: so do we towards the
                    // server, which still answers what it was sent.
                    return inner_w.shutdown().await;
                };
                inner_w.write_all(&frame).await?;
            }
        };
        let down = async {
            loop {
                let mut head = [0u8; HEADER_LEN];
                inner_r.read_exact(&mut head).await?;
                let h = Header::from(head);
                let mut frame = head.to_vec();
                frame.resize(h.frame_len(), 0);
                inner_r.read_exact(&mut frame[HEADER_LEN..]).await?;
                write_all(outer, &frame).await?;
                let answered = h.kind == TYPE_RESPONSE
                    && waits
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&h.stream_id);
                if answered {
                    let _ = std::fs::remove_file(conn_dir.join(h.stream_id.to_string()));
                }
            }
        };
        tokio::pin!(down);
        tokio::select! {
            r = up => {
                r?;
                (&mut down).await
            }
            r = &mut down => r,
        }
    }
}

/// The stream id of `frame` when it is a task API `Wait` request.
fn wait_request(frame: &[u8]) -> Option<u32> {
    let h = Header::decode(frame)?;
    if h.kind != TYPE_REQUEST {
        return None;
    }
    let req = <ttrpc::Request as protobuf::Message>::parse_from_bytes(&frame[HEADER_LEN..]).ok()?;
    let task = req.service == services::TASK_V2 || req.service == services::TASK_V3;
    (task && req.method == "Wait").then_some(h.stream_id)
}

/// Writes a `Wait` frame to disk (whole, or not at all).
fn record(conn_dir: &Path, stream_id: u32, frame: &[u8]) -> io::Result<()> {
    let tmp = conn_dir.join(format!(".{stream_id}"));
    std::fs::write(&tmp, frame)?;
    std::fs::rename(&tmp, conn_dir.join(stream_id.to_string()))
}

/// The connections recorded in `dir`, each with its recorded `Wait` frames
/// (in stream order).
fn recorded_conns(dir: &Path) -> HashMap<u64, Vec<Vec<u8>>> {
    let mut out = HashMap::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Some(inode) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let mut waits: Vec<(u32, Vec<u8>)> = std::fs::read_dir(entry.path())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|w| {
                let stream: u32 = w.file_name().to_str()?.parse().ok()?;
                let frame = std::fs::read(w.path()).ok()?;
                (wait_request(&frame) == Some(stream)).then_some((stream, frame))
            })
            .collect();
        waits.sort();
        out.insert(inode, waits.into_iter().map(|(_, f)| f).collect());
    }
    out
}

fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
    Ok(())
}

fn into_listener(fd: OwnedFd) -> io::Result<UnixListener> {
    let l = std::os::unix::net::UnixListener::from(fd);
    l.set_nonblocking(true)?;
    UnixListener::from_std(l)
}

fn into_stream(fd: OwnedFd) -> io::Result<UnixStream> {
    let s = std::os::unix::net::UnixStream::from(fd);
    s.set_nonblocking(true)?;
    UnixStream::from_std(s)
}

/// The next whole frame containerd sent, None at its end. A frame that is
/// already whole in the socket (containerd writes each in one go) is
/// peeked, given to `before_consume`, and only then taken from the socket:
/// a kuasar-vmm killed in between leaves it there for the next one. One
/// that arrives in parts, or is larger than `PEEK_MAX`, is read as it comes
/// and given to `before_consume` once whole.
async fn next_frame(
    s: &UnixStream,
    before_consume: impl FnOnce(&[u8]) -> io::Result<()>,
) -> io::Result<Option<Vec<u8>>> {
    let mut head = [0u8; HEADER_LEN];
    let n = peek(s, &mut head).await?;
    if n == 0 {
        return Ok(None);
    }
    if n == HEADER_LEN {
        let len = Header::from(head)
            .checked_len(MAX_PAYLOAD)
            .map_err(io::Error::other)?;
        let total = HEADER_LEN + len;
        if total <= PEEK_MAX {
            let mut frame = vec![0u8; total];
            if peek(s, &mut frame).await? == total {
                before_consume(&frame)?;
                read_exact(s, &mut frame).await?;
                return Ok(Some(frame));
            }
        }
    }
    read_exact(s, &mut head).await?;
    let len = Header::from(head)
        .checked_len(MAX_PAYLOAD)
        .map_err(io::Error::other)?;
    let mut frame = head.to_vec();
    frame.resize(HEADER_LEN + len, 0);
    read_exact(s, &mut frame[HEADER_LEN..]).await?;
    before_consume(&frame)?;
    Ok(Some(frame))
}

async fn peek(s: &UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        s.readable().await?;
        let peeked = s.try_io(Interest::READABLE, || {
            nix::sys::socket::recv(
                s.as_raw_fd(),
                buf,
                nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            )
            .map_err(io::Error::from)
        });
        match peeked {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

async fn read_exact(s: &UnixStream, mut buf: &mut [u8]) -> io::Result<()> {
    while !buf.is_empty() {
        s.readable().await?;
        match s.try_read(buf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn write_all(s: &UnixStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        s.writable().await?;
        match s.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(stream_id: u32, service: &str, method: &str) -> Vec<u8> {
        let mut req = ttrpc::Request::new();
        req.service = service.to_owned();
        req.method = method.to_owned();
        let payload = protobuf::Message::write_to_bytes(&req).unwrap();
        let mut frame = Header {
            len: payload.len() as u32,
            stream_id,
            kind: TYPE_REQUEST,
            flags: 0,
        }
        .encode()
        .to_vec();
        frame.extend(payload);
        frame
    }

    #[test]
    fn only_task_waits_are_recorded() {
        assert_eq!(
            wait_request(&request(7, services::TASK_V3, "Wait")),
            Some(7)
        );
        assert_eq!(
            wait_request(&request(9, services::TASK_V2, "Wait")),
            Some(9)
        );
        assert_eq!(wait_request(&request(9, services::TASK_V2, "State")), None);
        assert_eq!(wait_request(&request(9, services::AGENT, "Wait")), None);
        assert_eq!(wait_request(b"short"), None);
    }

    #[test]
    fn recorded_waits_come_back_in_stream_order() {
        let dir = std::env::temp_dir().join(format!("kuasar-tconn-{}", std::process::id()));
        let conn = dir.join("4242");
        std::fs::create_dir_all(&conn).unwrap();
        record(&conn, 11, &request(11, services::TASK_V3, "Wait")).unwrap();
        record(&conn, 3, &request(3, services::TASK_V3, "Wait")).unwrap();
        // Not a Wait of that stream: ignored.
        std::fs::write(conn.join("5"), request(7, services::TASK_V3, "Wait")).unwrap();
        std::fs::write(dir.join(LISTENER_FILE), "1").unwrap();
        let conns = recorded_conns(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(conns.len(), 1);
        let ids: Vec<u32> = conns[&4242]
            .iter()
            .map(|f| Header::decode(f).unwrap().stream_id)
            .collect();
        assert_eq!(ids, [3, 11]);
    }

    #[tokio::test]
    async fn frames_are_consumed_only_after_the_hook() {
        let (a, b) = UnixStream::pair().unwrap();
        let wait = request(5, services::TASK_V3, "Wait");
        // Sent in two parts: the hook sees the whole frame.
        write_all(&a, &wait[..4]).await.unwrap();
        let rest = wait[4..].to_vec();
        let sender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            write_all(&a, &rest).await.unwrap();
            a
        });
        let mut seen = Vec::new();
        let frame = next_frame(&b, |f| {
            seen = f.to_vec();
            Ok(())
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(frame, wait);
        assert_eq!(seen, wait);
        // A failing hook leaves the frame in the socket.
        let a = sender.await.unwrap();
        write_all(&a, &wait).await.unwrap();
        let err = next_frame(&b, |_| Err(io::Error::other("disk full"))).await;
        assert!(err.is_err());
        let again = next_frame(&b, |_| Ok(())).await.unwrap().unwrap();
        assert_eq!(again, wait);
        drop(a);
        assert!(next_frame(&b, |_| Ok(())).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_frame_cut_short_is_an_error_not_a_wait() {
        let (a, b) = UnixStream::pair().unwrap();
        let wait = request(5, services::TASK_V3, "Wait");
        write_all(&a, &wait[..wait.len() - 3]).await.unwrap();
        drop(a);
        let r = tokio::time::timeout(Duration::from_secs(5), next_frame(&b, |_| Ok(()))).await;
        assert!(r.expect("no hang").is_err());
    }
}
