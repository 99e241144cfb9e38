//! A container process (init or exec): its pid, its stdio pipes and its exit.
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::unistd::pipe2;
use tokio::io::unix::AsyncFd;
use tokio::sync::{oneshot, watch, Mutex};
use tracing::debug;

use crate::console::ConsoleSocket;
use crate::error::{Context, Error, Result};
use crate::reaper::ExitInfo;

/// Largest chunk one ReadStdout/ReadStderr returns.
pub const MAX_READ: usize = 1 << 20;
/// Chunk size used when the caller asks for 0 bytes.
pub const DEFAULT_READ: usize = 64 << 10;
/// Pipe buffer size asked for (best effort; the default is 64 KiB).
const PIPE_SIZE: libc::c_int = 1 << 20;

/// The child's ends of the stdio pipes, handed to the OCI runtime.
pub struct ChildStdio {
    pub stdin: Stdio,
    pub stdout: Stdio,
    pub stderr: Stdio,
}

/// A non-blocking fd (pipe end or pty master) driven by the tokio reactor.
pub struct FdStream(AsyncFd<OwnedFd>);

impl FdStream {
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?;
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags))?;
        // SAFETY: the OwnedFd is open and owned by the AsyncFd for its whole
        // life, so its raw fd stays valid and names the same file.
        let fd = unsafe { AsyncFd::register(fd) }?;
        Ok(FdStream(fd))
    }

    /// Reads what is available (waiting for some); 0 at end of stream. A pty
    /// master reports EIO once every slave fd is closed: that is EOF too.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.0.readable().await?;
            let res =
                guard.try_io(|fd| nix::unistd::read(fd.as_raw_fd(), buf).map_err(io::Error::from));
            match res {
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.0.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd, data).map_err(io::Error::from)) {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    fn raw(&self) -> i32 {
        self.0.get_ref().as_raw_fd()
    }
}

/// The agent's ends of a process's stdio: pipes, or a pty master.
pub struct ProcessIo {
    stdin: Option<FdStream>,
    stdout: Option<FdStream>,
    stderr: Option<FdStream>,
    /// The pty master, when the process has a terminal.
    tty: Option<OwnedFd>,
}

impl ProcessIo {
    /// Stdio over a pty master (received on the OCI runtime's console socket):
    /// output is on stdout only; stdin is the master too when asked for.
    pub fn terminal(master: OwnedFd, stdin: bool) -> Result<Self> {
        let out = master.try_clone().context("dup pty master")?;
        let input = match stdin {
            true => Some(FdStream::new(master.try_clone().context("dup pty master")?)),
            false => None,
        };
        Ok(ProcessIo {
            stdin: input.transpose().context("pty stdin")?,
            stdout: Some(FdStream::new(out).context("pty stdout")?),
            stderr: None,
            tty: Some(master),
        })
    }
}

/// The child's stdio for a process with a terminal (the OCI runtime gives
/// it the pty).
pub fn null_stdio() -> ChildStdio {
    ChildStdio {
        stdin: Stdio::null(),
        stdout: Stdio::null(),
        stderr: Stdio::null(),
    }
}

pub(crate) fn cloexec_pipe() -> Result<(OwnedFd, OwnedFd)> {
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
        tty: None,
    };
    let mut child = null_stdio();
    if stdin {
        let (r, w) = cloexec_pipe()?;
        io.stdin = Some(FdStream::new(w).context("stdin pipe")?);
        child.stdin = Stdio::from(r);
    }
    if stdout {
        let (r, w) = cloexec_pipe()?;
        io.stdout = Some(FdStream::new(r).context("stdout pipe")?);
        child.stdout = Stdio::from(w);
    }
    if stderr {
        let (r, w) = cloexec_pipe()?;
        io.stderr = Some(FdStream::new(r).context("stderr pipe")?);
        child.stderr = Stdio::from(w);
    }
    Ok((io, child))
}

/// A process's stdio while the OCI runtime creates it: pipes, or a console
/// socket on which the runtime sends the pty master.
pub struct ProcessStdio {
    pub child: ChildStdio,
    pub io: PendingIo,
}

pub enum PendingIo {
    Pipes(ProcessIo),
    Terminal(ConsoleSocket),
}

impl ProcessStdio {
    pub fn new(terminal: bool, stdin: bool, stdout: bool, stderr: bool) -> Result<Self> {
        if terminal {
            return Ok(ProcessStdio {
                child: null_stdio(),
                io: PendingIo::Terminal(ConsoleSocket::bind()?),
            });
        }
        let (io, child) = make_stdio(stdin, stdout, stderr)?;
        Ok(ProcessStdio {
            child,
            io: PendingIo::Pipes(io),
        })
    }
}

impl PendingIo {
    pub fn console_path(&self) -> Option<&Path> {
        match self {
            PendingIo::Terminal(c) => Some(c.path()),
            PendingIo::Pipes(_) => None,
        }
    }

    /// The process's stdio once the OCI runtime succeeded.
    pub async fn finish(self, stdin: bool) -> Result<ProcessIo> {
        match self {
            PendingIo::Pipes(io) => Ok(io),
            PendingIo::Terminal(console) => ProcessIo::terminal(console.receive().await?, stdin),
        }
    }
}

