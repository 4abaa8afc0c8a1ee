//! Reading the DEL queue that `weft-cni` fills while the agent is down, defensively: the
//! directory must be the agent user's own and writable by nobody else (a directory left
//! readable by others is tightened to 0700), entries must be regular files no larger than
//! [`MAX_ENTRY`], and symlinks are never followed. Blocking; the caller runs it off the
//! async workers.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use weft_api::v1::CniDelRequest;

/// A queued DEL is a container id, an interface name and a few paths: far below this.
pub const MAX_ENTRY: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0} is not a directory owned by uid {1} and writable only by it; not reading it")]
    UnsafeDir(PathBuf, u32),
    #[error("{0} is not a regular file")]
    NotRegular(PathBuf),
    #[error("{0} is larger than {MAX_ENTRY} bytes")]
    TooLarge(PathBuf),
    #[error("{0} is not a DEL request")]
    Undecodable(PathBuf),
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Checks (and tightens) the queue directory; `Ok(false)` when it does not exist.
pub fn check_dir(dir: &Path) -> Result<bool, QueueError> {
    let m = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(QueueError::Io(dir.to_owned(), e)),
    };
    let me = euid();
    if !m.file_type().is_dir() || m.uid() != me || m.mode() & 0o022 != 0 {
        return Err(QueueError::UnsafeDir(dir.to_owned(), me));
    }
    if m.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| QueueError::Io(dir.to_owned(), e))?;
    }
    Ok(true)
}

/// The `.del` entries of the queue (names only; nothing is opened).
pub fn entries(dir: &Path) -> Result<Vec<PathBuf>, QueueError> {
    let rd = std::fs::read_dir(dir).map_err(|e| QueueError::Io(dir.to_owned(), e))?;
    Ok(rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "del"))
        .collect())
}

/// Reads one entry: a regular file (never through a symlink) of at most [`MAX_ENTRY`] bytes.
pub fn read_entry(path: &Path) -> Result<CniDelRequest, QueueError> {
    let io = |e| QueueError::Io(path.to_owned(), e);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => QueueError::NotRegular(path.to_owned()),
            _ => io(e),
        })?;
    let m = file.metadata().map_err(io)?;
    if !m.file_type().is_file() {
        return Err(QueueError::NotRegular(path.to_owned()));
    }
    if m.len() > MAX_ENTRY {
        return Err(QueueError::TooLarge(path.to_owned()));
    }
    let mut buf = Vec::new();
    file.take(MAX_ENTRY + 1).read_to_end(&mut buf).map_err(io)?;
    if buf.len() as u64 > MAX_ENTRY {
        return Err(QueueError::TooLarge(path.to_owned()));
    }
    <CniDelRequest as prost::Message>::decode(buf.as_slice())
        .map_err(|_| QueueError::Undecodable(path.to_owned()))
}

/// A queue entry and what reading it gave.
pub type Entry = (PathBuf, Result<CniDelRequest, QueueError>);

/// Every entry of the queue with what reading it gave.
pub fn read_all(dir: &Path) -> Result<Vec<Entry>, QueueError> {
    if !check_dir(dir)? {
        return Ok(Vec::new());
    }
    Ok(entries(dir)?
        .into_iter()
        .map(|p| {
            let r = read_entry(&p);
            (p, r)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> Vec<u8> {
        let r = CniDelRequest {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            ..Default::default()
        };
        prost::Message::encode_to_vec(&r)
    }

    #[test]
    fn a_readable_queue_is_tightened_and_a_writable_one_refused() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("q");
        assert!(!check_dir(&dir).unwrap(), "no queue yet");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(check_dir(&dir).unwrap());
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(check_dir(&dir), Err(QueueError::UnsafeDir(..))));
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(matches!(check_dir(&link), Err(QueueError::UnsafeDir(..))));
    }

    #[test]
    fn only_small_regular_files_are_read() {
        let t = tempfile::tempdir().unwrap();
        let ok = t.path().join("a.del");
        std::fs::write(&ok, req()).unwrap();
        assert_eq!(read_entry(&ok).unwrap().container_id, "c1");
        let big = t.path().join("big.del");
        std::fs::write(&big, vec![0u8; MAX_ENTRY as usize + 1]).unwrap();
        assert!(matches!(read_entry(&big), Err(QueueError::TooLarge(_))));
        let link = t.path().join("link.del");
        std::os::unix::fs::symlink(&ok, &link).unwrap();
        assert!(matches!(read_entry(&link), Err(QueueError::NotRegular(_))));
        let fifo = t.path().join("fifo.del");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(
            matches!(read_entry(&fifo), Err(QueueError::NotRegular(_))),
            "never blocks on a FIFO"
        );
        let sub = t.path().join("sub.del");
        std::fs::create_dir(&sub).unwrap();
        assert!(read_entry(&sub).is_err());
    }
}
