//! Containers: bundles, spec rewriting, exec bookkeeping and cgroup reading.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use kuasar_api::ids::{self, IdError};
use kuasar_api::resources::{self, ResourcesError};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::pod::PodAdditions;
use crate::process::Process;

/// Checks a container or exec id with the agent's rules
/// ([`ids::Boundary::Agent`]): non-empty, at most
/// [`ids::AGENT_MAX_LEN`] bytes, no '/' or NUL, not '.' or '..'.
pub fn validate_id(kind: &str, id: &str) -> Result<()> {
    ids::check(ids::Boundary::Agent, id).map_err(|e| {
        let why = match e {
            IdError::Empty => "empty",
            IdError::TooLong { .. } => "too long",
            IdError::DotName | IdError::DotDot => "reserved name",
            IdError::BadChar(_) => "contains '/' or NUL",
        };
        Error::InvalidArgument(format!("invalid {kind} id {id:?}: {why}"))
    })
}

fn parse_object(what: &str, json: &[u8]) -> Result<serde_json::Map<String, Value>> {
    match serde_json::from_slice::<Value>(json) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Error::InvalidArgument(format!(
            "{what} is not a JSON object"
        ))),
        Err(e) => Err(Error::InvalidArgument(format!(
            "{what} is not valid JSON: {e}"
        ))),
    }
}

/// The OCI spec version crun 1.8 accepts.
const CRUN_OCI_VERSION: &str = "1.0.2";

/// A container's OCI spec as the host sent it: a JSON object. Parsed once
/// per create; [`rewrite_parsed`] then makes it fit the guest.
pub fn parse_spec(spec_json: &[u8]) -> Result<serde_json::Map<String, Value>> {
    parse_object("spec", spec_json)
}

/// [`parse_spec`], then [`rewrite_parsed`] (for the tests).
#[cfg(test)]
fn rewrite_spec(
    spec_json: &[u8],
    rootfs: &str,
    terminal: bool,
    pod: &PodAdditions,
) -> Result<Vec<u8>> {
    rewrite_parsed(parse_spec(spec_json)?, rootfs, terminal, pod)
}

