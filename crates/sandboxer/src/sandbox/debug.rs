//! An operator's debug command in the sandbox's guest, outside every
//! container (the Admin service's `Exec`, for `kuasarctl exec`).
use std::time::Duration;

use kuasar_api::agent::{DebugExecRequest, DebugExecResponse};
use kuasar_api::debug_exec::MAX_STDIN;

use super::{Sandbox, SandboxState};
use crate::error::{Error, Result};

impl Sandbox {
    /// Runs `argv` in the guest through its agent, `stdin` given whole, the
    /// command killed after `timeout`.
    pub async fn debug_exec(
        &self,
        argv: Vec<String>,
        stdin: Vec<u8>,
        timeout: Duration,
    ) -> Result<DebugExecResponse> {
        if argv.first().is_none_or(|a| a.is_empty()) {
            return Err(Error::InvalidArgument("the command is empty".into()));
        }
        if stdin.len() > MAX_STDIN {
            return Err(Error::InvalidArgument(format!(
                "{} bytes of stdin, more than {MAX_STDIN}",
                stdin.len()
            )));
        }
        let id = &self.info.id;
        match self.state() {
            SandboxState::Created => {
                return Err(Error::FailedPrecondition(format!(
                    "sandbox {id} has no VM yet (it boots with the first container)"
                )))
            }
            SandboxState::Stopped => {
                return Err(Error::FailedPrecondition(format!(
                    "sandbox {id} has stopped: no VM to run the command in"
                )))
            }
            SandboxState::Running => {}
        }
        let req = DebugExecRequest {
            argv,
            stdin,
            timeout_ms: timeout.as_millis().try_into().unwrap_or(u32::MAX),
            ..Default::default()
        };
        match self.agent()?.debug_exec(req).await {
            Err(e) if e.is_unimplemented() => Err(Error::FailedPrecondition(format!(
                "the guest agent of sandbox {id} is too old for exec (it has no DebugExec): \
                 rebuild the guest image (scripts/build-guest.sh) and recreate the sandbox"
            ))),
            res => Ok(res?),
        }
    }
}
