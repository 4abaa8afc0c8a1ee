//! The seam every subsystem plugs into. A subsystem is started by a function of its own,
//! `start(config, &Hub, &mut Tasks) -> Handle`: it reads the typed feeds in the [`Hub`] (the
//! mesh view and channels, the endpoint feed, the IP allocation handle) and hands its tasks
//! to [`Tasks`], one `JoinSet` that the daemon cancels and awaits on shutdown. Nothing else
//! is threaded through the daemon: no subsystem reads another's status report.
//! docs/architecture.md shows a worked example (the Kubernetes peer source).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use crate::endpoints::{Endpoints, IpamHandle};
use crate::identity::Identity;
use crate::mesh::Mesh;
use crate::metrics::Metrics;
use crate::store::Store;

/// What every subsystem may use (cheap to clone).
#[derive(Clone, Debug)]
pub struct Hub {
    pub identity: Identity,
    /// Gossip channels (`mesh.channel(name)`, taken inside `start`: the daemon opens the mesh
    /// to peers only after every subsystem has started), the typed mesh view (`mesh.view()`),
    /// and peer sources (`mesh.set_targets(source, ..)`).
    pub mesh: Mesh,
    /// Endpoint operations and the endpoint feed (`endpoints.feed()`).
    pub endpoints: Endpoints,
    /// The IP allocation state (allocate, rmpeer, prime, ...).
    pub ipam: IpamHandle,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
}

/// The agent's long-running tasks, cancelled together and awaited on shutdown.
#[derive(Debug)]
pub struct Tasks {
    set: JoinSet<()>,
    names: HashMap<tokio::task::Id, &'static str>,
    shutdown: CancellationToken,
}

impl Tasks {
    pub fn new(shutdown: CancellationToken) -> Tasks {
        Tasks { set: JoinSet::new(), names: HashMap::new(), shutdown }
    }

    /// The token that ends every task.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Runs `task` until it ends or the agent stops (each task watches the token).
    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let handle = self.set.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// Waits until the agent is asked to stop. A task that panics stops the agent: a
    /// half-running agent is worse than a restarted one.
    pub async fn run(&mut self) {
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                Some(done) = self.set.join_next_with_id() => {
                    let (id, panicked) = match done {
                        Ok((id, ())) => (id, false),
                        Err(e) => (e.id(), e.is_panic()),
                    };
                    let name = self.names.remove(&id).unwrap_or("?");
                    if panicked {
                        error!(task = name, "task panicked; stopping the agent");
                        self.shutdown.cancel();
                    }
                }
            }
        }
    }

    /// Cancels every task and waits for them, at most `deadline`; then aborts what is left.
    pub async fn stop(mut self, deadline: Duration) {
        self.shutdown.cancel();
        let all = async { while self.set.join_next().await.is_some() {} };
        if tokio::time::timeout(deadline, all).await.is_err() {
            warn!(left = self.set.len(), "tasks still running after {deadline:?}; aborting them");
            self.set.abort_all();
            while self.set.join_next().await.is_some() {}
        }
    }
}
