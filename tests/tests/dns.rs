//! weave.local DNS with real agents on a namespace underlay, queried with dig from pod
//! namespaces, ported from Weave's 2xx scenarios: names on three hosts (210), names vanishing
//! and coming back across detach/attach and agent kill/start cycles, stale names of a
//! restarted peer (215), custom domains and subdomains (220, 225), short names (230),
//! dns-add/dns-remove (240), case (245), negative answers (250), removal with the endpoint
//! (260), reverse lookups of a reused address (265), the upstream fallback (290), 50 records
//! over UDP and TCP (295), expose -h (200) and --no-dns (205).

use std::collections::BTreeSet;
use std::process::{Child, Stdio};
use std::time::Duration;

use weft_e2e::*;

const T: Duration = Duration::from_secs(30);
/// Issue 6: a restarted peer's stale entries are gone everywhere within this.
const STALE_GONE: Duration = Duration::from_secs(5);

/// One agent per lab host, each told about all the others, each exposed (its DNS server
/// listens on its bridge address). Returns the agents and their DNS addresses.
fn hosts(lab: &Lab, hosts: Vec<Netns>, extra: &[&str]) -> (Vec<Agent>, Vec<String>) {
    let agents = lab.agents(hosts, extra);
    let servers = agents.iter().map(expose).collect();
    (agents, servers)
}

/// `weft expose`: the host's bridge address, where its DNS server listens.
fn expose(a: &Agent) -> String {
    let out = must(a.weft().arg("expose"));
    out.lines().next().and_then(|l| l.split('/').next()).unwrap_or_default().to_owned()
}

/// A pod attached with `--name` (none: no name); returns it and its address.
fn pod(a: &Agent, name: Option<&str>, addrs: &[&str]) -> (Netns, String) {
    let ns = Netns::new("p");
    let mut cmd = a.weft();
    cmd.arg("attach").args(addrs).arg("--netns").arg(ns.path());
    if let Some(n) = name {
        cmd.args(["--name", n]);
    }
    let got = must(&mut cmd);
    let ip = got.trim().split('/').next().unwrap_or_default().to_owned();
    (ns, ip)
}

fn detach(a: &Agent, ns: &Netns) {
    must(a.weft().args(["detach", "--netns"]).arg(ns.path()));
}

/// One dig answer.
#[derive(Debug, Default)]
struct Dig {
    status: String,
    flags: Vec<String>,
    /// (owner name, type, data) of the answer section.
    answers: Vec<(String, String, String)>,
    ttls: Vec<u32>,
}

impl Dig {
    /// The data of the answers, sorted.
    fn data(&self) -> Vec<String> {
        let mut v: Vec<String> = self.answers.iter().map(|a| a.2.clone()).collect();
        v.sort();
        v
    }
}

/// Runs dig in `ns` against `server`.
fn dig(ns: &Netns, server: &str, args: &[&str]) -> Dig {
    let out = run(ns
        .cmd("dig")
        .arg(format!("@{server}"))
        .args(["+noall", "+comments", "+answer", "+tries=1", "+time=2"])
        .args(args));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut d = Dig::default();
    for line in text.lines() {
        if let Some(rest) = line.split("status: ").nth(1) {
            d.status = rest.split(',').next().unwrap_or_default().to_owned();
        } else if let Some(rest) = line.strip_prefix(";; flags: ") {
            let flags = rest.split(';').next().unwrap_or_default();
            d.flags = flags.split_whitespace().map(str::to_owned).collect();
        } else if !line.starts_with(';') && !line.trim().is_empty() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() >= 5 {
                d.answers.push((f[0].to_owned(), f[3].to_owned(), f[4..].join(" ")));
                d.ttls.push(f[1].parse().unwrap_or(u32::MAX));
            }
        }
    }
    d
}

/// Waits until `name` (type A) resolves to exactly `want` from `ns` through `server`.
fn wait_resolves(ns: &Netns, server: &str, name: &str, want: &[&str]) {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    let mut last = Dig::default();
    wait_until(T, &format!("{name} -> {want:?} via {server}"), || {
        last = dig(ns, server, &[name]);
        last.status == "NOERROR" && last.data() == want
    });
}

/// Waits until `name` is NXDOMAIN from `ns` through `server`.
fn wait_gone(ns: &Netns, server: &str, name: &str, within: Duration) {
    wait_until(within, &format!("{name} to be NXDOMAIN via {server}"), || {
        dig(ns, server, &[name]).status == "NXDOMAIN"
    });
}

