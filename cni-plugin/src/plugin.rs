//! What each CNI command does: validate the invocation, turn it into a request to the agent
//! (through [`AgentPort`], so this logic is tested without an agent or a kernel) and turn the
//! agent's answer into the CNI result of the requested version.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ipnet::IpNet;
use weft_api::v1;

use crate::env::{Command, Invocation};
use crate::error::CniError;
use crate::types::{CniResult, Interface, IpEntry, NetConf, RouteEntry, VersionInfo};

/// The agent as the plugin needs it. Implementations map transport and agent errors to
/// [`CniError`] (see `agent.rs`).
pub trait AgentPort {
    /// ADD; may wait for the agent until `deadline`.
    fn add(
        &mut self,
        req: v1::CniAddRequest,
        deadline: Instant,
    ) -> impl Future<Output = Result<v1::CniAddReply, CniError>>;
    /// DEL; succeeds (possibly by queueing the request on disk) unless the agent rejects it.
    fn del(&mut self, req: v1::CniDelRequest) -> impl Future<Output = Result<(), CniError>>;
    fn check(&mut self, req: v1::CniCheckRequest) -> impl Future<Output = Result<(), CniError>>;
    fn status(&mut self) -> impl Future<Output = Result<v1::CniStatusReply, CniError>>;
    fn gc(&mut self, req: v1::CniGcRequest) -> impl Future<Output = Result<u32, CniError>>;
}

/// What the plugin prints on success.
#[derive(Debug, PartialEq)]
pub enum Output {
    Json(serde_json::Value),
    Nothing,
}

/// Checks a network namespace path the way ADD and CHECK need it.
pub trait NetnsProbe {
    fn check(&self, path: &Path) -> Result<(), CniError>;
}

/// Runs one CNI invocation. `make_agent` receives the configured socket path.
pub async fn run<A: AgentPort>(
    inv: &Invocation,
    stdin: &[u8],
    netns_probe: &impl NetnsProbe,
    make_agent: impl FnOnce(&Path) -> A,
) -> Result<Output, CniError> {
    if inv.command == Command::Version {
        let info = serde_json::to_value(VersionInfo::current())
            .map_err(|e| CniError::Io(e.to_string()))?;
        return Ok(Output::Json(info));
    }
    let conf = NetConf::parse(stdin)?;
    let mut agent = make_agent(&conf.socket);
    match inv.command {
        Command::Version => unreachable_version(),
        Command::Add => add(inv, &conf, netns_probe, &mut agent).await,
        Command::Del => del(inv, &conf, &mut agent).await,
        Command::Check => check(inv, &conf, netns_probe, &mut agent).await,
        Command::Status => status(&conf, &mut agent).await,
        Command::Gc => gc(&conf, &mut agent).await,
    }
}

// VERSION returns before the configuration is parsed.
fn unreachable_version() -> Result<Output, CniError> {
    Err(CniError::Io("VERSION handled earlier".into()))
}

fn netns_of(inv: &Invocation) -> Result<&PathBuf, CniError> {
    inv.netns.as_ref().ok_or(CniError::InvalidEnv { var: "CNI_NETNS", reason: "not set".into() })
}

fn address_requests(inv: &Invocation, conf: &NetConf) -> Vec<v1::AddressRequest> {
    use v1::address_request::Kind;
    let from_caps = conf.runtime_ips.iter().map(|net| Kind::StaticAddress((*net).into()));
    // A bare IP from CNI_ARGS carries no prefix: 0 asks the agent to use its subnet's.
    let from_args = inv.args.ips.iter().map(|ip| {
        Kind::StaticAddress(v1::IpNetwork { address: Some((*ip).into()), prefix_len: 0 })
    });
    from_caps.chain(from_args).map(|k| v1::AddressRequest { kind: Some(k) }).collect()
}

async fn add(
    inv: &Invocation,
    conf: &NetConf,
    probe: &impl NetnsProbe,
    agent: &mut impl AgentPort,
) -> Result<Output, CniError> {
    let netns = netns_of(inv)?;
    probe.check(netns)?;
    let deadline = Instant::now() + conf.ready_timeout;
    let req = v1::CniAddRequest {
        container_id: inv.container_id.clone(),
        ifname: inv.ifname.clone(),
        netns: netns.display().to_string(),
        network: conf.name.clone(),
        options: Some(v1::CniOptions { mtu: conf.mtu.unwrap_or(0), hairpin: conf.hairpin }),
        pod: pod_ref(inv),
        addresses: address_requests(inv, conf),
        wait_ready_ms: 0,
    };
    let reply = agent.add(req, deadline).await?;
    let result = result_from_reply(&reply, netns, conf)?;
    serde_json::to_value(result.for_version(conf.version))
        .map(Output::Json)
        .map_err(|e| CniError::Io(e.to_string()))
}

