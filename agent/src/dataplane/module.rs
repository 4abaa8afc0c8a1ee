//! Loading a kernel module (br_netfilter, for kube-proxy) without a `modprobe` binary:
//! the module file and its dependencies are found through the host's
//! `/lib/modules/<release>/modules.dep` and loaded with `finit_module(2)`, which decompresses
//! `.ko.xz`/`.ko.zst`/`.ko.gz` itself. A module already loaded or built in is left alone.

use std::io;
use std::path::{Path, PathBuf};

/// `MODULE_INIT_COMPRESSED_FILE`: the kernel decompresses the file.
const COMPRESSED: libc::c_int = 4;

fn loaded(name: &str) -> bool {
    Path::new("/sys/module").join(name.replace('-', "_")).exists()
}

fn release() -> io::Result<String> {
    // SAFETY: uname fills the struct it is given; all-zero is a valid initial value.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: uname NUL-terminates the release field.
    let rel = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) };
    Ok(rel.to_string_lossy().into_owned())
}

/// The module's base name from a modules.dep path (`kernel/net/bridge/br_netfilter.ko.zst`).
fn module_name(path: &str) -> &str {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split_once(".ko").map_or(file, |(n, _)| n)
}

/// The files to load for `name`, dependencies first, from modules.dep's text.
pub fn load_order(modules_dep: &str, name: &str) -> Option<Vec<String>> {
    let want = name.replace('-', "_");
    modules_dep.lines().find_map(|line| {
        let (path, deps) = line.split_once(':')?;
        (module_name(path).replace('-', "_") == want).then(|| {
            let mut order: Vec<String> = deps.split_whitespace().rev().map(str::to_owned).collect();
            order.push(path.to_owned());
            order
        })
    })
}

fn finit(path: &Path) -> io::Result<()> {
    let file = std::fs::File::open(path)?;
    let compressed = path.extension().is_some_and(|e| e == "xz" || e == "zst" || e == "gz");
    let params = c"";
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open fd, a NUL-terminated empty parameter string, and plain flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            if compressed { COMPRESSED } else { 0 },
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST) { Ok(()) } else { Err(e) }
}

/// Loads `name` and what it depends on, unless loaded or built in.
pub fn load(name: &str) -> io::Result<()> {
    if loaded(name) {
        return Ok(());
    }
    let root = PathBuf::from("/lib/modules").join(release()?);
    let dep = std::fs::read_to_string(root.join("modules.dep")).map_err(|e| {
        io::Error::new(e.kind(), format!("{}: {e}", root.join("modules.dep").display()))
    })?;
    let order = load_order(&dep, name).ok_or_else(|| {
        io::Error::new(io::ErrorKind::NotFound, format!("no module {name} in {}", root.display()))
    })?;
    for file in order {
        if !loaded(module_name(&file)) {
            finit(&root.join(&file))
                .map_err(|e| io::Error::new(e.kind(), format!("loading {file}: {e}")))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependencies_come_first() {
        let dep = "kernel/net/llc/llc.ko.zst:\n\
                   kernel/net/bridge/bridge.ko.zst: kernel/net/802/stp.ko.zst kernel/net/llc/llc.ko.zst\n\
                   kernel/net/bridge/br_netfilter.ko.zst: kernel/net/bridge/bridge.ko.zst kernel/net/802/stp.ko.zst kernel/net/llc/llc.ko.zst\n";
        assert_eq!(
            load_order(dep, "br_netfilter").expect("found"),
            vec![
                "kernel/net/llc/llc.ko.zst",
                "kernel/net/802/stp.ko.zst",
                "kernel/net/bridge/bridge.ko.zst",
                "kernel/net/bridge/br_netfilter.ko.zst"
            ]
        );
        assert_eq!(load_order(dep, "llc").expect("found"), vec!["kernel/net/llc/llc.ko.zst"]);
        assert!(load_order(dep, "nope").is_none());
        assert_eq!(module_name("kernel/a/b-c.ko"), "b-c");
    }
}
