//! CNI ADD/DEL latency: `weft-cni` + the weft agent against the reference `bridge` +
//! `host-local` plugins, in the same run, on the same host namespace. Prints p50/p99 for 100
//! sequential ADD+DEL and 10 workers x 10 concurrent ADD+DEL, their ratios (weft / reference,
//! lower is better), and the agent's resident memory at idle.
//!
//! usage: cni-bench [--rounds N] [--workers W] [--per-worker K]   (as root)

// Printing the report on stdout is what this program is for.
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use weft_bench::*;

const PREFIX: &str = "wbc";
const REFERENCE_DIR: &str = "/usr/lib/cni";

#[derive(Clone)]
struct Plugin {
    name: &'static str,
    exe: PathBuf,
    conf: String,
}

#[derive(Default)]
struct Samples {
    add: Vec<Duration>,
    del: Vec<Duration>,
    both: Vec<Duration>,
}

fn env(cmd: &str, container: &str, netns: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("CNI_COMMAND", cmd.to_owned()),
        ("CNI_CONTAINERID", container.to_owned()),
        ("CNI_NETNS", netns.display().to_string()),
        ("CNI_IFNAME", "eth0".to_owned()),
        ("CNI_PATH", REFERENCE_DIR.to_owned()),
    ]
}

fn add_del(p: &Plugin, container: &str, netns: &Path, s: &mut Samples) {
    let a = time_plugin(&p.exe, &env("ADD", container, netns), &p.conf);
    let d = time_plugin(&p.exe, &env("DEL", container, netns), &p.conf);
    s.add.push(a);
    s.del.push(d);
    s.both.push(a + d);
}

fn concurrent(p: &Plugin, pods: &[PathBuf], per_worker: usize, tag: &str) -> Samples {
    let handles: Vec<_> = pods
        .iter()
        .enumerate()
        .map(|(w, ns)| {
            let (p, ns, tag) = (p.clone(), ns.clone(), tag.to_owned());
            std::thread::spawn(move || {
                let mut s = Samples::default();
                for i in 0..per_worker {
                    add_del(&p, &format!("{tag}-{w}-{i}"), &ns, &mut s);
                }
                s
            })
        })
        .collect();
    let mut all = Samples::default();
    for h in handles {
        let s = h.join().expect("worker");
        all.add.extend(s.add);
        all.del.extend(s.del);
        all.both.extend(s.both);
    }
    all
}

