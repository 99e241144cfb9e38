//! How the host and the guest agent find each other: the channel and the
//! shared directory's transport the host names on the guest's kernel
//! command line, and the virtio-serial port's name. The host's hypervisor
//! module writes these, the agent reads them.

/// The kernel command-line parameter naming the channel
/// (`kuasar.channel=vsock:<port>` or `kuasar.channel=serial`).
pub const CHANNEL_PARAM: &str = "kuasar.channel";

/// The name of the agent's virtio-serial port (the serial channel).
pub const AGENT_PORT_NAME: &str = "kuasar.agent";

/// The vsock port the agent listens on when the channel is vsock.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The kernel command-line parameter naming the shared directory's
/// transport (`kuasar.share=virtiofs` or `kuasar.share=9p`).
pub const SHARE_PARAM: &str = "kuasar.share";

/// The mount tag (virtio-fs) or channel name (virtio-9p) of the shared
/// directory.
pub const SHARE_TAG: &str = "kuasar";

/// The value of the last `name=` parameter of a kernel command line.
fn last_param<'a>(cmdline: &'a str, name: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .filter_map(|p| p.strip_prefix(name)?.strip_prefix('='))
        .next_back()
}

/// How the host's shared directory reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Share {
    /// virtio-9p served by QEMU itself (the default when unnamed).
    NineP,
    /// virtio-fs served by a virtiofsd of the VM's own.
    VirtioFs,
}

impl Share {
    /// The transport a kernel command line names: the last [`SHARE_PARAM`];
    /// 9p when absent or not understood.
    pub fn from_cmdline(cmdline: &str) -> Share {
        match last_param(cmdline, SHARE_PARAM) {
            Some("virtiofs") => Share::VirtioFs,
            _ => Share::NineP,
        }
    }

    /// The kernel command-line parameter that names this transport.
    pub fn cmdline_param(self) -> String {
        match self {
            Share::NineP => format!("{SHARE_PARAM}=9p"),
            Share::VirtioFs => format!("{SHARE_PARAM}=virtiofs"),
        }
    }
}

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
        match last_param(cmdline, CHANNEL_PARAM)
            .and_then(|v| v.strip_prefix("vsock:"))
            .map(str::parse)
        {
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
    fn share_from_cmdline() {
        assert_eq!(Share::from_cmdline("console=ttyS0 quiet"), Share::NineP);
        assert_eq!(
            Share::from_cmdline("quiet kuasar.share=virtiofs kuasar.shared=9p"),
            Share::VirtioFs
        );
        assert_eq!(
            Share::from_cmdline("kuasar.share=virtiofs kuasar.share=9p"),
            Share::NineP
        );
        assert_eq!(Share::from_cmdline("kuasar.share=nfs"), Share::NineP);
        for s in [Share::NineP, Share::VirtioFs] {
            let cmdline = format!("console=hvc0 {} quiet", s.cmdline_param());
            assert_eq!(Share::from_cmdline(&cmdline), s);
        }
    }

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
