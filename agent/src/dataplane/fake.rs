//! A [`Dataplane`] that keeps the "kernel" in memory and records every call, for tests of the
//! code above the kernel (endpoint ordering, rollback, reconciliation) without root. Any kind
//! of call can be made to fail on its Nth occurrence; namespaces can be made to vanish and
//! interfaces to disappear, as they do on a real host.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ipnet::IpNet;

use super::netns::NetnsError;
use super::{
    BridgeReport, BridgeSpec, Dataplane, EndpointSpec, EndpointState, KernelError, Mac, coexist,
    nft,
};

/// The kinds of call, for counting and for injecting failures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    EnsureBridge,
    SetupEndpoint,
    RemoveAddresses,
    TeardownEndpoint,
    CheckEndpoint,
    EndpointLinks,
    ApplyFirewall,
    FirewallIntact,
    SetSysctl,
    LoadModule,
    RemoveFirewall,
    SyncForward,
    RemoveForward,
    UnderlayMtu,
    CheckNetns,
}

/// One recorded call: its kind and what it was about (an interface, a namespace, a table).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    pub op: Op,
    pub subject: String,
}

#[derive(Debug, Default)]
struct Kernel {
    calls: Vec<Call>,
    /// Fail the call of this kind whose 1-based occurrence is this number.
    fail: BTreeMap<Op, usize>,
    bridge: Option<BridgeSpec>,
    /// Endpoints by host interface name.
    links: BTreeMap<String, EndpointSpec>,
    /// Host interfaces on the bridge that belong to no endpoint spec (leftovers).
    stray: BTreeSet<String>,
    gone_netns: BTreeSet<PathBuf>,
    /// Namespaces that cannot be opened for a reason other than being gone (errno).
    unopenable_netns: BTreeMap<PathBuf, i32>,
    firewall: Option<nft::Table>,
    /// What `sync_forward_accept` last wrote.
    forward: Option<coexist::ForwardAccept>,
}

/// The fake (share it in an `Arc`).
#[derive(Debug, Default)]
pub struct RecordingDataplane {
    k: Mutex<Kernel>,
}

impl RecordingDataplane {
    fn lock(&self) -> std::sync::MutexGuard<'_, Kernel> {
        self.k.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a call; fails it if it is the one chosen with [`Self::fail_nth`].
    fn record(&self, op: Op, subject: impl Into<String>) -> Result<(), KernelError> {
        let mut k = self.lock();
        k.calls.push(Call { op, subject: subject.into() });
        let n = k.calls.iter().filter(|c| c.op == op).count();
        if k.fail.get(&op) == Some(&n) {
            return Err(KernelError::Mismatch(format!("injected failure of {op:?} #{n}")));
        }
        Ok(())
    }

    /// Makes the `n`th call (counting from 1, over the whole life of the fake) of `op` fail.
    pub fn fail_nth(&self, op: Op, n: usize) {
        self.lock().fail.insert(op, n);
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// How many calls of `op` were made.
    pub fn count(&self, op: Op) -> usize {
        self.lock().calls.iter().filter(|c| c.op == op).count()
    }

    /// The endpoints the "kernel" has, by host interface.
    pub fn links(&self) -> BTreeMap<String, EndpointSpec> {
        self.lock().links.clone()
    }

    /// The namespace at `path` disappears (its pod was deleted).
    pub fn remove_netns(&self, path: &Path) {
        self.lock().gone_netns.insert(path.to_owned());
    }

    /// Opening the namespace at `path` fails with `errno` (e.g. EMFILE) although it exists.
    pub fn fail_netns(&self, path: &Path, errno: i32) {
        self.lock().unopenable_netns.insert(path.to_owned(), errno);
    }

    /// The endpoint's interface disappears (someone deleted it).
    pub fn lose_link(&self, host_ifname: &str) {
        self.lock().links.remove(host_ifname);
    }

    /// An interface on the bridge that no endpoint owns (left by a crash).
    pub fn add_stray_link(&self, host_ifname: &str) {
        self.lock().stray.insert(host_ifname.to_owned());
    }

    pub fn firewall(&self) -> Option<nft::Table> {
        self.lock().firewall.clone()
    }

    fn netns_alive(&self, path: &Path) -> bool {
        !self.lock().gone_netns.contains(path)
    }
}

fn mac_for(spec: &EndpointSpec, host: bool) -> Mac {
    let mut m = spec.mac.unwrap_or(Mac([0x0a, 0x58, 0, 0, 0, 1]));
    if host {
        m.0[0] = 0x02;
    }
    m
}

impl Dataplane for RecordingDataplane {
    fn ensure_bridge(&self, spec: &BridgeSpec) -> Result<BridgeReport, KernelError> {
        self.record(Op::EnsureBridge, &spec.name)?;
        let mut k = self.lock();
        let repairs = if k.bridge.as_ref() == Some(spec) { vec![] } else { vec!["created".into()] };
        k.bridge = Some(spec.clone());
        Ok(BridgeReport { index: 1, repairs })
    }

