//! The bundle directory containerd runs `start`/`delete` in.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Annotations that group a container into an existing sandbox (the same
/// ones containerd's runc shim honours), in priority order.
pub const GROUP_ANNOTATIONS: [&str; 2] = [
    "io.containerd.runc.v2.group",
    "io.kubernetes.cri.sandbox-id",
];

/// `-bundle` or, as containerd runs shims in the bundle, the working directory.
pub fn dir(flag: Option<&Path>) -> Result<PathBuf> {
    match flag {
        Some(p) => Ok(p.to_path_buf()),
        None => std::env::current_dir().map_err(|e| Error::io("working directory", e)),
    }
}

/// The sandbox a container belongs to: the value of the first grouping
/// annotation in `<bundle>/config.json`, or `None` (the container is its
/// own sandbox) when there is none or the spec cannot be read.
pub fn group_id(bundle: &Path) -> Option<String> {
    let data = std::fs::read(bundle.join("config.json")).ok()?;
    group_id_from_spec(&data)
}

pub fn group_id_from_spec(spec: &[u8]) -> Option<String> {
    let spec: serde_json::Value = serde_json::from_slice(spec).ok()?;
    let annotations = spec.get("annotations")?.as_object()?;
    GROUP_ANNOTATIONS.iter().find_map(|k| {
        annotations
            .get(*k)
            .and_then(|v| v.as_str())
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    })
}

/// Writes `<bundle>/address` atomically (temp file + rename): containerd
/// reads it to reconnect to the shim after its own restart.
pub fn write_address(bundle: &Path, address: &str) -> Result<()> {
    let tmp = bundle.join(".address.tmp");
    let dst = bundle.join("address");
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(address.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &dst)
    })();
    res.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(format!("write {}", dst.display()), e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouping_annotations() {
        let cri = br#"{"ociVersion":"1.1.0","annotations":{
            "io.kubernetes.cri.container-type":"container",
            "io.kubernetes.cri.sandbox-id":"pod1"}}"#;
        assert_eq!(group_id_from_spec(cri).as_deref(), Some("pod1"));
        let both = br#"{"annotations":{"io.kubernetes.cri.sandbox-id":"pod1",
            "io.containerd.runc.v2.group":"g"}}"#;
        assert_eq!(group_id_from_spec(both).as_deref(), Some("g"));
        assert_eq!(group_id_from_spec(br#"{"annotations":{}}"#), None);
        assert_eq!(group_id_from_spec(br#"{"process":{}}"#), None);
        assert_eq!(group_id_from_spec(b"not json"), None);
        assert_eq!(
            group_id_from_spec(br#"{"annotations":{"io.kubernetes.cri.sandbox-id":""}}"#),
            None
        );
    }

    #[test]
    fn address_file() {
        let dir = std::env::temp_dir().join(format!("kuasar-shim-bundle-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        write_address(&dir, "unix:///run/kuasar/s/x").expect("write");
        assert_eq!(
            std::fs::read_to_string(dir.join("address")).expect("read"),
            "unix:///run/kuasar/s/x"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
