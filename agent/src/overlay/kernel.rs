//! The kernel operations of the overlay behind a trait: the VXLAN device, the sleeve's TAP
//! port on the bridge, the forwarding entries, the table filtering who may send VXLAN, and the
//! table counting each peer's VXLAN traffic. [`LinuxOverlay`] does them with netlink
//! (`dataplane::fastdp`); tests use a fake. All calls block: async callers use
//! `spawn_blocking`.

use crate::dataplane::KernelError;
use crate::dataplane::fastdp::{self, FdbChanges, FdbSpec, VxlanSpec};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::dataplane::Traffic;
use crate::dataplane::nft::traffic;
use crate::dataplane::nft::{Family, NftSocket, Table};

/// What the overlay asks of the kernel.
pub trait OverlayKernel: Send + Sync + 'static {
    /// Creates or repairs the VXLAN device; its index and what was repaired.
    fn ensure_vxlan(&self, spec: &VxlanSpec) -> Result<(u32, Vec<String>), KernelError>;
    /// Deletes the VXLAN device `name` if there is one; whether there was.
    fn remove_vxlan(&self, name: &str) -> Result<bool, KernelError>;
    /// Attaches an existing interface (the sleeve TAP) to the bridge as an overlay port.
    fn attach_port(&self, name: &str, bridge: &str, mtu: u32) -> Result<(), KernelError>;
    /// Makes the forwarding entries match `spec`.
    fn sync_fdb(&self, spec: &FdbSpec) -> Result<FdbChanges, KernelError>;
    /// Installs or replaces an nftables table of the overlay's own, unless it is already
    /// there with as many rules (a repair check, so an unchanged table is not rewritten).
    fn ensure_table(&self, table: &Table, replace: bool) -> Result<(), KernelError>;
    /// Removes an nftables table of the overlay's if it exists.
    fn remove_table(&self, family: Family, name: &str) -> Result<(), KernelError>;
    /// Writes the table counting fastdp traffic per peer (their underlay addresses), from 0.
    fn write_traffic_table(
        &self,
        table: &str,
        port: u16,
        peers: &[Ipv4Addr],
    ) -> Result<(), KernelError>;
    /// That table's counters by peer (none while there is no table).
    fn read_traffic_table(&self, table: &str) -> Result<BTreeMap<Ipv4Addr, Traffic>, KernelError>;
}

impl std::fmt::Debug for dyn OverlayKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OverlayKernel")
    }
}

/// The Linux implementation.
#[derive(Debug, Default)]
pub struct LinuxOverlay;

impl OverlayKernel for LinuxOverlay {
    fn ensure_vxlan(&self, spec: &VxlanSpec) -> Result<(u32, Vec<String>), KernelError> {
        fastdp::ensure_vxlan(spec)
    }

    fn remove_vxlan(&self, name: &str) -> Result<bool, KernelError> {
        fastdp::remove_vxlan(name)
    }

    fn attach_port(&self, name: &str, bridge: &str, mtu: u32) -> Result<(), KernelError> {
        fastdp::attach_port(name, bridge, mtu)
    }

    fn sync_fdb(&self, spec: &FdbSpec) -> Result<FdbChanges, KernelError> {
        fastdp::sync(spec)
    }

    fn ensure_table(&self, table: &Table, replace: bool) -> Result<(), KernelError> {
        let mut sock = NftSocket::open()?;
        let intact = !replace
            && sock.table_exists(table.family, &table.name)?
            && sock.rule_count(table.family, &table.name)? == table.rule_count();
        if !intact {
            sock.replace_table(table)?;
        }
        Ok(())
    }

    fn remove_table(&self, family: Family, name: &str) -> Result<(), KernelError> {
        let mut sock = NftSocket::open()?;
        if sock.table_exists(family, name)? {
            sock.delete_table(family, name)?;
        }
        Ok(())
    }

    fn write_traffic_table(
        &self,
        table: &str,
        port: u16,
        peers: &[Ipv4Addr],
    ) -> Result<(), KernelError> {
        Ok(traffic::install(&mut NftSocket::open()?, table, port, peers)?)
    }

    fn read_traffic_table(&self, table: &str) -> Result<BTreeMap<Ipv4Addr, Traffic>, KernelError> {
        Ok(traffic::read(&mut NftSocket::open()?, table)?)
    }
}
