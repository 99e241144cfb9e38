//! A census of what an environment holds on the host: processes (QEMU,
//! virtiofsd, shims), mounts under its directory, network leftovers (netns files,
//! ports of its CNI bridge, IPs held by host-local IPAM), sockets and
//! sandbox directories in the sandboxer's state dir, and kuasar-vmm's open
//! file descriptors and threads. Two censuses taken with the same pods
//! running must be equal; [`Census::diff`] names what differs.
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::procs;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Census {
    pub qemus: usize,
    pub virtiofsds: usize,
    pub shims: usize,
    pub runc_shims: usize,
    /// Mount points at or below the environment's directory.
    pub mounts: Vec<String>,
    /// Files in containerd's netns directory (CRI's pod namespaces).
    pub netns: Vec<String>,
    /// Interfaces enslaved to the environment's CNI bridge (one veth per pod).
    pub bridge_ports: Vec<String>,
    /// Addresses host-local IPAM holds for pods.
    pub ipam: Vec<String>,
    /// Entries of the sandboxer's state dir (one directory per sandbox).
    pub state_entries: Vec<String>,
    /// Unix sockets anywhere below the state dir.
    pub state_sockets: Vec<String>,
    /// Entries of the shims' socket directory.
    pub shim_sockets: Vec<String>,
    /// kuasar-vmm's pid (0 when it does not run).
    pub vmm_pid: i32,
    /// kuasar-vmm's open fds, counted by what they point at (`socket`,
    /// `anon_inode:[eventfd]`, `/dev/net/tun`, paths, ...).
    pub vmm_fds: BTreeMap<String, usize>,
    pub vmm_threads: usize,
    /// kuasar-vmm's resident set, kB (printed, never compared).
    pub vmm_rss_kb: u64,
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Unix sockets below `dir` (not following symlinks).
fn sockets_below(dir: &Path, out: &mut Vec<String>) {
    use std::os::unix::fs::FileTypeExt;
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_socket() {
            out.push(e.path().display().to_string());
        } else if ft.is_dir() {
            sockets_below(&e.path(), out);
        }
    }
}

/// Directories named `netns` at most three levels below `dir`.
fn netns_dirs(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            continue;
        }
        if e.file_name() == "netns" {
            out.push(e.path());
        } else if depth > 0 {
            netns_dirs(&e.path(), depth - 1, out);
        }
    }
}

/// The CNI bridge scripts/containerd.sh names for `dir`:
/// `kbr` + the first 8 characters of `cksum` of the path.
pub fn bridge_name(dir: &Path) -> String {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("printf '%s' \"$1\" | cksum")
        .arg("sh")
        .arg(dir)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    format!("kbr{}", out.chars().take(8).collect::<String>())
}

/// What fd `link` points at, with inode numbers dropped
/// (`socket:[123]` -> `socket`; `anon_inode:[eventfd]` stays).
fn fd_kind(link: &Path) -> String {
    let t = fs::read_link(link)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "?".into());
    match t.split_once(":[") {
        Some((kind, inode))
            if !t.starts_with('/')
                && inode
                    .trim_end_matches(']')
                    .bytes()
                    .all(|b| b.is_ascii_digit()) =>
        {
            kind.to_string()
        }
        _ => t,
    }
}

