//! Host cgroups of pods: each sandbox's VMM runs in a cgroup of its own
//! below the pod's `cgroup_parent` (what the kubelet caps and reads pod
//! stats from), limited to the VM's size plus the VMM's overhead. cgroup v1
//! (a hierarchy per controller) and v2 (one unified hierarchy); the
//! kubelet's cgroupfs (`/kubepods/burstable/pod<uid>`) and systemd
//! (`kubepods-burstable-pod<uid>.slice`) parent names.
use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

/// The cgroup file system root.
pub const ROOT: &str = "/sys/fs/cgroup";
/// The v1 controllers a VMM joins (those mounted are used).
const V1_CONTROLLERS: &[&str] = &["memory", "cpu", "cpuacct", "pids"];
/// The CFS period the CPU limit is expressed in, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// How the host's cgroups are laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// One hierarchy per controller: `<root>/<controller>/<path>`.
    V1 {
        root: PathBuf,
        controllers: Vec<String>,
    },
    /// The unified hierarchy: `<root>/<path>`.
    V2 { root: PathBuf },
}

impl Layout {
    /// The layout of the cgroup file system at `root`.
    pub fn probe(root: &Path) -> Layout {
        if root.join("cgroup.controllers").exists() {
            return Layout::V2 {
                root: root.to_owned(),
            };
        }
        let controllers = V1_CONTROLLERS
            .iter()
            .filter(|c| root.join(c).join("cgroup.procs").exists())
            .map(|c| (*c).to_owned())
            .collect();
        Layout::V1 {
            root: root.to_owned(),
            controllers,
        }
    }

    /// The directories of cgroup `rel` (one per v1 controller).
    fn dirs(&self, rel: &Path) -> Vec<PathBuf> {
        match self {
            Layout::V1 { root, controllers } => {
                controllers.iter().map(|c| root.join(c).join(rel)).collect()
            }
            Layout::V2 { root } => vec![root.join(rel)],
        }
    }
}

/// Why a pod's cgroup parent is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParentError {
    #[error("cgroup parent {0:?} climbs out of the cgroup tree (`..`)")]
    Escapes(String),
    #[error(
        "cgroup parent {0:?} is not a systemd slice name (`<name>.slice`, parts joined by `-`)"
    )]
    BadSlice(String),
}

/// The cgroup (relative to the hierarchy's root) a sandbox's VMM runs in,
/// below the pod's `cgroup_parent`: `<parent>/kuasar-<id>`; None when the
/// pod names no parent. A systemd slice name expands as systemd nests
/// slices (`a-b.slice` is in `a.slice`).
pub fn vmm_cgroup(parent: &str, id: &str) -> Result<Option<PathBuf>, ParentError> {
    if parent.is_empty() {
        return Ok(None);
    }
    let base = if parent.ends_with(".slice") && !parent.contains('/') {
        expand_slice(parent)?
    } else {
        let p = Path::new(parent);
        if p.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(ParentError::Escapes(parent.to_owned()));
        }
        p.components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .collect()
    };
    Ok(Some(base.join(format!("kuasar-{id}"))))
}

/// `kubepods-burstable-pod1.slice` ->
/// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice`.
fn expand_slice(slice: &str) -> Result<PathBuf, ParentError> {
    let name = slice.strip_suffix(".slice").unwrap_or(slice);
    if name == "-" {
        return Ok(PathBuf::new());
    }
    if name.is_empty() || name.split('-').any(str::is_empty) || name.contains("..") {
        return Err(ParentError::BadSlice(slice.to_owned()));
    }
    let mut path = PathBuf::new();
    let mut prefix = String::new();
    for part in name.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push(format!("{prefix}.slice"));
    }
    Ok(path)
}

/// A VMM's limits: the VM's memory and vCPUs plus the VMM's own overhead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    /// CPU time per `CPU_PERIOD_US`, in microseconds (0 = no limit).
    pub cpu_quota_us: u64,
}

impl Limits {
    /// For a VM of `memory_mib` and `vcpus`, with `overhead_mib` for the
    /// VMM (its code, device emulation, the guest's page tables) and one
    /// more CPU for its I/O thread.
    pub fn for_vm(memory_mib: u32, vcpus: u32, overhead_mib: u64) -> Limits {
        Limits {
            memory_bytes: (u64::from(memory_mib) + overhead_mib) << 20,
            cpu_quota_us: (u64::from(vcpus) + 1) * CPU_PERIOD_US,
        }
    }

    /// The files to write and their contents, for `layout`.
    fn files(&self, layout: &Layout) -> Vec<(&'static str, String)> {
        match layout {
            Layout::V1 { .. } => vec![
                ("memory.limit_in_bytes", self.memory_bytes.to_string()),
                ("cpu.cfs_period_us", CPU_PERIOD_US.to_string()),
                ("cpu.cfs_quota_us", self.cpu_quota_us.to_string()),
            ],
            Layout::V2 { .. } => vec![
                ("memory.max", self.memory_bytes.to_string()),
                ("cpu.max", format!("{} {CPU_PERIOD_US}", self.cpu_quota_us)),
            ],
        }
    }
}

