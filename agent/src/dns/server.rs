//! The DNS server: hickory-server's UDP and TCP loops with our request handler, which answers
//! from the current [`Zone`] snapshot and forwards the rest upstream. Listeners are replaced
//! as a whole when the addresses to listen on change (the bridge got or lost an address).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::{
    Edns, Header, HeaderCounts, Message, MessageType, Metadata, ResponseCode,
};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use ipnet::IpNet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::upstream::Upstream;
use super::zone::{Answer, Zone};

/// How long an idle TCP client is kept.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Forwarded queries in flight at once, over all workers. Each holds a UDP socket for up to
/// the upstream timeout per server, so this bounds the file descriptors DNS load can take;
/// queries beyond it are answered REFUSED at once.
pub const MAX_FORWARDS: usize = 256;

/// The largest UDP answer, whatever the client's EDNS size (the DNS flag day 2020 value:
/// no IP fragmentation, little amplification).
pub const MAX_UDP_PAYLOAD: u16 = 1232;

/// Query counts by outcome.
#[derive(Debug, Default)]
pub struct QueryCounts {
    pub answered: AtomicU64,
    pub nxdomain: AtomicU64,
    pub forwarded: AtomicU64,
    pub failed: AtomicU64,
}

/// Answers queries; cheap to clone.
#[derive(Clone, Debug)]
pub struct Handler {
    pub zone: Arc<ArcSwap<Zone>>,
    pub upstream: Arc<Upstream>,
    pub counts: Arc<QueryCounts>,
    /// Permits for forwarded queries ([`MAX_FORWARDS`]).
    pub forwards: Arc<tokio::sync::Semaphore>,
    /// Who may ask: the weft network; the host itself is always allowed.
    pub clients: Arc<Vec<IpNet>>,
}

/// Whether `src` may use this server: loopback, an address in `clients` (pods and the host's
/// own bridge addresses), or any other address of the host itself. Everyone else — an
/// underlay host routing the range through this one — is refused.
pub fn client_allowed(
    src: IpAddr,
    clients: &[IpNet],
    is_local: impl FnOnce(IpAddr) -> bool,
) -> bool {
    src.is_loopback() || clients.iter().any(|n| n.contains(&src)) || is_local(src)
}

/// Whether `ip` is one of this host's addresses (binding to it succeeds only then).
fn is_local_address(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind((ip, 0)).is_ok()
}

fn failure(request: &Request, code: ResponseCode) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = code;
    ResponseInfo::from(Header { metadata, counts: HeaderCounts::default() })
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response: R,
    ) -> ResponseInfo {
        match self.respond(request, response).await {
            Ok(info) => info,
            Err(e) => {
                debug!(error = %e, src = %request.src(), "cannot send a DNS response");
                failure(request, ResponseCode::ServFail)
            }
        }
    }
}

impl Handler {
    async fn respond<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response: R,
    ) -> Result<ResponseInfo, hickory_server::net::NetError> {
        let builder = MessageResponseBuilder::from_message_request(request);
        if !client_allowed(request.src().ip(), &self.clients, is_local_address) {
            self.counts.failed.fetch_add(1, Ordering::Relaxed);
            let msg = builder.error_msg(&request.metadata, ResponseCode::Refused);
            return response.send_response(msg).await;
        }
        let edns = request.edns.as_ref().map(|req| {
            let mut e = Edns::new();
            e.set_max_payload(req.max_payload().clamp(512, MAX_UDP_PAYLOAD));
            e
        });
        let mut builder = builder;
        if let Some(e) = &edns {
            builder.edns(e);
        }
        let queries = request.queries.queries();
        let query = match queries {
            [q] if request.metadata.message_type == MessageType::Query => q,
            _ => {
                self.counts.failed.fetch_add(1, Ordering::Relaxed);
                let msg = builder.error_msg(&request.metadata, ResponseCode::FormErr);
                return response.send_response(msg).await;
            }
        };
        let mut metadata = Metadata::response_from_request(&request.metadata);
        let zone = self.zone.load();
        match zone.answer(query.original().name(), query.query_type()) {
            Answer::Records(records) => {
                self.counts.answered.fetch_add(1, Ordering::Relaxed);
                metadata.authoritative = true;
                let soa = records.is_empty().then(|| zone.soa());
                let msg = builder.build(metadata, records.iter(), [], soa, []);
                response.send_response(msg).await
            }
            Answer::NxDomain => {
                self.counts.nxdomain.fetch_add(1, Ordering::Relaxed);
                metadata.authoritative = true;
                metadata.response_code = ResponseCode::NXDomain;
                let msg = builder.build(metadata, [], [], Some(zone.soa()), []);
                response.send_response(msg).await
            }
            Answer::Forward => {
                drop(zone);
                let Ok(_permit) = self.forwards.try_acquire() else {
                    self.counts.failed.fetch_add(1, Ordering::Relaxed);
                    let msg = builder.error_msg(&request.metadata, ResponseCode::Refused);
                    return response.send_response(msg).await;
                };
                let tcp = request.protocol() == Protocol::Tcp;
                let upstream = self
                    .upstream
                    .forward(query.original(), request.metadata.recursion_desired, tcp)
                    .await;
                match upstream {
                    Ok(reply) => {
                        self.counts.forwarded.fetch_add(1, Ordering::Relaxed);
                        let Message { answers, authorities, additionals, metadata: up, .. } = reply;
                        metadata.recursion_available = up.recursion_available;
                        metadata.authoritative = up.authoritative;
                        metadata.authentic_data = up.authentic_data;
                        metadata.response_code = up.response_code;
                        let msg = builder.build(
                            metadata,
                            answers.iter(),
                            authorities.iter(),
                            [],
                            additionals.iter(),
                        );
                        response.send_response(msg).await
                    }
                    Err(e) => {
                        self.counts.failed.fetch_add(1, Ordering::Relaxed);
                        debug!(name = %query.name(), error = %e, "forwarding failed");
                        let msg = builder.error_msg(&request.metadata, ResponseCode::ServFail);
                        response.send_response(msg).await
                    }
                }
            }
        }
    }
}

