//! What the host sees of a VMM process, read from /proc: its resident
//! memory and the CPU time it used. Shared by the Prometheus endpoint and
//! containerd's SandboxMetrics / Controller.Metrics. The parsers are pure;
//! [`read`] is the only part that touches the file system.
use std::time::Duration;

/// One process's footprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProcUsage {
    /// Resident set size (`VmRSS` of /proc/<pid>/status).
    pub rss_bytes: u64,
    /// User + system time (`utime` + `stime` of /proc/<pid>/stat).
    pub cpu_time: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadProcUsageError {
    #[error("read {path}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} has no readable {field}")]
    Parse { path: String, field: &'static str },
}

/// Reads the footprint of process `pid` (an error once it is gone).
pub fn read(pid: u32) -> Result<ProcUsage, ReadProcUsageError> {
    let read = |name: &str| {
        let path = format!("/proc/{pid}/{name}");
        std::fs::read_to_string(&path)
            .map(|text| (text, path.clone()))
            .map_err(|source| ReadProcUsageError::Read { path, source })
    };
    let (status, path) = read("status")?;
    let rss_bytes = parse_vm_rss(&status).ok_or(ReadProcUsageError::Parse {
        path,
        field: "VmRSS",
    })?;
    let (stat, path) = read("stat")?;
    let ticks = parse_cpu_ticks(&stat).ok_or(ReadProcUsageError::Parse {
        path,
        field: "utime and stime",
    })?;
    Ok(ProcUsage {
        rss_bytes,
        cpu_time: ticks_to_duration(ticks, clock_ticks_per_sec()),
    })
}

/// `VmRSS` of a /proc/<pid>/status text, in bytes (None for a kernel
/// thread, which has none, or a malformed line).
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    let value = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kib: u64 = value.trim().strip_suffix("kB")?.trim().parse().ok()?;
    kib.checked_mul(1024)
}

/// `utime` + `stime` (fields 14 and 15, in clock ticks) of a
/// /proc/<pid>/stat text. The command (field 2) may hold spaces and
/// parentheses: the fields after it start after its last `)`.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

/// `ticks` clock ticks at `hz` ticks a second (0 is taken as 1).
pub fn ticks_to_duration(ticks: u64, hz: u64) -> Duration {
    let hz = hz.max(1);
    let nanos = (ticks % hz) * 1_000_000_000 / hz;
    Duration::from_secs(ticks / hz) + Duration::from_nanos(nanos)
}

/// The kernel's USER_HZ (`sysconf(_SC_CLK_TCK)`), the unit of /proc's times.
pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).unwrap_or(100).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tqemu-system-x86\nUmask:\t0022\nState:\tS (sleeping)\n\
        VmPeak:\t 1234568 kB\nVmRSS:\t  215040 kB\nRssAnon:\t  180000 kB\nThreads:\t4\n";

    #[test]
    fn vm_rss_in_bytes() {
        assert_eq!(parse_vm_rss(STATUS), Some(215_040 * 1024));
        assert_eq!(parse_vm_rss("VmRSS: 0 kB"), Some(0));
        // A kernel thread has no VmRSS; malformed values are not guessed.
        for bad in [
            "Name:\tkthreadd\nState:\tS\n",
            "VmRSS:\t12 MB\n",
            "VmRSS:\t kB\n",
            "VmRSS:\t-4 kB\n",
            "VmRSS:\t18446744073709551615 kB\n",
            "",
        ] {
            assert_eq!(parse_vm_rss(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn cpu_ticks_are_utime_plus_stime() {
        let stat = "4242 (qemu-system-x86) S 1 4242 4242 0 -1 4194560 5000 0 0 0 \
            1500 250 0 0 20 0 4 0 12345 1234567 53760 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat), Some(1750));
        // A command with spaces and parentheses.
        let stat = "7 (a) b) (c) R 1 7 7 0 -1 0 0 0 0 0 30 12 0 0 20 0 1 0 1 1 1";
        assert_eq!(parse_cpu_ticks(stat), Some(42));
        for bad in [
            "",
            "7 (short) R 1 2",
            "7 no-parens R 1 7 7 0 -1 0 0 0 0 0 30 12",
            "7 (x) R 1 7 7 0 -1 0 0 0 0 0 thirty 12",
            "7 (x) R 1 7 7 0 -1 0 0 0 0 0 18446744073709551615 1",
        ] {
            assert_eq!(parse_cpu_ticks(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn ticks_become_a_duration() {
        assert_eq!(ticks_to_duration(250, 100), Duration::from_millis(2500));
        assert_eq!(ticks_to_duration(1, 3), Duration::from_nanos(333_333_333));
        assert_eq!(ticks_to_duration(7, 0), Duration::from_secs(7));
        assert_eq!(
            ticks_to_duration(u64::MAX, 100),
            Duration::from_secs(u64::MAX / 100) + Duration::from_millis(150)
        );
    }

    #[test]
    fn reads_this_process() {
        let usage = read(std::process::id()).unwrap();
        assert!(usage.rss_bytes > 0, "{usage:?}");
        // Not a process: an error naming the file.
        let err = read(u32::MAX).unwrap_err().to_string();
        assert!(err.contains(&format!("/proc/{}/status", u32::MAX)), "{err}");
    }
}
