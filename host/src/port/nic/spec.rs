//! `--nic IFNAME,ingress=Q[,egress=Q][,queue=N][,mode=..][,zerocopy=..][,takeover]`:
//! what one interface port serves. The same text is what `zc-hostd nic
//! add|del` takes, and what goes over the control socket.

use super::{Mode, NicConfig, ZeroCopy};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use thiserror::Error;
use zc_proto::name::MAX_IFNAME;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    pub ifname: String,
    /// Cluster queue that receives what arrives on the interface.
    pub ingress: Option<u16>,
    /// Cluster queue whose packets leave on the interface.
    pub egress: Option<u16>,
    /// The interface's hardware receive queue.
    pub queue: u32,
    pub mode: Mode,
    pub zerocopy: ZeroCopy,
    /// Replace another XDP program on the interface instead of refusing.
    pub takeover: bool,
}

const USAGE: &str =
    "IFNAME,ingress=Q[,egress=Q][,queue=N][,mode=auto|xdp|packet][,zerocopy=auto|on|off][,takeover]";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NicSpecError {
    #[error("--nic needs an interface name first: --nic {USAGE}")]
    NoInterface,
    #[error("--nic {0}: interface name {1:?} is invalid (1 to {MAX_IFNAME} characters, no '/', ':', ',', '=' or white space)")]
    BadInterface(String, String),
    #[error("--nic {0}: unknown option {1:?} (use ingress=Q, egress=Q, queue=N, mode=auto|xdp|packet, zerocopy=auto|on|off, takeover)")]
    Option(String, String),
    #[error("--nic {0}: {1:?} is not a cluster queue number")]
    Queue(String, String),
    #[error("--nic {0}: queue={1:?} is not a receive queue number of the interface")]
    HwQueue(String, String),
    #[error("--nic {0}: mode={1:?}: use mode=auto, xdp or packet")]
    Mode(String, String),
    #[error("--nic {0}: zerocopy={1:?}: use zerocopy=auto, on or off")]
    ZeroCopy(String, String),
    #[error("--nic {0}: needs ingress=Q (what arrives goes there), egress=Q (what is sent there leaves) or both")]
    NoDirection(String),
    #[error("--nic {0}: ingress and egress are both queue {1}: what arrives would be sent straight back out")]
    SameQueue(String, u16),
    #[error("--nic {0}: zerocopy=on needs AF_XDP: it contradicts mode=packet")]
    ZeroCopyPacket(String),
}

fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_IFNAME
        && s != "."
        && s != ".."
        && !s.chars().any(|c| {
            matches!(c, '/' | ':' | ',' | '=' | '@') || c.is_whitespace() || c.is_control()
        })
}

impl FromStr for NicSpec {
    type Err = NicSpecError;

    fn from_str(s: &str) -> Result<Self, NicSpecError> {
        let mut it = s.split(',');
        let ifname = it.next().unwrap_or_default();
        if ifname.is_empty() || ifname.contains('=') {
            return Err(NicSpecError::NoInterface);
        }
        if !valid_ifname(ifname) {
            return Err(NicSpecError::BadInterface(s.into(), ifname.into()));
        }
        let mut spec = NicSpec {
            ifname: ifname.into(),
            ingress: None,
            egress: None,
            queue: 0,
            mode: Mode::Auto,
            zerocopy: ZeroCopy::Auto,
            takeover: false,
        };
        let queue = |v: &str| {
            v.parse::<u16>()
                .ok()
                .filter(|&q| q < zc_proto::name::MAX_QUEUES)
                .ok_or_else(|| NicSpecError::Queue(s.into(), v.into()))
        };
        for opt in it {
            match opt.split_once('=') {
                Some(("ingress", v)) => spec.ingress = Some(queue(v)?),
                Some(("egress", v)) => spec.egress = Some(queue(v)?),
                Some(("queue", v)) => {
                    spec.queue = v
                        .parse()
                        .map_err(|_| NicSpecError::HwQueue(s.into(), v.into()))?
                }
                Some(("mode", v)) => {
                    spec.mode = match v {
                        "auto" => Mode::Auto,
                        "xdp" => Mode::Xdp,
                        "packet" => Mode::Packet,
                        _ => return Err(NicSpecError::Mode(s.into(), v.into())),
                    }
                }
                Some(("zerocopy", v)) => {
                    spec.zerocopy = match v {
                        "auto" => ZeroCopy::Auto,
                        "on" => ZeroCopy::On,
                        "off" => ZeroCopy::Off,
                        _ => return Err(NicSpecError::ZeroCopy(s.into(), v.into())),
                    }
                }
                None if opt == "takeover" => spec.takeover = true,
                _ => return Err(NicSpecError::Option(s.into(), opt.into())),
            }
        }
        match (spec.ingress, spec.egress) {
            (None, None) => return Err(NicSpecError::NoDirection(s.into())),
            (Some(i), Some(e)) if i == e => return Err(NicSpecError::SameQueue(s.into(), i)),
            _ => {}
        }
        if spec.mode == Mode::Packet && spec.zerocopy == ZeroCopy::On {
            return Err(NicSpecError::ZeroCopyPacket(s.into()));
        }
        Ok(spec)
    }
}

impl fmt::Display for NicSpec {
    /// The canonical form: every option spelled out, parseable again.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.ifname)?;
        if let Some(q) = self.ingress {
            write!(f, ",ingress={q}")?;
        }
        if let Some(q) = self.egress {
            write!(f, ",egress={q}")?;
        }
        let mode = match self.mode {
            Mode::Auto => "auto",
            Mode::Xdp => "xdp",
            Mode::Packet => "packet",
        };
        let zc = match self.zerocopy {
            ZeroCopy::Auto => "auto",
            ZeroCopy::On => "on",
            ZeroCopy::Off => "off",
        };
        write!(f, ",queue={},mode={mode},zerocopy={zc}", self.queue)?;
        if self.takeover {
            f.write_str(",takeover")?;
        }
        Ok(())
    }
}

