//! Paths zc-hostd creates over and removes. It runs as root, so a typo in
//! a path must never cost a file: it replaces only what it can tell is a
//! leftover (a socket nobody listens on; a pool file is checked in `pool`),
//! refuses everything else with one line naming the path, and at the end
//! removes only files that are still the ones it created.

use crate::access::Access;
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PathError {
    #[error("{what} {}: {kind} is in the way (zc-hostd replaces only a socket nobody listens on); remove it or choose another path", path.display())]
    InTheWay {
        what: &'static str,
        path: PathBuf,
        kind: &'static str,
    },
    #[error("{what} {}: {kind} is in the way (zc-hostd replaces only a link a stopped zc-hostd left, to a missing file or to this cluster's pool); remove it", path.display())]
    LinkInTheWay {
        what: &'static str,
        path: PathBuf,
        kind: &'static str,
    },
    #[error("{what} {}: another process is listening on it; stop that process or choose another path", path.display())]
    Live { what: &'static str, path: PathBuf },
    #[error("{what} {}: cannot tell whether the socket there is stale ({source}); remove it if it is, or choose another path", path.display())]
    Unknown {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{what} {}: {kind} is in the way, not a directory; remove it or choose another directory", path.display())]
    NotADirectory {
        what: &'static str,
        path: PathBuf,
        kind: &'static str,
    },
    #[error("{what} {}: {kind} is in the way, not a regular file; remove it", path.display())]
    NotAFile {
        what: &'static str,
        path: PathBuf,
        kind: &'static str,
    },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// What a file is, for error lines ("a regular file is in the way").
pub fn kind(meta: &Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_fifo() {
        "a FIFO"
    } else {
        "a device file"
    }
}

/// A file this process created. Removing it removes the path only while
/// the path still names that file: whatever replaced it since (another
/// daemon's socket, a user's file) stays. The file is known by device and
/// inode number, so keep it referenced (open, or the socket bound) while
/// this is used: a freed inode number is soon given to a new file.
#[derive(Debug)]
pub struct Owned {
    path: PathBuf,
    dev: u64,
    ino: u64,
    /// For a symbolic link (which cannot be kept open), where it points:
    /// a new link may get the old one's inode number at once.
    target: Option<PathBuf>,
}

impl Owned {
    /// Records the file at `path` as ours; call right after creating it.
    pub fn record(path: &Path) -> io::Result<Owned> {
        let m = fs::symlink_metadata(path)?;
        let target = if m.file_type().is_symlink() {
            Some(fs::read_link(path)?)
        } else {
            None
        };
        Ok(Owned {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
            target,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True while `path` still names the file we created.
    pub fn is_ours(&self) -> bool {
        fs::symlink_metadata(&self.path).is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino)
            && self
                .target
                .as_ref()
                .is_none_or(|t| fs::read_link(&self.path).is_ok_and(|now| now == *t))
    }

    /// Removes the file if it is still ours; true if it did.
    pub fn remove(&self) -> bool {
        if !self.is_ours() {
            if self.path.exists() {
                log::warn!(
                    "{} is no longer the file zc-hostd created: left in place",
                    self.path.display()
                );
            }
            return false;
        }
        fs::remove_file(&self.path).is_ok()
    }
}

/// Makes `path` free for a new socket: nothing is there, or a socket nobody
/// listens on (a daemon that was killed left it), which is removed.
///
/// Between the check and the caller's bind another process could take the
/// path; its bind or ours then fails (EADDRINUSE), nothing is lost.
pub fn clear_for_socket(what: &'static str, path: &Path) -> Result<(), PathError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(PathError::Io {
                what,
                path: path.into(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(PathError::InTheWay {
            what,
            path: path.into(),
            kind: kind(&meta),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(PathError::Live {
            what,
            path: path.into(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            fs::remove_file(path).map_err(|source| PathError::Io {
                what,
                path: path.into(),
                source,
            })
        }
        // A listener with a full backlog, or a datagram socket that is
        // bound: someone is there.
        Err(e)
            if e.kind() == io::ErrorKind::WouldBlock
                || e.raw_os_error() == Some(libc::EPROTOTYPE) =>
        {
            Err(PathError::Live {
                what,
                path: path.into(),
            })
        }
        Err(source) => Err(PathError::Unknown {
            what,
            path: path.into(),
            source,
        }),
    }
}

/// Listens on a new socket at `path` (see [`clear_for_socket`]) with the
/// file mode and group of `access`.
pub fn bind_socket(
    what: &'static str,
    path: &Path,
    access: Access,
) -> Result<(UnixListener, Owned), PathError> {
    clear_for_socket(what, path)?;
    let io = |source| PathError::Io {
        what,
        path: path.into(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(io)?;
    let owned = Owned::record(path).map_err(io)?;
    let set = access
        .apply_group(path)
        .and_then(|()| fs::set_permissions(path, fs::Permissions::from_mode(access.mode)));
    if let Err(e) = set {
        owned.remove();
        return Err(io(e));
    }
    Ok((listener, owned))
}

/// Makes `link` a symbolic link to `target`. What is there already is
/// replaced only when `leftover` says the link there is one a stopped
/// daemon left (its target is gone, or is this cluster's pool); anything
/// else is in the way.
pub fn make_symlink(
    what: &'static str,
    link: &Path,
    target: &Path,
    leftover: impl FnOnce(&Path) -> bool,
) -> Result<Owned, PathError> {
    let io = |source| PathError::Io {
        what,
        path: link.into(),
        source,
    };
    match fs::symlink_metadata(link) {
        Ok(m) if m.file_type().is_symlink() => {
            let old = fs::read_link(link).map_err(io)?;
            let old = if old.is_relative() {
                link.parent().unwrap_or(Path::new("/")).join(old)
            } else {
                old
            };
            if !leftover(&old) {
                return Err(PathError::LinkInTheWay {
                    what,
                    path: link.into(),
                    kind: "a symbolic link to something else",
                });
            }
            fs::remove_file(link).map_err(io)?;
        }
        Ok(m) => {
            return Err(PathError::LinkInTheWay {
                what,
                path: link.into(),
                kind: kind(&m),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    std::os::unix::fs::symlink(target, link).map_err(io)?;
    Owned::record(link).map_err(io)
}

/// Creates `base/part1/part2/...`, one level at a time, where `base`
/// must exist. A level that exists must be a real directory, not a link
/// to one: zc-hostd puts and removes files in these.
pub fn make_dirs(what: &'static str, base: &Path, parts: &[&str]) -> Result<PathBuf, PathError> {
    // Another daemon may remove an empty shared level (`zc/`) between our
    // mkdir of it and of the next one: start over, a few times.
    let mut tries = 0;
    loop {
        match make_dirs_once(what, base, parts) {
            Err(PathError::Io { source, .. })
                if source.kind() == io::ErrorKind::NotFound && tries < 5 =>
            {
                tries += 1;
            }
            r => return r,
        }
    }
}

fn make_dirs_once(what: &'static str, base: &Path, parts: &[&str]) -> Result<PathBuf, PathError> {
    let mut dir = base.to_path_buf();
    for p in parts {
        dir.push(p);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let m = fs::symlink_metadata(&dir).map_err(|source| PathError::Io {
                    what,
                    path: dir.clone(),
                    source,
                })?;
                if !m.is_dir() {
                    return Err(PathError::NotADirectory {
                        what,
                        path: dir,
                        kind: kind(&m),
                    });
                }
            }
            Err(source) => {
                return Err(PathError::Io {
                    what,
                    path: dir,
                    source,
                })
            }
        }
    }
    Ok(dir)
}

/// Removes `dir` and then up to `levels - 1` of its parents, each only if
/// it is empty (rmdir never removes files, nor follows a link).
pub fn remove_empty_dirs(dir: &Path, levels: usize) {
    for d in dir.ancestors().take(levels) {
        if fs::remove_dir(d).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        // Nothing there.
        let (l, owned) = bind_socket("export socket", &p, Access::PRIVATE).unwrap();
        // Live: refused, and the socket still works.
        let e = bind_socket("export socket", &p, Access::PRIVATE).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "export socket {}: another process is listening on it; stop that process or choose another path",
                p.display()
            )
        );
        UnixStream::connect(&p).unwrap();
        // Someone else's socket at the path now: ours no longer.
        fs::remove_file(&p).unwrap();
        let (other, other_owned) = bind_socket("export socket", &p, Access::PRIVATE).unwrap();
        assert!(!owned.is_ours());
        assert!(
            !owned.remove(),
            "the old record does not remove the new socket"
        );
        assert!(p.exists());
        drop(l);
        // Stale (its listener is gone): replaced.
        drop(other);
        let (_l3, owned3) = bind_socket("export socket", &p, Access::PRIVATE).unwrap();
        assert!(owned3.remove());
        assert!(!p.exists());
        drop(other_owned);
    }

    #[test]
    fn anything_but_a_socket_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        fs::write(&file, b"precious").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let sub = dir.path().join("dir");
        fs::create_dir(&sub).unwrap();
        for (p, kind) in [
            (&file, "a regular file"),
            (&link, "a symbolic link"),
            (&sub, "a directory"),
        ] {
            let e = bind_socket("control socket", p, Access::PRIVATE).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "control socket {}: {kind} is in the way (zc-hostd replaces only a socket nobody listens on); remove it or choose another path",
                    p.display()
                )
            );
        }
        assert_eq!(fs::read(&file).unwrap(), b"precious");
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(sub.is_dir());
    }

    #[test]
    fn a_link_replaces_only_a_leftover_link() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("zcpool7");
        let pool = dir.path().join("pool");
        fs::write(&pool, b"pool").unwrap();
        let pool_of_7 = |t: &Path| t == pool;
        // Nothing there; then our own link again (a daemon killed with -9).
        let owned = make_symlink("pool link", &link, &pool, pool_of_7).unwrap();
        assert!(owned.is_ours());
        let again = make_symlink("pool link", &link, &pool, pool_of_7).unwrap();
        assert!(again.is_ours());
        // Dangling: its target is gone.
        fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(dir.path().join("gone"), &link).unwrap();
        let gone = |t: &Path| !t.exists();
        make_symlink("pool link", &link, &pool, gone).unwrap();
        assert_eq!(fs::read_link(&link).unwrap(), pool);
        // A link to something else, and a regular file, stay.
        let other = dir.path().join("other");
        fs::write(&other, b"x").unwrap();
        fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(&other, &link).unwrap();
        let e =
            make_symlink("pool link", &link, &pool, |t| !t.exists() || pool_of_7(t)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "pool link {}: a symbolic link to something else is in the way (zc-hostd replaces only a link a stopped zc-hostd left, to a missing file or to this cluster's pool); remove it",
                link.display()
            )
        );
        assert_eq!(fs::read_link(&link).unwrap(), other);
        assert!(
            !again.remove(),
            "a link to elsewhere is not ours, whatever its inode"
        );
        assert!(link.exists());
        fs::remove_file(&link).unwrap();
        fs::write(&link, b"mine").unwrap();
        let e = make_symlink("pool link", &link, &pool, |_| true).unwrap_err();
        assert!(
            e.to_string().contains("a regular file is in the way"),
            "{e}"
        );
        assert_eq!(fs::read(&link).unwrap(), b"mine");
        drop(again);
    }

    #[test]
    fn directories_must_be_real_ones() {
        let dir = tempfile::tempdir().unwrap();
        let made = make_dirs("run directory", dir.path(), &["zc", "7"]).unwrap();
        assert!(made.is_dir());
        assert_eq!(
            make_dirs("run directory", dir.path(), &["zc", "7"]).unwrap(),
            made
        );
        let elsewhere = dir.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.path().join("zc/8")).unwrap();
        let e = make_dirs("run directory", dir.path(), &["zc", "8"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "run directory {}: a symbolic link is in the way, not a directory; remove it or choose another directory",
                dir.path().join("zc/8").display()
            )
        );
        fs::write(made.join("keep"), b"x").unwrap();
        remove_empty_dirs(&made, 2);
        assert!(made.join("keep").exists(), "rmdir never removes files");
        fs::remove_file(made.join("keep")).unwrap();
        remove_empty_dirs(&made, 2);
        assert!(!made.exists());
        assert!(dir.path().join("zc").exists(), "zc/8 is still in it");
    }
}
