//! The sandboxer's configuration: TOML, every key optional, unknown keys and
//! unknown enum values rejected, then [`Config::validate`] names a bad field.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Name of the default guest kernel (ELF vmlinux, PVH entry) inside
/// `image_dir`: the project's own, built by scripts/build-kernel.sh.
pub const KERNEL_FILE: &str = "vmlinux";
/// Name of Debian's kernel (extracted from its bzImage) inside `image_dir`:
/// the fallback, chosen with `kernel = "vmlinux-debian"`.
pub const DEBIAN_KERNEL_FILE: &str = "vmlinux-debian";
/// Name of virtiofsd inside `image_dir` (`[qemu] virtiofsd`'s default),
/// built by scripts/build-virtiofsd.sh.
pub const VIRTIOFSD_FILE: &str = "virtiofsd";
/// Name of the guest initramfs (uncompressed cpio) inside `image_dir`.
pub const INITRD_FILE: &str = "initramfs.cpio";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Syntax(#[from] Box<toml::de::Error>),
    #[error("parse config file {path}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid config field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("{what} {path} does not exist")]
    Missing { what: &'static str, path: PathBuf },
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The sandboxer's ttrpc socket (created mode 0600).
    pub socket: PathBuf,
    /// The zero-shim mode's gRPC socket: containerd's Sandbox Controller API
    /// (`[proxy_plugins.<name>] type = "sandbox"`), created mode 0600.
    pub grpc_socket: PathBuf,
    /// containerd's ttrpc address, where task events of sandboxes created
    /// through the gRPC controller go (no shim passes it there).
    pub containerd_ttrpc_address: String,
    /// One directory per sandbox lives here.
    pub state_dir: PathBuf,
    /// Holds the guest kernels (`vmlinux`, `vmlinux-debian`) and the
    /// initramfs (`initramfs.cpio`).
    pub image_dir: PathBuf,
    /// The guest kernel: a file name inside `image_dir` (`vmlinux`, the
    /// project's own kernel; `vmlinux-debian`, Debian's) or an absolute path
    /// to an ELF vmlinux with a PVH entry.
    pub kernel: PathBuf,
    /// Default log filter (overridden by the `KUASAR_LOG` environment variable).
    pub log_level: String,
    /// The VMs, whatever the hypervisor.
    pub vm: VmConfig,
    /// The hypervisor, QEMU.
    pub qemu: QemuConfig,
    pub sizing: SizingConfig,
    pub metrics: MetricsConfig,
    /// Pre-booted VMs that pods start from (warm start); off by default.
    pub pool: PoolConfig,
    /// What the file set the old way (`[qemu]` keys that moved to `[vm]`),
    /// for a warning once logging is up.
    #[serde(skip)]
    pub deprecated: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(kuasar_api::DEFAULT_VMM_SOCKET),
            grpc_socket: PathBuf::from("/run/kuasar/vmm-grpc.sock"),
            containerd_ttrpc_address: "/run/containerd/containerd.sock.ttrpc".into(),
            state_dir: PathBuf::from("/run/kuasar/vmm"),
            image_dir: PathBuf::from("/var/lib/kuasar"),
            kernel: PathBuf::from(KERNEL_FILE),
            log_level: "info".into(),
            vm: VmConfig::default(),
            qemu: QemuConfig::default(),
            sizing: SizingConfig::default(),
            metrics: MetricsConfig::default(),
            pool: PoolConfig::default(),
            deprecated: Vec::new(),
        }
    }
}

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    /// KVM where it really boots a guest, TCG otherwise.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// The host<->guest channel the agent is reached over.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// vsock where the host has /dev/vhost-vsock, virtio-serial otherwise.
    #[default]
    Auto,
    Vsock,
    Serial,
}

/// How each VM's shared directory (the containers' root filesystems and
/// volumes) reaches its guest.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
pub enum SharedDir {
    /// virtio-fs, served by a virtiofsd of the VM's own (in its own
    /// sandbox, outside QEMU): QEMU then needs no capability at all.
    #[default]
    #[serde(rename = "virtio-fs")]
    VirtioFs,
    /// virtio-9p, served by QEMU itself: a confined QEMU keeps the file
    /// capabilities 9p needs (docs/operations.md).
    #[serde(rename = "9p")]
    NineP,
}

