//! A container process (init or exec): its pid, its stdio pipes and its exit.
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Stdio;

use nix::fcntl::OFlag;
use nix::sys::signal::Signal;
use nix::unistd::pipe2;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{oneshot, watch, Mutex};
use tracing::debug;

use crate::error::{Context, Error, Result};
use crate::reaper::ExitInfo;

/// Largest chunk one ReadStdout/ReadStderr returns.
pub const MAX_READ: usize = 1 << 20;
/// Chunk size used when the caller asks for 0 bytes.
pub const DEFAULT_READ: usize = 64 << 10;
/// Pipe buffer size asked for (best effort; the default is 64 KiB).
const PIPE_SIZE: libc::c_int = 1 << 20;

/// The child's ends of the stdio pipes, handed to runc.
pub struct ChildStdio {
    pub stdin: Stdio,
    pub stdout: Stdio,
    pub stderr: Stdio,
}

/// The agent's ends of a process's stdio pipes.
pub struct ProcessIo {
    stdin: Option<pipe::Sender>,
    stdout: Option<pipe::Receiver>,
    stderr: Option<pipe::Receiver>,
}

fn cloexec_pipe() -> Result<(OwnedFd, OwnedFd)> {
    let (r, w) = pipe2(OFlag::O_CLOEXEC).context("pipe2")?;
    // SAFETY: fcntl(F_SETPIPE_SZ) on a pipe fd we own; failure is harmless.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
    Ok((r, w))
}

/// Creates the pipes a process asked for; the others are /dev/null.
pub fn make_stdio(stdin: bool, stdout: bool, stderr: bool) -> Result<(ProcessIo, ChildStdio)> {
    let mut io = ProcessIo {
        stdin: None,
        stdout: None,
        stderr: None,
    };
    let mut child = ChildStdio {
        stdin: Stdio::null(),
        stdout: Stdio::null(),
        stderr: Stdio::null(),
    };
    if stdin {
        let (r, w) = cloexec_pipe()?;
        io.stdin = Some(pipe::Sender::from_owned_fd(w).context("stdin pipe")?);
        child.stdin = Stdio::from(r);
    }
    if stdout {
        let (r, w) = cloexec_pipe()?;
        io.stdout = Some(pipe::Receiver::from_owned_fd(r).context("stdout pipe")?);
        child.stdout = Stdio::from(w);
    }
    if stderr {
        let (r, w) = cloexec_pipe()?;
        io.stderr = Some(pipe::Receiver::from_owned_fd(r).context("stderr pipe")?);
        child.stderr = Stdio::from(w);
    }
    Ok((io, child))
}

/// One output stream of a process; empty reads mean end of stream.
pub struct OutStream(Mutex<Option<pipe::Receiver>>);

impl OutStream {
    fn new(rx: Option<pipe::Receiver>) -> Self {
        OutStream(Mutex::new(rx))
    }

    /// Reads up to `len` bytes (capped at [`MAX_READ`]), waiting for data;
    /// returns an empty vector at end of stream (or when the stream was not
    /// requested).
    pub async fn read(&self, len: usize) -> Result<Vec<u8>> {
        let len = match len {
            0 => DEFAULT_READ,
            n => n.min(MAX_READ),
        };
        let mut guard = self.0.lock().await;
        let Some(rx) = guard.as_mut() else {
            return Ok(Vec::new());
        };
        let mut buf = Vec::with_capacity(len);
        let n = rx.read_buf(&mut buf).await.context("read output pipe")?;
        if n == 0 {
            *guard = None;
        }
        Ok(buf)
    }
}

pub struct Process {
    pub pid: i32,
    exit: watch::Receiver<Option<ExitInfo>>,
    stdin: Mutex<Option<pipe::Sender>>,
    pub stdout: OutStream,
    pub stderr: OutStream,
}

impl Process {
    /// Wraps a started process; `exited` resolves when the reaper sees it end.
    pub fn new(pid: i32, io: ProcessIo, exited: oneshot::Receiver<ExitInfo>) -> Self {
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            if let Ok(info) = exited.await {
                debug!(pid, status = info.status, "process exited");
                tx.send_replace(Some(info));
            }
        });
        Process {
            pid,
            exit: rx,
            stdin: Mutex::new(io.stdin),
            stdout: OutStream::new(io.stdout),
            stderr: OutStream::new(io.stderr),
        }
    }

    /// The exit, if the process has ended.
    pub fn exited(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    /// Waits until the process ends.
    pub async fn wait(&self) -> Result<ExitInfo> {
        let mut rx = self.exit.clone();
        let info = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Error::Internal(format!("exit of pid {} was lost", self.pid)))?;
        Ok(info.expect("wait_for returned a value"))
    }

    /// Sends `signal` to the process with kill(2).
    pub fn kill(&self, signal: u32) -> Result<()> {
        if self.exited().is_some() {
            return Err(Error::NotFound(format!(
                "process {} already exited",
                self.pid
            )));
        }
        let sig = validate_signal(signal)?;
        // SAFETY: kill(2) with a pid we spawned and a validated signal number.
        let rc = unsafe { libc::kill(self.pid, sig) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ESRCH) {
                return Err(Error::NotFound(format!("process {} not found", self.pid)));
            }
            return Err(err).with_context(|| format!("kill {} {}", self.pid, sig));
        }
        Ok(())
    }

    /// Writes all of `data` to stdin.
    pub async fn write_stdin(&self, data: &[u8]) -> Result<usize> {
        let mut guard = self.stdin.lock().await;
        let Some(tx) = guard.as_mut() else {
            return Err(Error::FailedPrecondition(
                "stdin is not open (not requested or closed)".into(),
            ));
        };
        tx.write_all(data).await.context("write stdin")?;
        Ok(data.len())
    }

    /// Closes stdin (the process reads EOF); a no-op when already closed.
    pub async fn close_stdin(&self) {
        self.stdin.lock().await.take();
    }
}

/// Checks a signal number (1..=64, what the kernel accepts).
pub fn validate_signal(signal: u32) -> Result<libc::c_int> {
    let max = libc::SIGRTMAX() as u32;
    if signal == 0 || signal > max {
        return Err(Error::InvalidArgument(format!("invalid signal {signal}")));
    }
    Ok(signal as libc::c_int)
}

/// The name runc understands for a signal (a number works too).
pub fn signal_arg(signal: u32) -> String {
    Signal::try_from(signal as i32)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| signal.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals() {
        assert!(validate_signal(0).is_err());
        assert!(validate_signal(65).is_err());
        assert_eq!(validate_signal(9).unwrap(), 9);
        assert_eq!(validate_signal(34).unwrap(), 34);
        assert_eq!(signal_arg(15), "SIGTERM");
        assert_eq!(signal_arg(40), "40");
    }

    #[tokio::test]
    async fn output_stream_reads_until_eof_after_writer_exited() {
        let (io, child) = make_stdio(false, true, false).unwrap();
        let p = Process::new(1, io, oneshot::channel().1);
        let status = std::process::Command::new("sh")
            .args(["-c", "printf hello"])
            .stdout(child.stdout)
            .status()
            .unwrap();
        assert!(status.success());
        check_eof(&p).await;
    }

    async fn check_eof(p: &Process) {
        let mut got = Vec::new();
        loop {
            let chunk = p.stdout.read(3).await.unwrap();
            if chunk.is_empty() {
                break;
            }
            assert!(chunk.len() <= 3);
            got.extend(chunk);
        }
        assert_eq!(got, b"hello");
        assert!(p.stdout.read(10).await.unwrap().is_empty());
        assert!(p.stderr.read(10).await.unwrap().is_empty());
    }
}
