//! The VM side of a sandbox: boot (and what a failed boot reports), the
//! watch on the VMM, the persisted record, and stopping.
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::*;
use crate::vmm::qemu::{log_tail, QemuVm, VmSpec};
use crate::vmm::StartVmError;

/// How much of the guest console a boot error quotes (the directory holding
/// the whole log is removed with the failed sandbox).
const CONSOLE_TAIL: usize = 600;
/// How long a broken agent channel waits to learn whether the VMM exited.
const VMM_EXIT_WAIT: Duration = Duration::from_secs(1);
/// How long the VM gets to quit before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(2);

impl Sandbox {
    /// Boots the sandbox's VM unless it runs; returns its agent.
    pub(super) async fn ensure_vm(self: &Arc<Self>) -> Result<Agent> {
        let requested = Instant::now();
        let mut vm = self.vm.lock().await;
        if let Some(v) = vm.as_ref() {
            if let Some(exit) = *v.exited().borrow() {
                return Err(Error::FailedPrecondition(format!(
                    "the VM of sandbox {} has exited ({exit:?})",
                    self.info.id
                )));
            }
            return self.agent();
        }
        let started = Instant::now();
        let config = &self.host.config;
        let pod = self.pod();
        // Sized (and refused when too big) before anything is made.
        let size = self.pod_vm_size(pod.as_ref())?;
        // QemuVm::start checks that the binary, kernel and initramfs still
        // exist (they may vanish after start-up) and names the missing one.
        std::fs::create_dir_all(&self.dir).map_err(|source| StartVmError::Prepare {
            path: self.dir.clone(),
            source,
        })?;
        let mut spec = VmSpec::from_config(
            self.info.id.clone(),
            self.host.accel,
            self.host.agent_channel(),
            self.host.tsc_khz,
            &config.qemu,
            config.kernel_path(),
            config.initrd_path(),
            self.dir.clone(),
        );
        if let Some(size) = size {
            tracing::info!(
                sandbox = %self.info.id,
                vcpus = size.vcpus,
                memory_mib = size.memory_mib,
                "VM sized from the pod"
            );
            spec.vcpus = size.vcpus;
            spec.memory_mib = size.memory_mib;
        }
        let shape = VmShape {
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            console_log: spec.console_log(),
        };
        let mut qemu = QemuVm::new(config.qemu.binary.clone(), spec);
        // The pod's interface goes to the VM before QEMU starts: QEMU gets
        // the taps' fds on its command line.
        if let Some(netns) = pod.as_ref().and_then(|p| p.netns.as_deref()) {
            let net = crate::net::attach(netns).await?;
            tracing::info!(
                sandbox = %self.info.id,
                netns = %netns.display(),
                interfaces = ?net.interfaces().map(|i| (&i.name, i.cidrs())).collect::<Vec<_>>(),
                "pod network attached"
            );
            let taps: std::io::Result<Vec<_>> = net
                .nics
                .iter()
                .map(|nic| Ok((nic.tap.try_clone()?, nic.interface.mac_string())))
                .collect();
            match taps {
                Ok(taps) => {
                    for (fd, mac) in taps {
                        qemu.add_nic(fd, mac);
                    }
                }
                Err(e) => {
                    self.detach_net(Some(net)).await;
                    return Err(Error::io("duplicate a tap fd for the VMM", e));
                }
            }
            *self.net.lock().unwrap_or_else(|p| p.into_inner()) = Some(net);
        }
        let mut qemu: Box<dyn Vmm> = Box::new(qemu);
        let timeout = Duration::from_secs(config.qemu.boot_timeout_secs);
        let booted = match self.boot(qemu.as_mut(), started + timeout, timeout).await {
            Ok(agent) => self.setup_guest(&agent, pod.as_ref()).await.map(|()| agent),
            Err(e) => Err(Error::from(e)),
        };
        match booted {
            Ok(agent) => {
                tracing::info!(
                    sandbox = %self.info.id,
                    pid = qemu.pid().unwrap_or(0),
                    boot_ms = started.elapsed().as_millis() as u64,
                    "agent ready"
                );
                *self.agent.write().unwrap_or_else(|p| p.into_inner()) = Some(agent.clone());
                *self.agent_address.lock().unwrap_or_else(|p| p.into_inner()) =
                    qemu.agent_address();
                self.vmm_pid.store(
                    qemu.pid().unwrap_or(0),
                    std::sync::atomic::Ordering::Relaxed,
                );
                // Before the watch: a VM that dies meanwhile stops it again.
                if let Some(netns) = pod.as_ref().and_then(|p| p.netns.as_deref()) {
                    self.start_port_forward(netns, &agent).await;
                }
                self.set_vm_shape(shape);
                self.watch_vm(qemu.exited());
                *vm = Some(qemu);
                self.save_record();
                if let Some(m) = &self.host.metrics {
                    m.observe_pod_start(requested.elapsed());
                }
                Ok(agent)
            }
            Err(e) => {
                tracing::warn!(sandbox = %self.info.id, "VM start failed: {}", crate::error::chain(&e));
                let _ = qemu.stop(Duration::ZERO).await;
                self.detach_net(None).await;
                if let Err(e) = mount::remove_dir(&self.dir) {
                    tracing::warn!(dir = %self.dir.display(), "remove sandbox directory: {e}");
                }
                Err(e)
            }
        }
    }

