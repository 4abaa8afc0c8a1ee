//! CNI specification types: supported versions, weft's network configuration, and results in
//! every supported result format. Pure data and parsing; no I/O.

use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::error::CniError;

/// The plugin type name that the network configuration must carry.
pub const PLUGIN_TYPE: &str = "weft-cni";

/// A CNI specification version this plugin speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl CniVersion {
    /// Every supported version, oldest first.
    pub const ALL: [CniVersion; 5] = [
        CniVersion::V0_3_0,
        CniVersion::V0_3_1,
        CniVersion::V0_4_0,
        CniVersion::V1_0_0,
        CniVersion::V1_1_0,
    ];
    /// The newest supported version, used where no version is known (e.g. undecodable input).
    pub const LATEST: CniVersion = CniVersion::V1_1_0;

    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_3_0 => "0.3.0",
            CniVersion::V0_3_1 => "0.3.1",
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }

    pub fn parse(s: &str) -> Result<CniVersion, CniError> {
        CniVersion::ALL.into_iter().find(|v| v.as_str() == s).ok_or_else(|| {
            CniError::IncompatibleVersion(format!(
                "cniVersion {s:?} is not supported; supported versions: {}",
                CniVersion::ALL.map(CniVersion::as_str).join(", ")
            ))
        })
    }

    /// CHECK exists from 0.4.0 on.
    pub fn has_check(self) -> bool {
        self >= CniVersion::V0_4_0
    }

    /// STATUS and GC exist from 1.1.0 on.
    pub fn has_status_and_gc(self) -> bool {
        self >= CniVersion::V1_1_0
    }

    /// Results before 1.0.0 tag each IP with "version": "4" | "6".
    fn ips_carry_family(self) -> bool {
        self < CniVersion::V1_0_0
    }
}

/// DNS settings passed through from the configuration into the result.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    fn is_empty(&self) -> bool {
        self == &Dns::default()
    }
}

/// One attachment named in a GC request's `cni.dev/valid-attachments`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRuntimeConfig {
    #[serde(default)]
    ips: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawNetConf {
    cni_version: Option<String>,
    name: Option<String>,
    #[serde(rename = "type")]
    plugin_type: Option<String>,
    socket: Option<PathBuf>,
    mtu: Option<u32>,
    hairpin_mode: Option<bool>,
    ipam: Option<serde_json::Value>,
    #[serde(default)]
    dns: Dns,
    #[serde(default)]
    runtime_config: RawRuntimeConfig,
    prev_result: Option<serde_json::Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<ValidAttachment>>,
    ready_timeout_seconds: Option<u32>,
}

/// A validated weft network configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct NetConf {
    pub version: CniVersion,
    pub name: String,
    /// The agent's socket.
    pub socket: PathBuf,
    /// Pod interface MTU override; `None` means the agent's derived overlay MTU.
    pub mtu: Option<u32>,
    pub hairpin: bool,
    pub dns: Dns,
    /// Static addresses requested through the `ips` capability.
    pub runtime_ips: Vec<IpNet>,
    /// The result of the previous plugin (CHECK, DEL, chained ADD).
    pub prev_result: Option<serde_json::Value>,
    /// GC only: attachments the runtime still uses.
    pub valid_attachments: Option<Vec<ValidAttachment>>,
    /// How long ADD waits for the agent to be up and ready.
    pub ready_timeout: std::time::Duration,
}

/// Default for `readyTimeoutSeconds`.
pub const DEFAULT_READY_TIMEOUT_SECS: u32 = 10;

