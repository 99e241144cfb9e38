//! The persisted record of one sandbox: its own versioned type, separate
//! from the live object, written atomically.
use std::io::{Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Version of [`SandboxRecord`]'s layout; bump on any incompatible change.
pub const RECORD_VERSION: u32 = 1;
pub const RECORD_FILE: &str = "state.json";
/// Largest state file read back.
const MAX_RECORD: u64 = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SandboxRecord {
    pub version: u32,
    pub id: String,
    pub namespace: String,
    pub bundle: String,
    pub ttrpc_address: String,
    /// The VMM's pid, once it runs.
    pub vmm_pid: Option<u32>,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// The sandbox's containers, by id.
    pub containers: Vec<ContainerRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ContainerRecord {
    pub id: String,
    /// The init process's pid (in the guest).
    pub pid: u32,
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
            created_at: 1,
            containers: vec![ContainerRecord {
                id: "c1".into(),
                pid: 7,
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
        let v2 = br#"{"version": 2, "id": "x"}"#;
        assert!(matches!(
            SandboxRecord::parse(v2, "f"),
            Err(StateError::Version { found: 2, .. })
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
