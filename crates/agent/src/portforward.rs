//! The guest end of port forwarding (CRI PortForward): TCP connections to
//! 127.0.0.1:<port> in the VM, opened, fed, read and closed on the host's
//! request (`PortForward*` of the agent protocol). The pod's containers share
//! the VM's network namespace, so a container listening on 127.0.0.1 or
//! 0.0.0.0 is reached.
//!
//! Bounded: at most [`MAX_CONNECTIONS`] connections, chunks of at most
//! [`MAX_CHUNK`] bytes, connects of at most [`MAX_CONNECT_TIMEOUT`]. One read
//! and one write may be in flight per connection (a second waits for the
//! first). Closing a connection ends the calls in flight on it.
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::debug;

use crate::error::{Error, Result};

/// Most connections open at once (the host bounds each pod's far lower).
pub const MAX_CONNECTIONS: usize = 256;
/// Largest chunk read or written in one call.
pub const MAX_CHUNK: usize = 64 << 10;
/// The connect bound when the host gives none, and the most it may ask.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// One forwarded connection.
struct Conn {
    port: u16,
    read: tokio::sync::Mutex<OwnedReadHalf>,
    write: tokio::sync::Mutex<OwnedWriteHalf>,
    /// Becomes true when the connection is closed.
    closed: watch::Sender<bool>,
}

impl Conn {
    /// Runs `op` unless (or until) the connection is closed.
    async fn unless_closed<T>(
        &self,
        id: u64,
        op: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let mut closed = self.closed.subscribe();
        tokio::select! {
            res = op => res,
            _ = closed.wait_for(|c| *c) => Err(not_found(id)),
        }
    }
}

/// The open connections, by id.
#[derive(Default)]
pub struct Forwards {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
}

fn not_found(id: u64) -> Error {
    Error::NotFound(format!("port-forward connection {id} not found"))
}

/// The connect bound for a request's `connect_timeout_ms`.
pub fn connect_timeout(ms: u32) -> Duration {
    match ms {
        0 => DEFAULT_CONNECT_TIMEOUT,
        ms => Duration::from_millis(ms.into()).min(MAX_CONNECT_TIMEOUT),
    }
}

/// The port of a request, refused unless 1..=65535.
pub fn valid_port(port: u32) -> Result<u16> {
    match u16::try_from(port) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(Error::InvalidArgument(format!(
            "port-forward port {port} is not in 1..=65535"
        ))),
    }
}

/// The chunk a read may return: `len` capped at [`MAX_CHUNK`], at least 1.
pub fn read_len(len: u32) -> usize {
    (len as usize).clamp(1, MAX_CHUNK)
}

