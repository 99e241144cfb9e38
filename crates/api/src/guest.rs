//! How the host and the guest agent find each other: the channel the host
//! names on the guest's kernel command line, and the virtio-serial port's
//! name. The host's hypervisor module writes these, the agent reads them.

/// The kernel command-line parameter naming the channel
/// (`kuasar.channel=vsock:<port>` or `kuasar.channel=serial`).
pub const CHANNEL_PARAM: &str = "kuasar.channel";

/// The name of the agent's virtio-serial port (the serial channel).
pub const AGENT_PORT_NAME: &str = "kuasar.agent";

/// The vsock port the agent listens on when the channel is vsock.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// How the host reaches the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// The [`AGENT_PORT_NAME`] virtio-serial port (the default).
    Serial,
    /// virtio-vsock: the agent listens on this vsock port.
    Vsock(u32),
}

impl Channel {
    /// The channel a kernel command line names: the last
    /// [`CHANNEL_PARAM`]; serial when absent or not understood.
    pub fn from_cmdline(cmdline: &str) -> Channel {
        let prefix = format!("{CHANNEL_PARAM}=");
        let value = cmdline
            .split_whitespace()
            .filter_map(|p| p.strip_prefix(prefix.as_str()))
            .next_back();
        match value.and_then(|v| v.strip_prefix("vsock:")).map(str::parse) {
            Some(Ok(port)) => Channel::Vsock(port),
            _ => Channel::Serial,
        }
    }

    /// The kernel command-line parameter that names this channel.
    pub fn cmdline_param(self) -> String {
        match self {
            Channel::Serial => format!("{CHANNEL_PARAM}=serial"),
            Channel::Vsock(port) => format!("{CHANNEL_PARAM}=vsock:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_from_cmdline() {
        let serial = Channel::Serial;
        assert_eq!(Channel::from_cmdline("console=ttyS0 quiet"), serial);
        assert_eq!(
            Channel::from_cmdline("console=ttyS0 kuasar.channel=vsock:1024 quiet\n"),
            Channel::Vsock(1024)
        );
        assert_eq!(Channel::from_cmdline("kuasar.channel=serial"), serial);
        assert_eq!(Channel::from_cmdline("kuasar.channel=vsock:x"), serial);
        assert_eq!(
            Channel::from_cmdline("kuasar.channel=vsock:1 kuasar.channel=serial"),
            serial
        );
    }

    #[test]
    fn what_the_host_writes_the_agent_reads() {
        for c in [Channel::Serial, Channel::Vsock(AGENT_VSOCK_PORT)] {
            let cmdline = format!("console=hvc0 {} quiet", c.cmdline_param());
            assert_eq!(Channel::from_cmdline(&cmdline), c);
        }
    }
}
