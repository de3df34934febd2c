//! The cluster lock: at most one zc-hostd per cluster id on the machine,
//! whatever its --run-dir or --hugepages, taken before anything of the
//! cluster (pool, run directory, sockets) is touched.
//!
//! Why this lock, and why here:
//! - One lock per cluster id for the whole machine, at a fixed place
//!   (`<shm>/zc/<cluster>/lock`, /dev/shm for zc-hostd), not in the run
//!   directory: the pool's path depends only on the cluster id, so a lock
//!   in the run directory let a second daemon with another --run-dir
//!   delete and recreate a running cluster's pool.
//! - `flock`, not POSIX `fcntl` locks: a flock belongs to the open file
//!   description, so the kernel drops it when the daemon dies however it
//!   dies (kill -9 included: a restarted daemon, issue 14, finds the lock of
//!   a dead one free and can adopt its pool), and nothing else in the
//!   process can lose it. An fcntl lock would report its holder's pid
//!   (F_GETLK) but is dropped as soon as the process closes *any*
//!   descriptor of the file, which any future code reading the record would
//!   do; OFD locks keep it but report no pid either.
//! - flock names no holder, so the holder writes a record (its pid, its run
//!   directory) into the lock file. hugetlbfs files cannot be written, so
//!   the lock does not live beside a hugepage pool but on tmpfs; a record
//!   also tells a successor where a dead daemon's files are.
//! - The lock file is removed at shutdown, while still locked. Whoever
//!   opened it before that and locks it after sees that the path no longer
//!   names the file it locked, and starts over on a fresh one.

use crate::paths::{self, PathError};
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum LockError {
    #[error("cluster {cluster} is already served by zc-hostd ({holder}); stop it first or pick another cluster id")]
    Held { cluster: u32, holder: String },
    #[error(transparent)]
    Path(#[from] PathError),
}

/// The lock of one cluster, held until dropped (or released, which also
/// removes its file).
pub struct ClusterLock {
    file: File,
    path: PathBuf,
}

/// Where the lock of `cluster` lives, under `base` (/dev/shm).
pub fn lock_path(base: &Path, cluster: u32) -> PathBuf {
    base.join("zc").join(cluster.to_string()).join("lock")
}

impl ClusterLock {
    /// Takes the lock of `cluster` under `base` and records this process
    /// (pid, `run_dir`) as its holder.
    pub fn take(base: &Path, cluster: u32, run_dir: &Path) -> Result<ClusterLock, LockError> {
        let path = lock_path(base, cluster);
        let io = |source| {
            LockError::Path(PathError::Io {
                what: "cluster lock",
                path: path.clone(),
                source,
            })
        };
        for _ in 0..10 {
            paths::make_dirs(
                "cluster lock directory",
                base,
                &["zc", &cluster.to_string()],
            )?;
            let file = match open_lock_file(&path) {
                Ok(f) => f,
                // The directory went with a daemon that just stopped.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                    return Err(PathError::NotAFile {
                        what: "cluster lock",
                        path,
                        kind: "a symbolic link",
                    }
                    .into())
                }
                Err(e) => return Err(io(e)),
            };
            let meta = file.metadata().map_err(io)?;
            if !meta.is_file() {
                return Err(PathError::NotAFile {
                    what: "cluster lock",
                    path,
                    kind: paths::kind(&meta),
                }
                .into());
            }
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                    return Err(io(e));
                }
                return Err(LockError::Held {
                    cluster,
                    holder: holder_of(file),
                });
            }
            // Locked; but a stopping daemon may have removed this file
            // (still under its lock) after we opened it.
            let still = std::fs::symlink_metadata(&path)
                .is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino());
            if !still {
                continue;
            }
            let mut lock = ClusterLock {
                file,
                path: path.clone(),
            };
            lock.write_record(run_dir).map_err(io)?;
            return Ok(lock);
        }
        Err(io(io::Error::other(
            "it keeps being removed and recreated by other zc-hostd processes",
        )))
    }

    fn write_record(&mut self, run_dir: &Path) -> io::Result<()> {
        let mut rec = format!("pid={}\nrun_dir=", std::process::id()).into_bytes();
        rec.extend_from_slice(run_dir.as_os_str().as_bytes());
        rec.push(b'\n');
        self.file.set_len(0)?;
        self.file.rewind()?;
        self.file.write_all(&rec)
    }

    /// Removes the lock file (and its directories, if empty), then unlocks.
    pub fn release(self) {
        let ours = std::fs::symlink_metadata(&self.path).is_ok_and(|m| {
            self.file
                .metadata()
                .is_ok_and(|f| f.dev() == m.dev() && f.ino() == m.ino())
        });
        if ours && std::fs::remove_file(&self.path).is_ok() {
            if let Some(dir) = self.path.parent() {
                paths::remove_empty_dirs(dir, 2);
            }
        }
        // Dropping the file unlocks.
    }
}

fn open_lock_file(path: &Path) -> io::Result<File> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // O_NOFOLLOW: a link planted at the lock's path is refused, not
    // followed into a file elsewhere. O_CLOEXEC: no child inherits the lock.
    // SAFETY: open with a valid C string; the result is checked.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDWR | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK,
            0o644 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Who holds a lock we could not take, from its record: "pid N, run
/// directory D". The holder writes the record just after locking, so a
/// record that is missing or names a dead process is read again for a
/// moment before giving up.
fn holder_of(mut file: File) -> String {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let mut text = String::new();
        let _ = file.rewind();
        let _ = file.read_to_string(&mut text);
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
                .map(str::to_string)
        };
        let pid = field("pid").and_then(|p| p.parse::<i32>().ok());
        if let Some(pid) = pid.filter(|&p| alive(p)) {
            return match field("run_dir") {
                Some(d) => format!("pid {pid}, run directory {d}"),
                None => format!("pid {pid}"),
            };
        }
        if Instant::now() > deadline {
            return "pid unknown".into();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0
            || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_taker_is_refused_with_the_holders_pid_and_run_dir() {
        let dir = tempfile::tempdir().unwrap();
        let a = ClusterLock::take(dir.path(), 5, Path::new("/run/a")).unwrap();
        let e = ClusterLock::take(dir.path(), 5, Path::new("/run/b"))
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            format!(
                "cluster 5 is already served by zc-hostd (pid {}, run directory /run/a); stop it first or pick another cluster id",
                std::process::id()
            )
        );
        // Another cluster is independent.
        let c = ClusterLock::take(dir.path(), 6, Path::new("/run/b")).unwrap();
        a.release();
        assert!(!lock_path(dir.path(), 5).exists());
        assert!(!dir.path().join("zc/5").exists());
        let b = ClusterLock::take(dir.path(), 5, Path::new("/run/b")).unwrap();
        b.release();
        c.release();
        assert!(!dir.path().join("zc").exists());
    }

    #[test]
    fn a_lock_left_by_a_dead_holder_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let path = lock_path(dir.path(), 9);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "pid=999999999\nrun_dir=/old\n").unwrap();
        let l = ClusterLock::take(dir.path(), 9, Path::new("/new")).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("pid={}\nrun_dir=/new\n", std::process::id())
        );
        l.release();
    }

    #[test]
    fn a_link_at_the_lock_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = lock_path(dir.path(), 3);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, "keep").unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let e = ClusterLock::take(dir.path(), 3, Path::new("/r"))
            .err()
            .unwrap();
        assert!(
            e.to_string().contains("a symbolic link is in the way"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    }
}
