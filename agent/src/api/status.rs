//! Errors at the edge: every error an RPC can return becomes a gRPC status with an error
//! reason (docs/local-api.md), here and nowhere else.

use tonic::{Code, Status};
use weft_api::v1::ErrorReason;

use crate::dns::DnsError;
use crate::endpoints::error::EndpointError;
use crate::endpoints::ipam::ReclaimError;
use crate::ipam::IpamError;

fn status(code: Code, reason: ErrorReason, field: &str, e: &dyn std::fmt::Display) -> Status {
    weft_api::status_with_reason(code, e.to_string(), reason, field)
}

impl From<EndpointError> for Status {
    fn from(e: EndpointError) -> Status {
        use ErrorReason as R;
        match &e {
            EndpointError::Ipam(IpamError::Exhausted(_)) => {
                status(Code::ResourceExhausted, R::AddressExhausted, "addresses", &e)
            }
            EndpointError::Ipam(IpamError::Conflict { .. } | IpamError::NotOwned(_)) => {
                status(Code::AlreadyExists, R::AddressConflict, "addresses", &e)
            }
            EndpointError::Ipam(_) => {
                status(Code::InvalidArgument, R::InvalidRequest, "addresses", &e)
            }
            EndpointError::Netns(_) => status(Code::InvalidArgument, R::NetnsInvalid, "netns", &e),
            EndpointError::Invalid { field, .. } => {
                status(Code::InvalidArgument, R::InvalidRequest, field, &e)
            }
            EndpointError::NotReady(_) | EndpointError::IpamWait(_) => {
                status(Code::Unavailable, R::NotReady, "", &e)
            }
            EndpointError::Unknown(_) => status(Code::NotFound, R::EndpointUnknown, "", &e),
            EndpointError::CheckFailed(_) => {
                status(Code::FailedPrecondition, R::CheckFailed, "", &e)
            }
            EndpointError::InterfaceExists(_) => {
                status(Code::AlreadyExists, R::InterfaceExists, "ifname", &e)
            }
            EndpointError::Kernel(_) | EndpointError::Store(_) => {
                status(Code::Internal, R::Kernel, "", &e)
            }
            EndpointError::Stopped => status(Code::Unavailable, R::NotReady, "", &e),
        }
    }
}

impl From<DnsError> for Status {
    fn from(e: DnsError) -> Status {
        use ErrorReason as R;
        match &e {
            DnsError::Name(_) => status(Code::InvalidArgument, R::InvalidRequest, "name", &e),
            DnsError::NothingToAdd | DnsError::NothingToRemove => {
                status(Code::InvalidArgument, R::InvalidRequest, "", &e)
            }
            DnsError::UnknownEndpoint(_) => {
                status(Code::NotFound, R::EndpointUnknown, "endpoint_id", &e)
            }
            DnsError::Disabled => status(Code::FailedPrecondition, R::InvalidRequest, "", &e),
            DnsError::Store(_) => status(Code::Internal, R::Kernel, "", &e),
            DnsError::Stopped => status(Code::Unavailable, R::NotReady, "", &e),
        }
    }
}

impl From<ReclaimError> for Status {
    fn from(e: ReclaimError) -> Status {
        match e {
            ReclaimError::UnknownPeer(_) | ReclaimError::Reachable(_) => {
                EndpointError::invalid("peer", e.to_string()).into()
            }
            ReclaimError::Ipam(i) => EndpointError::Ipam(i).into(),
            ReclaimError::State(s) => s.into(),
        }
    }
}
