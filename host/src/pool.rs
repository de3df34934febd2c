//! The buffer pool: one file on hugetlbfs (or, failing that, on /dev/shm)
//! mapped by the daemon, by host applications, and into guests as the BAR of
//! an ivshmem-plain device.

use crate::paths::{self, Owned, PathError};
use crate::shm::Mapping;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;
use zc_proto::layout::HUGEPAGE_SIZE;
use zc_proto::{PoolHeader, PoolLayout, PoolView};

const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

#[derive(Debug, Error)]
pub enum PoolError {
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("pool file {}: {why} is in the way, not the pool of a stopped zc-hostd of cluster {cluster}; remove it if nothing needs it", path.display())]
    NotAPool {
        path: PathBuf,
        cluster: u32,
        why: String,
    },
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
    /// The file as created: removed at the end only if still there.
    owned: Owned,
    file: File,
    /// Owns the mapping: every clone of it keeps the pool mapped.
    view: PoolView,
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

/// Removes what a killed daemon of `cluster` left at `path`: a regular
/// file whose header says it is that cluster's pool. Anything else there is
/// refused and kept. The caller holds the cluster lock, so no running
/// daemon owns such a file.
/// True when `path` is a regular file whose header says it is the zc
/// pool of `cluster`.
pub fn is_pool_of(path: &Path, cluster: u32) -> bool {
    let mut head = [0u8; 16];
    let read = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .and_then(|mut f| {
            if !f.metadata()?.is_file() {
                return Err(io::Error::other("not a regular file"));
            }
            f.read_exact(&mut head)
        });
    read.is_ok()
        && head[..8] == zc_proto::layout::POOL_MAGIC
        && u32::from_le_bytes([head[12], head[13], head[14], head[15]]) == cluster
}

fn clear_stale_pool(path: &Path, cluster: u32) -> Result<(), PoolError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(PoolError::Create {
                path: path.into(),
                source,
            })
        }
    };
    let not_a_pool = |why: String| PoolError::NotAPool {
        path: path.into(),
        cluster,
        why,
    };
    if !meta.is_file() {
        return Err(not_a_pool(paths::kind(&meta).into()));
    }
    // hugetlbfs files can be read (not written): the header is there.
    let mut head = [0u8; 16];
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(|e| {
            not_a_pool(format!(
                "a regular file whose zc pool header cannot be read ({e})"
            ))
        })?;
    // Magic (8 bytes), version (4), cluster id (4, little-endian): see PoolHeader.
    if head[..8] != zc_proto::layout::POOL_MAGIC {
        return Err(not_a_pool("a regular file that is not a zc pool".into()));
    }
    let id = u32::from_le_bytes([head[12], head[13], head[14], head[15]]);
    if id != cluster {
        return Err(not_a_pool(format!("the zc pool of cluster {id}")));
    }
    log::info!(
        "replacing {}, left by a zc-hostd that stopped",
        path.display()
    );
    fs::remove_file(path).map_err(|source| PoolError::Create {
        path: path.into(),
        source,
    })
}

