//! `kuasarctl exec [--timeout SECS] [-i] ID -- COMMAND [ARG...]`: a command
//! in a sandbox's guest, outside every container (kuasar-vmm's Admin
//! `Exec`, the agent's `DebugExec`). Not interactive: stdin (with `-i`) is
//! read whole first, the output printed once the command has ended.
use std::io::{Read, Write};
use std::path::Path;

use kuasar_api::debug_exec::{MAX_OUTPUT, MAX_STDIN};

use crate::client::Client;
use crate::error::CtlError;

/// What to run where.
pub struct Exec {
    /// The sandbox's id or a unique prefix of it.
    pub id: String,
    pub command: Vec<String>,
    /// Give the command kuasarctl's stdin.
    pub stdin: bool,
    pub timeout: u32,
}

/// Runs the command; returns its exit status as kuasarctl's.
pub fn run(socket: &Path, exec: Exec) -> Result<u8, CtlError> {
    let client = Client::connect(socket)?;
    let id = client.sandbox(&exec.id)?.id;
    let input = match exec.stdin {
        true => read_bounded(std::io::stdin().lock(), MAX_STDIN)?,
        false => Vec::new(),
    };
    let res = client.exec(&id, exec.command, input, exec.timeout)?;
    super::print(&res.stdout)?;
    let mut err = std::io::stderr().lock();
    let mut notes = Vec::new();
    if res.stdout_truncated {
        notes.push(format!(
            "the command's stdout was cut at {MAX_OUTPUT} bytes"
        ));
    }
    if res.stderr_truncated {
        notes.push(format!(
            "the command's stderr was cut at {MAX_OUTPUT} bytes"
        ));
    }
    if res.timed_out {
        notes.push(format!(
            "the command was killed after its timeout of {} s",
            exec.timeout
        ));
    }
    err.write_all(&res.stderr)
        .and_then(|()| {
            notes
                .iter()
                .try_for_each(|n| writeln!(err, "kuasarctl: {n}"))
        })
        .and_then(|()| err.flush())
        .map_err(CtlError::Output)?;
    Ok(exit_code(res.exit_status))
}

/// All of `input`, when it holds at most `max` bytes.
fn read_bounded(input: impl Read, max: usize) -> Result<Vec<u8>, CtlError> {
    let mut data = Vec::new();
    input
        .take(max as u64 + 1)
        .read_to_end(&mut data)
        .map_err(CtlError::Stdin)?;
    if data.len() > max {
        return Err(CtlError::StdinTooLarge { max });
    }
    Ok(data)
}

/// The guest's exit status (a code, or 128 + a signal) as a process's.
fn exit_code(status: u32) -> u8 {
    u8::try_from(status).unwrap_or(u8::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdin_is_read_whole_up_to_its_bound() {
        assert_eq!(read_bounded(&b"hello"[..], 5).unwrap(), b"hello");
        assert_eq!(read_bounded(&b""[..], 5).unwrap(), b"");
        let e = read_bounded(&b"hello!"[..], 5).unwrap_err();
        assert_eq!(
            e.to_string(),
            "stdin holds more than 5 bytes, the most exec gives a command"
        );
    }

    #[test]
    fn exit_statuses_pass_through() {
        assert_eq!(exit_code(0), 0);
        assert_eq!(exit_code(3), 3);
        assert_eq!(exit_code(137), 137);
        assert_eq!(exit_code(300), 255);
    }
}
