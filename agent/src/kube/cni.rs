//! The node's CNI files: the network configuration `10-weft.conflist` (weft-cni, then the
//! reference `portmap` plugin for hostPorts), written by the agent once it is ready, and
//! the plugin binary, copied by `weft install-cni`. Both are written atomically (a hidden
//! temporary file in the same directory, then a rename), so the runtime never reads half a
//! file, and neither is removed when the agent stops: a DaemonSet upgrade keeps pods
//! schedulable throughout.

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The file name of weft's network configuration.
pub const CONFLIST_NAME: &str = "10-weft.conflist";
/// The CNI network name (scopes the runtime's GC).
pub const NETWORK_NAME: &str = "weft";

/// The conflist for an agent serving `socket`.
pub fn conflist(socket: &Path) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": NETWORK_NAME,
        "plugins": [
            {
                "type": "weft-cni",
                "socket": socket,
                // A pod reaching itself through a Service comes back through its own port.
                "hairpinMode": true
            },
            {
                "type": "portmap",
                "capabilities": { "portMappings": true },
                "snat": true
            }
        ]
    })
}

/// Writes `bytes` to `dir/name` through a temporary file and a rename; `mode` is applied
/// before the rename. Leaves the file alone (returns `false`) if it already holds `bytes`.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> std::io::Result<bool> {
    use std::os::unix::fs::PermissionsExt;
    let target = dir.join(name);
    if std::fs::read(&target).is_ok_and(|have| have == bytes) {
        return Ok(false);
    }
    std::fs::create_dir_all(dir)?;
    // A leading dot and a suffix the runtimes do not load (.conf, .conflist, .json).
    let tmp = dir.join(format!(".{name}.weft-tmp"));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, &target)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| true)
}

/// Writes the conflist into `conf_dir`; `Ok(true)` if it changed.
pub fn write_conflist(conf_dir: &Path, socket: &Path) -> std::io::Result<bool> {
    let mut bytes = serde_json::to_vec_pretty(&conflist(socket)).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    write_atomic(conf_dir, CONFLIST_NAME, &bytes, 0o644)
}

/// Where `weft install-cni` looks for a plugin binary: next to the running `weft`, then
/// /usr/local/bin, then /usr/bin.
pub fn find_plugin(name: &str) -> Option<PathBuf> {
    let beside = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join(name)));
    beside
        .into_iter()
        .chain(["/usr/local/bin", "/usr/bin"].iter().map(|d| Path::new(d).join(name)))
        .find(|p| p.is_file())
}

/// Copies the plugin `src` into `bin_dir` under `name` (mode 0755); `Ok(true)` if it changed.
pub fn install_plugin(src: &Path, bin_dir: &Path, name: &str) -> std::io::Result<bool> {
    let bytes = std::fs::read(src)?;
    write_atomic(bin_dir, name, &bytes, 0o755)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflist_chains_weft_and_portmap() {
        let c = conflist(Path::new("/run/weft/weft.sock"));
        assert_eq!(c["name"], "weft");
        let plugins = c["plugins"].as_array().expect("plugins");
        assert_eq!(plugins.len(), 2);
        assert_eq!(plugins[0]["type"], "weft-cni");
        assert_eq!(plugins[0]["socket"], "/run/weft/weft.sock");
        assert_eq!(plugins[0]["hairpinMode"], true);
        assert!(plugins[0].get("ipam").is_none(), "weft allocates itself");
        assert_eq!(plugins[1]["type"], "portmap");
        assert_eq!(plugins[1]["capabilities"]["portMappings"], true);
    }

    #[test]
    fn conflist_is_written_atomically_and_only_on_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("net.d");
        assert!(write_conflist(&conf, Path::new("/run/weft/weft.sock")).expect("write"));
        let names: Vec<String> = std::fs::read_dir(&conf)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![CONFLIST_NAME.to_owned()], "no temporary file left");
        let text = std::fs::read_to_string(conf.join(CONFLIST_NAME)).expect("read");
        let parsed: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(parsed, conflist(Path::new("/run/weft/weft.sock")));
        assert!(!write_conflist(&conf, Path::new("/run/weft/weft.sock")).expect("again"));
        assert!(write_conflist(&conf, Path::new("/run/other.sock")).expect("changed"));
    }

    #[test]
    fn plugin_install_replaces_by_rename() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("weft-cni");
        std::fs::write(&src, b"new plugin").expect("src");
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).expect("bin");
        std::fs::write(bin.join("weft-cni"), b"old").expect("old");
        let old_ino = std::fs::metadata(bin.join("weft-cni")).expect("meta").ino();
        assert!(install_plugin(&src, &bin, "weft-cni").expect("install"));
        let meta = std::fs::metadata(bin.join("weft-cni")).expect("meta");
        assert_ne!(meta.ino(), old_ino, "replaced by rename, not rewritten in place");
        assert_eq!(meta.permissions().mode() & 0o777, 0o755);
        assert_eq!(std::fs::read(bin.join("weft-cni")).expect("read"), b"new plugin");
        assert!(!install_plugin(&src, &bin, "weft-cni").expect("again"));
    }
}