fn pod_ref(inv: &Invocation) -> Option<v1::PodRef> {
    let a = &inv.args;
    (a.pod_name.is_some() || a.pod_namespace.is_some()).then(|| v1::PodRef {
        namespace: a.pod_namespace.clone().unwrap_or_default(),
        name: a.pod_name.clone().unwrap_or_default(),
        uid: a.pod_uid.clone().unwrap_or_default(),
    })
}

fn wire_err(e: weft_api::WireError) -> CniError {
    CniError::Setup(format!("the agent sent a malformed reply: {e}"))
}

/// Builds the CNI result: interface 0 is the host end, 1 the container end.
fn result_from_reply(
    reply: &v1::CniAddReply,
    netns: &Path,
    conf: &NetConf,
) -> Result<CniResult, CniError> {
    let mtu = (reply.mtu > 0).then_some(reply.mtu);
    let interfaces = vec![
        Interface {
            name: reply.host_ifname.clone(),
            mac: reply.host_mac.clone(),
            mtu,
            sandbox: None,
        },
        Interface {
            name: reply.container_ifname.clone(),
            mac: reply.container_mac.clone(),
            mtu,
            sandbox: Some(netns.display().to_string()),
        },
    ];
    let ips = reply
        .ips
        .iter()
        .map(|ip| {
            let address = IpNet::try_from(
                ip.address
                    .as_ref()
                    .ok_or_else(|| wire_err(weft_api::WireError::Missing("address")))?,
            )
            .map_err(wire_err)?;
            let gateway =
                ip.gateway.as_ref().map(IpAddr::try_from).transpose().map_err(wire_err)?;
            Ok(IpEntry { version: None, interface: Some(1), address, gateway })
        })
        .collect::<Result<Vec<_>, CniError>>()?;
    let routes = reply
        .routes
        .iter()
        .map(|r| {
            let dst = IpNet::try_from(
                r.destination
                    .as_ref()
                    .ok_or_else(|| wire_err(weft_api::WireError::Missing("destination")))?,
            )
            .map_err(wire_err)?;
            let gw = r.gateway.as_ref().map(IpAddr::try_from).transpose().map_err(wire_err)?;
            Ok(RouteEntry { dst, gw })
        })
        .collect::<Result<Vec<_>, CniError>>()?;
    Ok(CniResult { cni_version: String::new(), interfaces, ips, routes, dns: conf.dns.clone() })
}

async fn del(
    inv: &Invocation,
    conf: &NetConf,
    agent: &mut impl AgentPort,
) -> Result<Output, CniError> {
    let req = v1::CniDelRequest {
        container_id: inv.container_id.clone(),
        ifname: inv.ifname.clone(),
        netns: inv.netns.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        network: conf.name.clone(),
    };
    agent.del(req).await?;
    Ok(Output::Nothing)
}

async fn check(
    inv: &Invocation,
    conf: &NetConf,
    probe: &impl NetnsProbe,
    agent: &mut impl AgentPort,
) -> Result<Output, CniError> {
    if !conf.version.has_check() {
        return Err(CniError::IncompatibleVersion(format!(
            "CHECK is not defined for cniVersion {}",
            conf.version.as_str()
        )));
    }
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| CniError::InvalidConfig("CHECK requires prevResult".into()))?;
    let prev = CniResult::from_prev(prev)?;
    let netns = netns_of(inv)?;
    probe.check(netns)?;
    let req = v1::CniCheckRequest {
        container_id: inv.container_id.clone(),
        ifname: inv.ifname.clone(),
        netns: netns.display().to_string(),
        network: conf.name.clone(),
        expected: prev.ips.iter().map(|ip| ip.address.into()).collect(),
    };
    agent.check(req).await?;
    Ok(Output::Nothing)
}

