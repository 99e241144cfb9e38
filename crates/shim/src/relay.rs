//! containerd's task service and its shim sandbox service, relayed request
//! by request to kuasar-vmm.
//!
//! Each request is forwarded unchanged (same message, same timeout, the
//! caller's metadata kept) to the sandboxer's [`services::TASK_V2`] or
//! `containerd.runtime.sandbox.v1.Sandbox`,
//! with three metadata entries added: [`SANDBOX_ID_METADATA`],
//! [`NAMESPACE_METADATA`], [`TTRPC_ADDRESS_METADATA`]. Answers, statuses included,
//! come back unchanged, except: `Connect` reports this process as
//! `shim_pid`, and `Shutdown` / `ShutdownSandbox` end this process once
//! answered.

use std::collections::HashMap;
use std::sync::Arc;

use kuasar_api::containerd::api::Empty;
use kuasar_api::containerd::shim::shim::*;
use kuasar_api::containerd::shim::shim_ttrpc::{create_task, Task};
use kuasar_api::protobuf::Message;
use kuasar_api::sandbox::sandbox::*;
use kuasar_api::sandbox::sandbox_ttrpc::{create_sandbox, Sandbox};
use kuasar_api::ttrpc::proto::KeyValue;
use kuasar_api::ttrpc::{self, Code, MethodHandler, TtrpcContext};
use kuasar_api::{services, NAMESPACE_METADATA, SANDBOX_ID_METADATA, TTRPC_ADDRESS_METADATA};

use crate::log;
use crate::sandboxer::{status, Retry, Vmm};

/// Called once the sandboxer accepted `Shutdown`: ends the process soon.
pub type OnShutdown = Box<dyn Fn() + Send + Sync>;

