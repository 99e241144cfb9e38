//! The ttrpc service names of containerd's task API. Both carry the same
//! methods and messages; the generated code registers only the v2 name.

/// The task service as containerd 1.7 and the shim's own clients call it,
/// and as kuasar-vmm serves it on its socket for the shims.
pub const V2: &str = "containerd.task.v2.Task";

/// The same service under its v3 name, which containerd 2.x uses for a
/// task address of version 3 (the shim, and a sandbox's own task socket,
/// serve it too).
pub const V3: &str = "containerd.task.v3.Task";

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::shim::shim_ttrpc::{create_task, Task};
    use std::sync::Arc;

    struct NoTask;
    impl Task for NoTask {}

    #[test]
    fn v2_is_the_generated_service_name() {
        let methods = create_task(Arc::new(NoTask));
        assert!(methods.len() > 10);
        let prefix = format!("/{V2}/");
        for name in methods.keys() {
            assert!(name.starts_with(&prefix), "{name}");
        }
    }

    #[test]
    fn v3_differs_only_in_the_version() {
        assert_eq!(V3, V2.replace(".v2.", ".v3."));
    }
}
