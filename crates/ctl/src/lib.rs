//! `kuasarctl`, the operator's CLI: talks to kuasar-vmm over its socket
//! only (the `kuasar.sandboxer.v1.Admin` and `Sandboxer` services).
pub mod args;
pub mod client;
pub mod cmd;
pub mod error;
pub mod resolve;
pub mod table;
pub mod view;

use args::{Args, Command, ConfigKind};
use error::CtlError;

/// Runs one command; returns kuasarctl's exit status (exec's is its
/// command's).
pub fn run(args: Args) -> Result<u8, CtlError> {
    let socket = args::socket(args.socket, std::env::var_os(kuasar_api::VMM_SOCKET_ENV));
    let done = match args.command {
        Command::List { output } => cmd::list::run(&socket, output),
        Command::Inspect { id } => cmd::inspect::run(&socket, &id),
        Command::Console { id, follow } => cmd::console::run(&socket, &id, follow),
        Command::Exec {
            timeout,
            stdin,
            id,
            command,
        } => {
            let exec = cmd::exec::Exec {
                id,
                command,
                stdin,
                timeout,
            };
            return cmd::exec::run(&socket, exec);
        }
        Command::Config {
            kind: ConfigKind::Containerd { config },
        } => cmd::config::containerd(config.as_deref()),
        Command::Version => cmd::version::run(&socket),
    };
    done.map(|()| 0)
}
