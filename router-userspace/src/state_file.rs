//! Small files the daemon keeps beside its control socket (operator
//! overrides, the interface settings it changed). They steer traffic or
//! the host, so they are written atomically and never through a link, and
//! read only when a trusted user owns them and nobody else can write them.
//!
//! Trusted: this process's user, root, and the owner of the directory that
//! holds the file, when nobody else can write that directory. The last is
//! what lets root run `router daemon --cleanup` for a daemon that runs as
//! its own user: the daemon's files are that user's, in that user's
//! directory (systemd's `RuntimeDirectory=`), and whoever owns the
//! directory could replace any file in it anyway. What such a file may ask
//! of root is checked by its reader (see `host::settings::Record`).

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

/// `<control socket's directory>/<socket name>.<suffix>`.
pub fn beside(control_socket: &Path, suffix: &str) -> PathBuf {
    let mut name = control_socket
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "router.sock".into());
    name.push(".");
    name.push(suffix);
    control_socket.with_file_name(name)
}

/// The file's bytes, or `None` when there is none. A symbolic link (someone
/// could point it at a file of their choosing), something that is not a
/// regular file, a file owned by a user this process does not trust (see
/// the module's notes) or writable by group or others is an error naming
/// the problem.
pub fn read(path: &Path) -> Result<Option<Vec<u8>>> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => bail!(
            "{} is a symbolic link; refusing to follow it (remove it)",
            path.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    // Checked on the open descriptor, so the file cannot be swapped between
    // the check and the read.
    let meta = file
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?;
    trusted(
        path,
        &meta,
        nix::unistd::geteuid().as_raw(),
        directory_owner(path),
    )?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut &file, &mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(bytes))
}

/// The owner of the directory holding `path`, if only that owner can write
/// the directory (a directory others can write lends its owner no trust:
/// anyone could have put the file there).
fn directory_owner(path: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let meta = std::fs::symlink_metadata(dir).ok()?;
    (meta.is_dir() && meta.mode() & 0o022 == 0).then_some(meta.uid())
}

/// Whether a file with `meta` may be read by a process with effective uid
/// `euid`, in a directory owned (and writable only) by `dir_owner`.
pub(super) fn trusted(
    path: &Path,
    meta: &std::fs::Metadata,
    euid: u32,
    dir_owner: Option<u32>,
) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    if !meta.file_type().is_file() {
        bail!(
            "{} is not a regular file; refusing to read it",
            path.display()
        );
    }
    let owner = meta.uid();
    if owner != euid && owner != 0 && Some(owner) != dir_owner {
        bail!(
            "{} is owned by uid {owner}, which is neither this process's user (uid {euid}), \
             root, nor the owner of its directory{}; refusing to read it (remove the file)",
            path.display(),
            match dir_owner {
                Some(uid) => format!(" (uid {uid})"),
                None => " (which others can write)".into(),
            }
        );
    }
    if meta.mode() & 0o022 != 0 {
        bail!(
            "{} is writable by group or others (mode {:o}); refusing to read it \
             (chmod 600 or remove the file)",
            path.display(),
            meta.mode() & 0o7777
        );
    }
    Ok(())
}

/// Writes atomically (temporary file, fsync, rename), mode 0600. The
/// temporary file is created fresh (`O_EXCL`) and never through a link
/// (`O_NOFOLLOW`): a link planted at its name cannot make the daemon write
/// somewhere else. A temporary left by a crash is removed first; removing a
/// link removes the link, not its target.
pub fn write(path: &Path, body: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", tmp.display())),
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(body)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

/// The JSON value saved at `path` (`what` names it in errors), or the
/// default when no file exists. A file that cannot be parsed or trusted
/// (see [`read`]) is an error, never silently an empty value: each file
/// kept here steers traffic.
pub fn load_json<T: serde::de::DeserializeOwned + Default>(path: &Path, what: &str) -> Result<T> {
    let Some(bytes) = read(path).with_context(|| what.to_owned())? else {
        return Ok(T::default());
    };
    serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{}: {what} are corrupt; fix or remove the file",
            path.display()
        )
    })
}

/// Saves `value` as JSON through [`write`].
pub fn save_json<T: serde::Serialize>(path: &Path, value: &T, what: &str) -> Result<()> {
    let body = serde_json::to_vec_pretty(value).with_context(|| format!("encoding {what}"))?;
    write(path, &body)
}
