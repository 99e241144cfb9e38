//! The netfilter rule that sends every TCP connection made to 127.0.0.1 in
//! the pod's network namespace to the relay, whatever its port:
//!
//! ```text
//! -t nat -N KUASAR-PORTFORWARD
//! -t nat -A KUASAR-PORTFORWARD -o lo -d 127.0.0.1/32 -p tcp ! --dport <relay> -j REDIRECT --to-ports <relay>
//! -t nat -I OUTPUT 1 -j KUASAR-PORTFORWARD
//! ```
//!
//! The relay reads the port asked for with `SO_ORIGINAL_DST`. The commands
//! run the `iptables` binary (Debian's `iptables` package, nf_tables backend
//! by default) on the calling thread, which must already be inside the
//! namespace (see `crate::net::netns`); its errors carry the command, the
//! exit status and what it printed on stderr.
use std::io;
use std::process::{Command, ExitStatus, Stdio};

/// The binary, found in `PATH` (`/usr/sbin/iptables` on Debian).
pub const IPTABLES: &str = "iptables";
/// Our chain in the namespace's `nat` table.
pub const CHAIN: &str = "KUASAR-PORTFORWARD";
/// How long a command waits for the xtables lock (`-w`).
const LOCK_WAIT_SECS: &str = "5";
/// Most of a command's stderr kept in an error.
const MAX_STDERR: usize = 400;

#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("run `{command}` (is the iptables package installed?)")]
    Spawn { command: String, source: io::Error },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
}

impl IptablesError {
    /// True when the command failed because what it names does not exist.
    fn is_absent(&self) -> bool {
        match self {
            IptablesError::Failed { stderr, .. } => is_absent(stderr),
            IptablesError::Spawn { .. } => false,
        }
    }
}

/// Whether iptables' `stderr` says the chain or rule named does not exist.
pub fn is_absent(stderr: &str) -> bool {
    ["does not exist", "No chain/target/match", "Bad rule"]
        .iter()
        .any(|m| stderr.contains(m))
}

/// The redirect rule's arguments (after `-t nat -A CHAIN`).
pub fn redirect_args(relay_port: u16) -> Vec<String> {
    let port = relay_port.to_string();
    [
        "-o",
        "lo",
        "-d",
        "127.0.0.1/32",
        "-p",
        "tcp",
        "!",
        "--dport",
        &port,
        "-j",
        "REDIRECT",
        "--to-ports",
        &port,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Runs `iptables -w 5 -t nat <args>` in the calling thread's namespace.
fn nat(args: &[&str]) -> Result<(), IptablesError> {
    let mut cmd = Command::new(IPTABLES);
    cmd.args(["-w", LOCK_WAIT_SECS, "-t", "nat"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let command = format!("{IPTABLES} -t nat {}", args.join(" "));
    let out = cmd.output().map_err(|source| IptablesError::Spawn {
        command: command.clone(),
        source,
    })?;
    if out.status.success() {
        return Ok(());
    }
    let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if stderr.len() > MAX_STDERR {
        let mut end = MAX_STDERR;
        while !stderr.is_char_boundary(end) {
            end -= 1;
        }
        stderr.truncate(end);
    }
    Err(IptablesError::Failed {
        command,
        status: out.status,
        stderr,
    })
}

/// Installs (or replaces) the redirect to `relay_port`. Idempotent: a chain
/// left by an earlier run is flushed and refilled.
pub fn install(relay_port: u16) -> Result<(), IptablesError> {
    match nat(&["-N", CHAIN]) {
        Ok(()) => {}
        Err(IptablesError::Failed { ref stderr, .. }) if stderr.contains("already exists") => {}
        Err(e) => return Err(e),
    }
    nat(&["-F", CHAIN])?;
    let rule = redirect_args(relay_port);
    let mut args = vec!["-A", CHAIN];
    args.extend(rule.iter().map(String::as_str));
    nat(&args)?;
    if nat(&["-C", "OUTPUT", "-j", CHAIN]).is_err() {
        nat(&["-I", "OUTPUT", "1", "-j", CHAIN])?;
    }
    Ok(())
}

/// Removes the jump and the chain; what does not exist is fine.
pub fn remove() -> Result<(), IptablesError> {
    // A jump inserted twice (two runs racing) goes too; bounded.
    for _ in 0..4 {
        match nat(&["-D", "OUTPUT", "-j", CHAIN]) {
            Ok(()) => continue,
            Err(e) if e.is_absent() => break,
            Err(e) => return Err(e),
        }
    }
    for op in ["-F", "-X"] {
        match nat(&[op, CHAIN]) {
            Err(e) if !e.is_absent() => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_excludes_the_relay_port_and_stays_on_loopback() {
        let args = redirect_args(40123).join(" ");
        assert_eq!(
            args,
            "-o lo -d 127.0.0.1/32 -p tcp ! --dport 40123 -j REDIRECT --to-ports 40123"
        );
    }

    #[test]
    fn absence_is_recognised() {
        assert!(is_absent(
            "iptables v1.8.9 (nf_tables): Chain 'KUASAR-PORTFORWARD' does not exist"
        ));
        assert!(is_absent("iptables: No chain/target/match by that name."));
        assert!(is_absent(
            "iptables: Bad rule (does a matching rule exist in that chain?)."
        ));
        assert!(!is_absent(
            "iptables: Permission denied (you must be root)."
        ));
        assert!(!is_absent(
            "Another app is currently holding the xtables lock"
        ));
    }
}
