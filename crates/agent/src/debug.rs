//! An operator's debug commands (`DebugExec`, for `kuasarctl exec`): run by
//! the agent itself, in the guest's own namespaces (outside every container,
//! not under crun), in a process group of their own.
//!
//! Everything is bounded: the timeout kills the command's process group;
//! the output kept is capped (what comes past the cap is read and dropped,
//! so the command never blocks on a full pipe); once the command exited,
//! its output may take [`DRAIN`] more to end, after which what it left
//! running in its group is killed too.
use std::future::Future;
use std::io;
use std::os::unix::process::CommandExt;
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::time::Duration;

use kuasar_api::debug_exec::{self as limits, MAX_OUTPUT, MAX_STDIN};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::debug;

use crate::error::{Context, Error, Result};
use crate::process::{cloexec_pipe, FdStream};
use crate::reaper::{ExitInfo, Reaper};

/// The command's search path, the only variable of its environment with HOME.
pub const PATH: &str = "/bin:/sbin:/usr/bin:/usr/sbin";
/// How long the output may still come after the command exited.
const DRAIN: Duration = Duration::from_secs(1);
/// How long a killed command's exit may take to be seen.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// The size of one read of the output.
const READ_SIZE: usize = 64 << 10;

/// Starts a command and hands back its pid and a receiver of its exit: the
/// agent's [`Reaper`] (PID 1 reaps every child), a plain `Child::wait` in
/// tests (a reaper there would reap the whole test process's children).
pub trait Spawn {
    fn spawn(&self, cmd: &mut Command) -> io::Result<(i32, oneshot::Receiver<ExitInfo>)>;
}

impl Spawn for Reaper {
    fn spawn(&self, cmd: &mut Command) -> io::Result<(i32, oneshot::Receiver<ExitInfo>)> {
        Reaper::spawn(self, cmd)
    }
}

/// A debug command, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebugCommand {
    pub argv: Vec<String>,
    pub stdin: Vec<u8>,
    pub timeout: Duration,
}

impl DebugCommand {
    /// Checks a request: a program, no NUL byte, bounded stdin; the
    /// timeout as [`limits::timeout`] makes it (0: the default).
    pub fn new(argv: Vec<String>, stdin: Vec<u8>, timeout_ms: u32) -> Result<Self> {
        if argv.first().is_none_or(|a| a.is_empty()) {
            return Err(Error::InvalidArgument(
                "the debug command is empty (no program)".into(),
            ));
        }
        if let Some(i) = argv.iter().position(|a| a.contains('\0')) {
            return Err(Error::InvalidArgument(format!(
                "argument {i} of the debug command contains a NUL byte"
            )));
        }
        if stdin.len() > MAX_STDIN {
            return Err(Error::InvalidArgument(format!(
                "{} bytes of stdin for the debug command, more than {MAX_STDIN}",
                stdin.len()
            )));
        }
        Ok(DebugCommand {
            argv,
            stdin,
            timeout: limits::timeout(Duration::from_millis(timeout_ms.into())),
        })
    }
}

/// Output kept up to a limit; past it, `truncated` says some was dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture {
    pub data: Vec<u8>,
    pub truncated: bool,
    limit: usize,
}

impl Capture {
    pub fn new(limit: usize) -> Self {
        Capture {
            data: Vec::new(),
            truncated: false,
            limit,
        }
    }

    pub fn push(&mut self, chunk: &[u8]) {
        let room = self.limit.saturating_sub(self.data.len());
        let kept = chunk.len().min(room);
        self.data.extend_from_slice(&chunk[..kept]);
        if kept < chunk.len() {
            self.truncated = true;
        }
    }
}

/// What a debug command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The exit code, or 128 + the signal that ended the command.
    pub exit_status: u32,
    pub stdout: Capture,
    pub stderr: Capture,
    /// The timeout killed it.
    pub timed_out: bool,
}

