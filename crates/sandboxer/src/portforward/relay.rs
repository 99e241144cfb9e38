//! The relay proper: accepts connections on the pod's loopback listener and
//! moves each one's bytes to and from a guest connection (`PortForward*`
//! agent calls), one 32 KiB chunk at a time each way.
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::agent::{Agent, AgentError};

/// The relay's bounds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections relayed at once per pod; more are closed at once.
    pub max_connections: usize,
    /// Largest chunk moved in one agent call, each way.
    pub chunk: u32,
    /// How long the guest may take to connect.
    pub connect_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 64,
            chunk: 32 << 10,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// The guest end of the relayed connections (the agent; a fake in tests).
#[async_trait]
pub trait Guest: Send + Sync + 'static {
    async fn open(&self, port: u16, connect_timeout: Duration) -> Result<u64, AgentError>;
    async fn write(&self, id: u64, data: Vec<u8>) -> Result<(), AgentError>;
    async fn read(&self, id: u64, len: u32) -> Result<Vec<u8>, AgentError>;
    async fn shutdown(&self, id: u64) -> Result<(), AgentError>;
    async fn close(&self, id: u64) -> Result<(), AgentError>;
}

#[async_trait]
impl Guest for Agent {
    async fn open(&self, port: u16, connect_timeout: Duration) -> Result<u64, AgentError> {
        self.port_forward_open(port, connect_timeout).await
    }
    async fn write(&self, id: u64, data: Vec<u8>) -> Result<(), AgentError> {
        self.port_forward_write(id, data).await
    }
    async fn read(&self, id: u64, len: u32) -> Result<Vec<u8>, AgentError> {
        self.port_forward_read(id, len).await
    }
    async fn shutdown(&self, id: u64) -> Result<(), AgentError> {
        self.port_forward_shutdown(id).await
    }
    async fn close(&self, id: u64) -> Result<(), AgentError> {
        self.port_forward_close(id).await
    }
}

/// Why one relayed connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("read the port the client asked for (SO_ORIGINAL_DST)")]
    OriginalDst(#[source] std::io::Error),
    #[error("the guest agent has no port forwarding (a guest image older than kuasar-vmm); rebuild the guest image")]
    GuestUnsupported(#[source] AgentError),
    #[error("connect to 127.0.0.1:{port} in the guest")]
    GuestConnect {
        port: u16,
        #[source]
        source: AgentError,
    },
    #[error("relay to 127.0.0.1:{port} in the guest")]
    Guest {
        port: u16,
        #[source]
        source: AgentError,
    },
    #[error("relay to 127.0.0.1:{port}: the pod side's connection")]
    Client {
        port: u16,
        #[source]
        source: std::io::Error,
    },
}

/// At most one warning per interval; counts the ones held back.
struct RateLimit {
    every: Duration,
    last: Option<Instant>,
    held: u64,
}

impl RateLimit {
    fn new(every: Duration) -> Self {
        RateLimit {
            every,
            last: None,
            held: 0,
        }
    }

    /// Some(number held back since the last one) when a warning may go now.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.duration_since(t) < self.every => {
                self.held += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held))
            }
        }
    }
}

/// The port a redirected connection was made to: its original destination
/// (a connection made to the relay's own port directly keeps it as is).
pub fn original_port(stream: &TcpStream) -> std::io::Result<u16> {
    let addr =
        nix::sys::socket::getsockopt(&stream.as_fd(), nix::sys::socket::sockopt::OriginalDst)
            .map_err(std::io::Error::from)?;
    Ok(u16::from_be(addr.sin_port))
}

