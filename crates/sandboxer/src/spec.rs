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
//!   hostIPC), which a VM cannot give: refused, naming the field; so is a
//!   Bidirectional (`rshared`) mount, whose mounts could never reach the
//!   node. HostToContainer (`rslave`) works: the host binds are slaves of
//!   the node's mounts and 9p shows what is mounted below them later;
//! - a container always gets a cgroup namespace: the guest is cgroup v2.
use std::path::{Path, PathBuf};

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
    /// Read-only all the way down (`rro`): submounts too.
    pub recursive_readonly: bool,
    /// The spec's mount destination, and the source the guest sees.
    pub destination: String,
    pub guest_source: String,
}

/// A writable mount below a read-only (not recursively) shared host path:
/// the container sees it writable, as under runc, through a mount of its own
/// in the guest (the guest sees one 9p filesystem, one mount).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CarriedSubmount {
    /// Index of the bind in the list [`share`] got.
    pub bind: usize,
    pub relative: PathBuf,
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
    /// The container joins a PID namespace its spec named by a path
    /// (`/proc/<pid>/ns/pid`): the pid, which is the pod's (the pod's shared
    /// namespace) or one of the pod's containers' (CRI's TARGET mode).
    pub pid_namespace_of: Option<u32>,
}

/// The pid a `/proc/<pid>/ns/<kind>` path names.
fn pid_of_ns_path(path: &str) -> Option<u32> {
    path.strip_prefix("/proc/")?.split('/').next()?.parse().ok()
}

/// Rewrites `spec` for the guest. `host_dir` is the container's directory
/// for shared mounts on the host, `guest_dir` the same directory as the
/// guest sees it: its bind mounts become shares of the container's
/// directory, its namespaces the guest's.
pub fn for_guest(spec: &mut Value, host_dir: &Path, guest_dir: &str) -> Result<GuestContainer> {
    let mut binds = Vec::new();
    if let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) {
        if mounts.len() > MAX_MOUNTS {
            return Err(Error::InvalidArgument(format!(
                "the container has {} mounts; at most {MAX_MOUNTS} are supported",
                mounts.len()
            )));
        }
        for m in mounts.iter_mut() {
            if let Some(bind) = guest_mount(m, binds.len(), host_dir, guest_dir)? {
                binds.push(bind);
            }
        }
    }
    let mut pid_namespace_of = None;
    let mut shares_uts = false;
    if let Some(namespaces) = spec
        .pointer_mut("/linux/namespaces")
        .and_then(Value::as_array_mut)
    {
        (pid_namespace_of, shares_uts) = guest_namespaces(namespaces)?;
    }
    if shares_uts {
        if let Some(o) = spec.as_object_mut() {
            o.remove("hostname");
        }
    }
    Ok(GuestContainer {
        binds,
        pid_namespace_of,
    })
}

/// Rewrites one mount of the spec for the guest. A bind mount becomes the
/// share number `index` of the container's directory (returned, to be
/// shared); `/dev/shm` a tmpfs of the guest; other mounts stay as they are.
fn guest_mount(
    m: &mut Value,
    index: usize,
    host_dir: &Path,
    guest_dir: &str,
) -> Result<Option<HostBind>> {
    if !is_bind(m) {
        return Ok(None);
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
        return Ok(None);
    }
    if options(m).contains(&"rshared") {
        return Err(Error::InvalidArgument(format!(
            "the mount on {destination:?} asks for Bidirectional mount propagation \
             (rshared): mounts made in a microVM cannot reach the node; run such pods \
             with a runc RuntimeClass"
        )));
    }
    let source = m.get("source").and_then(Value::as_str).unwrap_or("");
    if !source.starts_with('/') {
        return Err(Error::InvalidArgument(format!(
            "bind mount on {destination:?}: source {source:?} is not an absolute host path"
        )));
    }
    let name = index.to_string();
    let opts = options(m);
    let recursive_readonly = opts.contains(&"rro");
    let guest_source = format!("{guest_dir}/{name}");
    let bind = HostBind {
        source: PathBuf::from(source),
        target: host_dir.join(&name),
        readonly: recursive_readonly || opts.contains(&"ro"),
        recursive_readonly,
        destination,
        guest_source: guest_source.clone(),
    };
    m["source"] = Value::String(guest_source);
    if recursive_readonly {
        // One 9p mount in the guest: read-only is recursive there.
        if let Some(list) = m.get_mut("options").and_then(Value::as_array_mut) {
            for o in list.iter_mut() {
                if o.as_str() == Some("rro") {
                    *o = Value::String("ro".into());
                }
            }
        }
    }
    Ok(Some(bind))
}

