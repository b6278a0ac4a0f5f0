//! The datapath's objects on bpffs: every map, the program and one XDP link
//! per interface live under `pin_path`, so packets keep flowing while no
//! daemon runs. This module owns that directory: its layout, the check that
//! pinned maps fit the program about to use them, and removing it all. It
//! never re-creates a pinned map: a map whose layout no longer fits stops the
//! start, because re-creating `CONNS` would reset every connection.
//!
//! ```text
//! <pin_path>/prog            the XDP program
//! <pin_path>/maps/<MAP>      every map but load-time globals and event rings
//! <pin_path>/links/<iface>   the XDP link of each interface
//! ```

use std::{
    collections::BTreeSet,
    ffi::CString,
    fmt::Write as _,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use aya::maps::MapInfo;
use aya_obj::{EbpfSectionKind, generated::bpf_map_type};

use super::DatapathError;

/// `statfs(2)` magic of a BPF filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// `BPF_OBJ_GET`: opens a pinned object.
const BPF_OBJ_GET: libc::c_long = 7;
/// `BPF_LINK_DETACH` (Linux 5.9): detaches a link whoever else holds it.
const BPF_LINK_DETACH: libc::c_long = 34;

/// The directory that holds one pinned datapath.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    pub(super) fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    pub(super) fn program(&self) -> PathBuf {
        self.root.join("prog")
    }

    /// Where a new program is pinned before it is renamed over `prog`.
    pub(super) fn program_next(&self) -> PathBuf {
        self.root.join("prog_next")
    }

    pub(super) fn link(&self, interface: &str) -> PathBuf {
        self.links().join(encode_interface(interface))
    }

    /// Checks that the directory is (or would be) on bpffs and that this
    /// process can write there, and creates it.
    pub(super) fn create(&self) -> Result<(), DatapathError> {
        check_bpffs(&self.root)?;
        check_access(&self.root)?;
        for dir in [self.root.clone(), self.maps(), self.links()] {
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        Ok(())
    }

    /// Interfaces that have a pinned link, by name.
    pub(super) fn linked_interfaces(&self) -> Result<Vec<String>, DatapathError> {
        Ok(list(&self.links())?
            .iter()
            .filter_map(|n| decode_interface(n))
            .collect())
    }

    /// Names of the pinned maps.
    pub(super) fn pinned_maps(&self) -> Result<Vec<String>, DatapathError> {
        list(&self.maps())
    }
}

/// What `remove_all` took away.
#[derive(Debug, Default)]
pub struct Removed {
    /// Interfaces whose XDP link was detached.
    pub links: Vec<String>,
    pub program: bool,
    pub maps: Vec<String>,
}

/// bpffs forbids dots in names (reserved by the kernel), and interface
/// names may hold them (VLANs: `eth0.100`): escape `%` and `.` as `%25`/`%2E`.
fn encode_interface(name: &str) -> String {
    name.replace('%', "%25").replace('.', "%2E")
}

fn decode_interface(name: &str) -> Option<String> {
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        match rest.get(i + 1..i + 3) {
            Some("25") => out.push('%'),
            Some("2E") => out.push('.'),
            _ => return None,
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Some(out)
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DatapathError + '_ {
    move |source| DatapathError::PinIo {
        path: path.to_path_buf(),
        source,
    }
}

/// File names in `dir`, sorted; none when it does not exist.
fn list(dir: &Path) -> Result<Vec<String>, DatapathError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// The pin directory, or the nearest ancestor that exists, must be on bpffs:
/// pins anywhere else fail, and a bpffs mounted only in this process's mount
/// namespace would vanish with it (`ip netns exec` replaces /sys, for one).
fn check_bpffs(dir: &Path) -> Result<(), DatapathError> {
    let probe = nearest_existing(dir);
    if !on_bpffs(dir, probe)? {
        return Err(DatapathError::NotBpffs {
            path: dir.to_path_buf(),
            found: format!("{} is not on one", probe.display()),
        });
    }
    Ok(())
}

fn nearest_existing(dir: &Path) -> &Path {
    let mut probe = dir;
    while !probe.exists() {
        probe = probe.parent().unwrap_or(Path::new("/"));
    }
    probe
}

/// Whether `probe` (an existing path, the nearest of `dir`) is on bpffs.
fn on_bpffs(dir: &Path, probe: &Path) -> Result<bool, DatapathError> {
    let c = CString::new(probe.as_os_str().as_bytes()).map_err(|_| DatapathError::NotBpffs {
        path: dir.to_path_buf(),
        found: "a path with a NUL byte".into(),
    })?;
    // SAFETY: statfs(2) with a valid C string and a zeroed out-struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io_err(probe)(io::Error::last_os_error()));
    }
    Ok(st.f_type == BPF_FS_MAGIC)
}

