//! The shim's error type. Every error ends up as one line on stderr (for
//! `start`/`delete`, which containerd shows) or in the shim log (`serve`).

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad command line: printed with a usage hint, exit status 2.
    #[error("{0}")]
    Usage(String),

    #[error("invalid {what} {value:?}: {reason}")]
    Invalid {
        what: &'static str,
        value: String,
        reason: String,
    },

    #[error("kuasar-vmm is not reachable at {}: {reason}", path.display())]
    VmmUnreachable { path: PathBuf, reason: String },

    #[error("kuasar-vmm at {} refused sandbox {id}: {reason}", path.display())]
    Register {
        path: PathBuf,
        id: String,
        reason: String,
    },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The process exit status for this error (2 = usage, like Go's flag package).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) => 2,
            _ => 1,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
