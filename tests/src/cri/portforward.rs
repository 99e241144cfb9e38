//! PortForward through containerd's streaming server: the Kubernetes
//! port-forward protocol over WebSocket (`v4.channel.k8s.io`). The CRI
//! PortForward answer is a URL for the ports of the request; the client
//! upgrades it to a WebSocket. Per port `i` there are two channels,
//! `2i` (data, both ways) and `2i + 1` (errors, from the server); every
//! binary message starts with its channel, and the server's first message
//! on each channel is the port (u16, little endian). The server dials the
//! port when the session opens and ends the session when that connection
//! ends (an error message first when the dial failed).
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tungstenite::{Message, WebSocket};

const PROTOCOLS: &str = "v4.channel.k8s.io";

/// What a session received so far.
#[derive(Debug, Clone, Default)]
pub struct Forwarded {
    /// Bytes of the data channel (after its port prefix).
    pub data: Vec<u8>,
    /// Text of the error channel (after its port prefix).
    pub error: String,
    /// The server closed the session.
    pub closed: bool,
}

/// One port-forward session for one port (channels 0 and 1).
pub struct PortForwardSession {
    ws: WebSocket<TcpStream>,
    out: Forwarded,
    /// Whether each channel's port prefix was seen (data, error).
    prefixed: [bool; 2],
}

impl std::fmt::Debug for PortForwardSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortForwardSession")
            .field("out", &self.out)
            .finish()
    }
}

impl PortForwardSession {
    /// Opens the session at `url` (as returned by PortForward).
    pub fn open(url: &str, timeout: Duration) -> Result<Self, String> {
        let (ws, _) = super::stream::connect(url, PROTOCOLS, timeout)?;
        Ok(Self {
            ws,
            out: Forwarded::default(),
            prefixed: [false; 2],
        })
    }

    /// Sends `data` to the forwarded port, in messages of at most 32 KiB.
    pub fn send(&mut self, data: &[u8]) -> Result<(), String> {
        for chunk in data.chunks(32 << 10) {
            let mut msg = Vec::with_capacity(chunk.len() + 1);
            msg.push(0);
            msg.extend_from_slice(chunk);
            self.ws
                .send(Message::Binary(msg.into()))
                .map_err(|e| format!("port-forward send: {e}"))?;
        }
        Ok(())
    }

    /// Reads until `done` holds for what arrived or the server closed the
    /// session; errors when `timeout` passes first.
    pub fn read_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&Forwarded) -> bool,
    ) -> Result<&Forwarded, String> {
        let deadline = Instant::now() + timeout;
        while !self.out.closed && !done(&self.out) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "port-forward: still waiting after {timeout:?}; so far {} bytes, error {:?}",
                    self.out.data.len(),
                    self.out.error
                ));
            }
            let _ = self.ws.get_mut().set_read_timeout(Some(left));
            match self.ws.read() {
                Ok(Message::Binary(m)) => self.take(&m),
                Ok(Message::Close(_)) => self.out.closed = true,
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                // The server may drop the TCP connection without a close
                // handshake when the forwarded connection ends.
                Err(_) => self.out.closed = true,
            }
        }
        Ok(&self.out)
    }

    fn take(&mut self, msg: &[u8]) {
        let Some((&channel, mut payload)) = msg.split_first() else {
            return;
        };
        let Some(i) = [0u8, 1].iter().position(|c| *c == channel) else {
            return;
        };
        if !self.prefixed[i] {
            // The port, as the server's first message on the channel.
            payload = payload.get(2..).unwrap_or_default();
            self.prefixed[i] = true;
        }
        match i {
            0 => self.out.data.extend_from_slice(payload),
            _ => self.out.error.push_str(&String::from_utf8_lossy(payload)),
        }
    }

    /// Ends the session from this side.
    pub fn close(mut self) -> Forwarded {
        for m in super::stream::close_and_drain(&mut self.ws) {
            self.take(&m);
        }
        self.out
    }
}
