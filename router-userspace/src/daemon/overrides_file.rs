//! Operator overrides (pinned weights, drains and their deadlines) kept in a
//! file beside the control socket, so a restarted daemon — including one
//! that was killed — keeps a drained replica drained. The file lives on the
//! same tmpfs as the socket (`/run/router/` by default): like the pinned
//! datapath, it survives daemon restarts and disappears at reboot.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::Result;

use crate::api::Override;
use crate::control_loop::PoolShares;
use crate::state_file;

pub type Overrides = BTreeMap<String, BTreeMap<String, Override>>;

/// `<control socket's directory>/<socket name>.overrides.json`.
pub fn path_for(control_socket: &Path) -> PathBuf {
    state_file::beside(control_socket, "overrides.json")
}

/// The saved overrides, or none when no file exists. A file that cannot be
/// parsed is an error: silently forgetting a drain would send traffic to a
/// replica an operator is taking down. So is a file this daemon cannot
/// trust (see [`state_file::read`]): someone else could pin weights or
/// undrain a replica through it.
pub fn load(path: &Path) -> Result<Overrides> {
    state_file::load_json(path, "saved overrides")
}

/// Writes atomically, mode 0600, never through a link (see
/// [`state_file::write`]).
pub fn save(path: &Path, overrides: &Overrides) -> Result<()> {
    state_file::save_json(path, overrides, "overrides")
}

/// `<control socket's directory>/<socket name>.pools.json`: pool shares
/// set at run time (`pool set`, `canary`, guards' rollbacks).
pub fn pools_path_for(control_socket: &Path) -> PathBuf {
    state_file::beside(control_socket, "pools.json")
}

/// The saved pool shares, or none when no file exists; a corrupt or
/// untrusted file is an error, as for the overrides (a forgotten rollback
/// would send clients back to a pool a guard took out).
pub fn load_pool_shares(path: &Path) -> Result<PoolShares> {
    state_file::load_json(path, "saved pool shares")
}

pub fn save_pool_shares(path: &Path, shares: &PoolShares) -> Result<()> {
    state_file::save_json(path, shares, "pool shares")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_missing_and_corrupt() {
        let dir = scratch("round");
        let path = path_for(&dir.join("router.sock"));
        assert_eq!(path, dir.join("router.sock.overrides.json"));
        assert!(load(&path).unwrap().is_empty());
        let o = drained(Some(1_800_000_000));
        save(&path, &o).unwrap();
        assert_eq!(load(&path).unwrap(), o);
        std::fs::write(&path, b"{not json").unwrap();
        let err = format!("{:#}", load(&path).unwrap_err());
        assert!(err.contains("corrupt"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("router-ovr-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// `llama/gpu-0` drained, with `deadline`.
    fn drained(deadline: Option<u64>) -> Overrides {
        let mut o = Overrides::new();
        o.entry("llama".into()).or_default().insert(
            "gpu-0".into(),
            Override {
                weight: None,
                drain: true,
                drain_deadline_unix: deadline,
                flows_ended: None,
            },
        );
        o
    }

    #[test]
    fn a_symlinked_overrides_file_is_refused() {
        let dir = scratch("link");
        let real = dir.join("elsewhere.json");
        save(&real, &drained(None)).unwrap();
        let path = dir.join("router.sock.overrides.json");
        std::os::unix::fs::symlink(&real, &path).unwrap();
        let err = format!("{:#}", load(&path).unwrap_err());
        assert!(err.contains("symbolic link"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_link_planted_at_the_temporary_name_is_not_written_through() {
        let dir = scratch("tmp");
        let victim = dir.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let path = dir.join("router.sock.overrides.json");
        std::os::unix::fs::symlink(&victim, dir.join("router.sock.overrides.json.tmp")).unwrap();
        save(&path, &drained(None)).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(load(&path).unwrap(), drained(None));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_others_can_write_or_another_user_owns_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("mode");
        let path = dir.join("router.sock.overrides.json");
        save(&path, &drained(None)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let err = format!("{:#}", load(&path).unwrap_err());
        assert!(err.contains("writable by group or others"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load(&path).unwrap(), drained(None));
        // Ownership is checked against the reader's uid, root and the
        // directory's owner. The check is pure, so it is tried with made-up
        // readers; run as root, the file is also given to another user and
        // back, so both kinds of owner are tried.
        let check_owned_by = |owner: u32| {
            let meta = std::fs::metadata(&path).unwrap();
            assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), owner);
            let trusted = |euid, dir_owner| state_file::trusted(&path, &meta, euid, dir_owner);
            let stranger = owner.wrapping_add(1).max(1);
            if owner == 0 {
                // Root's file: anyone may read it.
                trusted(stranger, None).unwrap();
                return;
            }
            trusted(owner, None).unwrap();
            let err = format!("{:#}", trusted(stranger, Some(stranger)).unwrap_err());
            assert!(err.contains("owned by uid"), "{err}");
            let err = format!("{:#}", trusted(stranger, None).unwrap_err());
            assert!(err.contains("which others can write"), "{err}");
            // Root running --cleanup for a daemon that runs as `owner`, in
            // `owner`'s directory.
            trusted(0, Some(owner)).unwrap();
        };
        let me = nix::unistd::geteuid().as_raw();
        check_owned_by(me);
        if me == 0 {
            let other = nix::unistd::Uid::from_raw(64_999);
            nix::unistd::chown(&path, Some(other), None).unwrap();
            check_owned_by(other.as_raw());
            nix::unistd::chown(&path, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
        }
        let err = format!(
            "{:#}",
            state_file::trusted(&dir, &std::fs::metadata(&dir).unwrap(), 0, None).unwrap_err()
        );
        assert!(err.contains("not a regular file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
