//! The host side of the guest agent protocol. The guest is untrusted: every
//! call is bounded in time (except the ones that wait for a process by
//! design) and ttrpc bounds every message's size.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use kuasar_api::agent::agent_ttrpc_async::AgentClient;
use kuasar_api::agent::*;
use ttrpc::context::{self, Context};
use ttrpc::r#async::Client;
use ttrpc::Code;

use crate::metrics::Metrics;

/// Default bound on every agent call that does not wait for a process by
/// design (`[qemu] call_timeout_secs`).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

static CALL_TIMEOUT_SECS: AtomicU64 = AtomicU64::new(CALL_TIMEOUT.as_secs());

/// Sets the bound on agent calls (from the configuration, at start-up).
pub fn set_call_timeout(t: Duration) {
    CALL_TIMEOUT_SECS.store(t.as_secs().max(1), Ordering::Relaxed);
}

/// The bound on every agent call that does not wait for a process.
pub fn call_timeout() -> Duration {
    Duration::from_secs(CALL_TIMEOUT_SECS.load(Ordering::Relaxed))
}
/// Largest stdout/stderr chunk asked of the guest in one call; replies up to
/// this size cross a host reconnect intact.
pub const READ_CHUNK: u32 = 32 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("connect to the agent at {address}")]
    Connect {
        address: String,
        source: ttrpc::Error,
    },
    #[error("agent call {method} timed out after {after:?}")]
    Timeout {
        method: &'static str,
        after: Duration,
    },
    #[error("agent call {method}: {message}")]
    Status {
        method: &'static str,
        code: Code,
        message: String,
    },
    #[error("agent call {method} failed: {message}")]
    Transport {
        method: &'static str,
        message: String,
    },
    /// The guest broke the protocol; its connection was cut off.
    #[error("agent call {method}: the guest broke the agent protocol ({reason}); its connection was cut off")]
    Protocol {
        method: &'static str,
        reason: String,
    },
}

impl AgentError {
    fn from_ttrpc(method: &'static str, e: ttrpc::Error) -> Self {
        match e {
            ttrpc::Error::RpcStatus(s) => AgentError::Status {
                method,
                code: s.code(),
                message: s.message().to_owned(),
            },
            other => AgentError::Transport {
                method,
                message: other.to_string(),
            },
        }
    }

    /// What went wrong, as the metrics label it: `timeout`, `transport`,
    /// `protocol`, `connect`, or the status code the agent answered
    /// (`not_found`, `unimplemented`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            AgentError::Connect { .. } => "connect",
            AgentError::Timeout { .. } => "timeout",
            AgentError::Transport { .. } => "transport",
            AgentError::Protocol { .. } => "protocol",
            AgentError::Status { code, .. } => status_kind(*code),
        }
    }

    /// True when the guest's agent does not know the call (an older agent).
    pub fn is_unimplemented(&self) -> bool {
        matches!(
            self,
            AgentError::Status {
                code: Code::UNIMPLEMENTED,
                ..
            }
        )
    }

    /// True when the guest answered that the object does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            AgentError::Status {
                code: Code::NOT_FOUND,
                ..
            }
        )
    }
}

/// A status code's name as a metrics label (gRPC's canonical names).
fn status_kind(code: Code) -> &'static str {
    match code {
        Code::OK => "ok",
        Code::CANCELLED => "cancelled",
        Code::UNKNOWN => "unknown",
        Code::INVALID_ARGUMENT => "invalid_argument",
        Code::DEADLINE_EXCEEDED => "deadline_exceeded",
        Code::NOT_FOUND => "not_found",
        Code::ALREADY_EXISTS => "already_exists",
        Code::PERMISSION_DENIED => "permission_denied",
        Code::RESOURCE_EXHAUSTED => "resource_exhausted",
        Code::FAILED_PRECONDITION => "failed_precondition",
        Code::ABORTED => "aborted",
        Code::OUT_OF_RANGE => "out_of_range",
        Code::UNIMPLEMENTED => "unimplemented",
        Code::INTERNAL => "internal",
        Code::UNAVAILABLE => "unavailable",
        Code::DATA_LOSS => "data_loss",
        Code::UNAUTHENTICATED => "unauthenticated",
    }
}

