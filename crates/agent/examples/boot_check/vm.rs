//! The VM side of boot_check: the work directory, the rootfs and spec of a
//! test container, and QEMU started with the command line of docs/design.md.
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kuasar_api::agent::agent_ttrpc_async::AgentClient;
use kuasar_api::ttrpc::r#async::Client;
use serde_json::Value;

use crate::Res;

/// Kills QEMU and removes the work directory when dropped.
pub struct Vm {
    pub dir: PathBuf,
    pub qemu: Option<Child>,
    pub keep: bool,
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut q) = self.qemu.take() {
            let _ = q.kill();
            let _ = q.wait();
        }
        if self.keep {
            eprintln!("kept {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub fn host_tsc_khz() -> Option<u64> {
    let out = Command::new("dmesg").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("tsc: Detected"))?;
    let mhz: f64 = line
        .split("Detected ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((mhz * 1000.0).round() as u64)
}

pub fn make_rootfs(rootfs: &Path) -> Res<()> {
    let bin = rootfs.join("bin");
    std::fs::create_dir_all(&bin).map_err(|e| format!("mkdir rootfs: {e}"))?;
    for d in [
        "proc", "sys", "dev", "tmp", "etc", "usr/bin", "usr/sbin", "sbin",
    ] {
        std::fs::create_dir_all(rootfs.join(d)).map_err(|e| format!("mkdir {d}: {e}"))?;
    }
    std::fs::copy("/bin/busybox", bin.join("busybox"))
        .map_err(|e| format!("copy /bin/busybox (install busybox-static): {e}"))?;
    let out = Command::new("/bin/busybox")
        .arg("--list-full")
        .output()
        .map_err(|e| format!("busybox --list-full: {e}"))?;
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        let link = rootfs.join(applet);
        if applet != "bin/busybox" && !link.exists() {
            let _ = std::os::unix::fs::symlink("/bin/busybox", link);
        }
    }
    Ok(())
}

/// `runc spec`'s default spec with our args and no terminal.
pub fn make_spec(dir: &Path, args: &[&str]) -> Res<Vec<u8>> {
    let spec_dir = dir.join("spec");
    std::fs::create_dir_all(&spec_dir).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(spec_dir.join("config.json"));
    let st = Command::new("runc")
        .args(["spec", "--bundle"])
        .arg(&spec_dir)
        .status()
        .map_err(|e| format!("runc spec: {e}"))?;
    if !st.success() {
        return Err("runc spec failed".into());
    }
    let text = std::fs::read(spec_dir.join("config.json")).map_err(|e| e.to_string())?;
    let mut spec: Value = serde_json::from_slice(&text).map_err(|e| e.to_string())?;
    spec["process"]["terminal"] = Value::Bool(false);
    spec["process"]["args"] = args.iter().map(|a| Value::from(*a)).collect();
    serde_json::to_vec(&spec).map_err(|e| e.to_string())
}

/// Boots `kernel` (a file of `image_dir`, or an absolute path) with the
/// image's initramfs.
pub fn boot(image_dir: &Path, kernel: &Path, dir: &Path, tsc_khz: u64, extra: &str) -> Res<Child> {
    let d = |f: &str| dir.join(f).display().to_string();
    let append =
        format!("console=ttyS0 quiet panic=-1 cryptomgr.notests tsc_early_khz={tsc_khz} {extra}");
    let log = std::fs::File::create(dir.join("qemu.log")).map_err(|e| e.to_string())?;
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-name", "kuasar-boot-check", "-machine", "microvm,acpi=on"])
        .args([
            "-accel",
            "tcg,tb-size=16",
            "-cpu",
            "max",
            "-m",
            "256",
            "-smp",
            "1",
        ])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(image_dir.join(kernel))
        .arg("-initrd")
        .arg(image_dir.join("initramfs.cpio"))
        .args(["-append", &append])
        .args(["-serial", &format!("file:{}", d("console.log"))])
        .args(["-device", "virtio-serial-device"])
        .args([
            "-chardev",
            &format!(
                "socket,id=agent,path={},server=on,wait=off",
                d("agent.sock")
            ),
        ])
        .args(["-device", "virtserialport,chardev=agent,name=kuasar.agent"])
        .args([
            "-fsdev",
            &format!(
                "local,id=shared,path={},security_model=none,multidevs=remap",
                d("shared")
            ),
        ])
        .args(["-device", "virtio-9p-device,fsdev=shared,mount_tag=kuasar"])
        .args([
            "-qmp",
            &format!("unix:{},server=on,wait=off", d("qmp.sock")),
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    // SAFETY: prctl is async-signal-safe and only touches the child itself.
    unsafe {
        cmd.pre_exec(|| {
            // QEMU dies with us, even if we are killed.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn().map_err(|e| format!("spawn qemu: {e}"))
}

pub async fn connect(sock: &Path, deadline: Instant) -> Res<AgentClient> {
    let addr = format!("unix://{}", sock.display());
    loop {
        match Client::connect(&addr) {
            Ok(c) => return Ok(AgentClient::new(c)),
            Err(e) if Instant::now() > deadline => return Err(format!("connect {addr}: {e}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}
