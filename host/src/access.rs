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
    #[error("{option} {name}: no such group (see getent group{hint})")]
    Unknown {
        option: &'static str,
        name: String,
        hint: &'static str,
    },
    #[error("{option} {name}: no such user (see getent passwd; or give a numeric uid)")]
    UnknownUser { option: &'static str, name: String },
    #[error("{option} {name}: cannot look it up: {why}")]
    Lookup {
        option: &'static str,
        name: String,
        why: String,
    },
}

/// What getgrnam_r/getpwnam_r found.
enum Found<T> {
    Yes(T),
    No,
    Failed(String),
}

/// Runs a `get*_r` lookup with a buffer that grows on ERANGE.
fn lookup<E: Copy, T>(
    call: impl Fn(*mut E, *mut libc::c_char, usize, *mut *mut E) -> libc::c_int,
    take: impl FnOnce(&E) -> T,
) -> Found<T> {
    let mut size = 16384;
    loop {
        let mut buf = vec![0u8; size];
        // SAFETY: E is a plain C struct (group or passwd) that the call fills.
        let mut entry: E = unsafe { std::mem::zeroed() };
        let mut out: *mut E = std::ptr::null_mut();
        let rc = call(&mut entry, buf.as_mut_ptr().cast(), buf.len(), &mut out);
        if rc == libc::ERANGE && size < (1 << 24) {
            size *= 4;
            continue;
        }
        if rc != 0 {
            return Found::Failed(io::Error::from_raw_os_error(rc).to_string());
        }
        if out.is_null() {
            return Found::No;
        }
        // The strings `entry` points to live in `buf`, still alive here.
        return Found::Yes(take(&entry));
    }
}

/// The id of group `name`, or `name` itself when it is a number; errors
/// name `option`, the command-line option it came from.
pub fn group_id(option: &'static str, name: &str) -> Result<u32, GroupError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let hint = if option == "--vm-group" {
        "; libvirt's QEMU runs as group libvirt-qemu on Debian"
    } else {
        "; or give a numeric gid"
    };
    let unknown = || GroupError::Unknown {
        option,
        name: name.into(),
        hint,
    };
    let c = CString::new(name).map_err(|_| unknown())?;
    // SAFETY: every pointer is to memory `lookup` owns, with its real size.
    let found = lookup(
        |g: *mut libc::group, b, n, out| unsafe { libc::getgrnam_r(c.as_ptr(), g, b, n, out) },
        |g| g.gr_gid,
    );
    match found {
        Found::Yes(gid) => Ok(gid),
        Found::No => Err(unknown()),
        Found::Failed(why) => Err(GroupError::Lookup {
            option,
            name: name.into(),
            why,
        }),
    }
}

/// The id of user `name`, or `name` itself when it is a number.
pub fn user_id(option: &'static str, name: &str) -> Result<u32, GroupError> {
    if let Ok(uid) = name.parse::<u32>() {
        return Ok(uid);
    }
    let unknown = || GroupError::UnknownUser {
        option,
        name: name.into(),
    };
    let c = CString::new(name).map_err(|_| unknown())?;
    // SAFETY: every pointer is to memory `lookup` owns, with its real size.
    let found = lookup(
        |p: *mut libc::passwd, b, n, out| unsafe { libc::getpwnam_r(c.as_ptr(), p, b, n, out) },
        |p| p.pw_uid,
    );
    match found {
        Found::Yes(uid) => Ok(uid),
        Found::No => Err(unknown()),
        Found::Failed(why) => Err(GroupError::Lookup {
            option,
            name: name.into(),
            why,
        }),
    }
}

/// The name of group `gid`, if it has one.
pub fn group_name(gid: u32) -> Option<String> {
    // SAFETY: every pointer is to memory `lookup` owns, with its real size;
    // gr_name points into that buffer and is read before it goes.
    let found = lookup(
        |g: *mut libc::group, b, n, out| unsafe { libc::getgrgid_r(gid, g, b, n, out) },
        // SAFETY: a found entry's gr_name is a NUL-terminated string in the buffer.
        |g| {
            unsafe { std::ffi::CStr::from_ptr(g.gr_name) }
                .to_string_lossy()
                .into_owned()
        },
    );
    match found {
        Found::Yes(name) => Some(name),
        _ => None,
    }
}

/// A group as a user reads it: `tenant-a (gid 1234)`, or `gid 1234`
/// when it has no name.
pub fn group_text(gid: u32) -> String {
    match group_name(gid) {
        Some(name) => format!("{name} (gid {gid})"),
        None => format!("gid {gid}"),
    }
}

/// The line a process that may not attach to `cluster` gets, from the
/// daemon (which checked its credentials) or from its own client (which
/// the socket's file mode stopped): both say the same thing.
pub fn refusal_line(cluster: u32, uid: u32, group: u32) -> String {
    format!(
        "cluster {cluster}: uid {uid} may not attach: its control socket is for group {}; \
         run as a member of that group or as root",
        group_text(group)
    )
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("--mode {0}: not a file mode; give octal permissions like 0660")]
pub struct ModeError(String);

/// A file mode in octal (`0660`, `660` or `0o660`), permission bits only.
pub fn parse_mode(s: &str) -> Result<u32, ModeError> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 && !digits.is_empty() && !digits.starts_with('+') => Ok(m),
        _ => Err(ModeError(s.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_by_name_or_number() {
        assert_eq!(group_id("--vm-group", "root"), Ok(0));
        assert_eq!(group_id("--group", "4242"), Ok(4242));
        assert_eq!(
            group_id("--vm-group", "no-such-group-zc").unwrap_err().to_string(),
            "--vm-group no-such-group-zc: no such group (see getent group; libvirt's QEMU runs as group libvirt-qemu on Debian)"
        );
        assert_eq!(
            group_id("--group", "no-such-group-zc")
                .unwrap_err()
                .to_string(),
            "--group no-such-group-zc: no such group (see getent group; or give a numeric gid)"
        );
        assert_eq!(group_name(0).as_deref(), Some("root"));
        assert_eq!(group_text(0), "root (gid 0)");
    }

    #[test]
    fn users_by_name_or_number() {
        assert_eq!(user_id("--allow", "root"), Ok(0));
        assert_eq!(user_id("--allow", "1234"), Ok(1234));
        assert_eq!(
            user_id("--allow", "no-such-user-zc")
                .unwrap_err()
                .to_string(),
            "--allow no-such-user-zc: no such user (see getent passwd; or give a numeric uid)"
        );
    }

    #[test]
    fn modes_are_octal_permission_bits() {
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert_eq!(parse_mode("666"), Ok(0o666));
        assert_eq!(parse_mode("0o600"), Ok(0o600));
        for bad in ["0999", "01777", "", "rw", "+660", "0o"] {
            assert_eq!(
                parse_mode(bad).unwrap_err().to_string(),
                format!("--mode {bad}: not a file mode; give octal permissions like 0660")
            );
        }
    }
}
