//! containerd's task service ([`kuasar_api::services::TASK_V2`]), served to the
//! shims: converts protocol messages to domain calls on the sandbox named in
//! the request's metadata, and the results back. No logic of its own.
//! In the zero-shim mode the same service is bound to one sandbox and
//! served on that sandbox's own socket, where containerd connects directly.
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use kuasar_api::containerd::api::{self as task_api, Empty, Status};
use kuasar_api::containerd::cgroups::metrics::{
    CPUStat, CPUUsage, MemoryEntry, MemoryOomControl, MemoryStat, Metrics, PidsStat,
};
use kuasar_api::containerd::protobuf::well_known_types::any::Any;
use kuasar_api::containerd::shim_async::Task;
use kuasar_api::resources::{self, ResourcesError};
use kuasar_api::{NAMESPACE_METADATA, SANDBOX_ID_METADATA, TTRPC_ADDRESS_METADATA};
use ttrpc::r#async::TtrpcContext;

use crate::container::ProcState;
use crate::error::Error;
use crate::events::{pack, timestamp};
use crate::io::StdioPaths;
use crate::mount::MountSpec;
use crate::registry::Registry;
use crate::sandbox::{CreateSpec, Sandbox, SandboxInfo};

pub struct TaskService {
    registry: Arc<Registry>,
    /// The one sandbox this service is for (a sandbox's own task socket);
    /// None: the sandbox a shim names in each request's metadata.
    bound: Option<String>,
}

impl TaskService {
    pub fn new(registry: Arc<Registry>) -> Self {
        TaskService {
            registry,
            bound: None,
        }
    }

    /// The task service of one sandbox, created through the gRPC sandbox
    /// controller: requests carry no kuasar metadata (containerd sends them).
    pub fn for_sandbox(registry: Arc<Registry>, id: &str) -> Self {
        TaskService {
            registry,
            bound: Some(id.to_owned()),
        }
    }

    /// The id of the sandbox a request is for.
    fn sandbox_id(&self, ctx: &TtrpcContext) -> Result<String, Error> {
        match &self.bound {
            Some(id) => Ok(id.clone()),
            None => sandbox_id(ctx),
        }
    }

    /// The sandbox a request is for.
    fn sandbox(&self, ctx: &TtrpcContext) -> Result<Arc<Sandbox>, Error> {
        self.registry.get(&self.sandbox_id(ctx)?)
    }
}

/// Refuses ids that could never name a container or process (and could
/// escape a directory), before any lookup: InvalidArgument, not NotFound.
fn check_ids(id: &str, exec_id: &str) -> Result<(), Error> {
    crate::container::validate_id("container", id)?;
    if !exec_id.is_empty() {
        crate::container::validate_id("exec", exec_id)?;
    }
    Ok(())
}

fn metadata<'a>(ctx: &'a TtrpcContext, key: &str) -> Option<&'a str> {
    ctx.metadata
        .get(key)
        .and_then(|v| v.first())
        .map(String::as_str)
}

fn sandbox_id(ctx: &TtrpcContext) -> Result<String, Error> {
    metadata(ctx, SANDBOX_ID_METADATA)
        .map(str::to_owned)
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "task request without `{SANDBOX_ID_METADATA}` metadata"
            ))
        })
}

/// The containerd namespace and ttrpc address a shim put in a request's
/// metadata (empty when absent).
pub fn metadata_of(ctx: &TtrpcContext) -> (String, String) {
    (
        metadata(ctx, NAMESPACE_METADATA)
            .unwrap_or_default()
            .to_owned(),
        metadata(ctx, TTRPC_ADDRESS_METADATA)
            .unwrap_or_default()
            .to_owned(),
    )
}

fn status_of(state: ProcState) -> (Status, u32, Option<SystemTime>) {
    match state {
        ProcState::Created => (Status::CREATED, 0, None),
        ProcState::Running => (Status::RUNNING, 0, None),
        ProcState::Stopped {
            exit_status,
            exited_at,
        } => (Status::STOPPED, exit_status, Some(exited_at)),
    }
}

