//! `weft`: the agent and its command line. Errors become exit codes here and only here:
//! 0 success, 1 failure, 2 usage error, 3 the agent is not running.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use weft::cli::client::{self, AttachArgs, CliError};
use weft::cli::{Cli, Command, launch};

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

async fn run_verb(cli: Cli) -> Result<(), CliError> {
    let s = &cli.socket;
    match cli.command {
        Command::Agent(_) => unreachable!("handled in main"),
        Command::Launch { args, wait_seconds } => {
            args.validate(s.clone()).map_err(|e| CliError::Usage(e.to_string()))?;
            launch::launch(s, &args.state_dir, Duration::from_secs(wait_seconds)).await
        }
        Command::Stop { state_dir } => launch::stop(s, &state_dir).await,
        Command::Reset { state_dir, bridge, nft_table } => {
            launch::reset(s, &state_dir, &bridge, &nft_table).await
        }
        Command::Rmpeer { peer } => client::rmpeer(s, peer).await,
        Command::Prime { timeout_seconds } => {
            client::prime(s, Duration::from_secs(timeout_seconds)).await
        }
        Command::Status { what, json } => client::status(s, what, json).await,
        Command::Connect { peers, replace } => client::connect_peers(s, peers, replace).await,
        Command::Forget { peers } => client::forget_peers(s, peers).await,
        Command::Ps { containers, json, docker_socket } => {
            client::ps(s, &containers, &docker_socket, json).await
        }
        Command::Attach {
            operands,
            netns,
            ifname,
            id,
            name,
            no_multicast_route,
            json,
            docker_socket,
        } => {
            let args = AttachArgs {
                operands: &operands,
                netns: netns.as_deref(),
                ifname: &ifname,
                id: id.as_deref(),
                name: name.as_deref(),
                multicast_route: !no_multicast_route,
                json,
                docker_socket: &docker_socket,
            };
            client::attach(s, args).await
        }
        Command::Detach { operands, netns, id, docker_socket } => {
            client::detach_verb(s, &operands, netns.as_deref(), id, &docker_socket).await
        }
        Command::Expose { addrs, hostname, json, .. } => {
            client::expose(s, &addrs, hostname, json).await
        }
        Command::DnsAdd { targets, name, .. } => client::dns_add(s, &targets, name).await,
        Command::DnsRemove { targets, name, .. } => client::dns_remove(s, &targets, name).await,
        Command::DnsLookup { name, json } => client::dns_lookup(s, name, json).await,
        Command::Hide { addrs } => client::hide(s, &addrs).await,
        Command::Version { json } => client::version(s, json).await,
        Command::InstallCni { bin_dir, plugins } => install_cni(&bin_dir, &plugins),
    }
}

/// `weft install-cni`: reports each plugin installed on stderr (the init step's log).
fn install_cni(bin_dir: &std::path::Path, plugins: &[String]) -> Result<(), CliError> {
    use weft::kube::cni;
    for name in plugins {
        let src = cni::find_plugin(name).ok_or_else(|| {
            CliError::Failed(format!(
                "{name}: not found next to weft, in /usr/local/bin or in /usr/bin"
            ))
        })?;
        let changed = cni::install_plugin(&src, bin_dir, name).map_err(|e| {
            CliError::Failed(format!("installing {name} into {}: {e}", bin_dir.display()))
        })?;
        let what = if changed { "installed" } else { "already up to date" };
        eprintln!("{name}: {what} in {} (from {})", bin_dir.display(), src.display());
    }
    Ok(())
}

/// `weft agent --password X` puts the password in /proc/PID/cmdline, readable by every local
/// user: the agent starts itself again (same pid) with the password in its environment, which
/// only root can read. Returns only if there was nothing to do or the exec failed.
fn hide_password() {
    let Some(argv) =
        std::env::args_os().map(|a| a.into_string().ok()).collect::<Option<Vec<String>>>()
    else {
        return;
    };
    let Some((rest, password)) = weft::config::strip_password(&argv) else { return };
    eprintln!(
        "weft agent: --password on the command line is visible to every local user; moving it \
         to the environment (prefer --password-file or WEFT_PASSWORD)"
    );
    let Ok(exe) = std::env::current_exe() else { return };
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(exe)
        .args(rest.iter().skip(1))
        .env("WEFT_PASSWORD", password)
        .exec();
    eprintln!("weft agent: cannot restart without the password in argv ({err}); continuing");
}

/// Before any thread exists (capabilities are per thread): more file descriptors, fewer
/// privileges (see `weft::harden`).
fn harden(kube: bool) -> anyhow::Result<()> {
    if let Err(e) = weft::harden::raise_fd_limit() {
        eprintln!("weft agent: cannot raise the file descriptor limit: {e}");
    }
    weft::harden::restrict_capabilities(weft::harden::agent_capabilities(kube))?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Agent(args) = &cli.command {
        hide_password();
        let result =
            args.validate(cli.socket.clone()).map_err(anyhow::Error::from).and_then(|cfg| {
                harden(cfg.kube.is_some())?;
                runtime()?.block_on(weft::daemon::run(cfg, &args.log_level))
            });
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("weft agent: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let result = match runtime() {
        Ok(rt) => rt.block_on(run_verb(cli)),
        Err(e) => Err(CliError::Failed(e.to_string())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