/// Rewrites a container's OCI spec: `root.path` = `rootfs` (keeping
/// `root.readonly`), `process.terminal` = `terminal`, a 1.x `ociVersion`
/// that crun 1.8 accepts, and what the pod adds (`pod`); returns the
/// `config.json` to write.
pub fn rewrite_parsed(
    mut spec: serde_json::Map<String, Value>,
    rootfs: &str,
    terminal: bool,
    pod: &PodAdditions,
) -> Result<Vec<u8>> {
    if !rootfs.starts_with('/') || rootfs.split('/').any(|c| c == "..") {
        return Err(Error::InvalidArgument(format!(
            "rootfs path {rootfs:?} must be absolute, without '..'"
        )));
    }
    let readonly = spec
        .get("root")
        .and_then(|r| r.get("readonly"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    spec.insert(
        "root".into(),
        json!({ "path": rootfs, "readonly": readonly }),
    );
    match spec.get_mut("process") {
        Some(Value::Object(process)) => {
            process.insert("terminal".into(), Value::Bool(terminal));
        }
        _ => return Err(Error::InvalidArgument("spec has no process object".into())),
    }
    drop_network_namespace(&mut spec);
    fit_devices(&mut spec, guest_device);
    pod.apply(&mut spec);
    // crun 1.8 (Debian 12) refuses any ociVersion without "1.0" in it, while
    // containerd 2.x writes "1.2.1". The field selects nothing in crun: name
    // the last version it accepts. Other major versions stay refused.
    match spec.get("ociVersion").and_then(Value::as_str) {
        Some(v) if v.starts_with("1.") && !v.contains("1.0") => {
            spec.insert("ociVersion".into(), Value::String(CRUN_OCI_VERSION.into()));
        }
        _ => {}
    }
    serde_json::to_vec_pretty(&Value::Object(spec))
        .map_err(|e| Error::Internal(format!("serialize spec: {e}")))
}

/// A device node: its type (`c` or `b`), major and minor.
pub type DeviceNode = (char, i64, i64);

/// The guest's device node at `path`, if there is one.
fn guest_device(path: &str) -> Option<DeviceNode> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = std::fs::metadata(path).ok()?;
    let kind = if meta.file_type().is_char_device() {
        'c'
    } else if meta.file_type().is_block_device() {
        'b'
    } else {
        return None;
    };
    let rdev = meta.rdev();
    Some((
        kind,
        nix::sys::stat::major(rdev) as i64,
        nix::sys::stat::minor(rdev) as i64,
    ))
}

/// Fits the spec's devices (`linux.devices`) to the guest: they name the
/// host's device nodes (a privileged container gets all of them), which
/// mean nothing in the VM, or another device. Each one the guest has too
/// (same path, same type: /dev/fuse, /dev/net/tun, ...) takes the guest's
/// numbers, in the device cgroup's rules as well; the others are dropped.
/// A privileged container thus sees the VM's devices, not the node's.
fn fit_devices(
    spec: &mut serde_json::Map<String, Value>,
    lookup: impl Fn(&str) -> Option<DeviceNode>,
) {
    let Some(linux) = spec.get_mut("linux").and_then(Value::as_object_mut) else {
        return;
    };
    let Some(Value::Array(devices)) = linux.get_mut("devices") else {
        return;
    };
    let mut renumbered: Vec<(DeviceNode, DeviceNode)> = Vec::new();
    devices.retain_mut(|d| {
        let path = d.get("path").and_then(Value::as_str).unwrap_or("");
        let kind = d.get("type").and_then(Value::as_str).unwrap_or("");
        let host = (
            kind.chars().next().unwrap_or('?'),
            d.get("major").and_then(Value::as_i64).unwrap_or(-1),
            d.get("minor").and_then(Value::as_i64).unwrap_or(-1),
        );
        // "u" (unbuffered char) is a char device too.
        let want = if kind == "u" { 'c' } else { host.0 };
        match lookup(path) {
            Some(guest) if guest.0 == want => {
                d["major"] = json!(guest.1);
                d["minor"] = json!(guest.2);
                if (host.1, host.2) != (guest.1, guest.2) {
                    renumbered.push((host, guest));
                }
                true
            }
            _ => false,
        }
    });
    if renumbered.is_empty() {
        return;
    }
    let rules = linux
        .get_mut("resources")
        .and_then(|r| r.get_mut("devices"))
        .and_then(Value::as_array_mut);
    for rule in rules.into_iter().flatten() {
        let number = |k: &str| rule.get(k).and_then(Value::as_i64).unwrap_or(-1);
        let kind = rule.get("type").and_then(Value::as_str).unwrap_or("");
        let key = (
            kind.chars().next().unwrap_or('?'),
            number("major"),
            number("minor"),
        );
        if let Some((_, guest)) = renumbered.iter().find(|(host, _)| *host == key) {
            rule["major"] = json!(guest.1);
            rule["minor"] = json!(guest.2);
        }
    }
}

/// Removes the network namespace entry: the containers of a pod share the
/// VM's own network (its NIC holds the pod's address, its loopback is the
/// pod's). The entry's path, when there is one, names the pod's namespace
/// on the host (/var/run/netns/..., /proc/<pid>/ns/net), which means
/// nothing in the guest; without a path it would cut the container off in
/// an empty namespace of its own.
fn drop_network_namespace(spec: &mut serde_json::Map<String, Value>) {
    if let Some(Value::Array(namespaces)) =
        spec.get_mut("linux").and_then(|l| l.get_mut("namespaces"))
    {
        namespaces.retain(|n| n.get("type").and_then(Value::as_str) != Some("network"));
    }
}

/// Rewrites an exec's OCI process: `terminal` = `terminal`; `args` required.
pub fn rewrite_process(process_json: &[u8], terminal: bool) -> Result<Vec<u8>> {
    let mut process = parse_object("process", process_json)?;
    match process.get("args") {
        Some(Value::Array(a)) if !a.is_empty() => {}
        _ => return Err(Error::InvalidArgument("process has no args".into())),
    }
    process.insert("terminal".into(), Value::Bool(terminal));
    serde_json::to_vec(&Value::Object(process))
        .map_err(|e| Error::Internal(format!("serialize process: {e}")))
}

/// Checks an update's OCI LinuxResources (a bounded JSON object, see
/// [`resources::check`]) and returns it re-serialised, as crun will read it.
pub fn check_resources(json: &[u8]) -> Result<Vec<u8>> {
    let resources = resources::check(json).map_err(|e| {
        Error::InvalidArgument(match e {
            ResourcesError::TooLarge { len, max } => {
                format!("resources are {len} bytes, more than {max}")
            }
            ResourcesError::NotJson(e) => format!("resources is not valid JSON: {e}"),
            ResourcesError::NotObject => "resources is not a JSON object".to_owned(),
        })
    })?;
    serde_json::to_vec(&Value::Object(resources))
        .map_err(|e| Error::Internal(format!("serialize resources: {e}")))
}

/// The cgroup v2 directory named by a `/proc/<pid>/cgroup` text.
pub fn parse_cgroup_path(proc_cgroup: &str) -> Option<PathBuf> {
    proc_cgroup.lines().find_map(|l| {
        let rel = l.strip_prefix("0::")?;
        let rel = rel.trim().trim_start_matches('/');
        Some(Path::new("/sys/fs/cgroup").join(rel))
    })
}

/// `usage_usec` of a cgroup's cpu.stat, in nanoseconds.
pub fn parse_cpu_usage_ns(cpu_stat: &str) -> u64 {
    cpu_stat
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|us| us.saturating_mul(1000))
        .unwrap_or(0)
}

