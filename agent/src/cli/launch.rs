//! `weft launch`, `weft stop` and `weft reset`: run the agent as a background process of this
//! host, with its pid and log in the state directory, wait (bounded) for it to be ready or
//! gone, and remove everything it left behind when leaving for good.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use weft_api::v1;

use super::client::{CliError, connect};

pub const PID_FILE: &str = "weft.pid";
pub const LOG_FILE: &str = "weft.log";

fn failed(msg: impl Into<String>) -> CliError {
    CliError::Failed(msg.into())
}

/// The argv and environment of the agent: this invocation with `launch` replaced by `agent`,
/// the launch-only flag removed, and a password moved from the command line (where `ps`
/// shows it) to the environment.
fn agent_argv(argv: &[String]) -> (Vec<String>, Option<String>) {
    let mut out = Vec::with_capacity(argv.len());
    let mut password = None;
    let mut replaced = false;
    let mut args = argv.iter().skip(1);
    while let Some(a) = args.next() {
        if !replaced && a == "launch" {
            out.push("agent".to_owned());
            replaced = true;
        } else if a == "--wait-seconds" {
            args.next();
        } else if a == "--password" {
            password = args.next().cloned();
        } else if let Some(p) = a.strip_prefix("--password=") {
            password = Some(p.to_owned());
        } else if !a.starts_with("--wait-seconds=") {
            out.push(a.clone());
        }
    }
    (out, password)
}

