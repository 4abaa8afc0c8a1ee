//! The server and prober of the NetworkPolicy conformance test (tests/tests/netpol.rs), run
//! inside the lab's pods (image `localhost/weft-netprobe`, built by tests/k8s/netpol-lab.sh).
//! Std only, so that the image needs nothing but the binary and the C library.
//!
//!   weft-netprobe serve [PORT...]          TCP and UDP on each PORT (default 80 81): TCP greets
//!                                          and then echoes, UDP echoes each datagram
//!   weft-netprobe probe TARGET...          TARGET is IP:PORT/tcp or IP:PORT/udp; all at once,
//!                                          prints `TARGET ok` or `TARGET denied` per target
//!   weft-netprobe hold TARGET SECONDS      one TCP connection kept for SECONDS, a line echoed
//!                                          every 200 ms; prints `connected`, then `kept N` (exit
//!                                          0) or `broken after N` (exit 1)
//!
//! and for the NetworkPolicy benchmark (scripts/netpol-bench.sh):
//!
//!   weft-netprobe sink PORT...             TCP on each PORT: reads to the end, then answers the
//!                                          byte count as one line
//!   weft-netprobe stream IP:PORT SECONDS   sends to a sink for SECONDS; prints `gbit_per_s X`
//!                                          (the bytes the sink counted over the time to its
//!                                          answer)
//!   weft-netprobe watch IP:PORT SECONDS    a new TCP connection every 10 ms; prints `start ok`
//!                                          or `start denied`, then `change UNIX_MS STATE` for
//!                                          the first attempt that differs (its start time), or
//!                                          `no change` after SECONDS (exit 1)
//!
//! The wait for an answer is 1 s (`NETPROBE_TIMEOUT_MS`): a denied packet is dropped, so
//! "no answer in time" is what denied looks like.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

const GREETING: &[u8] = b"weft-netprobe\n";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("probe") => probe(&args[1..]),
        Some("hold") => hold(&args[1..]),
        Some("sink") => sink(&args[1..]),
        Some("stream") => stream(&args[1..]),
        Some("watch") => watch(&args[1..]),
        _ => Err("usage: weft-netprobe serve [PORT...] | probe IP:PORT/PROTO... | hold IP:PORT \
                  SECONDS | sink PORT... | stream IP:PORT SECONDS | watch IP:PORT SECONDS"
            .to_owned()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "weft-netprobe: {e}");
            ExitCode::from(2)
        }
    }
}

fn timeout() -> Duration {
    let ms = std::env::var("NETPROBE_TIMEOUT_MS").ok().and_then(|s| s.parse().ok());
    Duration::from_millis(ms.unwrap_or(1000))
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn serve(args: &[String]) -> Result<ExitCode, String> {
    let ports: Vec<u16> = match args.is_empty() {
        true => vec![80, 81],
        false => ports(args)?,
    };
    let mut threads = Vec::new();
    for port in ports {
        let tcp = TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("tcp {port}: {e}"))?;
        let udp = UdpSocket::bind(("0.0.0.0", port)).map_err(|e| format!("udp {port}: {e}"))?;
        threads.push(thread::spawn(move || serve_tcp(tcp)));
        threads.push(thread::spawn(move || serve_udp(udp)));
    }
    say("serving");
    for t in threads {
        let _ = t.join();
    }
    Ok(ExitCode::SUCCESS)
}

fn serve_tcp(listener: TcpListener) {
    for conn in listener.incoming().flatten() {
        thread::spawn(move || echo(conn));
    }
}

fn echo(mut conn: TcpStream) {
    if conn.write_all(GREETING).is_err() {
        return;
    }
    let mut buf = [0u8; 512];
    while let Ok(n) = conn.read(&mut buf) {
        if n == 0 || conn.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

fn serve_udp(socket: UdpSocket) {
    let mut buf = [0u8; 512];
    while let Ok((n, from)) = socket.recv_from(&mut buf) {
        let _ = socket.send_to(&buf[..n], from);
    }
}

#[derive(Clone, Copy)]
enum Proto {
    Tcp,
    Udp,
}

fn target(s: &str) -> Result<(SocketAddr, Proto), String> {
    let (addr, proto) = s.rsplit_once('/').ok_or_else(|| format!("{s:?}: no /tcp or /udp"))?;
    let addr = addr.parse().map_err(|_| format!("{s:?}: not IP:PORT"))?;
    let proto = match proto {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        other => return Err(format!("{s:?}: protocol {other:?} is not tcp or udp")),
    };
    Ok((addr, proto))
}

fn probe(args: &[String]) -> Result<ExitCode, String> {
    let targets: Vec<_> =
        args.iter().map(|a| target(a).map(|t| (a.clone(), t))).collect::<Result<_, _>>()?;
    let wait = timeout();
    let handles: Vec<_> = targets
        .into_iter()
        .map(|(name, (addr, proto))| {
            thread::spawn(move || {
                let ok = match proto {
                    Proto::Tcp => tcp_ok(addr, wait),
                    Proto::Udp => udp_ok(addr, wait),
                };
                (name, ok)
            })
        })
        .collect();
    for h in handles {
        let (name, ok) = h.join().map_err(|_| "a probe thread panicked".to_owned())?;
        say(&format!("{name} {}", if ok { "ok" } else { "denied" }));
    }
    Ok(ExitCode::SUCCESS)
}

/// Connected and greeted within `wait`.
fn tcp_ok(addr: SocketAddr, wait: Duration) -> bool {
    let start = Instant::now();
    let Ok(mut conn) = TcpStream::connect_timeout(&addr, wait) else { return false };
    let left = wait.saturating_sub(start.elapsed()).max(Duration::from_millis(50));
    let _ = conn.set_read_timeout(Some(left));
    let mut buf = [0u8; GREETING.len()];
    conn.read_exact(&mut buf).is_ok() && buf == GREETING
}

/// An echo within `wait`; the request is sent again every 250 ms so that one lost datagram
/// does not read as denied.
fn udp_ok(addr: SocketAddr, wait: Duration) -> bool {
    let Ok(socket) = UdpSocket::bind(("0.0.0.0", 0)) else { return false };
    if socket.connect(addr).is_err() {
        return false;
    }
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 64];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if left.is_zero() || socket.send(b"probe").is_err() {
            return false;
        }
        let _ = socket.set_read_timeout(Some(left.min(Duration::from_millis(250))));
        if let Ok(n) = socket.recv(&mut buf) {
            return &buf[..n] == b"probe";
        }
    }
    false
}

