//! The agent's error type and its mapping to ttrpc statuses.
use kuasar_api::ttrpc;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unimplemented(String),
    /// The OCI runtime (crun) failed; `msg` is its own error message.
    #[error("{runtime} {op} failed: {msg}")]
    Runtime {
        runtime: String,
        op: String,
        msg: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// The ttrpc status code this error is reported with.
    pub fn code(&self) -> ttrpc::Code {
        match self {
            Error::NotFound(_) => ttrpc::Code::NOT_FOUND,
            Error::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
            Error::InvalidArgument(_) => ttrpc::Code::INVALID_ARGUMENT,
            Error::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
            Error::Unimplemented(_) => ttrpc::Code::UNIMPLEMENTED,
            Error::Runtime { .. } | Error::Io { .. } | Error::Internal(_) => ttrpc::Code::INTERNAL,
        }
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

/// Adds a context message to I/O and system-call errors.
pub trait Context<T> {
    fn context<C: Into<String>>(self, context: C) -> Result<T>;
    fn with_context<C: Into<String>, F: FnOnce() -> C>(self, f: F) -> Result<T>;
}

impl<T> Context<T> for std::io::Result<T> {
    fn context<C: Into<String>>(self, context: C) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: context.into(),
            source,
        })
    }
    fn with_context<C: Into<String>, F: FnOnce() -> C>(self, f: F) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: f().into(),
            source,
        })
    }
}

impl<T> Context<T> for nix::Result<T> {
    fn context<C: Into<String>>(self, context: C) -> Result<T> {
        self.map_err(std::io::Error::from).context(context)
    }
    fn with_context<C: Into<String>, F: FnOnce() -> C>(self, f: F) -> Result<T> {
        self.map_err(std::io::Error::from).with_context(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_to_ttrpc_codes() {
        let e: ttrpc::Error = Error::NotFound("container c1 not found".into()).into();
        match e {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), ttrpc::Code::NOT_FOUND);
                assert_eq!(s.message(), "container c1 not found");
            }
            other => panic!("unexpected {other:?}"),
        }
        let e = Error::Runtime {
            runtime: "crun".into(),
            op: "create".into(),
            msg: "boom".into(),
        };
        assert_eq!(e.code(), ttrpc::Code::INTERNAL);
        assert_eq!(e.to_string(), "crun create failed: boom");
    }
}
