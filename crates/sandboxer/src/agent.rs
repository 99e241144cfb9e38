//! The host side of the guest agent protocol. The guest is untrusted: every
//! call is bounded in time (except the ones that wait for a process by
//! design) and ttrpc bounds every message's size.
use std::time::{Duration, Instant};

use kuasar_api::agent::agent_ttrpc_async::AgentClient;
use kuasar_api::agent::*;
use ttrpc::context::{self, Context};
use ttrpc::r#async::Client;
use ttrpc::Code;

/// Bound on every agent call that does not wait for a process by design.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
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
}

/// Runs one agent call with a timeout (None: wait as long as it takes).
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
        let fut = $self.client.$method(ctx, &req);
        let res = match timeout {
            Some(t) => tokio::time::timeout(t, fut)
                .await
                .map_err(|_| AgentError::Timeout {
                    method: $name,
                    after: t,
                })?,
            None => fut.await,
        };
        res.map_err(|e| AgentError::from_ttrpc($name, e))
    }};
}

impl Agent {
    /// Connects to the agent at `address` (`unix://...`) and waits until it
    /// answers a ping, at most until `deadline`.
    pub async fn connect(
        address: &str,
        deadline: Instant,
    ) -> Result<(Self, PingResponse), AgentError> {
        let client = Client::connect(address).map_err(|source| AgentError::Connect {
            address: address.to_owned(),
            source,
        })?;
        let agent = Agent {
            client: AgentClient::new(client),
        };
        // One ping for the whole wait: the request waits in the channel until
        // the guest opens its end, so there is nothing to gain by resending.
        let left = deadline.saturating_duration_since(Instant::now());
        let pong = call!(agent, ping, "Ping", Empty::new(), Some(left))?;
        Ok((agent, pong))
    }

    pub async fn create_container(&self, req: CreateContainerRequest) -> Result<u32, AgentError> {
        Ok(call!(
            self,
            create_container,
            "CreateContainer",
            req,
            Some(CALL_TIMEOUT)
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
            Some(CALL_TIMEOUT)
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
            Some(CALL_TIMEOUT)
        )
        .map(drop)
    }

    pub async fn exec_process(&self, req: ExecProcessRequest) -> Result<u32, AgentError> {
        Ok(call!(self, exec_process, "ExecProcess", req, Some(CALL_TIMEOUT))?.pid)
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
            Some(CALL_TIMEOUT)
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
            // (`call!` returns a timeout with `?`: keep it in this block.)
            let round = async {
                call!(
                    self,
                    wait_process,
                    "WaitProcess",
                    req,
                    Some(WAIT_ROUND + CALL_TIMEOUT)
                )
            };
            match round.await {
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
        Ok(call!(self, write_stdin, "WriteStdin", req, Some(CALL_TIMEOUT))?.len)
    }

    pub async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), AgentError> {
        let req = process_request(container_id, exec_id);
        call!(self, close_stdin, "CloseStdin", req, Some(CALL_TIMEOUT)).map(drop)
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
        call!(self, resize_tty, "ResizeTty", req, Some(CALL_TIMEOUT)).map(drop)
    }

    pub async fn list_pids(&self, container_id: &str) -> Result<Vec<u32>, AgentError> {
        let req = ContainerRequest {
            container_id: container_id.to_owned(),
            ..Default::default()
        };
        Ok(call!(self, list_pids, "ListPids", req, Some(CALL_TIMEOUT))?.pids)
    }

    pub async fn stats(&self, container_id: &str) -> Result<StatsResponse, AgentError> {
        let req = ContainerRequest {
            container_id: container_id.to_owned(),
            ..Default::default()
        };
        call!(self, stats, "Stats", req, Some(CALL_TIMEOUT))
    }

    pub async fn setup_sandbox(&self, req: SetupSandboxRequest) -> Result<(), AgentError> {
        call!(self, setup_sandbox, "SetupSandbox", req, Some(CALL_TIMEOUT))?;
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
            Some(CALL_TIMEOUT)
        )?;
        Ok(())
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