/// `faccessat2(2)` with `AT_EACCESS`: what this process may do at `path`
/// with its effective ids and capabilities (`access(2)` would answer for
/// the real uid, and without capabilities unless that uid is 0).
fn effective_access(path: &Path, mode: libc::c_int) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))?;
    // SAFETY: faccessat2(2) reads a NUL-terminated path that outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_faccessat2,
            libc::AT_FDCWD,
            c.as_ptr(),
            mode,
            libc::AT_EACCESS,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `owner uid N, mode NNNN` of `path`, for messages.
fn describe_owner(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt as _;
    match std::fs::symlink_metadata(path) {
        Ok(m) => format!("owner uid {}, mode {:04o}", m.uid(), m.mode() & 0o7777),
        Err(e) => format!("cannot be read: {e}"),
    }
}

/// Checks that this process can create `dir` or write in it, naming what
/// stands in the way otherwise: a directory on the way it cannot search, a
/// pin directory that belongs to someone else, a read-only mount. Root
/// passes; a daemon that runs as its own user needs the directory handed to
/// it first (`router daemon --prepare-for`). Kernels without faccessat2
/// (before 5.8, which have no CAP_BPF either) are not checked here.
pub(super) fn check_access(dir: &Path) -> Result<(), DatapathError> {
    let uid = nix::unistd::geteuid().as_raw();
    let fail = |detail: String| DatapathError::PinAccess {
        path: dir.to_path_buf(),
        detail,
    };
    let mut probe = dir;
    let err = loop {
        match effective_access(probe, libc::W_OK | libc::X_OK) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => match probe.parent() {
                Some(parent) => probe = parent,
                None => return Ok(()),
            },
            Err(e) => break e,
        }
    };
    let hand_over = "hand it to this user as root first: `router daemon --prepare-for USER` \
                     (the systemd unit's ExecStartPre=+ does)";
    match err.raw_os_error() {
        Some(libc::EROFS) => Err(fail(format!(
            "{}{} is on a read-only mount, so uid {uid} cannot pin there; under systemd, \
             ProtectKernelTunables=yes mounts /sys/fs/bpf read-only and ReadWritePaths=/sys/fs/bpf \
             does not undo it: list pin_path itself in ReadWritePaths= (the unit lists \
             /sys/fs/bpf/router) and create it before the daemon starts (the unit's \
             ExecStartPre=+ does)",
            if probe == dir {
                ""
            } else {
                "does not exist, and "
            },
            probe.display()
        ))),
        Some(libc::EACCES) => {
            // Either `probe` itself, or a directory on the way to it.
            if effective_access(probe, libc::F_OK).is_err() {
                let blocked = probe
                    .ancestors()
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .find(|a| effective_access(a, libc::X_OK).is_err())
                    .unwrap_or(probe);
                return Err(fail(format!(
                    "uid {uid} cannot reach it: {} ({}) is not searchable by it; a daemon that \
                     runs as its own user needs CAP_DAC_READ_SEARCH while it starts (the systemd \
                     unit grants it) where bpffs is mounted mode 0700, as systemd mounts \
                     /sys/fs/bpf",
                    blocked.display(),
                    describe_owner(blocked)
                )));
            }
            if probe == dir {
                Err(fail(format!(
                    "not writable by uid {uid} ({}); {hand_over}",
                    describe_owner(probe)
                )))
            } else {
                Err(fail(format!(
                    "does not exist, and uid {uid} cannot create it in {} ({}); {hand_over}",
                    probe.display(),
                    describe_owner(probe)
                )))
            }
        }
        _ => Err(io_err(probe)(err)),
    }
}

/// What [`hand_over`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HandedOver {
    /// pin_path did not exist and was created.
    pub created: bool,
    /// Objects and directories under pin_path whose owner was set.
    pub entries: usize,
}