fn status_field(pid: i32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

impl Census {
    /// Counts what the environment in `dir` holds now (state dir
    /// `dir/vmm`, containerd's state `dir/state`, shim sockets `dir/s`).
    pub fn take(dir: &Path) -> Census {
        let state_dir = dir.join("vmm");
        let mut netns = Vec::new();
        let mut dirs = Vec::new();
        netns_dirs(&dir.join("state"), 3, &mut dirs);
        for d in dirs {
            netns.extend(
                entries(&d)
                    .into_iter()
                    .map(|n| format!("{}/{n}", d.display())),
            );
        }
        let bridge = bridge_name(dir);
        let mut ipam: Vec<String> = Vec::new();
        for net in entries(&dir.join("cni").join("ipam")) {
            for f in entries(&dir.join("cni").join("ipam").join(&net)) {
                // host-local keeps `last_reserved_ip.0` and a lock besides
                // one file per address.
                if f.starts_with("last_reserved_ip") || f == "lock" {
                    continue;
                }
                ipam.push(format!("{net}/{f}"));
            }
        }
        let mut state_sockets = Vec::new();
        sockets_below(&state_dir, &mut state_sockets);
        state_sockets.sort();
        let vmm_pid = procs::find(dir, &[procs::SANDBOXER])
            .first()
            .map(|p| p.pid)
            .unwrap_or(0);
        let mut vmm_fds = BTreeMap::new();
        if vmm_pid != 0 {
            if let Ok(rd) = fs::read_dir(format!("/proc/{vmm_pid}/fd")) {
                for e in rd.flatten() {
                    *vmm_fds.entry(fd_kind(&e.path())).or_insert(0) += 1;
                }
            }
        }
        Census {
            qemus: procs::count(dir, procs::QEMU),
            virtiofsds: procs::count(dir, procs::VIRTIOFSD),
            shims: procs::count(dir, procs::SHIM),
            runc_shims: procs::count(dir, procs::RUNC_SHIM),
            mounts: procs::mounts_under(dir),
            netns,
            bridge_ports: entries(&Path::new("/sys/class/net").join(&bridge).join("brif")),
            ipam,
            state_entries: entries(&state_dir),
            state_sockets,
            shim_sockets: entries(&dir.join("s")),
            vmm_pid,
            vmm_fds,
            vmm_threads: entries(Path::new(&format!("/proc/{vmm_pid}/task"))).len(),
            vmm_rss_kb: status_field(vmm_pid, "VmRSS:"),
        }
    }

    pub fn fd_count(&self) -> usize {
        self.vmm_fds.values().sum()
    }

    /// What differs from `before` (empty: nothing). RSS is not compared.
    pub fn diff(&self, before: &Census) -> Vec<String> {
        self.diff_with(before, false)
    }

    /// Like [`Census::diff`], except that fewer kuasar-vmm threads than
    /// before is fine: idle threads of its blocking pool that were still
    /// there when `before` was taken end 10 s after their last use.
    pub fn diff_threads_may_shrink(&self, before: &Census) -> Vec<String> {
        self.diff_with(before, true)
    }

    fn diff_with(&self, before: &Census, threads_may_shrink: bool) -> Vec<String> {
        let mut d = self.diff_host(before);
        let mut num = |what: &str, a: usize, b: usize| {
            if a != b {
                d.push(format!("{what}: {b} -> {a}"));
            }
        };
        num("kuasar-vmm fds", self.fd_count(), before.fd_count());
        if !(threads_may_shrink && self.vmm_threads < before.vmm_threads) {
            num("kuasar-vmm threads", self.vmm_threads, before.vmm_threads);
        }
        if self.vmm_pid != before.vmm_pid {
            d.push(format!(
                "kuasar-vmm pid: {} -> {}",
                before.vmm_pid, self.vmm_pid
            ));
        }
        if self.vmm_fds != before.vmm_fds {
            let kinds: std::collections::BTreeSet<&String> =
                self.vmm_fds.keys().chain(before.vmm_fds.keys()).collect();
            for k in kinds {
                let (a, b) = (
                    self.vmm_fds.get(k).copied().unwrap_or(0),
                    before.vmm_fds.get(k).copied().unwrap_or(0),
                );
                if a != b {
                    d.push(format!("  kuasar-vmm fds to {k}: {b} -> {a}"));
                }
            }
        }
        d
    }

    /// What differs from `before` outside kuasar-vmm's own process (its fds
    /// and threads are left out: they may grow once, on first use).
    pub fn diff_host(&self, before: &Census) -> Vec<String> {
        let mut d = Vec::new();
        let mut num = |what: &str, a: usize, b: usize| {
            if a != b {
                d.push(format!("{what}: {b} -> {a}"));
            }
        };
        num("QEMU processes", self.qemus, before.qemus);
        num("virtiofsd processes", self.virtiofsds, before.virtiofsds);
        num("kuasar shims", self.shims, before.shims);
        num("runc shims", self.runc_shims, before.runc_shims);
        let mut list = |what: &str, a: &Vec<String>, b: &Vec<String>| {
            if a != b {
                let added: Vec<&String> = a.iter().filter(|x| !b.contains(x)).collect();
                let gone: Vec<&String> = b.iter().filter(|x| !a.contains(x)).collect();
                d.push(format!(
                    "{what}: {} -> {} (new {added:?}, gone {gone:?})",
                    b.len(),
                    a.len()
                ));
            }
        };
        list("mounts", &self.mounts, &before.mounts);
        list("netns files", &self.netns, &before.netns);
        list("bridge ports", &self.bridge_ports, &before.bridge_ports);
        list("IPAM addresses", &self.ipam, &before.ipam);
        list("state entries", &self.state_entries, &before.state_entries);
        list("state sockets", &self.state_sockets, &before.state_sockets);
        list("shim sockets", &self.shim_sockets, &before.shim_sockets);
        d
    }

    /// Takes censuses until `diff` (e.g. [`Census::diff`]) finds nothing
    /// between one and `before` (threads of blocking pools linger for
    /// seconds after use, containerd removes some things asynchronously) or
    /// `timeout` passes; returns the last one and how long it took.
    pub fn settle(
        dir: &Path,
        before: &Census,
        diff: fn(&Census, &Census) -> Vec<String>,
        timeout: Duration,
    ) -> (Census, Duration) {
        let start = Instant::now();
        loop {
            let now = Census::take(dir);
            if diff(&now, before).is_empty() || start.elapsed() >= timeout {
                return (now, start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// One line per item, for the test's output.
    pub fn summary(&self) -> String {
        format!(
            "QEMU {}, virtiofsd {}, kuasar shims {}, runc shims {}, mounts {}, netns {}, bridge ports {}, \
             IPAM addresses {}, state entries {}, state sockets {}, shim sockets {}, \
             kuasar-vmm (pid {}) fds {} {:?}, threads {}, RSS {} kB",
            self.qemus,
            self.virtiofsds,
            self.shims,
            self.runc_shims,
            self.mounts.len(),
            self.netns.len(),
            self.bridge_ports.len(),
            self.ipam.len(),
            self.state_entries.len(),
            self.state_sockets.len(),
            self.shim_sockets.len(),
            self.vmm_pid,
            self.fd_count(),
            self.vmm_fds,
            self.vmm_threads,
            self.vmm_rss_kb
        )
    }
}
