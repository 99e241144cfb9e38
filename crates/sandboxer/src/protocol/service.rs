//! The sandboxer's own service for the shims (`kuasar.sandboxer.v1.Sandboxer`).
use std::sync::Arc;

use async_trait::async_trait;
use kuasar_api::sandboxer::sandboxer_ttrpc_async::Sandboxer;
use kuasar_api::sandboxer::{DeleteSandboxRequest, Empty, PingResponse, RegisterSandboxRequest};
use ttrpc::r#async::TtrpcContext;

use crate::registry::Registry;
use crate::sandbox::SandboxInfo;

pub struct SandboxerService {
    registry: Arc<Registry>,
}

impl SandboxerService {
    pub fn new(registry: Arc<Registry>) -> Self {
        SandboxerService { registry }
    }
}

#[async_trait]
impl Sandboxer for SandboxerService {
    async fn ping(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<PingResponse> {
        Ok(PingResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            sandboxes: self.registry.len() as u32,
            ..Default::default()
        })
    }

    async fn register_sandbox(
        &self,
        _: &TtrpcContext,
        req: RegisterSandboxRequest,
    ) -> ttrpc::Result<Empty> {
        self.registry.register(SandboxInfo {
            id: req.sandbox_id,
            namespace: req.namespace,
            bundle: req.bundle,
            ttrpc_address: req.ttrpc_address,
        })?;
        Ok(Empty::new())
    }

    async fn delete_sandbox(
        &self,
        _: &TtrpcContext,
        req: DeleteSandboxRequest,
    ) -> ttrpc::Result<Empty> {
        self.registry.delete(&req.sandbox_id).await?;
        Ok(Empty::new())
    }
}
