//! containerd-shim-kuasar-vmm-v2: containerd's shim for kuasar-vmm.
//!
//! A thin relay with no VM logic: `start` registers the sandbox with the
//! node's sandboxer (kuasar-vmm) and spawns a small detached process that
//! serves containerd's task API (v2 and v3 names) by forwarding every
//! request over one long-lived connection to the sandboxer; `delete`
//! cleans up after a dead shim, even with the sandboxer down.

mod args;
mod bootstrap;
mod bundle;
mod delete;
mod error;
mod logger;
mod relay;
mod sandboxer;
mod serve;
mod socket;
mod start;
#[cfg(test)]
mod tests;

use std::io::Write;

use kuasar_api::containerd::types::introspection::{RuntimeInfo, RuntimeVersion};
use kuasar_api::protobuf::Message;

use crate::args::Verb;
use crate::error::{Error, Result};

/// containerd's runtime type for this shim.
const RUNTIME_NAME: &str = "io.containerd.kuasar-vmm.v2";

fn main() {
    let code = match run() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{}: {e}", start::BINARY_NAME);
            e.exit_code()
        }
    };
    std::process::exit(code);
}

fn stdout(bytes: &[u8]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| Error::io("write stdout", e))
}

fn run() -> Result<()> {
    let args = args::parse(
        std::env::args_os()
            .skip(1)
            .map(|a| a.to_string_lossy().into_owned()),
    )?;
    match args.verb {
        Verb::Help => stdout(format!("{}\n", args::USAGE).as_bytes()),
        Verb::Version => stdout(
            format!(
                "{}:\n  Version: {}\n  Runtime: {RUNTIME_NAME}\n",
                start::BINARY_NAME,
                env!("CARGO_PKG_VERSION")
            )
            .as_bytes(),
        ),
        Verb::Info => {
            let mut version = RuntimeVersion::new();
            version.version = env!("CARGO_PKG_VERSION").to_string();
            let mut info = RuntimeInfo::new();
            info.name = RUNTIME_NAME.to_string();
            info.version = Some(version).into();
            let bytes = info
                .write_to_bytes()
                .map_err(|e| Error::Other(format!("encode RuntimeInfo: {e}")))?;
            stdout(&bytes)
        }
        // Only the address (or, to containerd 2.3, the bootstrap result):
        // containerd parses stdout.
        Verb::Start => {
            let mut args = args;
            let input = bootstrap::read_stdin()?;
            if let Some(p) = bootstrap::params(&input, &args) {
                bootstrap::apply(&p, &mut args);
            }
            args.check_required()?;
            let address = start::run(&args)?;
            if args.bootstrapped {
                stdout(&bootstrap::result(&address)?)
            } else {
                stdout(address.as_bytes())
            }
        }
        Verb::Delete => stdout(&delete::run(&args)?),
        Verb::Serve => serve::run(&args),
    }
}