/// Reads one output stream of a guest process, chunk by chunk. Asking for
/// the next chunk acknowledges the previous one as delivered: the guest
/// keeps a chunk until then, so a sandboxer that dies between reading a
/// chunk and writing it out loses nothing (its successor, starting from
/// offset 0, gets that chunk again).
pub struct OutputReader {
    agent: Agent,
    container_id: String,
    exec_id: String,
    stderr: bool,
    /// End offset of the last chunk returned.
    end: u64,
}

impl OutputReader {
    pub fn new(agent: Agent, container_id: &str, exec_id: &str, stderr: bool) -> Self {
        OutputReader {
            agent,
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            stderr,
            end: 0,
        }
    }

    /// The next chunk; empty at the end of the stream.
    pub async fn next(&mut self) -> Result<Vec<u8>, AgentError> {
        let (offset, data) = self
            .agent
            .read_output(&self.container_id, &self.exec_id, self.stderr, self.end)
            .await?;
        self.end = offset.saturating_add(data.len() as u64);
        Ok(data)
    }
}

/// One connection to one guest's agent.
#[derive(Clone)]
pub struct Agent {
    client: AgentClient,
    /// Why the guard cut the connection off, once it did.
    broken: Arc<OnceLock<String>>,
    /// Where calls are counted (the metrics endpoint is on).
    metrics: Option<Arc<Metrics>>,
}

/// Runs one agent call with a timeout (None: wait as long as it takes);
/// every call is measured here (see [`Agent::observe`]).
macro_rules! call {
    ($self:ident, $method:ident, $name:literal, $req:expr, $timeout:expr) => {{
        let timeout: Option<Duration> = $timeout;
        // ttrpc's own timer is set a little later than ours, so that a
        // timeout is always reported as ours (AgentError::Timeout).
        let ctx: Context = match timeout {
            Some(t) => context::with_timeout((t + Duration::from_secs(1)).as_nanos() as i64),
            None => context::Context::default(),
        };
        let req = $req;
        let started = Instant::now();
        let fut = $self.client.$method(ctx, &req);
        let res = match timeout {
            Some(t) => match tokio::time::timeout(t, fut).await {
                Ok(res) => res.map_err(|e| $self.call_error($name, e)),
                Err(_) => Err(AgentError::Timeout {
                    method: $name,
                    after: t,
                }),
            },
            None => fut.await.map_err(|e| $self.call_error($name, e)),
        };
        $self.observe($name, started, &res);
        res
    }};
}

