//! The real [`AgentPort`]: talks to the agent over its unix socket, waits for it (bounded) on
//! ADD, and queues DEL on disk when the agent is down. Agent errors become CNI errors here,
//! in one place.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use prost::Message;
use tonic::Code;
use weft_api::v1::{self, ErrorReason};
use weft_api::{AgentClient, ConnectError};

use crate::error::CniError;
use crate::plugin::AgentPort;

type Client = AgentClient<tonic::transport::Channel>;

/// The agent behind `socket`.
#[derive(Debug)]
pub struct SocketAgent {
    socket: PathBuf,
}

impl SocketAgent {
    pub fn new(socket: &Path) -> SocketAgent {
        SocketAgent { socket: socket.to_path_buf() }
    }

    fn down_message(&self) -> String {
        format!(
            "the weft agent is not running on {} (start it with `weft launch`, or check the weft DaemonSet)",
            self.socket.display()
        )
    }

    /// Connects, retrying while the agent is down, until `deadline`.
    async fn connect_until(&self, deadline: Instant) -> Result<Client, CniError> {
        let mut pause = Duration::from_millis(20);
        loop {
            match weft_api::connect(&self.socket).await {
                Ok(c) => return Ok(c),
                Err(ConnectError::AgentDown { .. }) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(CniError::TryAgainLater(self.down_message()));
                    }
                    tokio::time::sleep(pause.min(left)).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                Err(e @ ConnectError::Other { .. }) => return Err(CniError::Io(e.to_string())),
            }
        }
    }

    async fn connect_once(&self) -> Result<Option<Client>, CniError> {
        match weft_api::connect(&self.socket).await {
            Ok(c) => Ok(Some(c)),
            Err(ConnectError::AgentDown { .. }) => Ok(None),
            Err(e @ ConnectError::Other { .. }) => Err(CniError::Io(e.to_string())),
        }
    }

    /// Writes the DEL where the agent will find it at start: written to a temporary file,
    /// synced, then renamed, so the agent never reads half a request.
    fn queue_del(&self, req: &v1::CniDelRequest) -> Result<(), CniError> {
        let dir = weft_api::del_queue_dir(&self.socket);
        let io =
            |e: std::io::Error| CniError::Io(format!("queueing DEL in {}: {e}", dir.display()));
        // Only the agent's user may put requests here (the agent refuses anything else).
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(io)?;
        }
        let name = weft_api::del_queue_file_name(&req.container_id, &req.ifname);
        let tmp = dir.join(format!(".{name}.{}", std::process::id()));
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&req.encode_to_vec()).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, dir.join(name)).map_err(io)?;
        std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(io)?;
        Ok(())
    }
}

/// A status that means the connection broke rather than that the agent answered.
fn is_transport_failure(status: &tonic::Status) -> bool {
    let (reason, _) = weft_api::reason_of(status);
    reason == ErrorReason::Unspecified
        && matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled)
}

/// Maps an error answered by the agent to the CNI error the runtime should see.
fn to_cni(status: &tonic::Status) -> CniError {
    let (reason, field) = weft_api::reason_of(status);
    let msg = status.message().to_owned();
    match reason {
        ErrorReason::NetnsInvalid => CniError::InvalidEnv { var: "CNI_NETNS", reason: msg },
        ErrorReason::InvalidRequest if field == "ifname" => {
            CniError::InvalidEnv { var: "CNI_IFNAME", reason: msg }
        }
        ErrorReason::InvalidRequest => CniError::InvalidConfig(msg),
        ErrorReason::AddressExhausted => CniError::AddressExhausted(msg),
        ErrorReason::AddressConflict => CniError::AddressConflict(msg),
        ErrorReason::NotReady => CniError::TryAgainLater(msg),
        ErrorReason::EndpointUnknown => CniError::UnknownContainer(msg),
        ErrorReason::CheckFailed => CniError::CheckFailed(msg),
        ErrorReason::Kernel | ErrorReason::InterfaceExists => CniError::Setup(msg),
        ErrorReason::Unspecified => match status.code() {
            Code::Unavailable | Code::DeadlineExceeded => CniError::TryAgainLater(msg),
            Code::InvalidArgument => CniError::InvalidConfig(msg),
            _ => CniError::Setup(msg),
        },
    }
}

