//! A container's OCI spec, made to fit the guest.
//!
//! containerd writes the spec for a host: bind mounts name host paths
//! (hostPath and emptyDir volumes, and CRI's /etc/hosts, /etc/resolv.conf,
//! /etc/hostname, /dev/termination-log), and namespaces name host files
//! (`/proc/<pid>/ns/ipc` of the pod's pause process). In the VM:
//! - a host bind mount is shared with the guest: its source is bind-mounted
//!   on the host under the container's shared directory (read-only there too
//!   when the mount is, since the guest is not trusted with more), and the
//!   spec names the guest's view of it;
//! - the pod's shared memory (`/dev/shm` bound from the pod) becomes a tmpfs
//!   of the guest: a host tmpfs seen through 9p would be slow and is not
//!   shared memory with anything in the guest anyway;
//! - a namespace given by a host path is the pod's: the VM is the pod, so
//!   IPC and UTS are the VM's own (the agent sets the pod's host name), and a
//!   shared PID namespace is the one the agent keeps for the pod (the
//!   guest's root PID namespace holds the agent). Likewise the pod's network
//!   namespace is the VM's root one, where the pod's NIC is;
//! - a spec without a PID or IPC namespace asks for the node's (hostPID,
//!   hostIPC), which a VM cannot give: refused, naming the field;
//! - a container always gets a cgroup namespace: the guest is cgroup v2.
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::pod::HostNamespace;

/// Most mounts one container may have.
const MAX_MOUNTS: usize = 256;
/// The guest's /dev/shm for a pod container.
const SHM_SIZE: &str = "size=65536k";

/// A host path shared with the guest for one bind mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBind {
    /// The host path the spec named.
    pub source: PathBuf,
    /// Where it is bind-mounted on the host, inside the shared directory.
    pub target: PathBuf,
    pub readonly: bool,
}

fn is_bind(m: &Value) -> bool {
    let typ = m.get("type").and_then(Value::as_str).unwrap_or("");
    let opts = options(m);
    typ == "bind" || opts.iter().any(|o| *o == "bind" || *o == "rbind")
}

fn options(m: &Value) -> Vec<&str> {
    m.get("options")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// What a container needs besides its rewritten spec.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct GuestContainer {
    /// Host paths to share (see [`share`]).
    pub binds: Vec<HostBind>,
    /// The container joins the pod's PID namespace (its spec named the
    /// pod's by a host path).
    pub pod_pid_namespace: bool,
}