/// Creates the pool file of `cluster` under `base` (`<base>/zc/<cluster>/pool`),
/// reserves its pages and maps it.
fn create_file(
    base: &Path,
    cluster: u32,
    size: u64,
) -> Result<(PathBuf, Owned, File, Mapping), PoolError> {
    let dir = paths::make_dirs("pool directory", base, &["zc", &cluster.to_string()])?;
    let path = dir.join("pool");
    let create = |source| PoolError::Create {
        path: path.clone(),
        source,
    };
    clear_stale_pool(&path, cluster)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o660)
        .open(&path)
        .map_err(create)?;
    let owned = Owned::record(&path).map_err(create)?;
    let undo = |e| {
        owned.remove();
        paths::remove_empty_dirs(&dir, 2);
        e
    };
    file.set_permissions(fs::Permissions::from_mode(0o660))
        .map_err(create)
        .map_err(undo)?;
    file.set_len(size).map_err(create).map_err(undo)?;
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
        return Err(undo(create(io::Error::last_os_error())));
    }
    let map = Mapping::map(file.as_fd(), size as usize, true).map_err(|source| {
        undo(PoolError::Map {
            path: path.clone(),
            size,
            source,
        })
    })?;
    Ok((path, owned, file, map))
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
                Ok(true) => match create_file(&opts.hugepages_dir, cluster, size) {
                    Ok((path, owned, file, map)) => {
                        return Ok(Pool::finish(
                            path,
                            owned,
                            file,
                            map,
                            opts.layout,
                            Backing::Hugepages,
                        ))
                    }
                    // Something in the way is the user's to sort out, not
                    // a reason to put the pool elsewhere.
                    Err(e @ (PoolError::Path(_) | PoolError::NotAPool { .. })) => return Err(e),
                    Err(e) => format!(
                        "{e} ({} of {pages} needed 2 MiB hugepages free)",
                        free_hugepages().map_or("unknown".into(), |n| n.to_string())
                    ),
                },
                Ok(false) => format!("{} is not a hugetlbfs mount", opts.hugepages_dir.display()),
                Err(e) => format!("{}: {e}", opts.hugepages_dir.display()),
            }
        };
        let (path, owned, file, map) = create_file(&opts.fallback_dir, cluster, size)?;
        Ok(Pool::finish(
            path,
            owned,
            file,
            map,
            opts.layout,
            Backing::SharedMemory { reason },
        ))
    }

    /// Takes over the pool a daemon of the cluster that died left behind
    /// (VMs keep mapping it), if one is where `create` would put it, with
    /// the size of `opts.layout` and a header naming the cluster. Nothing in
    /// it is rewritten. The header page is guest-writable, so its geometry
    /// fields are not trusted: the caller adopts a pool only together with
    /// the host-private queue area, whose header holds the buffer geometry.
    pub fn adopt(opts: &PoolOptions) -> Option<Pool> {
        let cluster = opts.layout.cluster_id;
        let mut places = Vec::new();
        if !opts.force_fallback && is_hugetlbfs(&opts.hugepages_dir).unwrap_or(false) {
            places.push((opts.hugepages_dir.as_path(), Backing::Hugepages));
        }
        places.push((
            opts.fallback_dir.as_path(),
            Backing::SharedMemory {
                reason: "adopted from a zc-hostd that died, where it had put it".into(),
            },
        ));
        places.into_iter().find_map(|(base, backing)| {
            let path = base.join("zc").join(cluster.to_string()).join("pool");
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(&path)
                .ok()?;
            let meta = file.metadata().ok()?;
            if !meta.is_file() || meta.len() != opts.layout.pool_size {
                return None;
            }
            let owned = Owned::record(&path).ok()?;
            let map = Mapping::map(file.as_fd(), meta.len() as usize, true).ok()?;
            // SAFETY: the mapping is pool_size bytes, more than the header page.
            let h = unsafe { std::ptr::read_volatile(map.as_ptr().cast::<PoolHeader>()) };
            if h.magic != zc_proto::layout::POOL_MAGIC || h.cluster_id != cluster {
                return None;
            }
            let view = PoolView::owning(Arc::new(map), opts.layout)?;
            Some(Pool {
                path,
                owned,
                file,
                view,
                layout: opts.layout,
                backing,
            })
        })
    }

    fn finish(
        path: PathBuf,
        owned: Owned,
        file: File,
        map: Mapping,
        layout: PoolLayout,
        backing: Backing,
    ) -> Pool {
        // SAFETY: the mapping is pool_size bytes, page aligned, and nobody
        // else has the file yet; PoolHeader fits in the header page.
        unsafe { std::ptr::write_volatile(map.as_ptr().cast::<PoolHeader>(), layout.header()) };
        let view =
            PoolView::owning(Arc::new(map), layout).expect("create_file maps pool_size bytes");
        Pool {
            path,
            owned,
            file,
            view,
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

    pub fn view(&self) -> &PoolView {
        &self.view
    }

    /// Removes the file, if it is still the one created, and its cluster
    /// directory, then `zc/`, each if empty.
    pub fn remove(&self) {
        self.owned.remove();
        if let Some(dir) = self.path.parent() {
            paths::remove_empty_dirs(dir, 2);
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

    fn opts(dir: &Path, cluster: u32) -> PoolOptions {
        PoolOptions {
            layout: PoolLayout::new(cluster, 2048, 64).unwrap(),
            hugepages_dir: dir.join("no-such-mount"),
            fallback_dir: dir.to_path_buf(),
            force_fallback: true,
        }
    }

    #[test]
    fn a_stale_pool_of_the_same_cluster_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let old = Pool::create(&opts(dir.path(), 42)).unwrap();
        let last = old.layout().pool_size as usize - 1;
        // SAFETY: inside the mapping.
        unsafe { old.view().base().add(last).write_volatile(0xa5) };
        // A daemon killed with -9 removes nothing.
        drop(old);
        let new = Pool::create(&opts(dir.path(), 42)).unwrap();
        // SAFETY: inside the mapping.
        let byte = unsafe { new.view().base().add(last).read_volatile() };
        assert_eq!(byte, 0, "a new file, not the old one reused");
        new.remove();
        assert!(!dir.path().join("zc").exists());
    }

    #[test]
    fn anything_else_at_the_pool_path_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let other = Pool::create(&opts(dir.path(), 43)).unwrap();
        let path = dir.path().join("zc/42/pool");
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let refused = |why: &str| {
            let e = Pool::create(&opts(dir.path(), 42)).err().unwrap();
            assert_eq!(
                e.to_string(),
                format!(
                    "pool file {}: {why} is in the way, not the pool of a stopped zc-hostd of cluster 42; remove it if nothing needs it",
                    path.display()
                )
            );
        };
        fs::write(&path, b"not a pool, but somebody's data").unwrap();
        refused("a regular file that is not a zc pool");
        assert_eq!(fs::read(&path).unwrap(), b"not a pool, but somebody's data");
        fs::write(&path, b"ZC").unwrap();
        refused("a regular file whose zc pool header cannot be read (failed to fill whole buffer)");
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(other.path(), &path).unwrap();
        refused("a symbolic link");
        fs::remove_file(&path).unwrap();
        fs::copy(other.path(), &path).unwrap();
        refused("the zc pool of cluster 43");
        assert!(other.path().exists());
        other.remove();
    }
}
