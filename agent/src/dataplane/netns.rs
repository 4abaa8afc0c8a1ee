//! Network namespaces, entered only on short-lived dedicated OS threads. This type is the only
//! place in weft that calls `setns`: tokio threads (workers and the blocking pool alike) never
//! change namespace, so nothing else can run in the wrong one by accident. Netlink sockets
//! opened inside a namespace stay bound to it and are used afterwards from any thread
//! ([`super::netlink::Rtnl::netns`] is how the data plane gets one).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// `NSFS_MAGIC` from linux/magic.h.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
}

/// Why a path cannot be used as a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("{path}: {error}")]
    Open { path: PathBuf, error: io::Error },
    #[error("{0} is not a network namespace")]
    NotNetns(PathBuf),
    #[error("{0} is the weft agent's own network namespace")]
    Own(PathBuf),
}

impl NetnsError {
    /// Whether the namespace is known to be gone (the path vanished, or the bind mount was
    /// removed and left a plain file). Anything else — out of file descriptors, out of memory,
    /// permission — says nothing about the pod, and its endpoint must be kept.
    pub fn means_gone(&self) -> bool {
        match self {
            NetnsError::NotNetns(_) => true,
            NetnsError::Open { error, .. } => {
                matches!(error.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR | libc::ESRCH))
            }
            NetnsError::Own(_) => false,
        }
    }
}

/// Fails unless `path` is a network namespace other than the agent's own: an endpoint in the
/// host namespace would put a pod's address and routes on the host itself.
pub fn check_foreign(path: &Path) -> Result<(), NetnsError> {
    let ns = Netns::open(path)?;
    let own = Netns::current()?;
    let id = |n: &Netns| n.id().map_err(|error| NetnsError::Open { path: n.path.clone(), error });
    if id(&ns)? == id(&own)? {
        return Err(NetnsError::Own(path.to_path_buf()));
    }
    Ok(())
}

impl Netns {
    /// Opens the namespace at `path` (a bind mount such as /run/netns/x or /proc/PID/ns/net).
    pub fn open(path: &Path) -> Result<Netns, NetnsError> {
        let open_err = |error| NetnsError::Open { path: path.to_path_buf(), error };
        let file = File::open(path).map_err(open_err)?;
        if fs_magic(&file).map_err(open_err)? != NSFS_MAGIC {
            return Err(NetnsError::NotNetns(path.to_path_buf()));
        }
        Ok(Netns { file, path: path.to_path_buf() })
    }

    /// The namespace the agent itself runs in.
    pub fn current() -> Result<Netns, NetnsError> {
        Netns::open(Path::new("/proc/self/ns/net"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Identity of the namespace (device and inode of nsfs), stable while it exists.
    pub fn id(&self) -> io::Result<(u64, u64)> {
        let m = self.file.metadata()?;
        Ok((m.dev(), m.ino()))
    }

    /// Runs `f` on a new OS thread that has entered this namespace. The thread ends with `f`,
    /// so no thread ever returns to other work in a foreign namespace.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> io::Result<R> {
        let fd = self.file.as_raw_fd();
        std::thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: `fd` is an open nsfs file descriptor owned by `self`, which outlives
                // this scoped thread; CLONE_NEWNET only affects the calling thread.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .map_err(|_| io::Error::other("namespace worker thread panicked"))?
        })
    }
}

impl AsRawFd for Netns {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

fn fs_magic(file: &File) -> io::Result<i64> {
    // SAFETY: `buf` is a correctly sized out-parameter and the descriptor is open.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut buf) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // f_type's width differs between architectures.
    #[allow(clippy::useless_conversion)]
    Ok(i64::from(buf.f_type))
}

/// Writes a sysctl under /proc/sys of the calling thread's namespace, e.g.
/// `write_sysctl("net/ipv4/ip_forward", "1")`.
pub fn write_sysctl(key: &str, value: &str) -> io::Result<()> {
    std::fs::write(Path::new("/proc/sys").join(key), value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_own_namespace_is_refused() {
        let err = check_foreign(Path::new("/proc/self/ns/net")).unwrap_err();
        assert!(matches!(err, NetnsError::Own(_)), "{err}");
        assert!(!err.means_gone());
        let err = check_foreign(Path::new("/proc/thread-self/ns/net")).unwrap_err();
        assert!(matches!(err, NetnsError::Own(_)), "{err}");
    }

    #[test]
    fn only_a_vanished_namespace_counts_as_gone() {
        let open = |errno| NetnsError::Open {
            path: "/run/netns/p".into(),
            error: io::Error::from_raw_os_error(errno),
        };
        assert!(open(libc::ENOENT).means_gone());
        assert!(NetnsError::NotNetns("/run/netns/p".into()).means_gone());
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOMEM, libc::EACCES, libc::EINTR] {
            assert!(!open(errno).means_gone(), "errno {errno}");
        }
        let err = check_foreign(Path::new("/nonexistent/ns")).unwrap_err();
        assert!(err.means_gone(), "{err}");
        let err = check_foreign(Path::new("/proc/self/status")).unwrap_err();
        assert!(err.means_gone(), "a plain file is not a namespace: {err}");
    }
}
