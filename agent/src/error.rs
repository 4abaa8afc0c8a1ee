//! The errors the agent's operations return to API callers. They are mapped to gRPC status
//! codes and error reasons once, in `api::server`.

use crate::dataplane::KernelError;
use crate::ipam::{AllocError, IpamError, Wait};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
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
    #[error(transparent)]
    Dns(#[from] crate::dns::DnsError),
}

impl ApiError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::Invalid { field, message: message.into() }
    }
}

impl From<AllocError> for ApiError {
    fn from(e: AllocError) -> ApiError {
        match e {
            AllocError::Failed(e) => ApiError::Ipam(e),
            AllocError::Wait(w) => ApiError::IpamWait(w),
        }
    }
}

impl From<KernelError> for ApiError {
    fn from(e: KernelError) -> ApiError {
        match e {
            KernelError::Netns(n) => ApiError::Netns(n.to_string()),
            KernelError::InterfaceExists(name) => ApiError::InterfaceExists(name),
            KernelError::Mismatch(m) => ApiError::CheckFailed(m),
            other => ApiError::Kernel(other),
        }
    }
}