#[test]
fn names_on_three_hosts_resolve_everywhere_and_follow_their_pods_210() {
    let (lab, h) = Lab::new(3, 1500);
    let (a, dns) = hosts(&lab, h, &[]);
    // Unique names, and the same two names on every host.
    let mut pods = Vec::new();
    let mut foo = Vec::new();
    for (i, x) in a.iter().enumerate() {
        pods.push(pod(x, Some(&format!("c{}", i + 1)), &[]));
        let f = pod(x, Some("foo"), &[]);
        foo.push(f.1.clone());
        pods.push(f);
        pods.push(pod(x, Some("bar.weave.local"), &[]));
    }
    let (client, _) = pod(&a[0], None, &[]);
    let client = &client;
    for (i, server) in dns.iter().enumerate() {
        let (_, ip) = &pods[(i + 1) % 3 * 3];
        wait_resolves(client, server, &format!("c{}.weave.local", (i + 1) % 3 + 1), &[ip]);
        let foo: Vec<&str> = foo.iter().map(String::as_str).collect();
        wait_resolves(client, server, "foo.weave.local", &foo);
        assert_eq!(dig(client, server, &["bar.weave.local"]).answers.len(), 3);
    }
    let d = dig(client, &dns[0], &["c2.weave.local"]);
    assert!(d.flags.contains(&"aa".to_owned()), "authoritative: {d:?}");
    assert_eq!(d.ttls, vec![1], "TTL 1 s by default");

    // Detaching removes the names everywhere (260); attaching brings them back with the
    // current addresses.
    for cycle in 0..3 {
        for (i, x) in a.iter().enumerate() {
            for p in &pods[i * 3..i * 3 + 3] {
                detach(x, &p.0);
            }
        }
        for server in &dns {
            wait_gone(client, server, "foo.weave.local", T);
            wait_gone(client, server, "c3.weave.local", T);
        }
        let mut now = Vec::new();
        for (i, x) in a.iter().enumerate() {
            let base = (cycle * 7 + i * 2 + 10) as u8;
            let (_, ip) = reattach(x, &pods[i * 3 + 1].0, "foo", &format!("ip:10.40.{base}.9/12"));
            now.push(ip);
            reattach(x, &pods[i * 3].0, &format!("c{}", i + 1), "net:default");
            reattach(x, &pods[i * 3 + 2].0, "bar", "net:default");
        }
        let want: Vec<&str> = now.iter().map(String::as_str).collect();
        for server in &dns {
            wait_resolves(client, server, "foo.weave.local", &want);
        }
    }

    // dns-add: two more addresses for a name registered by an endpoint.
    must(a[1].weft().args(["dns-add", "10.2.0.1", "10.2.0.2", "-h", "c2.weave.local"]));
    let c2 = must(a[1].weft().args(["dns-lookup", "c2"]));
    let mut want: Vec<&str> = c2.lines().collect();
    assert_eq!(want.len(), 3, "{c2}");
    want.sort();
    wait_resolves(client, &dns[2], "c2.weave.local", &want);
    // Status lists every host's entries with their origin.
    let st = must(a[2].weft().args(["status", "dns"]));
    assert!(st.contains("c1.weave.local.") && st.contains("(h1)"), "{st}");
    let json: Value = serde_json::from_str(&must(a[2].weft().args(["status", "dns", "--json"])))
        .expect("status dns --json");
    assert!(json["entries"].as_array().is_some_and(|e| e.len() >= 11), "{json}");
}

/// Attaches `ns` again with a name and an address request.
fn reattach(a: &Agent, ns: &Netns, name: &str, addr: &str) -> (String, String) {
    let got =
        must(a.weft().arg("attach").arg(addr).arg("--netns").arg(ns.path()).args(["--name", name]));
    (name.to_owned(), got.trim().split('/').next().unwrap_or_default().to_owned())
}

