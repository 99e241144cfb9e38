//! The pod's runtime spec, which containerd 2.3 asks the sandbox to return
//! from StartSandbox (shim mode) and Controller.Start (zero-shim): CRI
//! stores it with the sandbox, and NRI builds its view of the pod from it
//! (annotations, namespaces, resources, cgroup parent) instead of the pause
//! container's spec. containerd 2.1 ignores the field.
use serde_json::{json, Map, Value};

use super::PodConfig;

/// containerd's type URL for an OCI runtime spec (JSON-encoded).
pub const TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
const OCI_VERSION: &str = "1.1.0";

/// The pod's OCI runtime spec: what the VM that is the pod stands for.
pub fn pod_spec(pod: &PodConfig) -> Value {
    let mut namespaces = vec![json!({"type": "network"})];
    if let Some(netns) = &pod.netns {
        namespaces[0] = json!({"type": "network", "path": netns});
    }
    // The VM gives the pod its own of each (host namespaces are refused).
    for kind in ["ipc", "uts", "pid", "mount"] {
        namespaces.push(json!({ "type": kind }));
    }
    let mut linux = Map::new();
    linux.insert("namespaces".into(), Value::Array(namespaces));
    if !pod.cgroup_parent.is_empty() {
        linux.insert("cgroupsPath".into(), json!(pod.cgroup_parent));
    }
    let r = &pod.resources;
    let mut resources = Map::new();
    if r.cpu_quota > 0 && r.cpu_period > 0 {
        resources.insert(
            "cpu".into(),
            json!({"quota": r.cpu_quota, "period": r.cpu_period}),
        );
    }
    if r.memory_limit_bytes > 0 {
        resources.insert("memory".into(), json!({"limit": r.memory_limit_bytes}));
    }
    if !resources.is_empty() {
        linux.insert("resources".into(), Value::Object(resources));
    }
    if !pod.sysctls.is_empty() {
        linux.insert("sysctl".into(), json!(pod.sysctls));
    }
    let mut spec = json!({
        "ociVersion": OCI_VERSION,
        "annotations": pod.annotations,
        "linux": linux,
    });
    if !pod.hostname.is_empty() {
        spec["hostname"] = json!(pod.hostname);
    }
    spec
}

/// The spec as containerd's `Any` holds it: its type URL and JSON bytes.
pub fn encoded(pod: &PodConfig) -> (String, Vec<u8>) {
    (TYPE_URL.to_owned(), pod_spec(pod).to_string().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::PodResources;

    #[test]
    fn a_cri_pod_becomes_its_spec() {
        let pod = PodConfig {
            netns: Some("/var/run/netns/cni-1".into()),
            hostname: "web-0".into(),
            resources: PodResources {
                cpu_period: 100_000,
                cpu_quota: 50_000,
                memory_limit_bytes: 256 << 20,
            },
            sysctls: [("net.ipv4.ip_unprivileged_port_start".into(), "0".into())].into(),
            annotations: [("team".into(), "a".into())].into(),
            cgroup_parent: "/kubepods/burstable/pod1234".into(),
            ..Default::default()
        };
        let s = pod_spec(&pod);
        assert_eq!(s["hostname"], "web-0");
        assert_eq!(s["annotations"]["team"], "a");
        assert_eq!(s["linux"]["cgroupsPath"], "/kubepods/burstable/pod1234");
        assert_eq!(s["linux"]["namespaces"][0]["path"], "/var/run/netns/cni-1");
        assert_eq!(s["linux"]["namespaces"].as_array().unwrap().len(), 5);
        assert_eq!(s["linux"]["resources"]["cpu"]["quota"], 50_000);
        assert_eq!(s["linux"]["resources"]["memory"]["limit"], 256u64 << 20);
        assert_eq!(
            s["linux"]["sysctl"]["net.ipv4.ip_unprivileged_port_start"],
            "0"
        );
        let (url, bytes) = encoded(&pod);
        assert_eq!(url, TYPE_URL);
        let back: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn a_bare_pod_has_no_limits_or_cgroup() {
        let s = pod_spec(&PodConfig::default());
        assert!(s["linux"].get("resources").is_none());
        assert!(s["linux"].get("cgroupsPath").is_none());
        assert!(s.get("hostname").is_none());
        assert_eq!(s["linux"]["namespaces"][0], json!({"type": "network"}));
    }
}