impl Forwards {
    fn map(&self) -> MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, id: u64) -> Result<Arc<Conn>> {
        self.map().get(&id).cloned().ok_or_else(|| not_found(id))
    }

    /// Connects to 127.0.0.1:`port`; returns the connection's id.
    pub async fn open(&self, port: u32, connect_timeout_ms: u32) -> Result<u64> {
        let port = valid_port(port)?;
        if self.map().len() >= MAX_CONNECTIONS {
            return Err(Error::FailedPrecondition(format!(
                "too many port-forward connections (at most {MAX_CONNECTIONS})"
            )));
        }
        let bound = connect_timeout(connect_timeout_ms);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let stream = match tokio::time::timeout(bound, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(Error::Io {
                    context: format!("connect to {addr} in the guest"),
                    source: e,
                })
            }
            Err(_) => {
                return Err(Error::FailedPrecondition(format!(
                    "connect to {addr} in the guest: no answer within {bound:?}"
                )))
            }
        };
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let conn = Arc::new(Conn {
            port,
            read: tokio::sync::Mutex::new(read),
            write: tokio::sync::Mutex::new(write),
            closed: watch::channel(false).0,
        });
        let mut map = self.map();
        if map.len() >= MAX_CONNECTIONS {
            return Err(Error::FailedPrecondition(format!(
                "too many port-forward connections (at most {MAX_CONNECTIONS})"
            )));
        }
        map.insert(id, conn);
        debug!(id, port, "port-forward connection open");
        Ok(id)
    }

    /// Writes all of `data` to the connection.
    pub async fn write(&self, id: u64, data: &[u8]) -> Result<usize> {
        if data.len() > MAX_CHUNK {
            return Err(Error::InvalidArgument(format!(
                "port-forward write of {} bytes (at most {MAX_CHUNK})",
                data.len()
            )));
        }
        let conn = self.get(id)?;
        let op = async {
            let mut w = conn.write.lock().await;
            w.write_all(data).await.map_err(|e| Error::Io {
                context: format!("write to 127.0.0.1:{} in the guest", conn.port),
                source: e,
            })
        };
        conn.unless_closed(id, op).await?;
        Ok(data.len())
    }

    /// The next chunk the connection delivers (at most `len` bytes); empty
    /// at its end.
    pub async fn read(&self, id: u64, len: u32) -> Result<Vec<u8>> {
        let conn = self.get(id)?;
        let op = async {
            let mut buf = vec![0; read_len(len)];
            let mut r = conn.read.lock().await;
            let n = r.read(&mut buf).await.map_err(|e| Error::Io {
                context: format!("read from 127.0.0.1:{} in the guest", conn.port),
                source: e,
            })?;
            buf.truncate(n);
            Ok(buf)
        };
        conn.unless_closed(id, op).await
    }

    /// Half-closes the connection (the application reads its end).
    pub async fn shutdown(&self, id: u64) -> Result<()> {
        let conn = self.get(id)?;
        let op = async {
            let mut w = conn.write.lock().await;
            // A peer already gone is not worth an error.
            let _ = w.shutdown().await;
            Ok(())
        };
        conn.unless_closed(id, op).await
    }

    /// Closes the connection; calls in flight on it end with NotFound.
    pub fn close(&self, id: u64) -> Result<()> {
        let conn = self.map().remove(&id).ok_or_else(|| not_found(id))?;
        conn.closed.send_replace(true);
        debug!(id, port = conn.port, "port-forward connection closed");
        Ok(())
    }

    /// Closes every connection; returns how many there were.
    pub fn reset(&self) -> usize {
        let conns: Vec<_> = self.map().drain().map(|(_, c)| c).collect();
        for c in &conns {
            c.closed.send_replace(true);
        }
        conns.len()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn bounds() {
        assert!(valid_port(0).is_err());
        assert!(valid_port(65536).is_err());
        assert_eq!(valid_port(8080).unwrap(), 8080);
        assert_eq!(connect_timeout(0), DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(connect_timeout(1500), Duration::from_millis(1500));
        assert_eq!(connect_timeout(u32::MAX), MAX_CONNECT_TIMEOUT);
        assert_eq!(read_len(0), 1);
        assert_eq!(read_len(u32::MAX), MAX_CHUNK);
    }

    async fn echo_server() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn bytes_both_ways_then_end() {
        let port = echo_server().await;
        let f = Forwards::default();
        let id = f.open(port.into(), 0).await.unwrap();
        assert_eq!(f.write(id, b"hello").await.unwrap(), 5);
        let mut got = Vec::new();
        while got.len() < 5 {
            got.extend(f.read(id, 3).await.unwrap());
        }
        assert_eq!(got, b"hello");
        f.shutdown(id).await.unwrap();
        assert!(f.read(id, 100).await.unwrap().is_empty(), "end of stream");
        f.close(id).unwrap();
        assert!(f
            .read(id, 100)
            .await
            .unwrap_err()
            .to_string()
            .contains("not found"));
        assert_eq!(f.len(), 0);
    }

    #[tokio::test]
    async fn refused_and_oversized_are_errors() {
        let f = Forwards::default();
        // A port nobody listens on (bound, then released).
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let e = f.open(port.into(), 0).await.unwrap_err();
        assert!(e.to_string().contains("connect to 127.0.0.1"), "{e}");
        let port = echo_server().await;
        let id = f.open(port.into(), 0).await.unwrap();
        let e = f.write(id, &vec![0; MAX_CHUNK + 1]).await.unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    }

    #[tokio::test]
    async fn close_ends_a_read_in_flight_and_reset_closes_all() {
        // A server that accepts and never sends.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let held = tokio::spawn(async move {
            let mut kept = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                kept.push(s);
            }
        });
        let f = Arc::new(Forwards::default());
        let id = f.open(port.into(), 0).await.unwrap();
        let reader = tokio::spawn({
            let f = f.clone();
            async move { f.read(id, 10).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        f.close(id).unwrap();
        let res = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("the read ends")
            .unwrap();
        assert!(matches!(res, Err(Error::NotFound(_))), "{res:?}");
        f.open(port.into(), 0).await.unwrap();
        f.open(port.into(), 0).await.unwrap();
        assert_eq!(f.reset(), 2);
        assert_eq!(f.len(), 0);
        held.abort();
    }
}
