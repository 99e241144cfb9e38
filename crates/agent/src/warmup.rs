//! Warming a VM up before its pod arrives (the sandboxer asks pooled VMs):
//! one throwaway container is created, started, exec'd into and deleted
//! through the OCI runtime, shaped like a Kubernetes container (its
//! namespaces, mounts, masked paths, device rules, capabilities). Under
//! emulation (TCG) the first container of a VM pays for translating the
//! runtime's and the kernel's container code (~200 ms); a pooled VM pays it
//! while it waits instead of its pod's first container.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use serde_json::{json, Value};

use crate::error::{Context, Result};
use crate::process::null_stdio;
use crate::runtime::OciRuntime;

/// The warm-up container's id and bundle (never a container of a pod: the
/// sandboxer's ids never start with "kuasar-warmup" and the bundle lives
/// outside /run/kuasar/containers).
const ID: &str = "kuasar-warmup";
const DIR: &str = "/run/kuasar/warmup";
/// The guest's busybox, the container's one program.
const BUSYBOX: &str = "/bin/busybox";

/// Runs the warm-up; returns how long it took. Whatever it leaves is removed,
/// also when a step fails.
pub async fn warm_up(runtime: &OciRuntime) -> Result<Duration> {
    let started = Instant::now();
    let bundle = PathBuf::from(DIR);
    let program = bundle.join("rootfs/busybox");
    let res = run(runtime, &bundle, &program).await;
    let _ = runtime.delete(ID).await;
    let _ = umount2(&program, MntFlags::MNT_DETACH);
    let _ = std::fs::remove_dir_all(&bundle);
    res.map(|()| started.elapsed())
}

async fn run(runtime: &OciRuntime, bundle: &Path, program: &Path) -> Result<()> {
    let rootfs = program.parent().unwrap_or(bundle);
    std::fs::create_dir_all(rootfs).context("create the warm-up rootfs")?;
    std::fs::write(program, b"").context("create the warm-up program's mount point")?;
    mount(
        Some(BUSYBOX),
        program,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .context("bind busybox into the warm-up rootfs")?;
    let config = spec(rootfs, &["/busybox", "sleep", "5"]);
    std::fs::write(bundle.join("config.json"), config.to_string())
        .context("write the warm-up spec")?;
    runtime
        .create(ID, bundle, &bundle.join("init.pid"), null_stdio(), None)
        .await?;
    runtime.start(ID).await?;
    let process = bundle.join("exec.json");
    let mut exec = config["process"].clone();
    exec["args"] = json!(["/busybox", "true"]);
    std::fs::write(&process, exec.to_string()).context("write the exec spec")?;
    runtime
        .exec(ID, &process, &bundle.join("exec.pid"), null_stdio(), None)
        .await
}

/// A container spec as containerd writes one for a Kubernetes container.
fn spec(rootfs: &Path, args: &[&str]) -> Value {
    let caps = json!([
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE"
    ]);
    let dev = |t: &str, major: i64, minor: i64| json!({"allow": true, "type": t, "major": major, "minor": minor, "access": "rwm"});
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": rootfs, "readonly": true},
        "hostname": "warmup",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "cgroupsPath": "/kuasar-warmup",
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"},
                           {"type": "mount"}, {"type": "cgroup"}],
            "resources": {
                "devices": [{"allow": false, "access": "rwm"}, dev("c", 1, 3), dev("c", 1, 8),
                            dev("c", 1, 7), dev("c", 5, 0), dev("c", 1, 5), dev("c", 1, 9),
                            dev("c", 5, 1), dev("c", 5, 2),
                            {"allow": true, "type": "c", "major": 136, "access": "rwm"}],
                "cpu": {"shares": 2},
                "memory": {"limit": 33554432}
            },
            "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                            "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug",
                            "/proc/scsi", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                              "/proc/sysrq-trigger"]
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_is_a_container_crun_reads() {
        let s = spec(Path::new("/r"), &["/busybox", "true"]);
        assert_eq!(s["root"]["path"], "/r");
        assert_eq!(s["process"]["args"][1], "true");
        assert_eq!(s["linux"]["resources"]["devices"][0]["allow"], false);
        // /dev/pts/*: every minor.
        assert!(s["linux"]["resources"]["devices"][9].get("minor").is_none());
        assert_eq!(s["mounts"].as_array().map(Vec::len), Some(6));
    }
}