/// The VMs, whatever the hypervisor runs them.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct VmConfig {
    /// vCPUs of a VM whose pod sets no CPU limit (and the least any gets).
    pub vcpus: u32,
    /// Memory of a VM whose pod sets no memory limit (and the least any
    /// gets), MiB.
    pub memory_mib: u32,
    /// How long a guest may take from the VMM's spawn to the agent answering.
    pub boot_timeout_secs: u64,
    /// How long one call to a booted guest's agent may take (every call but
    /// the waits for a process, which are re-asked in rounds).
    pub call_timeout_secs: u64,
    /// Appended to the guest kernel's command line.
    pub kernel_params: String,
    /// What the VMM itself may use besides the guest's memory, MiB: added
    /// to the VM's memory for the limit of its cgroup below the pod's
    /// cgroup parent (docs/operations.md, "Accounting").
    pub vmm_overhead_mib: u64,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            vcpus: 1,
            memory_mib: 256,
            boot_timeout_secs: 30,
            call_timeout_secs: 30,
            kernel_params: String::new(),
            vmm_overhead_mib: 128,
        }
    }
}

/// The pool of booted, agent-ready VMs a pod takes instead of booting one
/// (docs/configuration.md, "Warm start").
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// How many ready VMs are kept; 0 turns the pool off.
    pub size: u32,
    /// vCPUs of a pooled VM; 0 is `[vm] vcpus`. A pod sized for more boots
    /// a VM of its own.
    pub vcpus: u32,
    /// Memory of a pooled VM, MiB; 0 is `[vm] memory_mib`.
    pub memory_mib: u32,
    /// How many pooled VMs boot at once while the pool refills.
    pub refill_concurrency: u32,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            size: 0,
            vcpus: 0,
            memory_mib: 0,
            refill_concurrency: 1,
        }
    }
}

impl Config {
    /// The size of a pooled VM: `[pool]`'s, or the default VM's.
    pub fn pool_vm(&self) -> (u32, u32) {
        let p = &self.pool;
        let vcpus = if p.vcpus == 0 { self.vm.vcpus } else { p.vcpus };
        let memory = if p.memory_mib == 0 {
            self.vm.memory_mib
        } else {
            p.memory_mib
        };
        (vcpus, memory)
    }

    /// `[pool]`: bounded, and its VMs no smaller than the default VM (which
    /// every pod gets at least, so a smaller pooled VM would never fit).
    fn validate_pool(&self) -> Result<(), ConfigError> {
        let p = &self.pool;
        if p.size > 64 {
            return Err(invalid("pool.size", "must be at most 64"));
        }
        if !(1..=16).contains(&p.refill_concurrency) {
            return Err(invalid(
                "pool.refill_concurrency",
                "must be between 1 and 16",
            ));
        }
        if p.vcpus > 64 || (p.vcpus != 0 && p.vcpus < self.vm.vcpus) {
            return Err(invalid(
                "pool.vcpus",
                "must be 0 (the default VM's) or between `vm.vcpus` and 64",
            ));
        }
        if p.memory_mib > 65536 || (p.memory_mib != 0 && p.memory_mib < self.vm.memory_mib) {
            return Err(invalid(
                "pool.memory_mib",
                "must be 0 (the default VM's) or between `vm.memory_mib` and 65536",
            ));
        }
        Ok(())
    }
}

