//! A pod's network sysctls. Every container runs in the VM's network
//! namespace (the pod's), where crun refuses `net.*` sysctls ("requires a
//! new network namespace"): they are the pod's settings, so the agent sets
//! them on the VM itself and takes them out of the spec.
use serde_json::{Map, Value};

use crate::error::{Error, Result};

const MAX_VALUE: usize = 4096;

/// Removes the `net.*` sysctls from a spec (every container runs in the
/// VM's network namespace: see `container::rewrite_spec`); returns them.
pub fn take_pod_sysctls(spec: &mut Map<String, Value>) -> Result<Vec<(String, String)>> {
    let Some(sysctl) = spec
        .get_mut("linux")
        .and_then(|l| l.get_mut("sysctl"))
        .and_then(Value::as_object_mut)
    else {
        return Ok(Vec::new());
    };
    let keys: Vec<String> = sysctl
        .keys()
        .filter(|k| k.starts_with("net."))
        .cloned()
        .collect();
    let mut taken = Vec::new();
    for key in keys {
        let value = sysctl.remove(&key).unwrap_or(Value::Null);
        let value = value.as_str().unwrap_or_default().to_owned();
        taken.push((key, value));
    }
    check(&taken)?;
    Ok(taken)
}

/// Checks sysctl names and values: a name is dotted words (never a path
/// out of /proc/sys), a value bounded.
pub fn check(sysctls: &[(String, String)]) -> Result<()> {
    for (key, value) in sysctls {
        let valid_key = !key.is_empty()
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
            && !key.contains("..")
            && !key.starts_with('.');
        if !valid_key || value.len() > MAX_VALUE {
            return Err(Error::InvalidArgument(format!(
                "sysctl {key:?} is not valid"
            )));
        }
    }
    Ok(())
}

/// Sets sysctls on the VM (writes /proc/sys).
pub fn apply(sysctls: &[(String, String)]) -> Result<()> {
    for (key, value) in sysctls {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        std::fs::write(&path, value)
            .map_err(|e| Error::InvalidArgument(format!("sysctl {key}={value}: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn net_sysctls_of_a_pod_container_are_taken() {
        let mut spec = json!({"linux": {
            "namespaces": [{"type": "ipc"}],
            "sysctl": {"net.ipv4.ip_unprivileged_port_start": "0", "kernel.shm_rmid_forced": "1"},
        }});
        let taken = take_pod_sysctls(spec.as_object_mut().unwrap()).unwrap();
        assert_eq!(
            taken,
            [(
                "net.ipv4.ip_unprivileged_port_start".to_owned(),
                "0".to_owned()
            )]
        );
        assert_eq!(
            spec["linux"]["sysctl"],
            json!({"kernel.shm_rmid_forced": "1"})
        );
    }

    #[test]
    fn a_traversing_key_is_refused() {
        let mut spec = json!({"linux": {"sysctl": {"net.ipv4..x": "1"}}});
        assert!(take_pod_sysctls(spec.as_object_mut().unwrap()).is_err());
    }
}
