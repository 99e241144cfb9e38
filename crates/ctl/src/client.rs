//! The connection to kuasar-vmm: one sync ttrpc client per invocation.
use std::path::{Path, PathBuf};
use std::time::Duration;

use kuasar_api::sandboxer::{
    AdminClient, Empty, ExecRequest, ExecResponse, PingResponse, ReadConsoleRequest,
    ReadConsoleResponse, SandboxSummary, SandboxerClient,
};

use crate::error::CtlError;

/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How much longer than its command's timeout an Exec may take (kuasar-vmm
/// bounds its agent call by the timeout and its own call timeout, 30 s by
/// default).
const EXEC_MARGIN: Duration = Duration::from_secs(60);

pub struct Client {
    socket: PathBuf,
    admin: AdminClient,
    sandboxer: SandboxerClient,
}

impl Client {
    pub fn connect(socket: &Path) -> Result<Client, CtlError> {
        let unreachable = |cause: String| CtlError::Unreachable {
            socket: socket.to_owned(),
            cause,
        };
        // ttrpc's connect takes a socket that is not there for an abstract
        // one: say plainly that it is missing.
        if !socket.exists() {
            return Err(unreachable("no such socket".into()));
        }
        let address = format!("unix://{}", socket.display());
        let client = ttrpc::Client::connect(&address).map_err(|e| unreachable(e.to_string()))?;
        Ok(Client {
            socket: socket.to_owned(),
            admin: AdminClient::new(client.clone()),
            sandboxer: SandboxerClient::new(client),
        })
    }

    fn failed(&self, call: &'static str, e: ttrpc::Error) -> CtlError {
        match e {
            ttrpc::Error::RpcStatus(status) => CtlError::Call {
                socket: self.socket.clone(),
                call,
                message: status.message,
            },
            other => CtlError::Unreachable {
                socket: self.socket.clone(),
                cause: other.to_string(),
            },
        }
    }

    fn context() -> ttrpc::context::Context {
        Self::context_for(CALL_TIMEOUT)
    }

    fn context_for(timeout: Duration) -> ttrpc::context::Context {
        ttrpc::context::with_timeout(timeout.as_nanos().try_into().unwrap_or(i64::MAX))
    }

    pub fn list(&self) -> Result<Vec<SandboxSummary>, CtlError> {
        self.admin
            .list_sandboxes(Self::context(), &Empty::new())
            .map(|r| r.sandboxes)
            .map_err(|e| self.failed("ListSandboxes", e))
    }

    pub fn read_console(
        &self,
        id: &str,
        offset: u64,
        max_bytes: u32,
    ) -> Result<ReadConsoleResponse, CtlError> {
        let req = ReadConsoleRequest {
            sandbox_id: id.to_owned(),
            offset,
            max_bytes,
            ..Default::default()
        };
        self.admin
            .read_console(Self::context(), &req)
            .map_err(|e| self.failed("ReadConsole", e))
    }

    /// Runs `argv` in sandbox `id`'s guest (an exact id), killed after
    /// `timeout_secs`.
    pub fn exec(
        &self,
        id: &str,
        argv: Vec<String>,
        stdin: Vec<u8>,
        timeout_secs: u32,
    ) -> Result<ExecResponse, CtlError> {
        let req = ExecRequest {
            sandbox_id: id.to_owned(),
            argv,
            stdin,
            timeout_secs,
            ..Default::default()
        };
        let bound = Duration::from_secs(timeout_secs.into()) + EXEC_MARGIN;
        self.admin
            .exec(Self::context_for(bound), &req)
            .map_err(|e| self.failed("Exec", e))
    }

    pub fn ping(&self) -> Result<PingResponse, CtlError> {
        self.sandboxer
            .ping(Self::context(), &Empty::new())
            .map_err(|e| self.failed("Ping", e))
    }

    /// The sandbox `id_or_prefix` names (see [`crate::resolve`]).
    pub fn sandbox(&self, id_or_prefix: &str) -> Result<SandboxSummary, CtlError> {
        let all = self.list()?;
        let id = crate::resolve::resolve(id_or_prefix, all.iter().map(|s| s.id.as_str()))?;
        let id = id.to_owned();
        all.into_iter()
            .find(|s| s.id == id)
            .ok_or(CtlError::UnknownSandbox {
                id,
                known: String::new(),
            })
    }
}
