//! Per-peer fastdp traffic: keeps the kernel's counting table (`dataplane::nft::traffic`) in
//! step with the peers fastdp runs to, and each peer's totals across rewrites of that table
//! (a rewrite starts its counters from 0). The kernel work runs on a blocking thread, one job
//! at a time; the overlay reads the latest totals when it publishes its report.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tracing::warn;

use super::kernel::OverlayKernel;
use crate::dataplane::{Traffic, on_blocking_thread};

/// The totals, and what the kernel's table holds.
#[derive(Debug, Default)]
struct Totals {
    /// The peers the table was last written for; `None` before the first write.
    installed: Option<BTreeSet<Ipv4Addr>>,
    /// Counts of each peer from before the table's last rewrite.
    base: BTreeMap<Ipv4Addr, Traffic>,
    /// Base plus the table's counters, as last read.
    totals: BTreeMap<Ipv4Addr, Traffic>,
    /// The last failure logged (logged again only when it changes).
    error: String,
}

impl Totals {
    /// Takes in the table's `current` counters; returns whether the table must be rewritten
    /// for `wanted`, having then kept the totals of the peers that stay.
    fn account(
        &mut self,
        current: &BTreeMap<Ipv4Addr, Traffic>,
        wanted: &BTreeSet<Ipv4Addr>,
    ) -> bool {
        let installed = self.installed.clone().unwrap_or_default();
        self.totals = installed
            .iter()
            .map(|p| {
                let base = self.base.get(p).copied().unwrap_or_default();
                (*p, base + current.get(p).copied().unwrap_or_default())
            })
            .collect();
        // A peer the table should count but does not: the table went (or was changed)
        // behind us; write it again.
        let intact = installed.iter().all(|p| current.contains_key(p));
        if intact && self.installed.as_ref() == Some(wanted) {
            return false;
        }
        self.totals.retain(|p, _| wanted.contains(p));
        self.base = self.totals.clone();
        true
    }
}

/// The per-peer fastdp counters of this host.
#[derive(Clone)]
pub struct FastdpTraffic {
    table: String,
    port: u16,
    kernel: Arc<dyn OverlayKernel>,
    totals: Arc<Mutex<Totals>>,
    busy: Arc<AtomicBool>,
}

impl std::fmt::Debug for FastdpTraffic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastdpTraffic").field("table", &self.table).finish_non_exhaustive()
    }
}

impl FastdpTraffic {
    pub fn new(table: String, port: u16, kernel: Arc<dyn OverlayKernel>) -> FastdpTraffic {
        FastdpTraffic { table, port, kernel, totals: Arc::default(), busy: Arc::default() }
    }

    /// Reads the counters and, if the peers fastdp runs to are no longer `wanted`, rewrites the
    /// table, on a blocking thread. A call while the previous one still runs does nothing (the
    /// next tick catches up).
    pub fn refresh(&self, wanted: BTreeSet<Ipv4Addr>) {
        if self.busy.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            on_blocking_thread(|| this.sync(&wanted));
            this.busy.store(false, Ordering::Release);
        });
    }

    fn sync(&self, wanted: &BTreeSet<Ipv4Addr>) {
        let result = self.kernel.read_traffic_table(&self.table).and_then(|current| {
            let rewrite = self.lock().account(&current, wanted);
            if rewrite {
                let peers: Vec<Ipv4Addr> = wanted.iter().copied().collect();
                self.kernel.write_traffic_table(&self.table, self.port, &peers)?;
                self.lock().installed = Some(wanted.clone());
            }
            Ok(())
        });
        let mut t = self.lock();
        match result {
            Ok(()) => t.error.clear(),
            Err(e) => {
                let e = e.to_string();
                if e != t.error {
                    warn!(error = %e, table = %self.table, "cannot count fastdp traffic per peer");
                    t.error = e;
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Totals> {
        self.totals.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The fastdp traffic exchanged with the peer at `addr`, as last read.
    pub fn of(&self, addr: Ipv4Addr) -> Traffic {
        self.lock().totals.get(&addr).copied().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("address")
    }

    fn counters(tx: u64) -> Traffic {
        Traffic { tx_packets: tx, tx_bytes: 100 * tx, rx_packets: 0, rx_bytes: 0 }
    }

    #[test]
    fn totals_survive_rewrites_of_the_table_for_the_peers_that_stay() {
        let mut t = Totals::default();
        let (a, b) = (ip("10.99.0.2"), ip("10.99.0.3"));
        assert!(t.account(&BTreeMap::new(), &BTreeSet::from([a])), "the first write");
        t.installed = Some(BTreeSet::from([a]));
        assert!(!t.account(&BTreeMap::from([(a, counters(5))]), &BTreeSet::from([a])));
        assert_eq!(t.totals[&a].tx_packets, 5);
        // b arrives: the table is rewritten (its counters start from 0), a's 7 are kept.
        assert!(t.account(&BTreeMap::from([(a, counters(7))]), &BTreeSet::from([a, b])));
        t.installed = Some(BTreeSet::from([a, b]));
        assert!(!t.account(
            &BTreeMap::from([(a, counters(1)), (b, counters(2))]),
            &BTreeSet::from([a, b])
        ));
        assert_eq!((t.totals[&a].tx_packets, t.totals[&b].tx_packets), (8, 2));
        assert_eq!(t.totals[&a].tx_bytes, 800);
        // a goes: its totals go with it.
        assert!(
            t.account(&BTreeMap::from([(a, counters(1)), (b, counters(3))]), &BTreeSet::from([b]))
        );
        assert_eq!(t.totals.keys().copied().collect::<Vec<_>>(), vec![b]);
        assert_eq!(t.base[&b].tx_packets, 3);
        // The table deleted behind us: written again, b's count so far kept.
        t.installed = Some(BTreeSet::from([b]));
        assert!(t.account(&BTreeMap::new(), &BTreeSet::from([b])), "a missing table is rewritten");
        assert_eq!(t.totals[&b].tx_packets, 3);
    }
}