/// A single number from a cgroup file; "max" (no limit) and junk give 0.
pub fn parse_u64(text: &str) -> u64 {
    text.trim().parse().unwrap_or(0)
}

/// The pids listed in a cgroup.procs text.
pub fn parse_pids(procs: &str) -> Vec<u32> {
    procs
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The value of `key` in a flat-keyed cgroup file (`key value` lines:
/// cpu.stat, memory.stat, memory.events); 0 when missing.
pub fn parse_keyed(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0)
}

/// Resource usage of a container, from its cgroup (zeros where missing).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub memory_usage_bytes: u64,
    pub memory_limit_bytes: u64,
    pub memory_inactive_file_bytes: u64,
    pub cpu_usage_ns: u64,
    pub cpu_user_ns: u64,
    pub cpu_system_ns: u64,
    pub pids_current: u64,
    pub oom_kills: u64,
}

pub fn read_stats(cgroup: &Path) -> Stats {
    let read = |f: &str| std::fs::read_to_string(cgroup.join(f)).unwrap_or_default();
    let cpu = read("cpu.stat");
    let usec = |key| parse_keyed(&cpu, key).saturating_mul(1000);
    Stats {
        memory_usage_bytes: parse_u64(&read("memory.current")),
        memory_limit_bytes: parse_u64(&read("memory.max")),
        memory_inactive_file_bytes: parse_keyed(&read("memory.stat"), "inactive_file"),
        cpu_usage_ns: parse_cpu_usage_ns(&cpu),
        cpu_user_ns: usec("user_usec"),
        cpu_system_ns: usec("system_usec"),
        pids_current: parse_u64(&read("pids.current")),
        oom_kills: read_oom_kills(cgroup),
    }
}

/// How many processes of the cgroup (and its children) the kernel's OOM
/// killer has killed (memory.events `oom_kill`).
pub fn read_oom_kills(cgroup: &Path) -> u64 {
    let text = std::fs::read_to_string(cgroup.join("memory.events")).unwrap_or_default();
    parse_keyed(&text, "oom_kill")
}

/// An exec slot: reserved while `crun exec` runs, then the process.
type ExecSlot = Option<Arc<Process>>;

/// How many execs a container keeps; beyond that the oldest exited ones are
/// forgotten (the protocol has no call to delete an exec).
pub const MAX_EXECS: usize = 256;

#[derive(Default)]
struct Execs {
    slots: HashMap<String, (u64, ExecSlot)>,
    seq: u64,
}

impl Execs {
    fn insert(&mut self, id: &str, slot: ExecSlot) {
        self.seq += 1;
        self.slots.insert(id.to_string(), (self.seq, slot));
    }

    /// Forgets the oldest exited execs while there are more than `max`.
    fn prune(&mut self, max: usize) {
        if self.slots.len() <= max {
            return;
        }
        let mut exited: Vec<(u64, String)> = self
            .slots
            .iter()
            .filter(|(_, (_, s))| s.as_ref().is_some_and(|p| p.exited().is_some()))
            .map(|(id, (seq, _))| (*seq, id.clone()))
            .collect();
        exited.sort();
        let excess = self.slots.len() - max;
        for (_, id) in exited.into_iter().take(excess) {
            self.slots.remove(&id);
        }
    }
}

pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub init: Arc<Process>,
    /// The init process's cgroup v2 directory, read at creation.
    pub cgroup: Option<PathBuf>,
    /// Who runs it.
    pub runner: Runner,
    execs: Mutex<Execs>,
}

