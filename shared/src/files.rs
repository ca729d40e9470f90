//! Opening the table's directory and files without trusting what is already there: no
//! symbolic links, no directory another user can change, no file another user owns, and new
//! files appear whole (initialised under a temporary name, then linked into place).

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The writer's effective user id.
fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

fn c_name(path: &Path, name: &std::ffi::OsStr) -> Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| Error::Unsafe {
        path: path.to_owned(),
        what: "file",
        why: "has a NUL byte in its name".into(),
    })
}

/// Opens (creating it if missing) the directory that holds the table, for the writer, and
/// checks that only the writer's user can change what is in it.
pub(crate) fn writer_dir(dir: &Path) -> Result<File> {
    if std::fs::symlink_metadata(dir).is_err() {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, "create directory", e))?;
        }
        let mut b = std::fs::DirBuilder::new();
        std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o755);
        match b.create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io(dir, "create directory", e)),
        }
    }
    let c = CString::new(dir.as_os_str().as_bytes()).map_err(|_| Error::Unsafe {
        path: dir.to_owned(),
        what: "directory",
        why: "has a NUL byte in its name".into(),
    })?;
    // SAFETY: `c` is a valid NUL-terminated path; the returned descriptor is owned below.
    let fd = unsafe {
        libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
    };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        return Err(match err.raw_os_error() {
            Some(libc::ELOOP) => Error::Symlink { path: dir.to_owned() },
            Some(libc::ENOTDIR) => Error::Unsafe {
                path: dir.to_owned(),
                what: "directory",
                why: "is not a directory (or is a symbolic link)".into(),
            },
            _ => Error::io(dir, "open directory", err),
        });
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    let meta = file.metadata().map_err(|e| Error::io(dir, "stat", e))?;
    check_owner(dir, "directory", &meta)?;
    if meta.mode() & 0o022 != 0 {
        let who = if meta.mode() & 0o002 != 0 { "everyone" } else { "its group" };
        return Err(Error::Unsafe {
            path: dir.to_owned(),
            what: "directory",
            why: format!(
                "is writable by {who} (mode {:04o}), who could delete or replace the table: \
                 `chmod go-w` it (a setgid bit for the workers' group is fine), or use a \
                 directory of its own",
                meta.mode() & 0o7777
            ),
        });
    }
    Ok(file)
}

fn check_owner(path: &Path, what: &'static str, meta: &std::fs::Metadata) -> Result<()> {
    let me = euid();
    if meta.uid() != me {
        return Err(Error::Unsafe {
            path: path.to_owned(),
            what,
            why: format!(
                "is owned by uid {}, but the writer runs as uid {me}: the writer only uses a \
                 {what} it owns (chown it, or remove it and let the writer create it)",
                meta.uid()
            ),
        });
    }
    Ok(())
}

/// Opens `name` in the writer's directory read-write, never through a symbolic link, and
/// checks it is a regular file the writer owns. `Ok(None)` if it does not exist.
pub(crate) fn open_owned(dir: &File, path: &Path) -> Result<Option<File>> {
    let name = path.file_name().ok_or_else(|| Error::Unsafe {
        path: path.to_owned(),
        what: "file",
        why: "has no file name".into(),
    })?;
    let c = c_name(path, name)?;
    // SAFETY: `dir` is an open directory and `c` a NUL-terminated name; the descriptor
    // returned is owned below.
    let fd = unsafe {
        libc::openat(dir.as_raw_fd(), c.as_ptr(), libc::O_RDWR | libc::O_NOFOLLOW | libc::O_CLOEXEC)
    };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENOENT) => Ok(None),
            Some(libc::ELOOP) => Err(Error::Symlink { path: path.to_owned() }),
            _ => Err(Error::io(path, "open", err)),
        };
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    let meta = file.metadata().map_err(|e| Error::io(path, "stat", e))?;
    if !meta.file_type().is_file() {
        return Err(Error::Unsafe {
            path: path.to_owned(),
            what: "file",
            why: "is not a regular file".into(),
        });
    }
    check_owner(path, "file", &meta)?;
    Ok(Some(file))
}