/// Rewrites `spec` for the guest. `host_dir` is the container's directory
/// for shared mounts on the host, `guest_dir` the same directory as the
/// guest sees it.
pub fn for_guest(spec: &mut Value, host_dir: &Path, guest_dir: &str) -> Result<GuestContainer> {
    let mut binds = Vec::new();
    let mut pod_pid_namespace = false;
    if let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) {
        if mounts.len() > MAX_MOUNTS {
            return Err(Error::InvalidArgument(format!(
                "the container has {} mounts; at most {MAX_MOUNTS} are supported",
                mounts.len()
            )));
        }
        for m in mounts.iter_mut() {
            if !is_bind(m) {
                continue;
            }
            let destination = m
                .get("destination")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            if destination == "/dev/shm" {
                *m = json!({
                    "destination": "/dev/shm",
                    "type": "tmpfs",
                    "source": "shm",
                    "options": ["nosuid", "noexec", "nodev", "mode=1777", SHM_SIZE],
                });
                continue;
            }
            let source = m.get("source").and_then(Value::as_str).unwrap_or("");
            if !source.starts_with('/') {
                return Err(Error::InvalidArgument(format!(
                    "bind mount on {destination:?}: source {source:?} is not an absolute host path"
                )));
            }
            let name = binds.len().to_string();
            binds.push(HostBind {
                source: PathBuf::from(source),
                target: host_dir.join(&name),
                readonly: options(m).contains(&"ro"),
            });
            m["source"] = Value::String(format!("{guest_dir}/{name}"));
        }
    }
    if let Some(namespaces) = spec
        .pointer_mut("/linux/namespaces")
        .and_then(Value::as_array_mut)
    {
        for (kind, host) in [("pid", HostNamespace::Pid), ("ipc", HostNamespace::Ipc)] {
            if !namespaces
                .iter()
                .any(|n| n.get("type").and_then(Value::as_str) == Some(kind))
            {
                return Err(host.refusal());
            }
        }
        let mut shares_uts = false;
        namespaces.retain_mut(|ns| {
            let kind = ns.get("type").and_then(Value::as_str).unwrap_or("");
            let has_path = ns
                .get("path")
                .and_then(Value::as_str)
                .is_some_and(|p| !p.is_empty());
            if !has_path {
                return true;
            }
            match kind {
                "ipc" => false,
                "uts" => {
                    shares_uts = true;
                    false
                }
                // The pod's network is the VM's: its NIC carries the pod's
                // address (see net/).
                "network" => false,
                "pid" => {
                    pod_pid_namespace = true;
                    if let Some(o) = ns.as_object_mut() {
                        o.remove("path");
                    }
                    true
                }
                _ => {
                    if let Some(o) = ns.as_object_mut() {
                        o.remove("path");
                    }
                    true
                }
            }
        });
        // The guest is cgroup v2 only, where a container sees its own
        // cgroup as the root of /sys/fs/cgroup (containerd's default on a
        // v2 host; a v1 host's spec has no cgroup namespace).
        if !namespaces
            .iter()
            .any(|ns| ns.get("type").and_then(Value::as_str) == Some("cgroup"))
        {
            namespaces.push(json!({"type": "cgroup"}));
        }
        if shares_uts {
            if let Some(o) = spec.as_object_mut() {
                o.remove("hostname");
            }
        }
    }
    Ok(GuestContainer {
        binds,
        pod_pid_namespace,
    })
}