type TtrpcResult<T> = ttrpc::Result<T>;

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        ctx: &TtrpcContext,
        req: task_api::CreateTaskRequest,
    ) -> TtrpcResult<task_api::CreateTaskResponse> {
        let sandbox = if self.bound.is_some() {
            // Created by the sandbox controller: it exists or it is gone.
            self.sandbox(ctx)?
        } else {
            // A shim registers its sandbox at start; the metadata lets a task
            // request re-register it (e.g. after the sandboxer restarted).
            let info = SandboxInfo {
                id: sandbox_id(ctx)?,
                namespace: metadata(ctx, NAMESPACE_METADATA)
                    .unwrap_or_default()
                    .to_owned(),
                bundle: req.bundle.clone(),
                ttrpc_address: metadata(ctx, TTRPC_ADDRESS_METADATA)
                    .unwrap_or_default()
                    .to_owned(),
            };
            self.registry.register(info)?
        };
        if !req.checkpoint.is_empty() {
            return Err(Error::Unimplemented("restoring a checkpoint".into()).into());
        }
        let spec = CreateSpec {
            id: req.id,
            bundle: req.bundle,
            rootfs: req
                .rootfs
                .into_iter()
                .map(|m| MountSpec {
                    fstype: m.type_,
                    source: m.source,
                    options: m.options,
                })
                .collect(),
            stdio: StdioPaths {
                stdin: req.stdin,
                stdout: req.stdout,
                stderr: req.stderr,
                terminal: req.terminal,
            },
        };
        let pid = sandbox.create_container(spec).await?;
        Ok(task_api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        ctx: &TtrpcContext,
        req: task_api::StartRequest,
    ) -> TtrpcResult<task_api::StartResponse> {
        check_ids(&req.id, &req.exec_id)?;
        let pid = self.sandbox(ctx)?.start(&req.id, &req.exec_id).await?;
        Ok(task_api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn state(
        &self,
        ctx: &TtrpcContext,
        req: task_api::StateRequest,
    ) -> TtrpcResult<task_api::StateResponse> {
        check_ids(&req.id, &req.exec_id)?;
        let s = self.sandbox(ctx)?.status(&req.id, &req.exec_id)?;
        let (status, exit_status, exited_at) = status_of(s.state);
        Ok(task_api::StateResponse {
            id: req.id,
            bundle: s.bundle,
            pid: s.pid,
            status: status.into(),
            stdin: s.stdio.stdin,
            stdout: s.stdio.stdout,
            stderr: s.stdio.stderr,
            terminal: s.stdio.terminal,
            exit_status,
            exited_at: exited_at.map(timestamp).into(),
            exec_id: req.exec_id,
            ..Default::default()
        })
    }

    async fn wait(
        &self,
        ctx: &TtrpcContext,
        req: task_api::WaitRequest,
    ) -> TtrpcResult<task_api::WaitResponse> {
        check_ids(&req.id, &req.exec_id)?;
        let (exit_status, at) = self.sandbox(ctx)?.wait(&req.id, &req.exec_id).await?;
        Ok(task_api::WaitResponse {
            exit_status,
            exited_at: Some(timestamp(at)).into(),
            ..Default::default()
        })
    }

    async fn kill(&self, ctx: &TtrpcContext, req: task_api::KillRequest) -> TtrpcResult<Empty> {
        check_ids(&req.id, &req.exec_id)?;
        self.sandbox(ctx)?
            .kill(&req.id, &req.exec_id, req.signal, req.all)
            .await?;
        Ok(Empty::new())
    }

    async fn delete(
        &self,
        ctx: &TtrpcContext,
        req: task_api::DeleteRequest,
    ) -> TtrpcResult<task_api::DeleteResponse> {
        check_ids(&req.id, &req.exec_id)?;
        let (pid, exit_status, at) = self.sandbox(ctx)?.delete(&req.id, &req.exec_id).await?;
        Ok(task_api::DeleteResponse {
            pid,
            exit_status,
            exited_at: Some(timestamp(at)).into(),
            ..Default::default()
        })
    }

    async fn exec(
        &self,
        ctx: &TtrpcContext,
        req: task_api::ExecProcessRequest,
    ) -> TtrpcResult<Empty> {
        check_ids(&req.id, &req.exec_id)?;
        let spec = req.spec.into_option().map(|a| a.value).unwrap_or_default();
        if spec.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "exec {} has no process spec",
                req.exec_id
            ))
            .into());
        }
        let stdio = StdioPaths {
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
            terminal: req.terminal,
        };
        self.sandbox(ctx)?
            .exec(&req.id, &req.exec_id, spec, stdio)
            .await?;
        Ok(Empty::new())
    }

    async fn close_io(
        &self,
        ctx: &TtrpcContext,
        req: task_api::CloseIORequest,
    ) -> TtrpcResult<Empty> {
        check_ids(&req.id, &req.exec_id)?;
        let sandbox = self.sandbox(ctx)?;
        if req.stdin {
            sandbox.close_stdin(&req.id, &req.exec_id).await?;
        }
        Ok(Empty::new())
    }

    async fn pids(
        &self,
        ctx: &TtrpcContext,
        req: task_api::PidsRequest,
    ) -> TtrpcResult<task_api::PidsResponse> {
        check_ids(&req.id, "")?;
        let pids = self.sandbox(ctx)?.pids(&req.id).await?;
        Ok(task_api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| task_api::ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        ctx: &TtrpcContext,
        req: task_api::ConnectRequest,
    ) -> TtrpcResult<task_api::ConnectResponse> {
        check_ids(&req.id, "")?;
        let sandbox = self.sandbox(ctx)?;
        // The shim fills in its own pid.
        Ok(task_api::ConnectResponse {
            shim_pid: 0,
            task_pid: sandbox.init_pid(&req.id)?,
            // The task API version: v3 on a sandbox's own socket.
            version: if self.bound.is_some() { "3" } else { "2" }.into(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        ctx: &TtrpcContext,
        _req: task_api::ShutdownRequest,
    ) -> TtrpcResult<Empty> {
        if self.bound.is_some() {
            // containerd sends Shutdown after each container's delete: the
            // sandbox's task socket lives until the controller's Shutdown.
            return Ok(Empty::new());
        }
        let id = sandbox_id(ctx)?;
        // The shim exits on OK (and on NotFound): refuse while containers
        // remain, so that a pod's shim outlives its containers' deletes.
        match self.registry.get(&id) {
            Ok(sandbox) if sandbox.is_managed() => Err(Error::FailedPrecondition(format!(
                "sandbox {id} is driven by the sandbox API: ShutdownSandbox ends it"
            ))
            .into()),
            Ok(sandbox) if !sandbox.is_empty() => {
                Err(Error::FailedPrecondition(format!("sandbox {id} still has containers")).into())
            }
            Ok(_) => {
                self.registry.delete(&id).await?;
                Ok(Empty::new())
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn stats(
        &self,
        ctx: &TtrpcContext,
        req: task_api::StatsRequest,
    ) -> TtrpcResult<task_api::StatsResponse> {
        check_ids(&req.id, "")?;
        let s = self.sandbox(ctx)?.stats(&req.id).await?;
        let stats: Any = pack(&metrics_of(&s))
            .map_err(|e| ttrpc::Error::Others(format!("pack metrics: {e}")))?;
        Ok(task_api::StatsResponse {
            stats: Some(stats).into(),
            ..Default::default()
        })
    }

    async fn pause(&self, _: &TtrpcContext, _: task_api::PauseRequest) -> TtrpcResult<Empty> {
        Err(Error::Unimplemented("pause".into()).into())
    }

    async fn resume(&self, _: &TtrpcContext, _: task_api::ResumeRequest) -> TtrpcResult<Empty> {
        Err(Error::Unimplemented("resume".into()).into())
    }

    async fn checkpoint(
        &self,
        _: &TtrpcContext,
        _: task_api::CheckpointTaskRequest,
    ) -> TtrpcResult<Empty> {
        Err(Error::Unimplemented("checkpoint".into()).into())
    }

    async fn resize_pty(
        &self,
        ctx: &TtrpcContext,
        req: task_api::ResizePtyRequest,
    ) -> TtrpcResult<Empty> {
        check_ids(&req.id, &req.exec_id)?;
        self.sandbox(ctx)?
            .resize_pty(&req.id, &req.exec_id, req.width, req.height)
            .await?;
        Ok(Empty::new())
    }

    async fn update(
        &self,
        ctx: &TtrpcContext,
        req: task_api::UpdateTaskRequest,
    ) -> TtrpcResult<Empty> {
        check_ids(&req.id, "")?;
        let resources = req
            .resources
            .into_option()
            .map(|a| a.value)
            .unwrap_or_default();
        check_resources(&req.id, &resources)?;
        self.sandbox(ctx)?.update(&req.id, resources).await?;
        Ok(Empty::new())
    }
}

/// An update's resources: containerd sends the OCI LinuxResources as JSON
/// (checked by [`resources::check`]); an update without any is refused here.
fn check_resources(id: &str, json: &[u8]) -> Result<(), Error> {
    if json.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "update of container {id} carries no resources"
        )));
    }
    match resources::check(json) {
        Ok(_) => Ok(()),
        Err(ResourcesError::TooLarge { len, max }) => Err(Error::InvalidArgument(format!(
            "resources of container {id} are {len} bytes, more than {max}"
        ))),
        Err(ResourcesError::NotJson(_) | ResourcesError::NotObject) => Err(Error::InvalidArgument(
            format!("resources of container {id} are not a JSON object (OCI LinuxResources)"),
        )),
    }
}

/// The guest's cgroup v2 figures as containerd's cgroups v1 metrics: CRI
/// takes the working set as usage - total_inactive_file, and the CPU usage
/// from cpu.usage.total.
fn metrics_of(s: &kuasar_api::agent::StatsResponse) -> Metrics {
    Metrics {
        memory: Some(MemoryStat {
            usage: Some(MemoryEntry {
                usage: s.memory_usage_bytes,
                limit: s.memory_limit_bytes,
                ..Default::default()
            })
            .into(),
            inactive_file: s.memory_inactive_file_bytes,
            total_inactive_file: s.memory_inactive_file_bytes,
            ..Default::default()
        })
        .into(),
        memory_oom_control: Some(MemoryOomControl {
            oom_kill: s.oom_kills,
            ..Default::default()
        })
        .into(),
        cpu: Some(CPUStat {
            usage: Some(CPUUsage {
                total: s.cpu_usage_ns,
                user: s.cpu_user_ns,
                kernel: s.cpu_system_ns,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        })
        .into(),
        pids: Some(PidsStat {
            current: s.pids_current,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_are_bounded_json_objects() {
        assert!(check_resources("c", br#"{"memory":{"limit":1048576}}"#).is_ok());
        assert!(check_resources("c", b"").is_err());
        assert!(check_resources("c", b"[1]").is_err());
        assert!(check_resources("c", b"{").is_err());
        let big = format!(r#"{{"x":"{}"}}"#, "a".repeat(resources::MAX_JSON));
        let err = check_resources("c", big.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("bytes"), "{err}");
        // The wording kuasar-vmm has always used.
        assert_eq!(
            err,
            format!(
                "invalid argument: resources of container c are {} bytes, more than 65536",
                big.len()
            )
        );
        let said = |json: &[u8]| check_resources("c", json).unwrap_err().to_string();
        assert_eq!(
            said(b""),
            "invalid argument: update of container c carries no resources"
        );
        for bad in [&b"[1]"[..], b"{"] {
            assert_eq!(
                said(bad),
                "invalid argument: resources of container c are not a JSON object (OCI LinuxResources)"
            );
        }
    }

    #[test]
    fn metrics_carry_the_working_set_inputs() {
        let s = kuasar_api::agent::StatsResponse {
            memory_usage_bytes: 100,
            memory_limit_bytes: 200,
            memory_inactive_file_bytes: 30,
            cpu_usage_ns: 9,
            cpu_user_ns: 6,
            cpu_system_ns: 3,
            pids_current: 2,
            oom_kills: 1,
            ..Default::default()
        };
        let m = metrics_of(&s);
        let mem = m.memory.as_ref().unwrap();
        assert_eq!(mem.usage.usage, 100);
        assert_eq!(mem.usage.limit, 200);
        assert_eq!(mem.total_inactive_file, 30);
        let cpu = m.cpu.usage.as_ref().unwrap();
        assert_eq!((cpu.total, cpu.user, cpu.kernel), (9, 6, 3));
        assert_eq!(m.memory_oom_control.oom_kill, 1);
        assert_eq!(m.pids.current, 2);
    }
}
