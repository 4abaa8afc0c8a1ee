//! Where the node's policy program goes: the kernel's nftables (table `inet weft-policy`,
//! written whole or as the elements that changed by `dataplane::nft::policy::PolicyTable`),
//! or a recording fake in tests.

use std::sync::Mutex;

use crate::dataplane::nft::policy::{self, Denied, PolicyTable, TableOptions, Written};
use crate::dataplane::nft::{NftError, NftSocket};
use crate::policy::compile::Program;

#[derive(Debug, thiserror::Error)]
pub enum PolicyKernelError {
    #[error("installing the NetworkPolicy table: {0}")]
    Nft(#[from] NftError),
    /// Without br_netfilter's hand-over, packets between pods on the bridge never meet the
    /// table: writing it would claim an enforcement that does not happen.
    #[error(
        "bridged pod traffic does not reach nftables ({0}): weft sets \
         net.bridge.bridge-nf-call-iptables=1 at start; load br_netfilter and set it to 1 again"
    )]
    BridgeNetfilterOff(String),
}

const BRIDGE_NF_CALL: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

/// Whether bridged IPv4 packets go through the forward hook, as the table needs.
fn bridged_packets_filtered() -> Result<(), PolicyKernelError> {
    match std::fs::read_to_string(BRIDGE_NF_CALL) {
        Ok(v) if v.trim() == "1" => Ok(()),
        Ok(v) => Err(PolicyKernelError::BridgeNetfilterOff(format!(
            "net.bridge.bridge-nf-call-iptables is {}",
            v.trim()
        ))),
        Err(e) => Err(PolicyKernelError::BridgeNetfilterOff(format!("{BRIDGE_NF_CALL}: {e}"))),
    }
}

/// Takes the whole program for this node. Blocking (a netlink round trip): call it off the
/// async workers.
pub trait PolicyKernel: Send + Sync + std::fmt::Debug {
    fn apply(&self, program: &Program) -> Result<(), PolicyKernelError>;
    /// What each group of policies has dropped since the table was last written whole.
    fn denied(&self) -> Result<Vec<Denied>, PolicyKernelError>;
    /// Whether what was last applied still holds; when not, the next `apply` writes it all.
    fn intact(&self) -> Result<bool, PolicyKernelError>;
}

/// nftables in the agent's own (the host's) namespace.
#[derive(Debug, Default)]
pub struct NftPolicyKernel {
    table: Mutex<PolicyTable>,
}

impl NftPolicyKernel {
    /// `opts`: whether denied connections also go to the kernel log (`--policy-log`), and
    /// whether established connections are checked packet by packet (`--policy-strict`).
    pub fn new(opts: TableOptions) -> NftPolicyKernel {
        NftPolicyKernel { table: Mutex::new(PolicyTable::new(opts)) }
    }
}

impl PolicyKernel for NftPolicyKernel {
    fn apply(&self, program: &Program) -> Result<(), PolicyKernelError> {
        bridged_packets_filtered()?;
        let mut sock = NftSocket::open()?;
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        match table.apply(&mut sock, program)? {
            Written::Whole => tracing::debug!("NetworkPolicy table written whole"),
            Written::Elements(n) => {
                tracing::debug!(elements = n, "NetworkPolicy table updated in place")
            }
        }
        Ok(())
    }

    fn denied(&self) -> Result<Vec<Denied>, PolicyKernelError> {
        // Only the chain list under the lock: a dump must not hold up an install (and with it
        // a CNI ADD waiting for policy).
        let counters = self.table.lock().unwrap_or_else(|e| e.into_inner()).counters();
        let mut sock = NftSocket::open()?;
        Ok(policy::denied(&mut sock, &counters)?)
    }

    fn intact(&self) -> Result<bool, PolicyKernelError> {
        let mut sock = NftSocket::open()?;
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        Ok(table.intact(&mut sock)? && bridged_packets_filtered().is_ok())
    }
}

/// Records every program it is given; refuses while `failing` is set.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct FakeKernel {
    pub applied: Mutex<Vec<Program>>,
    pub failing: std::sync::atomic::AtomicBool,
    pub attempts: std::sync::atomic::AtomicUsize,
    /// The next check finds the table gone.
    pub lost: std::sync::atomic::AtomicBool,
}

#[cfg(test)]
impl FakeKernel {
    pub fn last(&self) -> Option<Program> {
        self.applied.lock().expect("not poisoned").last().cloned()
    }

    pub fn count(&self) -> usize {
        self.applied.lock().expect("not poisoned").len()
    }
}

#[cfg(test)]
impl PolicyKernel for FakeKernel {
    fn apply(&self, program: &Program) -> Result<(), PolicyKernelError> {
        use std::sync::atomic::Ordering;
        self.attempts.fetch_add(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            return Err(NftError::NoAnswer.into());
        }
        self.applied.lock().expect("not poisoned").push(program.clone());
        Ok(())
    }

    fn denied(&self) -> Result<Vec<Denied>, PolicyKernelError> {
        Ok(Vec::new())
    }

    fn intact(&self) -> Result<bool, PolicyKernelError> {
        Ok(!self.lost.swap(false, std::sync::atomic::Ordering::SeqCst))
    }
}
