//! The VM side of a sandbox: boot (and what a failed boot reports), the
//! watch on the VMM, the persisted record, and releasing what a VM held.
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::phase::{begin_boot, end_boot, BootStep, Held, Live, Reason};
use super::*;
use crate::host::Host;
use crate::vmm::qemu::log_tail;
use crate::vmm::{PlanNic, StartVmError, VmPlan, Vmm};
use std::path::Path;

/// How long removing an exited VMM's cgroup is retried before it is given
/// up (logged).
const CGROUP_REMOVE_LIMIT: Duration = Duration::from_secs(30);

/// How much of the guest console a boot error quotes (the directory holding
/// the whole log is removed with the failed sandbox).
const CONSOLE_TAIL: usize = 600;
/// How long a broken agent channel waits to learn whether the VMM exited.
const VMM_EXIT_WAIT: Duration = Duration::from_secs(1);

impl Sandbox {
    /// Boots the sandbox's VM unless it runs (or waits for the boot under
    /// way); returns its agent.
    pub(super) async fn ensure_vm(self: &Arc<Self>) -> Result<Agent> {
        let requested = Instant::now();
        let step = self
            .settled(|p| match begin_boot(p) {
                BootStep::Wait => None,
                step => Some(step),
            })
            .await;
        match step {
            BootStep::Ready(live) => return Ok(live.agent.clone()),
            BootStep::Ended => {
                return Err(Error::FailedPrecondition(format!(
                    "the VM of sandbox {} has stopped",
                    self.info.id
                )))
            }
            BootStep::Boot | BootStep::Wait => {}
        }
        let booted = self.boot_vm().await;
        let live = booted.as_ref().ok().cloned();
        self.phase.send_modify(|p| end_boot(p, live.clone()));
        let live = booted?;
        // After Running: a VM that died meanwhile is torn down at once.
        self.watch_vm(live.vmm.lock().await.exited());
        self.save_record();
        if let Some(m) = &self.host.metrics {
            m.observe_pod_start(requested.elapsed());
        }
        Ok(live.agent.clone())
    }

    /// The boot itself, in phases: size the VM, attach the pod's network,
    /// start the VMM and wait for its agent, set the guest up, start port
    /// forwarding. A failure undoes what was done (the one rollback below).
    async fn boot_vm(self: &Arc<Self>) -> Result<Arc<Live>> {
        let started = Instant::now();
        let pod = self.pod();
        // Sized (and refused when too big) before anything is made.
        let size = self.pod_vm_size(pod.as_ref())?;
        if let Some(live) = self.take_pooled(pod.as_ref(), size.as_ref(), started).await {
            return Ok(live);
        }
        // QemuVm::start checks that the binary, kernel and initramfs still
        // exist (they may vanish after start-up) and names the missing one.
        std::fs::create_dir_all(&self.dir).map_err(|source| StartVmError::Prepare {
            path: self.dir.clone(),
            source,
        })?;
        if let Some(size) = &size {
            tracing::info!(
                sandbox = %self.info.id,
                vcpus = size.vcpus,
                memory_mib = size.memory_mib,
                "VM sized from the pod"
            );
        }
        let mut plan = self.vm_plan(size);
        let mut held = Held::default();
        let prepared = match self.create_cgroup(pod.as_ref(), &mut plan, &mut held) {
            Ok(()) => self.attach_net(pod.as_ref(), &mut plan, &mut held).await,
            Err(e) => Err(e),
        };
        let shape = VmShape::of(&plan);
        let mut vm = self.host.hypervisor.prepare(plan);
        let booted = match prepared {
            Ok(()) => {
                self.boot_guest(vm.as_mut(), pod.as_ref(), &held, started)
                    .await
            }
            Err(e) => Err(e),
        };
        let agent = match booted {
            Ok(agent) => agent,
            Err(e) => {
                tracing::warn!(sandbox = %self.info.id, "VM start failed: {}", crate::error::chain(&e));
                let _ = vm.stop(Duration::ZERO).await;
                self.release(held).await;
                if let Err(e) = mount::remove_dir(&self.dir) {
                    tracing::warn!(dir = %self.dir.display(), "remove sandbox directory: {e}");
                }
                return Err(e);
            }
        };
        let pid = vm.pid().unwrap_or(0);
        tracing::info!(
            sandbox = %self.info.id,
            pid,
            boot_ms = started.elapsed().as_millis() as u64,
            "agent ready"
        );
        Ok(self
            .go_live(vm, agent, shape, held, pod.as_ref(), None)
            .await)
    }

