//! The agent is killed with SIGKILL in the middle of a stream of ADD/DEL and restarted: the
//! stream completes, no address is ever held by two live pods, and nothing leaks.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use weft_e2e::*;

const ROUNDS: usize = 100;
/// Pods alive at the same time: pod i is deleted when pod i + WINDOW is added.
const WINDOW: usize = 3;

#[test]
fn sigkill_during_100_add_del_loses_nothing_and_leaks_nothing() {
    let mut agent = Agent::start(AgentOpts::default());
    // One namespace per slot of the window, reused once its pod is deleted.
    let slots: Vec<Netns> = (0..=WINDOW).map(|_| Netns::new("p")).collect();
    let paths: Vec<std::path::PathBuf> = slots.iter().map(Netns::path).collect();
    let bins = agent.bins.clone();
    let conf = agent.conf("1.0.0");
    let progress = Arc::new(AtomicUsize::new(0));

    let p = progress.clone();
    let driver = std::thread::spawn(move || {
        let mut live: HashMap<usize, String> = HashMap::new();
        let mut failures = Vec::new();
        for i in 0..ROUNDS + WINDOW {
            if i >= WINDOW {
                let old = i - WINDOW;
                let out = cni(
                    &bins,
                    "DEL",
                    &format!("crash{old}"),
                    "eth0",
                    Some(&paths[old % paths.len()]),
                    &conf,
                );
                if out.code != 0 {
                    failures.push(format!("DEL crash{old}: {out:?}"));
                }
                live.remove(&old);
            }
            if i < ROUNDS {
                let out = cni(
                    &bins,
                    "ADD",
                    &format!("crash{i}"),
                    "eth0",
                    Some(&paths[i % paths.len()]),
                    &conf,
                );
                if out.code != 0 {
                    failures.push(format!("ADD crash{i}: {out:?}"));
                } else {
                    let ip = out.ip();
                    if let Some((other, _)) = live.iter().find(|(_, v)| **v == ip) {
                        failures.push(format!(
                            "{ip} given to crash{i} while crash{other} still holds it"
                        ));
                    }
                    live.insert(i, ip);
                }
            }
            p.store(i + 1, Ordering::SeqCst);
        }
        failures
    });

    // Three kills, so that at least some land in the middle of an ADD or a DEL.
    for round in [25, 50, 75] {
        wait_until(Duration::from_secs(60), &format!("the loop to reach round {round}"), || {
            progress.load(Ordering::SeqCst) >= round
        });
        agent.kill9();
        agent.restart();
    }
    let failures = driver.join().expect("driver thread");
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));

    // Nothing left: no pod endpoints, no veths, only the bridge address allocated, and the
    // persisted state agrees after one more restart.
    for _ in 0..2 {
        let cni_eps: Vec<Value> =
            agent.endpoints().into_iter().filter(|e| e["kind"] == "cni").collect();
        assert!(cni_eps.is_empty(), "leaked endpoints: {cni_eps:?}");
        assert!(agent.endpoint_links().is_empty(), "leaked veths: {:?}", agent.endpoint_links());
        assert_eq!(agent.status().expect("status")["ipam"]["used"], 1, "leaked allocations");
        for s in &slots {
            assert_eq!(s.links(), vec!["lo".to_owned()], "interface left in {}", s.name);
        }
        agent.stop();
        agent.restart();
    }
}
