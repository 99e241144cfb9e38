//! Where the binaries, the guest image and the test images are, and the
//! check that they are there.
use std::path::{Path, PathBuf};

/// The runtime name containerd maps to `containerd-shim-kuasar-vmm-v2`.
pub const RUNTIME: &str = "io.containerd.kuasar-vmm.v2";
/// The test image (scripts/build-test-images.sh).
pub const BUSYBOX: &str = "docker.io/library/busybox:latest";

/// The containerd binary the tests run, when not Debian's on PATH (another
/// release; scripts/containerd.sh reads it too).
pub const CONTAINERD_ENV: &str = "KUASAR_CONTAINERD";

const HINT: &str = "run `make build guest images` (as root) first";

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// kuasar-vmm and the shim: `$KUASAR_BIN_DIR`, else `release/` of the
/// cargo target dir (`$CARGO_TARGET_DIR`, else `<repo>/target`).
pub fn bin_dir() -> PathBuf {
    env_path("KUASAR_BIN_DIR").unwrap_or_else(|| {
        env_path("CARGO_TARGET_DIR")
            .map(|d| {
                if d.is_relative() {
                    repo_root().join(d)
                } else {
                    d
                }
            })
            .unwrap_or_else(|| repo_root().join("target"))
            .join("release")
    })
}

/// The operator's CLI, beside kuasar-vmm in [`bin_dir`].
pub fn kuasarctl() -> PathBuf {
    bin_dir().join("kuasarctl")
}

/// The guest image: `$KUASAR_IMAGE_DIR`, else `/var/lib/kuasar`.
pub fn image_dir() -> PathBuf {
    env_path("KUASAR_IMAGE_DIR").unwrap_or_else(|| PathBuf::from("/var/lib/kuasar"))
}

/// The OCI archives: `$KUASAR_TEST_IMAGES`, else `/var/lib/kuasar/images`.
pub fn test_images_dir() -> PathBuf {
    env_path("KUASAR_TEST_IMAGES").unwrap_or_else(|| PathBuf::from("/var/lib/kuasar/images"))
}

/// The guest kernel's release (`<image_dir>/kernel-release`).
pub fn guest_kernel_release() -> String {
    let p = image_dir().join("kernel-release");
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("read {}: {e}; {HINT}", p.display()))
        .trim()
        .to_string()
}

/// The release of Debian's kernel, the fallback (`<image_dir>/vmlinux-debian.release`).
pub fn fallback_kernel_release() -> String {
    let p = image_dir().join("vmlinux-debian.release");
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("read {}: {e}; {HINT}", p.display()))
        .trim()
        .to_string()
}

fn in_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
}

/// Everything the end-to-end tests need; the error says what is missing
/// and how to get it. The tests fail (never skip) without it.
pub fn check_prerequisites() -> Result<(), String> {
    let mut missing = Vec::new();
    let bin = bin_dir();
    for b in ["kuasar-vmm", "containerd-shim-kuasar-vmm-v2"] {
        if !bin.join(b).is_file() {
            missing.push(bin.join(b).display().to_string());
        }
    }
    let img = image_dir();
    for f in ["vmlinux", "initramfs.cpio", "kernel-release"] {
        if !img.join(f).is_file() {
            missing.push(img.join(f).display().to_string());
        }
    }
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!("missing {}: {HINT}", missing.join(", ")));
    }
    let mut tools: Vec<&str> = ["ctr", "qemu-system-x86_64", "runc"]
        .into_iter()
        .filter(|t| !in_path(t))
        .collect();
    match std::env::var_os(CONTAINERD_ENV) {
        Some(bin) if !Path::new(&bin).is_file() => problems.push(format!(
            "{CONTAINERD_ENV}={} is not a file",
            Path::new(&bin).display()
        )),
        Some(_) => {}
        None if !in_path("containerd") => tools.push("containerd"),
        None => {}
    }
    if !tools.is_empty() {
        problems.push(format!(
            "{} not found on PATH: run `make deps` (as root)",
            tools.join(", ")
        ));
    }
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        problems.push("the end-to-end tests need root (they run containerd and QEMU)".into());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("kuasar-e2e cannot run: {}", problems.join("; ")))
    }
}
