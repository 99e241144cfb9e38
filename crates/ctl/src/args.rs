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
}