/// Who runs a container.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runner {
    /// The OCI runtime, from the container's spec.
    Runtime,
    /// The pod's PID namespace init stands for the pod's sandbox container
    /// (see [`crate::podns`]): nothing runs in it, and its init is the
    /// namespace's.
    PodInit,
}

impl Container {
    pub fn new(id: &str, bundle: PathBuf, init: Arc<Process>, cgroup: Option<PathBuf>) -> Self {
        Container {
            id: id.to_string(),
            bundle,
            init,
            cgroup,
            runner: Runner::Runtime,
            execs: Mutex::new(Execs::default()),
        }
    }

    /// The pod's sandbox container, for which the pod init `init` stands.
    pub fn pod_init(id: &str, bundle: PathBuf, init: Arc<Process>) -> Self {
        Container {
            runner: Runner::PodInit,
            ..Container::new(id, bundle, init, None)
        }
    }

    fn execs(&self) -> MutexGuard<'_, Execs> {
        self.execs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The process named by `exec_id` (empty: init).
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        match self.execs().slots.get(exec_id) {
            Some((_, Some(p))) => Ok(p.clone()),
            Some((_, None)) => Err(Error::NotFound(format!(
                "exec {exec_id} of container {} is still being created",
                self.id
            ))),
            None => Err(Error::NotFound(format!(
                "exec {exec_id} not found in container {}",
                self.id
            ))),
        }
    }

    /// Reserves an exec id; fails if a live exec holds it. The id of an exec
    /// that has exited can be used again (containerd deletes an exec when it
    /// ends, and the protocol has no call for that).
    pub fn reserve_exec(&self, exec_id: &str) -> Result<()> {
        let mut execs = self.execs();
        let reusable = match execs.slots.get(exec_id) {
            None => true,
            Some((_, Some(p))) => p.exited().is_some(),
            Some((_, None)) => false,
        };
        if !reusable {
            return Err(Error::AlreadyExists(format!(
                "exec {exec_id} already exists in container {}",
                self.id
            )));
        }
        execs.slots.remove(exec_id);
        execs.insert(exec_id, None);
        Ok(())
    }

    /// Fills a reserved exec slot, or frees it when the exec failed.
    pub fn finish_exec(&self, exec_id: &str, process: Option<Arc<Process>>) {
        let mut execs = self.execs();
        match process {
            Some(p) => {
                execs.insert(exec_id, Some(p));
                execs.prune(MAX_EXECS);
            }
            None => {
                execs.slots.remove(exec_id);
            }
        }
    }

    /// Pids in the container's cgroup (or the init pid if that is unknown).
    pub fn pids(&self) -> Vec<u32> {
        if let Some(cg) = &self.cgroup {
            if let Ok(text) = std::fs::read_to_string(cg.join("cgroup.procs")) {
                return parse_pids(&text);
            }
            return Vec::new();
        }
        match self.init.exited() {
            Some(_) => Vec::new(),
            None => vec![self.init.pid as u32],
        }
    }

    pub fn stats(&self) -> Stats {
        self.cgroup.as_deref().map(read_stats).unwrap_or_default()
    }

    /// Whether the kernel's OOM killer has hit the container.
    pub fn oom_killed(&self) -> bool {
        self.cgroup
            .as_deref()
            .is_some_and(|cg| read_oom_kills(cg) > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate_id("container", "c1").is_ok());
        assert!(validate_id("container", "a.b-c_d").is_ok());
        assert!(validate_id("container", "").is_err());
        assert!(validate_id("container", ".").is_err());
        assert!(validate_id("container", "..").is_err());
        assert!(validate_id("container", "a/b").is_err());
        assert!(validate_id("container", "a\0b").is_err());
        assert!(validate_id("exec", &"x".repeat(300)).is_err());
        let e = validate_id("exec", "../x").unwrap_err();
        assert_eq!(e.code(), kuasar_api::ttrpc::Code::INVALID_ARGUMENT);
        // The wording the agent has always used.
        let said = |id: &str| validate_id("exec", id).unwrap_err().to_string();
        assert_eq!(said(""), r#"invalid exec id "": empty"#);
        assert!(said(&"x".repeat(257)).ends_with(": too long"));
        assert_eq!(said(".."), r#"invalid exec id "..": reserved name"#);
        assert_eq!(
            said("a\0b"),
            r#"invalid exec id "a\0b": contains '/' or NUL"#
        );
        assert!(validate_id("exec", &"x".repeat(256)).is_ok());
        assert!(validate_id("exec", "a b=c").is_ok());
    }

    #[test]
    fn spec_rewrite() {
        let spec = br#"{"ociVersion":"1.0.2","process":{"terminal":true,"args":["sh"]},
            "root":{"path":"rootfs","readonly":true},"hostname":"h"}"#;
        let out = rewrite_spec(
            spec,
            "/run/kuasar/shared/c1/rootfs",
            false,
            &PodAdditions::default(),
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["root"]["path"], "/run/kuasar/shared/c1/rootfs");
        assert_eq!(v["root"]["readonly"], true);
        assert_eq!(v["process"]["terminal"], false);
        assert_eq!(v["hostname"], "h");

        let spec = br#"{"ociVersion":"1.2.1","process":{"args":["sh"]}}"#;
        let v: Value = serde_json::from_slice(
            &rewrite_spec(spec, "/r", false, &PodAdditions::default()).unwrap(),
        )
        .unwrap();
        assert_eq!(v["root"]["readonly"], false);
        assert_eq!(v["ociVersion"], "1.0.2");
        let spec = br#"{"ociVersion":"2.0.0","process":{"args":["sh"]}}"#;
        let v: Value = serde_json::from_slice(
            &rewrite_spec(spec, "/r", false, &PodAdditions::default()).unwrap(),
        )
        .unwrap();
        assert_eq!(v["ociVersion"], "2.0.0");

        assert!(rewrite_spec(b"not json", "/r", false, &PodAdditions::default()).is_err());
        assert!(rewrite_spec(b"[1]", "/r", false, &PodAdditions::default()).is_err());
        assert!(rewrite_spec(br#"{"root":{}}"#, "/r", false, &PodAdditions::default()).is_err());
        assert!(rewrite_spec(spec, "relative", false, &PodAdditions::default()).is_err());
        assert!(rewrite_spec(spec, "/a/../b", false, &PodAdditions::default()).is_err());
    }

    #[test]
    fn resources_check() {
        let out = check_resources(br#"{"memory":{"limit":33554432}}"#).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["memory"]["limit"], 33554432);
        assert!(check_resources(b"[]").is_err());
        assert!(check_resources(b"").is_err());
        let big = format!(r#"{{"x":"{}"}}"#, "a".repeat(resources::MAX_JSON));
        assert!(check_resources(big.as_bytes()).is_err());
        // The wording the agent has always used.
        let said = |json: &[u8]| check_resources(json).unwrap_err().to_string();
        assert_eq!(said(b"[]"), "resources is not a JSON object");
        assert!(said(b"").starts_with("resources is not valid JSON: "));
        assert_eq!(
            said(big.as_bytes()),
            format!("resources are {} bytes, more than 65536", big.len())
        );
    }

    #[test]
    fn host_devices_become_the_guests_or_go() {
        let mut spec = match serde_json::json!({"linux": {
            "devices": [
                {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229},
                {"path": "/dev/kvm", "type": "c", "major": 10, "minor": 232},
                {"path": "/dev/vda", "type": "b", "major": 254, "minor": 0},
                {"path": "/dev/ttyS0", "type": "c", "major": 4, "minor": 64},
            ],
            "resources": {"devices": [
                {"allow": false, "access": "rwm"},
                {"allow": true, "type": "b", "major": 254, "minor": 0, "access": "rwm"},
            ]},
        }}) {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        let guest = |p: &str| match p {
            "/dev/fuse" => Some(('c', 10, 229)),
            "/dev/vda" => Some(('b', 253, 0)),
            "/dev/ttyS0" => Some(('b', 4, 64)),
            _ => None,
        };
        fit_devices(&mut spec, guest);
        let devices = &spec["linux"]["devices"];
        let paths: Vec<&str> = devices
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["path"].as_str().unwrap())
            .collect();
        assert_eq!(
            paths,
            ["/dev/fuse", "/dev/vda"],
            "no kvm; a char device is not a block one"
        );
        assert_eq!(devices[1]["major"], 253);
        assert_eq!(spec["linux"]["resources"]["devices"][1]["major"], 253);
        assert_eq!(spec["linux"]["resources"]["devices"][0].get("major"), None);
    }

    #[test]
    fn spec_rewrite_drops_only_the_network_namespace() {
        let spec = br#"{"process":{"args":["sh"]},"linux":{"namespaces":[
            {"type":"pid"},{"type":"network","path":"/var/run/netns/cni-1"},
            {"type":"ipc","path":"/proc/42/ns/ipc"},{"type":"mount"}]}}"#;
        let v: Value = serde_json::from_slice(
            &rewrite_spec(spec, "/r", false, &PodAdditions::default()).unwrap(),
        )
        .unwrap();
        let types: Vec<&str> = v["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["pid", "ipc", "mount"]);
        assert_eq!(v["linux"]["namespaces"][1]["path"], "/proc/42/ns/ipc");
        // A fresh namespace (no path) goes too; no namespaces at all is fine.
        let spec = br#"{"process":{"args":["sh"]},"linux":{"namespaces":[{"type":"network"}]}}"#;
        let v: Value = serde_json::from_slice(
            &rewrite_spec(spec, "/r", false, &PodAdditions::default()).unwrap(),
        )
        .unwrap();
        assert_eq!(v["linux"]["namespaces"], serde_json::json!([]));
        assert!(rewrite_spec(
            br#"{"process":{"args":["sh"]},"linux":{}}"#,
            "/r",
            false,
            &PodAdditions::default()
        )
        .is_ok());
    }

    #[test]
    fn process_rewrite() {
        let out = rewrite_process(br#"{"args":["ls"],"cwd":"/","terminal":true}"#, false).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["terminal"], false);
        assert_eq!(v["args"][0], "ls");
        assert!(rewrite_process(br#"{"args":[]}"#, false).is_err());
        assert!(rewrite_process(b"{", false).is_err());
    }

    #[tokio::test]
    async fn exited_execs_are_pruned_oldest_first() {
        use crate::reaper::ExitInfo;
        use tokio::sync::oneshot;
        let (io, _) = crate::process::make_stdio(false, false, false).unwrap();
        let init = Arc::new(Process::new(1, io, oneshot::channel().1));
        let c = Container::new("c", PathBuf::from("/b"), init, None);
        let mut senders = Vec::new();
        for i in 0..5 {
            let (tx, rx) = oneshot::channel();
            let (io, _) = crate::process::make_stdio(false, false, false).unwrap();
            let id = format!("e{i}");
            c.reserve_exec(&id).unwrap();
            c.finish_exec(&id, Some(Arc::new(Process::new(100 + i, io, rx))));
            senders.push(tx);
        }
        // e0, e1 and e3 exit; e2 and e4 keep running.
        for i in [0, 1, 3] {
            let tx = std::mem::replace(&mut senders[i], oneshot::channel().0);
            tx.send(ExitInfo {
                status: 0,
                at_ns: 0,
            })
            .unwrap();
        }
        tokio::task::yield_now().await;
        while c.process("e3").unwrap().exited().is_none() {
            tokio::task::yield_now().await;
        }
        c.execs().prune(3);
        assert!(c.process("e0").is_err() && c.process("e1").is_err());
        for id in ["e2", "e3", "e4"] {
            assert!(c.process(id).is_ok(), "{id}");
        }
    }

    #[test]
    fn cgroup_files() {
        assert_eq!(
            parse_cgroup_path("0::/default/c1\n"),
            Some(PathBuf::from("/sys/fs/cgroup/default/c1"))
        );
        assert_eq!(
            parse_cgroup_path("0::/\n"),
            Some(PathBuf::from("/sys/fs/cgroup/"))
        );
        assert_eq!(parse_cgroup_path("1:name=systemd:/x\n"), None);
        assert_eq!(
            parse_cpu_usage_ns("usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n"),
            1_500_000
        );
        assert_eq!(parse_cpu_usage_ns(""), 0);
        assert_eq!(parse_u64("max\n"), 0);
        assert_eq!(parse_u64("268435456\n"), 268435456);
        assert_eq!(parse_pids("12\n13\n\n"), vec![12, 13]);
        let events = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(parse_keyed(events, "oom_kill"), 1);
        assert_eq!(parse_keyed(events, "oom"), 2);
        assert_eq!(parse_keyed(events, "nothing"), 0);
        let stat = "anon 4096\nfile 8192\nactive_file 0\ninactive_file 8192\n";
        assert_eq!(parse_keyed(stat, "inactive_file"), 8192);
        assert_eq!(parse_keyed(stat, "file"), 8192);
    }
}
