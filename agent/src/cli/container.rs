//! Docker containers as targets of `weft attach`, `weft detach` and `weft ps`, as Weave's CLI
//! took them: an operand that is not an address names a container (name, id or unique id
//! prefix), looked up through the Docker API (`--docker-socket`). Telling operands apart
//! ([`split_operands`]) and turning a container into an endpoint ([`attachment`]) are pure;
//! the lookup sits behind [`DockerApi`].

use std::path::PathBuf;

use crate::addr::AddrRequest;
use crate::docker::names::{ApiError, Container, DockerApi};

/// The endpoint id prefix of containers attached by name (`docker-cli:<container id>`);
/// Docker's own driver uses `docker:<address>`.
pub const ATTACH_PREFIX: &str = "docker-cli:";

/// The default `--docker-socket`.
pub const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// Why a container operand could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error(
        "{0:?} is not an address (ADDRESS/PREFIX, ip:…, net:…); only one operand may name a container"
    )]
    TwoContainers(String),
    #[error("{operand:?} is not an address; with {flag}, every operand is an address")]
    NotAnAddress { operand: String, flag: &'static str },
    #[error("{0}")]
    BadAddress(String),
    #[error("no such container {0} (see docker ps -a)")]
    NoSuch(String),
    #[error("container {0} is not running; start it first (docker start {0})")]
    NotRunning(String),
    #[error("{0}")]
    Api(#[from] ApiError),
}

/// The operands of attach/detach: at most one container and the addresses.
#[derive(Debug, PartialEq, Eq)]
pub struct Operands {
    pub container: Option<String>,
    pub addrs: Vec<AddrRequest>,
}

/// Splits the operands. Every address form has a `/` or a `:` (`10.2.1.1/24`, `ip:…`,
/// `net:…`) and a Docker container name or id never does, so an operand with neither names a
/// container; with `flag` (`--netns`, `--id`) given none may.
pub fn split_operands(
    operands: &[String],
    flag: Option<&'static str>,
) -> Result<Operands, ContainerError> {
    let mut out = Operands { container: None, addrs: Vec::new() };
    for op in operands {
        if op.contains('/') || op.contains(':') {
            out.addrs.push(op.parse().map_err(ContainerError::BadAddress)?);
        } else if let Some(flag) = flag {
            return Err(ContainerError::NotAnAddress { operand: op.clone(), flag });
        } else if out.container.is_some() {
            return Err(ContainerError::TwoContainers(op.clone()));
        } else {
            out.container = Some(op.clone());
        }
    }
    Ok(out)
}

/// The endpoint id of a container attached by name.
pub fn endpoint_id(container_id: &str) -> String {
    format!("{ATTACH_PREFIX}{container_id}")
}

/// What `weft attach CONTAINER` gives the agent.
#[derive(Debug, PartialEq, Eq)]
pub struct Attachment {
    pub netns: PathBuf,
    pub id: String,
    pub name: String,
}

/// The endpoint of a running container: its network namespace, its id, and its name as the
/// DNS name. The namespace is dockerd's bind mount of it (the agent may open that: it keeps
/// no CAP_SYS_PTRACE, which `/proc/PID/ns/net` of a process with more capabilities needs, and
/// the mount goes when the container stops, which reconciliation takes as the endpoint
/// gone); `/proc/PID/ns/net` only when Docker has none (`--network container:…`).
pub fn attachment(given: &str, c: &Container) -> Result<Attachment, ContainerError> {
    let pid = c.pid.ok_or_else(|| ContainerError::NotRunning(given.to_owned()))?;
    Ok(Attachment {
        netns: c.sandbox.clone().unwrap_or_else(|| PathBuf::from(format!("/proc/{pid}/ns/net"))),
        id: endpoint_id(&c.id),
        name: c.name.clone(),
    })
}

/// The container `given` names.
pub async fn lookup(api: &impl DockerApi, given: &str) -> Result<Container, ContainerError> {
    api.container(given).await?.ok_or_else(|| ContainerError::NoSuch(given.to_owned()))
}

/// Whether the endpoint `(id, kind, hostname)` of `weft ps` belongs to container `c`:
/// attached by name, or made by Docker's driver (named after the container).
pub fn belongs_to(id: &str, docker_kind: bool, hostname: &str, c: &Container) -> bool {
    id == endpoint_id(&c.id) || (docker_kind && hostname == c.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_container_is_any_operand_that_is_not_an_address() {
        let o = split_operands(&ops(&["web", "10.2.1.9/24", "net:10.2.3.0/24"]), None).unwrap();
        assert_eq!(o.container.as_deref(), Some("web"));
        assert_eq!(o.addrs.len(), 2);
        // Weave's order (addresses first) works too.
        let o = split_operands(&ops(&["ip:10.2.1.9/24", "c0ffee"]), None).unwrap();
        assert_eq!(o.container.as_deref(), Some("c0ffee"));
        let o = split_operands(&ops(&["10.2.1.9/24"]), None).unwrap();
        assert_eq!(o.container, None);
    }

    #[test]
    fn bad_operands_say_what_is_wrong() {
        let e = split_operands(&ops(&["web", "db"]), None).unwrap_err();
        assert!(e.to_string().contains("only one operand may name a container"), "{e}");
        let e = split_operands(&ops(&["web"]), Some("--netns")).unwrap_err();
        assert!(e.to_string().contains("with --netns, every operand is an address"), "{e}");
        // Malformed addresses are reported as such, not looked up as containers.
        let e = split_operands(&ops(&["net:10.2.3.5/24"]), None).unwrap_err();
        assert!(e.to_string().contains("did you mean net:10.2.3.0/24"), "{e}");
    }

    fn c(pid: Option<u32>) -> Container {
        Container { id: "c0ffee00".into(), name: "plain".into(), pid, ..Container::default() }
    }

    #[test]
    fn a_running_container_becomes_an_endpoint() {
        let sandbox = PathBuf::from("/var/run/docker/netns/ed2af6095a83");
        let with = Container { sandbox: Some(sandbox.clone()), ..c(Some(42)) };
        assert_eq!(attachment("plain", &with).unwrap().netns, sandbox);
        let a = attachment("plain", &c(Some(42))).unwrap();
        assert_eq!(a.netns, PathBuf::from("/proc/42/ns/net"));
        assert_eq!(a.id, "docker-cli:c0ffee00");
        assert_eq!(a.name, "plain");
        let e = attachment("c0f", &c(None)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "container c0f is not running; start it first (docker start c0f)"
        );
    }

    #[test]
    fn ps_matches_both_kinds_of_docker_endpoints() {
        let x = c(Some(1));
        assert!(belongs_to("docker-cli:c0ffee00", false, "plain", &x));
        assert!(belongs_to("docker:10.2.1.5", true, "plain", &x));
        assert!(!belongs_to("docker:10.2.1.6", true, "other", &x));
        assert!(!belongs_to("/run/netns/x", false, "plain", &x));
    }

    struct Fake(Vec<Container>);

    #[async_trait::async_trait]
    impl DockerApi for Fake {
        async fn endpoint_container(
            &self,
            _: &str,
            _: &str,
        ) -> Result<Option<Container>, ApiError> {
            Ok(None)
        }
        async fn container(&self, name: &str) -> Result<Option<Container>, ApiError> {
            Ok(self.0.iter().find(|c| c.name == name || c.id.starts_with(name)).cloned())
        }
        async fn ensure_network(&self, _: &str) -> Result<bool, ApiError> {
            Ok(false)
        }
        async fn weft_endpoints(
            &self,
        ) -> Result<Vec<crate::docker::names::DockerEndpoint>, ApiError> {
            Ok(Vec::new())
        }
    }

    #[tokio::test]
    async fn containers_are_found_by_name_or_id() {
        let api = Fake(vec![c(Some(42))]);
        assert_eq!(lookup(&api, "plain").await.unwrap().id, "c0ffee00");
        assert_eq!(lookup(&api, "c0ff").await.unwrap().name, "plain");
        let e = lookup(&api, "nope").await.unwrap_err();
        assert_eq!(e.to_string(), "no such container nope (see docker ps -a)");
    }
}