/// Opens the directory `name` (relative to `at`, or absolute) without
/// following a symbolic link in its last component.
fn open_dir(at: libc::c_int, name: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(name.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))?;
    // SAFETY: openat(2) reads a NUL-terminated path that outlives the call.
    let fd = unsafe {
        libc::openat(
            at,
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The names in the directory open as `fd`.
fn names_in(fd: &OwnedFd, path: &Path) -> Result<Vec<String>, DatapathError> {
    list(Path::new(&format!("/proc/self/fd/{}", fd.as_raw_fd())))
        .map_err(|_| io_err(path)(io::Error::other("listing it through its descriptor")))
}

/// Makes `dir` (created if missing) mode 0700 and owned by `uid`:`gid`,
/// with everything pinned under it, for a daemon that runs as that user:
/// bpffs pins are files, and those of a daemon that ran as root are closed
/// to it. Run as root, before such a daemon starts (the unit's
/// `ExecStartPre=+`). Everything is checked before anything changes: a
/// pin_path that is not a directory, or holds entries this daemon does not
/// pin (a mistyped pin_path, say the bpffs root, whose other programs' pins
/// must not change hands), changes nothing.
///
/// The directory belongs to the user it is handed to, who could swap
/// `maps` or `links` for a link to anywhere between a check and a change
/// made by path. So every change goes through descriptors: the directories
/// are opened without following links, their entries are changed relative
/// to those descriptors, and a link found in them is changed itself, never
/// what it points to.
pub fn hand_over(dir: &PinDir, uid: u32, gid: u32) -> Result<HandedOver, DatapathError> {
    check_bpffs(dir.root())?;
    let not_a_dir = |path: &Path| DatapathError::PinAccess {
        path: path.to_path_buf(),
        detail: "is not a directory (a symbolic link or a file); nothing was changed".into(),
    };
    let opened = |at: libc::c_int, name: &Path, path: &Path| match open_dir(at, name) {
        Ok(fd) => Ok(Some(fd)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
            Err(not_a_dir(path))
        }
        Err(e) => Err(io_err(path)(e)),
    };
    let (root, created) = match opened(libc::AT_FDCWD, dir.root(), dir.root())? {
        Some(fd) => (fd, false),
        None => {
            std::fs::create_dir_all(dir.root()).map_err(io_err(dir.root()))?;
            let fd = opened(libc::AT_FDCWD, dir.root(), dir.root())?
                .ok_or_else(|| io_err(dir.root())(io::ErrorKind::NotFound.into()))?;
            (fd, true)
        }
    };
    let mut subdirs = Vec::new();
    if !created {
        let found = foreign_entries(dir)?;
        if !found.is_empty() {
            return Err(DatapathError::ForeignPins {
                path: dir.root().to_path_buf(),
                found,
            });
        }
        for (name, path) in [("maps", dir.maps()), ("links", dir.links())] {
            if let Some(fd) = opened(root.as_raw_fd(), Path::new(name), &path)? {
                let names = names_in(&fd, &path)?;
                subdirs.push((fd, path, names));
            }
        }
    }

    let uid_ = nix::unistd::Uid::from_raw(uid);
    let gid_ = nix::unistd::Gid::from_raw(gid);
    let failed = |path: &Path, e: nix::Error| {
        io_err(path)(io::Error::other(format!(
            "giving it to uid {uid}, gid {gid}: {e}"
        )))
    };
    let chown_in = |at: &OwnedFd, name: &str, path: &Path| match nix::unistd::fchownat(
        Some(at.as_raw_fd()),
        name,
        Some(uid_),
        Some(gid_),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    ) {
        Ok(()) | Err(nix::Error::ENOENT) => Ok(()),
        Err(e) => Err(failed(&path.join(name), e)),
    };
    let mut entries = 0;
    for (fd, path, names) in &subdirs {
        for name in names {
            chown_in(fd, name, path)?;
        }
        nix::unistd::fchown(fd.as_raw_fd(), Some(uid_), Some(gid_)).map_err(|e| failed(path, e))?;
        entries += names.len() + 1;
    }
    if !created {
        for name in ["prog", "prog_next"] {
            if std::fs::symlink_metadata(dir.root().join(name)).is_ok() {
                chown_in(&root, name, dir.root())?;
                entries += 1;
            }
        }
    }
    nix::unistd::fchown(root.as_raw_fd(), Some(uid_), Some(gid_))
        .map_err(|e| failed(dir.root(), e))?;
    nix::sys::stat::fchmod(root.as_raw_fd(), nix::sys::stat::Mode::S_IRWXU)
        .map_err(|e| failed(dir.root(), e))?;
    Ok(HandedOver { created, entries })
}

/// Whether `pin_path` has a BPF filesystem, and what the daemon does if not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BpffsPlan {
    /// `pin_path` is, or would be, on one.
    Present,
    /// None; the daemon mounts one at this empty directory.
    Mount(PathBuf),
    /// None, and nowhere the daemon mounts one: the start is refused.
    Missing,
}

/// See [`mount_bpffs_if_missing`]; changes nothing.
pub fn bpffs_plan(dir: &Path) -> Result<BpffsPlan, DatapathError> {
    if on_bpffs(dir, nearest_existing(dir))? {
        return Ok(BpffsPlan::Present);
    }
    let parent = match dir.parent() {
        Some(p) if !dir.exists() => p,
        _ => return Ok(BpffsPlan::Missing),
    };
    if std::fs::read_dir(parent).is_ok_and(|mut d| d.next().is_none()) {
        Ok(BpffsPlan::Mount(parent.to_path_buf()))
    } else {
        Ok(BpffsPlan::Missing)
    }
}

/// What [`mount_bpffs_if_missing`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountedBpffs {
    /// Where the BPF filesystem was mounted.
    pub at: PathBuf,
    /// Whether this process's mount namespace is not init's: the mount,
    /// and every pin on it, then goes when the namespace does (`ip netns
    /// exec` makes one per command), so the datapath cannot outlive the
    /// daemon.
    pub private_namespace: bool,
}

