//! What a sandbox knows of the Kubernetes pod it runs: the network namespace
//! CNI prepared, the host name, and the size its VM must have.
//!
//! In containerd's `podsandbox` mode this comes from the pod's sandbox
//! (pause) container's OCI spec: CRI puts the netns path in
//! `linux.namespaces` and the pod's resources in annotations. In the `shim`
//! sandboxer mode it comes from CreateSandbox (netns path, options).
use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::Value;

use crate::config::{SizingConfig, VmConfig};
use crate::error::{Error, Result};

pub mod runtime_spec;
pub mod settings;

pub use settings::{HostNamespace, PodDns};

/// CRI's annotation naming a container's kind ("sandbox" or "container").
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const CONTAINER_TYPE_SANDBOX: &str = "sandbox";
/// CRI's annotations carrying the pod's resources (podsandbox mode).
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

/// The pod's resources as CRI states them: the sum of its containers'
/// limits (0 = none given).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodResources {
    pub cpu_period: u64,
    pub cpu_quota: i64,
    pub memory_limit_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodConfig {
    /// The network namespace CNI set up; None when the pod has no network
    /// of its own (plain `ctr run`).
    pub netns: Option<PathBuf>,
    pub hostname: String,
    pub resources: PodResources,
    /// The pod's sysctls (namespaced ones only: see `settings`).
    #[serde(default)]
    pub sysctls: BTreeMap<String, String>,
    /// The pod's DNS configuration, when CRI hands it to the runtime (the
    /// `shim` sandboxer modes; in `podsandbox` containerd binds the files).
    #[serde(default)]
    pub dns: Option<PodDns>,
    /// The pod's annotations and cgroup parent, as CRI gives them (the
    /// `shim` sandboxer modes), for the pod's runtime spec (`runtime_spec`).
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub cgroup_parent: String,
}

/// Whether a sandbox container runs the pause program and nothing else
/// (CRI's sandbox image): only then may the agent's pod init, which does
/// what pause does, stand in for it. A sandbox container started by hand
/// (`ctr run --annotation ...container-type=sandbox IMAGE CMD`) runs CMD.
pub fn runs_pause(spec: &Value) -> bool {
    let args = spec
        .pointer("/process/args")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let terminal = spec
        .pointer("/process/terminal")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    match args {
        [program] => {
            !terminal
                && program
                    .as_str()
                    .and_then(|p| p.rsplit('/').next())
                    .is_some_and(|name| name == "pause")
        }
        _ => false,
    }
}

/// Reads the pod's configuration from its sandbox container's OCI spec.
/// Returns None for a spec that is not a CRI sandbox container.
pub fn from_sandbox_spec(spec: &Value) -> Result<Option<PodConfig>> {
    let annotations = spec.get("annotations").and_then(Value::as_object);
    let kind = annotations
        .and_then(|a| a.get(CONTAINER_TYPE))
        .and_then(Value::as_str);
    if kind != Some(CONTAINER_TYPE_SANDBOX) {
        return Ok(None);
    }
    let namespaces = spec
        .pointer("/linux/namespaces")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    HostNamespace::refuse_missing(
        namespaces,
        &[
            HostNamespace::Network,
            HostNamespace::Pid,
            HostNamespace::Ipc,
        ],
    )?;
    let netns = namespaces
        .iter()
        .find(|n| n.get("type").and_then(Value::as_str) == Some("network"))
        .and_then(|n| n.get("path"))
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from);
    let number = |key: &str| -> Option<&str> {
        annotations
            .and_then(|a| a.get(key))
            .and_then(Value::as_str)
            .filter(|v| !v.is_empty())
    };
    let parse_u64 = |key: &str| -> Result<u64> {
        number(key).map_or(Ok(0), |v| {
            v.parse().map_err(|_| {
                Error::InvalidArgument(format!("annotation {key}={v:?} is not a number"))
            })
        })
    };
    let cpu_quota = match number(SANDBOX_CPU_QUOTA) {
        None => 0,
        Some(v) => v.parse().map_err(|_| {
            Error::InvalidArgument(format!(
                "annotation {SANDBOX_CPU_QUOTA}={v:?} is not a number"
            ))
        })?,
    };
    let sysctls: BTreeMap<String, String> = spec
        .pointer("/linux/sysctl")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default();
    Ok(Some(PodConfig {
        netns,
        sysctls: settings::pod_sysctls(sysctls)?,
        dns: None,
        hostname: spec
            .get("hostname")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        resources: PodResources {
            cpu_period: parse_u64(SANDBOX_CPU_PERIOD)?,
            cpu_quota,
            memory_limit_bytes: parse_u64(SANDBOX_MEMORY)?,
        },
        cgroup_parent: spec
            .pointer("/linux/cgroupsPath")
            .and_then(Value::as_str)
            .map(cgroup_parent_of)
            .unwrap_or_default(),
        ..Default::default()
    }))
}

