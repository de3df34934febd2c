//! The name grammar shared by every tool, on the host and in guests:
//!
//! ```text
//! zc:<cluster>@<queue>   queue <queue> of cluster <cluster> (decimal numbers)
//! zc:<ifname>            on the host: the queues of zc-hostd's interface port
//!                        (--nic: ingress to receive, egress to send); in a
//!                        VM: the zc virtio-net device of that interface
//! ```

use std::fmt;
use std::str::FromStr;
use thiserror::Error;

/// Queue numbers stay below this so they fit every on-wire field.
pub const MAX_QUEUES: u16 = 1024;
/// Linux's IFNAMSIZ minus the terminating NUL.
pub const MAX_IFNAME: usize = 15;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterId(pub u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId(pub u16);

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Name {
    Queue { cluster: ClusterId, queue: QueueId },
    Interface(String),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error("'{0}' is not a zc name: expected zc:<cluster>@<queue> (e.g. zc:99@0) or zc:<interface> (e.g. zc:eth1)")]
    Prefix(String),
    #[error("'{0}' names nothing after 'zc:': expected zc:<cluster>@<queue> or zc:<interface>")]
    Empty(String),
    #[error("'{0}' has no queue: expected zc:<cluster>@<queue>, e.g. zc:{1}@0")]
    MissingQueue(String, String),
    #[error("'{0}': cluster '{1}' is not a number: expected zc:<cluster>@<queue> with a decimal cluster id below 2^32")]
    BadCluster(String, String),
    #[error("'{0}': queue '{1}' is not a number: expected zc:<cluster>@<queue> with a decimal queue below {MAX_QUEUES}")]
    BadQueue(String, String),
    #[error("'{0}': queue {1} is too large: queues are numbered 0..{MAX_QUEUES}")]
    QueueRange(String, u64),
    #[error("'{0}': interface name '{1}' is invalid: 1 to {MAX_IFNAME} characters, no '/', ':', '@' or white space")]
    BadInterface(String, String),
}

fn is_decimal(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

impl FromStr for Name {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("zc:")
            .ok_or_else(|| NameError::Prefix(s.to_string()))?;
        if rest.is_empty() {
            return Err(NameError::Empty(s.to_string()));
        }
        if let Some((cluster, queue)) = rest.split_once('@') {
            let cluster = if is_decimal(cluster) {
                cluster.parse::<u32>().ok()
            } else {
                None
            }
            .ok_or_else(|| NameError::BadCluster(s.to_string(), cluster.to_string()))?;
            if !is_decimal(queue) {
                return Err(NameError::BadQueue(s.to_string(), queue.to_string()));
            }
            let q = queue.parse::<u64>().unwrap_or(u64::MAX);
            if q >= u64::from(MAX_QUEUES) {
                return Err(NameError::QueueRange(s.to_string(), q));
            }
            return Ok(Name::Queue {
                cluster: ClusterId(cluster),
                queue: QueueId(q as u16),
            });
        }
        if is_decimal(rest) {
            return Err(NameError::MissingQueue(s.to_string(), rest.to_string()));
        }
        let valid = rest.len() <= MAX_IFNAME
            && rest != "."
            && rest != ".."
            && !rest
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
        if !valid {
            return Err(NameError::BadInterface(s.to_string(), rest.to_string()));
        }
        Ok(Name::Interface(rest.to_string()))
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Name::Queue { cluster, queue } => write!(f, "zc:{cluster}@{queue}"),
            Name::Interface(ifname) => write!(f, "zc:{ifname}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Name, NameError> {
        s.parse()
    }

    #[test]
    fn accepts_queues_and_interfaces() {
        assert_eq!(
            parse("zc:99@0"),
            Ok(Name::Queue {
                cluster: ClusterId(99),
                queue: QueueId(0)
            })
        );
        assert_eq!(
            parse("zc:4294967295@1023"),
            Ok(Name::Queue {
                cluster: ClusterId(u32::MAX),
                queue: QueueId(1023)
            })
        );
        assert_eq!(parse("zc:eth1"), Ok(Name::Interface("eth1".into())));
        assert_eq!(
            parse("zc:enp0s3.100"),
            Ok(Name::Interface("enp0s3.100".into()))
        );
        assert_eq!(
            parse("zc:abcdefghijklmno"),
            Ok(Name::Interface("abcdefghijklmno".into()))
        );
    }

    #[test]
    fn display_round_trips() {
        for s in ["zc:99@0", "zc:7@12", "zc:eth1"] {
            assert_eq!(parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn rejects_every_malformed_form_with_what_was_expected() {
        let cases: &[(&str, NameError)] = &[
            ("eth1", NameError::Prefix("eth1".into())),
            ("99@0", NameError::Prefix("99@0".into())),
            ("ZC:99@0", NameError::Prefix("ZC:99@0".into())),
            ("", NameError::Prefix("".into())),
            ("zc:", NameError::Empty("zc:".into())),
            (
                "zc:99",
                NameError::MissingQueue("zc:99".into(), "99".into()),
            ),
            ("zc:@0", NameError::BadCluster("zc:@0".into(), "".into())),
            ("zc:x@0", NameError::BadCluster("zc:x@0".into(), "x".into())),
            (
                "zc:-1@0",
                NameError::BadCluster("zc:-1@0".into(), "-1".into()),
            ),
            (
                "zc:+1@0",
                NameError::BadCluster("zc:+1@0".into(), "+1".into()),
            ),
            (
                "zc:4294967296@0",
                NameError::BadCluster("zc:4294967296@0".into(), "4294967296".into()),
            ),
            ("zc:99@", NameError::BadQueue("zc:99@".into(), "".into())),
            ("zc:99@q", NameError::BadQueue("zc:99@q".into(), "q".into())),
            (
                "zc:99@1@2",
                NameError::BadQueue("zc:99@1@2".into(), "1@2".into()),
            ),
            (
                "zc:99@ 1",
                NameError::BadQueue("zc:99@ 1".into(), " 1".into()),
            ),
            (
                "zc:99@1024",
                NameError::QueueRange("zc:99@1024".into(), 1024),
            ),
            (
                "zc:99@99999999999999999999999",
                NameError::QueueRange("zc:99@99999999999999999999999".into(), u64::MAX),
            ),
            (
                "zc:eth 1",
                NameError::BadInterface("zc:eth 1".into(), "eth 1".into()),
            ),
            (
                "zc:a/b",
                NameError::BadInterface("zc:a/b".into(), "a/b".into()),
            ),
            (
                "zc:a:b",
                NameError::BadInterface("zc:a:b".into(), "a:b".into()),
            ),
            (
                "zc:..",
                NameError::BadInterface("zc:..".into(), "..".into()),
            ),
            (
                "zc:abcdefghijklmnop",
                NameError::BadInterface("zc:abcdefghijklmnop".into(), "abcdefghijklmnop".into()),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(parse(input).as_ref(), Err(want), "input {input:?}");
        }
    }

    #[test]
    fn errors_read_as_one_line_with_an_example() {
        let e = parse("zc:99").unwrap_err().to_string();
        assert_eq!(
            e,
            "'zc:99' has no queue: expected zc:<cluster>@<queue>, e.g. zc:99@0"
        );
        let e = parse("eth0").unwrap_err().to_string();
        assert!(
            e.contains("zc:99@0") && e.contains("zc:eth1") && !e.contains('\n'),
            "{e}"
        );
    }
}
