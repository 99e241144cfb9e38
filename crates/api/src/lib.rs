//! Protocol definitions only: containerd's shim protocols (re-exported from
//! `containerd-shim-protos`) and the generated code of kuasar's own agent and
//! sandboxer protocols. Conversions to domain types live in the crates that
//! use them.

pub use containerd_shim_protos as containerd;
pub use protobuf;
pub use ttrpc;

/// The guest agent protocol (`kuasar.agent.v1`).
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent/mod.rs"));
    pub use agent::*;
    pub use agent_ttrpc::{create_agent, Agent, AgentClient};
}

/// The shim <-> sandboxer protocol (`kuasar.sandboxer.v1`).
pub mod sandboxer {
    include!(concat!(env!("OUT_DIR"), "/sandboxer/mod.rs"));
    pub use sandboxer::*;
    pub use sandboxer_ttrpc::{create_sandboxer, Sandboxer, SandboxerClient};
}

/// containerd's shim sandbox API (`containerd.runtime.sandbox.v1`, as of
/// containerd 2.1), served by kuasar-vmm for the `shim` sandboxer mode.
pub mod sandbox {
    include!(concat!(env!("OUT_DIR"), "/sandbox/mod.rs"));
    pub use sandbox::*;
}

/// The pod configuration of the Kubernetes CRI (`runtime.v1`, the subset
/// kuasar-vmm reads).
pub mod cri {
    include!(concat!(env!("OUT_DIR"), "/cri_pod/mod.rs"));
    pub use cri_pod::*;
}

/// ttrpc metadata key naming the sandbox a task request belongs to.
pub const SANDBOX_ID_METADATA: &str = "kuasar-sandbox-id";
/// ttrpc metadata key carrying the containerd namespace of a task request.
pub const NAMESPACE_METADATA: &str = "kuasar-namespace";
/// ttrpc metadata key carrying containerd's ttrpc address (for events).
pub const TTRPC_ADDRESS_METADATA: &str = "kuasar-ttrpc-address";