/// On a Docker host (as Weave's `weave launch`), the agent serves Docker's plugin and makes
/// the `weft` network exist, unless the command line already says otherwise.
fn docker_args(args: &[String], docker_host: bool) -> Vec<String> {
    let given = |flag: &str| args.iter().any(|a| a == flag || a.starts_with(&format!("{flag}=")));
    if !docker_host || given("--docker-plugin") || given("--kube") {
        return Vec::new();
    }
    let mut out = vec!["--docker-plugin".to_owned()];
    if !given("--docker-network") {
        out.extend(["--docker-network".to_owned(), "weft".to_owned()]);
    }
    out
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Whether `pid` is a running process (a zombie, exited but not yet reaped by its parent,
/// counts as gone).
fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return false;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
    state != Some('Z')
}

/// Starts the agent in the background and waits until it answers ready.
pub async fn launch(socket: &Path, state_dir: &Path, wait: Duration) -> Result<(), CliError> {
    if let Ok(mut c) = connect(socket).await {
        if let Ok(h) = c.hello(v1::HelloRequest {}).await {
            let h = h.into_inner();
            return Err(failed(format!(
                "a weft agent is already running (pid {}, peer {}) on {}; `weft stop` first",
                h.pid,
                h.peer_name,
                socket.display()
            )));
        }
    }
    crate::daemon::create_private_dir(state_dir)
        .map_err(|e| failed(format!("creating {}: {e}", state_dir.display())))?;
    let log_path = state_dir.join(LOG_FILE);
    let log = {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(|e| failed(format!("opening {}: {e}", log_path.display())))?;
        // An older log may have been created under a looser umask.
        log.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| failed(format!("restricting {}: {e}", log_path.display())))?;
        log
    };
    let log2 = log.try_clone().map_err(|e| failed(e.to_string()))?;
    let exe =
        std::env::current_exe().map_err(|e| failed(format!("finding the weft binary: {e}")))?;
    let argv: Vec<String> = std::env::args().collect();
    let (mut args, password) = agent_argv(&argv);
    args.extend(docker_args(&args, Path::new("/var/run/docker.sock").exists()));
    let mut cmd = Command::new(exe);
    cmd.args(args).stdin(Stdio::null()).stdout(log).stderr(log2);
    if let Some(p) = password {
        cmd.env("WEFT_PASSWORD", p);
    }
    // SAFETY: setsid is async-signal-safe; it detaches the agent from our terminal/session.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| failed(format!("starting the agent: {e}")))?;
    let pid = child.id();
    let pid_path = state_dir.join(PID_FILE);
    std::fs::write(&pid_path, format!("{pid}\n"))
        .map_err(|e| failed(format!("writing {}: {e}", pid_path.display())))?;

    let deadline = Instant::now() + wait;
    let mut last_reason = String::from("starting");
    while Instant::now() < deadline {
        if let Ok(Some(exit)) = child.try_wait() {
            return Err(failed(format!(
                "the agent exited during start-up ({exit}); last lines of {}:\n{}",
                log_path.display(),
                tail(&log_path, 15)
            )));
        }
        if let Ok(mut c) = connect(socket).await {
            if let Ok(h) = c.hello(v1::HelloRequest {}).await {
                let h = h.into_inner();
                if h.ready {
                    println_out(&h.peer_name);
                    return Ok(());
                }
                last_reason = h.not_ready_reason;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(failed(format!(
        "the agent (pid {pid}) is not ready after {}s ({last_reason}); see {}",
        wait.as_secs(),
        log_path.display()
    )))
}

fn println_out(s: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{s}");
}

fn read_pid(state_dir: &Path) -> Option<i32> {
    std::fs::read_to_string(state_dir.join(PID_FILE)).ok()?.trim().parse().ok()
}

/// Asks the agent to stop and waits until it is gone.
pub async fn stop(socket: &Path, state_dir: &Path) -> Result<(), CliError> {
    stop_agent(socket, state_dir, false).await
}

/// `weft reset`: the agent hands its address space over and stops; then the bridge, the
/// endpoints' interfaces, the overlay devices, the firewall table and the persisted state
/// are removed (also when the agent was not running).
pub async fn reset(
    socket: &Path,
    state_dir: &Path,
    bridge: &str,
    nft_table: &str,
) -> Result<(), CliError> {
    use crate::dataplane::Dataplane;
    stop_agent(socket, state_dir, true).await?;
    let dp = crate::dataplane::linux::LinuxDataplane;
    let kernel = |e: crate::dataplane::KernelError| failed(format!("removing weft's devices: {e}"));
    let (vxlan, tap) = crate::overlay::device_names(bridge);
    let mut links = dp.endpoint_links(bridge).map_err(kernel)?;
    links.extend([vxlan, tap, bridge.to_owned()]);
    for link in &links {
        dp.teardown_endpoint(link).map_err(kernel)?;
    }
    dp.remove_firewall(nft_table).map_err(kernel)?;
    dp.remove_firewall(&crate::overlay::filter_table(nft_table)).map_err(kernel)?;
    dp.remove_firewall(&crate::overlay::traffic_table(nft_table)).map_err(kernel)?;
    // Only weft's own rules in Docker's DOCKER-USER chain; Docker's stay.
    dp.remove_forward_accept(bridge).map_err(kernel)?;
    for file in [crate::store::STATE_FILE, PID_FILE] {
        match std::fs::remove_file(state_dir.join(file)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(failed(format!("removing {}: {e}", state_dir.join(file).display())));
            }
        }
    }
    let _ = std::fs::remove_dir_all(weft_api::del_queue_dir(socket));
    Ok(())
}

async fn stop_agent(socket: &Path, state_dir: &Path, leave: bool) -> Result<(), CliError> {
    let mut c = match connect(socket).await {
        Ok(c) => c,
        Err(CliError::AgentDown(_)) => {
            eprintln_out("weft agent is not running");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let pid = c.hello(v1::HelloRequest {}).await?.into_inner().pid as i32;
    c.stop(v1::StopRequest { leave }).await?;
    // Close our connection: the agent's graceful shutdown waits for open connections.
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if !alive(pid) {
            if read_pid(state_dir) == Some(pid) {
                let _ = std::fs::remove_file(state_dir.join(PID_FILE));
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(failed(format!("the agent (pid {pid}) did not stop within 30s")))
}

fn eprintln_out(s: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{s}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_on_a_docker_host_serves_the_plugin_and_the_weft_network() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            docker_args(&a(&["agent", "peer1"]), true),
            a(&["--docker-plugin", "--docker-network", "weft"])
        );
        assert!(docker_args(&a(&["agent"]), false).is_empty());
        assert!(docker_args(&a(&["agent", "--docker-plugin"]), true).is_empty());
        assert_eq!(
            docker_args(&a(&["agent", "--docker-network=mine"]), true),
            a(&["--docker-plugin"])
        );
    }

    #[test]
    fn launch_becomes_agent() {
        let argv: Vec<String> = [
            "weft",
            "--socket",
            "/x",
            "launch",
            "--wait-seconds",
            "5",
            "--password",
            "pw",
            "--bridge",
            "b",
            "launch",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (args, password) = agent_argv(&argv);
        assert_eq!(args, ["--socket", "/x", "agent", "--bridge", "b", "launch"]);
        assert_eq!(password.as_deref(), Some("pw"));
    }
}