/// Bind-mounts each shared host path at its target (created to match: a
/// directory for a directory, an empty file otherwise).
pub fn share(binds: &[HostBind]) -> Result<()> {
    for b in binds {
        let meta = std::fs::metadata(&b.source).map_err(|e| {
            Error::io(
                format!("bind mount source {} (host path)", b.source.display()),
                e,
            )
        })?;
        if let Some(parent) = b.target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::io(format!("create {}", parent.display()), e))?;
        }
        let made = if meta.is_dir() {
            std::fs::create_dir(&b.target)
        } else {
            std::fs::File::create(&b.target).map(drop)
        };
        made.map_err(|e| Error::io(format!("create {}", b.target.display()), e))?;
        let err = |e: nix::Error| {
            Error::io(
                format!(
                    "bind mount {} on {}",
                    b.source.display(),
                    b.target.display()
                ),
                e.into(),
            )
        };
        let flags = MsFlags::MS_BIND | MsFlags::MS_REC;
        mount(
            Some(&b.source),
            &b.target,
            None::<&str>,
            flags,
            None::<&str>,
        )
        .map_err(err)?;
        if b.readonly {
            let remount = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
            mount(None::<&str>, &b.target, None::<&str>, remount, None::<&str>).map_err(err)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cri_spec() -> Value {
        json!({
            "hostname": "pod-a",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind",
                 "source": "/var/lib/containerd/sb/hosts", "options": ["rbind", "rprivate", "rw"]},
                {"destination": "/data", "type": "bind",
                 "source": "/srv/data", "options": ["rbind", "ro"]},
                {"destination": "/dev/shm", "type": "bind",
                 "source": "/run/containerd/sb/shm", "options": ["rbind", "rw"]},
            ],
            "linux": {"namespaces": [
                {"type": "pid", "path": "/proc/42/ns/pid"},
                {"type": "ipc", "path": "/proc/42/ns/ipc"},
                {"type": "uts", "path": "/proc/42/ns/uts"},
                {"type": "mount"},
                {"type": "network", "path": "/var/run/netns/cni-1"},
            ]},
        })
    }

    #[test]
    fn host_binds_are_shared_and_renamed() {
        let mut spec = cri_spec();
        let guest = for_guest(&mut spec, Path::new("/h/c1/mounts"), "/g/c1/mounts").unwrap();
        assert_eq!(
            guest.binds,
            vec![
                HostBind {
                    source: "/var/lib/containerd/sb/hosts".into(),
                    target: "/h/c1/mounts/0".into(),
                    readonly: false,
                },
                HostBind {
                    source: "/srv/data".into(),
                    target: "/h/c1/mounts/1".into(),
                    readonly: true,
                },
            ]
        );
        assert_eq!(spec["mounts"][1]["source"], "/g/c1/mounts/0");
        assert_eq!(spec["mounts"][2]["source"], "/g/c1/mounts/1");
        assert_eq!(spec["mounts"][0]["source"], "proc");
    }

    #[test]
    fn pod_shm_becomes_a_guest_tmpfs() {
        let mut spec = cri_spec();
        for_guest(&mut spec, Path::new("/h"), "/g").unwrap();
        assert_eq!(spec["mounts"][3]["type"], "tmpfs");
        assert_eq!(spec["mounts"][3]["destination"], "/dev/shm");
    }

    #[test]
    fn pod_namespaces_become_the_vms() {
        let mut spec = cri_spec();
        let guest = for_guest(&mut spec, Path::new("/h"), "/g").unwrap();
        let ns = spec["linux"]["namespaces"].as_array().unwrap();
        let kinds: Vec<&str> = ns.iter().map(|n| n["type"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["pid", "mount", "cgroup"]);
        assert!(ns[0].get("path").is_none(), "no host path in the guest");
        assert!(guest.pod_pid_namespace, "the pod's PID namespace is shared");
        assert!(spec.get("hostname").is_none(), "UTS is the VM's");
    }

    #[test]
    fn a_pid_namespace_of_its_own_stays_so() {
        let mut spec = cri_spec();
        spec["linux"]["namespaces"][0] = json!({"type": "pid"});
        let guest = for_guest(&mut spec, Path::new("/h"), "/g").unwrap();
        assert!(!guest.pod_pid_namespace);
    }

    #[test]
    fn host_pid_and_ipc_are_refused_by_field() {
        for (i, field) in [(0, "hostPID"), (1, "hostIPC")] {
            let mut spec = cri_spec();
            spec["linux"]["namespaces"]
                .as_array_mut()
                .unwrap()
                .remove(i);
            let err = for_guest(&mut spec, Path::new("/h"), "/g").unwrap_err();
            assert!(err.to_string().contains(field), "{err}");
        }
    }

    #[test]
    fn a_container_of_its_own_is_left_alone() {
        let mut spec = json!({
            "hostname": "x",
            "mounts": [{"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"}],
            "linux": {"namespaces": [
                {"type": "pid"}, {"type": "uts"}, {"type": "ipc"}, {"type": "cgroup"}]},
        });
        let before = spec.clone();
        assert_eq!(
            for_guest(&mut spec, Path::new("/h"), "/g").unwrap(),
            GuestContainer::default()
        );
        assert_eq!(spec, before);
    }

    #[test]
    fn a_relative_bind_source_is_refused() {
        let mut spec = json!({"mounts": [
            {"destination": "/x", "type": "bind", "source": "rel/path", "options": ["rbind"]}
        ]});
        let err = for_guest(&mut spec, Path::new("/h"), "/g").unwrap_err();
        assert!(err.to_string().contains("rel/path"), "{err}");
    }

    #[test]
    fn a_missing_source_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let binds = [HostBind {
            source: "/nonexistent/kuasar-test".into(),
            target: dir.path().join("0"),
            readonly: false,
        }];
        let err = share(&binds).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/kuasar-test"), "{err}");
    }
}
