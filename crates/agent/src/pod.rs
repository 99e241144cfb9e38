//! What the pod gives each of its containers in the guest: the files CRI
//! would bind from the pod's sandbox directory on a runc node (/etc/hosts,
//! /etc/resolv.conf, /etc/hostname) and its shared PID namespace.
//!
//! containerd binds those files into the container spec itself in its
//! `podsandbox` mode; in the `shim` and zero-shim modes no such files exist
//! on the host, so the sandboxer sends their contents with SetupSandbox and
//! the agent binds them into every container whose spec has no mount there
//! (a container's own mount always wins, as under runc).
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::error::{Context, Result};

/// Where the pod's files live in the guest.
pub const POD_DIR: &str = "/run/kuasar/pod";

/// The pod files: (file name in [`POD_DIR`], where a container sees it).
const FILES: [(&str, &str); 3] = [
    ("hosts", "/etc/hosts"),
    ("resolv.conf", "/etc/resolv.conf"),
    ("hostname", "/etc/hostname"),
];

/// Writes the pod's files (an empty content writes none), each replaced
/// whole.
pub fn write_files(dir: &Path, hostname: &str, resolv_conf: &[u8], hosts: &[u8]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    let hostname_file = if hostname.is_empty() {
        Vec::new()
    } else {
        format!("{hostname}\n").into_bytes()
    };
    for (name, data) in [
        ("hosts", hosts),
        ("resolv.conf", resolv_conf),
        ("hostname", &hostname_file[..]),
    ] {
        if data.is_empty() {
            continue;
        }
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, data).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("rename to {}", path.display()))?;
    }
    Ok(())
}

/// The pod files present in `dir`: (source, destination in a container).
pub fn files(dir: &Path) -> Vec<(PathBuf, &'static str)> {
    FILES
        .iter()
        .map(|(name, dest)| (dir.join(name), *dest))
        .filter(|(source, _)| source.is_file())
        .collect()
}

/// What the pod adds to a container's spec.
#[derive(Debug, Default)]
pub struct PodAdditions {
    /// The pod's PID namespace, for a container that shares it.
    pub pid_namespace: Option<PathBuf>,
    /// Pod files (see [`files`]), bound where the spec mounts nothing.
    pub files: Vec<(PathBuf, &'static str)>,
}

impl PodAdditions {
    /// Applies the additions to a spec (an OCI spec JSON object).
    pub fn apply(&self, spec: &mut serde_json::Map<String, Value>) {
        if let Some(path) = &self.pid_namespace {
            let path = path.to_string_lossy();
            let linux = spec.entry("linux").or_insert_with(|| json!({}));
            if let Some(linux) = linux.as_object_mut() {
                let namespaces = linux.entry("namespaces").or_insert_with(|| json!([]));
                if let Some(list) = namespaces.as_array_mut() {
                    list.retain(|n| n.get("type").and_then(Value::as_str) != Some("pid"));
                    list.push(json!({"type": "pid", "path": path}));
                }
            }
        }
        if self.files.is_empty() {
            return;
        }
        let readonly = spec
            .get("root")
            .and_then(|r| r.get("readonly"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let mounts = spec.entry("mounts").or_insert_with(|| json!([]));
        let Some(mounts) = mounts.as_array_mut() else {
            return;
        };
        for (source, dest) in &self.files {
            let taken = mounts
                .iter()
                .any(|m| m.get("destination").and_then(Value::as_str) == Some(*dest));
            if taken {
                continue;
            }
            mounts.push(json!({
                "destination": dest,
                "type": "bind",
                "source": source,
                "options": ["rbind", "rprivate", if readonly { "ro" } else { "rw" }],
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: Value) -> serde_json::Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn files_are_written_and_found() {
        let dir = tempfile::tempdir().unwrap();
        write_files(dir.path(), "web-0", b"nameserver 192.0.2.1\n", b"").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("hostname")).unwrap(),
            "web-0\n"
        );
        let found: Vec<&str> = files(dir.path()).into_iter().map(|(_, d)| d).collect();
        assert_eq!(found, ["/etc/resolv.conf", "/etc/hostname"]);
    }

    #[test]
    fn a_container_mount_wins_over_a_pod_file() {
        let mut s = spec(json!({"root": {"path": "r"}, "mounts": [
            {"destination": "/etc/hosts", "type": "bind", "source": "/x/hosts"}]}));
        let add = PodAdditions {
            pid_namespace: None,
            files: vec![
                ("/run/kuasar/pod/hosts".into(), "/etc/hosts"),
                ("/run/kuasar/pod/resolv.conf".into(), "/etc/resolv.conf"),
            ],
        };
        add.apply(&mut s);
        let mounts = s["mounts"].as_array().unwrap();
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0]["source"], "/x/hosts");
        assert_eq!(mounts[1]["destination"], "/etc/resolv.conf");
        assert_eq!(mounts[1]["options"][2], "rw");
    }

    #[test]
    fn a_readonly_root_gets_readonly_pod_files() {
        let mut s = spec(json!({"root": {"path": "r", "readonly": true}}));
        let add = PodAdditions {
            pid_namespace: None,
            files: vec![("/run/kuasar/pod/hosts".into(), "/etc/hosts")],
        };
        add.apply(&mut s);
        assert_eq!(s["mounts"][0]["options"][2], "ro");
    }

    #[test]
    fn the_pod_pid_namespace_replaces_the_containers_own() {
        let mut s = spec(json!({"linux": {"namespaces": [
            {"type": "pid"}, {"type": "mount"}]}}));
        let add = PodAdditions {
            pid_namespace: Some("/proc/7/ns/pid".into()),
            files: Vec::new(),
        };
        add.apply(&mut s);
        assert_eq!(
            s["linux"]["namespaces"],
            json!([{"type": "mount"}, {"type": "pid", "path": "/proc/7/ns/pid"}])
        );
    }
}
