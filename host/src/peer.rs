//! Who is on the other end of a control connection: the kernel's record
//! of the connecting process (SO_PEERCRED) and its supplementary groups
//! (SO_PEERGROUPS), both taken when it called connect().

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

/// SO_PEERGROUPS (Linux 4.13; not in the libc crate). The same number on
/// every architecture that uses the generic socket options, x86 included.
const SO_PEERGROUPS: libc::c_int = 59;

/// A peer's credentials, as the kernel recorded them at connect().
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (may repeat `gid`).
    pub groups: Vec<u32>,
}

impl Peer {
    /// The credentials of the process that connected `sock`.
    pub fn of(sock: &UnixStream) -> io::Result<Peer> {
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `cred`, which we own.
        let rc = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Peer {
            pid: cred.pid as u32,
            uid: cred.uid,
            gid: cred.gid,
            groups: peer_groups(sock)?,
        })
    }

    /// Whether `gid` is the peer's group or one of its supplementary ones.
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

/// The peer's supplementary groups; none on a kernel without SO_PEERGROUPS
/// (then only the primary group counts, which can only refuse more).
fn peer_groups(sock: &UnixStream) -> io::Result<Vec<u32>> {
    let mut groups = vec![0 as libc::gid_t; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `groups`, which we own.
        let rc = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // Too small: `len` says how much is needed.
            Some(libc::ERANGE) if n > groups.len() && n <= 65536 => groups.resize(n, 0),
            Some(libc::ENOPROTOOPT) => return Ok(Vec::new()),
            _ => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_pair_sees_this_process() {
        let (a, _b) = UnixStream::pair().unwrap();
        let p = Peer::of(&a).unwrap();
        assert_eq!(p.pid, std::process::id());
        // SAFETY: plain getters without preconditions.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        assert_eq!((p.uid, p.gid), (uid, gid));
        assert!(p.in_group(gid));
        // SAFETY: getgroups with a zero size only counts.
        let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
        let mut mine = vec![0; n as usize];
        // SAFETY: the buffer holds `n` gids.
        unsafe { libc::getgroups(n, mine.as_mut_ptr()) };
        for g in mine {
            assert!(p.in_group(g), "group {g} of this process");
        }
    }
}
