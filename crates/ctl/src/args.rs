//! The command line.
use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Operates kuasar-vmm, the node's sandboxer: its sandboxes, their guest
/// consoles, the containerd configuration.
#[derive(Debug, Parser)]
#[command(name = "kuasarctl", version)]
pub struct Args {
    /// kuasar-vmm's socket [default: $KUASAR_VMM_SOCKET, else kuasar-vmm's default]
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The node's sandboxes.
    List {
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// One sandbox as JSON (its id or a unique prefix of it).
    Inspect { id: String },
    /// A sandbox's guest console log (its id or a unique prefix of it).
    Console {
        id: String,
        /// Keep printing what the guest writes, until the sandbox is gone.
        #[arg(long, short)]
        follow: bool,
    },
    /// Runs a command in a sandbox's guest, outside every container (a
    /// debugging aid, not interactive): its output is printed once it has
    /// ended, and kuasarctl exits with its exit status (128 + the signal
    /// that killed it).
    Exec {
        /// Kill the command (and what it started) after this many seconds.
        #[arg(long, value_name = "SECS", default_value_t = 30,
              value_parser = clap::value_parser!(u32).range(1..=3600))]
        timeout: u32,
        /// Give the command kuasarctl's stdin, read to its end first (at
        /// most 1 MiB); without it the command's stdin is empty.
        #[arg(long, short = 'i')]
        stdin: bool,
        /// The sandbox: its id or a unique prefix of it.
        id: String,
        /// The command and its arguments, after `--`; looked up in the
        /// guest's PATH (/bin:/sbin:/usr/bin:/usr/sbin, busybox).
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Configuration snippets for the software around kuasar-vmm.
    Config {
        #[command(subcommand)]
        kind: ConfigKind,
    },
    /// kuasarctl's version and, when reachable, kuasar-vmm's.
    Version,
}

#[derive(Debug, Subcommand)]
pub enum ConfigKind {
    /// containerd's runtime handlers of the three modes (what
    /// `kuasar-vmm --print-containerd-config` prints).
    Containerd {
        /// kuasar-vmm's configuration file; without it, its defaults.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// The socket to use: `--socket`, else `$KUASAR_VMM_SOCKET` (`env`), else
/// kuasar-vmm's default.
pub fn socket(flag: Option<PathBuf>, env: Option<OsString>) -> PathBuf {
    flag.unwrap_or_else(|| kuasar_api::vmm_socket_from(env))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_flag_wins_over_the_environment() {
        assert_eq!(
            socket(Some("/a.sock".into()), Some("/b.sock".into())),
            PathBuf::from("/a.sock")
        );
    }

    #[test]
    fn socket_from_the_environment_else_the_default() {
        assert_eq!(
            socket(None, Some("/b.sock".into())),
            PathBuf::from("/b.sock")
        );
        assert_eq!(
            socket(None, None),
            PathBuf::from(kuasar_api::DEFAULT_VMM_SOCKET)
        );
        // An empty variable is unset.
        assert_eq!(
            socket(None, Some("".into())),
            PathBuf::from(kuasar_api::DEFAULT_VMM_SOCKET)
        );
    }

    #[test]
    fn parses_the_commands() {
        let a = Args::try_parse_from(["kuasarctl", "list", "-o", "json"]).unwrap();
        assert!(matches!(
            a.command,
            Command::List {
                output: Output::Json
            }
        ));
        let a = Args::try_parse_from(["kuasarctl", "console", "ab", "--follow", "--socket", "/s"])
            .unwrap();
        assert_eq!(a.socket, Some(PathBuf::from("/s")));
        assert!(matches!(a.command, Command::Console { follow: true, .. }));
        assert!(Args::try_parse_from(["kuasarctl", "list", "-o", "yaml"]).is_err());
    }

    fn exec(args: &[&str]) -> Result<(u32, bool, String, Vec<String>), clap::Error> {
        let argv = ["kuasarctl", "exec"].iter().chain(args);
        match Args::try_parse_from(argv)?.command {
            Command::Exec {
                timeout,
                stdin,
                id,
                command,
            } => Ok((timeout, stdin, id, command)),
            other => panic!("not exec: {other:?}"),
        }
    }

    #[test]
    fn exec_takes_the_command_after_a_double_dash() {
        let (timeout, stdin, id, command) = exec(&["ab", "--", "cat", "/proc/1/comm"]).unwrap();
        assert_eq!((timeout, stdin, id.as_str()), (30, false, "ab"));
        assert_eq!(command, ["cat", "/proc/1/comm"]);
        // kuasarctl's options come before `--`; everything after it is the
        // command's, options too.
        let (timeout, stdin, _, command) = exec(&[
            "--timeout",
            "5",
            "-i",
            "ab",
            "--",
            "ls",
            "-l",
            "--timeout",
            "3",
        ])
        .unwrap();
        assert_eq!((timeout, stdin), (5, true));
        assert_eq!(command, ["ls", "-l", "--timeout", "3"]);
        let (_, stdin, _, command) = exec(&["ab", "--stdin", "--", "sh", "-c", "exit 3"]).unwrap();
        assert!(stdin);
        assert_eq!(command, ["sh", "-c", "exit 3"]);
    }

    #[test]
    fn exec_refuses_a_missing_command_or_a_bad_timeout() {
        for bad in [
            &["ab"][..],
            &["ab", "--"],
            &["ab", "ps"],
            &["--", "ps"],
            &["--timeout", "0", "ab", "--", "ps"],
            &["--timeout", "3601", "ab", "--", "ps"],
            &["--timeout", "x", "ab", "--", "ps"],
        ] {
            assert!(exec(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
