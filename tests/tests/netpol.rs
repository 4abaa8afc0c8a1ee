//! The NetworkPolicy conformance matrix on a real 3-node cluster (issue 18; the 26 scenarios of
//! k8s-wave §2.4, ported from the upstream e2e tests and Cyclonus). Namespaces x, y, z with pods
//! a, b, c each (a on wk8s-n1, b on wk8s-n2, c on wk8s-n3), every pod serving TCP and UDP on 80
//! and 81 with named ports `serve-<port>-<proto>` (tests/src/bin/weft-netprobe.rs). For each
//! scenario the policies are applied with kubectl, the live namespaces, pods and policies are
//! read back and fed to weft's own evaluator (`weft::policy::eval`) for the expectation, and the
//! full matrix (9 x 9 pods x {80, 81} x {TCP, UDP}, loopback ignored as upstream does) is probed
//! from inside the pods, one `kubectl exec` per source pod, until it equals the expectation or
//! the deadline passes (`NETPOL_DEADLINE_S`, default 10). One line per scenario: `scenario N
//! <name>: pass`, or the differing cells followed by the whole matrix.
//!
//! Needs root and the lab's prerequisites (docs/testing.md); brings the lab up with weft from
//! manifests/ (tests/k8s/netpol-lab.sh) and takes it down at the end (`WK8S_KEEP=1` keeps it
//! after a failure; `WEFT_NETPOL_LAB=reuse` runs on a lab that is already up with weft and leaves
//! it). `NETPOL_SCENARIOS=1,4` runs a subset.
//!
//! Then the other paths between nodes: scenarios 4, 8, 14 and 19 (ingress and egress, pod and
//! namespace selectors, a named port) run again with the underlay between wk8s-n1 and wk8s-n3
//! cut, so that their pods' traffic is relayed through wk8s-n2, and again with every agent on
//! sleeve (`--no-fastdp`). `NETPOL_OVERLAYS=` (empty) skips these; by default they run when
//! every scenario does.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use weft::policy::eval::{Cluster, Flow, Party};
use weft::policy::model::{PodKey, Protocol};
use weft::policy::parse;
use weft_e2e::{Value, bins, require_root, wait_until};

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
/// Each pod name and the node it runs on, the same in every namespace.
const PODS: [(&str, &str); 3] = [("a", "wk8s-n1"), ("b", "wk8s-n2"), ("c", "wk8s-n3")];
const PORTS: [(u16, Protocol); 4] =
    [(80, Protocol::Tcp), (81, Protocol::Tcp), (80, Protocol::Udp), (81, Protocol::Udp)];
/// hostNetwork probe pods, one per node (scenario 25).
const HOST_NS: &str = "netpol-host";
const NODES: [&str; 3] = ["wk8s-n1", "wk8s-n2", "wk8s-n3"];
/// The chart's default ipam.range: every pod address is in it.
const POD_RANGE: &str = "10.32.0.0/12";
const IMAGE: &str = "localhost/weft-netprobe:latest";

// ------------------------------------------------------------------------------------------
// the lab and kubectl

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace").to_path_buf()
}

/// The lab brought up for this test; down again on drop, also when the test fails (unless
/// `WK8S_KEEP=1` after a failure, or the lab was not ours).
struct Lab {
    ours: bool,
}

impl Lab {
    fn up() -> Lab {
        if std::env::var("WEFT_NETPOL_LAB").as_deref() == Ok("reuse") {
            return Lab { ours: false };
        }
        let bin_dir = bins().weft.parent().expect("bin dir").to_path_buf();
        let lab = Lab { ours: true };
        let status = Command::new(repo().join("tests/k8s/netpol-lab.sh"))
            .arg("up")
            .env("WEFT_BIN_DIR", &bin_dir)
            .env("NETPROBE_BIN", env!("CARGO_BIN_EXE_weft-netprobe"))
            .status()
            .expect("run tests/k8s/netpol-lab.sh");
        assert!(status.success(), "tests/k8s/netpol-lab.sh up failed ({status})");
        lab
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.ours
            || (std::thread::panicking() && std::env::var("WK8S_KEEP").as_deref() == Ok("1"))
        {
            eprintln!(
                "lab left running: eval \"$(scripts/k8s-lab.sh env)\"; scripts/k8s-lab.sh down"
            );
            return;
        }
        let _ = Command::new(repo().join("tests/k8s/netpol-lab.sh")).arg("down").status();
    }
}

#[derive(Clone, Debug)]
struct Kube {
    kubectl: PathBuf,
    kubeconfig: String,
    /// The source address each node's traffic to pods on other nodes carries, by node
    /// (`NODES` order): the kernel's choice for the route to the pod network, the node's weft
    /// bridge address (docs/network-policy.md, "Nodes and hostNetwork pods").
    node_sources: Vec<IpAddr>,
}