impl AgentPort for SocketAgent {
    async fn add(
        &mut self,
        mut req: v1::CniAddRequest,
        deadline: Instant,
    ) -> Result<v1::CniAddReply, CniError> {
        loop {
            let mut client = self.connect_until(deadline).await?;
            let budget = deadline.saturating_duration_since(Instant::now());
            req.wait_ready_ms = u32::try_from(budget.as_millis()).unwrap_or(u32::MAX);
            match client.cni_add(req.clone()).await {
                Ok(r) => return Ok(r.into_inner()),
                // The agent went away mid-call (e.g. restarted): ADD is idempotent, try again.
                Err(st) if is_transport_failure(&st) && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(st) => return Err(to_cni(&st)),
            }
        }
    }

    async fn del(&mut self, req: v1::CniDelRequest) -> Result<(), CniError> {
        let Some(mut client) = self.connect_once().await? else {
            return self.queue_del(&req);
        };
        match client.cni_del(req.clone()).await {
            Ok(_) => Ok(()),
            Err(st) if is_transport_failure(&st) => self.queue_del(&req),
            Err(st) => Err(to_cni(&st)),
        }
    }

    async fn check(&mut self, req: v1::CniCheckRequest) -> Result<(), CniError> {
        let mut client = self
            .connect_once()
            .await?
            .ok_or_else(|| CniError::TryAgainLater(self.down_message()))?;
        client.cni_check(req).await.map(|_| ()).map_err(|st| to_cni(&st))
    }

    async fn status(&mut self) -> Result<v1::CniStatusReply, CniError> {
        let mut client = self
            .connect_once()
            .await?
            .ok_or_else(|| CniError::NotAvailable(self.down_message()))?;
        client
            .cni_status(v1::CniStatusRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|st| to_cni(&st))
    }

    async fn gc(&mut self, req: v1::CniGcRequest) -> Result<u32, CniError> {
        let mut client = self
            .connect_once()
            .await?
            .ok_or_else(|| CniError::TryAgainLater(self.down_message()))?;
        client.cni_gc(req).await.map(|r| r.into_inner().released).map_err(|st| to_cni(&st))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_reasons_map_to_cni_codes() {
        let cases = [
            (ErrorReason::NetnsInvalid, "netns", 4),
            (ErrorReason::InvalidRequest, "ifname", 4),
            (ErrorReason::InvalidRequest, "addresses", 7),
            (ErrorReason::AddressExhausted, "", 100),
            (ErrorReason::NotReady, "", 11),
            (ErrorReason::EndpointUnknown, "", 3),
            (ErrorReason::CheckFailed, "", 101),
        ];
        for (reason, field, code) in cases {
            let st = weft_api::status_with_reason(Code::FailedPrecondition, "m", reason, field);
            assert_eq!(to_cni(&st).code(), code, "{reason:?}");
            assert!(!is_transport_failure(&st));
        }
        assert!(is_transport_failure(&tonic::Status::unavailable("broken pipe")));
        assert_eq!(to_cni(&tonic::Status::unavailable("x")).code(), 11);
    }

    #[test]
    fn queued_del_is_a_decodable_request() {
        let dir = std::env::temp_dir().join(format!("weft-cni-test-{}", std::process::id()));
        let agent = SocketAgent::new(&dir.join("weft.sock"));
        let req = v1::CniDelRequest {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            netns: String::new(),
            network: "n".into(),
        };
        agent.queue_del(&req).unwrap();
        let file = weft_api::del_queue_dir(&dir.join("weft.sock")).join("c1@eth0.del");
        let back = v1::CniDelRequest::decode(std::fs::read(&file).unwrap().as_slice()).unwrap();
        assert_eq!(back, req);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