// The caller kills and waits for the returned child.
#[allow(clippy::zombie_processes)]
fn start_agent(bin: &Path, dir: &Path) -> Child {
    let socket = dir.join("weft.sock");
    let log = std::fs::File::create(dir.join("agent.log")).expect("log");
    let mut child = Command::new(bin.join("weft"))
        .arg("--socket")
        .arg(&socket)
        .args(["agent", "--status-addr", "off", "--log-level", "warn", "--state-dir"])
        .arg(dir.join("state"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("starting the agent");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new(bin.join("weft"))
            .arg("--socket")
            .arg(&socket)
            .args(["status", "--json"])
            .output();
        if out.is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains("\"ready\": true")
        }) {
            return child;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("agent not ready; see {}", dir.join("agent.log").display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn row(label: &str, w: &[Duration], r: &[Duration]) {
    let (w50, w99, r50, r99) =
        (percentile(w, 50.0), percentile(w, 99.0), percentile(r, 50.0), percentile(r, 99.0));
    println!(
        "| {label:<28} | {:>8.2} | {:>8.2} | {:>8.2} | {:>8.2} | {:>6.2} | {:>6.2} |",
        ms(w50),
        ms(w99),
        ms(r50),
        ms(r99),
        ms(w50) / ms(r50),
        ms(w99) / ms(r99)
    );
}

fn main() {
    require_root();
    let args: Vec<String> = std::env::args().collect();
    let rounds = arg(&args, "--rounds", 100);
    let workers = arg(&args, "--workers", 10);
    let per_worker = arg(&args, "--per-worker", 10);
    let bin = bin_dir();
    let reference = Path::new(REFERENCE_DIR);
    assert!(
        reference.join("bridge").exists(),
        "install containernetworking-plugins for the reference plugins"
    );

    cleanup_prefix(PREFIX);
    let dir = PathBuf::from("/run").join(PREFIX);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench dir");
    let host = add_netns(&format!("{PREFIX}-host"));
    let pods: Vec<PathBuf> =
        (0..workers.max(1)).map(|i| add_netns(&format!("{PREFIX}-p{i}"))).collect();
    // Everything from here on (agent and plugins) runs in the benchmark's host namespace.
    enter_netns(&host);

    let mut agent = start_agent(&bin, &dir);
    let rss_idle = rss_kib(agent.id());
    let weft = Plugin {
        name: "weft",
        exe: bin.join("weft-cni"),
        conf: serde_json::json!({"cniVersion": "1.0.0", "name": "weft", "type": "weft-cni", "socket": dir.join("weft.sock")}).to_string(),
    };
    let refp = Plugin {
        name: "bridge+host-local",
        exe: reference.join("bridge"),
        conf: serde_json::json!({
            "cniVersion": "1.0.0", "name": "ref", "type": "bridge", "bridge": "wbcref0",
            "isGateway": true, "ipMasq": false,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/16"}]], "dataDir": dir.join("ipam")}
        })
        .to_string(),
    };

    let (mut ws, mut rs) = (Samples::default(), Samples::default());
    for i in 0..5 {
        add_del(&weft, &format!("warm{i}"), &pods[0], &mut Samples::default());
        add_del(&refp, &format!("warm{i}"), &pods[0], &mut Samples::default());
    }
    // Interleaved so that background noise hits both alike.
    for i in 0..rounds {
        add_del(&weft, &format!("seq{i}"), &pods[0], &mut ws);
        add_del(&refp, &format!("seq{i}"), &pods[0], &mut rs);
    }
    let wc = concurrent(&weft, &pods[..workers], per_worker, "conc");
    let rc = concurrent(&refp, &pods[..workers], per_worker, "conc");
    let rss_after = rss_kib(agent.id());

    println!(
        "CNI latency, ms (weft = weft-cni + agent; reference = {}); ratio = weft / reference",
        refp.name
    );
    println!(
        "| scenario                     | weft p50 | weft p99 |  ref p50 |  ref p99 | r p50  | r p99  |"
    );
    println!(
        "|------------------------------|---------:|---------:|---------:|---------:|-------:|-------:|"
    );
    row(&format!("{rounds} sequential ADD"), &ws.add, &rs.add);
    row(&format!("{rounds} sequential DEL"), &ws.del, &rs.del);
    row(&format!("{rounds} sequential ADD+DEL"), &ws.both, &rs.both);
    row(&format!("{workers}x{per_worker} concurrent ADD"), &wc.add, &rc.add);
    row(&format!("{workers}x{per_worker} concurrent DEL"), &wc.del, &rc.del);
    row(&format!("{workers}x{per_worker} concurrent ADD+DEL"), &wc.both, &rc.both);
    println!();
    println!(
        "weft agent RSS: {:.1} MiB at idle after start, {:.1} MiB after the runs",
        rss_idle as f64 / 1024.0,
        rss_after as f64 / 1024.0
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "cni",
            "seq_add_del_p50_ratio": ms(percentile(&ws.both, 50.0)) / ms(percentile(&rs.both, 50.0)),
            "conc_add_del_p50_ratio": ms(percentile(&wc.both, 50.0)) / ms(percentile(&rc.both, 50.0)),
            "rss_idle_kib": rss_idle,
            "rss_after_kib": rss_after,
        })
    );

    let _ = agent.kill();
    let _ = agent.wait();
    cleanup_prefix(PREFIX);
    let _ = std::fs::remove_dir_all(&dir);
}
