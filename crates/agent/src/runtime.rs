//! Driving the guest's OCI runtime, crun, through its runc-compatible CLI.
//! Every invocation is spawned through the reaper (never `Child::wait`), logs
//! to its own JSON log file (`--log FILE --log-format json`), and its error
//! messages are taken from that log (or its stderr) when it fails.
//!
//! Against CVE-2019-5736 (a container overwriting the runtime binary through
//! `/proc/<pid>/exe`) crun copies itself into a sealed memfd and re-executes
//! that copy at every start, unless it already runs from such a memfd.
//! Under emulation that copy and second exec (a second load of its ten
//! libraries) cost a lot on every call, so the agent makes the sealed copy
//! once ([`SealedCopy::make`], on the guest set-up thread, off the agent's
//! path to ready) and runs crun from it: the same protection (no write can
//! reach the copy), made once.
use std::ffi::OsString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use tracing::debug;

use crate::error::{Context, Error, Result};
use crate::process::ChildStdio;
use crate::reaper::Reaper;

/// The runtime binary's sealed copy: made once by whoever holds a clone
/// ([`SealedCopy::make`]), run by [`OciRuntime`] once it exists.
#[derive(Clone)]
pub struct SealedCopy {
    binary: PathBuf,
    copy: Arc<OnceLock<File>>,
}

impl SealedCopy {
    pub fn new(binary: &Path) -> Self {
        SealedCopy {
            binary: binary.to_path_buf(),
            copy: Arc::default(),
        }
    }

    /// Copies the binary into a sealed memfd that every later call runs
    /// (see the module documentation), then replaces the binary in the
    /// image (guest memory, like every file of the initramfs) by a link to
    /// that copy, so that the guest holds crun once; the path keeps working
    /// for anyone who runs it by hand. Without the copy crun still protects
    /// itself, at every call.
    pub fn make(&self) -> Result<()> {
        let mut src =
            File::open(&self.binary).with_context(|| format!("open {}", self.binary.display()))?;
        let flags = MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING;
        let mut copy = File::from(memfd_create(c"oci-runtime", flags).context("memfd_create")?);
        std::io::copy(&mut src, &mut copy)
            .with_context(|| format!("copy {}", self.binary.display()))?;
        fcntl(copy.as_raw_fd(), FcntlArg::F_ADD_SEALS(runtime_seals()))
            .context("seal the runtime's copy")?;
        let copy = self.copy.get_or_init(|| copy);
        self.link_to(copy);
        Ok(())
    }

    fn link_to(&self, copy: &File) {
        let target = format!("/proc/{}/fd/{}", std::process::id(), copy.as_raw_fd());
        let mut tmp = self.binary.clone().into_os_string();
        tmp.push(".link");
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let res = std::os::unix::fs::symlink(&target, &tmp)
            .and_then(|()| std::fs::rename(&tmp, &self.binary));
        match res {
            Ok(()) => debug!(binary = %self.binary.display(), target, "linked to the sealed copy"),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                tracing::warn!("link {} to its sealed copy: {e}", self.binary.display());
            }
        }
    }
}

pub struct OciRuntime {
    /// The name errors are reported with (the binary's file name).
    name: String,
    /// The runtime's state directory (`--root`): `<root>/<id>/` per container.
    root: PathBuf,
    log_dir: PathBuf,
    reaper: Arc<Reaper>,
    counter: AtomicU64,
    /// The binary, and its sealed copy that is run instead once made.
    sealed: SealedCopy,
}

/// The seals crun looks for on the binary it runs from (all four, exactly).
fn runtime_seals() -> SealFlag {
    SealFlag::F_SEAL_SEAL | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_WRITE
}

impl OciRuntime {
    /// Runs `sealed`'s binary, or its sealed copy once made.
    pub fn new(sealed: SealedCopy, root: &Path, log_dir: &Path, reaper: Arc<Reaper>) -> Self {
        let name = sealed
            .binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "OCI runtime".into());
        OciRuntime {
            name,
            root: root.to_path_buf(),
            log_dir: log_dir.to_path_buf(),
            reaper,
            counter: AtomicU64::new(0),
            sealed,
        }
    }

    /// What to execute: the sealed copy (through the child's own fd table:
    /// the fd is close-on-exec, but exec opens the file first), or the binary.
    fn program(&self) -> PathBuf {
        match self.sealed.copy.get() {
            Some(f) => PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd())),
            None => self.sealed.binary.clone(),
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

    /// `update --resources <file> <id>`: the file holds OCI LinuxResources.
    pub async fn update(&self, id: &str, resources: &Path) -> Result<()> {
        let args = vec![
            "update".into(),
            "--resources".into(),
            resources.into(),
            id.into(),
        ];
        self.run("update", args, None).await
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
        let mut cmd = Command::new(self.program());
        // crun looks at its argv[0] (a `crun-<handler>` name picks a handler).
        cmd.arg0(&self.sealed.binary)
            .arg("--root")
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
        let (pid, exited) =
            spawned.with_context(|| format!("spawn {}", self.sealed.binary.display()))?;
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
    fn runs_from_the_sealed_copy() {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("sh");
        std::fs::copy("/bin/sh", &binary).unwrap();
        let sealed = SealedCopy::new(&binary);
        let rt = OciRuntime::new(
            sealed.clone(),
            Path::new("/nonexistent"),
            Path::new("/nonexistent"),
            Arc::new(Reaper::default()),
        );
        assert_eq!(rt.program(), binary);
        // Made elsewhere (the guest set-up), used by the runtime from then on.
        sealed.make().unwrap();
        let fd = sealed.copy.get().unwrap().as_raw_fd();
        let seals = fcntl(fd, FcntlArg::F_GET_SEALS).unwrap();
        assert_eq!(seals, runtime_seals().bits());
        // Spawned like `run` does: the child runs the copy, with argv[0] the
        // binary's path.
        let out = Command::new(rt.program())
            .arg0("/bin/sh")
            .args(["-c", "echo $0; readlink /proc/$$/exe"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.starts_with("/bin/sh\n/memfd:oci-runtime"), "{text:?}");
        // The binary in the image is now a link to the copy, still runnable.
        let target = std::fs::read_link(&binary).unwrap();
        assert_eq!(
            target,
            PathBuf::from(format!("/proc/{}/fd/{fd}", std::process::id()))
        );
        let out = Command::new(&binary)
            .args(["-c", "readlink /proc/$$/exe"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.starts_with("/memfd:oci-runtime"), "{text:?}");
        assert!(!dir.path().join("sh.link").exists());
    }

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
