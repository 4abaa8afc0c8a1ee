//! The CNI invocation from the environment (`CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`,
//! `CNI_IFNAME`, `CNI_ARGS`), validated per command as the specification requires. Pure: the
//! environment is passed in as a lookup function.

use std::net::IpAddr;
use std::path::PathBuf;

use crate::error::CniError;

/// The CNI operation requested.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    fn parse(s: &str) -> Result<Command, CniError> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            other => {
                return Err(CniError::InvalidEnv {
                    var: "CNI_COMMAND",
                    reason: format!("{other:?} is not one of ADD, DEL, CHECK, VERSION, STATUS, GC"),
                });
            }
        })
    }
}

/// Runtime arguments from `CNI_ARGS` that weft uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    /// `IP=a.b.c.d[,...]`: static addresses (the host-local convention).
    pub ips: Vec<IpAddr>,
}

impl CniArgs {
    /// Parses `K=V;K=V`. Unknown keys are an error unless `IgnoreUnknown` is true, as the
    /// reference plugins do.
    pub fn parse(s: &str) -> Result<CniArgs, CniError> {
        let invalid = |reason: String| CniError::InvalidEnv { var: "CNI_ARGS", reason };
        let pairs: Vec<(&str, &str)> = s
            .split(';')
            .filter(|p| !p.is_empty())
            .map(|p| p.split_once('=').ok_or_else(|| invalid(format!("{p:?} is not KEY=VALUE"))))
            .collect::<Result<_, _>>()?;
        let ignore_unknown = pairs.iter().any(|(k, v)| {
            *k == "IgnoreUnknown" && matches!(v.to_ascii_lowercase().as_str(), "1" | "true")
        });
        let mut args = CniArgs::default();
        for (k, v) in pairs {
            match k {
                "IgnoreUnknown" => {}
                "K8S_POD_NAMESPACE" => args.pod_namespace = Some(v.to_owned()),
                "K8S_POD_NAME" => args.pod_name = Some(v.to_owned()),
                "K8S_POD_UID" => args.pod_uid = Some(v.to_owned()),
                "IP" => {
                    for ip in v.split(',').filter(|s| !s.is_empty()) {
                        args.ips.push(
                            ip.parse()
                                .map_err(|_| invalid(format!("IP={ip:?} is not an address")))?,
                        );
                    }
                }
                _ if ignore_unknown => {}
                _ => return Err(invalid(format!("unknown argument {k:?} (set IgnoreUnknown=1)"))),
            }
        }
        Ok(args)
    }
}

/// A validated invocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    pub command: Command,
    /// Present for ADD, DEL and CHECK.
    pub container_id: String,
    pub ifname: String,
    /// ADD and CHECK: always present. DEL: may be absent (namespace already gone).
    pub netns: Option<PathBuf>,
    pub args: CniArgs,
}

impl Invocation {
    /// Reads and validates the environment.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Invocation, CniError> {
        let get = |name: &'static str| var(name).filter(|v| !v.is_empty());
        let missing = |var: &'static str| CniError::InvalidEnv { var, reason: "not set".into() };
        let command = Command::parse(&get("CNI_COMMAND").ok_or(missing("CNI_COMMAND"))?)?;
        let mut inv = Invocation {
            command,
            container_id: String::new(),
            ifname: String::new(),
            netns: None,
            args: CniArgs::default(),
        };
        if !matches!(command, Command::Add | Command::Del | Command::Check) {
            return Ok(inv);
        }
        inv.container_id = get("CNI_CONTAINERID").ok_or(missing("CNI_CONTAINERID"))?;
        validate_container_id(&inv.container_id)?;
        inv.ifname = get("CNI_IFNAME").ok_or(missing("CNI_IFNAME"))?;
        validate_ifname(&inv.ifname)?;
        inv.netns = get("CNI_NETNS").map(PathBuf::from);
        if inv.netns.is_none() && command != Command::Del {
            return Err(missing("CNI_NETNS"));
        }
        if get("CNI_PATH").is_none() && command != Command::Del {
            return Err(missing("CNI_PATH"));
        }
        inv.args = CniArgs::parse(&get("CNI_ARGS").unwrap_or_default())?;
        Ok(inv)
    }
}

