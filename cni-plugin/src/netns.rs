//! Checks that a path names a network namespace other than the caller's own, without entering it.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::error::CniError;
use crate::plugin::NetnsProbe;

/// `NSFS_MAGIC` from linux/magic.h: the filesystem of /proc/PID/ns/* and their bind mounts.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Probes namespaces through `statfs`/`stat`.
#[derive(Debug)]
pub struct LinuxNetns;

impl NetnsProbe for LinuxNetns {
    fn check(&self, path: &Path) -> Result<(), CniError> {
        let invalid = |reason: String| CniError::InvalidEnv { var: "CNI_NETNS", reason };
        let meta =
            std::fs::metadata(path).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| invalid("path contains a NUL byte".into()))?;
        // SAFETY: `c` is a valid NUL-terminated path and `buf` is a properly sized out-parameter.
        let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: see above.
        if unsafe { libc::statfs(c.as_ptr(), &mut buf) } != 0 {
            return Err(invalid(format!(
                "{}: {}",
                path.display(),
                std::io::Error::last_os_error()
            )));
        }
        // f_type's width differs between architectures.
        #[allow(clippy::useless_conversion)]
        let fs_type = i64::from(buf.f_type);
        if fs_type != NSFS_MAGIC {
            return Err(invalid(format!("{} is not a network namespace", path.display())));
        }
        use std::os::unix::fs::MetadataExt;
        let own =
            std::fs::metadata("/proc/self/ns/net").map_err(|e| CniError::Io(e.to_string()))?;
        if own.dev() == meta.dev() && own.ino() == meta.ino() {
            return Err(invalid(format!(
                "{} is the host's own network namespace; refusing to configure it",
                path.display()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_missing_plain_and_own_namespaces() {
        assert_eq!(LinuxNetns.check(Path::new("/nonexistent/netns")).unwrap_err().code(), 4);
        assert_eq!(LinuxNetns.check(Path::new("/proc/self/status")).unwrap_err().code(), 4);
        let own = LinuxNetns.check(Path::new("/proc/self/ns/net")).unwrap_err();
        assert!(own.to_string().contains("host's own"), "{own}");
    }
}
