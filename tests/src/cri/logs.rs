//! Container logs in the CRI format, as containerd writes them at the
//! container's log path: one entry per line,
//! `<RFC3339Nano timestamp> <stdout|stderr> <P|F> <content>`, where `P` marks
//! a partial line (the content continues in the next entry) and `F` a full one.
use std::path::Path;
use std::time::Duration;

use crate::cmd;

/// Which stream an entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    Stdout,
    Stderr,
}

/// One parsed entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub timestamp: String,
    pub stream: LogStream,
    /// `false` for a `P` (partial) entry.
    pub full: bool,
    pub content: String,
}

/// Why a line is not a CRI log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub line: String,
    pub reason: &'static str,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "not a CRI log line ({}): {:?}", self.reason, self.line)
    }
}

impl std::error::Error for ParseError {}

/// Checks the shape of an RFC 3339 timestamp with a zone
/// (`2024-01-02T03:04:05.123456789Z` or `...+01:00`).
fn is_rfc3339(ts: &str) -> bool {
    let b = ts.as_bytes();
    if b.len() < 20 {
        return false;
    }
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    let date_time = digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    if !date_time {
        return false;
    }
    let mut rest = &ts[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return false;
        }
        rest = &frac[n..];
    }
    rest == "Z"
        || (rest.len() == 6
            && (rest.starts_with('+') || rest.starts_with('-'))
            && rest.as_bytes()[3] == b':')
}

/// Parses one entry (without its newline).
pub fn parse_line(line: &str) -> Result<LogLine, ParseError> {
    let err = |reason| ParseError {
        line: line.to_string(),
        reason,
    };
    let mut parts = line.splitn(4, ' ');
    let timestamp = parts.next().unwrap_or_default();
    if !is_rfc3339(timestamp) {
        return Err(err("bad timestamp"));
    }
    let stream = match parts.next() {
        Some("stdout") => LogStream::Stdout,
        Some("stderr") => LogStream::Stderr,
        _ => return Err(err("bad stream")),
    };
    let full = match parts.next() {
        Some("F") => true,
        Some("P") => false,
        _ => return Err(err("bad tag")),
    };
    Ok(LogLine {
        timestamp: timestamp.to_string(),
        stream,
        full,
        content: parts.next().unwrap_or_default().to_string(),
    })
}

/// Parses a whole log file's text; a last line without its newline (still
/// being written) is ignored.
pub fn parse(text: &str) -> Result<Vec<LogLine>, ParseError> {
    let complete = match text.rfind('\n') {
        Some(i) => &text[..i],
        None => return Ok(Vec::new()),
    };
    complete.lines().map(parse_line).collect()
}

/// Reads and parses the log at `path` (an absent file is an empty log).
pub fn read(path: &Path) -> Result<Vec<LogLine>, ParseError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text),
        Err(_) => Ok(Vec::new()),
    }
}

/// Joins partial entries into the lines the container wrote, per stream.
pub fn lines(entries: &[LogLine], stream: LogStream) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for e in entries.iter().filter(|e| e.stream == stream) {
        cur.push_str(&e.content);
        if e.full {
            out.push(std::mem::take(&mut cur));
        }
    }
    out
}

/// Waits until the log at `path` holds a full line of `stream` for which
/// `want` is true; returns it, or the whole log (for the message) on timeout.
pub fn wait_for_line(
    path: &Path,
    stream: LogStream,
    timeout: Duration,
    mut want: impl FnMut(&str) -> bool,
) -> Result<String, String> {
    let mut found = None;
    cmd::wait_until(timeout, || {
        if let Ok(entries) = read(path) {
            found = lines(&entries, stream).into_iter().find(|l| want(l));
        }
        found.is_some()
    });
    found.ok_or_else(|| {
        format!(
            "no such {stream:?} line in {} after {timeout:?}; log:\n{}",
            path.display(),
            std::fs::read_to_string(path).unwrap_or_else(|e| format!("(unreadable: {e})"))
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_and_partial_entries() {
        let text = "2024-05-01T10:11:12.123456789Z stdout P hel\n\
                    2024-05-01T10:11:12.2Z stdout F lo world\n\
                    2024-05-01T10:11:13+02:00 stderr F oops\n\
                    2024-05-01T10:11:14Z stdout F \n\
                    2024-05-01T10:11:15Z stdout F trailing";
        let entries = parse(text).unwrap();
        assert_eq!(entries.len(), 4);
        assert!(!entries[0].full);
        assert_eq!(entries[2].stream, LogStream::Stderr);
        assert_eq!(
            lines(&entries, LogStream::Stdout),
            vec!["hello world".to_string(), String::new()]
        );
        assert_eq!(lines(&entries, LogStream::Stderr), vec!["oops".to_string()]);
    }

    #[test]
    fn rejects_other_formats() {
        for bad in [
            "hello",
            "2024-05-01 10:11:12Z stdout F x",
            "2024-05-01T10:11:12Z stdin F x",
            "2024-05-01T10:11:12Z stdout X x",
            "2024-05-01T10:11:12 stdout F x",
        ] {
            assert!(parse_line(bad).is_err(), "{bad}");
        }
    }
}