/// The largest CreateSandbox `options` accepted.
const MAX_OPTIONS: usize = 1 << 20;

/// The pod's cgroup parent from its sandbox container's cgroups path:
/// containerd names `<parent>/<sandbox id>` (cgroupfs) or
/// `<slice>:<prefix>:<name>` (systemd).
fn cgroup_parent_of(path: &str) -> String {
    if let Some((slice, _)) = path.split_once(':') {
        return slice.to_owned();
    }
    match path.trim_end_matches('/').rsplit_once('/') {
        Some((parent, _)) => parent.to_owned(),
        None => String::new(),
    }
}

/// Reads the pod's configuration from a CreateSandbox request (the `shim`
/// sandboxer mode): the netns path CNI prepared and, in `options`, CRI's
/// PodSandboxConfig.
pub fn from_create_sandbox(netns_path: &str, options: Option<(&str, &[u8])>) -> Result<PodConfig> {
    use kuasar_api::cri::{NamespaceMode, PodSandboxConfig};
    use kuasar_api::protobuf::Message;

    let mut pod = PodConfig {
        netns: (!netns_path.is_empty()).then(|| PathBuf::from(netns_path)),
        ..Default::default()
    };
    let Some((type_url, value)) = options else {
        return Ok(pod);
    };
    if type_url.is_empty() && value.is_empty() {
        return Ok(pod);
    }
    if !type_url.ends_with("PodSandboxConfig") {
        return Err(Error::InvalidArgument(format!(
            "CreateSandbox options of type {type_url:?}: expected CRI's runtime.v1.PodSandboxConfig"
        )));
    }
    if value.len() > MAX_OPTIONS {
        return Err(Error::InvalidArgument(format!(
            "CreateSandbox options are {} bytes; at most {MAX_OPTIONS} are accepted",
            value.len()
        )));
    }
    let config = PodSandboxConfig::parse_from_bytes(value).map_err(|e| {
        Error::InvalidArgument(format!(
            "CreateSandbox options are not a PodSandboxConfig: {e}"
        ))
    })?;
    let linux = config.linux.as_ref();
    if let Some(ns) = linux
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref())
    {
        for (mode, host) in [
            (ns.network, HostNamespace::Network),
            (ns.pid, HostNamespace::Pid),
            (ns.ipc, HostNamespace::Ipc),
        ] {
            if mode.enum_value_or_default() == NamespaceMode::NODE {
                return Err(host.refusal());
            }
        }
    }
    pod.hostname = config.hostname.clone();
    pod.annotations = config
        .annotations
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(l) = linux {
        pod.cgroup_parent = l.cgroup_parent.clone();
        let sysctls: BTreeMap<String, String> = l
            .sysctls
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        pod.sysctls = settings::pod_sysctls(sysctls)?;
    }
    if let Some(d) = config.dns_config.as_ref() {
        let dns = PodDns {
            servers: d.servers.clone(),
            searches: d.searches.clone(),
            options: d.options.clone(),
        };
        dns.validate()?;
        pod.dns = Some(dns);
    }
    if let Some(r) = linux.and_then(|l| l.resources.as_ref()) {
        let overhead = linux.and_then(|l| l.overhead.as_ref());
        let plus = |a: i64, b: Option<i64>| a.max(0).saturating_add(b.unwrap_or(0).max(0));
        pod.resources = PodResources {
            cpu_period: r.cpu_period.max(0) as u64,
            cpu_quota: plus(r.cpu_quota, overhead.map(|o| o.cpu_quota)),
            memory_limit_bytes: plus(
                r.memory_limit_in_bytes,
                overhead.map(|o| o.memory_limit_in_bytes),
            ) as u64,
        };
    }
    Ok(pod)
}

