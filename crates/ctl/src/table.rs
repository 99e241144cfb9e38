//! The table `kuasarctl list` prints.
use crate::view::Sandbox;

/// How much of an id the table shows.
pub const SHORT_ID: usize = 12;

const HEADER: [&str; 8] = [
    "SANDBOX ID",
    "MODE",
    "STATE",
    "VMM PID",
    "CPU/MEM",
    "IPS",
    "CONTAINERS",
    "AGE",
];

/// The table of `sandboxes` at time `now` (seconds since the Unix epoch).
pub fn render(sandboxes: &[Sandbox], now: u64) -> String {
    let rows: Vec<[String; 8]> = sandboxes.iter().map(|s| row(s, now)).collect();
    let mut widths = HEADER.map(str::len);
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header = HEADER.map(String::from);
    for r in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

fn row(s: &Sandbox, now: u64) -> [String; 8] {
    let dash = || "-".to_owned();
    [
        s.id.chars().take(SHORT_ID).collect(),
        s.mode.clone(),
        s.state.clone(),
        s.vmm_pid.map_or_else(dash, |p| p.to_string()),
        match (s.vcpus, s.memory_mib) {
            (Some(c), Some(m)) => format!("{c}/{m}Mi"),
            _ => dash(),
        },
        if s.ips.is_empty() {
            dash()
        } else {
            s.ips.join(",")
        },
        s.containers.len().to_string(),
        age(now.saturating_sub(s.created_at)),
    ]
}

/// A duration in seconds, as its largest unit (and the next for small counts).
pub fn age(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..600 => format!("{}m{}s", secs / 60, secs % 60),
        600..3600 => format!("{}m", secs / 60),
        3600..36000 => format!("{}h{}m", secs / 3600, secs % 3600 / 60),
        36000..86400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::{Container, Files};

    fn sandbox(id: &str, ips: &[&str], pid: Option<u32>) -> Sandbox {
        Sandbox {
            id: id.into(),
            namespace: "k8s.io".into(),
            mode: "zero-shim".into(),
            state: "running".into(),
            vmm_pid: pid,
            vcpus: pid.map(|_| 1),
            memory_mib: pid.map(|_| 256),
            ips: ips.iter().map(|s| s.to_string()).collect(),
            hostname: String::new(),
            created_at: 1000,
            containers: vec![Container {
                id: "c".into(),
                pid: 7,
                state: "running".into(),
                exit_status: None,
            }],
            files: Files {
                state_dir: "/x".into(),
                console_log: None,
                task_socket: None,
            },
        }
    }

    #[test]
    fn columns_line_up_and_ids_are_cut() {
        let text = render(
            &[
                sandbox("0123456789abcdef0123", &["10.88.0.5/16"], Some(4242)),
                sandbox("short", &[], None),
            ],
            1075,
        );
        let expected = "\
SANDBOX ID     MODE        STATE     VMM PID   CPU/MEM   IPS            CONTAINERS   AGE
0123456789ab   zero-shim   running   4242      1/256Mi   10.88.0.5/16   1            1m15s
short          zero-shim   running   -         -         -              1            1m15s
";
        assert_eq!(text, expected);
    }

    #[test]
    fn an_empty_node_is_the_header() {
        assert_eq!(render(&[], 0).lines().count(), 1);
    }

    #[test]
    fn ages() {
        assert_eq!(age(5), "5s");
        assert_eq!(age(61), "1m1s");
        assert_eq!(age(1200), "20m");
        assert_eq!(age(3700), "1h1m");
        assert_eq!(age(40000), "11h");
        assert_eq!(age(200000), "2d");
    }
}
