//! Probes of what the host offers a VMM: a KVM that really runs guests, the TSC rate.
use std::path::Path;

/// True when `/dev/kvm` can run a stock guest kernel: the device exists, the
/// CPU has hardware virtualisation, and it is not PVM-style nested KVM
/// (which hangs a stock kernel right after the firmware).
pub fn kvm_usable() -> bool {
    if !Path::new("/dev/kvm").exists() || Path::new("/sys/module/kvm_pvm").exists() {
        return false;
    }
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| cpu_has_virt(&c))
        .unwrap_or(false)
}

fn cpu_has_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// The host's TSC frequency in kHz: the kernel's measurement from its log
/// when readable, else the processor speed from /proc/cpuinfo.
pub fn tsc_khz() -> Option<u64> {
    let kmsg = std::process::Command::new("dmesg")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    if let Some(khz) = kmsg.as_deref().and_then(tsc_from_kernel_log) {
        return Some(khz);
    }
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| tsc_from_cpuinfo(&c))
}

fn mhz_to_khz(text: &str) -> Option<u64> {
    let mhz: f64 = text.trim().parse().ok()?;
    (mhz > 0.0).then(|| (mhz * 1000.0).round() as u64)
}

fn tsc_from_kernel_log(log: &str) -> Option<u64> {
    // "tsc: Refined TSC clocksource calibration: 2596.140 MHz" beats
    // "tsc: Detected 2596.138 MHz processor".
    let find = |marker: &str| {
        log.lines().rev().find_map(|l| {
            let rest = &l[l.find(marker)? + marker.len()..];
            mhz_to_khz(rest.split_whitespace().next()?)
        })
    };
    find("Refined TSC clocksource calibration:").or_else(|| find("tsc: Detected"))
}

fn tsc_from_cpuinfo(cpuinfo: &str) -> Option<u64> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| mhz_to_khz(l.split(':').nth(1)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tsc_from_kernel_log() {
        let log = "[    0.000062] tsc: Detected 2596.138 MHz processor\n";
        assert_eq!(tsc_from_kernel_log(log), Some(2_596_138));
        let refined =
            format!("{log}[ 1.2] tsc: Refined TSC clocksource calibration: 2596.141 MHz\n");
        assert_eq!(tsc_from_kernel_log(&refined), Some(2_596_141));
        assert_eq!(tsc_from_kernel_log("nothing here"), None);
    }

    #[test]
    fn reads_tsc_from_cpuinfo() {
        assert_eq!(tsc_from_cpuinfo("cpu MHz\t\t: 2596.138\n"), Some(2_596_138));
        assert_eq!(tsc_from_cpuinfo("cpu MHz : garbage\n"), None);
    }

    #[test]
    fn virt_flags() {
        assert!(cpu_has_virt("flags\t: fpu vmx sse\n"));
        assert!(!cpu_has_virt("flags\t: fpu sse\n"));
    }
}