/// The VM a pod gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    pub vcpus: u32,
    pub memory_mib: u32,
}

/// What the host can give one VM at most: its memory and the CPUs the
/// sandboxer may run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCapacity {
    pub memory_mib: u64,
    pub cpus: u32,
}

impl HostCapacity {
    /// Reads `MemTotal` of /proc/meminfo and the CPUs this process may use.
    pub fn probe() -> Self {
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| parse_mem_total_kib(&t))
            .map_or(u64::MAX, |kib| kib / 1024);
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(u32::MAX);
        HostCapacity { memory_mib, cpus }
    }
}

/// `MemTotal` of a /proc/meminfo text, in KiB.
fn parse_mem_total_kib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

const MIB: u64 = 1 << 20;

/// Sizes the pod's VM: memory = the pod's memory limit (the sum of its
/// containers' limits, as CRI gives it) + the guest's overhead, vCPUs =
/// ceil(quota / period) + the configured overhead; never below the
/// configured defaults, and never more than the host has. A pod without a
/// limit gets the defaults.
pub fn vm_size(
    resources: &PodResources,
    vm: &VmConfig,
    sizing: &SizingConfig,
    host: HostCapacity,
) -> Result<VmSize> {
    let mut memory_mib = u64::from(vm.memory_mib);
    let limit_mib = resources.memory_limit_bytes.div_ceil(MIB);
    let proportional_mib = limit_mib
        .saturating_mul(u64::from(sizing.memory_overhead_percent))
        .div_ceil(100);
    if resources.memory_limit_bytes > 0 {
        memory_mib = memory_mib.max(
            limit_mib
                .saturating_add(sizing.memory_overhead_mib)
                .saturating_add(proportional_mib),
        );
    }
    let mut vcpus = u64::from(vm.vcpus);
    if resources.cpu_quota > 0 && resources.cpu_period > 0 {
        let asked = (resources.cpu_quota as u64)
            .div_ceil(resources.cpu_period)
            .saturating_add(u64::from(sizing.vcpu_overhead));
        vcpus = vcpus.max(asked);
    }
    if memory_mib > host.memory_mib {
        return Err(Error::ResourceExhausted(format!(
            "the pod needs a VM of {memory_mib} MiB (memory limit {limit_mib} MiB + {} MiB \
             guest overhead, at least vm.memory_mib = {}) but the host has {} MiB",
            sizing.memory_overhead_mib.saturating_add(proportional_mib),
            vm.memory_mib,
            host.memory_mib
        )));
    }
    if vcpus > u64::from(host.cpus) {
        return Err(Error::ResourceExhausted(format!(
            "the pod needs a VM of {vcpus} vCPUs (CPU limit {}/{} + {} overhead, at least \
             vm.vcpus = {}) but the host has {} CPUs",
            resources.cpu_quota, resources.cpu_period, sizing.vcpu_overhead, vm.vcpus, host.cpus
        )));
    }
    Ok(VmSize {
        // Both fit in u32: they are at most the host's figures, which the
        // checks above bound, or the u32 defaults.
        vcpus: u32::try_from(vcpus).unwrap_or(u32::MAX),
        memory_mib: u32::try_from(memory_mib).unwrap_or(u32::MAX),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn cgroup_parent_from_the_sandbox_cgroups_path() {
        use super::cgroup_parent_of;
        assert_eq!(
            cgroup_parent_of("/kubepods/burstable/pod1/abc"),
            "/kubepods/burstable/pod1"
        );
        assert_eq!(
            cgroup_parent_of("kubepods-burstable-pod1.slice:cri-containerd:abc"),
            "kubepods-burstable-pod1.slice"
        );
        assert_eq!(cgroup_parent_of("abc"), "");
    }

    use super::*;
    use serde_json::json;

    #[test]
    fn only_the_pause_program_alone_runs_pause() {
        let with = |process: Value| json!({"process": process});
        assert!(runs_pause(&with(json!({"args": ["/pause"]}))));
        assert!(runs_pause(&with(json!({"args": ["pause"]}))));
        assert!(!runs_pause(&with(
            json!({"args": ["/pause"], "terminal": true})
        )));
        assert!(!runs_pause(&with(
            json!({"args": ["sh", "-c", "cat /proc/meminfo"]})
        )));
        assert!(!runs_pause(&with(json!({"args": ["/pause", "-v"]}))));
        assert!(!runs_pause(&with(json!({"args": ["/bin/pauser"]}))));
        assert!(!runs_pause(&with(json!({"args": []}))));
        assert!(!runs_pause(&json!({})));
    }

    #[test]
    fn a_plain_container_is_no_pod() {
        let spec = json!({"annotations": {}, "linux": {"namespaces": [{"type": "network"}]}});
        assert_eq!(from_sandbox_spec(&spec).unwrap(), None);
    }

    #[test]
    fn a_sandbox_container_gives_netns_hostname_and_resources() {
        let spec = json!({
            "hostname": "web-1",
            "annotations": {
                CONTAINER_TYPE: "sandbox",
                SANDBOX_CPU_PERIOD: "100000",
                SANDBOX_CPU_QUOTA: "150000",
                SANDBOX_MEMORY: "268435456",
            },
            "linux": {"namespaces": [
                {"type": "pid"},
                {"type": "ipc"},
                {"type": "network", "path": "/var/run/netns/cni-1"},
            ], "sysctl": {"kernel.msgmax": "65536", "net.ipv4.ip_unprivileged_port_start": "80"}},
        });
        let pod = from_sandbox_spec(&spec).unwrap().unwrap();
        assert_eq!(pod.netns, Some(PathBuf::from("/var/run/netns/cni-1")));
        assert_eq!(pod.hostname, "web-1");
        assert_eq!(pod.sysctls.len(), 2);
        assert_eq!(pod.sysctls["kernel.msgmax"], "65536");
        assert_eq!(pod.resources.cpu_quota, 150000);
        assert_eq!(pod.resources.memory_limit_bytes, 268435456);
    }

    #[test]
    fn host_network_is_refused_with_the_reason() {
        let spec = json!({
            "annotations": {CONTAINER_TYPE: "sandbox"},
            "linux": {"namespaces": [{"type": "pid"}]},
        });
        let err = from_sandbox_spec(&spec).unwrap_err().to_string();
        assert!(err.contains("hostNetwork"), "{err}");
    }

    #[test]
    fn host_pid_and_ipc_and_node_wide_sysctls_are_refused_by_name() {
        let spec = |namespaces: Value, sysctl: Value| {
            json!({
                "annotations": {CONTAINER_TYPE: "sandbox"},
                "linux": {"namespaces": namespaces, "sysctl": sysctl},
            })
        };
        let net = json!({"type": "network", "path": "/var/run/netns/x"});
        let cases = [
            (json!([net, {"type": "ipc"}]), json!({}), "hostPID"),
            (json!([net, {"type": "pid"}]), json!({}), "hostIPC"),
            (
                json!([net, {"type": "pid"}, {"type": "ipc"}]),
                json!({"vm.swappiness": "1"}),
                "vm.swappiness",
            ),
        ];
        for (namespaces, sysctl, named) in cases {
            let err = from_sandbox_spec(&spec(namespaces, sysctl))
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "{err}");
        }
    }

    fn encoded(config: &kuasar_api::cri::PodSandboxConfig) -> Vec<u8> {
        use kuasar_api::protobuf::Message;
        config.write_to_bytes().unwrap()
    }

    #[test]
    fn create_sandbox_options_give_the_pod() {
        use kuasar_api::cri::*;
        let mut config = PodSandboxConfig::new();
        config.hostname = "web-0".into();
        let linux = config.linux.mut_or_insert_default();
        let r = linux.resources.mut_or_insert_default();
        r.cpu_period = 100_000;
        r.cpu_quota = 200_000;
        r.memory_limit_in_bytes = 256 << 20;
        linux.overhead.mut_or_insert_default().memory_limit_in_bytes = 64 << 20;
        linux
            .sysctls
            .insert("net/ipv4/ip_local_port_range".into(), "20000 40000".into());
        let dns = config.dns_config.mut_or_insert_default();
        dns.servers = vec!["10.96.0.10".into()];
        dns.searches = vec!["svc.cluster.local".into()];
        let bytes = encoded(&config);
        let url = "type.googleapis.com/runtime.v1.PodSandboxConfig";
        let pod = from_create_sandbox("/var/run/netns/cni-2", Some((url, &bytes))).unwrap();
        assert_eq!(pod.netns, Some(PathBuf::from("/var/run/netns/cni-2")));
        assert_eq!(pod.hostname, "web-0");
        assert_eq!(pod.resources.cpu_quota, 200_000);
        assert_eq!(pod.resources.memory_limit_bytes, 320 << 20);
        assert_eq!(
            pod.sysctls
                .get("net.ipv4.ip_local_port_range")
                .map(|s| s.as_str()),
            Some("20000 40000")
        );
        assert_eq!(
            pod.dns.and_then(|d| d.resolv_conf()).as_deref(),
            Some("search svc.cluster.local\nnameserver 10.96.0.10\n")
        );
    }

    #[test]
    fn create_sandbox_refuses_host_pid_and_ipc() {
        use kuasar_api::cri::*;
        for (field, set) in [
            (
                "hostPID",
                (|n: &mut NamespaceOption| n.pid = NamespaceMode::NODE.into()) as fn(&mut _),
            ),
            ("hostIPC", |n: &mut NamespaceOption| {
                n.ipc = NamespaceMode::NODE.into()
            }),
        ] {
            let mut config = PodSandboxConfig::new();
            set(config
                .linux
                .mut_or_insert_default()
                .security_context
                .mut_or_insert_default()
                .namespace_options
                .mut_or_insert_default());
            let bytes = encoded(&config);
            let err = from_create_sandbox("", Some(("runtime.v1.PodSandboxConfig", &bytes)))
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{err}");
        }
    }

    #[test]
    fn create_sandbox_refuses_host_network_and_bad_options() {
        use kuasar_api::cri::*;
        let mut config = PodSandboxConfig::new();
        config
            .linux
            .mut_or_insert_default()
            .security_context
            .mut_or_insert_default()
            .namespace_options
            .mut_or_insert_default()
            .network = NamespaceMode::NODE.into();
        let bytes = encoded(&config);
        let err = from_create_sandbox("", Some(("runtime.v1.PodSandboxConfig", &bytes)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("hostNetwork"), "{err}");
        let err = from_create_sandbox("", Some(("x.Other", b"")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("x.Other"), "{err}");
        let err = from_create_sandbox("", Some(("runtime.v1.PodSandboxConfig", b"\xff\xff")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a PodSandboxConfig"), "{err}");
        assert_eq!(from_create_sandbox("", None).unwrap(), PodConfig::default());
    }

    #[test]
    fn a_bad_annotation_is_named() {
        let spec = json!({
            "annotations": {CONTAINER_TYPE: "sandbox", SANDBOX_MEMORY: "lots"},
            "linux": {"namespaces": [{"type": "network"}, {"type": "pid"}, {"type": "ipc"}]},
        });
        let err = from_sandbox_spec(&spec).unwrap_err().to_string();
        assert!(err.contains(SANDBOX_MEMORY), "{err}");
    }

    fn sizing() -> (VmConfig, SizingConfig, HostCapacity) {
        let vm = VmConfig {
            vcpus: 1,
            memory_mib: 256,
            ..VmConfig::default()
        };
        let sizing = SizingConfig {
            memory_overhead_mib: 128,
            memory_overhead_percent: 0,
            vcpu_overhead: 0,
        };
        let host = HostCapacity {
            memory_mib: 24_000,
            cpus: 2,
        };
        (vm, sizing, host)
    }

    fn pod(quota: i64, period: u64, memory: u64) -> PodResources {
        PodResources {
            cpu_period: period,
            cpu_quota: quota,
            memory_limit_bytes: memory,
        }
    }

    #[test]
    fn no_limits_give_the_defaults() {
        let (vm, sizing, host) = sizing();
        let size = vm_size(&PodResources::default(), &vm, &sizing, host).unwrap();
        assert_eq!(
            size,
            VmSize {
                vcpus: 1,
                memory_mib: 256
            }
        );
        // An unlimited quota (-1) is no limit either.
        let size = vm_size(&pod(-1, 100_000, 0), &vm, &sizing, host).unwrap();
        assert_eq!(size.vcpus, 1);
    }

    #[test]
    fn memory_is_the_limit_plus_overhead_never_below_the_default() {
        let (vm, sizing, host) = sizing();
        let size = vm_size(&pod(0, 0, 512 * MIB), &vm, &sizing, host).unwrap();
        assert_eq!(size.memory_mib, 640);
        // A part of a MiB counts as a whole one.
        let size = vm_size(&pod(0, 0, 512 * MIB + 1), &vm, &sizing, host).unwrap();
        assert_eq!(size.memory_mib, 641);
        // 64 MiB + 128 MiB is below the default 256 MiB.
        let size = vm_size(&pod(0, 0, 64 * MIB), &vm, &sizing, host).unwrap();
        assert_eq!(size.memory_mib, 256);
    }

    #[test]
    fn a_percentage_of_the_limit_is_added() {
        let (vm, mut sizing, host) = sizing();
        sizing.memory_overhead_percent = 4;
        // 1000 + 128 + 40.
        let size = vm_size(&pod(0, 0, 1000 * MIB), &vm, &sizing, host).unwrap();
        assert_eq!(size.memory_mib, 1168);
        // 4% of 768 MiB is 30.72 MiB: rounded up.
        let size = vm_size(&pod(0, 0, 768 * MIB), &vm, &sizing, host).unwrap();
        assert_eq!(size.memory_mib, 768 + 128 + 31);
    }

    #[test]
    fn vcpus_are_the_quota_rounded_up_plus_overhead() {
        let (vm, mut sizing, host) = sizing();
        let size = vm_size(&pod(150_000, 100_000, 0), &vm, &sizing, host).unwrap();
        assert_eq!(size.vcpus, 2);
        let size = vm_size(&pod(50_000, 100_000, 0), &vm, &sizing, host).unwrap();
        assert_eq!(size.vcpus, 1);
        sizing.vcpu_overhead = 1;
        let size = vm_size(&pod(100_000, 100_000, 0), &vm, &sizing, host).unwrap();
        assert_eq!(size.vcpus, 2);
    }

    #[test]
    fn more_than_the_host_has_is_refused_with_both_figures() {
        let (vm, sizing, host) = sizing();
        let err = vm_size(&pod(0, 0, 30_000 * MIB), &vm, &sizing, host).unwrap_err();
        assert!(matches!(err, Error::ResourceExhausted(_)), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("30128 MiB") && text.contains("24000 MiB"),
            "{text}"
        );
        let err = vm_size(&pod(300_000, 100_000, 0), &vm, &sizing, host).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("3 vCPUs") && text.contains("2 CPUs"),
            "{text}"
        );
        // Exactly what the host has is fine.
        let size = vm_size(&pod(200_000, 100_000, 0), &vm, &sizing, host).unwrap();
        assert_eq!(size.vcpus, 2);
    }

    #[test]
    fn huge_figures_do_not_overflow() {
        let (vm, sizing, host) = sizing();
        assert!(vm_size(&pod(i64::MAX, 1, u64::MAX), &vm, &sizing, host).is_err());
    }

    #[test]
    fn mem_total() {
        let text = "MemTotal:       24607740 kB\nMemFree:        1 kB\n";
        assert_eq!(parse_mem_total_kib(text), Some(24_607_740));
        assert_eq!(parse_mem_total_kib("junk"), None);
    }
}