impl NetConf {
    /// Parses and validates the configuration read from stdin.
    ///
    /// Malformed JSON is a decoding failure (code 6); JSON of the wrong shape, a missing or
    /// unknown field value is an invalid configuration (7); an unsupported `cniVersion` is 1.
    pub fn parse(bytes: &[u8]) -> Result<NetConf, CniError> {
        let raw: RawNetConf = serde_json::from_slice(bytes).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => CniError::InvalidConfig(e.to_string()),
            _ => CniError::Decode(e.to_string()),
        })?;
        let version = CniVersion::parse(
            raw.cni_version
                .as_deref()
                .ok_or_else(|| CniError::InvalidConfig("cniVersion is missing".into()))?,
        )?;
        let name = raw.name.filter(|n| !n.is_empty()).ok_or_else(|| {
            CniError::InvalidConfig("name is missing (the network name of the conflist)".into())
        })?;
        match raw.plugin_type.as_deref() {
            Some(PLUGIN_TYPE) => {}
            other => {
                return Err(CniError::InvalidConfig(format!(
                    "type is {other:?}; this plugin is {PLUGIN_TYPE:?}"
                )));
            }
        }
        if let Some(ipam) = &raw.ipam {
            let typed = ipam.get("type").and_then(|t| t.as_str()).is_some_and(|t| !t.is_empty());
            if typed {
                return Err(CniError::InvalidConfig(
                    "ipam: weft allocates addresses itself; remove the ipam section".into(),
                ));
            }
        }
        if let Some(mtu) = raw.mtu {
            if !(576..=65535).contains(&mtu) {
                return Err(CniError::InvalidConfig(format!(
                    "mtu {mtu} out of range (576..=65535)"
                )));
            }
        }
        let socket = raw.socket.unwrap_or_else(|| PathBuf::from(weft_api::DEFAULT_SOCKET));
        if !socket.is_absolute() {
            return Err(CniError::InvalidConfig(format!(
                "socket {} must be an absolute path",
                socket.display()
            )));
        }
        let runtime_ips = raw
            .runtime_config
            .ips
            .iter()
            .map(|s| {
                s.parse::<IpNet>().map_err(|_| {
                    CniError::InvalidConfig(format!(
                        "runtimeConfig.ips: {s:?} is not an address/prefix"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let timeout = raw.ready_timeout_seconds.unwrap_or(DEFAULT_READY_TIMEOUT_SECS);
        Ok(NetConf {
            version,
            name,
            socket,
            mtu: raw.mtu,
            hairpin: raw.hairpin_mode.unwrap_or(false),
            dns: raw.dns,
            runtime_ips,
            prev_result: raw.prev_result,
            valid_attachments: raw.valid_attachments,
            ready_timeout: std::time::Duration::from_secs(u64::from(timeout)),
        })
    }

    /// The version to report errors in when even parsing failed: the input's `cniVersion`
    /// when it is readable and supported, the newest otherwise.
    pub fn version_hint(bytes: &[u8]) -> CniVersion {
        #[derive(Deserialize)]
        struct V {
            #[serde(rename = "cniVersion")]
            cni_version: String,
        }
        serde_json::from_slice::<V>(bytes)
            .ok()
            .and_then(|v| CniVersion::parse(&v.cni_version).ok())
            .unwrap_or(CniVersion::LATEST)
    }
}

/// An interface in a result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default)]
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

/// An IP configuration in a result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
}

/// A route in a result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteEntry {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

/// A CNI result (ADD output, prevResult), in any supported version's format.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteEntry>,
    #[serde(default, skip_serializing_if = "Dns::is_empty")]
    pub dns: Dns,
}

impl CniResult {
    /// Rewrites the result into the format of `version`: IP families tagged before 1.0.0,
    /// interface MTUs only from 1.1.0 on.
    pub fn for_version(mut self, version: CniVersion) -> CniResult {
        self.cni_version = version.as_str().to_owned();
        for ip in &mut self.ips {
            ip.version = version
                .ips_carry_family()
                .then(|| if ip.address.addr().is_ipv4() { "4" } else { "6" }.to_owned());
        }
        if version < CniVersion::V1_1_0 {
            for iface in &mut self.interfaces {
                iface.mtu = None;
            }
        }
        self
    }

    /// Parses a prevResult of any supported version.
    pub fn from_prev(value: &serde_json::Value) -> Result<CniResult, CniError> {
        serde_json::from_value(value.clone())
            .map_err(|e| CniError::InvalidConfig(format!("prevResult: {e}")))
    }
}

/// The output of VERSION.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionInfo {
    pub cni_version: &'static str,
    pub supported_versions: Vec<&'static str>,
}

impl VersionInfo {
    pub fn current() -> VersionInfo {
        VersionInfo {
            cni_version: CniVersion::LATEST.as_str(),
            supported_versions: CniVersion::ALL.map(CniVersion::as_str).to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn conf(version: &str) -> String {
        format!(r#"{{"cniVersion":"{version}","name":"weft","type":"weft-cni"}}"#)
    }

    #[test]
    fn every_supported_version_parses() {
        for v in CniVersion::ALL {
            let c = NetConf::parse(conf(v.as_str()).as_bytes()).unwrap();
            assert_eq!(c.version, v);
            assert_eq!(c.socket, PathBuf::from(weft_api::DEFAULT_SOCKET));
            assert!(!c.hairpin);
        }
    }

    #[test]
    fn unknown_versions_are_code_1() {
        for v in ["0.1.0", "0.2.0", "1.2.0", "2.0.0", ""] {
            let err = NetConf::parse(conf(v).as_bytes()).unwrap_err();
            assert_eq!(err.code(), 1, "{v}: {err}");
        }
    }

    #[test]
    fn malformed_json_is_code_6_and_wrong_shape_is_code_7() {
        assert_eq!(NetConf::parse(b"{not json").unwrap_err().code(), 6);
        assert_eq!(NetConf::parse(b"").unwrap_err().code(), 6);
        let wrong = br#"{"cniVersion":"1.0.0","name":"weft","type":"weft-cni","mtu":"big"}"#;
        assert_eq!(NetConf::parse(wrong).unwrap_err().code(), 7);
        assert_eq!(NetConf::parse(b"[1,2]").unwrap_err().code(), 7);
    }

    #[test]
    fn config_validation() {
        let bad = [
            r#"{"cniVersion":"1.0.0","type":"weft-cni"}"#,
            r#"{"cniVersion":"1.0.0","name":"w","type":"bridge"}"#,
            r#"{"cniVersion":"1.0.0","name":"w","type":"weft-cni","mtu":100}"#,
            r#"{"cniVersion":"1.0.0","name":"w","type":"weft-cni","socket":"rel/path"}"#,
            r#"{"cniVersion":"1.0.0","name":"w","type":"weft-cni","ipam":{"type":"host-local"}}"#,
            r#"{"cniVersion":"1.0.0","name":"w","type":"weft-cni","runtimeConfig":{"ips":["x"]}}"#,
            r#"{"name":"w","type":"weft-cni"}"#,
        ];
        for b in bad {
            assert_eq!(NetConf::parse(b.as_bytes()).unwrap_err().code(), 7, "{b}");
        }
        let good = r#"{"cniVersion":"1.1.0","name":"w","type":"weft-cni","mtu":1400,
            "hairpinMode":true,"socket":"/run/x.sock","ipam":{},"unknownField":1,
            "runtimeConfig":{"ips":["10.32.1.5/12"],"portMappings":[]},"readyTimeoutSeconds":3}"#;
        let c = NetConf::parse(good.as_bytes()).unwrap();
        assert_eq!(c.mtu, Some(1400));
        assert!(c.hairpin);
        assert_eq!(c.socket, PathBuf::from("/run/x.sock"));
        assert_eq!(c.runtime_ips, vec!["10.32.1.5/12".parse::<IpNet>().unwrap()]);
        assert_eq!(c.ready_timeout, std::time::Duration::from_secs(3));
    }

    fn sample() -> CniResult {
        CniResult {
            cni_version: String::new(),
            interfaces: vec![
                Interface {
                    name: "wfe1".into(),
                    mac: "02:00:00:00:00:01".into(),
                    mtu: Some(1450),
                    sandbox: None,
                },
                Interface {
                    name: "eth0".into(),
                    mac: "02:00:00:00:00:02".into(),
                    mtu: Some(1450),
                    sandbox: Some("/run/netns/x".into()),
                },
            ],
            ips: vec![
                IpEntry {
                    version: None,
                    interface: Some(1),
                    address: "10.32.0.2/12".parse().unwrap(),
                    gateway: "10.32.0.1".parse().ok(),
                },
                IpEntry {
                    version: None,
                    interface: Some(1),
                    address: "fd32::2/64".parse().unwrap(),
                    gateway: None,
                },
            ],
            routes: vec![RouteEntry {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: "10.32.0.1".parse().ok(),
            }],
            dns: Dns { nameservers: vec!["10.32.0.1".into()], ..Dns::default() },
        }
    }

    #[test]
    fn results_round_trip_in_every_version() {
        for v in CniVersion::ALL {
            let r = sample().for_version(v);
            let json = serde_json::to_value(&r).unwrap();
            assert_eq!(json["cniVersion"], v.as_str());
            let back = CniResult::from_prev(&json).unwrap();
            assert_eq!(back, r, "{v:?}");
            let fam = &json["ips"][0]["version"];
            if v < CniVersion::V1_0_0 {
                assert_eq!(fam, "4");
                assert_eq!(json["ips"][1]["version"], "6");
            } else {
                assert!(fam.is_null());
            }
            assert_eq!(json["interfaces"][1]["mtu"].is_null(), v < CniVersion::V1_1_0);
        }
    }

    #[test]
    fn version_hint_falls_back_to_latest() {
        assert_eq!(NetConf::version_hint(conf("0.3.1").as_bytes()), CniVersion::V0_3_1);
        assert_eq!(NetConf::version_hint(b"garbage"), CniVersion::LATEST);
        assert_eq!(NetConf::version_hint(conf("9.9.9").as_bytes()), CniVersion::LATEST);
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = NetConf::parse(&bytes);
        }

        #[test]
        fn ip_results_round_trip(a in any::<u32>(), len in 0u8..=32, v in 0usize..5) {
            let version = CniVersion::ALL[v];
            let mut r = sample();
            r.ips[0].address = IpNet::new(IpAddr::from(a.to_be_bytes()), len).unwrap();
            let r = r.for_version(version);
            let json = serde_json::to_string(&r).unwrap();
            let back: CniResult = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(back, r);
        }
    }
}
