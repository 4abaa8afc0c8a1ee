//! Entry point of `weft-cni`: read the invocation, run it, print the result or the CNI error.

use std::io::{Read, Write};
use std::process::ExitCode;

use weft_cni::agent::SocketAgent;
use weft_cni::env::Invocation;
use weft_cni::error::CniError;
use weft_cni::netns::LinuxNetns;
use weft_cni::plugin::{self, Output};
use weft_cni::types::NetConf;

/// Larger configurations are refused rather than buffered without bound.
const MAX_STDIN: u64 = 4 << 20;

fn read_stdin() -> Result<Vec<u8>, CniError> {
    let mut buf = Vec::new();
    std::io::stdin()
        .take(MAX_STDIN + 1)
        .read_to_end(&mut buf)
        .map_err(|e| CniError::Io(format!("reading stdin: {e}")))?;
    if buf.len() as u64 > MAX_STDIN {
        return Err(CniError::Decode(format!(
            "network configuration larger than {MAX_STDIN} bytes"
        )));
    }
    Ok(buf)
}

async fn run(stdin: &[u8]) -> Result<Output, CniError> {
    let inv = Invocation::from_env(|k| std::env::var(k).ok())?;
    plugin::run(&inv, stdin, &LinuxNetns, SocketAgent::new).await
}

fn main() -> ExitCode {
    let stdin = read_stdin();
    let version =
        stdin.as_deref().map(NetConf::version_hint).unwrap_or(weft_cni::types::CniVersion::LATEST);
    let outcome = match stdin {
        Err(e) => Err(e),
        Ok(stdin) => match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt.block_on(run(&stdin)),
            Err(e) => Err(CniError::Io(format!("starting the runtime: {e}"))),
        },
    };
    let (json, code) = match outcome {
        Ok(Output::Nothing) => return ExitCode::SUCCESS,
        Ok(Output::Json(v)) => (v, ExitCode::SUCCESS),
        Err(e) => (e.to_json(version), ExitCode::FAILURE),
    };
    let mut out = std::io::stdout().lock();
    // Nothing sensible is left to do if stdout is gone; the exit code still tells the runtime.
    let _ = serde_json::to_writer(&mut out, &json).map(|()| out.write_all(b"\n"));
    code
}
