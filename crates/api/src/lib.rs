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
    pub use sandboxer_ttrpc::{
        create_admin, create_sandboxer, Admin, AdminClient, Sandboxer, SandboxerClient,
    };
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

/// containerd's streaming API (`containerd.services.streaming.v1`, as of
/// containerd 2.1): served by kuasar-vmm on a sandbox's task socket for CRI's
/// `io_type = "streaming"`.
pub mod streaming {
    include!(concat!(env!("OUT_DIR"), "/streaming/mod.rs"));
    pub use streaming::*;
    /// `google.protobuf.Any`, where the generated service looks for it.
    pub mod any {
        pub use protobuf::well_known_types::any::Any;
    }
}

/// The byte stream messages of containerd's streaming API
/// (`containerd.types.transfer`: `Data`, `WindowUpdate`).
pub mod transfer {
    include!(concat!(env!("OUT_DIR"), "/transfer/mod.rs"));
    pub use streaming::*;
}

/// containerd's Sandbox Controller gRPC API (`containerd.services.sandbox.v1`,
/// as of containerd 2.1), served by kuasar-vmm for the zero-shim mode: the
/// generated prost messages and the tonic server.
#[cfg(feature = "grpc")]
pub mod grpc {
    pub use prost;
    pub use prost_types;
    pub use tonic;

    /// The generated modules, nested as their protobuf packages (prost's
    /// cross-package references are relative).
    pub mod containerd {
        /// `containerd.types` (the subset the controller API uses).
        pub mod types {
            include!(concat!(env!("OUT_DIR"), "/containerd.types.rs"));
        }
        pub mod services {
            pub mod sandbox {
                /// `containerd.services.sandbox.v1`.
                pub mod v1 {
                    include!(concat!(
                        env!("OUT_DIR"),
                        "/containerd.services.sandbox.v1.rs"
                    ));
                }
            }
        }
    }
    pub use containerd::services::sandbox::v1 as sandbox;
    pub use containerd::types;
}

/// ttrpc metadata key naming the sandbox a task request belongs to.
pub const SANDBOX_ID_METADATA: &str = "kuasar-sandbox-id";
/// ttrpc metadata key carrying the containerd namespace of a task request.
pub const NAMESPACE_METADATA: &str = "kuasar-namespace";
/// ttrpc metadata key carrying containerd's ttrpc address (for events).
pub const TTRPC_ADDRESS_METADATA: &str = "kuasar-ttrpc-address";

/// Where kuasar-vmm's socket is named when not configured otherwise: the
/// environment variable the shim and kuasarctl read.
pub const VMM_SOCKET_ENV: &str = "KUASAR_VMM_SOCKET";
/// kuasar-vmm's socket by default (its `socket` setting's default).
pub const DEFAULT_VMM_SOCKET: &str = "/run/kuasar/vmm.sock";

/// kuasar-vmm's socket: `$KUASAR_VMM_SOCKET`, else [`DEFAULT_VMM_SOCKET`].
pub fn vmm_socket() -> std::path::PathBuf {
    vmm_socket_from(std::env::var_os(VMM_SOCKET_ENV))
}

/// kuasar-vmm's socket given the value of `$KUASAR_VMM_SOCKET` (an empty
/// value counts as unset).
pub fn vmm_socket_from(env: Option<std::ffi::OsString>) -> std::path::PathBuf {
    env.filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(DEFAULT_VMM_SOCKET))
}

/// The bounds of an operator's debug command (the agent's `DebugExec`, the
/// Admin service's `Exec`), which every side enforces on what it receives.
pub mod debug_exec {
    use std::time::Duration;

    /// The most stdout, and the most stderr, a reply carries.
    pub const MAX_OUTPUT: usize = 1 << 20;
    /// The most stdin a request carries.
    pub const MAX_STDIN: usize = 1 << 20;
    /// The timeout of a request that names none.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
    /// The longest timeout (longer ones are cut to it).
    pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

    /// The timeout a request asking for `requested` gets (zero: the default).
    pub fn timeout(requested: Duration) -> Duration {
        if requested.is_zero() {
            DEFAULT_TIMEOUT
        } else {
            requested.min(MAX_TIMEOUT)
        }
    }
}