    fn setup_endpoint(&self, spec: &EndpointSpec) -> Result<EndpointState, KernelError> {
        self.record(Op::SetupEndpoint, &spec.host_ifname)?;
        if !self.netns_alive(&spec.netns) {
            return Err(KernelError::Netns(NetnsError::Open {
                path: spec.netns.clone(),
                error: std::io::Error::from_raw_os_error(libc::ENOENT),
            }));
        }
        self.lock().links.insert(spec.host_ifname.clone(), spec.clone());
        Ok(EndpointState { host_mac: mac_for(spec, true), container_mac: mac_for(spec, false) })
    }

    fn handover_endpoint(
        &self,
        spec: &EndpointSpec,
        _peer: &str,
    ) -> Result<EndpointState, KernelError> {
        self.record(Op::SetupEndpoint, &spec.host_ifname)?;
        self.lock().links.insert(spec.host_ifname.clone(), spec.clone());
        Ok(EndpointState { host_mac: mac_for(spec, true), container_mac: mac_for(spec, false) })
    }

    fn remove_addresses(
        &self,
        spec: &EndpointSpec,
        addresses: &[IpNet],
    ) -> Result<(), KernelError> {
        self.record(Op::RemoveAddresses, &spec.host_ifname)?;
        if let Some(l) = self.lock().links.get_mut(&spec.host_ifname) {
            l.addresses.retain(|a| !addresses.contains(a));
        }
        Ok(())
    }

    fn teardown_endpoint(&self, host_ifname: &str) -> Result<(), KernelError> {
        self.record(Op::TeardownEndpoint, host_ifname)?;
        let mut k = self.lock();
        k.links.remove(host_ifname);
        k.stray.remove(host_ifname);
        Ok(())
    }

    fn teardown_endpoint_of(&self, host_ifname: &str, owner: &str) -> Result<bool, KernelError> {
        self.record(Op::TeardownEndpoint, host_ifname)?;
        let mut k = self.lock();
        if k.links.get(host_ifname).is_none_or(|l| l.owner != owner) {
            return Ok(false);
        }
        k.links.remove(host_ifname);
        Ok(true)
    }

    fn check_endpoint(&self, spec: &EndpointSpec) -> Result<(), KernelError> {
        self.record(Op::CheckEndpoint, &spec.host_ifname)?;
        match self.lock().links.get(&spec.host_ifname) {
            Some(have) if have.addresses == spec.addresses && have.netns == spec.netns => Ok(()),
            Some(_) => Err(KernelError::Mismatch(format!("{} differs", spec.host_ifname))),
            None => Err(KernelError::Mismatch(format!("{} is missing", spec.host_ifname))),
        }
    }

    fn endpoint_links(&self, bridge: &str) -> Result<Vec<String>, KernelError> {
        self.record(Op::EndpointLinks, bridge)?;
        let k = self.lock();
        Ok(k.links.keys().chain(k.stray.iter()).cloned().collect())
    }

    fn apply_firewall(&self, table: &nft::Table) -> Result<(), KernelError> {
        self.record(Op::ApplyFirewall, &table.name)?;
        self.lock().firewall = Some(table.clone());
        Ok(())
    }

    fn firewall_intact(&self, table: &nft::Table) -> Result<bool, KernelError> {
        self.record(Op::FirewallIntact, &table.name)?;
        Ok(self.lock().firewall.as_ref() == Some(table))
    }

    fn sync_forward_accept(
        &self,
        want: &coexist::ForwardAccept,
        rewrite: bool,
    ) -> Result<coexist::Coexistence, KernelError> {
        self.record(Op::SyncForward, &want.bridge)?;
        let mut k = self.lock();
        let docker_user = if rewrite || k.forward.as_ref() != Some(want) {
            k.forward = Some(want.clone());
            coexist::DockerUser::Written
        } else {
            coexist::DockerUser::Intact
        };
        Ok(coexist::Coexistence { docker_user, legacy_forward: None })
    }

    fn remove_forward_accept(&self, bridge: &str) -> Result<usize, KernelError> {
        self.record(Op::RemoveForward, bridge)?;
        Ok(self.lock().forward.take().map_or(0, |f| f.rules().len()))
    }

    fn set_sysctl(&self, key: &str, _value: &str) -> Result<(), KernelError> {
        self.record(Op::SetSysctl, key)
    }

    fn load_module(&self, name: &str) -> Result<(), KernelError> {
        self.record(Op::LoadModule, name)
    }

    fn remove_firewall(&self, name: &str) -> Result<(), KernelError> {
        self.record(Op::RemoveFirewall, name)?;
        self.lock().firewall = None;
        Ok(())
    }

    fn underlay_mtu(&self, exclude: &str) -> Result<Option<u32>, KernelError> {
        self.record(Op::UnderlayMtu, exclude)?;
        Ok(Some(1500))
    }

    fn check_netns(&self, path: &Path) -> Result<(), KernelError> {
        self.record(Op::CheckNetns, path.display().to_string())?;
        if let Some(&errno) = self.lock().unopenable_netns.get(path) {
            return Err(KernelError::Netns(NetnsError::Open {
                path: path.to_owned(),
                error: std::io::Error::from_raw_os_error(errno),
            }));
        }
        if self.netns_alive(path) {
            Ok(())
        } else {
            Err(KernelError::Netns(NetnsError::Open {
                path: path.to_owned(),
                error: std::io::Error::from_raw_os_error(libc::ENOENT),
            }))
        }
    }
}