    /// The booted VM as the running sandbox holds it, with the pod's port
    /// forwarding started (cold boots and pooled VMs alike).
    pub(super) async fn go_live(
        &self,
        vm: Box<dyn Vmm>,
        agent: Agent,
        shape: VmShape,
        mut held: Held,
        pod: Option<&PodConfig>,
        vm_name: Option<String>,
    ) -> Arc<Live> {
        if let Some(netns) = pod.and_then(|p| p.netns.as_deref()) {
            held.port_forward = self.start_port_forward(netns, &agent).await;
        }
        Arc::new(Live {
            agent_address: vm.agent_address(),
            pid: vm.pid().unwrap_or(0),
            vmm: tokio::sync::Mutex::new(vm),
            agent,
            shape,
            held: Mutex::new(held),
            vm_name,
        })
    }

    /// The VM's plan: the configured VM, `size` when the pod sets one; its
    /// NICs come with the pod's network.
    pub(super) fn vm_plan(&self, size: Option<crate::pod::VmSize>) -> VmPlan {
        let vm = &self.host.config.vm;
        let (vcpus, memory_mib) = match size {
            Some(size) => (size.vcpus, size.memory_mib),
            None => (vm.vcpus, vm.memory_mib),
        };
        VmPlan {
            id: self.info.id.clone(),
            vcpus,
            memory_mib,
            dir: self.dir.clone(),
            nics: Vec::new(),
            cgroup_procs: Vec::new(),
            background: false,
        }
    }

    /// The VMM's cgroup for `pod` (its path; nothing is created), when the
    /// pod names a cgroup parent.
    pub(super) fn vmm_cgroup(&self, pod: Option<&PodConfig>) -> Result<Option<PathBuf>> {
        let parent = pod.map_or("", |p| p.cgroup_parent.as_str());
        crate::cgroup::vmm_cgroup(parent, &self.info.id)
            .map_err(|e| Error::InvalidArgument(e.to_string()))
    }

    /// Creates the VMM's cgroup below the pod's cgroup parent, limited to
    /// the VM's size plus the VMM's overhead, for QEMU to start in.
    pub(super) fn create_cgroup(
        &self,
        pod: Option<&PodConfig>,
        plan: &mut VmPlan,
        held: &mut Held,
    ) -> Result<()> {
        let Some(rel) = self.vmm_cgroup(pod)? else {
            return Ok(());
        };
        let layout = &self.host.cgroups;
        let limits = crate::cgroup::Limits::for_vm(
            plan.memory_mib,
            plan.vcpus,
            self.host.config.vm.vmm_overhead_mib,
        );
        let cg = crate::cgroup::VmmCgroup::create(layout, &rel, limits).map_err(|e| {
            let _ = crate::cgroup::VmmCgroup::at(layout, &rel).remove();
            Error::FailedPrecondition(format!(
                "cgroup of the VMM of sandbox {} below the pod's cgroup parent {:?}: {e}",
                self.info.id,
                pod.map_or("", |p| p.cgroup_parent.as_str())
            ))
        })?;
        tracing::info!(sandbox = %self.info.id, cgroup = %rel.display(), memory_bytes = limits.memory_bytes, cpu_quota_us = limits.cpu_quota_us, "VMM cgroup created");
        plan.cgroup_procs = cg.procs_files();
        held.cgroup = Some(cg);
        Ok(())
    }

    /// Moves the pod's interfaces (pods with a netns) to taps that the VM
    /// gets (`plan`'s NICs); the attachment goes into `held`.
    async fn attach_net(
        &self,
        pod: Option<&PodConfig>,
        plan: &mut VmPlan,
        held: &mut Held,
    ) -> Result<()> {
        let Some(netns) = pod.and_then(|p| p.netns.as_deref()) else {
            return Ok(());
        };
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
        held.net = Some(net);
        for (tap, mac) in taps.map_err(|e| Error::io("duplicate a tap fd for the VMM", e))? {
            plan.nics.push(PlanNic { tap, mac });
        }
        Ok(())
    }