/// Serves the listener until the task is aborted (which ends every
/// connection it relays). `port_of` names each connection's port.
pub async fn serve<G: Guest>(
    listener: TcpListener,
    guest: Arc<G>,
    limits: Limits,
    sandbox: String,
    port_of: fn(&TcpStream) -> std::io::Result<u16>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut conns = JoinSet::new();
    let mut warn = RateLimit::new(Duration::from_secs(10));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        // EMFILE and the like: wait instead of spinning.
                        if let Some(held) = warn.allow(Instant::now()) {
                            tracing::warn!(sandbox, held, "port-forward relay: accept: {e}");
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    if let Some(held) = warn.allow(Instant::now()) {
                        tracing::warn!(sandbox, held, max = limits.max_connections, "port-forward relay: too many connections; closing a new one");
                    }
                    continue;
                };
                let guest = guest.clone();
                conns.spawn(async move {
                    let res = relay_one(guest.as_ref(), stream, limits, port_of, permit).await;
                    res.map_err(|e| crate::error::chain(&e))
                });
            }
            Some(done) = conns.join_next(), if !conns.is_empty() => {
                if let Ok(Err(e)) = done {
                    if let Some(held) = warn.allow(Instant::now()) {
                        tracing::warn!(sandbox, held, "port-forward: {e}");
                    }
                }
            }
        }
    }
}