pub struct TaskRelay {
    vmm: Arc<Vmm>,
    /// Our three metadata entries, added to every request.
    ours: [(&'static str, String); 3],
    on_shutdown: OnShutdown,
    /// containerd drives this pod through the sandbox API: the pod ends
    /// with ShutdownSandbox, not with a task Shutdown.
    sandbox_api: std::sync::atomic::AtomicBool,
}

impl TaskRelay {
    pub fn new(
        vmm: Arc<Vmm>,
        sandbox_id: &str,
        namespace: &str,
        ttrpc_address: &str,
        on_shutdown: OnShutdown,
    ) -> Self {
        TaskRelay {
            vmm,
            ours: [
                (SANDBOX_ID_METADATA, sandbox_id.to_string()),
                (NAMESPACE_METADATA, namespace.to_string()),
                (TTRPC_ADDRESS_METADATA, ttrpc_address.to_string()),
            ],
            on_shutdown,
            sandbox_api: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The caller's metadata (minus any spoofed kuasar-* keys) plus ours.
    fn metadata(&self, ctx: &TtrpcContext) -> Vec<KeyValue> {
        let mut md = Vec::with_capacity(ctx.metadata.len() + self.ours.len());
        for (k, values) in &ctx.metadata {
            if self
                .ours
                .iter()
                .any(|(ours, _)| k.eq_ignore_ascii_case(ours))
            {
                continue;
            }
            for v in values {
                md.push(kv(k, v));
            }
        }
        md.extend(self.ours.iter().map(|(k, v)| kv(k, v)));
        md
    }

    fn forward<Req: Message, Resp: Message>(
        &self,
        ctx: &TtrpcContext,
        method: &str,
        req: &Req,
        retry: Retry,
    ) -> ttrpc::Result<Resp> {
        self.forward_to(services::TASK_V2, ctx, method, req, retry)
    }

    fn forward_to<Req: Message, Resp: Message>(
        &self,
        service: &str,
        ctx: &TtrpcContext,
        method: &str,
        req: &Req,
        retry: Retry,
    ) -> ttrpc::Result<Resp> {
        let payload = req.write_to_bytes().map_err(|e| {
            ttrpc::Error::RpcStatus(status(Code::INTERNAL, format!("encode {method}: {e}")))
        })?;
        let md = self.metadata(ctx);
        let out = self
            .vmm
            .call(service, method, &payload, &md, ctx.timeout_nano, retry)
            .map_err(|s| {
                log!("debug", "{method}: {:?}: {}", s.code(), s.message);
                ttrpc::Error::RpcStatus(s)
            })?;
        Resp::parse_from_bytes(&out).map_err(|e| {
            ttrpc::Error::RpcStatus(status(
                Code::INTERNAL,
                format!("kuasar-vmm sent an invalid {method} response: {e}"),
            ))
        })
    }

    fn once<Req: Message, Resp: Message>(
        &self,
        ctx: &TtrpcContext,
        method: &str,
        req: Req,
    ) -> ttrpc::Result<Resp> {
        log!("debug", "{method}");
        self.forward(ctx, method, &req, Retry::Once)
    }
}

fn kv(k: &str, v: &str) -> KeyValue {
    let mut kv = KeyValue::new();
    kv.key = k.to_string();
    kv.value = v.to_string();
    kv
}

impl Task for TaskRelay {
    fn state(&self, ctx: &TtrpcContext, req: StateRequest) -> ttrpc::Result<StateResponse> {
        self.once(ctx, "State", req)
    }
    fn create(
        &self,
        ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> ttrpc::Result<CreateTaskResponse> {
        self.once(ctx, "Create", req)
    }
    fn start(&self, ctx: &TtrpcContext, req: StartRequest) -> ttrpc::Result<StartResponse> {
        self.once(ctx, "Start", req)
    }
    fn delete(&self, ctx: &TtrpcContext, req: DeleteRequest) -> ttrpc::Result<DeleteResponse> {
        self.once(ctx, "Delete", req)
    }
    fn pids(&self, ctx: &TtrpcContext, req: PidsRequest) -> ttrpc::Result<PidsResponse> {
        self.once(ctx, "Pids", req)
    }
    fn pause(&self, ctx: &TtrpcContext, req: PauseRequest) -> ttrpc::Result<Empty> {
        self.once(ctx, "Pause", req)
    }
    fn resume(&self, ctx: &TtrpcContext, req: ResumeRequest) -> ttrpc::Result<Empty> {
        self.once(ctx, "Resume", req)
    }
    fn checkpoint(&self, ctx: &TtrpcContext, req: CheckpointTaskRequest) -> ttrpc::Result<Empty> {
        self.once(ctx, "Checkpoint", req)
    }
    fn kill(&self, ctx: &TtrpcContext, req: KillRequest) -> ttrpc::Result<Empty> {
        self.once(ctx, "Kill", req)
    }
    fn exec(&self, ctx: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        self.once(ctx, "Exec", req)
    }
    fn resize_pty(&self, ctx: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        self.once(ctx, "ResizePty", req)
    }
    fn close_io(&self, ctx: &TtrpcContext, req: CloseIORequest) -> ttrpc::Result<Empty> {
        self.once(ctx, "CloseIO", req)
    }
    fn update(&self, ctx: &TtrpcContext, req: UpdateTaskRequest) -> ttrpc::Result<Empty> {
        self.once(ctx, "Update", req)
    }
    fn wait(&self, ctx: &TtrpcContext, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        // Blocks for the task's whole life, across sandboxer restarts.
        log!("debug", "Wait {} {}", req.id, req.exec_id);
        self.forward(ctx, "Wait", &req, Retry::UntilAnswered)
    }
    fn stats(&self, ctx: &TtrpcContext, req: StatsRequest) -> ttrpc::Result<StatsResponse> {
        self.once(ctx, "Stats", req)
    }
    fn connect(&self, ctx: &TtrpcContext, req: ConnectRequest) -> ttrpc::Result<ConnectResponse> {
        let mut resp: ConnectResponse = self.once(ctx, "Connect", req)?;
        resp.shim_pid = std::process::id();
        Ok(resp)
    }
    fn shutdown(&self, ctx: &TtrpcContext, req: ShutdownRequest) -> ttrpc::Result<Empty> {
        if self.sandbox_api.load(std::sync::atomic::Ordering::SeqCst) {
            // containerd 2.1 shuts a task's shim down after the task's
            // delete even in the `shim` sandboxer mode; the pod's shim stays
            // until ShutdownSandbox.
            log!(
                "debug",
                "Shutdown: the pod ends with ShutdownSandbox; staying"
            );
            return Ok(Empty::new());
        }
        match self.once::<_, Empty>(ctx, "Shutdown", req) {
            Ok(e) => {
                log!("info", "Shutdown accepted by kuasar-vmm: exiting");
                (self.on_shutdown)();
                Ok(e)
            }
            // The sandbox is already gone: nothing left to serve. Answer
            // success so that Shutdown stays idempotent for containerd.
            Err(ttrpc::Error::RpcStatus(s)) if s.code() == Code::NOT_FOUND => {
                log!(
                    "info",
                    "Shutdown: sandbox unknown to kuasar-vmm ({}): exiting",
                    s.message
                );
                (self.on_shutdown)();
                Ok(Empty::new())
            }
            Err(e) => Err(e),
        }
    }
}

impl TaskRelay {
    fn sandbox_call<Req: Message, Resp: Message>(
        &self,
        ctx: &TtrpcContext,
        method: &str,
        req: Req,
    ) -> ttrpc::Result<Resp> {
        log!("debug", "{method}");
        self.forward_to(services::SANDBOX, ctx, method, &req, Retry::Once)
    }
}

impl Sandbox for TaskRelay {
    fn create_sandbox(
        &self,
        ctx: &TtrpcContext,
        req: CreateSandboxRequest,
    ) -> ttrpc::Result<CreateSandboxResponse> {
        let resp = self.sandbox_call(ctx, "CreateSandbox", req)?;
        self.sandbox_api
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(resp)
    }
    fn start_sandbox(
        &self,
        ctx: &TtrpcContext,
        req: StartSandboxRequest,
    ) -> ttrpc::Result<StartSandboxResponse> {
        self.sandbox_call(ctx, "StartSandbox", req)
    }
    fn platform(
        &self,
        ctx: &TtrpcContext,
        req: PlatformRequest,
    ) -> ttrpc::Result<PlatformResponse> {
        self.sandbox_call(ctx, "Platform", req)
    }
    fn stop_sandbox(
        &self,
        ctx: &TtrpcContext,
        req: StopSandboxRequest,
    ) -> ttrpc::Result<StopSandboxResponse> {
        self.sandbox_call(ctx, "StopSandbox", req)
    }
    fn wait_sandbox(
        &self,
        ctx: &TtrpcContext,
        req: WaitSandboxRequest,
    ) -> ttrpc::Result<WaitSandboxResponse> {
        // Blocks for the sandbox's whole life, across sandboxer restarts.
        log!("debug", "WaitSandbox {}", req.sandbox_id);
        self.forward_to(
            services::SANDBOX,
            ctx,
            "WaitSandbox",
            &req,
            Retry::UntilAnswered,
        )
    }
    fn sandbox_status(
        &self,
        ctx: &TtrpcContext,
        req: SandboxStatusRequest,
    ) -> ttrpc::Result<SandboxStatusResponse> {
        self.sandbox_call(ctx, "SandboxStatus", req)
    }
    fn ping_sandbox(&self, ctx: &TtrpcContext, req: PingRequest) -> ttrpc::Result<PingResponse> {
        self.sandbox_call(ctx, "PingSandbox", req)
    }
    fn shutdown_sandbox(
        &self,
        ctx: &TtrpcContext,
        req: ShutdownSandboxRequest,
    ) -> ttrpc::Result<ShutdownSandboxResponse> {
        let resp = self.sandbox_call(ctx, "ShutdownSandbox", req)?;
        log!("info", "ShutdownSandbox accepted by kuasar-vmm: exiting");
        (self.on_shutdown)();
        Ok(resp)
    }
    fn sandbox_metrics(
        &self,
        ctx: &TtrpcContext,
        req: SandboxMetricsRequest,
    ) -> ttrpc::Result<SandboxMetricsResponse> {
        self.sandbox_call(ctx, "SandboxMetrics", req)
    }
}

/// The method map served by the shim: every Task method under both the
/// v2 and the v3 service name (containerd 1.7 speaks v2; a v3 client sends
/// the same messages under the v3 name), and the sandbox service.
pub fn services(relay: Arc<TaskRelay>) -> HashMap<String, Box<dyn MethodHandler + Send + Sync>> {
    let mut methods = create_task(relay.clone());
    methods.extend(create_sandbox(relay.clone()));
    let v2_prefix = format!("/{}/", services::TASK_V2);
    let v3_prefix = format!("/{}/", services::TASK_V3);
    for (name, handler) in create_task(relay) {
        if let Some(method) = name.strip_prefix(&v2_prefix) {
            methods.insert(format!("{v3_prefix}{method}"), handler);
        }
    }
    methods
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_service_names_have_every_method() {
        let vmm = Arc::new(Vmm::new("/nonexistent".into()));
        let relay = Arc::new(TaskRelay::new(vmm, "s", "n", "a", Box::new(|| {})));
        let m = services(relay);
        let methods = [
            "State",
            "Create",
            "Start",
            "Delete",
            "Pids",
            "Pause",
            "Resume",
            "Checkpoint",
            "Kill",
            "Exec",
            "ResizePty",
            "CloseIO",
            "Update",
            "Wait",
            "Stats",
            "Connect",
            "Shutdown",
        ];
        for svc in [services::TASK_V2, services::TASK_V3] {
            for meth in methods {
                assert!(m.contains_key(&format!("/{svc}/{meth}")), "/{svc}/{meth}");
            }
        }
        let sandbox_methods = [
            "CreateSandbox",
            "StartSandbox",
            "Platform",
            "StopSandbox",
            "WaitSandbox",
            "SandboxStatus",
            "PingSandbox",
            "ShutdownSandbox",
            "SandboxMetrics",
        ];
        for meth in sandbox_methods {
            assert!(
                m.contains_key(&format!("/{}/{meth}", services::SANDBOX)),
                "{meth}"
            );
        }
        assert_eq!(m.len(), 2 * methods.len() + sandbox_methods.len());
    }
}
