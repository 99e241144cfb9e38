//! Running external commands with a deadline and captured output.
use std::fmt;
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

/// How long to wait for a command's output pipes to close after it exited
/// (a daemon it left behind may hold them open).
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// What a finished (or killed) command did.
#[derive(Debug, Clone)]
pub struct Output {
    /// The command line, for messages.
    pub command: String,
    /// Exit code; `None` when a signal ended it.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// stdout as text (lossy UTF-8); the bytes are in `raw_stdout`.
    pub stdout: String,
    pub raw_stdout: Vec<u8>,
    pub stderr: String,
    /// The deadline passed and the command was killed.
    pub timed_out: bool,
    pub elapsed: Duration,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0) && !self.timed_out
    }

    /// stdout and stderr together (for "the output names X" checks).
    pub fn combined(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// Panics with the whole output unless the command succeeded.
    #[track_caller]
    pub fn expect_success(&self) -> &Self {
        assert!(self.success(), "command failed:\n{self}");
        self
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = if self.timed_out {
            "timed out (killed)".to_string()
        } else if let Some(code) = self.code {
            format!("exited with code {code}")
        } else {
            format!("was killed by signal {}", self.signal.unwrap_or(0))
        };
        write!(
            f,
            "`{}` {how} after {:.1?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command,
            self.elapsed,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// A command line as one string (for messages).
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains([' ', '\'', '"', '$']) {
            s.push_str(&format!("'{}'", a.replace('\'', "'\\''")));
        } else {
            s.push_str(&a);
        }
    }
    s
}

/// A command running in the background, its output being collected.
pub struct Running {
    command: String,
    child: Option<Child>,
    stdout: Receiver<Vec<u8>>,
    stderr: Receiver<Vec<u8>>,
    started: Instant,
}

fn reader<R: Read + Send + 'static>(mut r: R) -> Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

/// Starts `cmd` (in its own process group) with piped stdio; `stdin` is
/// written and closed, or stdin is /dev/null.
pub fn spawn(cmd: &mut Command, stdin: Option<&[u8]>) -> Running {
    let command = describe(cmd);
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .process_group(0);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{command}`: {e}"));
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let data = data.to_vec();
        thread::spawn(move || {
            let _ = pipe.write_all(&data);
        });
    }
    let stdout = reader(child.stdout.take().expect("piped stdout"));
    let stderr = reader(child.stderr.take().expect("piped stderr"));
    Running {
        command,
        child: Some(child),
        stdout,
        stderr,
        started: Instant::now(),
    }
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Whether it still runs.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Waits at most `timeout` (from now), then kills its process group.
    pub fn wait(mut self, timeout: Duration) -> Output {
        let deadline = Instant::now() + timeout;
        let mut child = self.child.take().expect("waited once");
        let mut timed_out = false;
        let status: ExitStatus = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Ok(None) | Err(_) => {
                    timed_out = true;
                    kill_group(&mut child);
                    break child.wait().expect("wait for a killed child");
                }
            }
        };
        let elapsed = self.started.elapsed();
        let bytes = |rx: &Receiver<Vec<u8>>| rx.recv_timeout(DRAIN_GRACE).unwrap_or_default();
        let raw_stdout = bytes(&self.stdout);
        Output {
            command: std::mem::take(&mut self.command),
            code: status.code(),
            signal: status.signal(),
            stdout: String::from_utf8_lossy(&raw_stdout).into_owned(),
            raw_stdout,
            stderr: String::from_utf8_lossy(&bytes(&self.stderr)).into_owned(),
            timed_out,
            elapsed,
        }
    }
}

fn kill_group(child: &mut Child) {
    if let Ok(pgid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) has no memory-safety preconditions; the negative
        // pid names the process group this child leads (see `spawn`).
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
    let _ = child.kill();
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                kill_group(&mut child);
            }
            let _ = child.wait();
        }
    }
}

/// Runs `cmd` to completion, killing it after `timeout`.
pub fn run(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Output {
    spawn(cmd, stdin).wait(timeout)
}

/// Polls `check` every 100 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output_and_code() {
        let out = run(
            Command::new("sh").args(["-c", "cat; echo err >&2; exit 3"]),
            Some(b"in\n"),
            Duration::from_secs(10),
        );
        assert_eq!(out.code, Some(3), "{out}");
        assert_eq!(out.stdout, "in\n");
        assert_eq!(out.stderr, "err\n");
        assert!(!out.timed_out);
    }

    #[test]
    fn kills_at_the_deadline() {
        let out = run(
            Command::new("sleep").arg("30"),
            None,
            Duration::from_millis(200),
        );
        assert!(out.timed_out, "{out}");
        assert!(!out.success());
        assert!(out.elapsed < Duration::from_secs(5));
    }
}
