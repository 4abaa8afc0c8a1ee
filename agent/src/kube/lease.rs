//! One actor at a time for node reclaim: the `coordination.k8s.io/v1` Lease `weft-reclaim`,
//! taken and released by compare-and-swap on its resourceVersion. A holder that dies keeps
//! it at most [`LEASE_SECONDS`]; then anyone may take it.

use super::api::{ApiError, KubeApi, LeaseRecord, Write};

/// The Lease's name (in the agent's namespace).
pub const RECLAIM_LEASE: &str = "weft-reclaim";
/// How long a holder keeps the Lease without renewing it.
pub const LEASE_SECONDS: i64 = 30;

/// Whether `me` may take a Lease in this state at time `now` (Unix seconds).
pub fn may_take(lease: &LeaseRecord, me: &str, now: i64) -> bool {
    match lease.holder.as_deref() {
        None | Some("") => true,
        Some(h) if h == me => true,
        Some(_) => now >= lease.renewed.saturating_add(lease.duration_secs),
    }
}

/// Takes the Lease for `me`; `Ok(None)` when someone else holds it or was faster.
pub async fn acquire(
    api: &dyn KubeApi,
    me: &str,
    now: i64,
) -> Result<Option<LeaseRecord>, ApiError> {
    let mine = |version: String| LeaseRecord {
        holder: Some(me.to_owned()),
        renewed: now,
        duration_secs: LEASE_SECONDS,
        version,
    };
    let write = match api.get_lease(RECLAIM_LEASE).await? {
        None => api.create_lease(RECLAIM_LEASE, &mine(String::new())).await?,
        Some(cur) if may_take(&cur, me, now) => {
            api.replace_lease(RECLAIM_LEASE, &mine(cur.version)).await?
        }
        Some(_) => Write::Lost,
    };
    if write == Write::Lost {
        return Ok(None);
    }
    // The new resourceVersion is needed to release it.
    Ok(api.get_lease(RECLAIM_LEASE).await?.filter(|l| l.holder.as_deref() == Some(me)))
}

/// Gives the Lease back if `me` still holds it (best effort: it expires anyway).
pub async fn release(api: &dyn KubeApi, held: &LeaseRecord) -> Result<(), ApiError> {
    let free = LeaseRecord { holder: None, ..held.clone() };
    api.replace_lease(RECLAIM_LEASE, &free).await.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::fake::FakeApi;

    #[test]
    fn expiry_and_holders() {
        let l = |holder: Option<&str>| LeaseRecord {
            holder: holder.map(str::to_owned),
            renewed: 100,
            duration_secs: 30,
            version: "1".into(),
        };
        assert!(may_take(&l(None), "a", 100));
        assert!(may_take(&l(Some("a")), "a", 100));
        assert!(!may_take(&l(Some("b")), "a", 129));
        assert!(may_take(&l(Some("b")), "a", 130));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn only_one_of_many_takes_it() {
        let api = std::sync::Arc::new(FakeApi::default());
        for round in 0..20 {
            let joins: Vec<_> = (0..6)
                .map(|i| {
                    let api = api.clone();
                    tokio::spawn(async move {
                        acquire(api.as_ref(), &format!("agent-{i}"), 1000 + round).await
                    })
                })
                .collect();
            let mut held = Vec::new();
            for j in joins {
                if let Some(l) = j.await.expect("task").expect("acquire") {
                    held.push(l);
                }
            }
            assert_eq!(held.len(), 1, "round {round}: {held:?}");
            release(api.as_ref(), &held[0]).await.expect("release");
            assert_eq!(api.lease(RECLAIM_LEASE).expect("lease").holder, None);
        }
    }

    #[tokio::test]
    async fn a_dead_holder_is_replaced_after_expiry() {
        let api = FakeApi::default();
        assert!(acquire(&api, "a", 1000).await.expect("a").is_some());
        assert!(acquire(&api, "b", 1010).await.expect("b early").is_none());
        let b = acquire(&api, "b", 1000 + LEASE_SECONDS).await.expect("b late");
        assert_eq!(b.and_then(|l| l.holder).as_deref(), Some("b"));
    }
}
