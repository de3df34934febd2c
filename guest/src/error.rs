//! Everything that can go wrong, as one line a user can act on.

use std::io;
use std::path::PathBuf;
use thiserror::Error;

/// Which way packets flow for the queue being opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Host to guest: the guest receives (`zcount`).
    Rx,
    /// Guest to host: the guest sends (`zsend`).
    Tx,
}

impl Direction {
    pub fn option(self) -> &'static str {
        match self {
            Direction::Rx => "rx",
            Direction::Tx => "tx",
        }
    }
}

/// A device that broke the virtio or zc contract. The queue stops; nothing
/// the device wrote was used.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum Violation {
    #[error("used index jumped from {from} to {to} with only {in_flight} descriptors in flight")]
    UsedJump { from: u16, to: u16, in_flight: u16 },
    #[error("used element names descriptor {id}, which is not in flight in a ring of {size}")]
    UsedId { id: u32, size: u16 },
    #[error("used length {len} of descriptor {id} is outside {min}..={max}")]
    UsedLen {
        id: u16,
        len: u32,
        min: u32,
        max: u32,
    },
    #[error("descriptor {id} came back with address {addr:#x}, which is not a pool buffer's packet offset minus 12")]
    Addr { id: u16, addr: u64 },
    #[error("descriptor {id} came back with buffer #{buf}, which this driver already holds")]
    Duplicate { id: u16, buf: u32 },
    #[error("the device returned {count} receive buffers in a row unused: it does not accept this driver's buffers (a stale stock list after a crash? restart the export's VM or zc-hostd)")]
    Rejected { count: u32 },
}

#[derive(Debug, Error)]
pub enum GuestError {
    #[error("not running in a VM with a zc pool: no ivshmem-plain device (PCI 1af4:1110) holds the pool of cluster {cluster}; start the VM with the lines `zc-hostd -c {cluster} --qemu-args` prints, or use --vhost-user outside a VM")]
    NoPool { cluster: u32 },
    #[error("no zc pool lists a virtio-net device with MAC {mac} (interface {ifname}): it is not a zc export")]
    NotAnExport { ifname: String, mac: String },
    #[error("interface {0} does not exist (see `ip link`)")]
    NoInterface(String),
    #[error("interface {ifname} is not a virtio-net PCI device, so zc cannot take it over")]
    NotVirtio { ifname: String },
    #[error("cluster {cluster} has no export for queue {queue} ({dir}={queue}): start zc-hostd with --export PATH,{dir}={queue} and attach that socket to this VM")]
    NoExport {
        cluster: u32,
        queue: u16,
        dir: &'static str,
    },
    #[error("export {mac} of cluster {cluster} has no {dir} queue: it cannot be opened for {dir}")]
    WrongDirection {
        cluster: u32,
        mac: String,
        dir: &'static str,
    },
    #[error("the export for MAC {mac} (cluster {cluster}) has no virtio-net device on the PCI bus: attach its vhost-user socket with -device virtio-net-pci,mac={mac}")]
    NoDevice { cluster: u32, mac: String },
    #[error("{what} is already open by another process (pid {pid}); stop that process first")]
    Busy { what: String, pid: u32 },
    #[error("PCI device {bdf}: the zc guest driver maps the pool and takes over the virtio-net device, which needs root: run this as root")]
    NotRoot { bdf: String },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("the zc pool is unusable: {0}")]
    Pool(String),
    #[error("vhost-user {}: {msg}", path.display())]
    VhostUser { path: PathBuf, msg: String },
    #[error("virtio device {bdf}: {msg}")]
    Device { bdf: String, msg: String },
    #[error("device initialisation failed: {0}")]
    Init(#[from] crate::init::InitError),
    #[error(
        "the export gave this driver {have} buffers, too few for {want}: raise the export's stock"
    )]
    Stock { have: usize, want: usize },
    #[error("the device broke the zc contract: {0}")]
    Violation(#[from] Violation),
}

impl GuestError {
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        GuestError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = GuestError> = std::result::Result<T, E>;

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_string(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.trim().split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_round_trip_and_errors_are_one_line() {
        let m = parse_mac("02:7a:00:63:00:01\n").unwrap();
        assert_eq!(mac_string(&m), "02:7a:00:63:00:01");
        assert_eq!(parse_mac("02:7a:00"), None);
        assert_eq!(parse_mac("02:7a:00:63:00:01:02"), None);
        for e in [
            GuestError::NoPool { cluster: 99 },
            GuestError::NoExport {
                cluster: 99,
                queue: 0,
                dir: "rx",
            },
            GuestError::Busy {
                what: "PCI device 0000:00:04.0".into(),
                pid: 7,
            },
            GuestError::NotRoot {
                bdf: "0000:00:04.0".into(),
            },
        ] {
            let s = e.to_string();
            assert!(!s.contains('\n'), "{s}");
        }
    }
}
