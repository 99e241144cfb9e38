//! The operator's service (`kuasar.sandboxer.v1.Admin`, for kuasarctl):
//! the node's sandboxes and their guest consoles, read-only, and debug
//! commands in a guest, outside every container (`Exec`).
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kuasar_api::agent::DebugExecResponse;
use kuasar_api::sandboxer::sandboxer_ttrpc_async::Admin;
use kuasar_api::sandboxer::{
    ContainerSummary, Empty, ExecRequest, ExecResponse, ListSandboxesResponse, ReadConsoleRequest,
    ReadConsoleResponse, SandboxSummary,
};
use ttrpc::r#async::TtrpcContext;

use crate::container::ProcState;
use crate::error::{Error, Result};
use crate::registry::Registry;
use crate::sandbox::Sandbox;

/// The most a ReadConsole returns at once.
pub const MAX_CONSOLE_READ: u32 = 1 << 20;

pub struct AdminService {
    registry: Arc<Registry>,
}

impl AdminService {
    pub fn new(registry: Arc<Registry>) -> Self {
        AdminService { registry }
    }
}

/// What the operator sees of one sandbox.
pub fn summary(sandbox: &Sandbox) -> SandboxSummary {
    let shape = sandbox.vm_shape();
    let containers = sandbox
        .container_views()
        .into_iter()
        .map(|c| {
            let (state, exit_status) = match c.state {
                ProcState::Created => ("created", 0),
                ProcState::Running => ("running", 0),
                ProcState::Stopped { exit_status, .. } => ("stopped", exit_status),
            };
            ContainerSummary {
                id: c.id,
                pid: c.pid,
                state: state.into(),
                exit_status,
                ..Default::default()
            }
        })
        .collect();
    SandboxSummary {
        id: sandbox.info.id.clone(),
        namespace: sandbox.info.namespace.clone(),
        mode: sandbox.mode().as_str().into(),
        state: sandbox.state().as_str().into(),
        vmm_pid: sandbox.vmm_pid(),
        vcpus: shape.as_ref().map_or(0, |s| s.vcpus),
        memory_mib: shape.as_ref().map_or(0, |s| s.memory_mib),
        ips: sandbox.ips(),
        containers,
        created_at: sandbox.created_at_secs(),
        state_dir: sandbox.dir.display().to_string(),
        console_log: shape
            .as_ref()
            .map(|s| s.console_log.display().to_string())
            .unwrap_or_default(),
        task_socket: sandbox.task_socket().unwrap_or_default(),
        hostname: sandbox.pod().map(|p| p.hostname).unwrap_or_default(),
        ..Default::default()
    }
}

/// Reads at most `max` bytes of `sandbox`'s console log from `offset`.
fn read_console(sandbox: &Sandbox, offset: u64, max: u32) -> Result<ReadConsoleResponse> {
    match sandbox.vm_shape() {
        Some(shape) => read_log(&shape.console_log, offset, max),
        None => Err(Error::FailedPrecondition(format!(
            "sandbox {} has no VM yet: no console log",
            sandbox.info.id
        ))),
    }
}

/// Reads at most `max` bytes (0: the most allowed) of the log at `path`
/// from `offset`; a log shorter than `offset` (a new one under the same
/// name) is read from its start.
fn read_log(path: &Path, offset: u64, max: u32) -> Result<ReadConsoleResponse> {
    let shown = || format!("read {}", path.display());
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(shown(), e))?;
    let size = file.metadata().map_err(|e| Error::io(shown(), e))?.len();
    let offset = if offset > size { 0 } else { offset };
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| Error::io(shown(), e))?;
    let max = match max {
        0 => MAX_CONSOLE_READ,
        max => max.min(MAX_CONSOLE_READ),
    };
    let mut data = Vec::new();
    file.take(u64::from(max))
        .read_to_end(&mut data)
        .map_err(|e| Error::io(shown(), e))?;
    Ok(ReadConsoleResponse {
        next_offset: offset + data.len() as u64,
        data,
        size,
        ..Default::default()
    })
}

/// The guest's answer to a debug command, as the operator gets it.
fn exec_response(r: DebugExecResponse) -> ExecResponse {
    ExecResponse {
        exit_status: r.exit_status,
        stdout: r.stdout,
        stderr: r.stderr,
        stdout_truncated: r.stdout_truncated,
        stderr_truncated: r.stderr_truncated,
        timed_out: r.timed_out,
        ..Default::default()
    }
}