/// Relays one connection until both sides ended (or one failed); the guest
/// connection is closed after, the client's when `stream` drops.
async fn relay_one<G: Guest + ?Sized>(
    guest: &G,
    stream: TcpStream,
    limits: Limits,
    port_of: fn(&TcpStream) -> std::io::Result<u16>,
    _permit: OwnedSemaphorePermit,
) -> Result<(), RelayError> {
    let port = port_of(&stream).map_err(RelayError::OriginalDst)?;
    let id = match guest.open(port, limits.connect_timeout).await {
        Ok(id) => id,
        Err(e) if e.is_unimplemented() => return Err(RelayError::GuestUnsupported(e)),
        Err(source) => return Err(RelayError::GuestConnect { port, source }),
    };
    tracing::debug!(port, id, "port-forward connection relayed");
    let (mut from_client, mut to_client) = stream.into_split();
    let guest_err = |source| RelayError::Guest { port, source };
    let client_err = |source| RelayError::Client { port, source };
    let up = async {
        let mut buf = vec![0u8; limits.chunk as usize];
        loop {
            let n = from_client.read(&mut buf).await.map_err(client_err)?;
            if n == 0 {
                return guest.shutdown(id).await.map_err(guest_err);
            }
            guest
                .write(id, buf[..n].to_vec())
                .await
                .map_err(guest_err)?;
        }
    };
    let down = async {
        loop {
            let data = guest.read(id, limits.chunk).await.map_err(guest_err)?;
            if data.is_empty() {
                // The client may already be gone.
                let _ = to_client.shutdown().await;
                return Ok(());
            }
            to_client.write_all(&data).await.map_err(client_err)?;
        }
    };
    let res = tokio::try_join!(up, down).map(drop);
    if let Err(e) = guest.close(id).await {
        tracing::debug!(port, id, "close the guest connection: {e}");
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;
    use ttrpc::Code;

    /// A guest whose connections echo what they get, upper-cased, and end
    /// their output once shut down. Port 1 refuses; port 2 is an old agent.
    #[derive(Default)]
    struct EchoGuest {
        conns: Mutex<HashMap<u64, (Vec<u8>, bool)>>,
        closed: Mutex<Vec<u64>>,
        wake: tokio::sync::Notify,
    }

    fn status(code: Code, message: &str) -> AgentError {
        AgentError::Status {
            method: "PortForwardOpen",
            code,
            message: message.into(),
        }
    }

    #[async_trait]
    impl Guest for EchoGuest {
        async fn open(&self, port: u16, _: Duration) -> Result<u64, AgentError> {
            match port {
                1 => Err(status(Code::INTERNAL, "Connection refused")),
                2 => Err(status(Code::UNIMPLEMENTED, "PortForwardOpen method")),
                _ => {
                    let mut c = self.conns.lock().unwrap();
                    let id = c.len() as u64 + 1;
                    c.insert(id, (Vec::new(), false));
                    Ok(id)
                }
            }
        }
        async fn write(&self, id: u64, data: Vec<u8>) -> Result<(), AgentError> {
            let mut c = self.conns.lock().unwrap();
            c.get_mut(&id).unwrap().0.extend(data.to_ascii_uppercase());
            self.wake.notify_waiters();
            Ok(())
        }
        async fn read(&self, id: u64, len: u32) -> Result<Vec<u8>, AgentError> {
            loop {
                let woken = self.wake.notified();
                {
                    let mut c = self.conns.lock().unwrap();
                    let (buf, ended) = c.get_mut(&id).unwrap();
                    if !buf.is_empty() {
                        let n = buf.len().min(len as usize);
                        return Ok(buf.drain(..n).collect());
                    }
                    if *ended {
                        return Ok(Vec::new());
                    }
                }
                woken.await;
            }
        }
        async fn shutdown(&self, id: u64) -> Result<(), AgentError> {
            self.conns.lock().unwrap().get_mut(&id).unwrap().1 = true;
            self.wake.notify_waiters();
            Ok(())
        }
        async fn close(&self, id: u64) -> Result<(), AgentError> {
            self.closed.lock().unwrap().push(id);
            Ok(())
        }
    }

    #[test]
    fn rate_limit_lets_one_through_per_interval() {
        let mut r = RateLimit::new(Duration::from_secs(10));
        let t = Instant::now();
        assert_eq!(r.allow(t), Some(0));
        assert_eq!(r.allow(t + Duration::from_secs(1)), None);
        assert_eq!(r.allow(t + Duration::from_secs(2)), None);
        assert_eq!(r.allow(t + Duration::from_secs(11)), Some(2));
    }

    async fn relay_with(port: u16) -> (Arc<EchoGuest>, Result<(), RelayError>, Vec<u8>) {
        let guest = Arc::new(EchoGuest::default());
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            let _ = c.write_all(b"hello guest").await;
            let _ = c.shutdown().await;
            let mut got = Vec::new();
            let _ = c.read_to_end(&mut got).await;
            got
        });
        let (s, _) = l.accept().await.unwrap();
        let slots = Arc::new(Semaphore::new(1));
        let permit = slots.try_acquire_owned().unwrap();
        let fixed: fn(&TcpStream) -> std::io::Result<u16> = match port {
            1 => |_| Ok(1),
            2 => |_| Ok(2),
            _ => |_| Ok(8080),
        };
        let res = relay_one(guest.as_ref(), s, Limits::default(), fixed, permit).await;
        let got = client.await.unwrap();
        (guest, res, got)
    }

    #[tokio::test]
    async fn bytes_go_both_ways_and_the_guest_connection_is_closed() {
        let (guest, res, got) = relay_with(8080).await;
        res.unwrap();
        assert_eq!(got, b"HELLO GUEST");
        assert_eq!(*guest.closed.lock().unwrap(), [1]);
    }

    #[tokio::test]
    async fn a_refused_guest_connect_closes_the_client() {
        let (_, res, got) = relay_with(1).await;
        let e = res.unwrap_err();
        assert!(matches!(e, RelayError::GuestConnect { port: 1, .. }), "{e}");
        assert!(got.is_empty());
    }

    #[tokio::test]
    async fn an_old_agent_is_named() {
        let (_, res, got) = relay_with(2).await;
        let e = res.unwrap_err();
        assert!(e.to_string().contains("no port forwarding"), "{e}");
        assert!(got.is_empty());
    }

    #[tokio::test]
    async fn serve_closes_connections_beyond_the_limit() {
        let guest = Arc::new(EchoGuest::default());
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let limits = Limits {
            max_connections: 1,
            ..Limits::default()
        };
        let task = tokio::spawn(serve(l, guest, limits, "t".into(), |_| Ok(8080)));
        let mut first = TcpStream::connect(addr).await.unwrap();
        first.write_all(b"a").await.unwrap();
        let mut b = [0u8; 1];
        first.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"A");
        let mut second = TcpStream::connect(addr).await.unwrap();
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), second.read_to_end(&mut rest))
            .await
            .expect("the second connection is closed")
            .unwrap_or(0);
        assert_eq!(n, 0);
        task.abort();
        let _ = task.await;
        // Aborting the relay ends the connections it held.
        let n = tokio::time::timeout(Duration::from_secs(5), first.read(&mut b))
            .await
            .expect("the first connection ends")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
}