/// QEMU: its binary and how it runs the VMs.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct QemuConfig {
    pub binary: PathBuf,
    pub accelerator: Accelerator,
    pub channel: Channel,
    /// Host TSC frequency given to the guest (`tsc_early_khz`) under TCG;
    /// 0 reads it from the host.
    pub tsc_khz: u64,
    /// QEMU's own seccomp filter (`-sandbox on`, with obsolete system
    /// calls, privilege changes, process spawning and resource control
    /// denied): QEMU parses the untrusted guest's device traffic. Off only
    /// for a QEMU built without seccomp support.
    pub seccomp: bool,
    /// Under TCG (no KVM), the size of QEMU's translation cache, MiB. Too
    /// small a cache is flushed and refilled at every process the guest
    /// starts: at 16 MiB each container create, start or exec cost
    /// 50-200 ms of re-translation; 32 MiB makes them 10-30 ms for ~18 MB
    /// more per VM (docs/configuration.md).
    pub tcg_cache_mib: u32,
    /// QEMU confined (docs/operations.md, "Trust boundaries"): a mount
    /// namespace holding only its sandbox's files, a uid of its own, of
    /// root's capabilities only the file ones its 9p share needs. Off only
    /// to measure what confinement costs.
    pub confine: bool,
    /// The first of the uids QEMUs run as, one per VM (the gid is the same
    /// number); no /etc/passwd entry is needed.
    pub uid_base: u32,
    /// How many uids from `uid_base` on (the most VMs at once).
    pub uid_count: u32,
    /// How the shared directory reaches the guest: `"virtio-fs"` (the
    /// default) or `"9p"`.
    pub share: SharedDir,
    /// virtiofsd for `share = "virtio-fs"`: a file name inside `image_dir`
    /// (`virtiofsd`, which `make guest` builds) or an absolute path.
    pub virtiofsd: PathBuf,
    // Keys of before `[vm]`, still read into it (see [`Config::parse`]);
    // always None after it.
    pub(crate) vcpus: Option<u32>,
    pub(crate) memory_mib: Option<u32>,
    pub(crate) boot_timeout_secs: Option<u64>,
    pub(crate) call_timeout_secs: Option<u64>,
    pub(crate) kernel_params: Option<String>,
}

/// `[qemu] uid_base`'s default: 0x70000000, above the ranges systemd and
/// container tools hand out (systemd's "unused" range, docs/UIDS-GIDS).
pub const DEFAULT_UID_BASE: u32 = 0x7000_0000;

impl Default for QemuConfig {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            accelerator: Accelerator::Auto,
            channel: Channel::Auto,
            tsc_khz: 0,
            seccomp: true,
            tcg_cache_mib: 32,
            confine: true,
            uid_base: DEFAULT_UID_BASE,
            uid_count: 65536,
            share: SharedDir::VirtioFs,
            virtiofsd: PathBuf::from(VIRTIOFSD_FILE),
            vcpus: None,
            memory_mib: None,
            boot_timeout_secs: None,
            call_timeout_secs: None,
            kernel_params: None,
        }
    }
}

/// How a pod's VM is sized from its resources (CRI's sandbox annotations):
/// memory = the pod's memory limit + `memory_overhead_mib`, vCPUs =
/// ceil(CPU quota / period) + `vcpu_overhead`, never below `vm.memory_mib`
/// and `vm.vcpus`, which a pod without limits gets.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct SizingConfig {
    /// What the guest kernel, the agent and crun use besides the containers
    /// (measured: ~100 MiB of a 256 MiB guest is in use or kept by the kernel).
    pub memory_overhead_mib: u64,
    /// What grows with the VM's memory (the kernel's page structures and
    /// reserves: measured ~3-4%), as a percentage of the pod's memory limit.
    pub memory_overhead_percent: u32,
    pub vcpu_overhead: u32,
}

impl Default for SizingConfig {
    fn default() -> Self {
        Self {
            memory_overhead_mib: 128,
            memory_overhead_percent: 4,
            vcpu_overhead: 0,
        }
    }
}

/// The optional Prometheus endpoint (docs/operations.md, Metrics).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// `IP:port` where `GET /metrics` is served over HTTP (such as
    /// `127.0.0.1:9464`); empty (the default): no endpoint.
    pub address: String,
}

impl MetricsConfig {
    /// Whether an endpoint is configured (its address is checked by
    /// [`Config::validate`]).
    pub fn is_enabled(&self) -> bool {
        !self.address.is_empty()
    }

    /// The endpoint's address: None when it is off, an error naming
    /// `metrics.address` when it is not an `IP:port` with a port.
    pub fn socket_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.address.is_empty() {
            return Ok(None);
        }
        let invalid = |reason: &str| invalid("metrics.address", reason);
        let addr: SocketAddr = self.address.parse().map_err(|_| {
            invalid("must be an IP address and a port, such as \"127.0.0.1:9464\" or \"[::1]:9464\" (empty: no endpoint)")
        })?;
        if addr.port() == 0 {
            return Err(invalid("must name a port other than 0"));
        }
        Ok(Some(addr))
    }
}

