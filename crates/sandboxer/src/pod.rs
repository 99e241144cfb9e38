//! What a sandbox knows of the Kubernetes pod it runs: the network namespace
//! CNI prepared, the host name, and the size its VM must have.
//!
//! In containerd's `podsandbox` mode this comes from the pod's sandbox
//! (pause) container's OCI spec: CRI puts the netns path in
//! `linux.namespaces` and the pod's resources in annotations. In the `shim`
//! sandboxer mode it comes from CreateSandbox (netns path, options).
use std::path::PathBuf;

use serde_json::Value;

use crate::error::{Error, Result};

/// CRI's annotation naming a container's kind ("sandbox" or "container").
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const CONTAINER_TYPE_SANDBOX: &str = "sandbox";
/// CRI's annotations carrying the pod's resources (podsandbox mode).
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

/// The pod's resources as CRI states them: the sum of its containers'
/// limits (0 = none given).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodResources {
    pub cpu_period: u64,
    pub cpu_quota: i64,
    pub memory_limit_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodConfig {
    /// The network namespace CNI set up; None when the pod has no network
    /// of its own (plain `ctr run`).
    pub netns: Option<PathBuf>,
    pub hostname: String,
    pub resources: PodResources,
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
        .cloned()
        .unwrap_or_default();
    let net = namespaces
        .iter()
        .find(|n| n.get("type").and_then(Value::as_str) == Some("network"));
    let netns = match net {
        None => {
            return Err(Error::InvalidArgument(
                "the pod asks for the host's network (hostNetwork: true): a microVM has a \
                 network stack of its own and cannot join the node's; run such pods with a \
                 runc RuntimeClass"
                    .into(),
            ))
        }
        Some(n) => n
            .get("path")
            .and_then(Value::as_str)
            .filter(|p| !p.is_empty())
            .map(PathBuf::from),
    };
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
    Ok(Some(PodConfig {
        netns,
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
    }))
}

/// The VM a pod gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    pub vcpus: u32,
    pub memory_mib: u32,
}

/// Sizes the pod's VM from its resources.
/// TODO(resources): sum of limits + overhead, checked against the host.
pub fn vm_size(_resources: &PodResources, qemu: &crate::config::QemuConfig) -> Result<VmSize> {
    Ok(VmSize {
        vcpus: qemu.vcpus,
        memory_mib: qemu.memory_mib,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
                {"type": "network", "path": "/var/run/netns/cni-1"},
            ]},
        });
        let pod = from_sandbox_spec(&spec).unwrap().unwrap();
        assert_eq!(pod.netns, Some(PathBuf::from("/var/run/netns/cni-1")));
        assert_eq!(pod.hostname, "web-1");
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
    fn a_bad_annotation_is_named() {
        let spec = json!({
            "annotations": {CONTAINER_TYPE: "sandbox", SANDBOX_MEMORY: "lots"},
            "linux": {"namespaces": [{"type": "network"}]},
        });
        let err = from_sandbox_spec(&spec).unwrap_err().to_string();
        assert!(err.contains(SANDBOX_MEMORY), "{err}");
    }
}
