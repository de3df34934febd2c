//! Who may open what the daemon creates: a file mode and, optionally, a
//! group. Sockets and the pool are root's and mode 0660 by default; a VM
//! whose QEMU runs as another user (libvirt's `libvirt-qemu`) is let in
//! through the group given with `--vm-group`.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use thiserror::Error;

/// Mode and group of a file the daemon creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    pub mode: u32,
    /// The group to give the file; `None` keeps the creator's.
    pub group: Option<u32>,
}

impl Access {
    /// Owner and group may read and write (the default of every socket
    /// and of the pool file).
    pub const PRIVATE: Access = Access {
        mode: 0o660,
        group: None,
    };

    /// Mode 0660 with group `group`.
    pub fn group(group: Option<u32>) -> Access {
        Access {
            group,
            ..Access::PRIVATE
        }
    }

    /// Gives the file at `path` this group (not following a symbolic link).
    pub fn apply_group(&self, path: &Path) -> io::Result<()> {
        let Some(gid) = self.group else {
            return Ok(());
        };
        let c = CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))
            .map_err(io::Error::other)?;
        // SAFETY: lchown with a valid C string; uid -1 leaves the owner.
        if unsafe { libc::lchown(c.as_ptr(), u32::MAX, gid) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Gives the open file `fd` this group.
    pub fn apply_group_fd(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let Some(gid) = self.group else {
            return Ok(());
        };
        // SAFETY: fchown on a descriptor the caller keeps open; uid -1 leaves the owner.
        if unsafe { libc::fchown(fd.as_raw_fd(), u32::MAX, gid) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum GroupError {
    #[error("--vm-group {0}: no such group (see getent group; libvirt's QEMU runs as group libvirt-qemu on Debian)")]
    Unknown(String),
    #[error("--vm-group {name}: cannot look the group up: {why}")]
    Lookup { name: String, why: String },
}

/// The id of group `name`, or `name` itself when it is a number.
pub fn group_id(name: &str) -> Result<u32, GroupError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let c = CString::new(name).map_err(|_| GroupError::Unknown(name.into()))?;
    let mut buf = vec![0u8; 16384];
    // SAFETY: group is plain data that getgrnam_r fills.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is to memory we own, with its real size.
    let rc = unsafe {
        libc::getgrnam_r(
            c.as_ptr(),
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut out,
        )
    };
    if rc != 0 {
        return Err(GroupError::Lookup {
            name: name.into(),
            why: io::Error::from_raw_os_error(rc).to_string(),
        });
    }
    if out.is_null() {
        return Err(GroupError::Unknown(name.into()));
    }
    Ok(grp.gr_gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_by_name_or_number() {
        assert_eq!(group_id("root"), Ok(0));
        assert_eq!(group_id("4242"), Ok(4242));
        assert_eq!(
            group_id("no-such-group-zc").unwrap_err().to_string(),
            "--vm-group no-such-group-zc: no such group (see getent group; libvirt's QEMU runs as group libvirt-qemu on Debian)"
        );
    }
}