    /// Starts the VMM, waits for its agent, and sets the guest up.
    async fn boot_guest(
        &self,
        vm: &mut dyn Vmm,
        pod: Option<&PodConfig>,
        held: &Held,
        started: Instant,
    ) -> Result<Agent> {
        let timeout = Duration::from_secs(self.host.config.vm.boot_timeout_secs);
        let agent = boot_agent(
            &self.host,
            vm,
            &self.dir,
            &self.info.id,
            started + timeout,
            timeout,
        )
        .await?;
        self.setup_guest(&agent, pod, held.net.as_ref(), None)
            .await?;
        Ok(agent)
    }

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
                &config.vm,
                &config.sizing,
                self.host.capacity,
            )?)),
            None => Ok(None),
        }
    }

    /// Gives the freshly booted guest what the pod needs before its first
    /// container: host name, network, DNS. `nic_mac`: the MAC a pooled VM's
    /// NIC was booted with, which the guest replaces by the pod's.
    pub(super) async fn setup_guest(
        &self,
        agent: &Agent,
        pod: Option<&PodConfig>,
        net: Option<&crate::net::NetAttachment>,
        nic_mac: Option<&str>,
    ) -> Result<()> {
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
        if let Some(net) = net {
            req.interfaces = net
                .interfaces()
                .map(|i| kuasar_api::agent::Interface {
                    name: i.name.clone(),
                    mac: i.mac_string(),
                    addresses: i.cidrs(),
                    mtu: i.mtu,
                    nic_mac: nic_mac.unwrap_or_default().to_owned(),
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

    /// Releases what a VM held on the host: port forwarding, then the pod's
    /// network (this run's attachment, or an adopted one's links).
    /// Failures are logged (the namespace goes with the pod).
    pub(super) async fn release(&self, held: Held) {
        if let Some(cg) = held.cgroup.clone() {
            // Retried in the background (see VmmCgroup::remove_within).
            let id = self.info.id.clone();
            tokio::spawn(async move {
                if let Err(e) = cg.remove_within(CGROUP_REMOVE_LIMIT).await {
                    tracing::warn!(sandbox = %id, "remove the VMM's cgroup: {e}");
                }
            });
        }
        if let Some(pf) = held.port_forward {
            match pf.stop().await {
                Ok(()) => tracing::debug!(sandbox = %self.info.id, "port forwarding stopped"),
                Err(e) => tracing::warn!(sandbox = %self.info.id, "{}", crate::error::chain(&e)),
            }
        }
        if let Some(adopted) = held.adopted_net {
            let netns = std::path::PathBuf::from(&adopted.netns);
            if let Err(e) = crate::net::release(&netns, adopted.links).await {
                tracing::warn!(sandbox = %self.info.id, "{}", crate::error::chain(&e));
            }
        }
        let Some(net) = held.net else { return };
        let netns = net.netns.clone();
        match crate::net::detach(net).await {
            Ok(()) => {
                tracing::debug!(sandbox = %self.info.id, netns = %netns.display(), "pod network detached")
            }
            Err(e) => tracing::warn!(sandbox = %self.info.id, "{}", crate::error::chain(&e)),
        }
    }

    /// Persists what the sandbox holds now; a failure is logged (the live
    /// sandbox goes on).
    pub(super) fn save_record(&self) {
        if let Err(e) = self.record().save(&self.dir) {
            tracing::warn!(sandbox = %self.info.id, "{}", crate::error::chain(&e));
        }
    }

    /// Follows the VMM: when it exits without being asked to, the sandbox
    /// is torn down at once (its processes reported killed, what the VM
    /// held on the host released).
    pub(super) fn watch_vm(
        self: &Arc<Self>,
        mut exited: tokio::sync::watch::Receiver<Option<crate::vmm::VmExit>>,
    ) {
        let sandbox = Arc::downgrade(self);
        tokio::spawn(async move {
            let _ = exited.wait_for(|e| e.is_some()).await;
            let exit = *exited.borrow();
            if let Some(sandbox) = sandbox.upgrade() {
                sandbox.teardown(Reason::VmDied(exit)).await;
            }
        });
    }
}

/// Starts `vm` (in directory `dir`, named `name` in the logs) and waits
/// for its agent, or for the VMM to exit first; a failed boot's error
/// quotes the end of the guest's console and of the VMM's log. Cold boots
/// and the pool's both come here.
pub(crate) async fn boot_agent(
    host: &Host,
    vm: &mut dyn Vmm,
    dir: &Path,
    name: &str,
    deadline: Instant,
    timeout: Duration,
) -> Result<Agent, StartVmError> {
    let spawned = Instant::now();
    vm.start().await?;
    let mut exited = vm.exited();
    let address = vm.agent_address();
    let connect = Agent::connect(&address, deadline, host.metrics.clone());
    // Either the agent answers (or fails), or the VMM exits first.
    let answered = tokio::select! {
        res = connect => Some(res),
        _ = exited.wait_for(|e| e.is_some()) => None,
    };
    let died = |vm: &dyn Vmm, exit| StartVmError::DiedDuringBoot {
        exit,
        console: log_tail(vm.console_log(), CONSOLE_TAIL),
        log: log_tail(&dir.join("qemu.log"), CONSOLE_TAIL),
    };
    match answered {
        Some(Ok((agent, pong))) => {
            tracing::debug!(vm = %name, kernel = %pong.kernel_release, agent = %pong.agent_version, "agent answered");
            if let Some(m) = &host.metrics {
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
                Some(exit) => Err(died(vm, exit)),
                None => Err(StartVmError::Agent(e)),
            }
        }
        None => {
            let exit = (*exited.borrow()).unwrap_or(crate::vmm::VmExit::Code(-1));
            Err(died(vm, exit))
        }
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