/// Opens `path` for reading (and writing, with `write`) without following a final symbolic
/// link: the readers' way in.
pub(crate) fn open_nofollow(path: &Path, write: bool) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => Error::Symlink { path: path.to_owned() },
            _ => Error::io(path, "open", e),
        })
}

/// Sets `file`'s permission bits to `mode` (regardless of the umask).
pub(crate) fn set_mode(file: &File, path: &Path, mode: u32) -> Result<()> {
    file.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(|e| Error::io(path, "chmod", e))
}

/// Creates `path` (in `dir`) whole: a temporary file of `len` bytes and `mode` is prepared by
/// `init`, then hard-linked to the final name, which fails if that name exists. Readers that
/// open the path therefore see either no file or a fully initialised one.
pub(crate) fn create_whole(
    dir: &File,
    path: &Path,
    len: u64,
    mode: u32,
    init: impl FnOnce(&File) -> Result<()>,
) -> Result<File> {
    let name = path.file_name().ok_or_else(|| Error::Unsafe {
        path: path.to_owned(),
        what: "file",
        why: "has no file name".into(),
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".new-{}", std::process::id()));
    let tmp_path: PathBuf = path.with_file_name(&tmp_name);
    let tmp = c_name(path, &tmp_name)?;
    let fin = c_name(path, name)?;
    // A leftover of a writer of this pid that died mid-creation.
    // SAFETY: valid directory descriptor and NUL-terminated name.
    unsafe { libc::unlinkat(dir.as_raw_fd(), tmp.as_ptr(), 0) };
    // SAFETY: as above; O_EXCL|O_NOFOLLOW never opens an existing file or link.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            tmp.as_ptr(),
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(Error::io(&tmp_path, "create", std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    let unlink_tmp = || {
        // SAFETY: valid directory descriptor and NUL-terminated name.
        unsafe { libc::unlinkat(dir.as_raw_fd(), tmp.as_ptr(), 0) };
    };
    let prepared = set_mode(&file, &tmp_path, mode)
        .and_then(|()| file.set_len(len).map_err(|e| Error::io(&tmp_path, "resize", e)))
        .and_then(|()| init(&file));
    if let Err(e) = prepared {
        unlink_tmp();
        return Err(e);
    }
    // SAFETY: valid descriptors and NUL-terminated names; linkat does not follow links.
    let rc = unsafe { libc::linkat(dir.as_raw_fd(), tmp.as_ptr(), dir.as_raw_fd(), fin.as_ptr(), 0) };
    let err = std::io::Error::last_os_error();
    unlink_tmp();
    if rc != 0 {
        return Err(Error::io(path, "link", err));
    }
    Ok(file)
}

/// (device, inode) of what `path` names now, without following a final symbolic link.
pub(crate) fn path_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Takes an exclusive `flock` on `file`, waiting or not.
pub(crate) fn flock(file: &File, wait: bool) -> std::io::Result<bool> {
    let flags = if wait { libc::LOCK_EX } else { libc::LOCK_EX | libc::LOCK_NB };
    loop {
        // SAFETY: flock on a descriptor borrowed for the call; no memory involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), flags) };
        if rc == 0 {
            return Ok(true);
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => return Ok(false),
            _ => return Err(err),
        }
    }
}

/// The identity of a process that survives pid reuse: (pid, start time in clock ticks since
/// boot, from `/proc/PID/stat`).
pub(crate) fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ')' come field 3 (state) onwards; start time is field 22.
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Inode of this process's pid namespace (0 if unknown).
pub(crate) fn pid_namespace() -> u64 {
    std::fs::metadata("/proc/self/ns/pid").map(|m| m.ino()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_start_is_stable_and_others_differ() {
        let me = std::process::id();
        let a = process_start(me).expect("own start time");
        assert_eq!(process_start(me), Some(a));
        assert!(process_start(u32::MAX - 1).is_none(), "no such process");
        assert_ne!(pid_namespace(), 0);
    }
}
