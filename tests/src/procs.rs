//! Finding the processes of a private test environment, and cleaning up
//! what it left behind: a process belongs to environment DIR when its
//! command line mentions `DIR/` or its environment has `KUASAR_TEST_DIR=DIR`.
use std::fs;
use std::path::Path;
use std::time::Duration;

use crate::cmd::wait_until;

pub const QEMU: &str = "qemu-system-x86_64";
/// A VM's virtiofsd (two processes: the one started and its sandboxed child).
pub const VIRTIOFSD: &str = "virtiofsd";
pub const SHIM: &str = "containerd-shim-kuasar-vmm-v2";
pub const RUNC_SHIM: &str = "containerd-shim-runc-v2";
pub const SANDBOXER: &str = "kuasar-vmm";
pub const CONTAINERD: &str = "containerd";
/// Every kind of process an environment may start.
pub const ALL: &[&str] = &[SHIM, RUNC_SHIM, QEMU, SANDBOXER, CONTAINERD];

#[derive(Debug, Clone)]
pub struct Proc {
    pub pid: i32,
    /// Base name of argv[0].
    pub name: String,
    pub cmdline: String,
}

fn mentions(args: &[String], environ: impl FnOnce() -> Vec<u8>, dir: &str) -> bool {
    let prefix = format!("{dir}/");
    if args.iter().any(|a| a == dir || a.contains(&prefix)) {
        return true;
    }
    let marker = format!("KUASAR_TEST_DIR={dir}");
    environ()
        .split(|b| *b == 0)
        .any(|kv| kv == marker.as_bytes())
}

/// Processes named one of `names` that belong to `dir`.
pub fn find(dir: &Path, names: &[&str]) -> Vec<Proc> {
    let dir = dir.to_string_lossy();
    let dir = dir.trim_end_matches('/');
    let me = std::process::id() as i32;
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(raw) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let Some(argv0) = args.first() else { continue };
        let name = argv0.rsplit('/').next().unwrap_or(argv0).to_string();
        if !names.contains(&name.as_str()) {
            continue;
        }
        let environ = || fs::read(entry.path().join("environ")).unwrap_or_default();
        if mentions(&args, environ, dir) {
            found.push(Proc {
                pid,
                name,
                cmdline: args.join(" "),
            });
        }
    }
    found.sort_by_key(|p| p.pid);
    found
}

/// How many processes named `name` belong to `dir`.
pub fn count(dir: &Path, name: &str) -> usize {
    find(dir, &[name]).len()
}

pub fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

pub fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// SIGKILLs every process of `dir` (of the kinds in `names`) and waits
/// (bounded) until they are gone; returns what it killed.
pub fn kill_all(dir: &Path, names: &[&str]) -> Vec<Proc> {
    let victims = find(dir, names);
    for p in &victims {
        signal(p.pid, libc::SIGKILL);
    }
    wait_until(Duration::from_secs(5), || {
        victims.iter().all(|p| !alive(p.pid))
    });
    victims
}

/// Mount points at or below `dir`, newest first.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy();
    let dir = dir.trim_end_matches('/');
    let prefix = format!("{dir}/");
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|m| m == dir || m.starts_with(&prefix))
        .collect();
    found.reverse();
    found
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(oct, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts everything at or below `dir` (lazily when busy); returns what
/// could not be unmounted.
pub fn unmount_under(dir: &Path) -> Vec<String> {
    for _ in 0..3 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            return mounts;
        }
        for m in mounts {
            let Ok(c) = std::ffi::CString::new(m) else {
                continue;
            };
            // SAFETY: `c` is a valid NUL-terminated path that outlives the calls.
            unsafe {
                if libc::umount2(c.as_ptr(), 0) != 0 {
                    libc::umount2(c.as_ptr(), libc::MNT_DETACH);
                }
            }
        }
    }
    mounts_under(dir)
}

/// Last resort for `dir`: kill its processes, unmount, remove it (never
/// across a mount point). Returns a description of what was left over.
pub fn sweep(dir: &Path) -> Vec<String> {
    let mut leftovers = Vec::new();
    for p in kill_all(dir, ALL) {
        leftovers.push(format!("killed {} (pid {}): {}", p.name, p.pid, p.cmdline));
    }
    let stuck = unmount_under(dir);
    if !stuck.is_empty() {
        leftovers.push(format!(
            "could not unmount {stuck:?}; {} kept",
            dir.display()
        ));
        return leftovers;
    }
    if dir.exists() {
        if let Err(e) = fs::remove_dir_all(dir) {
            leftovers.push(format!("could not remove {}: {e}", dir.display()));
        }
    }
    leftovers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_paths_below_the_dir_only() {
        let none = Vec::new;
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(mentions(
            &args(&[
                "qemu",
                "-chardev",
                "socket,path=/run/e2e-1/vmm/a/agent.sock"
            ]),
            none,
            "/run/e2e-1"
        ));
        assert!(mentions(
            &args(&["shim", "-address", "/run/e2e-1/containerd.sock"]),
            none,
            "/run/e2e-1"
        ));
        assert!(!mentions(
            &args(&["shim", "-address", "/run/e2e-12/containerd.sock"]),
            none,
            "/run/e2e-1"
        ));
        assert!(mentions(
            &args(&["x"]),
            || b"A=1\0KUASAR_TEST_DIR=/run/e2e-1\0".to_vec(),
            "/run/e2e-1"
        ));
        assert!(!mentions(
            &args(&["x"]),
            || b"KUASAR_TEST_DIR=/run/e2e-10\0".to_vec(),
            "/run/e2e-1"
        ));
    }

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path("/a\\040b"), "/a b");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
        assert_eq!(unescape_mount_path("/end\\"), "/end\\");
    }
}
