//! The host's resolvers, for every name that is not ours: read from resolv.conf (re-read when
//! it changes, looked at no more than every 5 s), our own listen addresses left out so that
//! a host pointing at weft does not loop. A query is sent to each server in turn, over UDP
//! and again over TCP when the answer was truncated and the client asked over TCP.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use hickory_server::proto::op::{Edns, Message, MessageType, OpCode, Query};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// How often resolv.conf is looked at, at most.
const RECHECK: Duration = Duration::from_secs(5);

/// The buffer size advertised to upstream servers.
const UPSTREAM_PAYLOAD: u16 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream resolvers (none in {0})")]
    NoServers(String),
    #[error("every upstream resolver failed; last: {0}")]
    Failed(String),
}

/// The nameserver addresses of a resolv.conf.
pub fn parse_resolv_conf(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            // Link-local IPv6 servers carry a zone ("fe80::1%eth0"), which we cannot use.
            words.next()?.parse().ok()
        })
        .collect()
}

#[derive(Debug)]
struct Cached {
    servers: Vec<SocketAddr>,
    modified: Option<SystemTime>,
    checked: Option<Instant>,
}

/// The upstream resolvers.
#[derive(Debug)]
pub struct Upstream {
    resolv_conf: PathBuf,
    timeout: Duration,
    own: Mutex<Vec<SocketAddr>>,
    cache: Mutex<Cached>,
}

impl Upstream {
    pub fn new(resolv_conf: PathBuf, timeout: Duration) -> Upstream {
        Upstream {
            resolv_conf,
            timeout,
            own: Mutex::new(Vec::new()),
            cache: Mutex::new(Cached { servers: Vec::new(), modified: None, checked: None }),
        }
    }

    /// Our own listen addresses, never used as upstreams.
    pub fn set_own(&self, own: Vec<SocketAddr>) {
        if let Ok(mut o) = self.own.lock() {
            *o = own;
        }
        if let Ok(mut c) = self.cache.lock() {
            c.checked = None;
            c.modified = None;
        }
    }

    /// The servers now in use.
    pub fn servers(&self) -> Vec<SocketAddr> {
        let Ok(mut c) = self.cache.lock() else { return Vec::new() };
        if c.checked.is_some_and(|t| t.elapsed() < RECHECK) {
            return c.servers.clone();
        }
        c.checked = Some(Instant::now());
        let modified = std::fs::metadata(&self.resolv_conf).and_then(|m| m.modified()).ok();
        if modified.is_some() && modified == c.modified {
            return c.servers.clone();
        }
        c.modified = modified;
        let text = std::fs::read_to_string(&self.resolv_conf).unwrap_or_default();
        let own = self.own.lock().map(|o| o.clone()).unwrap_or_default();
        c.servers = parse_resolv_conf(&text)
            .into_iter()
            .map(|ip| SocketAddr::new(ip, 53))
            .filter(|s| !own.iter().any(|o| o == s || (o.ip().is_unspecified() && o.port() == 53)))
            .collect();
        tracing::info!(file = %self.resolv_conf.display(), servers = ?c.servers, "upstream resolvers");
        c.servers.clone()
    }

    /// Asks the upstream resolvers `query`; the reply has a fresh id that the caller replaces.
    pub async fn forward(
        &self,
        query: &Query,
        recursion_desired: bool,
        tcp: bool,
    ) -> Result<Message, ForwardError> {
        let servers = self.servers();
        if servers.is_empty() {
            return Err(ForwardError::NoServers(self.resolv_conf.display().to_string()));
        }
        let id: u16 = rand::random();
        let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
        msg.metadata.recursion_desired = recursion_desired;
        msg.add_query(query.clone());
        let mut edns = Edns::new();
        edns.set_max_payload(UPSTREAM_PAYLOAD);
        msg.set_edns(edns);
        let bytes = msg.to_vec().map_err(|e| ForwardError::Failed(e.to_string()))?;
        let mut last = String::new();
        for server in servers {
            match self.ask(server, &bytes, id, query, tcp).await {
                Ok(reply) => return Ok(reply),
                Err(e) => {
                    tracing::debug!(%server, error = %e, "upstream resolver failed");
                    last = format!("{server}: {e}");
                }
            }
        }
        Err(ForwardError::Failed(last))
    }

    async fn ask(
        &self,
        server: SocketAddr,
        bytes: &[u8],
        id: u16,
        query: &Query,
        tcp: bool,
    ) -> std::io::Result<Message> {
        let reply =
            tokio::time::timeout(self.timeout, ask_udp(server, bytes, id, query))
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
        if !(reply.metadata.truncation && tcp) {
            return Ok(reply);
        }
        tokio::time::timeout(self.timeout, ask_tcp(server, bytes))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer over TCP"))?
    }
}

fn invalid(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

async fn ask_udp(
    server: SocketAddr,
    bytes: &[u8],
    id: u16,
    query: &Query,
) -> std::io::Result<Message> {
    let local: SocketAddr = if server.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local).await?;
    sock.connect(server).await?;
    sock.send(bytes).await?;
    let mut buf = vec![0u8; usize::from(UPSTREAM_PAYLOAD)];
    loop {
        let n = sock.recv(&mut buf).await?;
        // Anything else on this socket is a stray or a spoofing attempt.
        let Ok(reply) = Message::from_vec(&buf[..n]) else { continue };
        if reply.metadata.id == id
            && reply.metadata.message_type == MessageType::Response
            && reply.queries.first() == Some(query)
        {
            return Ok(reply);
        }
    }
}

async fn ask_tcp(server: SocketAddr, bytes: &[u8]) -> std::io::Result<Message> {
    let mut stream = TcpStream::connect(server).await?;
    let len = u16::try_from(bytes.len()).map_err(invalid)?;
    let mut framed = Vec::with_capacity(bytes.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(bytes);
    stream.write_all(&framed).await?;
    let len = stream.read_u16().await?;
    let mut buf = vec![0u8; usize::from(len)];
    stream.read_exact(&mut buf).await?;
    Message::from_vec(&buf).map_err(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameservers_from_resolv_conf() {
        let text = "# comment\nsearch example.com\nnameserver 10.0.0.2\nnameserver  fd00::53 \n\
                    nameserver fe80::1%eth0\nnameserver\noptions ndots:5\nnameserver 1.1.1.1 # x\n";
        let want: Vec<IpAddr> =
            ["10.0.0.2", "fd00::53", "1.1.1.1"].iter().map(|s| s.parse().unwrap()).collect();
        assert_eq!(parse_resolv_conf(text), want);
    }

    #[test]
    fn own_addresses_are_never_upstreams() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        std::fs::write(&path, "nameserver 10.32.0.1\nnameserver 10.0.0.2\n").unwrap();
        let up = Upstream::new(path, Duration::from_secs(1));
        assert_eq!(up.servers().len(), 2);
        up.set_own(vec!["10.32.0.1:53".parse().unwrap()]);
        assert_eq!(up.servers(), vec!["10.0.0.2:53".parse::<SocketAddr>().unwrap()]);
    }
}