/// The specification's rule: starts with an alphanumeric, then alphanumerics, `_`, `.`, `-`.
fn validate_container_id(id: &str) -> Result<(), CniError> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        Ok(())
    } else {
        Err(CniError::InvalidEnv {
            var: "CNI_CONTAINERID",
            reason: format!("{id:?} must be alphanumeric, '_', '.' or '-', starting alphanumeric"),
        })
    }
}

/// A Linux interface name: 1-15 bytes, not "." or "..", no '/', ':' or whitespace.
pub fn validate_ifname(name: &str) -> Result<(), CniError> {
    if weft_api::is_valid_ifname(name) {
        Ok(())
    } else {
        Err(CniError::InvalidEnv {
            var: "CNI_IFNAME",
            reason: format!(
                "{name:?} is not a valid interface name (1-15 characters, no '/', ':' or spaces)"
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> =
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        move |k| map.get(k).cloned()
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", "/run/netns/x"),
        ("CNI_PATH", "/opt/cni/bin"),
    ];

    #[test]
    fn add_needs_every_variable() {
        let inv = Invocation::from_env(env(ADD)).unwrap();
        assert_eq!(inv.command, Command::Add);
        assert_eq!(inv.netns, Some(PathBuf::from("/run/netns/x")));
        for skip in ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS", "CNI_PATH"] {
            let partial: Vec<_> = ADD.iter().copied().filter(|(k, _)| *k != skip).collect();
            let err = Invocation::from_env(env(&partial)).unwrap_err();
            assert_eq!(err.code(), 4);
            assert!(err.to_string().contains(skip), "{err}");
        }
    }

    #[test]
    fn del_tolerates_a_missing_netns() {
        let vars: Vec<_> = ADD
            .iter()
            .copied()
            .filter(|(k, _)| *k != "CNI_NETNS" && *k != "CNI_PATH")
            .map(|(k, v)| if k == "CNI_COMMAND" { (k, "DEL") } else { (k, v) })
            .collect();
        let inv = Invocation::from_env(env(&vars)).unwrap();
        assert_eq!(inv.command, Command::Del);
        assert_eq!(inv.netns, None);
    }

    #[test]
    fn version_status_gc_need_only_the_command() {
        for c in ["VERSION", "STATUS", "GC"] {
            assert!(Invocation::from_env(env(&[("CNI_COMMAND", c)])).is_ok());
        }
        assert_eq!(Invocation::from_env(env(&[("CNI_COMMAND", "FOO")])).unwrap_err().code(), 4);
    }

    #[test]
    fn bad_ids_and_names_are_rejected() {
        for id in ["-x", "a/b", "a b", "é"] {
            assert!(validate_container_id(id).is_err(), "{id}");
        }
        for name in ["", ".", "..", "a/b", "eth:0", "0123456789abcdef", "a b"] {
            assert!(validate_ifname(name).is_err(), "{name}");
        }
        assert!(validate_ifname("eth0").is_ok());
        assert!(validate_container_id("a_b.c-1").is_ok());
    }

    #[test]
    fn cni_args() {
        let a = CniArgs::parse(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=x;IP=10.32.0.9",
        )
        .unwrap();
        assert_eq!(a.pod_name.as_deref(), Some("web"));
        assert_eq!(a.pod_namespace.as_deref(), Some("default"));
        assert_eq!(a.ips, vec!["10.32.0.9".parse::<IpAddr>().unwrap()]);
        assert_eq!(CniArgs::parse("FOO=1").unwrap_err().code(), 4);
        assert_eq!(CniArgs::parse("IP=notanip;IgnoreUnknown=1").unwrap_err().code(), 4);
        assert_eq!(CniArgs::parse("novalue").unwrap_err().code(), 4);
        assert_eq!(CniArgs::parse("").unwrap(), CniArgs::default());
    }
}
