//! Where the node's policy program goes: the kernel's nftables (table `inet weft-policy`,
//! replaced whole by `dataplane::nft::policy`), or a recording fake in tests.

use crate::dataplane::nft::{NftError, NftSocket, policy};
use crate::policy::compile::Program;

#[derive(Debug, thiserror::Error)]
pub enum PolicyKernelError {
    #[error("installing the NetworkPolicy table: {0}")]
    Nft(#[from] NftError),
}

/// Takes the whole program for this node. Blocking (a netlink round trip): call it off the
/// async workers.
pub trait PolicyKernel: Send + Sync + std::fmt::Debug {
    fn apply(&self, program: &Program) -> Result<(), PolicyKernelError>;
}

/// nftables in the agent's own (the host's) namespace.
#[derive(Debug, Default)]
pub struct NftPolicyKernel;

impl PolicyKernel for NftPolicyKernel {
    fn apply(&self, program: &Program) -> Result<(), PolicyKernelError> {
        let mut sock = NftSocket::open()?;
        policy::install(&mut sock, program)?;
        Ok(())
    }
}

/// Records every program it is given; refuses while `failing` is set.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct FakeKernel {
    pub applied: std::sync::Mutex<Vec<Program>>,
    pub failing: std::sync::atomic::AtomicBool,
    pub attempts: std::sync::atomic::AtomicUsize,
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
}
