//! NetworkPolicy enforcement on this node (Kubernetes mode; docs/network-policy.md). One
//! owner task holds the policy state: the API's objects from the watches (as
//! `policy::state::Event`s) and this node's pod addresses from the endpoint feed. After each
//! burst of changes it compiles the node's program and hands the whole of it to the kernel
//! ([`PolicyKernel`]), retrying with backoff until the kernel takes it. Nothing is programmed
//! until every kind has been listed once: a partial view would drop policies not read yet.
//! What the kernel holds is published ([`Programmed`]) so that CNI ADD can wait until a new
//! pod is accounted for ([`PolicyHandle::wait_programmed`]) and the status can show it. The
//! table stays when the agent stops, so enforcement survives a restart.

pub mod kernel;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::kernel::PolicyKernel;
use crate::endpoints::record::{EndpointFeed, EndpointSummary, Kind as EndpointKind};
use crate::policy::compile::Program;
use crate::policy::model::PodKey;
use crate::policy::state::{self, Event, Kind, LocalPod, State};
use crate::subsystem::{Hub, Tasks};

/// How long the owner lets a burst of changes gather before it recompiles.
pub const DEBOUNCE: Duration = Duration::from_millis(50);
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct NetpolConfig {
    /// This Node's name: the pods whose traffic this agent filters.
    pub node: String,
    /// How often the kernel is asked whether it still holds what was installed
    /// ([`CHECK_EVERY`] in the agent).
    pub check_every: Duration,
}

/// The agent's interval between checks that the table is still in the kernel as written
/// (a flushed ruleset, or br_netfilter's hand-over turned off, must not stay unnoticed).
pub const CHECK_EVERY: Duration = Duration::from_secs(30);

/// What the kernel enforces, as last published by the owner.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Programmed {
    /// Kinds not listed from the API yet; nothing is programmed until every one has been.
    pub unlisted: Vec<Kind>,
    /// This node's pods the program in the kernel accounts for, with their isolation.
    pub pods: BTreeMap<PodKey, LocalPod>,
    /// Programs the kernel has taken since the agent started.
    pub installs: u64,
    /// The kernel's last refusal; cleared when it takes a program.
    pub error: Option<String>,
    /// How long the last program installed took to compile, and to write.
    pub compile: Duration,
    pub write: Duration,
}

