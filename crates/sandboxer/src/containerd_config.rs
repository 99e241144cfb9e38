//! The containerd configuration (config version 3, containerd 2.x) that
//! plugs this sandboxer in: `kuasar-vmm --print-containerd-config`.
use crate::config::Config;

/// The name of the sandbox controller proxy plugin in containerd's config.
pub const PROXY_PLUGIN: &str = "kuasar-vmm";

/// The runtime handlers of the three modes, and the proxy plugin the
/// zero-shim one names, for a sandboxer with `config`.
pub fn render(config: &Config) -> String {
    format!(
        r#"# containerd 2.x (config version 3) for kuasar-vmm; merge into /etc/containerd/config.toml.
# The shim modes find containerd-shim-kuasar-vmm-v2 on containerd's PATH; the shim reaches
# kuasar-vmm at ${env} (default {default}; this sandboxer: {socket}).

# zero-shim mode: kuasar-vmm is containerd's sandbox controller; no shim process at all.
# Its task events go to containerd's [ttrpc] address, which must be {ttrpc}
# (kuasar-vmm's containerd_ttrpc_address).
[proxy_plugins.{plugin}]
  type = "sandbox"
  address = "{grpc}"

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.kuasar-vmm-zero]
  runtime_type = "io.containerd.kuasar-vmm.v2"
  sandboxer = "{plugin}"

# The same with process stdio over containerd's streaming API instead of fifos: containerd
# dials the sandbox's task socket (containerd.services.streaming.v1.Streaming).
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.kuasar-vmm-zero-streaming]
  runtime_type = "io.containerd.kuasar-vmm.v2"
  sandboxer = "{plugin}"
  io_type = "streaming"

# shim mode: one shim per pod serves containerd's sandbox API; no pause container.
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.kuasar-vmm-shim]
  runtime_type = "io.containerd.kuasar-vmm.v2"
  sandboxer = "shim"

# podsandbox mode (containerd's default): one shim per pod; the pause container boots the VM.
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.kuasar-vmm]
  runtime_type = "io.containerd.kuasar-vmm.v2"
  sandboxer = "podsandbox"
"#,
        env = kuasar_api::VMM_SOCKET_ENV,
        default = kuasar_api::DEFAULT_VMM_SOCKET,
        socket = config.socket.display(),
        plugin = PROXY_PLUGIN,
        grpc = config.grpc_socket.display(),
        ttrpc = config.containerd_ttrpc_address,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_grpc_socket_and_every_mode() {
        let text = render(&Config::default());
        assert!(
            text.contains("address = \"/run/kuasar/vmm-grpc.sock\""),
            "{text}"
        );
        for mode in [
            "sandboxer = \"kuasar-vmm\"",
            "sandboxer = \"shim\"",
            "sandboxer = \"podsandbox\"",
        ] {
            assert!(text.contains(mode), "{mode}");
        }
        // It is TOML.
        let value: toml::Value = toml::from_str(&text).unwrap();
        let runtimes = &value["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"];
        assert_eq!(
            runtimes["kuasar-vmm-zero-streaming"]["io_type"].as_str(),
            Some("streaming")
        );
        assert_eq!(
            value["proxy_plugins"]["kuasar-vmm"]["type"].as_str(),
            Some("sandbox")
        );
    }
}
