//! containerd's shim sandbox API (`containerd.runtime.sandbox.v1.Sandbox`),
//! served to the shims for containerd's `shim` sandboxer mode: the pod's
//! life without a pause container. Converts messages to domain calls on the
//! sandbox and back; no logic of its own.
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use kuasar_api::sandbox::metrics::Metric;
use kuasar_api::sandbox::platform::Platform;
use kuasar_api::sandbox::sandbox::*;
use kuasar_api::sandbox::sandbox_ttrpc_async::Sandbox as SandboxApi;
use ttrpc::r#async::TtrpcContext;

use crate::error::Error;
use crate::events::timestamp;
use crate::protocol::task::metadata_of;
use crate::registry::Registry;
use crate::sandbox::{Sandbox, SandboxInfo};

/// containerd's names for a sandbox's state.
pub const STATE_READY: &str = "SANDBOX_READY";
pub const STATE_NOT_READY: &str = "SANDBOX_NOTREADY";
/// How long StopSandbox lets the VM quit before killing it, unless asked.
const STOP_GRACE: Duration = Duration::from_secs(2);
const STOP_GRACE_MAX: Duration = Duration::from_secs(30);

pub struct SandboxService {
    registry: Arc<Registry>,
}

impl SandboxService {
    pub fn new(registry: Arc<Registry>) -> Self {
        SandboxService { registry }
    }

    fn get(&self, id: &str) -> Result<Arc<Sandbox>, Error> {
        self.registry.get(id)
    }
}

type TtrpcResult<T> = ttrpc::Result<T>;

fn timestamp_of(
    t: SystemTime,
) -> protobuf::MessageField<protobuf::well_known_types::timestamp::Timestamp> {
    let ts = timestamp(t);
    protobuf::MessageField::some(protobuf::well_known_types::timestamp::Timestamp {
        seconds: ts.seconds,
        nanos: ts.nanos,
        ..Default::default()
    })
}

#[async_trait]
impl SandboxApi for SandboxService {
    async fn create_sandbox(
        &self,
        ctx: &TtrpcContext,
        req: CreateSandboxRequest,
    ) -> TtrpcResult<CreateSandboxResponse> {
        let options = req
            .options
            .as_ref()
            .map(|a| (a.type_url.as_str(), a.value.as_slice()));
        let (namespace, ttrpc_address) = metadata_of(ctx);
        let info = SandboxInfo {
            id: req.sandbox_id.clone(),
            namespace,
            bundle: req.bundle_path.clone(),
            ttrpc_address,
        };
        create(&self.registry, info, &req.netns_path, options)?;
        Ok(CreateSandboxResponse::new())
    }

    async fn start_sandbox(
        &self,
        _: &TtrpcContext,
        req: StartSandboxRequest,
    ) -> TtrpcResult<StartSandboxResponse> {
        let sandbox = self.get(&req.sandbox_id)?;
        let (pid, created) = sandbox.start_pod().await?;
        let spec = sandbox.pod().map(|pod| {
            let (type_url, value) = crate::pod::runtime_spec::encoded(&pod);
            kuasar_api::protobuf::well_known_types::any::Any {
                type_url,
                value,
                ..Default::default()
            }
        });
        Ok(StartSandboxResponse {
            pid,
            created_at: timestamp_of(created),
            spec: spec.into(),
            ..Default::default()
        })
    }

