//! The errors of endpoint and allocation operations, by what a caller can do about them.
//! They are mapped to gRPC status codes and error reasons once, at the edge (`api::status`).

use crate::dataplane::KernelError;
use crate::ipam::{AllocError, IpamError, Wait};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(transparent)]
    Ipam(#[from] IpamError),
    /// The allocation cannot be served yet (no ring, space being obtained); worth retrying.
    #[error("{0}")]
    IpamWait(#[from] Wait),
    #[error("{0}")]
    Netns(String),
    #[error("invalid {field}: {message}")]
    Invalid { field: &'static str, message: String },
    #[error("the weft agent is not ready: {0}")]
    NotReady(String),
    #[error("unknown endpoint {0}")]
    Unknown(String),
    #[error("{0}")]
    CheckFailed(String),
    #[error("interface {0} already exists in the namespace")]
    InterfaceExists(String),
    #[error(transparent)]
    Kernel(KernelError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the weft agent is shutting down")]
    Stopped,
}

impl EndpointError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> EndpointError {
        EndpointError::Invalid { field, message: message.into() }
    }
}

impl From<AllocError> for EndpointError {
    fn from(e: AllocError) -> EndpointError {
        match e {
            AllocError::Failed(e) => EndpointError::Ipam(e),
            AllocError::Wait(w) => EndpointError::IpamWait(w),
        }
    }
}

impl From<KernelError> for EndpointError {
    fn from(e: KernelError) -> EndpointError {
        match e {
            KernelError::Netns(n) => EndpointError::Netns(n.to_string()),
            KernelError::InterfaceExists(name) => EndpointError::InterfaceExists(name),
            KernelError::Mismatch(m) => EndpointError::CheckFailed(m),
            other => EndpointError::Kernel(other),
        }
    }
}
