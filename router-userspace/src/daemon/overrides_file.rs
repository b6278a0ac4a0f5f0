//! Operator overrides (pinned weights, drains and their deadlines) kept in a
//! file beside the control socket, so a restarted daemon — including one
//! that was killed — keeps a drained replica drained. The file lives on the
//! same tmpfs as the socket (`/run/router/` by default): like the pinned
//! datapath, it survives daemon restarts and disappears at reboot.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use crate::controller::Override;

pub type Overrides = BTreeMap<String, BTreeMap<String, Override>>;

/// `<control socket's directory>/<socket name>.overrides.json`.
pub fn path_for(control_socket: &Path) -> PathBuf {
    let mut name = control_socket
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "router.sock".into());
    name.push(".overrides.json");
    control_socket.with_file_name(name)
}

/// The saved overrides, or none when no file exists. A file that cannot be
/// parsed is an error: silently forgetting a drain would send traffic to a
/// replica an operator is taking down.
pub fn load(path: &Path) -> Result<Overrides> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{}: saved overrides are corrupt; fix or remove the file",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Overrides::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes atomically (temporary file, fsync, rename), mode 0600.
pub fn save(path: &Path, overrides: &Overrides) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec_pretty(overrides).context("encoding overrides")?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(&body)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_missing_and_corrupt() {
        let dir = std::env::temp_dir().join(format!("router-ovr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = path_for(&dir.join("router.sock"));
        assert_eq!(path, dir.join("router.sock.overrides.json"));
        assert!(load(&path).unwrap().is_empty());
        let mut o = Overrides::new();
        o.entry("llama".into()).or_default().insert(
            "gpu-0".into(),
            Override {
                weight: None,
                drain: true,
                drain_deadline_unix: Some(1_800_000_000),
                flows_ended: None,
            },
        );
        save(&path, &o).unwrap();
        assert_eq!(load(&path).unwrap(), o);
        std::fs::write(&path, b"{not json").unwrap();
        let err = format!("{:#}", load(&path).unwrap_err());
        assert!(err.contains("corrupt"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