#[async_trait]
impl Admin for AdminService {
    async fn list_sandboxes(
        &self,
        _: &TtrpcContext,
        _: Empty,
    ) -> ttrpc::Result<ListSandboxesResponse> {
        let mut sandboxes: Vec<_> = self.registry.all().iter().map(|s| summary(s)).collect();
        sandboxes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(ListSandboxesResponse {
            sandboxes,
            ..Default::default()
        })
    }

    async fn read_console(
        &self,
        _: &TtrpcContext,
        req: ReadConsoleRequest,
    ) -> ttrpc::Result<ReadConsoleResponse> {
        let sandbox = self.registry.get(&req.sandbox_id)?;
        let (offset, max) = (req.offset, req.max_bytes);
        let read = tokio::task::spawn_blocking(move || read_console(&sandbox, offset, max))
            .await
            .map_err(|e| Error::Internal(format!("read the console: {e}")))?;
        Ok(read?)
    }

    async fn exec(&self, _: &TtrpcContext, req: ExecRequest) -> ttrpc::Result<ExecResponse> {
        let sandbox = self.registry.get(&req.sandbox_id)?;
        let timeout = kuasar_api::debug_exec::timeout(Duration::from_secs(req.timeout_secs.into()));
        tracing::info!(sandbox = %sandbox.info.id, argv = ?req.argv, ?timeout, "exec");
        let res = sandbox.debug_exec(req.argv, req.stdin, timeout).await;
        if let Err(e) = &res {
            tracing::info!(sandbox = %sandbox.info.id, "exec failed: {}", crate::error::chain(e));
        }
        Ok(exec_response(res?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::SandboxInfo;

    fn registry(dir: &Path) -> Registry {
        Registry::new(Arc::new(crate::host::Host::for_tests(dir)))
    }

    #[test]
    fn a_registered_sandbox_before_its_vm() {
        let dir = tempfile::tempdir().unwrap();
        let registry = registry(dir.path());
        let sandbox = registry
            .register(SandboxInfo {
                id: "pod-1".into(),
                namespace: "default".into(),
                bundle: "/b".into(),
                ttrpc_address: String::new(),
            })
            .unwrap();
        let s = summary(&sandbox);
        assert_eq!(s.id, "pod-1");
        assert_eq!(s.namespace, "default");
        assert_eq!(s.mode, "podsandbox");
        assert_eq!(s.state, "created");
        assert_eq!((s.vmm_pid, s.vcpus, s.memory_mib), (0, 0, 0));
        assert!(s.containers.is_empty() && s.console_log.is_empty());
        assert_eq!(
            s.state_dir,
            dir.path().join("vmm/pod-1").display().to_string()
        );
        let e = read_console(&sandbox, 0, 0).unwrap_err();
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e}");
    }

    #[tokio::test]
    async fn exec_needs_a_command_and_a_running_vm() {
        let dir = tempfile::tempdir().unwrap();
        let registry = registry(dir.path());
        let sandbox = registry
            .register(SandboxInfo {
                id: "pod-1".into(),
                namespace: "default".into(),
                bundle: "/b".into(),
                ttrpc_address: String::new(),
            })
            .unwrap();
        let exec = |argv: &[&str], stdin: usize| {
            let argv = argv.iter().map(|a| a.to_string()).collect();
            sandbox.debug_exec(argv, vec![0; stdin], Duration::from_secs(1))
        };
        let e = exec(&[], 0).await.unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        let e = exec(&[""], 0).await.unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        let e = exec(&["cat"], kuasar_api::debug_exec::MAX_STDIN + 1)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        let e = exec(&["ps"], 0).await.unwrap_err();
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e}");
        assert_eq!(
            e.to_string(),
            "sandbox pod-1 has no VM yet (it boots with the first container)"
        );
        let e = registry.get("pod-2").err().unwrap();
        assert!(matches!(e, Error::NotFound(_)), "{e}");
    }

    #[test]
    fn console_reads_go_on_from_an_offset() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        std::fs::write(&log, b"0123456789").unwrap();
        let r = read_log(&log, 0, 4).unwrap();
        assert_eq!(
            (r.data.as_slice(), r.next_offset, r.size),
            (&b"0123"[..], 4, 10)
        );
        let r = read_log(&log, r.next_offset, 0).unwrap();
        assert_eq!((r.data.as_slice(), r.next_offset), (&b"456789"[..], 10));
        let r = read_log(&log, 10, 0).unwrap();
        assert!(r.data.is_empty());
        // A log that shrank is read from its start.
        let r = read_log(&log, 50, 3).unwrap();
        assert_eq!((r.data.as_slice(), r.next_offset), (&b"012"[..], 3));
        let e = read_log(&dir.path().join("none"), 0, 0).unwrap_err();
        assert!(e.to_string().contains("none"), "{e}");
    }
}