/// The status report's `policy` part (docs/status.md), rendered by `weft status policy`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PolicyReport {
    /// Kinds not listed from the API yet (`namespaces`, `pods`, `networkpolicies`).
    pub unlisted: Vec<String>,
    /// Programs the kernel has taken since the agent started.
    pub installs: u64,
    /// The kernel's last refusal (empty when it took the last program).
    #[serde(default)]
    pub error: String,
    /// This node's pods in the installed program.
    pub pods: Vec<PolicyPodReport>,
    /// What each group of policies has dropped since the table was last written whole.
    #[serde(default)]
    pub denied: Vec<DeniedReport>,
    /// How long the last program installed took to compile, and to write into the kernel
    /// (milliseconds).
    #[serde(default)]
    pub compile_ms: u64,
    #[serde(default)]
    pub write_ms: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeniedReport {
    /// `ingress` or `egress`.
    pub direction: String,
    /// The policies isolating the pods whose packets were dropped (`namespace/name`).
    pub policies: Vec<String>,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PolicyPodReport {
    /// `namespace/name`.
    pub pod: String,
    pub addresses: Vec<IpAddr>,
    /// The policies isolating it for ingress (`namespace/name`); empty: not isolated.
    pub ingress: Vec<String>,
    pub egress: Vec<String>,
}

impl Programmed {
    pub fn report(&self) -> PolicyReport {
        let names = |keys: &[crate::policy::model::PolicyKey]| -> Vec<String> {
            keys.iter().map(ToString::to_string).collect()
        };
        PolicyReport {
            unlisted: self.unlisted.iter().map(|k| k.name().to_owned()).collect(),
            installs: self.installs,
            error: self.error.clone().unwrap_or_default(),
            pods: self
                .pods
                .values()
                .map(|p| PolicyPodReport {
                    pod: p.key.to_string(),
                    addresses: p.ips.clone(),
                    ingress: names(&p.ingress),
                    egress: names(&p.egress),
                })
                .collect(),
            denied: Vec::new(),
            compile_ms: u64::try_from(self.compile.as_millis()).unwrap_or(u64::MAX),
            write_ms: u64::try_from(self.write.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

/// A CNI ADD that cannot be let through yet.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error(
        "NetworkPolicy for pod {pod} ({ip}) is not in place after {}s: {reason}; check that the \
         weft ServiceAccount may list and watch pods, namespaces and networkpolicies (RBAC, \
         docs/network-policy.md) and the agent's logs",
        timeout.as_secs()
    )]
    Timeout { pod: PodKey, ip: IpAddr, timeout: Duration, reason: String },
    #[error("the weft agent is shutting down")]
    Stopped,
}

/// Read side of the subsystem (cheap to clone).
#[derive(Clone, Debug)]
pub struct PolicyHandle {
    programmed: watch::Receiver<Arc<Programmed>>,
    /// Read for the drop counters.
    kernel: Option<Arc<dyn PolicyKernel>>,
}

impl PolicyHandle {
    /// A handle over a published state the test sets by hand.
    #[cfg(test)]
    pub(crate) fn from_receiver(programmed: watch::Receiver<Arc<Programmed>>) -> PolicyHandle {
        PolicyHandle { programmed, kernel: None }
    }

    /// The status report's part: the published state and the kernel's drop counters.
    pub async fn report(&self) -> PolicyReport {
        let mut report = self.programmed().report();
        let Some(kernel) = self.kernel.clone() else { return report };
        match tokio::task::spawn_blocking(move || kernel.denied()).await {
            Ok(Ok(denied)) => {
                report.denied = denied
                    .into_iter()
                    .map(|d| DeniedReport {
                        direction: d.direction.name().to_owned(),
                        policies: d.policies.iter().map(ToString::to_string).collect(),
                        packets: d.packets,
                        bytes: d.bytes,
                    })
                    .collect();
            }
            Ok(Err(e)) => debug!(error = %e, "reading the NetworkPolicy drop counters"),
            Err(e) => debug!(error = %e, "reading the NetworkPolicy drop counters"),
        }
        report
    }

    pub fn programmed(&self) -> Arc<Programmed> {
        self.programmed.borrow().clone()
    }

    /// Returns once the kernel holds a program that accounts for `pod` at `ip` (the pod known
    /// from the API with its labels, the address from this node's endpoints).
    pub async fn wait_programmed(
        &self,
        pod: &PodKey,
        ip: IpAddr,
        timeout: Duration,
    ) -> Result<(), GateError> {
        let mut rx = self.programmed.clone();
        let done = |p: &Arc<Programmed>| p.pods.get(pod).is_some_and(|l| l.ips.contains(&ip));
        match tokio::time::timeout(timeout, rx.wait_for(done)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(GateError::Stopped),
            Err(_) => {
                let reason = why_not(&self.programmed(), pod);
                Err(GateError::Timeout { pod: pod.clone(), ip, timeout, reason })
            }
        }
    }
}

fn why_not(p: &Programmed, pod: &PodKey) -> String {
    if !p.unlisted.is_empty() {
        let kinds: Vec<&str> = p.unlisted.iter().map(|k| k.name()).collect();
        return format!("the agent has not listed {} from the API yet", kinds.join(", "));
    }
    if let Some(e) = &p.error {
        return format!("the kernel refused the program: {e}");
    }
    match p.pods.get(pod) {
        Some(l) => format!("the program has the pod at {:?}, not at this address", l.ips),
        None => "the agent has not seen this pod in the API yet".to_owned(),
    }
}

/// Starts the owner task.
pub fn start(
    cfg: NetpolConfig,
    hub: &Hub,
    tasks: &mut Tasks,
    events: mpsc::Receiver<Event>,
    kernel: Arc<dyn PolicyKernel>,
) -> PolicyHandle {
    let (handle, owner) =
        owner(cfg, hub.endpoints.feed(), events, kernel, tasks.shutdown().clone());
    tasks.spawn("netpol", owner);
    handle
}

fn owner(
    cfg: NetpolConfig,
    feed: EndpointFeed,
    events: mpsc::Receiver<Event>,
    kernel: Arc<dyn PolicyKernel>,
    shutdown: CancellationToken,
) -> (PolicyHandle, impl Future<Output = ()> + Send + 'static) {
    let state = State::default();
    let first = Programmed { unlisted: state.unlisted(), ..Programmed::default() };
    let (out, programmed) = watch::channel(Arc::new(first));
    let owner = Owner {
        node: cfg.node,
        state,
        feed,
        events,
        kernel,
        out,
        shutdown,
        installed: None,
        pods: BTreeMap::new(),
        installs: 0,
        error: None,
        retry: RETRY_FIRST,
        check_every: cfg.check_every,
        compile: Duration::ZERO,
        write: Duration::ZERO,
    };
    let handle = PolicyHandle { programmed, kernel: Some(owner.kernel.clone()) };
    (handle, owner.run())
}

/// This node's pods' addresses in the endpoint feed.
fn local_addresses(feed: &[EndpointSummary]) -> BTreeMap<PodKey, Vec<IpAddr>> {
    let mut out: BTreeMap<PodKey, Vec<IpAddr>> = BTreeMap::new();
    for e in feed.iter().filter(|e| e.kind == EndpointKind::Cni) {
        let Some(pod) = &e.pod else { continue };
        if pod.namespace.is_empty() || pod.name.is_empty() {
            continue;
        }
        out.entry(PodKey::new(&pod.namespace, &pod.name)).or_default().extend(&e.addrs);
    }
    out
}

struct Owner {
    node: String,
    state: State,
    feed: EndpointFeed,
    events: mpsc::Receiver<Event>,
    kernel: Arc<dyn PolicyKernel>,
    out: watch::Sender<Arc<Programmed>>,
    shutdown: CancellationToken,
    /// What the kernel holds (`None`: nothing from this run yet).
    installed: Option<Program>,
    pods: BTreeMap<PodKey, LocalPod>,
    installs: u64,
    error: Option<String>,
    retry: Duration,
    check_every: Duration,
    /// How long the last program installed took to compile and to write.
    compile: Duration,
    write: Duration,
}

/// Why the owner woke.
enum Wake {
    Stop,
    /// Something may have changed the program or what the kernel holds.
    Change,
    /// A check found the kernel as it was left.
    Quiet,
}

impl Owner {
    async fn run(mut self) {
        self.take_feed();
        let mut next_try: Option<Instant> = None;
        let mut next_check = Instant::now() + self.check_every;
        loop {
            match self.wait_change(next_try, &mut next_check).await {
                Wake::Stop => return,
                Wake::Quiet => continue,
                Wake::Change => {}
            }
            if !self.settle().await {
                return;
            }
            // After a refusal, changes gather until the backoff is over.
            if next_try.is_some_and(|t| Instant::now() < t) {
                continue;
            }
            next_try = match self.reconcile().await {
                Ok(()) => None,
                Err(wait) => Some(Instant::now() + wait),
            };
        }
    }

    fn take_feed(&mut self) -> bool {
        let local = local_addresses(&self.feed.borrow_and_update());
        self.state.set_local(local)
    }

    /// Waits for an event, an endpoint change, a retry that is due or the next check of the
    /// kernel.
    async fn wait_change(&mut self, next_try: Option<Instant>, next_check: &mut Instant) -> Wake {
        let retry_at = next_try.unwrap_or_else(Instant::now);
        let go_on = |more: bool| if more { Wake::Change } else { Wake::Stop };
        tokio::select! {
            _ = self.shutdown.cancelled() => Wake::Stop,
            ev = self.events.recv() => go_on(self.take_event(ev)),
            changed = self.feed.changed() => go_on(changed.is_ok() && { self.take_feed(); true }),
            _ = tokio::time::sleep_until(retry_at), if next_try.is_some() => Wake::Change,
            _ = tokio::time::sleep_until(*next_check) => {
                *next_check = Instant::now() + self.check_every;
                self.check_kernel().await
            }
        }
    }

    /// Whether the kernel still holds what was installed; if not, it is written again whole.
    async fn check_kernel(&mut self) -> Wake {
        if self.installed.is_none() {
            return Wake::Quiet;
        }
        let kernel = self.kernel.clone();
        match tokio::task::spawn_blocking(move || kernel.intact()).await {
            Ok(Ok(true)) => Wake::Quiet,
            Ok(Ok(false)) => {
                warn!(
                    "the NetworkPolicy table is not as weft wrote it (the ruleset flushed or \
                     changed by hand, or bridged traffic no longer handed to nftables); writing \
                     it again"
                );
                self.installed = None;
                Wake::Change
            }
            Ok(Err(e)) => {
                debug!(error = %e, "checking the NetworkPolicy table");
                Wake::Quiet
            }
            Err(e) => {
                debug!(error = %e, "checking the NetworkPolicy table");
                Wake::Quiet
            }
        }
    }

    /// Takes what else arrives within [`DEBOUNCE`]; false at shutdown.
    async fn settle(&mut self) -> bool {
        let deadline = Instant::now() + DEBOUNCE;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return false,
                ev = self.events.recv() => if !self.take_event(ev) { return false },
                changed = self.feed.changed() => {
                    if changed.is_err() { return false }
                    self.take_feed();
                }
                _ = tokio::time::sleep_until(deadline) => return true,
            }
        }
    }

    /// Applies an event; false when the watches have ended (the agent is stopping).
    fn take_event(&mut self, ev: Option<Event>) -> bool {
        match ev {
            Some(e) => {
                self.state.apply(e);
                true
            }
            None => false,
        }
    }

    /// Brings the kernel to the desired state; on refusal, how long to wait before the next
    /// attempt (which takes whatever is desired by then).
    async fn reconcile(&mut self) -> Result<(), Duration> {
        if !self.state.synced() {
            self.publish();
            return Ok(());
        }
        // Compiling is CPU work in proportion to policies x pods: off the async workers.
        let started = Instant::now();
        let cluster = self.state.cluster(&self.node);
        let node = self.node.clone();
        let compiled = tokio::task::spawn_blocking(move || {
            (Program::compile(&cluster, &node), state::local_pods(&cluster, &node))
        })
        .await;
        let compile = started.elapsed();
        let Ok((program, pods)) = compiled else {
            self.error = Some("compiling the NetworkPolicy program failed".to_owned());
            self.publish();
            return Err(self.retry);
        };
        if self.installed.as_ref() != Some(&program) {
            let kernel = self.kernel.clone();
            let started = Instant::now();
            let outcome = tokio::task::spawn_blocking(move || {
                let r = kernel.apply(&program);
                (program, r)
            })
            .await;
            let refused = match outcome {
                Ok((program, Ok(()))) => {
                    (self.compile, self.write) = (compile, started.elapsed());
                    self.installed_now(program, pods.len());
                    None
                }
                Ok((_, Err(e))) => Some(e.to_string()),
                Err(e) => Some(format!("the kernel call failed: {e}")),
            };
            if let Some(e) = refused {
                // What the kernel holds is not known now: the next attempt writes it all.
                self.installed = None;
                let wait = self.retry;
                warn!(error = %e, retry_in = ?wait, "cannot install the NetworkPolicy program; retrying");
                self.error = Some(e);
                self.retry = (self.retry * 2).min(RETRY_MAX);
                self.publish();
                return Err(wait);
            }
        }
        self.pods = pods.into_iter().map(|p| (p.key.clone(), p)).collect();
        self.publish();
        Ok(())
    }

    fn installed_now(&mut self, program: Program, local_pods: usize) {
        let (compile, write) = (self.compile, self.write);
        if self.installs == 0 || self.error.is_some() {
            info!(
                local_pods,
                isolated_ingress = program.ingress.len(),
                isolated_egress = program.egress.len(),
                ?compile,
                ?write,
                "NetworkPolicy program installed"
            );
        } else {
            debug!(
                local_pods,
                chains = program.chains.len(),
                ?compile,
                ?write,
                "NetworkPolicy program updated"
            );
        }
        self.installed = Some(program);
        self.installs += 1;
        self.error = None;
        self.retry = RETRY_FIRST;
    }

    fn publish(&self) {
        let now = Programmed {
            unlisted: self.state.unlisted(),
            pods: self.pods.clone(),
            installs: self.installs,
            error: self.error.clone(),
            compile: self.compile,
            write: self.write,
        };
        self.out.send_if_modified(|p| {
            if **p == now {
                return false;
            }
            *p = Arc::new(now);
            true
        });
    }
}
