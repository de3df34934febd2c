//! The frontend's memory table, checked against the files it names before
//! vhost-user-backend maps them.
//!
//! vhost-user-backend maps each region of SET_MEM_TABLE and ADD_MEM_REG as
//! it is told, and mmap does not care whether the file is as large as the
//! mapping: a region larger than its file maps fine and raises SIGBUS on the
//! first touch past the end, which kills the whole daemon and every export
//! with it. The relay (`shim`) sees every message with its descriptors, so
//! it checks each region against `fstat` of its descriptor here and refuses
//! the table instead of passing it on. Files that shrink later are the
//! business of `sigbus`.

use std::os::fd::{AsRawFd, OwnedFd};
use thiserror::Error;

/// VHOST_USER_SET_MEM_TABLE.
pub const SET_MEM_TABLE: u32 = 5;
/// VHOST_USER_ADD_MEM_REG.
pub const ADD_MEM_REG: u32 = 37;

/// Bytes of one region in either message: guest_phys_addr, memory_size,
/// userspace_addr, mmap_offset.
const REGION_LEN: usize = 32;
/// SET_MEM_TABLE: num_regions and padding before the regions.
const TABLE_HDR: usize = 8;
/// ADD_MEM_REG: padding before its one region.
const SINGLE_HDR: usize = 8;

/// Why a memory table was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TableError {
    #[error("a memory table message of {len} bytes does not hold the regions it announces")]
    Malformed { len: usize },
    #[error("a memory table of {regions} regions came with {fds} file descriptors")]
    FdCount { regions: usize, fds: usize },
    #[error(
        "region {index} asks for {size} bytes at file offset {offset} (guest-physical {gpa:#x}), \
         but its file has {file_size} bytes"
    )]
    TooSmall {
        index: usize,
        gpa: u64,
        size: u64,
        offset: u64,
        file_size: u64,
    },
    #[error("region {index}: cannot stat its file: {err}")]
    Stat { index: usize, err: String },
}

/// One region as the message gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub gpa: u64,
    pub size: u64,
    pub offset: u64,
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

fn region_at(b: &[u8], at: usize) -> Region {
    Region {
        gpa: u64_at(b, at),
        size: u64_at(b, at + 8),
        offset: u64_at(b, at + 24),
    }
}

/// The regions of a SET_MEM_TABLE or ADD_MEM_REG body; `None` for any other
/// request.
pub fn regions(request: u32, body: &[u8]) -> Option<Result<Vec<Region>, TableError>> {
    let malformed = TableError::Malformed { len: body.len() };
    Some(match request {
        SET_MEM_TABLE => {
            if body.len() < TABLE_HDR {
                return Some(Err(malformed));
            }
            let n = u32::from_le_bytes([body[0], body[1], body[2], body[3]]) as usize;
            // n is at most u32::MAX: no overflow in usize on 64-bit.
            if body.len() != TABLE_HDR + n * REGION_LEN {
                return Some(Err(malformed));
            }
            Ok((0..n)
                .map(|i| region_at(body, TABLE_HDR + i * REGION_LEN))
                .collect())
        }
        ADD_MEM_REG => {
            if body.len() != SINGLE_HDR + REGION_LEN {
                return Some(Err(malformed));
            }
            Ok(vec![region_at(body, SINGLE_HDR)])
        }
        _ => return None,
    })
}

/// Size of the file behind `fd`.
fn file_size(fd: &OwnedFd) -> std::io::Result<u64> {
    // SAFETY: fstat writes into the stat buffer we own; fd is open.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.st_size.max(0) as u64)
}