/// Runs `command` (see the module documentation).
pub async fn run(spawner: &impl Spawn, command: DebugCommand) -> Result<Outcome> {
    let (stdin_r, stdin_w) = cloexec_pipe()?;
    let (stdout_r, stdout_w) = cloexec_pipe()?;
    let (stderr_r, stderr_w) = cloexec_pipe()?;
    let stdin = FdStream::new(stdin_w).context("debug command's stdin pipe")?;
    let stdout = FdStream::new(stdout_r).context("debug command's stdout pipe")?;
    let stderr = FdStream::new(stderr_r).context("debug command's stderr pipe")?;
    let program = &command.argv[0];
    let mut cmd = Command::new(program);
    cmd.args(&command.argv[1..])
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", "/")
        .current_dir("/")
        .process_group(0)
        .stdin(Stdio::from(stdin_r))
        .stdout(Stdio::from(stdout_w))
        .stderr(Stdio::from(stderr_w));
    let spawned = spawner.spawn(&mut cmd);
    // The child's ends of the pipes close here, in the agent.
    drop(cmd);
    let (pid, exited) = spawned.map_err(|e| spawn_error(program, e))?;
    debug!(pid, program, "debug command started");
    let mut out = Capture::new(MAX_OUTPUT);
    let mut err = Capture::new(MAX_OUTPUT);
    let (exit_status, timed_out) = {
        let io = async {
            tokio::join!(
                feed(stdin, &command.stdin),
                collect(&stdout, &mut out),
                collect(&stderr, &mut err)
            )
        };
        tokio::pin!(io);
        supervise(pid, exited, io, Instant::now() + command.timeout).await?
    };
    Ok(Outcome {
        exit_status,
        stdout: out,
        stderr: err,
        timed_out,
    })
}

fn spawn_error(program: &str, e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::NotFound => Error::NotFound(format!(
            "{program}: no such program in the guest (PATH={PATH})"
        )),
        _ => Error::Io {
            context: format!("run {program} in the guest"),
            source: e,
        },
    }
}

/// Writes `data` to the command's stdin, then closes it (a command that
/// does not read it gets it closed when it exits).
async fn feed(stdin: FdStream, data: &[u8]) {
    if let Err(e) = stdin.write_all(data).await {
        debug!("debug command's stdin: {e}");
    }
}

/// Reads `stream` to its end into `capture`.
async fn collect(stream: &FdStream, capture: &mut Capture) {
    let mut buf = vec![0u8; READ_SIZE];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => capture.push(&buf[..n]),
            Err(e) => {
                debug!("debug command's output: {e}");
                return;
            }
        }
    }
}