/// The error for a `field` whose value breaks its rule (`reason`).
fn invalid(field: &'static str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.to_owned(),
    }
}

impl Config {
    /// Reads `path` (or takes the defaults when there is none) and validates it.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let config = match path {
            None => Config::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Self::parse(&text).map_err(|e| match e {
                    ConfigError::Syntax(source) => ConfigError::Parse {
                        path: path.to_owned(),
                        source,
                    },
                    e => e,
                })?
            }
        };
        config.validate()?;
        Ok(config)
    }

    /// Parses a configuration file's text. The `[qemu]` keys that moved to
    /// `[vm]` (vcpus, memory_mib, boot_timeout_secs, call_timeout_secs,
    /// kernel_params) are still read, into `[vm]`, and noted in
    /// `deprecated`; set in both places, they are refused.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(Box::new)?;
        config.move_legacy_keys()?;
        Ok(config)
    }

    /// Moves `[qemu]` keys of before `[vm]` into `[vm]`.
    fn move_legacy_keys(&mut self) -> Result<(), ConfigError> {
        let q = &mut self.qemu;
        let (vcpus, memory_mib, boot_timeout_secs, call_timeout_secs, kernel_params) = (
            q.vcpus.take(),
            q.memory_mib.take(),
            q.boot_timeout_secs.take(),
            q.call_timeout_secs.take(),
            q.kernel_params.take(),
        );
        let defaults = VmConfig::default();
        let mut moved = |key: &'static str, set_in_vm: bool| {
            if set_in_vm {
                return Err(ConfigError::Invalid {
                    field: key,
                    reason: "is set in both [qemu] (its old place) and [vm]: keep the [vm] one"
                        .into(),
                });
            }
            self.deprecated.push(format!(
                "`qemu.{key}` has moved to `vm.{key}`; it is read from [qemu] for now"
            ));
            Ok(())
        };
        if let Some(v) = vcpus {
            moved("vcpus", self.vm.vcpus != defaults.vcpus)?;
            self.vm.vcpus = v;
        }
        if let Some(v) = memory_mib {
            moved("memory_mib", self.vm.memory_mib != defaults.memory_mib)?;
            self.vm.memory_mib = v;
        }
        if let Some(v) = boot_timeout_secs {
            moved(
                "boot_timeout_secs",
                self.vm.boot_timeout_secs != defaults.boot_timeout_secs,
            )?;
            self.vm.boot_timeout_secs = v;
        }
        if let Some(v) = call_timeout_secs {
            moved(
                "call_timeout_secs",
                self.vm.call_timeout_secs != defaults.call_timeout_secs,
            )?;
            self.vm.call_timeout_secs = v;
        }
        if let Some(v) = kernel_params {
            moved(
                "kernel_params",
                self.vm.kernel_params != defaults.kernel_params,
            )?;
            self.vm.kernel_params = v;
        }
        Ok(())
    }

    /// The guest kernel: `kernel` inside `image_dir`, or `kernel` itself
    /// when it is an absolute path.
    pub fn kernel_path(&self) -> PathBuf {
        if self.kernel.is_absolute() {
            self.kernel.clone()
        } else {
            self.image_dir.join(&self.kernel)
        }
    }

    /// virtiofsd: `[qemu] virtiofsd` inside `image_dir`, or itself when
    /// it is an absolute path.
    pub fn virtiofsd_path(&self) -> PathBuf {
        self.image_dir.join(&self.qemu.virtiofsd)
    }

    pub fn initrd_path(&self) -> PathBuf {
        self.image_dir.join(INITRD_FILE)
    }

    /// Checks values and the files every sandbox needs.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_values()?;
        self.check_files()
    }

    /// Checks the values alone, touching no file (what the fuzz target
    /// drives after [`Config::parse`]).
    pub fn validate_values(&self) -> Result<(), ConfigError> {
        self.validate_paths()?;
        self.validate_vm()?;
        self.validate_pool()?;
        if log_filter(&self.log_level).is_none() {
            return Err(invalid(
                "log_level",
                "is not a valid log filter (printable ASCII without spaces, at most 1024 bytes)",
            ));
        }
        self.metrics.socket_addr()?;
        Ok(())
    }

    /// The sockets, the containerd address, the kernel and the state
    /// directory: paths of the right kind and length.
    fn validate_paths(&self) -> Result<(), ConfigError> {
        // sockaddr_un holds 108 bytes including the terminating NUL.
        if self.socket.as_os_str().len() >= 108 || !self.socket.is_absolute() {
            return Err(invalid(
                "socket",
                "must be an absolute path shorter than 108 bytes",
            ));
        }
        if self.grpc_socket.as_os_str().len() >= 108 || !self.grpc_socket.is_absolute() {
            return Err(invalid(
                "grpc_socket",
                "must be an absolute path shorter than 108 bytes",
            ));
        }
        if self.grpc_socket == self.socket {
            return Err(invalid("grpc_socket", "must differ from `socket`"));
        }
        let ttrpc = self
            .containerd_ttrpc_address
            .strip_prefix("unix://")
            .unwrap_or(&self.containerd_ttrpc_address);
        if !ttrpc.starts_with('/') || ttrpc.len() >= 108 {
            return Err(invalid(
                "containerd_ttrpc_address",
                "must be an absolute socket path (optionally unix://) shorter than 108 bytes",
            ));
        }
        if !image_file_setting_is_valid(&self.kernel) {
            return Err(invalid(
                "kernel",
                "must be a file name inside `image_dir` (such as \"vmlinux\" or \"vmlinux-debian\") or an absolute path",
            ));
        }
        if !image_file_setting_is_valid(&self.qemu.virtiofsd) {
            return Err(invalid(
                "qemu.virtiofsd",
                "must be a file name inside `image_dir` (such as \"virtiofsd\") or an absolute path",
            ));
        }
        if !self.state_dir.is_absolute() {
            return Err(invalid("state_dir", "must be an absolute path"));
        }
        // Per-sandbox sockets live in state_dir/<id>/: leave room for the id.
        if self.state_dir.as_os_str().len() > 40 {
            return Err(invalid(
                "state_dir",
                "must be at most 40 bytes long (sandbox sockets live under it)",
            ));
        }
        Ok(())
    }

    /// The VM's default size, the sizing overheads and the timeouts: within
    /// their bounds.
    fn validate_vm(&self) -> Result<(), ConfigError> {
        if !(1..=64).contains(&self.vm.vcpus) {
            return Err(invalid("vm.vcpus", "must be between 1 and 64"));
        }
        if !(64..=65536).contains(&self.vm.memory_mib) {
            return Err(invalid("vm.memory_mib", "must be between 64 and 65536"));
        }
        if self.sizing.memory_overhead_mib > 65536 {
            return Err(invalid(
                "sizing.memory_overhead_mib",
                "must be at most 65536",
            ));
        }
        if self.sizing.memory_overhead_percent > 100 {
            return Err(invalid(
                "sizing.memory_overhead_percent",
                "must be at most 100",
            ));
        }
        if self.sizing.vcpu_overhead > 64 {
            return Err(invalid("sizing.vcpu_overhead", "must be at most 64"));
        }
        let uids = u64::from(self.qemu.uid_base) + u64::from(self.qemu.uid_count);
        if self.qemu.uid_base == 0 || self.qemu.uid_count == 0 || uids > u64::from(u32::MAX) {
            return Err(invalid(
                "qemu.uid_base",
                "uid_base and uid_count must be non-zero, and uid_base + uid_count below 4294967295",
            ));
        }
        if !(8..=2048).contains(&self.qemu.tcg_cache_mib) {
            return Err(invalid("qemu.tcg_cache_mib", "must be between 8 and 2048"));
        }
        if !(1..=600).contains(&self.vm.boot_timeout_secs) {
            return Err(invalid("vm.boot_timeout_secs", "must be between 1 and 600"));
        }
        if !(1..=600).contains(&self.vm.call_timeout_secs) {
            return Err(invalid("vm.call_timeout_secs", "must be between 1 and 600"));
        }
        Ok(())
    }

    /// Checks that the hypervisor binary and the guest image exist; run at
    /// start-up and again before each VM is created.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        for (what, path) in [
            ("QEMU binary", self.qemu.binary.clone()),
            ("guest kernel", self.kernel_path()),
            ("guest initramfs", self.initrd_path()),
        ] {
            if !path.is_file() {
                return Err(ConfigError::Missing { what, path });
            }
        }
        let virtiofsd = self.virtiofsd_path();
        if self.qemu.share == SharedDir::VirtioFs && !virtiofsd.is_file() {
            return Err(ConfigError::Missing {
                what: "virtiofsd (built by `make guest`; or set `[qemu] share = \"9p\"`)",
                path: virtiofsd,
            });
        }
        Ok(())
    }
}