/// A VMM's cgroup, created with its limits; removed with [`VmmCgroup::remove`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmCgroup {
    dirs: Vec<PathBuf>,
}

impl VmmCgroup {
    /// The cgroup `rel` of `layout`, without touching the file system (to
    /// remove what an earlier kuasar-vmm created).
    pub fn at(layout: &Layout, rel: &Path) -> VmmCgroup {
        VmmCgroup {
            dirs: layout.dirs(rel),
        }
    }

    /// Creates cgroup `rel` (and its missing parents) with `limits`. On v2
    /// the memory, cpu and pids controllers are enabled down to it.
    pub fn create(layout: &Layout, rel: &Path, limits: Limits) -> io::Result<VmmCgroup> {
        let cg = VmmCgroup::at(layout, rel);
        if cg.dirs.is_empty() {
            return Err(io::Error::other("no cgroup controller is mounted"));
        }
        for dir in &cg.dirs {
            std::fs::create_dir_all(dir).map_err(|e| named(dir, e))?;
        }
        if let Layout::V2 { root } = layout {
            enable_v2_controllers(root, rel)?;
        }
        let files = limits.files(layout);
        for dir in &cg.dirs {
            for (file, value) in &files {
                let path = dir.join(file);
                // Each v1 controller has only its own files.
                if path.exists() {
                    std::fs::write(&path, value).map_err(|e| named(&path, e))?;
                }
            }
        }
        Ok(cg)
    }

    /// The `cgroup.procs` files a process writes itself into to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Moves the running process `pid` (all its threads) into the cgroup (a
    /// pooled VM's VMM, booted before its pod). Its memory charge moves
    /// along only on v1 with kernels that still move charges (before 6.x);
    /// otherwise what it used before stays charged where it was.
    pub fn move_process(&self, pid: u32) -> io::Result<()> {
        for dir in &self.dirs {
            let charge = dir.join("memory.move_charge_at_immigrate");
            if charge.exists() {
                // Anonymous and file pages both (bits 0 and 1); newer
                // kernels refuse (EINVAL): best effort.
                let _ = std::fs::write(&charge, "3");
            }
            let procs = dir.join("cgroup.procs");
            std::fs::write(&procs, pid.to_string()).map_err(|e| named(&procs, e))?;
        }
        Ok(())
    }

    /// Removes the cgroup of a VMM that has exited, retrying every 100 ms
    /// for up to `limit`: it empties only once the process is wholly gone
    /// (freeing a large guest takes a while on a busy host).
    pub async fn remove_within(&self, limit: Duration) -> io::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            match self.remove() {
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                done => return done,
            }
        }
    }

    /// The memory limit as the kernel holds it (v1 or v2).
    #[cfg(test)]
    pub fn memory_limit(&self) -> Option<u64> {
        self.dirs.iter().find_map(|d| {
            ["memory.limit_in_bytes", "memory.max"]
                .iter()
                .find_map(|f| std::fs::read_to_string(d.join(f)).ok())
                .and_then(|s| s.trim().parse().ok())
        })
    }

    /// Removes the cgroup (its processes gone); a missing one is removed.
    pub fn remove(&self) -> io::Result<()> {
        for dir in &self.dirs {
            match std::fs::remove_dir(dir) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(named(dir, e)),
                _ => {}
            }
        }
        Ok(())
    }
}

/// The VMM cgroup of sandbox `id` that process `pid` runs in, read from
/// `/proc/<pid>/cgroup` (for a VMM whose record is lost).
pub fn vmm_cgroup_of(pid: u32, id: &str) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    vmm_cgroup_in(&text, id)
}

fn vmm_cgroup_in(proc_cgroup: &str, id: &str) -> Option<PathBuf> {
    let leaf = format!("/kuasar-{id}");
    proc_cgroup.lines().find_map(|l| {
        let path = l.splitn(3, ':').nth(2)?;
        path.ends_with(&leaf)
            .then(|| PathBuf::from(path.trim_start_matches('/')))
    })
}