/// Mounts a BPF filesystem at `dir`'s parent when `dir` does not exist, no
/// existing ancestor of it is on bpffs, and the parent is an existing empty
/// directory, so the mount hides nothing: on a host that never mounted
/// `/sys/fs/bpf`, as Cilium's agent does. Anything else is left to the
/// bpffs check, which names the problem. Never unmounted: other programs
/// may pin there too, and `--cleanup` removes only this datapath's pins.
pub fn mount_bpffs_if_missing(dir: &Path) -> Result<Option<MountedBpffs>, DatapathError> {
    let BpffsPlan::Mount(parent) = bpffs_plan(dir)? else {
        return Ok(None);
    };
    let parent = parent.as_path();
    nix::mount::mount(
        Some("bpf"),
        parent,
        Some("bpf"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    )
    .map_err(|e| DatapathError::PinIo {
        path: parent.to_path_buf(),
        source: io::Error::other(format!("mounting a BPF filesystem here: {e}")),
    })?;
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    Ok(Some(MountedBpffs {
        at: parent.to_path_buf(),
        private_namespace: ns("self") != ns("1"),
    }))
}

/// How a map the program declares must look in the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct MapLayout {
    pub name: String,
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

/// The maps of `obj` that are pinned, as they will be created with the
/// load-time `max_entries` overrides. Load-time globals (.rodata, .data,
/// .bss) belong to one program instance, and event rings (aya-log) carry no
/// state worth keeping: both come fresh with every program. Everything else
/// is pinned, including maps added by later versions.
pub(super) fn pinned_layouts(
    obj: &[u8],
    overrides: &[(&str, u32)],
) -> Result<Vec<MapLayout>, DatapathError> {
    let parsed = aya_obj::Object::parse(obj).map_err(|e| DatapathError::Object(e.to_string()))?;
    let mut out: Vec<MapLayout> = parsed
        .maps
        .iter()
        .filter(|(_, m)| {
            matches!(
                m.section_kind(),
                EbpfSectionKind::Maps | EbpfSectionKind::BtfMaps
            )
        })
        .filter(|(_, m)| {
            m.map_type() != bpf_map_type::BPF_MAP_TYPE_RINGBUF as u32
                && m.map_type() != bpf_map_type::BPF_MAP_TYPE_PERF_EVENT_ARRAY as u32
        })
        .map(|(name, m)| MapLayout {
            name: name.clone(),
            map_type: m.map_type(),
            key_size: m.key_size(),
            value_size: m.value_size(),
            max_entries: overrides
                .iter()
                .find(|(n, _)| n == name)
                .map_or(m.max_entries(), |(_, v)| *v),
            flags: m.map_flags(),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Which config key sizes a map, for the refusal message.
fn sized_by(map: &str, pinned_entries: u32, wanted_entries: u32) -> String {
    match map {
        "MAGLEV_TABLES" => {
            let per_table = router_common::MAX_SERVICES * 2;
            format!(
                " (daemon.table_size: {} pinned, {} wanted)",
                pinned_entries / per_table,
                wanted_entries / per_table
            )
        }
        "CONNS" | "DSR_FLOWS" | "DSR_FLOWS6" | "NAT6_CONNS" => " (daemon.conn_table_size)".into(),
        _ => " (the datapath's map layout changed in this version)".into(),
    }
}

/// Checks every pinned map against the layout the new program expects.
/// Returns the names that will be adopted (the rest are created).
pub(super) fn check_pinned(
    dir: &PinDir,
    layouts: &[MapLayout],
) -> Result<BTreeSet<String>, DatapathError> {
    let mut adopted = BTreeSet::new();
    for want in layouts {
        let path = dir.map(&want.name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|e| DatapathError::PinnedMap {
            map: want.name.clone(),
            detail: format!("cannot open {}: {e}", path.display()),
        })?;
        let have_type = info.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
        let mut diff = String::new();
        for (what, have, wanted) in [
            ("type", have_type, want.map_type),
            ("key_size", info.key_size(), want.key_size),
            ("value_size", info.value_size(), want.value_size),
            ("max_entries", info.max_entries(), want.max_entries),
            ("flags", info.map_flags(), want.flags),
        ] {
            if have != wanted {
                let sep = if diff.is_empty() { "" } else { ", " };
                let _ = write!(diff, "{sep}{what} {have} pinned, {wanted} wanted");
            }
        }
        if !diff.is_empty() {
            diff.push_str(&sized_by(&want.name, info.max_entries(), want.max_entries));
            return Err(DatapathError::PinnedMap {
                map: want.name.clone(),
                detail: diff,
            });
        }
        adopted.insert(want.name.clone());
    }
    Ok(adopted)
}

/// Refuses a pinned datapath whose maps were written in another layout
/// (see `router_common::LAYOUT_VERSION`): its entries would be misread,
/// and a `ConnEntry` misread rewrites live connections' packets wrongly.
/// `adopted` are the pinned maps that fit by size; none means nothing is
/// pinned yet. A datapath pinned before the stamp existed has no `LAYOUT`.
pub(super) fn check_layout_stamp(
    dir: &PinDir,
    adopted: &BTreeSet<String>,
) -> Result<(), DatapathError> {
    let want = router_common::LAYOUT_VERSION;
    if adopted.iter().all(|m| m == "LAYOUT") {
        return Ok(());
    }
    let have = if adopted.contains("LAYOUT") {
        let map = pinned_u32_array(dir, "LAYOUT")?;
        Some(map.get(&0, 0).map_err(|e| DatapathError::PinnedMap {
            map: "LAYOUT".into(),
            detail: e.to_string(),
        })?)
    } else {
        None
    };
    if have == Some(want) {
        return Ok(());
    }
    Err(DatapathError::LayoutMismatch {
        dir: dir.root().to_path_buf(),
        have,
        want,
    })
}

/// The flow hash's secret pinned with the maps (see `FLOW_HASH_KEY`).
pub(super) fn pinned_flow_hash_key(dir: &PinDir) -> Result<[u32; 2], DatapathError> {
    let map = pinned_u32_array(dir, "FLOW_HASH_KEY")?;
    let word = |i: u32| {
        map.get(&i, 0).map_err(|e| DatapathError::PinnedMap {
            map: "FLOW_HASH_KEY".into(),
            detail: e.to_string(),
        })
    };
    Ok([word(0)?, word(1)?])
}

fn pinned_u32_array(
    dir: &PinDir,
    name: &str,
) -> Result<aya::maps::Array<aya::maps::MapData, u32>, DatapathError> {
    let path = dir.map(name);
    let data = aya::maps::MapData::from_pin(&path).map_err(|e| DatapathError::PinnedMap {
        map: name.into(),
        detail: format!("cannot open {}: {e}", path.display()),
    })?;
    aya::maps::Array::try_from(aya::maps::Map::Array(data)).map_err(|e| DatapathError::PinnedMap {
        map: name.into(),
        detail: e.to_string(),
    })
}

/// `bpf(2)` on a raw attribute struct; aya 0.14 does not expose
/// BPF_OBJ_GET for links as an fd, nor BPF_LINK_DETACH.
fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: the kernel reads `size_of::<T>()` bytes of `attr`, a
    // `#[repr(C)]` struct that lives across the call, and never writes it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens a pinned object (BPF_OBJ_GET).
fn obj_get(path: &Path) -> Result<OwnedFd, DatapathError> {
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| DatapathError::PinnedLink {
        path: path.to_path_buf(),
        detail: "path holds a NUL byte".into(),
    })?;
    let attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf(BPF_OBJ_GET, &attr).map_err(|e| DatapathError::PinnedLink {
        path: path.to_path_buf(),
        detail: format!("BPF_OBJ_GET: {e}"),
    })?;
    // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Detaches a pinned link from its interface at once, even while some
/// other process holds it, then removes the pin. Only removing the pin
/// would detach too, but later, from a kernel workqueue.
fn detach_link(path: &Path) -> Result<(), DatapathError> {
    #[repr(C)]
    struct LinkDetachAttr {
        link_fd: u32,
    }
    let fd = obj_get(path)?;
    let attr = LinkDetachAttr {
        link_fd: fd.as_raw_fd() as u32,
    };
    match bpf(BPF_LINK_DETACH, &attr) {
        Ok(_) => {}
        // The interface went away and took the attachment with it.
        Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => {}
        Err(e) => {
            return Err(DatapathError::PinnedLink {
                path: path.to_path_buf(),
                detail: format!("BPF_LINK_DETACH: {e}"),
            });
        }
    }
    std::fs::remove_file(path).map_err(io_err(path))
}

/// Detaches and removes one interface's pinned link.
pub(super) fn remove_link(dir: &PinDir, interface: &str) -> Result<(), DatapathError> {
    detach_link(&dir.link(interface))
}

/// Entries under `dir` that are not in the layout this module writes, as
/// paths relative to it. Map names are not checked against this build's
/// maps: an older build's map must still be removable after an upgrade.
fn foreign_entries(dir: &PinDir) -> Result<Vec<String>, DatapathError> {
    let mut found = Vec::new();
    for name in list(dir.root())? {
        if !matches!(name.as_str(), "prog" | "prog_next" | "maps" | "links") {
            found.push(name);
        }
    }
    for name in list(&dir.links())? {
        if decode_interface(&name).is_none_or(|n| n.is_empty() || n.len() > 15) {
            found.push(format!("links/{name}"));
        }
    }
    for name in list(&dir.maps())? {
        let ours = name.starts_with(|c: char| c.is_ascii_uppercase())
            && name
                .bytes()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_');
        if !ours {
            found.push(format!("maps/{name}"));
        }
    }
    Ok(found)
}

/// Removes every pinned object under `dir` and detaches its links. Only the
/// layout this module writes is touched, and it is checked before anything
/// is removed: an entry this module does not write stops it with nothing
/// changed, so a mistyped `pin_path` (say, the bpffs root) cannot take other
/// programs' pins, or this datapath's own links, with it.
pub fn remove_all(dir: &PinDir) -> Result<Removed, DatapathError> {
    let mut removed = Removed::default();
    if !dir.root().exists() {
        return Ok(removed);
    }
    check_bpffs(dir.root())?;
    let found = foreign_entries(dir)?;
    if !found.is_empty() {
        return Err(DatapathError::ForeignPins {
            path: dir.root().to_path_buf(),
            found,
        });
    }
    for name in list(&dir.links())? {
        detach_link(&dir.links().join(&name))?;
        removed.links.push(decode_interface(&name).unwrap_or(name));
    }
    for path in [dir.program(), dir.program_next()] {
        if path.exists() {
            std::fs::remove_file(&path).map_err(io_err(&path))?;
            removed.program = true;
        }
    }
    for name in list(&dir.maps())? {
        let path = dir.map(&name);
        std::fs::remove_file(&path).map_err(io_err(&path))?;
        removed.maps.push(name);
    }
    for sub in [dir.links(), dir.maps(), dir.root().to_path_buf()] {
        match std::fs::remove_dir(&sub) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&sub)(e)),
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_round_trip_without_dots() {
        for name in ["eth0", "eth0.100", "a%b", "%2E", "lb0"] {
            let enc = encode_interface(name);
            assert!(!enc.contains('.'), "{enc}");
            assert_eq!(decode_interface(&enc).as_deref(), Some(name));
        }
        assert_eq!(decode_interface("bad%zz"), None);
    }
}
