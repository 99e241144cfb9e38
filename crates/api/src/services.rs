//! The ttrpc and gRPC service names of every protocol kuasar speaks, stated
//! once: the generated code registers its services under these names, and
//! hand-built frames (the shim's relay, the tests) must use the same ones.
//! The unit tests below hold each name to the generated code.

/// containerd's task API as containerd 1.7 and the shim's own clients call
/// it, and as kuasar-vmm serves it on its socket for the shims. The
/// generated code registers only this name.
pub const TASK_V2: &str = "containerd.task.v2.Task";

/// The same service under its v3 name, which containerd 2.x uses for a
/// task address of version 3 (the shim, and a sandbox's own task socket,
/// serve it too). Same methods, same messages.
pub const TASK_V3: &str = "containerd.task.v3.Task";

/// containerd's shim sandbox API (the `shim` sandboxer mode), which the
/// shim relays to kuasar-vmm.
pub const SANDBOX: &str = "containerd.runtime.sandbox.v1.Sandbox";

/// containerd's Sandbox Controller (gRPC, the zero-shim mode).
pub const CONTROLLER: &str = "containerd.services.sandbox.v1.Controller";

/// kuasar-vmm's own service for the shims (register, ping, forget).
pub const SANDBOXER: &str = "kuasar.sandboxer.v1.Sandboxer";

/// kuasar-vmm's operator service (kuasarctl).
pub const ADMIN: &str = "kuasar.sandboxer.v1.Admin";

/// The guest agent's service.
pub const AGENT: &str = "kuasar.agent.v1.Agent";

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::shim::shim_ttrpc::{create_task, Task};
    use std::collections::HashMap;
    use std::sync::Arc;

    /// Every method the generated code registers is under `/{name}/`.
    fn all_under<V>(methods: &HashMap<String, V>, name: &str) {
        assert!(!methods.is_empty(), "{name}");
        let prefix = format!("/{name}/");
        for method in methods.keys() {
            assert!(method.starts_with(&prefix), "{method} is not under {name}");
        }
    }

    struct Nothing;
    impl Task for Nothing {}
    impl crate::agent::Agent for Nothing {}
    impl crate::sandboxer::Sandboxer for Nothing {}
    impl crate::sandboxer::Admin for Nothing {}
    impl crate::sandbox::sandbox_ttrpc::Sandbox for Nothing {}

    #[test]
    fn names_are_the_generated_ones() {
        let methods = create_task(Arc::new(Nothing));
        assert!(methods.len() > 10);
        all_under(&methods, TASK_V2);
        all_under(&crate::agent::create_agent(Arc::new(Nothing)), AGENT);
        all_under(
            &crate::sandboxer::create_sandboxer(Arc::new(Nothing)),
            SANDBOXER,
        );
        all_under(&crate::sandboxer::create_admin(Arc::new(Nothing)), ADMIN);
        all_under(
            &crate::sandbox::sandbox_ttrpc::create_sandbox(Arc::new(Nothing)),
            SANDBOX,
        );
    }

    #[cfg(feature = "grpc")]
    #[test]
    fn controller_is_the_generated_grpc_name() {
        use crate::grpc::sandbox::controller_server::SERVICE_NAME;
        assert_eq!(CONTROLLER, SERVICE_NAME);
    }

    #[test]
    fn task_v3_differs_only_in_the_version() {
        assert_eq!(TASK_V3, TASK_V2.replace(".v2.", ".v3."));
    }
}