/// The port `nic del` stops: `IFNAME[,queue=N]`; the options of the
/// `--nic` that started it may stay (the same text works for both).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NicTarget {
    pub ifname: String,
    pub queue: u32,
}

impl FromStr for NicTarget {
    type Err = NicSpecError;

    fn from_str(s: &str) -> Result<Self, NicSpecError> {
        let mut it = s.split(',');
        let ifname = it.next().unwrap_or_default();
        if ifname.is_empty() || ifname.contains('=') {
            return Err(NicSpecError::NoInterface);
        }
        if !valid_ifname(ifname) {
            return Err(NicSpecError::BadInterface(s.into(), ifname.into()));
        }
        let mut queue = 0;
        for opt in it {
            match opt.split_once('=') {
                Some(("queue", v)) => {
                    queue = v
                        .parse()
                        .map_err(|_| NicSpecError::HwQueue(s.into(), v.into()))?
                }
                Some(("ingress" | "egress" | "mode" | "zerocopy", _)) => {}
                None if opt == "takeover" => {}
                _ => return Err(NicSpecError::Option(s.into(), opt.into())),
            }
        }
        Ok(NicTarget {
            ifname: ifname.into(),
            queue,
        })
    }
}

impl NicSpec {
    /// The port's name among the daemon's ports (`stats`, `move`).
    pub fn port_name(&self) -> String {
        format!("nic:{}@{}", self.ifname, self.queue)
    }

    pub fn config(&self) -> NicConfig {
        NicConfig {
            ifname: self.ifname.clone(),
            queue: self.queue,
            mode: self.mode,
            zerocopy: self.zerocopy,
            takeover: self.takeover,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<NicSpec, NicSpecError> {
        s.parse()
    }

    #[test]
    fn every_option_parses_and_round_trips() {
        let s = parse("eth1,ingress=0,egress=1,queue=3,mode=xdp,zerocopy=on,takeover").unwrap();
        assert_eq!(
            s,
            NicSpec {
                ifname: "eth1".into(),
                ingress: Some(0),
                egress: Some(1),
                queue: 3,
                mode: Mode::Xdp,
                zerocopy: ZeroCopy::On,
                takeover: true,
            }
        );
        assert_eq!(parse(&s.to_string()).unwrap(), s);
        let d = parse("veth0,egress=2").unwrap();
        assert_eq!((d.ingress, d.egress, d.queue), (None, Some(2), 0));
        assert_eq!(
            (d.mode, d.zerocopy, d.takeover),
            (Mode::Auto, ZeroCopy::Auto, false)
        );
        assert_eq!(
            d.to_string(),
            "veth0,egress=2,queue=0,mode=auto,zerocopy=auto"
        );
        assert_eq!(d.port_name(), "nic:veth0@0");
    }

    #[test]
    fn del_takes_the_interface_and_queue_or_the_whole_add_text() {
        let t: NicTarget = "eth1".parse().unwrap();
        assert_eq!((t.ifname.as_str(), t.queue), ("eth1", 0));
        let t: NicTarget = "eth1,ingress=0,egress=1,queue=2,mode=xdp,takeover"
            .parse()
            .unwrap();
        assert_eq!((t.ifname.as_str(), t.queue), ("eth1", 2));
        let e = "eth1,rx=0".parse::<NicTarget>().unwrap_err().to_string();
        assert!(
            e.starts_with("--nic eth1,rx=0: unknown option \"rx=0\""),
            "{e}"
        );
    }

    #[test]
    fn bad_input_is_one_line_naming_the_fix() {
        let cases: &[(&str, &str)] = &[
            ("", "--nic needs an interface name first: --nic IFNAME,ingress=Q[,egress=Q][,queue=N][,mode=auto|xdp|packet][,zerocopy=auto|on|off][,takeover]"),
            ("ingress=0", "--nic needs an interface name first"),
            ("a/b,ingress=0", "--nic a/b,ingress=0: interface name \"a/b\" is invalid"),
            ("abcdefghijklmnop,ingress=0", "is invalid (1 to 15 characters"),
            ("eth1", "--nic eth1: needs ingress=Q (what arrives goes there), egress=Q (what is sent there leaves) or both"),
            ("eth1,ingress=x", "--nic eth1,ingress=x: \"x\" is not a cluster queue number"),
            ("eth1,ingress=1024", "\"1024\" is not a cluster queue number"),
            ("eth1,ingress=0,queue=-1", "queue=\"-1\" is not a receive queue number"),
            ("eth1,ingress=0,mode=dpdk", "mode=\"dpdk\": use mode=auto, xdp or packet"),
            ("eth1,ingress=0,zerocopy=yes", "zerocopy=\"yes\": use zerocopy=auto, on or off"),
            ("eth1,ingress=0,rx=1", "unknown option \"rx=1\""),
            ("eth1,ingress=0,takeover=1", "unknown option \"takeover=1\""),
            ("eth1,ingress=2,egress=2", "ingress and egress are both queue 2"),
            ("eth1,ingress=0,mode=packet,zerocopy=on", "zerocopy=on needs AF_XDP: it contradicts mode=packet"),
        ];
        for (input, want) in cases {
            let e = parse(input).unwrap_err().to_string();
            assert!(e.contains(want), "{input:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