    /// Gives the freshly booted guest what the pod needs before its first
    /// container: host name, network, DNS.
    /// The VM's size for `pod` (None: the configured default), refused
    /// when too big for the host.
    pub(super) fn pod_vm_size(
        &self,
        pod: Option<&PodConfig>,
    ) -> Result<Option<crate::pod::VmSize>> {
        let config = &self.host.config;
        match pod {
            Some(pod) => Ok(Some(crate::pod::vm_size(
                &pod.resources,
                &config.qemu,
                &config.sizing,
                self.host.capacity,
            )?)),
            None => Ok(None),
        }
    }

    async fn setup_guest(&self, agent: &Agent, pod: Option<&PodConfig>) -> Result<()> {
        let Some(pod) = pod else { return Ok(()) };
        let resolv_conf = match pod.dns.as_ref().and_then(|d| d.resolv_conf()) {
            Some(r) => r.into_bytes(),
            None => node_file(NODE_RESOLV_CONF),
        };
        let mut req = kuasar_api::agent::SetupSandboxRequest {
            hostname: pod.hostname.clone(),
            resolv_conf,
            hosts: node_file(NODE_HOSTS),
            sysctls: pod
                .sysctls
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            ..Default::default()
        };
        if let Some(net) = self.net.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            req.interfaces = net
                .interfaces()
                .map(|i| kuasar_api::agent::Interface {
                    name: i.name.clone(),
                    mac: i.mac_string(),
                    addresses: i.cidrs(),
                    mtu: i.mtu,
                    ..Default::default()
                })
                .collect();
            req.routes = net
                .routes
                .iter()
                .map(|r| kuasar_api::agent::Route {
                    destination: r.destination_cidr(),
                    gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
                    device: r.device.clone(),
                    source: r.source.map(|s| s.to_string()).unwrap_or_default(),
                    ..Default::default()
                })
                .collect();
        }
        agent.setup_sandbox(req).await.map_err(Error::from)
    }

    /// Takes the pod's network back from the VM: `net`, or the one the
    /// sandbox holds. Failures are logged (the namespace goes with the pod).
    pub(super) async fn detach_net(&self, net: Option<crate::net::NetAttachment>) {
        self.stop_port_forward().await;
        let net = net.or_else(|| self.net.lock().unwrap_or_else(|p| p.into_inner()).take());
        let adopted = self
            .adopted_net
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(adopted) = adopted {
            let netns = std::path::PathBuf::from(&adopted.netns);
            if let Err(e) = crate::net::release(&netns, adopted.links).await {
                tracing::warn!(sandbox = %self.info.id, "{}", crate::error::chain(&e));
            }
        }
        let Some(net) = net else { return };
        let netns = net.netns.clone();
        match crate::net::detach(net).await {
            Ok(()) => {
                tracing::debug!(sandbox = %self.info.id, netns = %netns.display(), "pod network detached")
            }
            Err(e) => tracing::warn!(sandbox = %self.info.id, "{}", crate::error::chain(&e)),
        }
    }

    async fn boot(
        &self,
        vm: &mut dyn Vmm,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Agent, StartVmError> {
        let spawned = Instant::now();
        vm.start().await?;
        let mut exited = vm.exited();
        let address = vm.agent_address();
        let connect = Agent::connect(&address, deadline, self.host.metrics.clone());
        // Either the agent answers (or fails), or the VMM exits first.
        let answered = tokio::select! {
            res = connect => Some(res),
            _ = exited.wait_for(|e| e.is_some()) => None,
        };
        match answered {
            Some(Ok((agent, pong))) => {
                tracing::debug!(sandbox = %self.info.id, kernel = %pong.kernel_release, agent = %pong.agent_version, "agent answered");
                if let Some(m) = &self.host.metrics {
                    m.observe_vm_boot(spawned.elapsed());
                }
                Ok(agent)
            }
            Some(Err(crate::agent::AgentError::Timeout { .. })) => Err(StartVmError::BootTimeout {
                after: timeout,
                console: log_tail(vm.console_log(), CONSOLE_TAIL),
            }),
            Some(Err(e)) => {
                // A channel that broke is most often a VMM that exited: say
                // so when it did.
                let _ = tokio::time::timeout(VMM_EXIT_WAIT, exited.wait_for(|e| e.is_some())).await;
                let exit = *exited.borrow();
                match exit {
                    Some(exit) => Err(self.died_during_boot(vm, exit)),
                    None => Err(StartVmError::Agent(e)),
                }
            }
            None => {
                let exit = (*exited.borrow()).unwrap_or(crate::vmm::VmExit::Code(-1));
                Err(self.died_during_boot(vm, exit))
            }
        }
    }

    fn died_during_boot(&self, vm: &dyn Vmm, exit: crate::vmm::VmExit) -> StartVmError {
        StartVmError::DiedDuringBoot {
            exit,
            console: log_tail(vm.console_log(), CONSOLE_TAIL),
            log: log_tail(&self.dir.join("qemu.log"), CONSOLE_TAIL),
        }
    }

    /// Persists what the sandbox holds now; a failure is logged (the live
    /// sandbox goes on).
    pub(super) fn save_record(&self) {
        if let Err(e) = self.record().save(&self.dir) {
            tracing::warn!(sandbox = %self.info.id, "{}", crate::error::chain(&e));
        }
    }

    /// Stops the VM and frees everything the sandbox holds. Processes still
    /// running are reported as killed.
    /// Follows the VMM: when it exits without being asked to, the
    /// sandbox's processes are reported killed and what the VM held on the
    /// host is released at once.
    pub(super) fn watch_vm(
        self: &Arc<Self>,
        mut exited: tokio::sync::watch::Receiver<Option<crate::vmm::VmExit>>,
    ) {
        let sandbox = Arc::downgrade(self);
        tokio::spawn(async move {
            let _ = exited.wait_for(|e| e.is_some()).await;
            let exit = *exited.borrow();
            if let Some(sandbox) = sandbox.upgrade() {
                sandbox.vm_died(exit).await;
            }
        });
    }

    async fn vm_died(&self, exit: Option<crate::vmm::VmExit>) {
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        tracing::error!(sandbox = %self.info.id, ?exit, "the VM exited unexpectedly");
        self.mark_exited(255);
        *self.agent.write().unwrap_or_else(|p| p.into_inner()) = None;
        self.report_all_killed().await;
        self.detach_net(None).await;
        // Keep state.json and the logs until containerd deletes the sandbox;
        // the mounts, the shared directory and the sockets go now.
        for path in [
            self.dir.join("shared"),
            self.dir.join("agent.sock"),
            self.dir.join("qmp.sock"),
        ] {
            let res = if path.is_dir() {
                mount::remove_dir(&path)
            } else {
                std::fs::remove_file(&path)
            };
            if let Err(e) = res {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), "release: {e}");
                }
            }
        }
    }

    /// Stops every process's output copies and reports the processes not
    /// yet exited as killed (137): the VM they ran in is gone.
    pub(super) async fn report_all_killed(&self) {
        let containers: Vec<_> = self.containers().values().cloned().collect();
        for c in &containers {
            for p in c.all_processes() {
                p.pumps.lock().await.abort();
                if matches!(p.state(), ProcState::Running | ProcState::Created) {
                    self.report_exit(&p, 137, SystemTime::now()).await;
                }
            }
        }
    }

    pub async fn shutdown(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let mut vm = self.vm.lock().await;
        let containers: Vec<_> = self.containers().drain().map(|(_, c)| c).collect();
        for c in &containers {
            for p in c.all_processes() {
                p.pumps.lock().await.abort();
                if p.state() == ProcState::Running {
                    self.report_exit(&p, 137, SystemTime::now()).await;
                }
            }
        }
        *self.agent.write().unwrap_or_else(|p| p.into_inner()) = None;
        self.mark_exited(0);
        if let Some(mut v) = vm.take() {
            if let Err(e) = v.stop(STOP_GRACE).await {
                tracing::error!(sandbox = %self.info.id, "{e}");
            }
        }
        self.detach_net(None).await;
        if let Err(e) = mount::remove_dir(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), "remove sandbox directory: {e}");
        }
        tracing::info!(sandbox = %self.info.id, "sandbox stopped");
    }
}

/// The node's files a pod gets copies of when it brings none (containerd
/// does the same for a runc pod).
const NODE_RESOLV_CONF: &str = "/etc/resolv.conf";
const NODE_HOSTS: &str = "/etc/hosts";
/// Most of such a file that is copied.
const MAX_NODE_FILE: u64 = 64 << 10;

/// Reads a node file for the pod; a missing or unreadable one is empty.
fn node_file(path: &str) -> Vec<u8> {
    use std::io::Read;
    let mut data = Vec::new();
    match std::fs::File::open(path) {
        Ok(f) => {
            if let Err(e) = f.take(MAX_NODE_FILE).read_to_end(&mut data) {
                tracing::warn!(path, "read the node's file for a pod: {e}");
                data.clear();
            }
        }
        Err(e) => tracing::debug!(path, "no node file for the pod: {e}"),
    }
    data
}
