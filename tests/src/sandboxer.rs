//! A kuasar-vmm started by the tests with a configuration of their choice.
use kuasar_api::services::SANDBOXER;
use std::fs::{self, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cmd::{self, Output};
use crate::paths;
use crate::procs;
use crate::wire;

/// How long kuasar-vmm may take to create its socket.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// SIGTERM grace before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// What goes into `kuasar-vmm --config FILE` (see docs/design.md).
#[derive(Debug, Clone)]
pub struct SandboxerConfig {
    pub socket: PathBuf,
    /// containerd's ttrpc address (zero-shim mode events).
    pub containerd_ttrpc_address: PathBuf,
    pub state_dir: PathBuf,
    pub image_dir: PathBuf,
    /// `kernel`: a file of `image_dir` or an absolute path (None: the
    /// default, `vmlinux`).
    pub kernel: Option<String>,
    pub log_level: String,
    pub qemu_binary: Option<PathBuf>,
    pub boot_timeout_secs: Option<u64>,
    /// `[vm] call_timeout_secs`: the bound on each agent call.
    pub call_timeout_secs: Option<u64>,
    pub kernel_params: Option<String>,
    /// `[metrics] address` (None: no metrics endpoint, the default).
    pub metrics_address: Option<String>,
    /// `[vm] vmm_overhead_mib`: what the VMM's cgroup allows above the VM.
    pub vmm_overhead_mib: Option<u64>,
    /// `[pool] size`: pre-booted VMs (None: `$KUASAR_POOL_SIZE`, else off),
    /// so that a whole suite can run with the pool on.
    pub pool_size: Option<u32>,
    /// `[qemu] confine` (None: kuasar-vmm's default, confined).
    pub confine: Option<bool>,
}

/// Runs every environment's kuasar-vmm with a pool of this many VMs.
pub const POOL_SIZE_ENV: &str = "KUASAR_POOL_SIZE";

fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

impl SandboxerConfig {
    /// The configuration the test environment under `dir` uses by default:
    /// socket `dir/vmm.sock`, state `dir/vmm`, the installed guest image.
    pub fn for_dir(dir: &Path) -> Self {
        Self {
            socket: dir.join("vmm.sock"),
            containerd_ttrpc_address: dir.join("containerd.sock.ttrpc"),
            state_dir: dir.join("vmm"),
            image_dir: paths::image_dir(),
            kernel: None,
            log_level: "info".into(),
            qemu_binary: None,
            boot_timeout_secs: None,
            call_timeout_secs: None,
            kernel_params: None,
            metrics_address: None,
            vmm_overhead_mib: None,
            pool_size: std::env::var(POOL_SIZE_ENV)
                .ok()
                .and_then(|v| v.parse().ok()),
            confine: None,
        }
    }

    /// The gRPC (sandbox controller) socket: beside the ttrpc one,
    /// `vmm.sock` -> `vmm-grpc.sock`.
    pub fn grpc_socket(&self) -> PathBuf {
        let name = self
            .socket
            .file_name()
            .unwrap_or_default()
            .to_string_lossy();
        let stem = name.strip_suffix(".sock").unwrap_or(&name);
        self.socket.with_file_name(format!("{stem}-grpc.sock"))
    }

    pub fn to_toml(&self) -> String {
        let p = |p: &Path| toml_str(&p.to_string_lossy());
        let mut s = format!(
            "socket = {}\ngrpc_socket = {}\ncontainerd_ttrpc_address = {}\nstate_dir = {}\nimage_dir = {}\nlog_level = {}\n",
            p(&self.socket),
            p(&self.grpc_socket()),
            p(&self.containerd_ttrpc_address),
            p(&self.state_dir),
            p(&self.image_dir),
            toml_str(&self.log_level)
        );
        if let Some(k) = &self.kernel {
            s += &format!("kernel = {}\n", toml_str(k));
        }
        s += "\n[vm]\n";
        if let Some(t) = self.boot_timeout_secs {
            s += &format!("boot_timeout_secs = {t}\n");
        }
        if let Some(t) = self.call_timeout_secs {
            s += &format!("call_timeout_secs = {t}\n");
        }
        if let Some(k) = &self.kernel_params {
            s += &format!("kernel_params = {}\n", toml_str(k));
        }
        if let Some(m) = self.vmm_overhead_mib {
            s += &format!("vmm_overhead_mib = {m}\n");
        }
        s += "\n[qemu]\n";
        if let Some(b) = &self.qemu_binary {
            s += &format!("binary = {}\n", p(b));
        }
        if let Some(c) = self.confine {
            s += &format!("confine = {c}\n");
        }
        if let Some(a) = &self.metrics_address {
            s += &format!("\n[metrics]\naddress = {}\n", toml_str(a));
        }
        if let Some(n) = self.pool_size {
            s += &format!("\n[pool]\nsize = {n}\n");
        }
        s
    }

    /// Writes the configuration to `path`.
    pub fn write(&self, path: &Path) {
        fs::write(path, self.to_toml()).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}

fn command(env_dir: &Path, config_file: &Path) -> Command {
    let mut c = Command::new(paths::bin_dir().join("kuasar-vmm"));
    c.arg("--config")
        .arg(config_file)
        .env("KUASAR_TEST_DIR", env_dir)
        .env("NO_COLOR", "1")
        .env_remove("KUASAR_LOG");
    c
}

/// Runs `kuasar-vmm --config FILE` expecting it to refuse to start: returns
/// its output once it exits (or is killed after `timeout`).
pub fn run_expecting_exit(
    env_dir: &Path,
    config: &SandboxerConfig,
    name: &str,
    timeout: Duration,
) -> Output {
    let file = env_dir.join(format!("{name}.toml"));
    config.write(&file);
    cmd::run(&mut command(env_dir, &file), None, timeout)
}

/// A running kuasar-vmm; stopped (SIGTERM, then SIGKILL) on drop.
pub struct Sandboxer {
    child: Option<Child>,
    pub config: SandboxerConfig,
    pub log: PathBuf,
    pid_file: PathBuf,
    /// Set once it was ended on purpose with its VMs left running (a
    /// restart): dropping it then leaves them to the next kuasar-vmm.
    keep_vms: bool,
}

impl Sandboxer {
    /// Starts kuasar-vmm for the environment under `env_dir` (config
    /// `kuasar-vmm.toml`, log `kuasar-vmm.log`, pid `kuasar-vmm.pid` there,
    /// as scripts/sandboxer.sh does) and waits until its socket exists.
    pub fn start(env_dir: &Path, config: SandboxerConfig) -> Result<Self, String> {
        let file = env_dir.join("kuasar-vmm.toml");
        let log = env_dir.join("kuasar-vmm.log");
        let pid_file = env_dir.join("kuasar-vmm.pid");
        config.write(&file);
        let _ = fs::remove_file(&config.socket);
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| format!("open {}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let offset = out.metadata().map(|m| m.len()).unwrap_or(0);
        let child = command(env_dir, &file)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("spawn kuasar-vmm: {e}"))?;
        let _ = fs::write(&pid_file, format!("{}\n", child.id()));
        let mut me = Self {
            child: Some(child),
            config,
            log,
            pid_file,
            keep_vms: false,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if me.config.socket.exists() && me.answers() {
                return Ok(me);
            }
            let exited = me.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                me.child = None;
                return Err(format!(
                    "kuasar-vmm exited during start-up ({status}); its log:\n{}",
                    me.log_since(offset)
                ));
            }
            if Instant::now() >= deadline {
                let log = me.log_since(offset);
                me.stop();
                return Err(format!(
                    "kuasar-vmm did not answer Ping on {} within {START_TIMEOUT:?}; its log:\n{log}",
                    me.config.socket.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether it answers `Ping` on its socket.
    pub fn answers(&self) -> bool {
        let ping = wire::ttrpc_call(
            &self.config.socket,
            SANDBOXER,
            "Ping",
            &wire::Msg::new(),
            &[],
            Duration::from_secs(2),
        );
        matches!(ping, Ok(r) if r.code == wire::code::OK)
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// The log from byte `offset` on.
    pub fn log_since(&self, offset: u64) -> String {
        let all = fs::read(&self.log).unwrap_or_default();
        let start = usize::try_from(offset).unwrap_or(0).min(all.len());
        String::from_utf8_lossy(&all[start..]).into_owned()
    }

    /// The whole log.
    pub fn log_text(&self) -> String {
        self.log_since(0)
    }

    /// Ends kuasar-vmm with `signal` (SIGKILL: a crash; SIGTERM: a clean
    /// stop) and waits for it to exit, leaving its VMs running.
    pub fn end_keeping_vms(&mut self, signal: i32) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Err("kuasar-vmm is not running".into());
        };
        procs::signal(child.id() as i32, signal);
        let gone = cmd::wait_until(STOP_GRACE, || matches!(child.try_wait(), Ok(Some(_))));
        if !gone {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "kuasar-vmm did not exit within {STOP_GRACE:?} of signal {signal}"
            ));
        }
        let _ = child.wait();
        let _ = fs::remove_file(&self.pid_file);
        self.keep_vms = true;
        Ok(())
    }

    /// SIGTERM, SIGKILL after a grace period; kills QEMUs of its state dir.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id() as i32;
            procs::signal(pid, libc::SIGTERM);
            let gone = cmd::wait_until(STOP_GRACE, || matches!(child.try_wait(), Ok(Some(_))));
            if !gone {
                eprintln!("kuasar-e2e: kuasar-vmm (pid {pid}) ignored SIGTERM for {STOP_GRACE:?}; SIGKILL");
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        let _ = fs::remove_file(&self.pid_file);
        if !self.keep_vms {
            procs::kill_all(&self.config.state_dir, &[procs::QEMU]);
        }
    }
}

impl Drop for Sandboxer {
    fn drop(&mut self) {
        self.stop();
    }
}