/// Checks a message before it reaches vhost-user-backend: for SET_MEM_TABLE
/// and ADD_MEM_REG, one descriptor per region and every region inside its
/// file (mmap_offset + memory_size, without overflow, at most the file's
/// size). Every other request passes.
pub fn check(request: u32, body: &[u8], fds: &[OwnedFd]) -> Result<(), TableError> {
    let Some(regions) = regions(request, body) else {
        return Ok(());
    };
    let regions = regions?;
    if regions.len() != fds.len() {
        return Err(TableError::FdCount {
            regions: regions.len(),
            fds: fds.len(),
        });
    }
    for (index, (r, fd)) in regions.iter().zip(fds).enumerate() {
        let file_size = file_size(fd).map_err(|e| TableError::Stat {
            index,
            err: e.to_string(),
        })?;
        if r.offset
            .checked_add(r.size)
            .is_none_or(|end| end > file_size)
        {
            return Err(TableError::TooSmall {
                index,
                gpa: r.gpa,
                size: r.size,
                offset: r.offset,
                file_size,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd(len: i64) -> OwnedFd {
        let f = tempfile::tempfile().unwrap();
        f.set_len(len as u64).unwrap();
        f.into()
    }

    fn table(regions: &[(u64, u64, u64)]) -> Vec<u8> {
        let mut b = (regions.len() as u32).to_le_bytes().to_vec();
        b.extend_from_slice(&[0; 4]);
        for &(gpa, size, offset) in regions {
            for v in [gpa, size, 0x7f00_0000_0000, offset] {
                b.extend_from_slice(&v.to_le_bytes());
            }
        }
        b
    }

    #[test]
    fn a_region_larger_than_its_file_is_refused() {
        let t = table(&[(0, 16 << 20, 0)]);
        assert_eq!(
            check(SET_MEM_TABLE, &t, &[memfd(4096)]),
            Err(TableError::TooSmall {
                index: 0,
                gpa: 0,
                size: 16 << 20,
                offset: 0,
                file_size: 4096
            })
        );
        assert_eq!(
            check(SET_MEM_TABLE, &t, &[memfd(4096)])
                .unwrap_err()
                .to_string(),
            "region 0 asks for 16777216 bytes at file offset 0 (guest-physical 0x0), \
             but its file has 4096 bytes"
        );
        assert_eq!(check(SET_MEM_TABLE, &t, &[memfd(16 << 20)]), Ok(()));
    }

    #[test]
    fn offsets_count_and_do_not_overflow() {
        let fits = table(&[(0, 4096, 0), (1 << 32, 4096, 4096)]);
        assert_eq!(
            check(SET_MEM_TABLE, &fits, &[memfd(4096), memfd(8192)]),
            Ok(())
        );
        let past = table(&[(0, 4096, 0), (1 << 32, 4096, 8192)]);
        assert!(matches!(
            check(SET_MEM_TABLE, &past, &[memfd(4096), memfd(8192)]),
            Err(TableError::TooSmall { index: 1, .. })
        ));
        let wraps = table(&[(0, u64::MAX, 4096)]);
        assert!(matches!(
            check(SET_MEM_TABLE, &wraps, &[memfd(8192)]),
            Err(TableError::TooSmall { index: 0, .. })
        ));
    }

    #[test]
    fn descriptors_must_match_the_regions() {
        let t = table(&[(0, 4096, 0), (8192, 4096, 0)]);
        assert_eq!(
            check(SET_MEM_TABLE, &t, &[memfd(4096)]),
            Err(TableError::FdCount { regions: 2, fds: 1 })
        );
        let mut short = t.clone();
        short.pop();
        assert_eq!(
            check(SET_MEM_TABLE, &short, &[memfd(4096), memfd(4096)]),
            Err(TableError::Malformed { len: t.len() - 1 })
        );
        assert_eq!(
            check(SET_MEM_TABLE, &[1, 0], &[]),
            Err(TableError::Malformed { len: 2 })
        );
    }

    #[test]
    fn add_mem_reg_is_checked_like_a_table_of_one() {
        let mut single = vec![0u8; 8];
        single.extend_from_slice(&table(&[(0x1000, 8192, 0)])[8..]);
        assert_eq!(check(ADD_MEM_REG, &single, &[memfd(8192)]), Ok(()));
        assert!(matches!(
            check(ADD_MEM_REG, &single, &[memfd(4096)]),
            Err(TableError::TooSmall {
                gpa: 0x1000,
                file_size: 4096,
                ..
            })
        ));
        assert_eq!(
            check(ADD_MEM_REG, &single, &[]),
            Err(TableError::FdCount { regions: 1, fds: 0 })
        );
        // Other requests pass untouched, whatever they carry.
        assert_eq!(check(2, &[0; 8], &[]), Ok(()));
    }
}
