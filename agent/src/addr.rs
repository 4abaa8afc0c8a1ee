//! Weave's address arguments (`10.2.1.1/24`, `ip:10.2.1.1/24`, `net:10.2.3.0/24`,
//! `net:default`), parsed once at the edge into [`AddrRequest`].

use std::fmt;
use std::str::FromStr;

use ipnet::IpNet;

/// What address an endpoint should get.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddrRequest {
    /// Allocate in the default subnet (`net:default`, or no argument).
    Default,
    /// Allocate a free address in this subnet (`net:CIDR`).
    Subnet(IpNet),
    /// Exactly this address (`CIDR` or `ip:CIDR`). A prefix length of 0 means "the prefix of
    /// the subnet that contains it" (CNI's `IP=` carries no prefix).
    Static(IpNet),
}

impl fmt::Display for AddrRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddrRequest::Default => f.write_str("net:default"),
            AddrRequest::Subnet(n) => write!(f, "net:{n}"),
            AddrRequest::Static(n) => write!(f, "ip:{n}"),
        }
    }
}

impl FromStr for AddrRequest {
    type Err = String;
    fn from_str(s: &str) -> Result<AddrRequest, String> {
        let cidr = |v: &str| {
            v.parse::<IpNet>().map_err(|_| {
                format!("{s:?}: expected ADDRESS/PREFIX, ip:ADDRESS/PREFIX, net:NETWORK/PREFIX or net:default")
            })
        };
        if s == "net:default" {
            Ok(AddrRequest::Default)
        } else if let Some(v) = s.strip_prefix("net:") {
            let net = cidr(v)?;
            if net.trunc() != net {
                return Err(format!(
                    "{s:?}: {net} is not a network address (did you mean net:{}?)",
                    net.trunc()
                ));
            }
            Ok(AddrRequest::Subnet(net))
        } else if let Some(v) = s.strip_prefix("ip:") {
            Ok(AddrRequest::Static(cidr(v)?))
        } else {
            Ok(AddrRequest::Static(cidr(s)?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weave_syntax() {
        assert_eq!("net:default".parse(), Ok(AddrRequest::Default));
        assert_eq!(
            "net:10.2.3.0/24".parse(),
            Ok(AddrRequest::Subnet("10.2.3.0/24".parse().unwrap()))
        );
        assert_eq!(
            "ip:10.2.2.1/24".parse(),
            Ok(AddrRequest::Static("10.2.2.1/24".parse().unwrap()))
        );
        assert_eq!("10.2.1.1/24".parse(), Ok(AddrRequest::Static("10.2.1.1/24".parse().unwrap())));
        assert!("net:10.2.3.2/30".parse::<AddrRequest>().unwrap_err().contains("net:10.2.3.0/30"));
        assert!("10.2.1.1".parse::<AddrRequest>().is_err());
        assert!("foo:1.2.3.4/8".parse::<AddrRequest>().is_err());
        for s in ["net:default", "net:10.2.3.0/24", "ip:10.2.2.1/24"] {
            assert_eq!(s.parse::<AddrRequest>().unwrap().to_string(), s);
        }
    }
}
