//! `--export PATH,rx=Q,tx=Q[,mac=MAC]`: what one export serves.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use thiserror::Error;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSpec {
    /// The vhost-user socket the daemon listens on.
    pub path: PathBuf,
    /// Cluster queue delivered to the guest.
    pub rx: Option<u16>,
    /// Cluster queue that receives what the guest sends.
    pub tx: Option<u16>,
    /// Explicit MAC; otherwise [`ExportSpec::mac_for`] derives one.
    pub mac: Option<[u8; 6]>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("--export needs a socket path first: --export PATH,rx=Q,tx=Q[,mac=MAC]")]
    NoPath,
    #[error("--export {0}: unknown option {1:?} (use rx=Q, tx=Q, mac=MAC)")]
    Option(String, String),
    #[error("--export {0}: {1:?} is not a queue number")]
    Queue(String, String),
    #[error("--export {0}: {1:?} is not a MAC address like 02:00:00:00:00:01")]
    Mac(String, String),
    #[error("--export {0}: needs rx=Q, tx=Q or both")]
    NoQueues(String),
    #[error("--export {0}: rx and tx are both queue {1}; a queue loops back to itself only through a host process")]
    SameQueue(String, u16),
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

pub struct MacDisplay<'a>(pub &'a [u8; 6]);

impl fmt::Display for MacDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// The queues of an export without its socket: `rx=Q,tx=Q[,mac=MAC]`, as
/// `zc-hostd attach --export` takes them (the daemon picks the socket).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueSpec {
    pub rx: Option<u16>,
    pub tx: Option<u16>,
    pub mac: Option<[u8; 6]>,
}

impl QueueSpec {
    /// Parses the options after the path; `whole` is the argument, for errors.
    fn parse<'a>(whole: &str, opts: impl Iterator<Item = &'a str>) -> Result<Self, SpecError> {
        let mut q = QueueSpec {
            rx: None,
            tx: None,
            mac: None,
        };
        let queue = |v: &str| {
            v.parse::<u16>()
                .ok()
                .filter(|&q| q != zc_proto::layout::NO_QUEUE)
                .ok_or_else(|| SpecError::Queue(whole.into(), v.into()))
        };
        for opt in opts {
            match opt.split_once('=') {
                Some(("rx", v)) => q.rx = Some(queue(v)?),
                Some(("tx", v)) => q.tx = Some(queue(v)?),
                Some(("mac", v)) => {
                    q.mac =
                        Some(parse_mac(v).ok_or_else(|| SpecError::Mac(whole.into(), v.into()))?)
                }
                _ => return Err(SpecError::Option(whole.into(), opt.into())),
            }
        }
        match (q.rx, q.tx) {
            (None, None) => Err(SpecError::NoQueues(whole.into())),
            (Some(r), Some(t)) if r == t => Err(SpecError::SameQueue(whole.into(), r)),
            _ => Ok(q),
        }
    }
}

impl FromStr for QueueSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        QueueSpec::parse(s, s.split(','))
    }
}

impl FromStr for ExportSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        let mut it = s.split(',');
        let path = it
            .next()
            .filter(|p| !p.is_empty())
            .ok_or(SpecError::NoPath)?;
        if path.contains('=') {
            return Err(SpecError::NoPath);
        }
        let q = QueueSpec::parse(s, it)?;
        Ok(ExportSpec {
            path: PathBuf::from(path),
            rx: q.rx,
            tx: q.tx,
            mac: q.mac,
        })
    }
}

impl ExportSpec {
    /// The MAC the guest sees: the explicit one, or a locally administered
    /// unicast address 02:7a:<cluster>:<queue> (tx-only exports set the top
    /// bit of the queue so they never collide with an rx export).
    pub fn mac_for(&self, cluster: u32) -> [u8; 6] {
        if let Some(m) = self.mac {
            return m;
        }
        let q = match (self.rx, self.tx) {
            (Some(r), _) => r,
            (None, Some(t)) => t | 0x8000,
            (None, None) => 0xffff,
        };
        let c = (cluster & 0xffff) as u16;
        [0x02, 0x7a, (c >> 8) as u8, c as u8, (q >> 8) as u8, q as u8]
    }

    /// Short name for logs and statistics: the socket's file name.
    pub fn name(&self) -> String {
        self.path.file_name().map_or_else(
            || self.path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form_and_rejects_the_rest() {
        let s: ExportSpec = "/tmp/vm1.sock,rx=0,tx=1,mac=02:00:00:00:00:aa"
            .parse()
            .unwrap();
        assert_eq!(s.path, PathBuf::from("/tmp/vm1.sock"));
        assert_eq!((s.rx, s.tx), (Some(0), Some(1)));
        assert_eq!(s.mac, Some([2, 0, 0, 0, 0, 0xaa]));
        let s: ExportSpec = "/tmp/a,tx=3".parse().unwrap();
        assert_eq!((s.rx, s.tx, s.mac), (None, Some(3), None));
        assert_eq!(s.mac_for(99), [0x02, 0x7a, 0, 99, 0x80, 3]);
        let s: ExportSpec = "/tmp/a,rx=2".parse().unwrap();
        assert_eq!(s.mac_for(0x1234), [0x02, 0x7a, 0x12, 0x34, 0, 2]);
        assert_eq!(s.name(), "a");
        assert_eq!("rx=1".parse::<ExportSpec>(), Err(SpecError::NoPath));
        assert_eq!(
            "/a".parse::<ExportSpec>(),
            Err(SpecError::NoQueues("/a".into()))
        );
        assert!(matches!(
            "/a,rx=1,tx=1".parse::<ExportSpec>(),
            Err(SpecError::SameQueue(_, 1))
        ));
        assert!(matches!(
            "/a,rx=x".parse::<ExportSpec>(),
            Err(SpecError::Queue(..))
        ));
        assert!(matches!(
            "/a,rx=65535".parse::<ExportSpec>(),
            Err(SpecError::Queue(..))
        ));
        assert!(matches!(
            "/a,rx=1,mac=02:00".parse::<ExportSpec>(),
            Err(SpecError::Mac(..))
        ));
        assert!(matches!(
            "/a,rx=1,speed=9".parse::<ExportSpec>(),
            Err(SpecError::Option(..))
        ));
        let q: QueueSpec = "rx=2,mac=02:00:00:00:00:aa".parse().unwrap();
        assert_eq!(
            (q.rx, q.tx, q.mac),
            (Some(2), None, Some([2, 0, 0, 0, 0, 0xaa]))
        );
        assert_eq!(
            "tx=1,rx=1".parse::<QueueSpec>().unwrap_err().to_string(),
            "--export tx=1,rx=1: rx and tx are both queue 1; a queue loops back to itself only through a host process"
        );
        assert_eq!(
            "/a.sock,rx=0".parse::<QueueSpec>().unwrap_err().to_string(),
            "--export /a.sock,rx=0: unknown option \"/a.sock\" (use rx=Q, tx=Q, mac=MAC)"
        );
        assert_eq!(
            MacDisplay(&[2, 0x7a, 0, 99, 0, 1]).to_string(),
            "02:7a:00:63:00:01"
        );
    }
}
