//! Driving the guest's OCI runtime, crun, through its runc-compatible CLI.
//! Every invocation is spawned through the reaper (never `Child::wait`), logs
//! to its own JSON log file (`--log FILE --log-format json`), and its error
//! messages are taken from that log (or its stderr) when it fails.
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tracing::debug;

use crate::error::{Context, Error, Result};
use crate::process::ChildStdio;
use crate::reaper::Reaper;

pub struct OciRuntime {
    binary: PathBuf,
    /// The name errors are reported with (the binary's file name).
    name: String,
    /// The runtime's state directory (`--root`): `<root>/<id>/` per container.
    root: PathBuf,
    log_dir: PathBuf,
    reaper: Arc<Reaper>,
    counter: AtomicU64,
}

impl OciRuntime {
    pub fn new(binary: &Path, root: &Path, log_dir: &Path, reaper: Arc<Reaper>) -> Self {
        let name = binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "OCI runtime".into());
        OciRuntime {
            binary: binary.to_path_buf(),
            name,
            root: root.to_path_buf(),
            log_dir: log_dir.to_path_buf(),
            reaper,
            counter: AtomicU64::new(0),
        }
    }

    /// `create`: the container's init gets `stdio` (or a pty sent to
    /// `console`) and waits for start.
    pub async fn create(
        &self,
        id: &str,
        bundle: &Path,
        pid_file: &Path,
        stdio: ChildStdio,
        console: Option<&Path>,
    ) -> Result<()> {
        let mut args: Vec<OsString> = vec![
            "create".into(),
            "--bundle".into(),
            bundle.into(),
            "--pid-file".into(),
            pid_file.into(),
        ];
        if let Some(c) = console {
            args.push("--console-socket".into());
            args.push(c.into());
        }
        args.push(id.into());
        self.run("create", args, Some(stdio)).await
    }

    pub async fn start(&self, id: &str) -> Result<()> {
        self.run("start", vec!["start".into(), id.into()], None)
            .await
    }

    /// `exec --detach`: the new process gets `stdio` (or a pty sent to `console`).
    pub async fn exec(
        &self,
        id: &str,
        process_json: &Path,
        pid_file: &Path,
        stdio: ChildStdio,
        console: Option<&Path>,
    ) -> Result<()> {
        let mut args: Vec<OsString> = vec![
            "exec".into(),
            "--detach".into(),
            "--pid-file".into(),
            pid_file.into(),
            "--process".into(),
            process_json.into(),
        ];
        if let Some(c) = console {
            args.push("--console-socket".into());
            args.push(c.into());
        }
        args.push(id.into());
        self.run("exec", args, Some(stdio)).await
    }

    /// `kill [--all] <id> <signal number>`.
    pub async fn kill(&self, id: &str, signal: u32, all: bool) -> Result<()> {
        let mut args: Vec<OsString> = vec!["kill".into()];
        if all {
            args.push("--all".into());
        }
        args.push(id.into());
        args.push(signal.to_string().into());
        self.run("kill", args, None).await
    }

    /// `delete --force`; a container the runtime does not know is already
    /// deleted (crun itself succeeds then; this also covers a failure that
    /// left no state behind).
    pub async fn delete(&self, id: &str) -> Result<()> {
        let args = vec!["delete".into(), "--force".into(), id.into()];
        match self.run("delete", args, None).await {
            Err(_) if !self.knows(id) => Ok(()),
            res => res,
        }
    }

    /// Whether the runtime has state for container `id`.
    fn knows(&self, id: &str) -> bool {
        self.root.join(id).exists()
    }

    async fn run(&self, op: &str, args: Vec<OsString>, stdio: Option<ChildStdio>) -> Result<()> {
        std::fs::create_dir_all(&self.log_dir).context("create OCI runtime log directory")?;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let log = self.log_dir.join(format!("{n}-{op}.json"));
        let err_path = self.log_dir.join(format!("{n}-{op}.stderr"));
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root")
            .arg(&self.root)
            .arg("--log")
            .arg(&log)
            .arg("--log-format")
            .arg("json")
            .args(&args);
        let captured_stderr = match stdio {
            Some(stdio) => {
                cmd.stdin(stdio.stdin)
                    .stdout(stdio.stdout)
                    .stderr(stdio.stderr);
                false
            }
            None => {
                let f = File::create(&err_path).context("create OCI runtime stderr file")?;
                cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(f);
                true
            }
        };
        let started = std::time::Instant::now();
        let spawned = self.reaper.spawn(&mut cmd);
        // Close the child's ends of the stdio pipes in the agent right away.
        drop(cmd);
        let (pid, exited) = spawned.with_context(|| format!("spawn {}", self.binary.display()))?;
        let exit = exited.await.map_err(|_| {
            Error::Internal(format!("exit of {} {op} (pid {pid}) was lost", self.name))
        })?;
        debug!(
            ?args,
            status = exit.status,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "{}",
            self.name
        );
        let log_text = std::fs::read_to_string(&log).unwrap_or_default();
        let err_text = if captured_stderr {
            std::fs::read_to_string(&err_path).unwrap_or_default()
        } else {
            String::new()
        };
        let _ = std::fs::remove_file(&log);
        let _ = std::fs::remove_file(&err_path);
        if exit.status == 0 {
            return Ok(());
        }
        let mut msg = error_message(&log_text, &err_text);
        if msg.is_empty() {
            msg = format!("exit status {}", exit.status);
        }
        Err(Error::Runtime {
            runtime: self.name.clone(),
            op: op.to_string(),
            msg,
        })
    }
}

/// The error messages of a JSON log (`{"msg":..,"level":"error",..}` lines),
/// or else the stderr text.
pub fn error_message(log: &str, stderr: &str) -> String {
    let msgs: Vec<String> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| matches!(v["level"].as_str(), Some("error" | "fatal" | "panic")))
        .filter_map(|v| v["msg"].as_str().map(str::to_string))
        .collect();
    if !msgs.is_empty() {
        return msgs.join("; ");
    }
    stderr.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_message_from_log_or_stderr() {
        // crun 1.8's JSON log lines.
        let log = r#"{"msg":"hello","level":"warning","time":"2026-11-27T03:33:42.781454Z"}
{"msg":"error opening file `/run/crun/c1/status`: No such file or directory","level":"error","time":"2026-11-27T03:33:42.816737Z"}
not json
"#;
        assert_eq!(
            error_message(log, "ignored"),
            "error opening file `/run/crun/c1/status`: No such file or directory"
        );
        let two = r#"{"msg":"a","level":"error"}
{"msg":"b","level":"error"}"#;
        assert_eq!(error_message(two, ""), "a; b");
        assert_eq!(error_message("", "  some error\n"), "some error");
        assert_eq!(error_message("", ""), "");
    }
}