/// A setting naming a file of the guest image (`kernel`, `[qemu]
/// virtiofsd`): an absolute path, or one plain file name (no directory, not
/// `.` or `..`), which then lives in `image_dir`.
fn image_file_setting_is_valid(file: &Path) -> bool {
    use std::path::Component;
    if file.as_os_str().is_empty() || file.as_os_str().len() > 4096 {
        return false;
    }
    if file.is_absolute() {
        return file
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    }
    let mut components = file.components();
    matches!(
        (components.next(), components.next()),
        (Some(Component::Normal(_)), None)
    ) && !file.as_os_str().as_encoded_bytes().contains(&b'/')
}

/// Longest log filter accepted (`log_level`, `KUASAR_LOG`).
const MAX_LOG_FILTER: usize = 1024;

/// Parses a tracing filter (`log_level`, `KUASAR_LOG`), `None` when invalid.
/// Both limits were found by fuzz/fuzz_targets/config.rs:
/// - only printable ASCII without spaces reaches tracing-subscriber: its
///   directive parser (0.3.23) indexes the untrimmed text with offsets of the
///   trimmed one and panics on a directive such as `" [\u{e9}]"`;
/// - field values (`[span{field=value}]`) match literally, not as regexes:
///   compiling a crafted one into a DFA takes seconds to minutes.
pub fn log_filter(text: &str) -> Option<tracing_subscriber::EnvFilter> {
    if text.len() > MAX_LOG_FILTER || !text.bytes().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    tracing_subscriber::EnvFilter::builder()
        .with_regex(false)
        .parse(text)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn log_filters_that_panic_tracing_are_refused() {
        // The fuzz target's crash, reduced: a directive with leading
        // whitespace and a multi-byte character panicked in validate().
        for text in [
            " [\u{e9}]",
            "info,\t[\u{1e373}]",
            "info, debug",
            "d\u{e9}bug",
        ] {
            assert!(log_filter(text).is_none(), "{text:?}");
            let c = Config {
                log_level: text.to_owned(),
                ..Config::default()
            };
            assert!(matches!(
                c.validate_values(),
                Err(ConfigError::Invalid {
                    field: "log_level",
                    ..
                })
            ));
        }
        assert!(log_filter(&"a".repeat(MAX_LOG_FILTER + 1)).is_none());
        // The fuzz target's timeout: as a regex, this field value took over
        // 10 s to compile; as a literal it parses at once.
        let slow = r#",,2,hnc,[i7c={m)oRRRRRRRSSSsd=0o~~~~~~~~~~~~~~~.......................................................................;0kSS}r`tate_^^^dirinevd_tk$,,,0,,i="#;
        let started = std::time::Instant::now();
        let _ = log_filter(slow);
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        for text in [
            "",
            "info",
            "info,kuasar_vmm=debug",
            "warn,[sandbox{id=x}]=trace",
        ] {
            assert!(log_filter(text).is_some(), "{text:?}");
        }
    }

    #[test]
    fn value_checks_touch_no_file() {
        let mut c = Config::parse("image_dir = \"/nonexistent-kuasar-image\"").unwrap();
        c.validate_values().unwrap();
        assert!(matches!(c.validate(), Err(ConfigError::Missing { .. })));
        c.vm.vcpus = 0;
        assert!(matches!(
            c.validate_values(),
            Err(ConfigError::Invalid {
                field: "vm.vcpus",
                ..
            })
        ));
    }

    #[test]
    fn unknown_key_is_rejected() {
        let err = Config::parse("sockett = \"/x\"").unwrap_err();
        assert!(err.to_string().contains("sockett"), "{err}");
    }

    #[test]
    fn vm_keys_of_the_qemu_section_are_still_read_and_noted() {
        let c = Config::parse("[qemu]\nvcpus = 2\nboot_timeout_secs = 9\nseccomp = false").unwrap();
        assert_eq!((c.vm.vcpus, c.vm.boot_timeout_secs), (2, 9));
        assert!(!c.qemu.seccomp);
        assert_eq!(
            c.qemu,
            Config::parse("[qemu]\nseccomp = false").unwrap().qemu
        );
        assert_eq!(c.deprecated.len(), 2, "{:?}", c.deprecated);
        assert!(c.deprecated[0].contains("`vm.vcpus`"), "{:?}", c.deprecated);

        let c = Config::parse("[vm]\nvcpus = 2\nkernel_params = \"x\"").unwrap();
        assert_eq!((c.vm.vcpus, c.vm.kernel_params.as_str()), (2, "x"));
        assert!(c.deprecated.is_empty());

        let err = Config::parse("[vm]\nvcpus = 2\n[qemu]\nvcpus = 3").unwrap_err();
        assert!(err.to_string().contains("`vcpus`"), "{err}");
        assert!(err.to_string().contains("both [qemu]"), "{err}");
    }

    #[test]
    fn unknown_accelerator_is_rejected() {
        let err = Config::parse("[qemu]\naccelerator = \"hvf\"").unwrap_err();
        assert!(err.to_string().contains("hvf"), "{err}");
    }

    #[test]
    fn grpc_fields_are_checked() {
        let c = Config::parse(
            "grpc_socket = \"/r/g.sock\"\ncontainerd_ttrpc_address = \"unix:///r/c.sock.ttrpc\"",
        )
        .unwrap();
        assert_eq!(c.grpc_socket, PathBuf::from("/r/g.sock"));
        let c = Config {
            grpc_socket: Config::default().socket,
            ..Config::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("grpc_socket"), "{err}");
        let c = Config {
            containerd_ttrpc_address: "containerd.sock.ttrpc".into(),
            ..Config::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("containerd_ttrpc_address"), "{err}");
    }

    #[test]
    fn channel_values() {
        let c = Config::parse("[qemu]\nchannel = \"serial\"").unwrap();
        assert_eq!(c.qemu.channel, Channel::Serial);
        assert!(Config::parse("[qemu]\nchannel = \"pipe\"").is_err());
    }

    #[test]
    fn bad_values_name_the_field() {
        let mut c = Config::default();
        c.vm.vcpus = 0;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("vm.vcpus"), "{err}");
        let c = Config {
            socket: PathBuf::from("relative.sock"),
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("socket"));
    }

    #[test]
    fn sizing_section() {
        let c = Config::parse("[sizing]\nmemory_overhead_mib = 96\nvcpu_overhead = 1").unwrap();
        assert_eq!(c.sizing.memory_overhead_mib, 96);
        assert_eq!(c.sizing.vcpu_overhead, 1);
        assert!(Config::parse("[sizing]\nmemory_overhead = 96").is_err());
        let mut c = Config::default();
        c.sizing.vcpu_overhead = 100;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("sizing.vcpu_overhead"), "{err}");
    }

    #[test]
    fn metrics_address_is_off_by_default_and_checked() {
        let c = Config::default();
        assert_eq!(c.metrics.socket_addr().unwrap(), None);
        let c = Config::parse("[metrics]\naddress = \"\"").unwrap();
        assert_eq!(c.metrics.socket_addr().unwrap(), None);
        let c = Config::parse("[metrics]\naddress = \"127.0.0.1:9464\"").unwrap();
        c.validate_values().unwrap();
        assert_eq!(
            c.metrics.socket_addr().unwrap(),
            Some("127.0.0.1:9464".parse().unwrap())
        );
        let c = Config::parse("[metrics]\naddress = \"[::1]:9464\"").unwrap();
        assert!(c.metrics.socket_addr().unwrap().unwrap().is_ipv6());
        for bad in [
            "localhost:9464",
            "127.0.0.1",
            "127.0.0.1:0",
            ":9464",
            "127.0.0.1:99999",
            " 127.0.0.1:9464",
        ] {
            let c = Config {
                metrics: MetricsConfig {
                    address: bad.into(),
                },
                ..Config::default()
            };
            let err = c.validate_values().unwrap_err().to_string();
            assert!(err.contains("`metrics.address`"), "{bad:?}: {err}");
        }
        let err = Config::parse("[metrics]\nport = 9464").unwrap_err();
        assert!(err.to_string().contains("port"), "{err}");
    }

    #[test]
    fn the_pool_is_off_by_default_and_its_vms_fit_the_default_pod() {
        let c = Config::default();
        assert_eq!(c.pool.size, 0);
        assert_eq!(c.pool_vm(), (c.vm.vcpus, c.vm.memory_mib));
        let c = Config::parse("[pool]\nsize = 3\nmemory_mib = 512").unwrap();
        c.validate_values().unwrap();
        assert_eq!(c.pool_vm(), (1, 512));
        for (bad, field) in [
            ("size = 65", "pool.size"),
            ("refill_concurrency = 0", "pool.refill_concurrency"),
            ("memory_mib = 128", "pool.memory_mib"),
            ("vcpus = 65", "pool.vcpus"),
        ] {
            let c = Config::parse(&format!("[pool]\n{bad}")).unwrap();
            let err = c.validate_values().unwrap_err().to_string();
            assert!(err.contains(field), "{bad}: {err}");
        }
        assert!(Config::parse("[pool]\nwarm = 1").is_err());
    }

    #[test]
    fn kernel_is_a_file_of_the_image_or_an_absolute_path() {
        let c = Config::parse("image_dir = \"/img\"").unwrap();
        assert_eq!(c.kernel_path(), PathBuf::from("/img/vmlinux"));
        let c = Config::parse("image_dir = \"/img\"\nkernel = \"vmlinux-debian\"").unwrap();
        c.validate_values().unwrap();
        assert_eq!(c.kernel_path(), PathBuf::from("/img/vmlinux-debian"));
        let c = Config::parse("kernel = \"/opt/k/vmlinux\"").unwrap();
        c.validate_values().unwrap();
        assert_eq!(c.kernel_path(), PathBuf::from("/opt/k/vmlinux"));
        for bad in [
            "",
            "k/vmlinux",
            "..",
            ".",
            "../vmlinux",
            "vmlinux/",
            "/opt/../k",
        ] {
            let c = Config {
                kernel: PathBuf::from(bad),
                ..Config::default()
            };
            let err = c.validate_values().unwrap_err().to_string();
            assert!(err.contains("`kernel`"), "{bad:?}: {err}");
        }
        assert!(Config::parse("kernel = 3").is_err());
    }

    #[test]
    fn a_missing_fallback_kernel_names_its_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinux"), b"").unwrap();
        std::fs::write(dir.path().join("initramfs.cpio"), b"").unwrap();
        let mut c = Config {
            image_dir: dir.path().to_owned(),
            kernel: PathBuf::from(DEBIAN_KERNEL_FILE),
            ..Config::default()
        };
        c.qemu.binary = PathBuf::from("/bin/sh");
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains(&dir.path().join("vmlinux-debian").display().to_string()),
            "{err}"
        );
        c.kernel = PathBuf::from(KERNEL_FILE);
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains(&dir.path().join("virtiofsd").display().to_string()),
            "{err}"
        );
        c.qemu.share = SharedDir::NineP;
        c.validate().unwrap();
        c.qemu.share = SharedDir::VirtioFs;
        c.qemu.virtiofsd = PathBuf::from("/bin/true");
        c.validate().unwrap();
    }

    #[test]
    fn the_share_is_virtio_fs_or_9p() {
        let c = Config::parse("[qemu]\nshare = \"9p\"\nvirtiofsd = \"/opt/v\"").unwrap();
        assert_eq!(c.qemu.share, SharedDir::NineP);
        assert_eq!(c.virtiofsd_path(), PathBuf::from("/opt/v"));
        assert_eq!(Config::default().qemu.share, SharedDir::VirtioFs);
        assert!(Config::parse("[qemu]\nshare = \"nfs\"").is_err());
        let bad = Config::parse("[qemu]\nvirtiofsd = \"../v\"").unwrap();
        let err = bad.validate_values().unwrap_err().to_string();
        assert!(err.contains("qemu.virtiofsd"), "{err}");
    }

    #[test]
    fn missing_image_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config {
            image_dir: dir.path().to_owned(),
            ..Config::default()
        };
        c.qemu.binary = PathBuf::from("/bin/sh");
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains(&dir.path().join("vmlinux").display().to_string()),
            "{err}"
        );
    }
}