/// Waits for the command's exit and the end of its output (`io`), at most
/// until `deadline` (and [`DRAIN`] after the exit); then kills its process
/// group when the command, or something it left running, is still there.
/// Returns the exit status and whether the timeout struck.
async fn supervise(
    pid: i32,
    mut exited: oneshot::Receiver<ExitInfo>,
    mut io: Pin<&mut impl Future<Output = ((), (), ())>>,
    deadline: Instant,
) -> Result<(u32, bool)> {
    let lost = || Error::Internal(format!("the exit of debug command {pid} was lost"));
    let (mut exit, mut io_done, mut until) = (None, false, deadline);
    while exit.is_none() || !io_done {
        tokio::select! {
            r = &mut exited, if exit.is_none() => {
                exit = Some(r.map_err(|_| lost())?.status);
                until = until.min(Instant::now() + DRAIN);
            }
            _ = &mut io, if !io_done => io_done = true,
            _ = tokio::time::sleep_until(until) => break,
        }
    }
    if let (Some(status), true) = (exit, io_done) {
        return Ok((status, false));
    }
    // The group is the command's (its pid is its group's id, held while
    // the group has members); ESRCH: nobody is left.
    if let Err(e) = killpg(Pid::from_raw(pid), Signal::SIGKILL) {
        debug!(pid, "kill the debug command's process group: {e}");
    }
    let timed_out = exit.is_none();
    let status = match exit {
        Some(status) => status,
        None => {
            tokio::time::timeout(KILL_GRACE, exited)
                .await
                .map_err(|_| lost())?
                .map_err(|_| lost())?
                .status
        }
    };
    // What the killed processes wrote last.
    if !io_done {
        let _ = tokio::time::timeout(DRAIN, io).await;
    }
    Ok((status, timed_out))
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    /// Spawns with the standard library and waits on a thread of its own.
    struct Plain;

    impl Spawn for Plain {
        fn spawn(&self, cmd: &mut Command) -> io::Result<(i32, oneshot::Receiver<ExitInfo>)> {
            let mut child = cmd.spawn()?;
            let pid = child.id() as i32;
            let (tx, rx) = oneshot::channel();
            std::thread::spawn(move || {
                if let Ok(s) = child.wait() {
                    let status = s
                        .code()
                        .map(|c| c as u32)
                        .or_else(|| s.signal().map(|n| 128 + n as u32))
                        .unwrap_or(255);
                    let _ = tx.send(ExitInfo { status, at_ns: 0 });
                }
            });
            Ok((pid, rx))
        }
    }

    fn command(argv: &[&str], stdin: &[u8], timeout_ms: u32) -> DebugCommand {
        let argv = argv.iter().map(|a| a.to_string()).collect();
        DebugCommand::new(argv, stdin.to_vec(), timeout_ms).unwrap()
    }

    async fn run_plain(argv: &[&str], stdin: &[u8], timeout_ms: u32) -> Outcome {
        run(&Plain, command(argv, stdin, timeout_ms)).await.unwrap()
    }

    #[test]
    fn requests_are_checked() {
        let bad = |argv: &[&str], stdin: usize| {
            let argv = argv.iter().map(|a| a.to_string()).collect();
            DebugCommand::new(argv, vec![0; stdin], 0).unwrap_err()
        };
        assert!(matches!(bad(&[], 0), Error::InvalidArgument(_)));
        assert!(matches!(bad(&["", "x"], 0), Error::InvalidArgument(_)));
        let e = bad(&["sh", "a\0b"], 0);
        assert_eq!(
            e.to_string(),
            "argument 1 of the debug command contains a NUL byte"
        );
        let e = bad(&["cat"], MAX_STDIN + 1);
        assert!(e.to_string().contains("more than 1048576"), "{e}");
        assert_eq!(command(&["cat"], &[], 0).timeout, limits::DEFAULT_TIMEOUT);
        assert_eq!(
            command(&["cat"], &[], u32::MAX).timeout,
            limits::MAX_TIMEOUT
        );
        assert_eq!(
            command(&["cat"], &[], 1500).timeout,
            Duration::from_millis(1500)
        );
    }

    #[test]
    fn captures_are_cut_at_their_limit() {
        let mut c = Capture::new(5);
        c.push(b"abc");
        assert!(!c.truncated);
        c.push(b"defg");
        c.push(b"h");
        assert_eq!((c.data.as_slice(), c.truncated), (&b"abcde"[..], true));
        let mut c = Capture::new(3);
        c.push(b"abc");
        assert_eq!((c.data.as_slice(), c.truncated), (&b"abc"[..], false));
    }

    #[tokio::test]
    async fn output_and_exit_status_come_back() {
        let o = run_plain(&["sh", "-c", "echo out; echo err >&2; exit 3"], b"", 0).await;
        assert_eq!(o.exit_status, 3);
        assert_eq!(o.stdout.data, b"out\n");
        assert_eq!(o.stderr.data, b"err\n");
        assert!(!o.timed_out && !o.stdout.truncated && !o.stderr.truncated);
    }

    #[tokio::test]
    async fn stdin_is_given_then_closed() {
        let o = run_plain(&["cat"], b"hello\nworld\n", 0).await;
        assert_eq!(
            (o.exit_status, o.stdout.data.as_slice()),
            (0, &b"hello\nworld\n"[..])
        );
        // A command that does not read it.
        let o = run_plain(&["true"], &[7; MAX_STDIN], 0).await;
        assert_eq!(o.exit_status, 0);
    }

    #[tokio::test]
    async fn the_environment_is_clean() {
        let o = run_plain(&["sh", "-c", "pwd; env | sort"], b"", 0).await;
        let text = String::from_utf8_lossy(&o.stdout.data);
        // Less the variables the shell sets itself.
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| !["PWD=", "SHLVL=", "_="].iter().any(|v| l.starts_with(v)))
            .collect();
        assert_eq!(lines, ["/", "HOME=/", &format!("PATH={PATH}")]);
    }

    #[tokio::test]
    async fn the_timeout_kills_the_process_group() {
        let started = std::time::Instant::now();
        let o = run_plain(&["sh", "-c", "sleep 100; echo never"], b"", 300).await;
        assert!(o.timed_out);
        assert_eq!(o.exit_status, 128 + 9);
        assert!(o.stdout.data.is_empty());
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn what_the_command_leaves_running_is_killed() {
        let started = std::time::Instant::now();
        let o = run_plain(&["sh", "-c", "sleep 100 & echo started"], b"", 0).await;
        assert_eq!((o.exit_status, o.timed_out), (0, false));
        assert_eq!(o.stdout.data, b"started\n");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn output_past_the_limit_is_dropped() {
        let o = run_plain(
            &["sh", "-c", "head -c 3000000 /dev/zero; echo e >&2"],
            b"",
            0,
        )
        .await;
        assert_eq!(o.exit_status, 0);
        assert_eq!(o.stdout.data.len(), MAX_OUTPUT);
        assert!(o.stdout.truncated);
        assert_eq!(
            (o.stderr.data.as_slice(), o.stderr.truncated),
            (&b"e\n"[..], false)
        );
    }

    #[tokio::test]
    async fn a_missing_program_is_named() {
        let e = run(&Plain, command(&["no-such-program"], b"", 0))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e:?}");
        assert!(
            e.to_string()
                .starts_with("no-such-program: no such program"),
            "{e}"
        );
    }
}