impl Agent {
    /// Connects to the agent at `address` (`unix://...`) and waits until it
    /// answers a ping, at most until `deadline`. Calls are counted in
    /// `metrics` when there are some.
    pub async fn connect(
        address: &str,
        deadline: Instant,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<(Self, PingResponse), AgentError> {
        let broken = Arc::new(OnceLock::new());
        let client = match address.strip_prefix("unix://") {
            Some(path) => {
                guard::connect(path, broken.clone()).map_err(|e| AgentError::Connect {
                    address: address.to_owned(),
                    source: ttrpc::Error::Socket(e.to_string()),
                })?
            }
            // vsock: no guard (no host here has vhost-vsock to test it on);
            // ttrpc still bounds each frame to 4 MiB.
            None => Client::connect(address).map_err(|source| AgentError::Connect {
                address: address.to_owned(),
                source,
            })?,
        };
        let agent = Agent {
            client: AgentClient::new(client),
            broken,
            metrics,
        };
        // One ping for the whole wait: the request waits in the channel until
        // the guest opens its end, so there is nothing to gain by resending.
        let left = deadline.saturating_duration_since(Instant::now());
        let pong = call!(agent, ping, "Ping", Empty::new(), Some(left))?;
        Ok((agent, pong))
    }

    /// The error of a call ttrpc failed: a protocol breach once the guard
    /// cut the connection off.
    fn call_error(&self, method: &'static str, e: ttrpc::Error) -> AgentError {
        match self.broken.get() {
            Some(reason) => AgentError::Protocol {
                method,
                reason: reason.clone(),
            },
            None => AgentError::from_ttrpc(method, e),
        }
    }

    /// Counts a call (its time, its error) when metrics are on. The waits
    /// by design (WaitProcess rounds, output and port-forward reads) are
    /// timed too: their time is how long the guest had nothing to say.
    fn observe<T>(&self, method: &'static str, started: Instant, res: &Result<T, AgentError>) {
        if let Some(metrics) = &self.metrics {
            metrics.observe_agent_call(method, started.elapsed(), res.as_ref().err());
        }
    }

    pub async fn create_container(&self, req: CreateContainerRequest) -> Result<u32, AgentError> {
        Ok(call!(
            self,
            create_container,
            "CreateContainer",
            req,
            Some(call_timeout())
        )?
        .pid)
    }

    pub async fn start_container(&self, container_id: &str) -> Result<u32, AgentError> {
        let req = ContainerRequest {
            container_id: container_id.to_owned(),
            ..Default::default()
        };
        Ok(call!(
            self,
            start_container,
            "StartContainer",
            req,
            Some(call_timeout())
        )?
        .pid)
    }

    pub async fn remove_container(&self, container_id: &str) -> Result<(), AgentError> {
        let req = ContainerRequest {
            container_id: container_id.to_owned(),
            ..Default::default()
        };
        call!(
            self,
            remove_container,
            "RemoveContainer",
            req,
            Some(call_timeout())
        )
        .map(drop)
    }

    pub async fn exec_process(&self, req: ExecProcessRequest) -> Result<u32, AgentError> {
        Ok(call!(self, exec_process, "ExecProcess", req, Some(call_timeout()))?.pid)
    }

    pub async fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError> {
        let req = SignalProcessRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            signal,
            all,
            ..Default::default()
        };
        call!(
            self,
            signal_process,
            "SignalProcess",
            req,
            Some(call_timeout())
        )
        .map(drop)
    }

    /// Waits for the process to exit; returns (exit status, exited at ns).
    pub async fn wait_process(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<ProcessExit, AgentError> {
        // Bounded waits, re-asked: an answer lost between guest and host
        // (or a guest that stops answering one request) costs at most one
        // round, never the exit.
        let res = loop {
            let mut req = process_request(container_id, exec_id);
            req.wait_timeout_ms = WAIT_ROUND.as_millis() as u32;
            let round = call!(
                self,
                wait_process,
                "WaitProcess",
                req,
                Some(WAIT_ROUND + call_timeout())
            );
            match round {
                Ok(res) if res.still_running => continue,
                Ok(res) => break res,
                Err(AgentError::Timeout { .. }) => {
                    tracing::debug!(
                        container_id,
                        exec_id,
                        "WaitProcess unanswered; asking again"
                    );
                    continue;
                }
                Err(e) => return Err(e),
            }
        };
        Ok(ProcessExit {
            status: res.exit_status,
            at_ns: res.exited_at_ns,
            oom_killed: res.oom_killed,
        })
    }

    pub async fn write_stdin(
        &self,
        container_id: &str,
        exec_id: &str,
        data: Vec<u8>,
    ) -> Result<u32, AgentError> {
        let req = WriteStreamRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            data,
            ..Default::default()
        };
        Ok(call!(self, write_stdin, "WriteStdin", req, Some(call_timeout()))?.len)
    }

