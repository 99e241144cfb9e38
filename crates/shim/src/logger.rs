//! Minimal line logger. Off by default; on with `KUASAR_SHIM_LOG=<file>`
//! (appended to) or `-debug` (written to containerd's shim log FIFO
//! `<bundle>/log`, which containerd copies into its own output).
//!
//! Lines: `<RFC 3339 UTC time> <level> shim[<pid>] <id>: <message>`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

pub const LOG_ENV: &str = "KUASAR_SHIM_LOG";

struct Sink {
    file: Mutex<File>,
    tag: String,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Opens the log target, if any. Later calls are ignored.
pub fn init(id: &str, debug: bool, bundle: Option<&Path>) {
    let file = match std::env::var_os(LOG_ENV).filter(|v| !v.is_empty()) {
        Some(path) => OpenOptions::new().create(true).append(true).open(path).ok(),
        // The FIFO is opened non-blocking: without a reader (containerd
        // restarted) the open fails and lines are dropped, never blocking.
        None if debug => bundle.and_then(|b| {
            OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(b.join("log"))
                .ok()
        }),
        None => None,
    };
    if let Some(file) = file {
        let tag = format!("shim[{}] {}", std::process::id(), id);
        let _ = SINK.set(Sink {
            file: Mutex::new(file),
            tag,
        });
    }
}

pub fn enabled() -> bool {
    SINK.get().is_some()
}

pub fn write(level: &str, args: std::fmt::Arguments<'_>) {
    let Some(sink) = SINK.get() else {
        return;
    };
    let line = format!("{} {level} {}: {args}\n", now_rfc3339(), sink.tag);
    if let Ok(mut f) = sink.file.lock() {
        // Best effort: a full or closed FIFO drops the line.
        let _ = f.write_all(line.as_bytes());
    }
}

/// `log!("info", "format {}", args)`: formats only when logging is on.
#[macro_export]
macro_rules! log {
    ($level:literal, $($arg:tt)*) => {
        if $crate::logger::enabled() {
            $crate::logger::write($level, format_args!($($arg)*));
        }
    };
}

fn now_rfc3339() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::civil_from_days;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
    }
}
