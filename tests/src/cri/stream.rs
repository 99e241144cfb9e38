//! Exec and Attach through containerd's streaming server: the Kubernetes
//! remote-command protocol over WebSocket. The CRI Exec/Attach answer is a URL
//! (`http://127.0.0.1:<port>/exec/<token>`); the client upgrades it to a
//! WebSocket with subprotocol `v5.channel.k8s.io` or `v4.channel.k8s.io`.
//! Every binary message starts with its channel: 0 stdin, 1 stdout,
//! 2 stderr, 3 the final status (a JSON `metav1.Status`), 4 terminal resize;
//! in v5, `[255, 0]` closes stdin.
use std::io::ErrorKind;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tungstenite::client::IntoClientRequest;
use tungstenite::http::{header, HeaderValue, Uri};
use tungstenite::{Message, WebSocket};

const PROTOCOLS: &str = "v5.channel.k8s.io, v4.channel.k8s.io";
const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;
const CLOSE: u8 = 255;

/// What a session produced so far.
#[derive(Debug, Clone, Default)]
pub struct StreamOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The raw status message (channel 3), if the server sent one.
    pub status: Option<String>,
    /// The server closed the connection.
    pub closed: bool,
}

impl StreamOutput {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// The exit code the status reports: 0 for `Success`, the `ExitCode`
    /// cause of a `NonZeroExitCode` failure; `None` without a status or for
    /// another failure (see [`Self::status`]).
    pub fn exit_code(&self) -> Option<i32> {
        exit_code(self.status.as_deref()?)
    }
}

/// The exit code in a remote-command status JSON.
pub fn exit_code(status: &str) -> Option<i32> {
    let v: serde_json::Value = serde_json::from_str(status).ok()?;
    match v.get("status")?.as_str()? {
        "Success" => Some(0),
        _ => v
            .pointer("/details/causes")?
            .as_array()?
            .iter()
            .find(|c| c.get("reason").and_then(|r| r.as_str()) == Some("ExitCode"))?
            .get("message")?
            .as_str()?
            .parse()
            .ok(),
    }
}

/// Opens a WebSocket to the streaming server's `url` offering `protocols`
/// (comma-separated); returns it with the subprotocol the server chose.
pub fn connect(
    url: &str,
    protocols: &str,
    timeout: Duration,
) -> Result<(WebSocket<TcpStream>, String), String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("bad stream URL {url}: {e}"))?;
    let authority = uri
        .authority()
        .ok_or_else(|| format!("stream URL without host: {url}"))?
        .to_string();
    let ws_url = match url.split_once("://") {
        Some(("https", rest)) => format!("wss://{rest}"),
        Some((_, rest)) => format!("ws://{rest}"),
        None => return Err(format!("stream URL without scheme: {url}")),
    };
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&authority)
        .map_err(|e| format!("resolve {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority} resolves to nothing"))?;
    let tcp = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("connect to {authority}: {e}"))?;
    tcp.set_read_timeout(Some(timeout))
        .and_then(|()| tcp.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("socket timeouts: {e}"))?;
    let mut req = ws_url
        .into_client_request()
        .map_err(|e| format!("request for {url}: {e}"))?;
    req.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_str(protocols).map_err(|e| format!("subprotocols {protocols:?}: {e}"))?,
    );
    let (ws, resp) = tungstenite::client(req, tcp)
        .map_err(|e| format!("WebSocket handshake with {url}: {e}"))?;
    let protocol = resp
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    Ok((ws, protocol))
}

/// An open exec or attach session.
pub struct Session {
    ws: WebSocket<TcpStream>,
    protocol: String,
    out: StreamOutput,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("protocol", &self.protocol)
            .field("out", &self.out)
            .finish()
    }
}

fn io_timeout(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io)
        if matches!(io.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut))
}

impl Session {
    /// Connects to the streaming server's `url` (as returned by Exec/Attach).
    pub fn open(url: &str, timeout: Duration) -> Result<Self, String> {
        let (ws, protocol) = connect(url, PROTOCOLS, timeout)?;
        Ok(Self {
            ws,
            protocol,
            out: StreamOutput::default(),
        })
    }

    /// The subprotocol the server chose.
    pub fn protocol(&self) -> &str {
        &self.protocol
    }

    pub fn output(&self) -> &StreamOutput {
        &self.out
    }