/// One output stream of a process; empty reads mean end of stream.
///
/// Reads can be acknowledged ([`OutStream::read_acked`]): what a read
/// returned is kept until a later read says the host delivered it, and is
/// returned again to a host that did not (one that restarted, or whose
/// reply was lost with its connection). So no output is lost across a host
/// restart; at worst the chunk in flight at that moment is delivered twice.
pub struct OutStream(Mutex<OutState>);

struct OutState {
    rx: Option<FdStream>,
    /// Returned, not yet acknowledged; starts at stream offset `base`.
    kept: Vec<u8>,
    base: u64,
}

impl OutStream {
    fn new(rx: Option<FdStream>) -> Self {
        OutStream(Mutex::new(OutState {
            rx,
            kept: Vec::new(),
            base: 0,
        }))
    }

    /// Reads up to `len` bytes (capped at [`MAX_READ`]), waiting for data;
    /// returns an empty vector at end of stream (or when the stream was not
    /// requested). Nothing is kept for a later read.
    pub async fn read(&self, len: usize) -> Result<Vec<u8>> {
        let (_, data) = self.read_inner(len, None).await?;
        Ok(data)
    }

    /// Like [`OutStream::read`], acknowledged: the caller has delivered the
    /// stream up to offset `delivered`. Returns (offset of the chunk, chunk):
    /// what was returned before and not delivered, else new data.
    pub async fn read_acked(&self, len: usize, delivered: u64) -> Result<(u64, Vec<u8>)> {
        self.read_inner(len, Some(delivered)).await
    }

    async fn read_inner(&self, len: usize, delivered: Option<u64>) -> Result<(u64, Vec<u8>)> {
        let len = match len {
            0 => DEFAULT_READ,
            n => n.min(MAX_READ),
        };
        let mut st = self.0.lock().await;
        let st = &mut *st;
        match delivered {
            Some(d) if d > st.base => {
                let done = usize::try_from(d - st.base)
                    .unwrap_or(usize::MAX)
                    .min(st.kept.len());
                st.kept.drain(..done);
                st.base += done as u64;
            }
            // A host that knows nothing yet (it starts at 0) gets what is kept.
            Some(_) => {}
            // Plain reads: what is kept goes first, and is not kept again.
            None => {
                if !st.kept.is_empty() {
                    let n = len.min(st.kept.len());
                    let chunk: Vec<u8> = st.kept.drain(..n).collect();
                    let at = st.base;
                    st.base += n as u64;
                    return Ok((at, chunk));
                }
            }
        }
        if !st.kept.is_empty() {
            let n = len.min(st.kept.len());
            return Ok((st.base, st.kept[..n].to_vec()));
        }
        let Some(rx) = st.rx.as_mut() else {
            return Ok((st.base, Vec::new()));
        };
        let mut buf = vec![0u8; len];
        // Cancel-safe: a read cancelled while waiting consumed nothing.
        let n = rx.read(&mut buf).await.context("read output")?;
        if n == 0 {
            st.rx = None;
        }
        buf.truncate(n);
        if delivered.is_some() {
            st.kept.extend_from_slice(&buf);
        } else {
            st.base += n as u64;
        }
        Ok((st.base, buf))
    }
}

pub struct Process {
    pub pid: i32,
    exit: watch::Receiver<Option<ExitInfo>>,
    stdin: Mutex<Option<FdStream>>,
    pub stdout: OutStream,
    pub stderr: OutStream,
    tty: Option<OwnedFd>,
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
            tty: io.tty,
        }
    }

    /// Sets the terminal size of a process with a terminal.
    pub fn resize(&self, width: u32, height: u32) -> Result<()> {
        let Some(tty) = &self.tty else {
            return Err(Error::FailedPrecondition(format!(
                "process {} has no terminal",
                self.pid
            )));
        };
        let ws = libc::winsize {
            ws_row: height.min(u16::MAX as u32) as u16,
            ws_col: width.min(u16::MAX as u32) as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize struct that lives across the call.
        let rc = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("resize terminal");
        }
        Ok(())
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
        debug!(
            pid = self.pid,
            fd = tx.raw(),
            len = data.len(),
            "stdin written"
        );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals() {
        assert!(validate_signal(0).is_err());
        assert!(validate_signal(65).is_err());
        assert_eq!(validate_signal(9).unwrap(), 9);
        assert_eq!(validate_signal(34).unwrap(), 34);
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

    #[tokio::test]
    async fn acknowledged_reads_return_what_was_not_delivered() {
        let (io, child) = make_stdio(false, true, false).unwrap();
        let p = Process::new(1, io, oneshot::channel().1);
        std::process::Command::new("sh")
            .args(["-c", "printf hello; printf world"])
            .stdout(child.stdout)
            .status()
            .unwrap();
        let (at, a) = p.stdout.read_acked(5, 0).await.unwrap();
        assert_eq!((at, a.as_slice()), (0, &b"hello"[..]));
        // A host that restarted (it knows nothing) gets the same chunk.
        let (at, again) = p.stdout.read_acked(64, 0).await.unwrap();
        assert_eq!((at, again.as_slice()), (0, &b"hello"[..]));
        // Delivered: the next read returns new data.
        let (at, b) = p.stdout.read_acked(64, 5).await.unwrap();
        assert_eq!((at, b.as_slice()), (5, &b"world"[..]));
        let (at, end) = p.stdout.read_acked(64, 10).await.unwrap();
        assert_eq!((at, end.len()), (10, 0));
        // A claim past what was sent drops what is kept, nothing more.
        assert!(p.stdout.read_acked(64, 99).await.unwrap().1.is_empty());
    }
}