    pub async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), AgentError> {
        let req = process_request(container_id, exec_id);
        call!(self, close_stdin, "CloseStdin", req, Some(call_timeout())).map(drop)
    }

    /// Reads the next chunk of a process's stdout (`stderr` false) or
    /// stderr; an empty chunk is the end of the stream.
    /// Reads the next chunk of a process's stdout or stderr (empty at its
    /// end), acknowledging that the stream was delivered up to `delivered`;
    /// returns the chunk's offset in the stream with it. See
    /// [`OutputReader`].
    pub async fn read_output(
        &self,
        container_id: &str,
        exec_id: &str,
        stderr: bool,
        delivered: u64,
    ) -> Result<(u64, Vec<u8>), AgentError> {
        let req = ReadStreamRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            len: READ_CHUNK,
            delivered: Some(delivered),
            ..Default::default()
        };
        let (method, res) = if stderr {
            (
                "ReadStderr",
                call!(self, read_stderr, "ReadStderr", req, None)?,
            )
        } else {
            (
                "ReadStdout",
                call!(self, read_stdout, "ReadStdout", req, None)?,
            )
        };
        if res.data.len() > READ_CHUNK as usize {
            return Err(AgentError::Transport {
                method,
                message: format!(
                    "guest sent {} bytes, more than the {} asked",
                    res.data.len(),
                    READ_CHUNK
                ),
            });
        }
        Ok((res.offset, res.data))
    }

    pub async fn resize_tty(
        &self,
        container_id: &str,
        exec_id: &str,
        width: u32,
        height: u32,
    ) -> Result<(), AgentError> {
        let req = ResizeTtyRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            width,
            height,
            ..Default::default()
        };
        call!(self, resize_tty, "ResizeTty", req, Some(call_timeout())).map(drop)
    }

    pub async fn list_pids(&self, container_id: &str) -> Result<Vec<u32>, AgentError> {
        let req = ContainerRequest {
            container_id: container_id.to_owned(),
            ..Default::default()
        };
        Ok(call!(self, list_pids, "ListPids", req, Some(call_timeout()))?.pids)
    }

    pub async fn stats(&self, container_id: &str) -> Result<StatsResponse, AgentError> {
        let req = ContainerRequest {
            container_id: container_id.to_owned(),
            ..Default::default()
        };
        call!(self, stats, "Stats", req, Some(call_timeout()))
    }

    pub async fn setup_sandbox(&self, req: SetupSandboxRequest) -> Result<(), AgentError> {
        call!(
            self,
            setup_sandbox,
            "SetupSandbox",
            req,
            Some(call_timeout())
        )?;
        Ok(())
    }

    pub async fn update_container(
        &self,
        container_id: &str,
        resources_json: Vec<u8>,
    ) -> Result<(), AgentError> {
        let req = UpdateContainerRequest {
            container_id: container_id.to_owned(),
            resources_json,
            ..Default::default()
        };
        call!(
            self,
            update_container,
            "UpdateContainer",
            req,
            Some(call_timeout())
        )?;
        Ok(())
    }
}

/// An operator's debug command (kuasarctl exec). An agent without the call
/// answers UNIMPLEMENTED.
impl Agent {
    /// Runs `req` in the guest, outside every container; bounded by the
    /// command's timeout plus the call timeout, and its reply by the
    /// protocol's output bound.
    /// Has the guest run a throwaway container (a pooled VM, before its
    /// pod); returns how long that took in the guest.
    pub async fn warm_up(&self) -> Result<u64, AgentError> {
        let res = call!(self, warm_up, "WarmUp", Empty::new(), Some(call_timeout()))?;
        Ok(res.elapsed_ms)
    }

    pub async fn debug_exec(&self, req: DebugExecRequest) -> Result<DebugExecResponse, AgentError> {
        use kuasar_api::debug_exec::{timeout, MAX_OUTPUT};
        let bound = timeout(Duration::from_millis(req.timeout_ms.into())) + call_timeout();
        let res = call!(self, debug_exec, "DebugExec", req, Some(bound))?;
        for (name, data) in [("stdout", &res.stdout), ("stderr", &res.stderr)] {
            if data.len() > MAX_OUTPUT {
                return Err(AgentError::Transport {
                    method: "DebugExec",
                    message: format!(
                        "guest sent {} bytes of {name}, more than {MAX_OUTPUT}",
                        data.len()
                    ),
                });
            }
        }
        Ok(res)
    }
}