/// Rewrites the spec's namespaces for the guest: those joined by path are
/// the pod's (IPC, UTS and network: the VM's own; PID: the pod's shared one
/// or a container's); every container gets a cgroup namespace. Returns the
/// pid whose PID namespace the container joins, if it names one (0: the
/// pod's), and whether it shares the pod's UTS namespace.
fn guest_namespaces(namespaces: &mut Vec<Value>) -> Result<(Option<u32>, bool)> {
    HostNamespace::refuse_missing(namespaces, &[HostNamespace::Pid, HostNamespace::Ipc])?;
    let mut shares_uts = false;
    let mut pid_namespace_of = None;
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
                // 0 (unparsable) still means a shared one: the pod's.
                let path = ns.get("path").and_then(Value::as_str).unwrap_or("");
                pid_namespace_of = Some(pid_of_ns_path(path).unwrap_or(0));
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
    // The guest is cgroup v2 only, where a container sees its own cgroup as
    // the root of /sys/fs/cgroup (containerd's default on a v2 host; a v1
    // host's spec has no cgroup namespace).
    if !namespaces
        .iter()
        .any(|ns| ns.get("type").and_then(Value::as_str) == Some("cgroup"))
    {
        namespaces.push(json!({"type": "cgroup"}));
    }
    Ok((pid_namespace_of, shares_uts))
}

/// Bind-mounts each shared host path at its target (created to match: a
/// directory for a directory, an empty file otherwise). The binds are
/// slaves of the host's mounts: a mount made later below a host path shows
/// through, and nothing done to them (unmounting when the container goes)
/// ever reaches the host's own mounts. Returns the writable submounts of
/// read-only (not recursively) binds, to carry into the guest.
pub fn share(binds: &[HostBind]) -> Result<Vec<CarriedSubmount>> {
    let mut carried = Vec::new();
    for (i, b) in binds.iter().enumerate() {
        bind_one(b)?;
        if b.readonly && !b.recursive_readonly {
            carried.extend(
                crate::mount::submounts(&b.target)
                    .into_iter()
                    .filter(|m| !m.readonly)
                    .map(|m| CarriedSubmount {
                        bind: i,
                        relative: m.relative,
                    }),
            );
        }
    }
    Ok(carried)
}

fn bind_one(b: &HostBind) -> Result<()> {
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
    // Made exclusively: the guest writes the share too, and an entry it
    // planted there (a symlink to a host file, say) is refused, never
    // followed (create_new is O_EXCL, which does not follow a symlink).
    let made = if meta.is_dir() {
        std::fs::create_dir(&b.target)
    } else {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&b.target)
            .map(drop)
    };
    made.map_err(|e| Error::io(format!("create {}", b.target.display()), e))?;
    let readonly = match (b.recursive_readonly, b.readonly) {
        (true, _) => crate::mount::Readonly::Recursive,
        (false, true) => crate::mount::Readonly::Top,
        (false, false) => crate::mount::Readonly::No,
    };
    crate::mount::bind(&b.source, &b.target, true, readonly).map_err(|e| {
        Error::io(
            format!(
                "bind mount {} on {}",
                b.source.display(),
                b.target.display()
            ),
            e,
        )
    })?;
    Ok(())
}

