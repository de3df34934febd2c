//! Facts about a host interface an interface port needs before it binds:
//! its index, driver, receive queues, and the XDP program it runs now
//! (read, and detached on takeover, over rtnetlink).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// An interface by name, as the kernel knows it now.
#[derive(Clone, Debug)]
pub struct Link {
    pub name: String,
    pub index: u32,
}

impl Link {
    /// `None` if there is no such interface.
    pub fn find(name: &str) -> Option<Link> {
        let c = CString::new(name).ok()?;
        // SAFETY: a valid C string; if_nametoindex only reads it.
        let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
        (index != 0).then(|| Link {
            name: name.to_string(),
            index,
        })
    }

    /// The receive queues the interface has (`/sys/class/net/IF/queues/rx-N`).
    pub fn rx_queues(&self) -> u32 {
        let dir = format!("/sys/class/net/{}/queues", self.name);
        std::fs::read_dir(dir).map_or(1, |d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
                .count()
                .max(1) as u32
        })
    }

    /// The driver's name (ethtool's GDRVINFO), e.g. `veth`, `ice`.
    pub fn driver(&self) -> String {
        driver(&self.name).unwrap_or_else(|| "unknown".into())
    }
}

const ETHTOOL_GDRVINFO: u32 = 0x3;
const SIOCETHTOOL: libc::c_ulong = 0x8946;

#[repr(C)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

fn socket(domain: i32, ty: i32, proto: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn driver(name: &str) -> Option<String> {
    let sock = socket(libc::AF_INET, libc::SOCK_DGRAM, 0).ok()?;
    // SAFETY: plain data, zero is a valid value of every field.
    let mut info: EthtoolDrvinfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    // SAFETY: as above.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&mut info as *mut EthtoolDrvinfo).cast();
    // SAFETY: SIOCETHTOOL reads the name and writes `info`, both ours and
    // alive for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL, &mut ifr) } != 0 {
        return None;
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

// rtnetlink, the few constants this needs (linux/rtnetlink.h, if_link.h).
const RTM_GETLINK: u16 = 18;
const RTM_SETLINK: u16 = 19;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const IFLA_XDP: u16 = 43;
const IFLA_XDP_FD: u16 = 1;
const IFLA_XDP_ATTACHED: u16 = 2;
const IFLA_XDP_FLAGS: u16 = 3;
const IFLA_XDP_PROG_ID: u16 = 4;
const NLA_F_NESTED: u16 = 1 << 15;
const IFINFOMSG_LEN: usize = 16;
const NLMSGHDR_LEN: usize = 16;

/// The XDP program attached to the interface now, if any: its id.
pub fn xdp_program(index: u32) -> io::Result<Option<u32>> {
    let reply = request(RTM_GETLINK, NLM_F_REQUEST, index, &[])?;
    // The reply is one RTM_NEWLINK: header, ifinfomsg, attributes.
    let attrs = reply
        .get(NLMSGHDR_LEN + IFINFOMSG_LEN..)
        .ok_or_else(|| io::Error::other("short rtnetlink reply"))?;
    let Some(xdp) = find_attr(attrs, IFLA_XDP) else {
        return Ok(None);
    };
    let attached = find_attr(xdp, IFLA_XDP_ATTACHED).and_then(|a| a.first().copied());
    if attached.unwrap_or(0) == 0 {
        return Ok(None);
    }
    Ok(find_attr(xdp, IFLA_XDP_PROG_ID)
        .and_then(|v| v.get(..4))
        .map(|v| u32::from_ne_bytes([v[0], v[1], v[2], v[3]])))
}

/// Detaches whatever XDP program was attached through netlink (an owner
/// that holds a bpf link keeps it: the kernel answers EBUSY).
pub fn detach_xdp(index: u32) -> io::Result<()> {
    let mut nested = Vec::new();
    push_attr(&mut nested, IFLA_XDP_FD, &(-1i32).to_ne_bytes());
    push_attr(&mut nested, IFLA_XDP_FLAGS, &0u32.to_ne_bytes());
    let mut attrs = Vec::new();
    push_attr(&mut attrs, IFLA_XDP | NLA_F_NESTED, &nested);
    request(RTM_SETLINK, NLM_F_REQUEST | NLM_F_ACK, index, &attrs).map(|_| ())
}

fn push_attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// The payload of the first attribute of type `ty` (nested flag ignored).
fn find_attr(mut attrs: &[u8], ty: u16) -> Option<&[u8]> {
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let t = u16::from_ne_bytes([attrs[2], attrs[3]]) & !NLA_F_NESTED;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if t == ty {
            return Some(&attrs[4..len]);
        }
        attrs = &attrs[len.next_multiple_of(4).min(attrs.len())..];
    }
    None
}

/// Sends one rtnetlink request about interface `index` and returns the
/// first reply message (an error reply becomes the error).
fn request(ty: u16, flags: u16, index: u32, attrs: &[u8]) -> io::Result<Vec<u8>> {
    let sock = socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE)?;
    let len = NLMSGHDR_LEN + IFINFOMSG_LEN + attrs.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&ty.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
                                                // ifinfomsg: family, pad, type, index, flags, change
    msg.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    msg.extend_from_slice(&(index as i32).to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(attrs);
    // SAFETY: a zeroed sockaddr_nl is the kernel's address (pid 0).
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: sends our buffer to the address above; lengths are theirs.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&sa as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 65536];
    // SAFETY: receives into our buffer of that length.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    if buf.len() < NLMSGHDR_LEN {
        return Err(io::Error::other("short rtnetlink reply"));
    }
    let rty = u16::from_ne_bytes([buf[4], buf[5]]);
    if rty == NLMSG_ERROR {
        let code = buf
            .get(NLMSGHDR_LEN..NLMSGHDR_LEN + 4)
            .map_or(0, |v| i32::from_ne_bytes([v[0], v[1], v[2], v[3]]));
        if code != 0 {
            return Err(io::Error::from_raw_os_error(-code));
        }
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_found_and_bad_lengths_stop_the_walk() {
        let mut a = Vec::new();
        push_attr(&mut a, 3, &[1, 2, 3]);
        push_attr(&mut a, IFLA_XDP | NLA_F_NESTED, &[9, 9, 9, 9]);
        assert_eq!(find_attr(&a, 3), Some(&[1u8, 2, 3][..]));
        assert_eq!(find_attr(&a, IFLA_XDP), Some(&[9u8, 9, 9, 9][..]));
        assert_eq!(find_attr(&a, 7), None);
        // A length past the end, or below the header, ends the search.
        assert_eq!(find_attr(&[200, 0, 3, 0, 1], 3), None);
        assert_eq!(find_attr(&[2, 0, 3, 0], 3), None);
    }

    #[test]
    fn loopback_has_a_driver_less_index_and_no_xdp() {
        let lo = Link::find("lo").expect("lo exists");
        assert!(lo.index > 0);
        assert!(Link::find("no-such-if0").is_none());
        assert_eq!(xdp_program(lo.index).unwrap(), None);
    }
}