#[test]
fn names_go_with_a_killed_agent_and_stale_ones_stay_gone_after_restart_215() {
    let (lab, h) = Lab::new(3, 1500);
    let names = ["02:00:00:00:02:15"];
    let mut extra = vec!["--name", names[0], "--no-discovery", lab.ip(2)];
    let mut hs = h.into_iter();
    let mut h1 = Agent::start_in(hs.next().expect("h1"), AgentOpts::nick("h1", &extra));
    let h2 = Agent::start_in(
        hs.next().expect("h2"),
        AgentOpts::nick("h2", &["--no-discovery", lab.ip(3)]),
    );
    let h3 = Agent::start_in(hs.next().expect("h3"), AgentOpts::nick("h3", &["--no-discovery"]));
    let (s1, s3) = (expose(&h1), expose(&h3));
    let (c1, _) = pod(&h1, Some("c1"), &[]);
    let (c2, ip2) = pod(&h1, Some("c2"), &[]);
    let (client, _) = pod(&h3, None, &[]);
    wait_resolves(&client, &s3, "c1.weave.local", &[&pod_ip(&h1, &c1)]);
    wait_resolves(&client, &s3, "c2.weave.local", &[&ip2]);

    // h1 dies; its names go with it from h3 (through h2).
    h1.kill9();
    wait_gone(&client, &s3, "c2.weave.local", T);
    // c1's pod is removed while its agent is down; h1 comes back connected to h3 only.
    drop(c1);
    extra[3] = lab.ip(3);
    h1.restart_with(AgentOpts::nick("h1", &extra));
    // c2 comes back; c1 stays gone everywhere, even though h1 never said goodbye to it.
    wait_resolves(&client, &s3, "c2.weave.local", &[&ip2]);
    wait_gone(&client, &s3, "c1.weave.local", STALE_GONE);
    wait_gone(&c2, &s1, "c1.weave.local", STALE_GONE);
    wait_resolves(&c2, &s1, "c2.weave.local", &[&ip2]);
    drop(h2);
}

/// The address `a` gave the pod `ns`.
fn pod_ip(a: &Agent, ns: &Netns) -> String {
    let path = ns.path().display().to_string();
    a.endpoints()
        .iter()
        .find(|e| e["netns"].as_str() == Some(path.as_str()))
        .and_then(|e| {
            e["addresses"][0].as_str().map(|s| s.split('/').next().unwrap_or_default().to_owned())
        })
        .unwrap_or_else(|| panic!("no endpoint for {path}"))
}

