//! [`Services`]: the handles the local API and the status listener serve from. The daemon
//! builds it once every subsystem has started; the servers only read it.

use tokio::sync::watch;

use crate::dns::Dns;
use crate::endpoints::Readiness;
use crate::netpol::PolicyHandle;
use crate::overlay::OverlayReport;
use crate::subsystem::Hub;

#[derive(Debug)]
pub struct Services {
    /// Identity, mesh, endpoints, IP allocation, store, metrics, shutdown.
    pub hub: Hub,
    pub overlay: watch::Receiver<OverlayReport>,
    /// `None` with --no-dns.
    pub dns: Option<Dns>,
    pub ready: watch::Receiver<Readiness>,
    /// NetworkPolicy enforcement (Kubernetes mode, unless --no-network-policy): CNI ADD
    /// waits for it.
    pub policy: Option<PolicyHandle>,
}