/// The running listeners: one thread per CPU, each with its own single-threaded runtime and
/// its own UDP socket on every address (SO_REUSEPORT spreads clients over them). Queries
/// never wake another thread, and a flood of them cannot starve the agent's other work.
#[derive(Default)]
pub struct Listeners {
    addrs: Vec<SocketAddr>,
    workers: Vec<Worker>,
}

struct Worker {
    stop: CancellationToken,
    thread: std::thread::JoinHandle<()>,
}

impl std::fmt::Debug for Listeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listeners").field("addrs", &self.addrs).finish()
    }
}

/// What one worker serves.
#[derive(Default)]
struct Sockets {
    udp: Vec<std::net::UdpSocket>,
    tcp: Vec<std::net::TcpListener>,
}

impl Listeners {
    /// The addresses served now.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Serves exactly `want` (UDP and TCP on each). Addresses that cannot be bound yet are
    /// left out and reported; the caller tries again later.
    pub async fn serve(
        &mut self,
        want: &[SocketAddr],
        handler: &Handler,
    ) -> Vec<(SocketAddr, std::io::Error)> {
        if self.addrs == want {
            return Vec::new();
        }
        self.stop().await;
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        let mut per_worker: Vec<Sockets> = (0..threads).map(|_| Sockets::default()).collect();
        let mut failed = Vec::new();
        for addr in want {
            match bind(*addr, threads) {
                Ok((udps, tcp)) => {
                    for (w, udp) in per_worker.iter_mut().zip(udps) {
                        w.udp.push(udp);
                    }
                    per_worker[0].tcp.push(tcp);
                    self.addrs.push(*addr);
                }
                Err(e) => failed.push((*addr, e)),
            }
        }
        if self.addrs.is_empty() {
            return failed;
        }
        for sockets in per_worker {
            match start_worker(sockets, handler.clone()) {
                Ok(w) => self.workers.push(w),
                Err(e) => warn!(error = %e, "cannot start a DNS worker thread"),
            }
        }
        info!(listen = ?self.addrs, threads, "DNS server listening");
        failed
    }

    pub async fn stop(&mut self) {
        self.addrs.clear();
        let workers = std::mem::take(&mut self.workers);
        for w in &workers {
            w.stop.cancel();
        }
        // The sockets must be closed before the same addresses are bound again.
        let joined = tokio::task::spawn_blocking(move || {
            for w in workers {
                let _ = w.thread.join();
            }
        });
        let _ = joined.await;
    }
}

fn start_worker(sockets: Sockets, handler: Handler) -> std::io::Result<Worker> {
    let stop = CancellationToken::new();
    let cancelled = stop.clone();
    let thread = std::thread::Builder::new().name("weft-dns".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                warn!(error = %e, "cannot start a DNS worker runtime");
                return;
            }
        };
        rt.block_on(async move {
            let mut server = Server::new(handler);
            for udp in sockets.udp {
                match tokio::net::UdpSocket::from_std(udp) {
                    Ok(u) => server.register_socket(u),
                    Err(e) => warn!(error = %e, "cannot serve a DNS socket"),
                }
            }
            for tcp in sockets.tcp {
                match tokio::net::TcpListener::from_std(tcp) {
                    Ok(t) => server.register_listener(t, TCP_IDLE, 64 * 1024),
                    Err(e) => warn!(error = %e, "cannot serve a DNS socket"),
                }
            }
            cancelled.cancelled().await;
            if let Err(e) = server.shutdown_gracefully().await {
                debug!(error = %e, "DNS worker did not stop cleanly");
            }
        });
    })?;
    Ok(Worker { stop, thread })
}

/// `n` UDP sockets on the same address (SO_REUSEPORT) and the TCP listener.
fn bind(
    addr: SocketAddr,
    n: usize,
) -> std::io::Result<(Vec<std::net::UdpSocket>, std::net::TcpListener)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut udps = Vec::with_capacity(n);
    for _ in 0..n {
        let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        s.set_reuse_port(true)?;
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        udps.push(s.into());
    }
    let tcp = std::net::TcpListener::bind(addr)?;
    tcp.set_nonblocking(true)?;
    Ok((udps, tcp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_weft_network_and_the_host_may_ask() {
        let clients: Vec<IpNet> = vec!["10.32.0.0/12".parse().unwrap()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(client_allowed(ip("10.32.0.5"), &clients, |_| false));
        assert!(client_allowed(ip("127.0.0.1"), &clients, |_| false));
        assert!(client_allowed(ip("::1"), &clients, |_| false));
        assert!(client_allowed(ip("192.168.1.2"), &clients, |_| true), "the host's own address");
        assert!(!client_allowed(ip("192.168.1.9"), &clients, |_| false), "an underlay host");
        assert!(is_local_address(ip("127.0.0.1")));
        assert!(!is_local_address(ip("192.0.2.77")), "TEST-NET-1 is nobody's address here");
    }
}
