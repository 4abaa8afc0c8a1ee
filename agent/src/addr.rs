//! Weave's address arguments (`10.2.1.1/24`, `ip:10.2.1.1/24`, `net:10.2.3.0/24`,
//! `net:default`), parsed once at the edge into [`AddrRequest`]; and [`Mac`], the link-layer
//! address type every layer shares.

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

/// A MAC address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Mac, String> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!("{s:?} is not a MAC address"));
        }
        let mut m = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            m[i] = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not a MAC address"))?;
        }
        Ok(Mac(m))
    }
}

impl Mac {
    /// A locally administered unicast MAC derived from an IPv4 address (`0a:58:a:b:c:d`), so a
    /// reused address keeps its MAC and neighbours' ARP caches stay valid.
    pub fn for_ipv4(ip: std::net::Ipv4Addr) -> Mac {
        let o = ip.octets();
        Mac([0x0a, 0x58, o[0], o[1], o[2], o[3]])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_print() {
        let m: Mac = "0a:58:0a:20:00:02".parse().unwrap();
        assert_eq!(m.to_string(), "0a:58:0a:20:00:02");
        assert_eq!(Mac::for_ipv4("10.32.0.2".parse().unwrap()), m);
        assert!("0a:58".parse::<Mac>().is_err());
        assert!("zz:58:0a:20:00:02".parse::<Mac>().is_err());
    }

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