/// Port forwarding: the guest end of one relayed TCP connection (see
/// `crate::portforward`). An agent without these calls answers UNIMPLEMENTED.
impl Agent {
    /// Connects to 127.0.0.1:`port` in the guest, the guest giving up after
    /// `connect_timeout`; returns the connection's id.
    pub async fn port_forward_open(
        &self,
        port: u16,
        connect_timeout: Duration,
    ) -> Result<u64, AgentError> {
        let req = PortForwardOpenRequest {
            port: port.into(),
            connect_timeout_ms: connect_timeout.as_millis().try_into().unwrap_or(u32::MAX),
            ..Default::default()
        };
        let bound = Some(connect_timeout + call_timeout());
        let res = call!(self, port_forward_open, "PortForwardOpen", req, bound)?;
        Ok(res.connection_id)
    }

    /// Writes `data` to the guest connection (all of it, or an error).
    pub async fn port_forward_write(&self, id: u64, data: Vec<u8>) -> Result<(), AgentError> {
        let len = data.len();
        let req = PortForwardWriteRequest {
            connection_id: id,
            data,
            ..Default::default()
        };
        let res = call!(
            self,
            port_forward_write,
            "PortForwardWrite",
            req,
            Some(call_timeout())
        )?;
        if res.len as usize != len {
            return Err(AgentError::Transport {
                method: "PortForwardWrite",
                message: format!("guest wrote {} of {len} bytes", res.len),
            });
        }
        Ok(())
    }

    /// The next chunk of the guest connection's output (at most `len`
    /// bytes; empty at its end). Waits as long as the guest does.
    pub async fn port_forward_read(&self, id: u64, len: u32) -> Result<Vec<u8>, AgentError> {
        let req = PortForwardReadRequest {
            connection_id: id,
            len,
            ..Default::default()
        };
        let res = call!(self, port_forward_read, "PortForwardRead", req, None)?;
        if res.data.len() > len as usize {
            return Err(AgentError::Transport {
                method: "PortForwardRead",
                message: format!(
                    "guest sent {} bytes, more than the {len} asked",
                    res.data.len()
                ),
            });
        }
        Ok(res.data)
    }

    /// Half-closes the guest connection (its application reads the end).
    pub async fn port_forward_shutdown(&self, id: u64) -> Result<(), AgentError> {
        let req = PortForwardConnection {
            connection_id: id,
            ..Default::default()
        };
        call!(
            self,
            port_forward_shutdown,
            "PortForwardShutdown",
            req,
            Some(call_timeout())
        )
        .map(drop)
    }

    /// Closes the guest connection.
    pub async fn port_forward_close(&self, id: u64) -> Result<(), AgentError> {
        let req = PortForwardConnection {
            connection_id: id,
            ..Default::default()
        };
        call!(
            self,
            port_forward_close,
            "PortForwardClose",
            req,
            Some(call_timeout())
        )
        .map(drop)
    }

    /// Closes every port-forward connection of the guest (those of a relay
    /// that is gone).
    pub async fn port_forward_reset(&self) -> Result<(), AgentError> {
        call!(
            self,
            port_forward_reset,
            "PortForwardReset",
            Empty::new(),
            Some(call_timeout())
        )
        .map(drop)
    }
}

/// How a process ended, as the agent saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessExit {
    /// The exit code, or 128 + the signal that ended the process.
    pub status: u32,
    /// Nanoseconds since the Unix epoch.
    pub at_ns: i64,
    /// The kernel's OOM killer hit the container (init processes only).
    pub oom_killed: bool,
}

/// How long one WaitProcess round waits in the guest.
const WAIT_ROUND: Duration = Duration::from_secs(20);

fn process_request(container_id: &str, exec_id: &str) -> ProcessRequest {
    ProcessRequest {
        container_id: container_id.to_owned(),
        exec_id: exec_id.to_owned(),
        ..Default::default()
    }
}

