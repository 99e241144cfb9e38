//! The persisted record of one sandbox: its own versioned type, separate
//! from the live object, written atomically.
use std::io::{Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Version of [`SandboxRecord`]'s layout; bump on any incompatible change.
/// Version 1 (no stdio, no pod, no process states) cannot be re-adopted:
/// such a sandbox is stopped and cleaned at recovery.
pub const RECORD_VERSION: u32 = 2;
pub const RECORD_FILE: &str = "state.json";
/// Largest state file read back.
const MAX_RECORD: u64 = 1 << 20;

/// What a restarted sandboxer needs to take a running sandbox back: who it
/// belongs to, its VMM and agent, the pod, the network it took over, and
/// every container with its stdio and state.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SandboxRecord {
    pub version: u32,
    pub id: String,
    pub namespace: String,
    pub bundle: String,
    pub ttrpc_address: String,
    /// The VMM's pid, once it runs.
    pub vmm_pid: Option<u32>,
    /// The name the VMM was booted with, when not the id (a pooled VM's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_name: Option<String>,
    /// Where the guest agent is reached (empty before the VM booted).
    #[serde(default)]
    pub agent_address: String,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// Driven through containerd's sandbox API (shim or zero-shim mode).
    #[serde(default)]
    pub managed: bool,
    /// The zero-shim mode's per-sandbox task socket, while it is served.
    #[serde(default)]
    pub task_socket: Option<String>,
    /// The Kubernetes pod, once known.
    #[serde(default)]
    pub pod: Option<crate::pod::PodConfig>,
    /// The pod network handed to the VM.
    #[serde(default)]
    pub net: Option<NetRecord>,
    /// The sandbox's containers, by id.
    pub containers: Vec<ContainerRecord>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetRecord {
    pub netns: String,
    /// (tap device, pod interface) pairs in the netns.
    pub links: Vec<(String, String)>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ContainerRecord {
    pub id: String,
    /// The init process's pid (in the guest).
    pub pid: u32,
    #[serde(default)]
    pub bundle: String,
    #[serde(default)]
    pub stdio: crate::io::StdioPaths,
    #[serde(default)]
    pub state: ProcRecord,
}

/// A process's state as last recorded.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum ProcRecord {
    #[default]
    Created,
    Running,
    /// Exit status and time (nanoseconds since the Unix epoch).
    Exited {
        status: u32,
        at_ns: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("write {path}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("read {path}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is larger than {MAX_RECORD} bytes")]
    TooLarge { path: String },
    #[error("parse {path}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("{path} has version {found}, this kuasar-vmm reads version {RECORD_VERSION}")]
    Version { path: String, found: u32 },
}

impl SandboxRecord {
    /// The name the VMM process is recognised by.
    pub fn vm_name(&self) -> &str {
        self.vm_name.as_deref().unwrap_or(&self.id)
    }

    /// Writes the record into `dir` atomically: temp file, fsync, rename,
    /// fsync of the directory.
    pub fn save(&self, dir: &Path) -> Result<(), StateError> {
        let path = dir.join(RECORD_FILE);
        let err = |source| StateError::Write {
            path: path.display().to_string(),
            source,
        };
        let tmp = dir.join(format!(".{RECORD_FILE}.tmp"));
        let data = serde_json::to_vec_pretty(self).expect("a record always serialises");
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(&data).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
        Ok(())
    }

    pub fn load(dir: &Path) -> Result<Self, StateError> {
        let path = dir.join(RECORD_FILE);
        let shown = path.display().to_string();
        let meta = std::fs::metadata(&path).map_err(|source| StateError::Read {
            path: shown.clone(),
            source,
        })?;
        if meta.len() > MAX_RECORD {
            return Err(StateError::TooLarge { path: shown });
        }
        // Read at most one byte past the limit: a file growing after the
        // metadata check is still refused by `parse`.
        let mut data = Vec::new();
        std::fs::File::open(&path)
            .and_then(|f| f.take(MAX_RECORD + 1).read_to_end(&mut data))
            .map_err(|source| StateError::Read {
                path: shown.clone(),
                source,
            })?;
        Self::parse(&data, &shown)
    }

    /// Parses the contents of a state file (`shown` names it in errors):
    /// pure, bounded, and what [`SandboxRecord::load`] uses.
    pub fn parse(data: &[u8], shown: &str) -> Result<Self, StateError> {
        if data.len() as u64 > MAX_RECORD {
            return Err(StateError::TooLarge {
                path: shown.to_owned(),
            });
        }
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        let v: Versioned = serde_json::from_slice(data).map_err(|source| StateError::Parse {
            path: shown.to_owned(),
            source,
        })?;
        if v.version != RECORD_VERSION {
            return Err(StateError::Version {
                path: shown.to_owned(),
                found: v.version,
            });
        }
        serde_json::from_slice(data).map_err(|source| StateError::Parse {
            path: shown.to_owned(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> SandboxRecord {
        SandboxRecord {
            version: RECORD_VERSION,
            id: "sb".into(),
            namespace: "default".into(),
            bundle: "/b".into(),
            ttrpc_address: "/run/containerd/containerd.sock.ttrpc".into(),
            vmm_pid: Some(42),
            vm_name: None,
            agent_address: "unix:///run/sb/agent.sock".into(),
            created_at: 1,
            managed: true,
            task_socket: None,
            pod: Some(crate::pod::PodConfig {
                netns: Some("/var/run/netns/cni-1".into()),
                hostname: "pod".into(),
                ..Default::default()
            }),
            net: Some(NetRecord {
                netns: "/var/run/netns/cni-1".into(),
                links: vec![("tap0_kuasar".into(), "eth0".into())],
            }),
            containers: vec![ContainerRecord {
                id: "c1".into(),
                pid: 7,
                bundle: "/b/c1".into(),
                stdio: crate::io::StdioPaths {
                    stdout: "/run/fifo/c1-stdout".into(),
                    ..Default::default()
                },
                state: ProcRecord::Exited {
                    status: 137,
                    at_ns: 5,
                },
            }],
        }
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        record().save(dir.path()).unwrap();
        assert_eq!(SandboxRecord::load(dir.path()).unwrap(), record());
        assert!(!dir.path().join(".state.json.tmp").exists());
    }

    #[test]
    fn garbage_and_other_versions_are_errors() {
        assert!(matches!(
            SandboxRecord::parse(b"{not json", "f"),
            Err(StateError::Parse { .. })
        ));
        let v1 = br#"{"version": 1, "id": "x"}"#;
        assert!(matches!(
            SandboxRecord::parse(v1, "f"),
            Err(StateError::Version { found: 1, .. })
        ));
    }

    #[test]
    fn oversized_input_is_refused_without_parsing() {
        let mut big = serde_json::to_vec(&record()).unwrap();
        big.resize(MAX_RECORD as usize + 1, b' ');
        assert!(matches!(
            SandboxRecord::parse(&big, "f"),
            Err(StateError::TooLarge { .. })
        ));
        // The limit itself is fine: trailing whitespace is valid JSON.
        big.truncate(MAX_RECORD as usize);
        assert_eq!(SandboxRecord::parse(&big, "f").unwrap(), record());
    }
}
