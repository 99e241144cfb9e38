//! What can go wrong, one variant per failed operation.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("cannot reach kuasar-vmm at {socket}: {cause}; is it running?")]
    Unreachable { socket: PathBuf, cause: String },
    #[error("kuasar-vmm at {socket}: {call}: {message}")]
    Call {
        socket: PathBuf,
        call: &'static str,
        message: String,
    },
    #[error("no sandbox {id} (known: {known})")]
    UnknownSandbox { id: String, known: String },
    #[error("sandbox id prefix {prefix} is ambiguous: {candidates}")]
    AmbiguousSandbox { prefix: String, candidates: String },
    #[error("load kuasar-vmm's configuration")]
    Config(#[source] kuasar_vmm::config::ConfigError),
    #[error("write the output")]
    Output(#[source] std::io::Error),
    #[error("read stdin")]
    Stdin(#[source] std::io::Error),
    #[error("stdin holds more than {max} bytes, the most exec gives a command")]
    StdinTooLarge { max: usize },
}

/// The error and its sources, joined by ": " (kuasar-vmm's printer).
pub use kuasar_vmm::error::chain;