/// Adds a writable mount to the spec for each carried submount, right after
/// the mount of its bind (so that it lands on top of it).
pub fn carry_submounts(spec: &mut Value, binds: &[HostBind], carried: &[CarriedSubmount]) {
    let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) else {
        return;
    };
    for c in carried.iter().rev() {
        let Some(b) = binds.get(c.bind) else { continue };
        let Some(at) = mounts
            .iter()
            .position(|m| m.get("source").and_then(Value::as_str) == Some(b.guest_source.as_str()))
        else {
            continue;
        };
        let rel = c.relative.to_string_lossy();
        let entry = json!({
            "destination": format!("{}/{rel}", b.destination.trim_end_matches('/')),
            "type": "bind",
            "source": format!("{}/{rel}", b.guest_source),
            "options": ["rbind", "rw"],
        });
        mounts.insert(at + 1, entry);
    }
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
                    recursive_readonly: false,
                    destination: "/etc/hosts".into(),
                    guest_source: "/g/c1/mounts/0".into(),
                },
                HostBind {
                    source: "/srv/data".into(),
                    target: "/h/c1/mounts/1".into(),
                    readonly: true,
                    recursive_readonly: false,
                    destination: "/data".into(),
                    guest_source: "/g/c1/mounts/1".into(),
                },
            ]
        );
        assert_eq!(spec["mounts"][1]["source"], "/g/c1/mounts/0");
        assert_eq!(spec["mounts"][2]["source"], "/g/c1/mounts/1");
        assert_eq!(spec["mounts"][0]["source"], "proc");
    }

    #[test]
    fn recursive_readonly_is_plain_readonly_in_the_guest() {
        let mut spec = json!({"mounts": [{"destination": "/data", "type": "bind",
            "source": "/srv/data", "options": ["rbind", "rro", "rprivate"]}]});
        let guest = for_guest(&mut spec, Path::new("/h"), "/g").unwrap();
        assert!(guest.binds[0].readonly && guest.binds[0].recursive_readonly);
        assert_eq!(
            spec["mounts"][0]["options"],
            json!(["rbind", "ro", "rprivate"])
        );
    }

    #[test]
    fn carried_submounts_follow_their_bind() {
        let mut spec = cri_spec();
        let guest = for_guest(&mut spec, Path::new("/h"), "/g").unwrap();
        let carried = [
            CarriedSubmount {
                bind: 1,
                relative: "sub".into(),
            },
            CarriedSubmount {
                bind: 1,
                relative: "sub/deep".into(),
            },
        ];
        carry_submounts(&mut spec, &guest.binds, &carried);
        let m = spec["mounts"].as_array().unwrap();
        let dests: Vec<&str> = m
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        assert_eq!(
            dests,
            [
                "/proc",
                "/etc/hosts",
                "/data",
                "/data/sub",
                "/data/sub/deep",
                "/dev/shm"
            ]
        );
        assert_eq!(m[3]["source"], "/g/1/sub");
        assert_eq!(m[3]["options"], json!(["rbind", "rw"]));
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
        assert_eq!(guest.pid_namespace_of, Some(42), "a shared PID namespace");
        assert!(spec.get("hostname").is_none(), "UTS is the VM's");
    }

    #[test]
    fn a_pid_namespace_of_its_own_stays_so() {
        let mut spec = cri_spec();
        spec["linux"]["namespaces"][0] = json!({"type": "pid"});
        let guest = for_guest(&mut spec, Path::new("/h"), "/g").unwrap();
        assert_eq!(guest.pid_namespace_of, None);
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
    fn bidirectional_propagation_is_refused_by_name() {
        let mut spec = json!({"mounts": [{"destination": "/x", "type": "bind",
            "source": "/srv/x", "options": ["rbind", "rshared", "rw"]}]});
        let err = for_guest(&mut spec, Path::new("/h"), "/g").unwrap_err();
        assert!(err.to_string().contains("Bidirectional"), "{err}");
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
            recursive_readonly: false,
            destination: "/x".into(),
            guest_source: "/g/0".into(),
        }];
        let err = share(&binds).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/kuasar-test"), "{err}");
    }

    #[test]
    fn an_entry_the_guest_planted_at_a_bind_target_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (source, host_file) = (dir.path().join("src"), dir.path().join("host-file"));
        std::fs::write(&source, "volume").unwrap();
        std::fs::write(&host_file, "witness").unwrap();
        let target = dir.path().join("mounts/0");
        std::fs::create_dir_all(dir.path().join("mounts")).unwrap();
        std::os::unix::fs::symlink(&host_file, &target).unwrap();
        let binds = [HostBind {
            source,
            target: target.clone(),
            readonly: false,
            recursive_readonly: false,
            destination: "/x".into(),
            guest_source: "/g/0".into(),
        }];
        let err = share(&binds).unwrap_err().to_string();
        assert!(err.contains(&target.display().to_string()), "{err}");
        assert_eq!(std::fs::read_to_string(&host_file).unwrap(), "witness");
    }
}
