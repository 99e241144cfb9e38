//! The pod settings a VM applies for all its containers: sysctls, DNS,
//! and which of the node's namespaces a pod may not ask for.
//!
//! Under runc the pod's sysctls are set in the pause container's network
//! and IPC namespaces, which the pod's containers join; in a VM those
//! namespaces are the VM's own, so the agent sets them there (SetupSandbox).
//! Only namespaced sysctls are accepted, as by the kubelet and runc: a
//! node-wide one (`vm.*`, `kernel.panic`, ...) is refused by name.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Longest sysctl value accepted.
const MAX_SYSCTL_VALUE: usize = 4096;
/// Most sysctls a pod may set.
const MAX_SYSCTLS: usize = 256;

/// The pod's DNS configuration (CRI DNSConfig).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodDns {
    pub servers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

impl PodDns {
    /// The resolv.conf these settings make, as containerd writes it for a
    /// runc pod; None when there is nothing in them (then the node's own
    /// resolv.conf is used, as containerd does).
    pub fn resolv_conf(&self) -> Option<String> {
        let mut out = String::new();
        if !self.searches.is_empty() {
            out += &format!("search {}\n", self.searches.join(" "));
        }
        for server in &self.servers {
            out += &format!("nameserver {server}\n");
        }
        if !self.options.is_empty() {
            out += &format!("options {}\n", self.options.join(" "));
        }
        (!out.is_empty()).then_some(out)
    }

    /// Refuses what would break the file: line breaks, empty words.
    pub fn validate(&self) -> Result<()> {
        let lists = [
            ("servers", &self.servers),
            ("searches", &self.searches),
            ("options", &self.options),
        ];
        for (field, list) in lists {
            if list.len() > 64 {
                return Err(Error::InvalidArgument(format!(
                    "dns_config.{field} has {} entries; at most 64 are accepted",
                    list.len()
                )));
            }
            if let Some(bad) = list
                .iter()
                .find(|v| v.is_empty() || v.len() > 253 || v.chars().any(char::is_whitespace))
            {
                return Err(Error::InvalidArgument(format!(
                    "dns_config.{field} entry {bad:?} is not a single word"
                )));
            }
        }
        Ok(())
    }
}

/// Whether a sysctl is namespaced (per network or IPC namespace), the ones
/// Kubernetes lets a pod set (its `sysctl` namespace rules).
pub fn is_namespaced(key: &str) -> bool {
    key.starts_with("net.")
        || key.starts_with("kernel.shm")
        || key.starts_with("kernel.msg")
        || key == "kernel.sem"
        || key.starts_with("fs.mqueue.")
}

/// A pod's sysctls as asked for, checked (see [`check_sysctls`]) and with
/// their names in dotted form.
pub fn pod_sysctls(asked: BTreeMap<String, String>) -> Result<BTreeMap<String, String>> {
    check_sysctls(&asked)?;
    Ok(normalise_sysctls(asked))
}

/// Checks a pod's sysctls: namespaced, well-formed names, bounded values.
fn check_sysctls(sysctls: &BTreeMap<String, String>) -> Result<()> {
    if sysctls.len() > MAX_SYSCTLS {
        return Err(Error::InvalidArgument(format!(
            "the pod sets {} sysctls; at most {MAX_SYSCTLS} are accepted",
            sysctls.len()
        )));
    }
    for (key, value) in sysctls {
        let well_formed = !key.is_empty()
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
            && !key.split(['.', '/']).any(|w| w.is_empty() || w == "..");
        if !well_formed {
            return Err(Error::InvalidArgument(format!(
                "sysctl {key:?} is not a sysctl name"
            )));
        }
        if !is_namespaced(&key.replace('/', ".")) {
            return Err(Error::InvalidArgument(format!(
                "sysctl {key} is not namespaced: a pod may set only net.*, kernel.shm*, \
                 kernel.msg*, kernel.sem and fs.mqueue.* (a node-wide sysctl needs the \
                 node's configuration)"
            )));
        }
        if value.len() > MAX_SYSCTL_VALUE || value.contains('\n') {
            return Err(Error::InvalidArgument(format!(
                "sysctl {key}: the value is longer than {MAX_SYSCTL_VALUE} bytes or has a line break"
            )));
        }
    }
    Ok(())
}

/// The node's namespaces a VM pod cannot join (its kernel is the VM's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostNamespace {
    Network,
    Pid,
    Ipc,
}

