//! The sandboxer's request errors and their one mapping to ttrpc status codes.
use std::error::Error as StdError;

use ttrpc::Code;

use crate::agent::AgentError;
use crate::vmm::StartVmError;

/// Why a sandbox or task request failed. Each variant maps to one ttrpc code
/// in the `From` impl below; containerd relies on NotFound for idempotent
/// stop and remove.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("{0}: not found")]
    NotFound(String),
    #[error("{0}: already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// More than the host can give (a pod bigger than the node).
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0} is not supported by kuasar-vmm")]
    Unimplemented(String),
    #[error("{0}")]
    Internal(String),
    #[error("start the sandbox's VM")]
    StartVm(#[from] StartVmError),
    #[error("guest agent")]
    Agent(#[from] AgentError),
    #[error("mount the container's rootfs")]
    Mount(#[from] crate::mount::MountError),
    #[error("attach the pod's network to its VM")]
    Network(#[from] crate::net::NetError),
    #[error("{context}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            Error::NotFound(_) => Code::NOT_FOUND,
            Error::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Error::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Error::ResourceExhausted(_) => Code::RESOURCE_EXHAUSTED,
            Error::Unimplemented(_) => Code::UNIMPLEMENTED,
            // A status the guest agent answered keeps its code (NotFound for
            // an exited process, InvalidArgument for a bad spec, ...).
            Error::Agent(AgentError::Status { code, .. }) => *code,
            Error::Agent(AgentError::Timeout { .. }) => Code::DEADLINE_EXCEEDED,
            Error::Agent(_) => Code::UNAVAILABLE,
            Error::StartVm(StartVmError::NoUid) => Code::RESOURCE_EXHAUSTED,
            Error::StartVm(_)
            | Error::Mount(_)
            | Error::Network(_)
            | Error::Io { .. }
            | Error::Internal(_) => Code::INTERNAL,
        }
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), chain(&e)))
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        // ttrpc's codes are gRPC's codes, value for value.
        let code = tonic::Code::from_i32(protobuf::Enum::value(&e.code()));
        tonic::Status::new(code, chain(&e))
    }
}

/// The whole error chain on one line, outermost first: how errors are shown
/// at the edges (logs, ttrpc statuses, the command line).
pub fn chain(e: &(dyn StdError + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !part.is_empty() && !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_joins_sources() {
        let e = Error::io("mount rootfs", std::io::Error::other("boom"));
        assert_eq!(chain(&e), "mount rootfs: boom");
    }

    #[test]
    fn codes_map_once() {
        let not_found: ttrpc::Error = Error::NotFound("container c1".into()).into();
        match not_found {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), Code::NOT_FOUND);
                assert_eq!(s.message(), "container c1: not found");
            }
            other => panic!("unexpected {other:?}"),
        }
        let guest: ttrpc::Error = Error::Agent(AgentError::Status {
            method: "SignalProcess",
            code: Code::NOT_FOUND,
            message: "process p1 not found".into(),
        })
        .into();
        match guest {
            ttrpc::Error::RpcStatus(s) => assert_eq!(s.code(), Code::NOT_FOUND),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn grpc_codes_are_the_ttrpc_codes() {
        let s: tonic::Status = Error::NotFound("sandbox s1".into()).into();
        assert_eq!(s.code(), tonic::Code::NotFound);
        assert_eq!(s.message(), "sandbox s1: not found");
        let s: tonic::Status = Error::AlreadyExists("sandbox s1".into()).into();
        assert_eq!(s.code(), tonic::Code::AlreadyExists);
        let s: tonic::Status = Error::InvalidArgument("x".into()).into();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        let s: tonic::Status = Error::ResourceExhausted("x".into()).into();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
    }
}
