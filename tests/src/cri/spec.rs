//! Pod and container configurations for the tests, with the defaults a
//! kubelet would fill in; tests change the fields they care about.
use std::path::Path;

use super::proto::*;

/// The Kubernetes namespace of every test pod.
pub const POD_NAMESPACE: &str = "kuasar-e2e";

/// A pod named `name` (unique per test run), its logs under `log_dir`,
/// its own network namespace.
pub fn pod(name: &str, log_dir: &Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.to_string(),
            uid: format!("uid-{name}"),
            namespace: POD_NAMESPACE.to_string(),
            attempt: 0,
        }),
        hostname: name.chars().take(63).collect(),
        log_directory: log_dir.to_string_lossy().into_owned(),
        labels: [("kuasar-e2e/pod".to_string(), name.to_string())].into(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Pod as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The same pod in the node's network namespace (no hostname: the host's).
pub fn host_network(mut config: PodSandboxConfig) -> PodSandboxConfig {
    config.hostname.clear();
    if let Some(ns) = config
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .and_then(|s| s.namespace_options.as_mut())
    {
        ns.network = NamespaceMode::Node as i32;
    }
    config
}

/// A container `name` of `image` running `command` (argv), its log at
/// `<pod log dir>/<name>.log`.
pub fn container(name: &str, image: &str, command: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.to_string(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        labels: [("kuasar-e2e/container".to_string(), name.to_string())].into(),
        linux: Some(LinuxContainerConfig::default()),
        ..Default::default()
    }
}

pub fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: value.to_string(),
    }
}

/// A bind mount of host path `host` at `container` in the container.
pub fn mount(host: &Path, container: &str, readonly: bool) -> Mount {
    Mount {
        host_path: host.to_string_lossy().into_owned(),
        container_path: container.to_string(),
        readonly,
        ..Default::default()
    }
}

/// The container's Linux security context (created when absent).
pub fn security(config: &mut ContainerConfig) -> &mut LinuxContainerSecurityContext {
    config
        .linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
}

/// The container's Linux resources (created when absent).
pub fn resources(config: &mut ContainerConfig) -> &mut LinuxContainerResources {
    config
        .linux
        .get_or_insert_with(Default::default)
        .resources
        .get_or_insert_with(Default::default)
}

/// A filter on one label.
pub fn label_selector(key: &str, value: &str) -> std::collections::HashMap<String, String> {
    [(key.to_string(), value.to_string())].into()
}