/// Removes the VMM cgroups `rels` of `layout` once their processes are
/// gone, trying for up to 30 s on a thread of its own (recovery cleans up
/// after VMMs it just killed).
pub fn remove_when_empty(layout: &Layout, rels: Vec<PathBuf>) {
    if rels.is_empty() {
        return;
    }
    let cgroups: Vec<VmmCgroup> = rels.iter().map(|r| VmmCgroup::at(layout, r)).collect();
    std::thread::spawn(move || {
        for _ in 0..300 {
            if cgroups.iter().all(|c| c.remove().is_ok()) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        for c in &cgroups {
            if let Err(e) = c.remove() {
                tracing::warn!("remove a VMM cgroup left by an earlier run: {e}");
            }
        }
    });
}

fn named(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Enables memory, cpu and pids in the subtree of every ancestor of `rel`.
fn enable_v2_controllers(root: &Path, rel: &Path) -> io::Result<()> {
    let mut dir = root.to_owned();
    for part in rel.parent().into_iter().flat_map(Path::components) {
        let control = dir.join("cgroup.subtree_control");
        std::fs::write(&control, "+memory +cpu +pids").map_err(|e| named(&control, e))?;
        dir.push(part);
    }
    let control = dir.join("cgroup.subtree_control");
    std::fs::write(&control, "+memory +cpu +pids").map_err(|e| named(&control, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn removal_is_retried_until_its_limit() {
        let root = tempfile::tempdir().unwrap();
        let layout = Layout::V2 {
            root: root.path().to_owned(),
        };
        let cg = VmmCgroup::at(&layout, Path::new("pod/kuasar-sb"));
        // Missing: removed at once.
        cg.remove_within(Duration::from_secs(5)).await.unwrap();
        // Never empties (a plain directory with a file stands for a cgroup
        // whose process lingers): given up after the limit, with the error.
        let dir = root.path().join("pod/kuasar-sb");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("x"), "").unwrap();
        let started = Instant::now();
        let err = cg
            .remove_within(Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(err.to_string().contains("kuasar-sb"), "{err}");
        // Empties meanwhile: removed.
        std::fs::remove_file(dir.join("x")).unwrap();
        cg.remove_within(Duration::from_secs(5)).await.unwrap();
        assert!(!dir.exists());
    }

    #[test]
    fn cgroupfs_and_systemd_parents() {
        assert_eq!(vmm_cgroup("", "abc"), Ok(None));
        assert_eq!(
            vmm_cgroup("/kubepods/burstable/pod12", "abc").unwrap(),
            Some(PathBuf::from("kubepods/burstable/pod12/kuasar-abc"))
        );
        assert_eq!(
            vmm_cgroup("kubepods-burstable-pod12.slice", "abc").unwrap(),
            Some(PathBuf::from(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12.slice/kuasar-abc"
            ))
        );
        assert_eq!(
            vmm_cgroup("-.slice", "abc").unwrap(),
            Some(PathBuf::from("kuasar-abc"))
        );
        assert_eq!(
            vmm_cgroup("/a/../../etc", "x"),
            Err(ParentError::Escapes("/a/../../etc".into()))
        );
        assert!(matches!(
            vmm_cgroup("a--b.slice", "x"),
            Err(ParentError::BadSlice(_))
        ));
    }

    #[test]
    fn the_vmm_cgroup_of_a_process() {
        let v1 = "12:memory:/kubepods/pod1/kuasar-abc\n11:cpu:/kubepods/pod1/kuasar-abc\n1:name=systemd:/\n";
        assert_eq!(
            vmm_cgroup_in(v1, "abc"),
            Some(PathBuf::from("kubepods/pod1/kuasar-abc"))
        );
        assert_eq!(
            vmm_cgroup_in("0::/k8s.io/kuasar-x\n", "x"),
            Some(PathBuf::from("k8s.io/kuasar-x"))
        );
        assert_eq!(vmm_cgroup_in("0::/k8s.io/kuasar-xy\n", "x"), None);
        assert_eq!(vmm_cgroup_in("0::/\n", "x"), None);
    }

    #[test]
    fn limits_for_a_vm() {
        let l = Limits::for_vm(256, 1, 64);
        assert_eq!(l.memory_bytes, 320 << 20);
        assert_eq!(l.cpu_quota_us, 200_000);
        let v2 = l.files(&Layout::V2 { root: "/x".into() });
        assert_eq!(v2[1], ("cpu.max", "200000 100000".to_owned()));
    }

    #[test]
    fn creates_limits_and_removes_a_v1_cgroup_tree() {
        // A fake v1 tree: directories with the files the kernel would have.
        let root = std::env::temp_dir().join(format!("kuasar-cg-{}", std::process::id()));
        for c in ["memory", "cpu"] {
            std::fs::create_dir_all(root.join(c)).unwrap();
            std::fs::write(root.join(c).join("cgroup.procs"), "").unwrap();
        }
        let layout = Layout::probe(&root);
        assert_eq!(
            layout,
            Layout::V1 {
                root: root.clone(),
                controllers: vec!["memory".into(), "cpu".into()]
            }
        );
        let rel = vmm_cgroup("/kubepods/pod1", "sb").unwrap().unwrap();
        // The kernel creates the control files with the directory; here
        // the test does, for the memory one.
        let mem = root.join("memory").join(&rel);
        std::fs::create_dir_all(&mem).unwrap();
        std::fs::write(mem.join("memory.limit_in_bytes"), "max").unwrap();
        let cg = VmmCgroup::create(&layout, &rel, Limits::for_vm(256, 1, 64)).unwrap();
        assert_eq!(cg.memory_limit(), Some(320 << 20));
        assert_eq!(cg.procs_files().len(), 2);
        std::fs::remove_file(mem.join("memory.limit_in_bytes")).unwrap();
        cg.remove().unwrap();
        assert!(!mem.exists());
        cg.remove().unwrap();
        let _ = std::fs::remove_dir_all(&root);
    }
}