    async fn platform(
        &self,
        _: &TtrpcContext,
        req: PlatformRequest,
    ) -> TtrpcResult<PlatformResponse> {
        self.get(&req.sandbox_id)?;
        Ok(PlatformResponse {
            platform: protobuf::MessageField::some(Platform {
                os: PLATFORM_OS.into(),
                architecture: platform_architecture(),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    async fn stop_sandbox(
        &self,
        _: &TtrpcContext,
        req: StopSandboxRequest,
    ) -> TtrpcResult<StopSandboxResponse> {
        let sandbox = match self.get(&req.sandbox_id) {
            Ok(s) => s,
            // Stopping a sandbox that is gone is done.
            Err(Error::NotFound(_)) => return Ok(StopSandboxResponse::new()),
            Err(e) => return Err(e.into()),
        };
        sandbox.stop_pod(stop_grace(req.timeout_secs)).await?;
        Ok(StopSandboxResponse::new())
    }

    async fn wait_sandbox(
        &self,
        _: &TtrpcContext,
        req: WaitSandboxRequest,
    ) -> TtrpcResult<WaitSandboxResponse> {
        let sandbox = self.get(&req.sandbox_id)?;
        let (status, at) = sandbox.wait_pod().await;
        Ok(WaitSandboxResponse {
            exit_status: status,
            exited_at: timestamp_of(at),
            ..Default::default()
        })
    }

    async fn sandbox_status(
        &self,
        _: &TtrpcContext,
        req: SandboxStatusRequest,
    ) -> TtrpcResult<SandboxStatusResponse> {
        let sandbox = self.get(&req.sandbox_id)?;
        let s = sandbox.pod_status();
        let mut resp = SandboxStatusResponse {
            sandbox_id: req.sandbox_id.clone(),
            pid: s.pid,
            state: if s.ready {
                STATE_READY
            } else {
                STATE_NOT_READY
            }
            .into(),
            created_at: timestamp_of(s.created_at),
            ..Default::default()
        };
        if let Some(at) = s.exited_at {
            resp.exited_at = timestamp_of(at);
        }
        if req.verbose {
            resp.info
                .insert("vmm".into(), self.registry.host.hypervisor.name().into());
            resp.info
                .insert("dir".into(), sandbox.dir.display().to_string());
        }
        Ok(resp)
    }

    async fn ping_sandbox(&self, _: &TtrpcContext, req: PingRequest) -> TtrpcResult<PingResponse> {
        self.get(&req.sandbox_id)?;
        Ok(PingResponse::new())
    }

    async fn shutdown_sandbox(
        &self,
        _: &TtrpcContext,
        req: ShutdownSandboxRequest,
    ) -> TtrpcResult<ShutdownSandboxResponse> {
        // Idempotent: shutting down an unknown sandbox succeeds.
        self.registry.delete(&req.sandbox_id).await?;
        tracing::info!(sandbox = %req.sandbox_id, "sandbox shut down");
        Ok(ShutdownSandboxResponse::new())
    }

    async fn sandbox_metrics(
        &self,
        _: &TtrpcContext,
        req: SandboxMetricsRequest,
    ) -> TtrpcResult<SandboxMetricsResponse> {
        let sandbox = self.get(&req.sandbox_id)?;
        let (type_url, value) = pod_metrics(&sandbox).await?;
        Ok(SandboxMetricsResponse {
            metrics: protobuf::MessageField::some(Metric {
                timestamp: timestamp_of(SystemTime::now()),
                id: req.sandbox_id.clone(),
                data: protobuf::MessageField::some(protobuf::well_known_types::any::Any {
                    type_url,
                    value,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
    }
}

/// Records the pod a sandbox API Create describes (shared by the shim's
/// sandbox API and the gRPC controller): the netns CNI prepared and CRI's
/// PodSandboxConfig in `options` (anything else is InvalidArgument).
pub(crate) fn create(
    registry: &Registry,
    info: SandboxInfo,
    netns_path: &str,
    options: Option<(&str, &[u8])>,
) -> Result<Arc<Sandbox>, Error> {
    let pod = crate::pod::from_create_sandbox(netns_path, options)?;
    let id = info.id.clone();
    let sandbox = registry.register(info)?;
    sandbox.create_pod(pod)?;
    tracing::info!(sandbox = %id, netns = %netns_path, "sandbox created");
    Ok(sandbox)
}

/// How long a sandbox API Stop lets the VM quit: the request's timeout
/// (0 = the default), at most STOP_GRACE_MAX.
pub(crate) fn stop_grace(timeout_secs: u32) -> Duration {
    match timeout_secs {
        0 => STOP_GRACE,
        s => Duration::from_secs(s.into()).min(STOP_GRACE_MAX),
    }
}

/// The platform a sandbox runs containers for (the host's: a VM of the
/// same architecture).
pub(crate) const PLATFORM_OS: &str = "linux";

pub(crate) fn platform_architecture() -> String {
    std::env::consts::ARCH
        .replace("x86_64", "amd64")
        .replace("aarch64", "arm64")
}

/// The pod's footprint as containerd's cgroup v1 metrics (what containerd
/// 2.4's CRI reads for pod stats): memory usage = the VMM's RSS, CPU usage
/// = its user + system time, pids = the guest's processes, packed as an
/// Any: its type URL and encoded bytes.
pub(crate) async fn pod_metrics(sandbox: &Sandbox) -> Result<(String, Vec<u8>), Error> {
    let pids = sandbox.guest_pids().await;
    vmm_metrics_any(sandbox.pod_status().pid, pids)
        .map(|a| (a.type_url, a.value))
        .map_err(|e| Error::Internal(format!("encode metrics: {e}")))
}

fn vmm_metrics_any(
    pid: u32,
    pids: u64,
) -> protobuf::Result<kuasar_api::containerd::protobuf::well_known_types::any::Any> {
    use kuasar_api::containerd::cgroups::metrics::{
        CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat,
    };
    // A VMM that is gone (or not started) has used nothing.
    let usage = match pid {
        0 => Default::default(),
        pid => crate::metrics::procfs::read(pid).unwrap_or_default(),
    };
    let (rss, cpu_ns) = (
        usage.rss_bytes,
        u64::try_from(usage.cpu_time.as_nanos()).unwrap_or(u64::MAX),
    );
    let metrics = Metrics {
        memory: Some(MemoryStat {
            usage: Some(MemoryEntry {
                usage: rss,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        })
        .into(),
        cpu: Some(CPUStat {
            usage: Some(CPUUsage {
                total: cpu_ns,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        })
        .into(),
        pids: Some(PidsStat {
            current: pids,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    crate::events::pack(&metrics)
}
