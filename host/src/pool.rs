//! The buffer pool: one file on hugetlbfs (or, failing that, on /dev/shm)
//! mapped by the daemon, by host applications, and into guests as the BAR of
//! an ivshmem-plain device.

use crate::shm::Mapping;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use thiserror::Error;
use zc_proto::layout::HUGEPAGE_SIZE;
use zc_proto::{PoolHeader, PoolLayout, PoolView};

const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

#[derive(Debug, Error)]
pub enum PoolError {
    #[error("cannot create pool directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error("cannot create pool file {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot map pool file {path} ({size} bytes): {source}")]
    Map {
        path: PathBuf,
        size: u64,
        source: io::Error,
    },
}

/// Where the pool's pages come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backing {
    Hugepages,
    /// Regular shared memory, with the reason hugepages were not used.
    SharedMemory {
        reason: String,
    },
}

#[derive(Clone, Debug)]
pub struct PoolOptions {
    pub layout: PoolLayout,
    /// A hugetlbfs mount; the pool goes to `<dir>/zc/<cluster>/pool`.
    pub hugepages_dir: PathBuf,
    /// Where the fallback goes: `<dir>/zc/<cluster>/pool`.
    pub fallback_dir: PathBuf,
    /// Skip hugepages even if available (tests of the fallback).
    pub force_fallback: bool,
}

pub struct Pool {
    path: PathBuf,
    file: File,
    map: Mapping,
    layout: PoolLayout,
    backing: Backing,
}

fn is_hugetlbfs(dir: &Path) -> io::Result<bool> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: statfs writes into the zeroed struct we own; the path is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == HUGETLBFS_MAGIC)
}

fn free_hugepages() -> Option<u64> {
    let s = fs::read_to_string("/proc/meminfo").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The directory of one cluster's pool under `base`.
pub fn cluster_dir(base: &Path, cluster: u32) -> PathBuf {
    base.join("zc").join(cluster.to_string())
}

/// Creates the file, reserves its pages and maps it.
fn create_file(path: &Path, size: u64) -> Result<(File, Mapping), PoolError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(dir).map_err(|source| PoolError::Dir {
        path: dir.into(),
        source,
    })?;
    let create = |source| PoolError::Create {
        path: path.into(),
        source,
    };
    // A stale pool of a killed daemon may be there: start from nothing.
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(create(e)),
        _ => {}
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o660)
        .open(path)
        .map_err(create)?;
    file.set_permissions(fs::Permissions::from_mode(0o660))
        .map_err(create)?;
    file.set_len(size).map_err(create)?;
    // Reserve every page now: on hugetlbfs this fails with ENOSPC when too few
    // hugepages are free, instead of SIGBUS on first touch later.
    // SAFETY: fallocate on a file we own, range within its size.
    if unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            0,
            0,
            size as libc::off_t,
        )
    } != 0
    {
        let e = io::Error::last_os_error();
        let _ = fs::remove_file(path);
        return Err(create(e));
    }
    let map = Mapping::map(file.as_fd(), size as usize, true).map_err(|source| {
        let _ = fs::remove_file(path);
        PoolError::Map {
            path: path.into(),
            size,
            source,
        }
    })?;
    Ok((file, map))
}

impl Pool {
    /// Creates the pool, on hugepages when it can; see [`Pool::fallback_warning`].
    pub fn create(opts: &PoolOptions) -> Result<Pool, PoolError> {
        let size = opts.layout.pool_size;
        let cluster = opts.layout.cluster_id;
        let pages = size / HUGEPAGE_SIZE;
        let reason = if opts.force_fallback {
            "hugepages disabled with --no-hugepages".to_string()
        } else {
            match is_hugetlbfs(&opts.hugepages_dir) {
                Ok(true) => {
                    let path = cluster_dir(&opts.hugepages_dir, cluster).join("pool");
                    match create_file(&path, size) {
                        Ok((file, map)) => {
                            return Ok(Pool::finish(
                                path,
                                file,
                                map,
                                opts.layout,
                                Backing::Hugepages,
                            ))
                        }
                        Err(e) => format!(
                            "{e} ({} of {pages} needed 2 MiB hugepages free)",
                            free_hugepages().map_or("unknown".into(), |n| n.to_string())
                        ),
                    }
                }
                Ok(false) => format!("{} is not a hugetlbfs mount", opts.hugepages_dir.display()),
                Err(e) => format!("{}: {e}", opts.hugepages_dir.display()),
            }
        };
        let path = cluster_dir(&opts.fallback_dir, cluster).join("pool");
        let (file, map) = create_file(&path, size)?;
        Ok(Pool::finish(
            path,
            file,
            map,
            opts.layout,
            Backing::SharedMemory { reason },
        ))
    }

    fn finish(
        path: PathBuf,
        file: File,
        map: Mapping,
        layout: PoolLayout,
        backing: Backing,
    ) -> Pool {
        // SAFETY: the mapping is pool_size bytes, page aligned, and nobody
        // else has the file yet; PoolHeader fits in the header page.
        unsafe { std::ptr::write_volatile(map.as_ptr().cast::<PoolHeader>(), layout.header()) };
        Pool {
            path,
            file,
            map,
            layout,
            backing,
        }
    }

    /// The one-line warning for a pool that is not on hugepages.
    pub fn fallback_warning(&self) -> Option<String> {
        let Backing::SharedMemory { reason } = &self.backing else {
            return None;
        };
        let pages = self.layout.pool_size / HUGEPAGE_SIZE;
        Some(format!(
            "pool of {} MiB is in {} on 4 KiB pages, not hugepages ({reason}); for full speed reserve \
             hugepages as root: echo {pages} > /proc/sys/vm/nr_hugepages && mkdir -p /dev/hugepages && \
             (mountpoint -q /dev/hugepages || mount -t hugetlbfs nodev /dev/hugepages)",
            self.layout.pool_size >> 20,
            self.path.display(),
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn layout(&self) -> &PoolLayout {
        &self.layout
    }

    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    pub fn view(&self) -> PoolView {
        // SAFETY: the mapping is pool_size bytes and lives as long as `self`;
        // callers keep the Pool alive while they use the view.
        unsafe { PoolView::new(self.map.as_ptr(), self.layout) }
    }

    /// Removes the file and its (now empty) cluster directory.
    pub fn remove(&self) {
        let _ = fs::remove_file(&self.path);
        // The cluster directory, then `zc/` if no other cluster uses it.
        for dir in self.path.ancestors().skip(1).take(2) {
            let _ = fs::remove_dir(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_pool_has_a_valid_header_and_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let layout = PoolLayout::new(42, 2048, 64).unwrap();
        let pool = Pool::create(&PoolOptions {
            layout,
            hugepages_dir: dir.path().join("no-such-mount"),
            fallback_dir: dir.path().to_path_buf(),
            force_fallback: false,
        })
        .unwrap();
        assert_eq!(pool.path(), dir.path().join("zc/42/pool"));
        assert!(matches!(pool.backing(), Backing::SharedMemory { .. }));
        let w = pool.fallback_warning().unwrap();
        assert!(
            w.contains("nr_hugepages") && w.contains("no-such-mount"),
            "{w}"
        );
        assert_eq!(fs::metadata(pool.path()).unwrap().len(), layout.pool_size);
        // SAFETY: the mapping holds a header page.
        let h = unsafe { std::ptr::read_volatile(pool.view().base().cast::<PoolHeader>()) };
        assert_eq!(
            PoolLayout::from_header(&h, layout.pool_size).unwrap(),
            layout
        );
        pool.remove();
        assert!(!dir.path().join("zc/42").exists());
    }
}