impl HostNamespace {
    /// The OCI namespace type whose absence from a spec asks for the node's.
    fn oci_type(self) -> &'static str {
        match self {
            HostNamespace::Network => "network",
            HostNamespace::Pid => "pid",
            HostNamespace::Ipc => "ipc",
        }
    }

    /// Refuses an OCI spec's namespace list that lacks one of `kinds` (the
    /// spec then shares the node's), naming the first missing one.
    pub fn refuse_missing(namespaces: &[serde_json::Value], kinds: &[HostNamespace]) -> Result<()> {
        for kind in kinds {
            let present = namespaces.iter().any(|n| {
                n.get("type").and_then(serde_json::Value::as_str) == Some(kind.oci_type())
            });
            if !present {
                return Err(kind.refusal());
            }
        }
        Ok(())
    }

    /// The refusal, naming the pod field and what to do instead.
    pub fn refusal(self) -> Error {
        let (field, what) = match self {
            HostNamespace::Network => (
                "hostNetwork",
                "the host's network (hostNetwork: true): a microVM has a network stack of \
                 its own and cannot join the node's",
            ),
            HostNamespace::Pid => (
                "hostPID",
                "the host's PID namespace (hostPID: true): a microVM's processes cannot see \
                 or signal the node's",
            ),
            HostNamespace::Ipc => (
                "hostIPC",
                "the host's IPC namespace (hostIPC: true): a microVM cannot share memory \
                 segments or message queues with the node",
            ),
        };
        Error::InvalidArgument(format!(
            "the pod asks for {what}; run {field} pods with a runc RuntimeClass"
        ))
    }
}

/// Normalises a sysctl name as /proc/sys paths it (dots; a '/' form is
/// accepted as the kubelet does).
fn normalise_sysctls(sysctls: BTreeMap<String, String>) -> BTreeMap<String, String> {
    sysctls
        .into_iter()
        .map(|(k, v)| (k.replace('/', "."), v))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn resolv_conf_as_containerd_writes_it() {
        let dns = PodDns {
            servers: vec!["10.96.0.10".into(), "10.96.0.11".into()],
            searches: vec!["ns.svc.cluster.local".into(), "svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        };
        assert_eq!(
            dns.resolv_conf().unwrap(),
            "search ns.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\n\
             nameserver 10.96.0.11\noptions ndots:5\n"
        );
        assert_eq!(PodDns::default().resolv_conf(), None);
    }

    #[test]
    fn a_dns_entry_that_breaks_the_file_is_named() {
        let dns = PodDns {
            servers: vec!["10.0.0.1\nnameserver 6.6.6.6".into()],
            ..Default::default()
        };
        let e = dns.validate().unwrap_err().to_string();
        assert!(e.contains("dns_config.servers"), "{e}");
    }

    #[test]
    fn namespaced_sysctls_pass_and_node_wide_ones_are_named() {
        let ok = map(&[
            ("kernel.shm_rmid_forced", "1"),
            ("kernel.msgmax", "65536"),
            ("kernel.sem", "250 32000 100 128"),
            ("fs.mqueue.msg_max", "20"),
            ("net.ipv4.ip_local_port_range", "20000 40000"),
            ("net/ipv4/tcp_syncookies", "1"),
        ]);
        check_sysctls(&ok).unwrap();
        let e = check_sysctls(&map(&[("vm.swappiness", "1")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("vm.swappiness") && e.contains("not namespaced"),
            "{e}"
        );
        for bad in ["net..ipv4", "net.ipv4/../../x", "", ".net", "net.a b"] {
            assert!(check_sysctls(&map(&[(bad, "1")])).is_err(), "{bad:?}");
        }
        assert!(check_sysctls(&map(&[("net.x", "1\n2")])).is_err());
    }

    #[test]
    fn slashed_names_are_normalised() {
        let m = normalise_sysctls(map(&[("net/ipv4/tcp_syncookies", "1")]));
        assert_eq!(m, map(&[("net.ipv4.tcp_syncookies", "1")]));
    }

    #[test]
    fn refusals_name_the_field() {
        for (ns, field) in [
            (HostNamespace::Network, "hostNetwork"),
            (HostNamespace::Pid, "hostPID"),
            (HostNamespace::Ipc, "hostIPC"),
        ] {
            assert!(ns.refusal().to_string().contains(field));
        }
    }
}