/// Stands between the ttrpc client and the guest's channel: frames from the
/// guest are checked before the client sees them, and a guest that breaks
/// the protocol is cut off at once with the reason, instead of feeding the
/// client bytes it would skip or wait on until each call times out.
mod guard {
    use std::os::fd::IntoRawFd;
    use std::sync::{Arc, OnceLock};

    use kuasar_api::frame::{
        Header, HEADER_LEN, KNOWN_FLAGS, MAX_PAYLOAD, TYPE_DATA, TYPE_RESPONSE,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;
    use ttrpc::r#async::Client;

    /// The payload length a frame header from the guest announces, or why
    /// the header cannot come from a ttrpc server answering us.
    pub fn check_header(h: &[u8; HEADER_LEN]) -> Result<usize, String> {
        let header = Header::from(*h);
        let len = header.payload_len();
        let (stream, kind, flags) = (header.stream_id, header.kind, header.flags);
        if len > MAX_PAYLOAD {
            return Err(format!(
                "a frame of {len} bytes, more than ttrpc's {MAX_PAYLOAD}"
            ));
        }
        if kind != TYPE_RESPONSE && kind != TYPE_DATA {
            return Err(format!("a frame of type {kind}, not a response"));
        }
        // The host opens every stream, with odd ids.
        if stream & 1 == 0 {
            return Err(format!(
                "a frame on stream {stream}, which the host never opened"
            ));
        }
        if flags & !KNOWN_FLAGS != 0 {
            return Err(format!("a frame with unknown flags {flags:#04x}"));
        }
        Ok(len)
    }

    /// Connects to the guest's channel at `path` and returns a ttrpc
    /// client whose traffic goes through the guard.
    pub fn connect(path: &str, broken: Arc<OnceLock<String>>) -> std::io::Result<Client> {
        let guest = std::os::unix::net::UnixStream::connect(path)?;
        guest.set_nonblocking(true)?;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        theirs.set_nonblocking(true)?;
        let guest = UnixStream::from_std(guest)?;
        let theirs = UnixStream::from_std(theirs)?;
        tokio::spawn(relay(guest, theirs, path.to_owned(), broken));
        Ok(Client::new(ours.into_raw_fd()))
    }

    /// Moves bytes until either side closes or the guest breaks the protocol;
    /// then both connections close (the client fails its pending calls).
    async fn relay(
        guest: UnixStream,
        client: UnixStream,
        path: String,
        broken: Arc<OnceLock<String>>,
    ) {
        let (mut guest_rd, mut guest_wr) = guest.into_split();
        let (mut client_rd, mut client_wr) = client.into_split();
        let to_guest = async {
            let _ = tokio::io::copy(&mut client_rd, &mut guest_wr).await;
        };
        let from_guest = async {
            match forward_checked(&mut guest_rd, &mut client_wr).await {
                Ok(()) => {}
                Err(Some(reason)) => {
                    tracing::error!(
                        channel = %path,
                        "the guest broke the agent protocol ({reason}); cutting its connection off"
                    );
                    let _ = broken.set(reason);
                }
                Err(None) => {}
            }
        };
        tokio::select! {
            _ = to_guest => {}
            _ = from_guest => {}
        }
        let _ = client_wr.shutdown().await;
    }

    /// Copies whole checked frames; `Err(Some(reason))` on a bad one,
    /// `Err(None)` or `Ok` when a side closed.
    async fn forward_checked(
        from: &mut (impl AsyncReadExt + Unpin),
        to: &mut (impl AsyncWriteExt + Unpin),
    ) -> Result<(), Option<String>> {
        let mut header = [0u8; HEADER_LEN];
        loop {
            if from.read_exact(&mut header).await.is_err() {
                return Ok(());
            }
            let len = check_header(&header).map_err(Some)?;
            let mut frame = Vec::with_capacity(HEADER_LEN + len);
            frame.extend_from_slice(&header);
            frame.resize(HEADER_LEN + len, 0);
            if from.read_exact(&mut frame[HEADER_LEN..]).await.is_err() {
                return Ok(());
            }
            to.write_all(&frame).await.map_err(|_| None)?;
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn header(len: u32, stream_id: u32, kind: u8, flags: u8) -> [u8; HEADER_LEN] {
            Header {
                len,
                stream_id,
                kind,
                flags,
            }
            .encode()
        }

        #[test]
        fn headers_a_guest_may_and_may_not_send() {
            assert_eq!(check_header(&header(5, 1, TYPE_RESPONSE, 0)), Ok(5));
            assert_eq!(check_header(&header(0, 7, TYPE_DATA, 0x5)), Ok(0));
            assert_eq!(
                check_header(&header(4 << 20, 3, TYPE_RESPONSE, 0)),
                Ok(4 << 20)
            );
            for bad in [
                header(u32::MAX, 1, TYPE_RESPONSE, 0),
                header((4 << 20) + 1, 1, TYPE_RESPONSE, 0),
                header(5, 1, 1, 0),
                header(5, 1, 0, 0),
                header(5, 2, TYPE_RESPONSE, 0),
                header(5, 1, TYPE_RESPONSE, 0x80),
            ] {
                assert!(check_header(&bad).is_err(), "{bad:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::metrics::{Format, Snapshot};

    /// A fake guest channel on a Unix socket: `answer` gets the connection.
    async fn fake_guest<F, Fut>(answer: F) -> (tempfile::TempDir, String)
    where
        F: FnOnce(tokio::net::UnixStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            if let Ok((conn, _)) = listener.accept().await {
                answer(conn).await;
            }
        });
        (dir, format!("unix://{}", path.display()))
    }

    #[tokio::test]
    async fn a_guest_sending_garbage_is_cut_off_at_once() {
        let (_dir, address) = fake_guest(|mut conn| async move {
            let mut req = [0u8; 64];
            let _ = conn.read(&mut req).await;
            // Garbage that is not a ttrpc frame (announces ~4 GiB).
            let _ = conn.write_all(&[0xff; 4096]).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
        .await;
        let started = Instant::now();
        let err = Agent::connect(&address, Instant::now() + Duration::from_secs(20), None)
            .await
            .err()
            .expect("a garbage answer was accepted");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(matches!(err, AgentError::Protocol { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("broke the agent protocol"), "{text}");
        assert!(text.contains("more than ttrpc's"), "{text}");
    }

    #[tokio::test]
    async fn a_response_on_a_stream_the_host_never_opened_is_cut_off() {
        let (_dir, address) = fake_guest(|mut conn| async move {
            let mut req = [0u8; 64];
            let _ = conn.read(&mut req).await;
            let header = kuasar_api::frame::Header {
                len: 3,
                stream_id: 2,
                kind: kuasar_api::frame::TYPE_RESPONSE,
                flags: 0,
            };
            let mut frame = header.encode().to_vec();
            frame.extend(b"abc");
            let _ = conn.write_all(&frame).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
        .await;
        let err = Agent::connect(&address, Instant::now() + Duration::from_secs(20), None)
            .await
            .err()
            .expect("accepted");
        assert!(err.to_string().contains("stream 2"), "{err}");
    }

    #[tokio::test]
    async fn a_silent_guest_costs_the_deadline_only() {
        let (_dir, address) = fake_guest(|conn| async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(conn);
        })
        .await;
        let started = Instant::now();
        let metrics = Arc::new(Metrics::new());
        let deadline = Instant::now() + Duration::from_millis(500);
        let err = Agent::connect(&address, deadline, Some(metrics.clone()))
            .await
            .err()
            .expect("accepted");
        assert!(matches!(err, AgentError::Timeout { .. }), "{err:?}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        // The call was counted where every call is: timed, and its error.
        let text = metrics
            .encode(Snapshot::default(), Format::Prometheus)
            .unwrap();
        assert!(
            text.contains("kuasar_agent_call_errors_total{method=\"Ping\",kind=\"timeout\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("kuasar_agent_call_seconds_count{method=\"Ping\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn error_kinds_are_few_and_named() {
        let status = |code| AgentError::Status {
            method: "Stats",
            code,
            message: "m".into(),
        };
        assert_eq!(status(Code::NOT_FOUND).kind(), "not_found");
        assert_eq!(status(Code::UNIMPLEMENTED).kind(), "unimplemented");
        let timeout = AgentError::Timeout {
            method: "Stats",
            after: Duration::from_secs(1),
        };
        assert_eq!(timeout.kind(), "timeout");
        let protocol = AgentError::Protocol {
            method: "Stats",
            reason: "r".into(),
        };
        assert_eq!(protocol.kind(), "protocol");
    }

    /// An agent over ttrpc whose DebugExec answers `output` bytes of
    /// stdout; without the method at all when `old` (an older agent).
    async fn ttrpc_guest(
        output: usize,
        old: bool,
    ) -> (tempfile::TempDir, String, ttrpc::r#async::Server) {
        struct Guest(usize);
        #[async_trait::async_trait]
        impl agent_ttrpc_async::Agent for Guest {
            async fn ping(
                &self,
                _: &ttrpc::r#async::TtrpcContext,
                _: Empty,
            ) -> ttrpc::Result<PingResponse> {
                Ok(PingResponse::new())
            }
            async fn debug_exec(
                &self,
                _: &ttrpc::r#async::TtrpcContext,
                req: DebugExecRequest,
            ) -> ttrpc::Result<DebugExecResponse> {
                Ok(DebugExecResponse {
                    exit_status: 3,
                    stdout: vec![b'x'; self.0],
                    stderr: req.stdin,
                    ..Default::default()
                })
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let mut services = agent_ttrpc_async::create_agent(Arc::new(Guest(output)));
        if old {
            for service in services.values_mut() {
                service.methods.remove("DebugExec");
            }
        }
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mut server = ttrpc::r#async::Server::new()
            .set_domain_unix()
            .add_listener(std::os::fd::IntoRawFd::into_raw_fd(listener))
            .unwrap()
            .register_service(services);
        server.start().await.unwrap();
        (dir, format!("unix://{}", path.display()), server)
    }

    fn debug_request() -> DebugExecRequest {
        DebugExecRequest {
            argv: vec!["cat".into()],
            stdin: b"in".to_vec(),
            timeout_ms: 1000,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn debug_exec_replies_are_bounded() {
        use kuasar_api::debug_exec::MAX_OUTPUT;
        let deadline = || Instant::now() + Duration::from_secs(10);
        let (_dir, address, _server) = ttrpc_guest(MAX_OUTPUT, false).await;
        let (agent, _) = Agent::connect(&address, deadline(), None).await.unwrap();
        let res = agent.debug_exec(debug_request()).await.unwrap();
        assert_eq!(res.exit_status, 3);
        assert_eq!(
            (res.stdout.len(), res.stderr.as_slice()),
            (MAX_OUTPUT, &b"in"[..])
        );

        let (_dir, address, _server) = ttrpc_guest(MAX_OUTPUT + 1, false).await;
        let (agent, _) = Agent::connect(&address, deadline(), None).await.unwrap();
        let err = agent.debug_exec(debug_request()).await.unwrap_err();
        assert!(matches!(err, AgentError::Transport { .. }), "{err:?}");
        assert!(
            err.to_string().contains("bytes of stdout, more than"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_agent_without_debug_exec_is_told_apart() {
        let (_dir, address, _server) = ttrpc_guest(0, true).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        let (agent, _) = Agent::connect(&address, deadline, None).await.unwrap();
        let err = agent.debug_exec(debug_request()).await.unwrap_err();
        assert!(err.is_unimplemented(), "{err:?}");
    }

    #[test]
    fn the_call_timeout_is_configurable() {
        assert_eq!(call_timeout(), CALL_TIMEOUT);
        set_call_timeout(Duration::from_secs(3));
        assert_eq!(call_timeout(), Duration::from_secs(3));
        set_call_timeout(CALL_TIMEOUT);
    }
}