impl Kube {
    /// kubectl as `scripts/k8s-lab.sh env` sets it up.
    fn from_lab() -> Kube {
        let out = Command::new(repo().join("scripts/k8s-lab.sh"))
            .arg("env")
            .output()
            .expect("k8s-lab.sh env");
        let text = String::from_utf8_lossy(&out.stdout);
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("export {name}=")).map(str::to_owned))
                .unwrap_or_else(|| panic!("no {name} in `k8s-lab.sh env`: {text}"))
        };
        let path = value("PATH");
        let dir = path.strip_suffix(":$PATH").unwrap_or(&path);
        Kube {
            kubectl: Path::new(dir).join("kubectl"),
            kubeconfig: value("KUBECONFIG"),
            node_sources: Vec::new(),
        }
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(&self.kubectl);
        c.env("KUBECONFIG", &self.kubeconfig);
        c
    }

    fn run(&self, args: &[&str]) -> Result<String, String> {
        let out = self.cmd().args(args).output().map_err(|e| format!("kubectl {args:?}: {e}"))?;
        match out.status.success() {
            true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
            false => {
                Err(format!("kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim()))
            }
        }
    }

    fn must(&self, args: &[&str]) -> String {
        self.run(args).unwrap_or_else(|e| panic!("{e}"))
    }

    fn apply(&self, yaml: &str) -> Result<(), String> {
        let mut child = self
            .cmd()
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("kubectl apply: {e}"))?;
        child.stdin.take().expect("stdin").write_all(yaml.as_bytes()).map_err(|e| e.to_string())?;
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        match out.status.success() {
            true => Ok(()),
            false => Err(format!(
                "kubectl apply: {}\n{yaml}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        }
    }

    /// The live namespaces, pods and policies, read through weft's own parser.
    fn cluster(&self) -> Cluster {
        let json = self.must(&["get", "namespaces,pods,networkpolicies", "-A", "-o", "json"]);
        let list: Value = serde_json::from_str(&json).expect("kubectl get -o json");
        let mut cluster = Cluster::default();
        for item in list["items"].as_array().expect("items") {
            let kind = item["kind"].as_str().unwrap_or_default();
            let name =
                format!("{kind} {}/{}", item["metadata"]["namespace"], item["metadata"]["name"]);
            match kind {
                "Namespace" => {
                    let ns: core::Namespace = serde_json::from_value(item.clone())
                        .unwrap_or_else(|e| unreadable(&name, e));
                    cluster.add_namespace(
                        parse::namespace(&ns).unwrap_or_else(|e| unreadable(&name, e)),
                    );
                }
                "Pod" => {
                    let pod: core::Pod = serde_json::from_value(item.clone())
                        .unwrap_or_else(|e| unreadable(&name, e));
                    cluster.add_pod(parse::pod(&pod).unwrap_or_else(|e| unreadable(&name, e)));
                }
                "NetworkPolicy" => {
                    let p: net::NetworkPolicy = serde_json::from_value(item.clone())
                        .unwrap_or_else(|e| unreadable(&name, e));
                    cluster.add_policy(parse::policy(&p).unwrap_or_else(|e| unreadable(&name, e)));
                }
                other => panic!("unexpected kind {other:?} in the list"),
            }
        }
        cluster
    }
}

fn unreadable<T>(name: &str, e: impl std::fmt::Display) -> T {
    panic!("{name}: weft cannot read it: {e}")
}

// ------------------------------------------------------------------------------------------
// workloads

fn pod_yaml(ns: &str, name: &str, node: &str, host: bool) -> String {
    let ports = PORTS
        .iter()
        .map(|(port, proto)| {
            let p = proto.name();
            format!(
                "{{name: serve-{port}-{}, containerPort: {port}, protocol: {p}}}",
                p.to_lowercase()
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    // hostNetwork pods only probe; they serve on a port no pod uses so as not to hold the node's 80
    let (labels, extra, args, ports) = match host {
        false => {
            (format!("{{pod: {name}}}"), "", "[serve]".to_owned(), format!("ports: [{ports}]"))
        }
        true => (
            "{role: host-probe}".to_owned(),
            "hostNetwork: true",
            "[serve, \"18181\"]".to_owned(),
            String::new(),
        ),
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: \"{ns}\", labels: {labels}}}\nspec:\n  \
         nodeName: {node}\n  terminationGracePeriodSeconds: 1\n  {extra}\n  containers:\n  - name: netprobe\n    \
         image: {IMAGE}\n    imagePullPolicy: Never\n    args: {args}\n    {ports}\n---\n"
    )
}

fn workloads(kube: &Kube) {
    let mut yaml = String::new();
    for ns in NAMESPACES.iter().chain([&HOST_NS]) {
        yaml += &format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: \"{ns}\"}}\n---\n");
    }
    for ns in NAMESPACES {
        for (pod, node) in PODS {
            yaml += &pod_yaml(ns, pod, node, false);
        }
    }
    for (i, node) in NODES.iter().enumerate() {
        yaml += &pod_yaml(HOST_NS, &format!("node{}", i + 1), node, true);
    }
    kube.apply(&yaml).unwrap_or_else(|e| panic!("{e}"));
    for ns in NAMESPACES.iter().chain([&HOST_NS]) {
        kube.must(&["wait", "--for=condition=Ready", "pod", "--all", "-n", ns, "--timeout=180s"]);
    }
}

/// Back to no policies and none of the labels scenarios add.
fn reset(kube: &Kube) {
    kube.must(&["delete", "networkpolicy", "--all", "--all-namespaces", "--wait=true"]);
    let mut args = vec!["label", "namespace"];
    args.extend(NAMESPACES);
    args.push("team-");
    kube.must(&args);
    for ns in NAMESPACES {
        kube.must(&["label", "pod", "--all", "-n", ns, "target-"]);
    }
}

// ------------------------------------------------------------------------------------------
// the matrix

/// A source of probes: one of the nine pods, or a hostNetwork pod standing for its node.
#[derive(Clone, Debug)]
struct End {
    key: PodKey,
    label: String,
}

fn pods() -> Vec<End> {
    let keys = NAMESPACES.iter().flat_map(|ns| PODS.iter().map(move |(p, _)| PodKey::new(ns, p)));
    keys.map(|key| End { label: key.to_string(), key }).collect()
}

fn hosts() -> Vec<End> {
    (1..=NODES.len())
        .map(|i| End { key: PodKey::new(HOST_NS, &format!("node{i}")), label: format!("n{i}") })
        .collect()
}

/// (source index, destination index, index into PORTS) -> allowed
type Cells = BTreeMap<(usize, usize, usize), bool>;

fn expected(cluster: &Cluster, from: &[End], to: &[End]) -> Cells {
    let mut cells = Cells::new();
    for (s, src) in from.iter().enumerate() {
        for (d, dst) in to.iter().enumerate() {
            if src.key == dst.key {
                continue;
            }
            for (i, (port, protocol)) in PORTS.iter().enumerate() {
                let flow = Flow {
                    from: Party::Pod(src.key.clone()),
                    to: Party::Pod(dst.key.clone()),
                    protocol: *protocol,
                    port: *port,
                };
                cells.insert((s, d, i), cluster.evaluate(&flow).allowed());
            }
        }
    }
    cells
}

fn ip_of(cluster: &Cluster, key: &PodKey) -> IpAddr {
    let pod = cluster.pods.get(key).unwrap_or_else(|| panic!("pod {key} is gone"));
    *pod.ips.first().unwrap_or_else(|| panic!("pod {key} has no address"))
}

/// One `kubectl exec` per source, all at once.
fn probe(kube: &Kube, cluster: &Cluster, from: &[End], to: &[End]) -> Result<Cells, String> {
    let mut targets: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (d, dst) in to.iter().enumerate() {
        let ip = ip_of(cluster, &dst.key);
        for (i, (port, protocol)) in PORTS.iter().enumerate() {
            targets.insert(format!("{ip}:{port}/{}", protocol.name().to_lowercase()), (d, i));
        }
    }
    let outputs: Vec<Result<String, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = from
            .iter()
            .map(|src| {
                let mut args = vec![
                    "exec",
                    "-n",
                    &src.key.namespace,
                    &src.key.name,
                    "--",
                    "/weft-netprobe",
                    "probe",
                ];
                let own = to.iter().position(|t| t.key == src.key);
                args.extend(
                    targets.iter().filter(|(_, (d, _))| Some(*d) != own).map(|(t, _)| t.as_str()),
                );
                scope.spawn(move || kube.run(&args))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("probe thread panicked".into())))
            .collect()
    });
    let mut cells = Cells::new();
    for (s, out) in outputs.into_iter().enumerate() {
        let out = out.map_err(|e| format!("probing from {}: {e}", from[s].label))?;
        for line in out.lines() {
            let (target, verdict) =
                line.split_once(' ').ok_or_else(|| format!("probe output {line:?}"))?;
            let (d, i) =
                targets.get(target).ok_or_else(|| format!("probe output names {target:?}"))?;
            cells.insert((s, *d, *i), verdict == "ok");
        }
    }
    Ok(cells)
}

fn word(allowed: bool) -> &'static str {
    if allowed { "allowed" } else { "denied" }
}

fn port_label(i: usize) -> String {
    let (port, protocol) = PORTS[i];
    format!("{}/{port}", protocol.name())
}

/// The differing cells, one phrase each.
fn differences(want: &Cells, got: &Cells, from: &[End], to: &[End]) -> Vec<String> {
    want.iter()
        .filter(|(cell, w)| got.get(cell) != Some(w))
        .map(|((s, d, i), w)| {
            let g = got.get(&(*s, *d, *i)).map_or("no answer", |g| word(*g));
            format!(
                "{}->{} {} (expected {}, got {g})",
                from[*s].label,
                to[*d].label,
                port_label(*i),
                word(*w)
            )
        })
        .collect()
}

/// The whole matrix, a grid per port and protocol: `.` allowed and `X` denied as expected,
/// `A!` allowed but expected denied, `D!` denied but expected allowed, `-` loopback (ignored).
fn render(want: &Cells, got: &Cells, from: &[End], to: &[End]) -> String {
    let mut out = String::from(
        "    legend: . allowed, X denied (as expected); A! allowed but expected denied; D! denied but expected allowed; - loopback\n",
    );
    for i in 0..PORTS.len() {
        out += &format!("    {:<8}", port_label(i));
        for dst in to {
            out += &format!("{:>5}", dst.label);
        }
        out += "\n";
        for (s, src) in from.iter().enumerate() {
            out += &format!("    {:<8}", src.label);
            for d in 0..to.len() {
                let cell = match (want.get(&(s, d, i)), got.get(&(s, d, i))) {
                    (None, _) => "-",
                    (Some(true), Some(true)) => ".",
                    (Some(false), Some(false)) => "X",
                    (Some(false), Some(true)) => "A!",
                    (Some(true), _) => "D!",
                    (Some(false), None) => "?!",
                };
                out += &format!("{cell:>5}");
            }
            out += "\n";
        }
    }
    out
}

fn deadline() -> Duration {
    let s = std::env::var("NETPOL_DEADLINE_S").ok().and_then(|s| s.parse().ok());
    Duration::from_secs(s.unwrap_or(10))
}

/// Probes until the matrix equals the evaluator's expectation (Ok: how long that took), or
/// the deadline passes (Err: the differing cells and the whole matrix).
/// The source address `node` picks for `dst`, as `ip route get` on the node says.
fn source_toward(node: &str, dst: IpAddr) -> IpAddr {
    let out = Command::new(repo().join("scripts/k8s-lab.sh"))
        .args(["exec", node, "ip", "-4", "-o", "route", "get", &dst.to_string()])
        .output()
        .expect("k8s-lab.sh exec");
    let text = String::from_utf8_lossy(&out.stdout);
    let src = text.split_whitespace().skip_while(|w| *w != "src").nth(1);
    src.and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no source address in `ip route get {dst}` on {node}: {text}"))
}

fn check(kube: &Kube, with_hosts: bool) -> Result<Duration, String> {
    let t0 = Instant::now();
    let mut cluster = kube.cluster();
    // A hostNetwork pod stands for its node, whose traffic to pods on other nodes leaves
    // from the node's source address toward the pod network (own-node traffic always passes).
    for (i, src) in kube.node_sources.iter().enumerate() {
        let key = PodKey::new(HOST_NS, &format!("node{}", i + 1));
        if let Some(pod) = cluster.pods.get_mut(&key) {
            pod.ips = vec![*src];
        }
    }
    let to = pods();
    let from: Vec<End> = match with_hosts {
        true => pods().into_iter().chain(hosts()).collect(),
        false => pods(),
    };
    let want = expected(&cluster, &from, &to);
    loop {
        let got = probe(kube, &cluster, &from, &to)?;
        let diff = differences(&want, &got, &from, &to);
        if diff.is_empty() {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() >= deadline() {
            let shown = diff.iter().take(12).cloned().collect::<Vec<_>>().join("; ");
            let more = diff.len().saturating_sub(12);
            let more = if more > 0 { format!("; and {more} more") } else { String::new() };
            return Err(format!(
                "{} cells differ after {:.1} s: {shown}{more}\n{}",
                diff.len(),
                t0.elapsed().as_secs_f64(),
                render(&want, &got, &from, &to)
            ));
        }
    }
}

// ------------------------------------------------------------------------------------------
// the scenarios

enum Action {
    Apply(String),
    Kubectl(Vec<String>),
    DeleteAll,
}

struct Phase {
    what: &'static str,
    actions: Vec<Action>,
    hosts: bool,
}

struct Scenario {
    n: u32,
    name: &'static str,
    phases: Vec<Phase>,
}

fn np(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: \"{ns}\"}}\nspec: {spec}\n---\n"
    )
}

fn phase(what: &'static str, actions: Vec<Action>) -> Phase {
    Phase { what, actions, hosts: false }
}

fn apply(policies: &[String]) -> Vec<Action> {
    match policies.is_empty() {
        true => Vec::new(),
        false => vec![Action::Apply(policies.concat())],
    }
}

fn kubectl(args: &[&str]) -> Vec<Action> {
    vec![Action::Kubectl(args.iter().map(|s| (*s).to_owned()).collect())]
}

fn one(n: u32, name: &'static str, policies: &[String]) -> Scenario {
    Scenario { n, name, phases: vec![phase("", apply(policies))] }
}

const POD_A: &str = "{matchLabels: {pod: a}}";
const NOT_X: &str =
    "{matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: [x]}]}";

fn ns_is(ns: &str) -> String {
    format!("{{matchLabels: {{kubernetes.io/metadata.name: \"{ns}\"}}}}")
}

/// x/a's ingress from `from` (a YAML flow list of peers).
fn a_from(name: &str, from: &str) -> String {
    np(
        "x",
        name,
        &format!("{{podSelector: {POD_A}, policyTypes: [Ingress], ingress: [{{from: {from}}}]}}"),
    )
}

/// x/a's ingress on `ports` (a YAML flow list) from anyone.
fn a_ports(name: &str, ports: &str) -> String {
    np(
        "x",
        name,
        &format!("{{podSelector: {POD_A}, policyTypes: [Ingress], ingress: [{{ports: {ports}}}]}}"),
    )
}

fn a_egress_to(name: &str, to: &str) -> String {
    np(
        "x",
        name,
        &format!("{{podSelector: {POD_A}, policyTypes: [Egress], egress: [{{to: {to}}}]}}"),
    )
}

/// The 26 scenarios of k8s-wave §2.4; `y_b` is y/b's address, `x_b` x/b's.
fn scenarios(y_b: IpAddr, x_b: IpAddr, n2_source: IpAddr) -> Vec<Scenario> {
    let deny_ingress_x = np("x", "deny-ingress", "{podSelector: {}, policyTypes: [Ingress]}");
    let ns_y = ns_is("y");
    let y_tcp_81 = np(
        "x",
        "y-tcp-81",
        &format!(
            "{{podSelector: {POD_A}, ingress: [{{from: [{{namespaceSelector: {ns_y}}}], ports: [{{protocol: TCP, port: 81}}]}}]}}"
        ),
    );
    let y_tcp_80 = np(
        "x",
        "y-tcp-80",
        &format!(
            "{{podSelector: {POD_A}, ingress: [{{from: [{{namespaceSelector: {ns_y}}}], ports: [{{protocol: TCP, port: 80}}]}}]}}"
        ),
    );
    vec![
        one(1, "no-policy", &[]),
        one(2, "deny-ingress-x", std::slice::from_ref(&deny_ingress_x)),
        one(
            3,
            "deny-all-x",
            &[np("x", "deny-all", "{podSelector: {}, policyTypes: [Ingress, Egress]}")],
        ),
        one(4, "x-a-from-pod-b", &[a_from("from-b", "[{podSelector: {matchLabels: {pod: b}}}]")]),
        one(5, "x-a-from-ns-y", &[a_from("from-y", &format!("[{{namespaceSelector: {ns_y}}}]"))]),
        one(6, "x-a-from-all-namespaces", &[a_from("from-all-ns", "[{namespaceSelector: {}}]")]),
        one(
            7,
            "x-a-from-ns-not-x-or-pod-b",
            &[a_from(
                "two-peers",
                &format!(
                    "[{{namespaceSelector: {NOT_X}}}, {{podSelector: {{matchLabels: {{pod: b}}}}}}]"
                ),
            )],
        ),
        one(
            8,
            "x-a-from-ns-not-x-and-pod-b",
            &[a_from(
                "one-peer",
                &format!(
                    "[{{namespaceSelector: {NOT_X}, podSelector: {{matchLabels: {{pod: b}}}}}}]"
                ),
            )],
        ),
        Scenario {
            n: 9,
            name: "match-expressions",
            phases: vec![
                phase(
                    "ns In [y, z] and pod NotIn [a]",
                    apply(&[a_from(
                        "exprs",
                        "[{namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: In, values: [\"y\", \"z\"]}]}, podSelector: {matchExpressions: [{key: pod, operator: NotIn, values: [a]}]}}]",
                    )]),
                ),
                phase(
                    "ns Exists and pod DoesNotExist (matches nobody)",
                    apply(&[a_from(
                        "exprs",
                        "[{namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: Exists}]}, podSelector: {matchExpressions: [{key: pod, operator: DoesNotExist}]}}]",
                    )]),
                ),
                phase(
                    "pod Exists and target DoesNotExist (matches everyone)",
                    apply(&[a_from(
                        "exprs",
                        "[{namespaceSelector: {}, podSelector: {matchExpressions: [{key: pod, operator: Exists}, {key: target, operator: DoesNotExist}]}}]",
                    )]),
                ),
            ],
        },
        one(10, "x-a-from-ns-y-tcp-81", std::slice::from_ref(&y_tcp_81)),
        one(11, "x-a-from-ns-y-tcp-81-plus-80", &[y_tcp_81.clone(), y_tcp_80]),
        one(
            12,
            "x-port-80-plus-allow-all",
            &[
                np("x", "port-80", "{podSelector: {}, ingress: [{ports: [{port: 80}]}]}"),
                np("x", "allow-all", "{podSelector: {}, ingress: [{}]}"),
            ],
        ),
        one(
            13,
            "x-named-port-serve-81-tcp",
            &[np("x", "named-81", "{podSelector: {}, ingress: [{ports: [{port: serve-81-tcp}]}]}")],
        ),
        one(
            14,
            "x-egress-named-port-serve-80-tcp",
            &[np(
                "x",
                "egress-named-80",
                "{podSelector: {}, policyTypes: [Egress], egress: [{ports: [{port: serve-80-tcp}]}]}",
            )],
        ),
        one(
            15,
            "x-named-port-wrong-protocol",
            &[np(
                "x",
                "wrong-protocol",
                "{podSelector: {}, ingress: [{ports: [{port: serve-80-udp, protocol: TCP}]}]}",
            )],
        ),
        Scenario {
            n: 16,
            name: "x-a-end-port",
            phases: vec![
                phase(
                    "TCP 80-81",
                    apply(&[a_ports("range", "[{protocol: TCP, port: 80, endPort: 81}]")]),
                ),
                phase(
                    "TCP 79-80",
                    apply(&[a_ports("range", "[{protocol: TCP, port: 79, endPort: 80}]")]),
                ),
                phase(
                    "UDP 80-81",
                    apply(&[a_ports("range", "[{protocol: UDP, port: 80, endPort: 81}]")]),
                ),
            ],
        },
        one(17, "x-a-tcp-any-port", &[a_ports("tcp-any", "[{protocol: TCP}]")]),
        Scenario {
            n: 18,
            name: "x-a-udp-or-sctp-81-only",
            phases: vec![
                phase("UDP 81", apply(&[a_ports("only-81", "[{protocol: UDP, port: 81}]")])),
                phase("SCTP 81", apply(&[a_ports("only-81", "[{protocol: SCTP, port: 81}]")])),
            ],
        },
        one(
            19,
            "x-a-deny-egress",
            &[np(
                "x",
                "deny-egress",
                &format!("{{podSelector: {POD_A}, policyTypes: [Egress], egress: []}}"),
            )],
        ),
        one(
            20,
            "x-a-egress-to-y-a-beats-y-ingress",
            &[
                a_egress_to(
                    "to-y-a",
                    &format!("[{{namespaceSelector: {ns_y}, podSelector: {POD_A}}}]"),
                ),
                np(
                    "y",
                    "from-x-a",
                    &format!(
                        "{{podSelector: {{matchExpressions: [{{key: pod, operator: In, values: [a, b]}}]}}, policyTypes: [Ingress], ingress: [{{from: [{{namespaceSelector: {}, podSelector: {POD_A}}}]}}]}}",
                        ns_is("x")
                    ),
                ),
            ],
        ),
        one(
            21,
            "x-a-egress-ipblock-y-b",
            &[a_egress_to("to-y-b", &format!("[{{ipBlock: {{cidr: {y_b}/32}}}}]"))],
        ),
        Scenario {
            n: 22,
            name: "x-a-egress-ipblock-except",
            phases: vec![
                phase(
                    "range except x/b",
                    apply(&[a_egress_to(
                        "range-except",
                        &format!("[{{ipBlock: {{cidr: {POD_RANGE}, except: [{x_b}/32]}}}}]"),
                    )]),
                ),
                phase(
                    "plus x/b/32",
                    apply(&[a_egress_to("x-b", &format!("[{{ipBlock: {{cidr: {x_b}/32}}}}]"))]),
                ),
            ],
        },
        Scenario {
            n: 23,
            name: "update-and-delete",
            phases: vec![
                phase(
                    "allow-all",
                    apply(&[np("x", "update-me", "{podSelector: {}, ingress: [{}]}")]),
                ),
                phase(
                    "updated in place to ingress: []",
                    apply(&[np("x", "update-me", "{podSelector: {}, ingress: []}")]),
                ),
                phase("every policy deleted", vec![Action::DeleteAll]),
            ],
        },
        Scenario {
            n: 24,
            name: "label-changes",
            phases: vec![
                phase(
                    "x/a from ns team=blue (none yet); y isolates target=isolated (none yet)",
                    apply(&[
                        a_from("from-blue", "[{namespaceSelector: {matchLabels: {team: blue}}}]"),
                        np(
                            "y",
                            "isolate-target",
                            "{podSelector: {matchLabels: {target: isolated}}, policyTypes: [Ingress]}",
                        ),
                    ]),
                ),
                phase(
                    "namespace y labelled team=blue",
                    kubectl(&["label", "namespace", "y", "team=blue"]),
                ),
                phase(
                    "pod y/b labelled target=isolated",
                    kubectl(&["label", "pod", "-n", "y", "b", "target=isolated"]),
                ),
            ],
        },
        Scenario {
            n: 25,
            name: "own-node-and-host-network",
            phases: vec![Phase {
                what: "x denies ingress; x/a allows the address wk8s-n2 reaches pods from",
                actions: apply(&[
                    deny_ingress_x,
                    a_from("from-node-2", &format!("[{{ipBlock: {{cidr: {n2_source}/32}}}}]")),
                ]),
                hosts: true,
            }],
        },
    ]
}

/// Scenario 26: a TCP connection x/b -> x/a:80 opened before x denies ingress. The default
/// rule (docs/network-policy.md): established connections are kept; new ones are denied.
fn scenario_26(kube: &Kube) -> Vec<String> {
    let mut failures = Vec::new();
    let cluster = kube.cluster();
    let a = ip_of(&cluster, &PodKey::new("x", "a"));
    let hold_s = deadline().as_secs() + 10;
    let mut hold: Child = kube
        .cmd()
        .args([
            "exec",
            "-n",
            "x",
            "b",
            "--",
            "/weft-netprobe",
            "hold",
            &format!("{a}:80"),
            &hold_s.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl exec hold");
    let mut lines = BufReader::new(hold.stdout.take().expect("stdout")).lines();
    match lines.next() {
        Some(Ok(l)) if l == "connected" => {}
        other => {
            let _ = hold.kill();
            let out =
                hold.wait_with_output().map(|o| String::from_utf8_lossy(&o.stderr).into_owned());
            return vec![format!("x/b could not open a connection to x/a:80 ({other:?}, {out:?})")];
        }
    }
    let deny = np("x", "deny-ingress", "{podSelector: {}, policyTypes: [Ingress]}");
    if let Err(e) = kube.apply(&deny).and_then(|()| check(kube, false).map(|_| ())) {
        failures.push(format!("after deny-ingress on x: {e}"));
    }
    let last = lines.map_while(Result::ok).last();
    let status = hold.wait().expect("wait for kubectl exec hold");
    match (status.success(), last.as_deref()) {
        (true, Some(l)) if l.starts_with("kept") => {}
        _ => failures.push(format!(
            "the established connection x/b -> x/a:80 was not kept (documented default): {last:?}, {status}"
        )),
    }
    failures
}

fn run_phase(kube: &Kube, p: &Phase) -> Result<Duration, String> {
    for action in &p.actions {
        match action {
            Action::Apply(yaml) => kube.apply(yaml)?,
            Action::Kubectl(args) => {
                kube.run(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
            }
            Action::DeleteAll => {
                kube.run(&["delete", "networkpolicy", "--all", "--all-namespaces", "--wait=true"])?;
            }
        }
    }
    check(kube, p.hosts)
}

// ------------------------------------------------------------------------------------------
// the other paths between nodes

/// The scenarios run again over each other path: cross-node ingress and egress, pod and
/// namespace selectors, a named port.
const OVERLAY_SCENARIOS: [u32; 4] = [4, 8, 14, 19];

/// A node agent's `/status` report, from its status listener on the node's address.
fn node_status(node: usize) -> Result<Value, String> {
    let addr = format!("10.98.0.{}:6782", 10 + node);
    let sock: std::net::SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut conn = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(2))
        .map_err(|e| format!("{addr}: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    conn.write_all(b"GET /status HTTP/1.0\r\nHost: weft\r\n\r\n").map_err(|e| e.to_string())?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut conn, &mut text).map_err(|e| format!("{addr}: {e}"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    serde_json::from_str(body).map_err(|e| format!("{addr}/status: {e}: {body:.200}"))
}

/// Whether `node`'s agent relays to some peer through another.
fn relays(node: usize) -> bool {
    node_status(node)
        .is_ok_and(|r| r["overlay"]["relayed"].as_array().is_some_and(|a| !a.is_empty()))
}

/// Whether every link of every agent is on sleeve, each agent with a link to both others.
fn all_on_sleeve() -> bool {
    (1..=NODES.len()).all(|n| {
        node_status(n).is_ok_and(|r| {
            let links = r["overlay"]["links"].as_array().cloned().unwrap_or_default();
            links.len() == NODES.len() - 1 && links.iter().all(|l| l["mode"] == "sleeve")
        })
    })
}

/// The underlay between two nodes cut (a bridge-family table in the lab's underlay namespace,
/// as `scripts/k8s-lab.sh` names its ports), healed on drop.
struct Cut;

impl Cut {
    fn between(a: usize, b: usize) -> Cut {
        let t = "bridge netpolcut";
        let script = format!(
            "add table {t}; add chain {t} cut {{ type filter hook forward priority 0; }}; \
             add rule {t} cut iifname \"n{a}\" oifname \"n{b}\" drop; \
             add rule {t} cut iifname \"n{b}\" oifname \"n{a}\" drop"
        );
        let status = Command::new("ip")
            .args(["netns", "exec", "wk8s-ul", "nft", &script])
            .status()
            .expect("ip netns exec wk8s-ul nft");
        assert!(status.success(), "nft refused {script}");
        Cut
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "exec", "wk8s-ul", "nft", "delete", "table", "bridge", "netpolcut"])
            .status();
    }
}

/// The overlay scenarios over relayed traffic, then over sleeve; how many ran and the failing
/// ones, labelled. With `restore`, the agents go back to their settings afterwards (on a lab
/// that is not ours).
fn over_other_paths(
    kube: &Kube,
    all: &[Scenario],
    t0: Instant,
    restore: bool,
) -> (usize, Vec<String>) {
    let subset: Vec<&Scenario> = all.iter().filter(|s| OVERLAY_SCENARIOS.contains(&s.n)).collect();
    let mut failed = Vec::new();
    let mut ran = 0;
    {
        let _cut = Cut::between(1, 3);
        wait_until(Duration::from_secs(90), "wk8s-n1 and wk8s-n3 to relay through wk8s-n2", || {
            relays(1) && relays(3)
        });
        eprintln!(
            "==> [{}s] underlay wk8s-n1 <-> wk8s-n3 cut: their traffic is relayed through wk8s-n2",
            t0.elapsed().as_secs()
        );
        for s in &subset {
            ran += 1;
            if !run_scenario(kube, s, "relayed ") {
                failed.push(format!("relayed {}", s.n));
            }
        }
    }
    let patch = r#"[{"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": "--no-fastdp"}]"#;
    kube.must(&["-n", "kube-system", "patch", "daemonset", "weft", "--type=json", "-p", patch]);
    kube.must(&["-n", "kube-system", "rollout", "status", "daemonset/weft", "--timeout=240s"]);
    wait_until(Duration::from_secs(90), "every agent on sleeve to both others", all_on_sleeve);
    eprintln!(
        "==> [{}s] every agent restarted with --no-fastdp: all links on sleeve",
        t0.elapsed().as_secs()
    );
    for s in &subset {
        ran += 1;
        if !run_scenario(kube, s, "sleeve ") {
            failed.push(format!("sleeve {}", s.n));
        }
    }
    if restore {
        kube.must(&["-n", "kube-system", "rollout", "undo", "daemonset/weft"]);
        kube.must(&["-n", "kube-system", "rollout", "status", "daemonset/weft", "--timeout=240s"]);
    }
    (ran, failed)
}

fn selected() -> Option<Vec<u32>> {
    let s = std::env::var("NETPOL_SCENARIOS").ok()?;
    Some(s.split([',', ' ']).filter_map(|n| n.trim().parse().ok()).collect())
}

#[test]
#[ignore = "needs the Kubernetes lab: scripts/test.sh runs it after the journey"]
fn network_policy_conformance_matrix() {
    require_root();
    let t0 = Instant::now();
    let lab = Lab::up();
    let mut kube = Kube::from_lab();
    workloads(&kube);
    eprintln!(
        "==> [{}s] 9 probe pods in x, y, z Ready, 3 hostNetwork probe pods",
        t0.elapsed().as_secs()
    );
    let cluster = kube.cluster();
    let (y_b, x_b) =
        (ip_of(&cluster, &PodKey::new("y", "b")), ip_of(&cluster, &PodKey::new("x", "b")));
    let x_a = ip_of(&cluster, &PodKey::new("x", "a"));
    // x/a runs on wk8s-n1 and x/b on wk8s-n2: each node's route to a pod elsewhere.
    kube.node_sources =
        NODES.iter().map(|n| source_toward(n, if *n == NODES[0] { x_b } else { x_a })).collect();
    let n2_source = kube.node_sources[1];
    let only = selected();
    let wanted = |n: u32| only.as_ref().is_none_or(|o| o.contains(&n));
    let mut failed = Vec::new();
    let mut ran = 0;
    let all = scenarios(y_b, x_b, n2_source);
    for s in all.iter().filter(|s| wanted(s.n)) {
        ran += 1;
        if !run_scenario(&kube, s, "") {
            failed.push(s.n.to_string());
        }
    }
    if wanted(26) {
        reset(&kube);
        ran += 1;
        let started = Instant::now();
        let problems = scenario_26(&kube);
        report("", 26, "established-connection-kept", &problems, &[], started);
        if !problems.is_empty() {
            failed.push("26".to_owned());
        }
    }
    let overlays = std::env::var("NETPOL_OVERLAYS").map_or(only.is_none(), |v| !v.is_empty());
    if overlays {
        let (n, f) = over_other_paths(&kube, &all, t0, !lab.ours);
        ran += n;
        failed.extend(f);
    }
    reset(&kube);
    eprintln!("==> [{}s] {} of {ran} scenarios pass", t0.elapsed().as_secs(), ran - failed.len());
    assert!(failed.is_empty(), "scenarios failing: {failed:?}");
}

/// One scenario from no policies: each phase applied and its matrix probed; whether all passed.
fn run_scenario(kube: &Kube, s: &Scenario, label: &str) -> bool {
    reset(kube);
    let started = Instant::now();
    let mut problems = Vec::new();
    let mut times = Vec::new();
    for (i, p) in s.phases.iter().enumerate() {
        let what = if s.phases.len() > 1 {
            format!("phase {} ({}): ", i + 1, p.what)
        } else {
            String::new()
        };
        match run_phase(kube, p) {
            Ok(t) => times.push(format!("{:.1}", t.as_secs_f64())),
            Err(e) => problems.push(format!("{what}{e}")),
        }
    }
    report(label, s.n, s.name, &problems, &times, started);
    problems.is_empty()
}

fn report(
    label: &str,
    n: u32,
    name: &str,
    problems: &[String],
    times: &[String],
    started: Instant,
) {
    let took = started.elapsed().as_secs_f64();
    if problems.is_empty() {
        let conv = if times.is_empty() {
            String::new()
        } else {
            format!(", matrix equal after {} s", times.join("/"))
        };
        eprintln!("{label}scenario {n} {name}: pass ({took:.1} s{conv})");
        return;
    }
    let first = problems
        .iter()
        .map(|p| p.lines().next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join(" | ");
    eprintln!("{label}scenario {n} {name}: {first}");
    for p in problems {
        for l in p.lines().skip(1) {
            eprintln!("{l}");
        }
    }
}