fn require_v11(conf: &NetConf, what: &str) -> Result<(), CniError> {
    if conf.version.has_status_and_gc() {
        Ok(())
    } else {
        Err(CniError::IncompatibleVersion(format!(
            "{what} is defined from cniVersion 1.1.0 on; the configuration says {}",
            conf.version.as_str()
        )))
    }
}

async fn status(conf: &NetConf, agent: &mut impl AgentPort) -> Result<Output, CniError> {
    require_v11(conf, "STATUS")?;
    let reply = agent.status().await?;
    if reply.ready { Ok(Output::Nothing) } else { Err(CniError::NotAvailable(reply.reason)) }
}

async fn gc(conf: &NetConf, agent: &mut impl AgentPort) -> Result<Output, CniError> {
    require_v11(conf, "GC")?;
    let valid = conf
        .valid_attachments
        .as_ref()
        .ok_or_else(|| CniError::InvalidConfig("GC requires cni.dev/valid-attachments".into()))?;
    let req = v1::CniGcRequest {
        network: conf.name.clone(),
        valid: valid
            .iter()
            .map(|a| v1::Attachment {
                container_id: a.container_id.clone(),
                ifname: a.ifname.clone(),
            })
            .collect(),
    };
    agent.gc(req).await?;
    Ok(Output::Nothing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::CniArgs;
    use crate::types::CniVersion;

    #[derive(Default)]
    struct FakeAgent {
        adds: Vec<v1::CniAddRequest>,
        dels: Vec<v1::CniDelRequest>,
        checks: Vec<v1::CniCheckRequest>,
        gcs: Vec<v1::CniGcRequest>,
        ready: bool,
    }

    impl AgentPort for &mut FakeAgent {
        async fn add(
            &mut self,
            req: v1::CniAddRequest,
            _: Instant,
        ) -> Result<v1::CniAddReply, CniError> {
            self.adds.push(req);
            Ok(v1::CniAddReply {
                host_ifname: "wfe0123".into(),
                host_mac: "02:00:00:00:00:01".into(),
                container_ifname: "eth0".into(),
                container_mac: "02:00:00:00:00:02".into(),
                mtu: 1450,
                ips: vec![v1::IpConfig {
                    address: Some("10.32.0.2/12".parse::<IpNet>().unwrap().into()),
                    gateway: Some("10.32.0.1".parse::<IpAddr>().unwrap().into()),
                }],
                routes: vec![v1::Route {
                    destination: Some("0.0.0.0/0".parse::<IpNet>().unwrap().into()),
                    gateway: Some("10.32.0.1".parse::<IpAddr>().unwrap().into()),
                }],
            })
        }
        async fn del(&mut self, req: v1::CniDelRequest) -> Result<(), CniError> {
            self.dels.push(req);
            Ok(())
        }
        async fn check(&mut self, req: v1::CniCheckRequest) -> Result<(), CniError> {
            self.checks.push(req);
            Ok(())
        }
        async fn status(&mut self) -> Result<v1::CniStatusReply, CniError> {
            Ok(v1::CniStatusReply { ready: self.ready, reason: "starting".into() })
        }
        async fn gc(&mut self, req: v1::CniGcRequest) -> Result<u32, CniError> {
            self.gcs.push(req);
            Ok(0)
        }
    }

    struct AnyNetns;
    impl NetnsProbe for AnyNetns {
        fn check(&self, _: &Path) -> Result<(), CniError> {
            Ok(())
        }
    }
    struct NoNetns;
    impl NetnsProbe for NoNetns {
        fn check(&self, p: &Path) -> Result<(), CniError> {
            Err(CniError::InvalidEnv {
                var: "CNI_NETNS",
                reason: format!("{} does not exist", p.display()),
            })
        }
    }

    fn inv(command: Command) -> Invocation {
        Invocation {
            command,
            container_id: "c1".into(),
            ifname: "eth0".into(),
            netns: Some("/run/netns/x".into()),
            args: CniArgs { ips: vec!["10.32.0.9".parse().unwrap()], ..CniArgs::default() },
        }
    }

    fn conf(v: CniVersion, extra: &str) -> Vec<u8> {
        format!(r#"{{"cniVersion":"{}","name":"weft","type":"weft-cni","dns":{{"nameservers":["10.32.0.1"]}}{extra}}}"#, v.as_str())
            .into_bytes()
    }

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    #[test]
    fn add_returns_the_result_in_the_requested_version() {
        for v in CniVersion::ALL {
            let mut agent = FakeAgent::default();
            let out =
                block_on(run(&inv(Command::Add), &conf(v, ""), &AnyNetns, |_| &mut agent)).unwrap();
            let Output::Json(json) = out else { panic!("no result") };
            assert_eq!(json["cniVersion"], v.as_str());
            assert_eq!(json["ips"][0]["address"], "10.32.0.2/12");
            assert_eq!(json["ips"][0]["interface"], 1);
            assert_eq!(json["interfaces"][1]["sandbox"], "/run/netns/x");
            assert_eq!(json["dns"]["nameservers"][0], "10.32.0.1");
            let req = &agent.adds[0];
            assert_eq!(req.network, "weft");
            assert_eq!(req.addresses.len(), 1, "IP= from CNI_ARGS is passed on");
        }
    }

    #[test]
    fn add_with_a_missing_netns_fails_before_asking_the_agent() {
        let mut agent = FakeAgent::default();
        let err =
            block_on(run(&inv(Command::Add), &conf(CniVersion::V1_0_0, ""), &NoNetns, |_| {
                &mut agent
            }))
            .unwrap_err();
        assert_eq!(err.code(), 4);
        assert!(agent.adds.is_empty());
    }

    #[test]
    fn check_needs_0_4_and_a_prev_result() {
        let mut agent = FakeAgent::default();
        let err =
            block_on(run(&inv(Command::Check), &conf(CniVersion::V0_3_1, ""), &AnyNetns, |_| {
                &mut agent
            }))
            .unwrap_err();
        assert_eq!(err.code(), 1);
        let err =
            block_on(run(&inv(Command::Check), &conf(CniVersion::V1_0_0, ""), &AnyNetns, |_| {
                &mut agent
            }))
            .unwrap_err();
        assert_eq!(err.code(), 7);
        let prev = r#","prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.32.0.2/12"}]}"#;
        block_on(run(&inv(Command::Check), &conf(CniVersion::V1_0_0, prev), &AnyNetns, |_| {
            &mut agent
        }))
        .unwrap();
        assert_eq!(agent.checks[0].expected.len(), 1);
    }

    #[test]
    fn status_and_gc_need_1_1() {
        let mut agent = FakeAgent::default();
        for c in [Command::Status, Command::Gc] {
            let err =
                block_on(run(&inv(c), &conf(CniVersion::V1_0_0, ""), &AnyNetns, |_| &mut agent))
                    .unwrap_err();
            assert_eq!(err.code(), 1);
        }
        let err =
            block_on(run(&inv(Command::Status), &conf(CniVersion::V1_1_0, ""), &AnyNetns, |_| {
                &mut agent
            }))
            .unwrap_err();
        assert_eq!(err.code(), 50);
        agent.ready = true;
        let out =
            block_on(run(&inv(Command::Status), &conf(CniVersion::V1_1_0, ""), &AnyNetns, |_| {
                &mut agent
            }));
        assert_eq!(out.unwrap(), Output::Nothing);
        let err =
            block_on(run(&inv(Command::Gc), &conf(CniVersion::V1_1_0, ""), &AnyNetns, |_| {
                &mut agent
            }))
            .unwrap_err();
        assert_eq!(err.code(), 7, "GC without valid-attachments must not release everything");
        let valid = r#","cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"}]"#;
        block_on(run(&inv(Command::Gc), &conf(CniVersion::V1_1_0, valid), &AnyNetns, |_| {
            &mut agent
        }))
        .unwrap();
        assert_eq!(agent.gcs[0].valid[0].container_id, "c1");
    }

    #[test]
    fn del_prints_nothing_and_tolerates_no_netns() {
        let mut agent = FakeAgent::default();
        let mut i = inv(Command::Del);
        i.netns = None;
        let out =
            block_on(run(&i, &conf(CniVersion::V0_3_0, ""), &NoNetns, |_| &mut agent)).unwrap();
        assert_eq!(out, Output::Nothing);
        assert_eq!(agent.dels[0].netns, "");
    }

    #[test]
    fn version_ignores_stdin() {
        let mut agent = FakeAgent::default();
        let out = block_on(run(&inv(Command::Version), b"", &AnyNetns, |_| &mut agent)).unwrap();
        let Output::Json(json) = out else { panic!() };
        assert_eq!(json["supportedVersions"].as_array().unwrap().len(), 5);
    }
}