#[test]
fn custom_domain_subdomains_and_short_names_220_225_230() {
    let (lab, h) = Lab::new(1, 1500);
    let (a, dns) = hosts(&lab, h, &["--dns-domain", "foo.bar"]);
    let (client, _) = pod(&a[0], Some("seeone"), &[]);
    let (_p1, ip1) = pod(&a[0], Some("x.sub1.foo.bar"), &[]);
    let (_p2, ip2) = pod(&a[0], Some("y.sub2.Foo.Bar."), &[]);
    wait_resolves(&client, &dns[0], "x.sub1.foo.bar", &[&ip1]);
    wait_resolves(&client, &dns[0], "y.sub2.foo.bar", &[&ip2]);
    let me = pod_ip(&a[0], &client);
    wait_resolves(&client, &dns[0], "seeone.foo.bar", &[&me]);
    // A resolver that does not apply search domains asks for the bare name.
    wait_resolves(&client, &dns[0], "seeone", &[&me]);
    assert_eq!(dig(&client, &dns[0], &["z.sub1.foo.bar"]).status, "NXDOMAIN");
    // Names outside the domain are refused at registration, with the reason.
    let out = run(a[0].weft().args(["dns-add", "10.9.9.9", "-h", "db.weave.local"]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in the domain foo.bar."), "{out:?}");
}

#[test]
fn dns_add_and_remove_combinations_persist_240() {
    let (lab, h) = Lab::new(1, 1500);
    let (mut a, dns) = hosts(&lab, h, &[]);
    let (client, ip) = pod(&a[0], None, &[]);
    let path = client.path().display().to_string();
    let w = |args: &[&str]| must(a[0].weft().args(args));
    // ip + endpoint + name; endpoint + name; ip + name (no endpoint).
    w(&["dns-add", "10.2.3.4", &path, "-h", "one"]);
    w(&["dns-add", &path, "-h", "two.weave.local"]);
    w(&["dns-add", "10.5.5.5", "-h", "three"]);
    w(&["dns-add", "10.5.5.6", "-h", "three"]);
    wait_resolves(&client, &dns[0], "one.weave.local", &["10.2.3.4"]);
    wait_resolves(&client, &dns[0], "two.weave.local", &[&ip]);
    wait_resolves(&client, &dns[0], "three.weave.local", &["10.5.5.5", "10.5.5.6"]);
    // Removing one address of a name keeps the other; removing one name keeps the others.
    assert_eq!(w(&["dns-remove", "10.5.5.5", "-h", "three"]).trim(), "1 records removed");
    wait_resolves(&client, &dns[0], "three.weave.local", &["10.5.5.6"]);
    w(&["dns-remove", &path, "-h", "two"]);
    wait_gone(&client, &dns[0], "two.weave.local", T);
    wait_resolves(&client, &dns[0], "one.weave.local", &["10.2.3.4"]);
    // What was added by hand survives a restart.
    a[0].stop();
    a[0].restart();
    wait_resolves(&client, &dns[0], "one.weave.local", &["10.2.3.4"]);
    wait_resolves(&client, &dns[0], "three.weave.local", &["10.5.5.6"]);
    // A name tied to an endpoint goes with it.
    detach(&a[0], &client);
    let (other, _) = pod(&a[0], None, &[]);
    wait_gone(&other, &dns[0], "one.weave.local", T);
    wait_resolves(&other, &dns[0], "three.weave.local", &["10.5.5.6"]);
    // Bad requests say what to fix.
    let out = run(a[0].weft().args(["dns-add", "nosuchendpoint", "-h", "x"]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown endpoint"), "{out:?}");
    let out = run(a[0].weft().args(["dns-remove"]));
    assert_eq!(out.status.code(), Some(2), "usage error: {out:?}");
}

#[test]
fn case_negative_answers_and_expose_names_200_245_250() {
    let (lab, h) = Lab::new(1, 1500);
    let (a, dns) = hosts(&lab, h, &[]);
    let (client, ip1) = pod(&a[0], Some("SeEtWo"), &[]);
    let (_p, ip2) = pod(&a[0], Some("seetwo"), &[]);
    for q in ["seetwo.weave.local", "SEETWO.WEAVE.LOCAL", "SeeTwo.Weave.Local"] {
        wait_resolves(&client, &dns[0], q, &[&ip1, &ip2]);
    }
    let rev: Vec<&str> = ip1.split('.').rev().collect();
    let ptr = format!("{}.in-addr.arpa", rev.join("."));
    for q in [ptr.clone(), ptr.to_uppercase()] {
        let d = dig(&client, &dns[0], &["-t", "PTR", &q]);
        assert_eq!(d.data().len(), 1, "{d:?}");
        assert_eq!(d.data()[0].to_ascii_lowercase(), "seetwo.weave.local.", "{d:?}");
    }
    let mx = dig(&client, &dns[0], &["-t", "MX", "seetwo.weave.local"]);
    assert_eq!((mx.status.as_str(), mx.answers.len()), ("NOERROR", 0), "{mx:?}");
    assert_eq!(dig(&client, &dns[0], &["xx.weave.local"]).status, "NXDOMAIN");
    // expose -h names the host's bridge address.
    must(a[0].weft().args(["expose", "-h", "testexpose1.weave.local"]));
    wait_resolves(&client, &dns[0], "testexpose1.weave.local", &[&dns[0]]);
}

#[test]
fn reverse_lookups_of_a_reused_address_give_the_live_name_265() {
    let (lab, h) = Lab::new(1, 1500);
    let (a, dns) = hosts(&lab, h, &[]);
    let (client, _) = pod(&a[0], None, &[]);
    let mut prev: Option<String> = None;
    for name in ["acontainer", "bcontainer", "ccontainer"] {
        let (ns, ip) = pod(&a[0], Some(name), &["ip:10.32.55.55/12"]);
        assert_eq!(ip, "10.32.55.55");
        wait_resolves(&client, &dns[0], &format!("{name}.weave.local"), &[&ip]);
        if let Some(p) = &prev {
            wait_gone(&client, &dns[0], &format!("{p}.weave.local"), T);
        }
        let d = dig(&client, &dns[0], &["-x", &ip]);
        assert_eq!(d.data(), vec![format!("{name}.weave.local.")], "{d:?}");
        detach(&a[0], &ns);
        prev = Some(name.to_owned());
    }
}

/// dnsmasq on the underlay (10.99.0.254) playing the host's upstream resolver.
fn upstream(lab: &Lab) -> (Child, std::path::PathBuf) {
    must(lab.underlay.cmd("ip").args(["addr", "add", "10.99.0.254/24", "dev", "br0"]));
    let child = lab
        .underlay
        .cmd("dnsmasq")
        .args([
            "-k",
            "--no-resolv",
            "--no-hosts",
            "--listen-address=10.99.0.254",
            "--bind-interfaces",
            "--host-record=www.weave.works,192.0.2.7",
            "--local=/invalid/",
            "--mx-host=weave.works,mail.weave.works,10",
            "--host-record=dns.example.test,192.0.2.88",
            "--pid-file=",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting dnsmasq (install dnsmasq-base)");
    let conf = std::path::PathBuf::from("/run/wte").join(format!("{}.resolv", lab.underlay.name));
    std::fs::create_dir_all("/run/wte").expect("/run/wte");
    std::fs::write(&conf, "nameserver 10.99.0.254\n").expect("resolv.conf");
    (child, conf)
}

#[test]
fn other_names_and_unknown_addresses_go_upstream_290() {
    let (lab, h) = Lab::new(1, 1500);
    let (mut dnsmasq, conf) = upstream(&lab);
    let conf_arg = conf.display().to_string();
    let (a, dns) = hosts(&lab, h, &["--resolv-conf", &conf_arg]);
    let (client, _) = pod(&a[0], Some("local"), &[]);
    let mut last = Dig::default();
    wait_until(T, "MX weave.works answered through the upstream", || {
        last = dig(&client, &dns[0], &["-t", "MX", "weave.works"]);
        last.data() == vec!["10 mail.weave.works."]
    });
    assert_eq!(dig(&client, &dns[0], &["www.weave.works"]).data(), vec!["192.0.2.7"]);
    let ptr = dig(&client, &dns[0], &["-x", "192.0.2.88"]);
    assert_eq!(ptr.data(), vec!["dns.example.test."], "{ptr:?}");
    assert_eq!(dig(&client, &dns[0], &["xx.invalid"]).status, "NXDOMAIN");
    // Our own names still come from us.
    wait_resolves(&client, &dns[0], "local.weave.local", &[&pod_ip(&a[0], &client)]);
    let st = must(a[0].weft().args(["status", "dns"]));
    assert!(st.contains("10.99.0.254:53"), "{st}");
    let _ = dnsmasq.kill();
    let _ = dnsmasq.wait();
    // Without an answering upstream, clients get SERVFAIL rather than silence.
    let d = dig(&client, &dns[0], &["+time=8", "other.weave.works"]);
    assert_eq!(d.status, "SERVFAIL", "{d:?}");
    let _ = std::fs::remove_file(conf);
}

#[test]
fn fifty_records_come_whole_over_tcp_and_truncated_over_udp_295() {
    let (lab, h) = Lab::new(1, 1500);
    let (a, dns) = hosts(&lab, h, &[]);
    let (client, _) = pod(&a[0], None, &[]);
    let addrs: Vec<String> = (1..=50).map(|i| format!("10.77.0.{i}")).collect();
    let mut cmd = a[0].weft();
    cmd.arg("dns-add").args(&addrs).args(["-h", "big"]);
    must(&mut cmd);
    let want: BTreeSet<String> = addrs.iter().cloned().collect();
    for extra in [&[][..], &["+tcp"], &["+bufsize=700"], &["+tcp", "+bufsize=700"]] {
        let mut args = vec!["big.weave.local"];
        args.extend_from_slice(extra);
        let mut last = Dig::default();
        wait_until(T, &format!("50 answers with {extra:?}"), || {
            last = dig(&client, &dns[0], &args);
            last.data().into_iter().collect::<BTreeSet<_>>() == want
        });
    }
    // Over UDP without EDNS the answer does not fit in 512 bytes: truncated, TC set.
    let udp = dig(&client, &dns[0], &["+ignore", "+noedns", "big.weave.local"]);
    assert!(udp.flags.contains(&"tc".to_owned()), "{udp:?}");
    assert!(udp.answers.len() < 50, "{udp:?}");
}

#[test]
fn without_dns_nothing_listens_and_dns_verbs_say_so_205() {
    let (lab, h) = Lab::new(1, 1500);
    let (a, dns) = hosts(&lab, h, &["--no-dns"]);
    let (client, _) = pod(&a[0], Some("quiet"), &[]);
    let d = dig(&client, &dns[0], &["quiet.weave.local"]);
    assert!(d.status.is_empty(), "nothing answers: {d:?}");
    let out = run(a[0].weft().args(["dns-add", "10.1.1.1", "-h", "x"]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-dns"), "{out:?}");
    let st = must(a[0].weft().arg("status"));
    assert!(st.contains("disabled (--no-dns)"), "{st}");
}