    fn send(&mut self, channel: u8, data: &[u8]) -> Result<(), String> {
        let mut msg = Vec::with_capacity(data.len() + 1);
        msg.push(channel);
        msg.extend_from_slice(data);
        self.ws
            .send(Message::Binary(msg.into()))
            .map_err(|e| format!("send on channel {channel}: {e}"))
    }

    pub fn send_stdin(&mut self, data: &[u8]) -> Result<(), String> {
        self.send(STDIN, data)
    }

    /// Closes the session's stdin (v5 only; v4 has no way to say it).
    pub fn close_stdin(&mut self) -> Result<(), String> {
        if self.protocol != "v5.channel.k8s.io" {
            return Err(format!(
                "cannot close stdin with protocol {:?}",
                self.protocol
            ));
        }
        self.send(CLOSE, &[STDIN])
    }

    /// Sends a terminal size (tty sessions).
    pub fn resize(&mut self, width: u16, height: u16) -> Result<(), String> {
        let json = format!("{{\"Width\":{width},\"Height\":{height}}}");
        self.send(RESIZE, json.as_bytes())
    }

    /// Reads messages until `done` holds for the output so far or the server
    /// closed the connection; errors when `timeout` passes first.
    pub fn read_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&StreamOutput) -> bool,
    ) -> Result<&StreamOutput, String> {
        let deadline = Instant::now() + timeout;
        while !self.out.closed && !done(&self.out) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "stream: still waiting after {timeout:?}; so far {:?}",
                    self.out
                ));
            }
            let _ = self.ws.get_mut().set_read_timeout(Some(left));
            match self.ws.read() {
                Ok(Message::Binary(data)) => self.take(&data),
                Ok(Message::Close(_)) => self.out.closed = true,
                Ok(_) => {}
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    self.out.closed = true
                }
                Err(e) if io_timeout(&e) => {}
                Err(tungstenite::Error::Protocol(_)) if self.out.status.is_some() => {
                    // The server dropped the TCP connection right after the
                    // status, without a close handshake.
                    self.out.closed = true
                }
                Err(e) => return Err(format!("stream: {e}; so far {:?}", self.out)),
            }
        }
        Ok(&self.out)
    }

    fn take(&mut self, data: &[u8]) {
        let Some((&channel, payload)) = data.split_first() else {
            return;
        };
        match channel {
            STDOUT => self.out.stdout.extend_from_slice(payload),
            STDERR => self.out.stderr.extend_from_slice(payload),
            ERROR if !payload.is_empty() => {
                let s = self.out.status.get_or_insert_with(String::new);
                s.push_str(&String::from_utf8_lossy(payload));
            }
            _ => {}
        }
    }

    /// Reads until the server ends the session; returns everything.
    pub fn wait(mut self, timeout: Duration) -> Result<StreamOutput, String> {
        self.read_until(timeout, |_| false)?;
        Ok(self.out)
    }

    /// Ends the session from this side (an attach leaves the container running).
    pub fn close(mut self) -> StreamOutput {
        for data in close_and_drain(&mut self.ws) {
            self.take(&data);
        }
        self.out
    }
}

/// Starts the close handshake of `ws` and reads until it completes
/// (bounded: 100 messages, 2 s per read); returns the binary messages that
/// were still in flight.
pub(super) fn close_and_drain(ws: &mut WebSocket<TcpStream>) -> Vec<Vec<u8>> {
    let _ = ws.close(None);
    let _ = ws.get_mut().set_read_timeout(Some(Duration::from_secs(2)));
    let mut in_flight = Vec::new();
    for _ in 0..100 {
        match ws.read() {
            Ok(Message::Binary(data)) => in_flight.push(data.to_vec()),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    in_flight
}

/// One exec session: sends `stdin` (then closes it, on v5), reads until the
/// server ends the session.
pub fn run(url: &str, stdin: Option<&[u8]>, timeout: Duration) -> Result<StreamOutput, String> {
    let mut s = Session::open(url, timeout)?;
    if let Some(data) = stdin {
        s.send_stdin(data)?;
        if s.protocol() == "v5.channel.k8s.io" {
            s.close_stdin()?;
        }
    }
    s.wait(timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_from_status() {
        assert_eq!(exit_code(r#"{"metadata":{},"status":"Success"}"#), Some(0));
        let failure = r#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: error executing command [sh -c exit 3], exit code 3","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}"#;
        assert_eq!(exit_code(failure), Some(3));
        assert_eq!(exit_code(r#"{"status":"Failure","message":"boom"}"#), None);
        assert_eq!(exit_code("not json"), None);
    }
}