fn hold(args: &[String]) -> Result<ExitCode, String> {
    let [addr, secs] = args else { return Err("usage: hold IP:PORT SECONDS".to_owned()) };
    let addr: SocketAddr = addr.parse().map_err(|_| format!("{addr:?}: not IP:PORT"))?;
    let secs: u64 = secs.parse().map_err(|_| format!("{secs:?}: not seconds"))?;
    let wait = timeout();
    let conn =
        TcpStream::connect_timeout(&addr, wait).map_err(|e| format!("connect {addr}: {e}"))?;
    conn.set_read_timeout(Some(wait)).map_err(|e| e.to_string())?;
    let mut writer = conn.try_clone().map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|e| format!("greeting: {e}"))?;
    say("connected");
    let end = Instant::now() + Duration::from_secs(secs);
    let mut n = 0u64;
    while Instant::now() < end {
        let sent = format!("{n}\n");
        line.clear();
        let echoed = writer.write_all(sent.as_bytes()).is_ok()
            && reader.read_line(&mut line).is_ok()
            && line == sent;
        if !echoed {
            say(&format!("broken after {n}"));
            return Ok(ExitCode::FAILURE);
        }
        n += 1;
        thread::sleep(Duration::from_millis(200));
    }
    say(&format!("kept {n}"));
    Ok(ExitCode::SUCCESS)
}

fn ports(args: &[String]) -> Result<Vec<u16>, String> {
    args.iter().map(|p| p.parse().map_err(|_| format!("bad port {p:?}"))).collect()
}

fn addr_and_secs(args: &[String], usage: &str) -> Result<(SocketAddr, Duration), String> {
    let [addr, secs] = args else { return Err(format!("usage: {usage} IP:PORT SECONDS")) };
    let addr: SocketAddr = addr.parse().map_err(|_| format!("{addr:?}: not IP:PORT"))?;
    let secs: f64 = secs.parse().map_err(|_| format!("{secs:?}: not seconds"))?;
    let secs = Duration::try_from_secs_f64(secs).map_err(|e| format!("{secs}: {e}"))?;
    Ok((addr, secs))
}

fn sink(args: &[String]) -> Result<ExitCode, String> {
    let mut threads = Vec::new();
    for port in ports(args)? {
        let tcp = TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("tcp {port}: {e}"))?;
        threads.push(thread::spawn(move || {
            for conn in tcp.incoming().flatten() {
                thread::spawn(move || count_to_the_end(conn));
            }
        }));
    }
    say("sinking");
    for t in threads {
        let _ = t.join();
    }
    Ok(ExitCode::SUCCESS)
}

fn count_to_the_end(mut conn: TcpStream) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(_) => return,
        }
    }
    let _ = conn.write_all(format!("{total}\n").as_bytes());
}

fn stream(args: &[String]) -> Result<ExitCode, String> {
    let (addr, secs) = addr_and_secs(args, "stream")?;
    let start = Instant::now();
    let mut conn =
        TcpStream::connect_timeout(&addr, timeout()).map_err(|e| format!("connect {addr}: {e}"))?;
    let buf = vec![0u8; 256 * 1024];
    while start.elapsed() < secs {
        conn.write_all(&buf).map_err(|e| format!("send: {e}"))?;
    }
    conn.shutdown(std::net::Shutdown::Write).map_err(|e| format!("shutdown: {e}"))?;
    let mut answer = String::new();
    BufReader::new(&conn).read_line(&mut answer).map_err(|e| format!("the count: {e}"))?;
    let bytes: u64 = answer.trim().parse().map_err(|_| format!("the sink answered {answer:?}"))?;
    let gbit = bytes as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9;
    say(&format!("gbit_per_s {gbit:.3}"));
    Ok(ExitCode::SUCCESS)
}

fn unix_ms() -> u128 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

fn watch(args: &[String]) -> Result<ExitCode, String> {
    let (addr, secs) = addr_and_secs(args, "watch")?;
    // a denied SYN is dropped: no answer within this long reads as denied (the lab's round
    // trip is well under a millisecond)
    let wait = Duration::from_millis(100);
    let word = |ok: bool| if ok { "ok" } else { "denied" };
    let first = TcpStream::connect_timeout(&addr, wait).is_ok();
    say(&format!("start {}", word(first)));
    let end = Instant::now() + secs;
    while Instant::now() < end {
        thread::sleep(Duration::from_millis(10));
        let at = unix_ms();
        let ok = TcpStream::connect_timeout(&addr, wait).is_ok();
        if ok != first {
            say(&format!("change {at} {}", word(ok)));
            return Ok(ExitCode::SUCCESS);
        }
    }
    say("no change");
    Ok(ExitCode::FAILURE)
}
