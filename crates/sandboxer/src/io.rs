//! Moves a process's stdio between containerd's fifos on the host (or its
//! streams, `streaming`) and the guest agent's stream calls.
pub mod streaming;

use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::task::JoinHandle;

use crate::agent::Agent;

/// The fifo paths containerd handed over for one process.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// The copy tasks of one process.
#[derive(Default)]
pub struct Pumps {
    stdin: Option<JoinHandle<()>>,
    stdin_path: String,
    outputs: Vec<JoinHandle<()>>,
}

impl Pumps {
    /// Starts copying the guest's stdout/stderr into the fifos (or streams)
    /// and the stdin fifo (or stream) into the guest.
    pub fn start(
        agent: &Agent,
        sandbox_id: &str,
        container_id: &str,
        exec_id: &str,
        stdio: &StdioPaths,
    ) -> Self {
        let mut pumps = Pumps::default();
        for (path, stderr) in [(&stdio.stdout, false), (&stdio.stderr, true)] {
            if streaming::is_stream(path) {
                pumps.outputs.push(tokio::spawn(streaming::copy_output(
                    agent.clone(),
                    sandbox_id.to_owned(),
                    container_id.to_owned(),
                    exec_id.to_owned(),
                    path.clone(),
                    stderr,
                )));
            } else if !path.is_empty() {
                pumps.outputs.push(tokio::spawn(copy_output(
                    agent.clone(),
                    container_id.to_owned(),
                    exec_id.to_owned(),
                    path.clone(),
                    stderr,
                )));
            }
        }
        if streaming::is_stream(&stdio.stdin) {
            pumps.stdin = Some(tokio::spawn(streaming::copy_stdin(
                agent.clone(),
                sandbox_id.to_owned(),
                container_id.to_owned(),
                exec_id.to_owned(),
                stdio.stdin.clone(),
            )));
        } else if !stdio.stdin.is_empty() {
            pumps.stdin_path = stdio.stdin.clone();
            pumps.stdin = Some(tokio::spawn(copy_stdin(
                agent.clone(),
                container_id.to_owned(),
                exec_id.to_owned(),
                stdio.stdin.clone(),
            )));
        }
        pumps
    }

    /// Waits, at most `timeout`, for the output copies to reach the end of
    /// their streams (all output of an exited process delivered), then
    /// stops those still running, which closes their fifos: a reader of
    /// the process's output (CRI's ExecSync waits for it) must see its end
    /// even when the guest never ends the stream.
    pub async fn drain(&mut self, timeout: Duration) {
        let mut outputs = std::mem::take(&mut self.outputs);
        let all = async {
            for t in outputs.iter_mut() {
                let _ = t.await;
            }
        };
        if tokio::time::timeout(timeout, all).await.is_err() {
            tracing::debug!("output still open {timeout:?} after exit: its fifos are closed");
            for t in &outputs {
                t.abort();
            }
        }
    }

    /// Stops the stdin copy (the guest's stdin is closed separately).
    pub fn stop_stdin(&mut self) {
        if let Some(task) = self.stdin.take() {
            task.abort();
            if !self.stdin_path.is_empty() {
                unblock_open(&self.stdin_path);
            }
        }
    }

    /// Stops every copy.
    pub fn abort(&mut self) {
        self.stop_stdin();
        for task in self.outputs.drain(..) {
            task.abort();
        }
    }
}

/// A reader blocked opening `path` (nobody opened the fifo for writing)
/// is released by a writer that comes and goes.
fn unblock_open(path: &str) {
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path);
}

async fn copy_output(agent: Agent, cid: String, eid: String, path: String, stderr: bool) {
    // Read-write keeps the open from blocking (or failing) while containerd
    // has no reader on it yet.
    let mut sink = match pipe::OpenOptions::new().read_write(true).open_sender(&path) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(container = %cid, exec = %eid, path, "open output fifo: {e}");
            None
        }
    };
    let mut reader = crate::agent::OutputReader::new(agent, &cid, &eid, stderr);
    loop {
        match reader.next().await {
            Ok(data) if data.is_empty() => break,
            Ok(data) => {
                if let Some(s) = sink.as_mut() {
                    if let Err(e) = s.write_all(&data).await {
                        // Keep draining the guest so the process never blocks.
                        tracing::debug!(path, "write output fifo: {e}");
                        sink = None;
                    }
                }
            }
            Err(e) => {
                tracing::debug!(container = %cid, exec = %eid, "output stream ended: {e}");
                break;
            }
        }
    }
}

async fn copy_stdin(agent: Agent, cid: String, eid: String, path: String) {
    let p = path.clone();
    // Blocks until containerd's side opens the fifo for writing.
    let file = match tokio::task::spawn_blocking(move || std::fs::File::open(&p)).await {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => {
            tracing::warn!(container = %cid, exec = %eid, path, "open stdin fifo: {e}");
            return;
        }
        Err(_) => return,
    };
    let mut source = match pipe::Receiver::from_file(file) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(path, "stdin fifo: {e}");
            return;
        }
    };
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match source.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut chunk = &buf[..n];
        while !chunk.is_empty() {
            match agent.write_stdin(&cid, &eid, chunk.to_vec()).await {
                Ok(0) | Err(_) => return,
                Ok(w) => chunk = &chunk[(w as usize).min(chunk.len())..],
            }
        }
    }
    if let Err(e) = agent.close_stdin(&cid, &eid).await {
        tracing::debug!(container = %cid, exec = %eid, "close stdin: {e}");
    }
}
