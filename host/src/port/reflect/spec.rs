//! `--reflect in=Q,out=Q`: which queue a reflector port consumes and which
//! it sends back into. The same text is what `zc-hostd reflect add` takes
//! and what goes over the control socket; `reflect del` takes `in=Q` (or
//! the whole text given to add).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use thiserror::Error;
use zc_proto::name::MAX_QUEUES;

/// One reflector: every packet consumed from `input` goes into `output`
/// with its MAC addresses swapped. The two differ (the parser checks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReflectSpec {
    #[serde(rename = "in")]
    pub input: u16,
    #[serde(rename = "out")]
    pub output: u16,
}

pub const USAGE: &str = "in=Q,out=Q";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ReflectSpecError {
    #[error("--reflect {0}: unknown option {1:?} (use in=Q, the queue it consumes, and out=Q, the queue the replies go into: --reflect {USAGE})")]
    Option(String, String),
    #[error("--reflect {0}: {1:?} is not a cluster queue number (0..{MAX_QUEUES})")]
    Queue(String, String),
    #[error("--reflect {0}: {1} is given twice")]
    Twice(String, &'static str),
    #[error("--reflect {0}: needs in=Q (the queue it consumes) and out=Q (the queue the replies go into): --reflect {USAGE}")]
    Missing(String),
    #[error("--reflect {0}: in and out are both queue {1}: every reply would come straight back to the reflector; use two queues")]
    SameQueue(String, u16),
}

/// The `key=value` pairs of `s`, each key at most once.
fn pairs(s: &str) -> Result<(Option<u16>, Option<u16>), ReflectSpecError> {
    let queue = |v: &str| {
        v.parse::<u16>()
            .ok()
            .filter(|&q| q < MAX_QUEUES)
            .ok_or_else(|| ReflectSpecError::Queue(s.into(), v.into()))
    };
    let (mut input, mut output) = (None, None);
    for opt in s.split(',').filter(|_| !s.is_empty()) {
        let (slot, key) = match opt.split_once('=') {
            Some(("in", _)) => (&mut input, "in"),
            Some(("out", _)) => (&mut output, "out"),
            _ => return Err(ReflectSpecError::Option(s.into(), opt.into())),
        };
        if slot.is_some() {
            return Err(ReflectSpecError::Twice(s.into(), key));
        }
        *slot = Some(queue(&opt[key.len() + 1..])?);
    }
    Ok((input, output))
}

impl FromStr for ReflectSpec {
    type Err = ReflectSpecError;

    fn from_str(s: &str) -> Result<Self, ReflectSpecError> {
        match pairs(s)? {
            (Some(i), Some(o)) if i == o => Err(ReflectSpecError::SameQueue(s.into(), i)),
            (Some(input), Some(output)) => Ok(ReflectSpec { input, output }),
            _ => Err(ReflectSpecError::Missing(s.into())),
        }
    }
}

impl fmt::Display for ReflectSpec {
    /// The canonical form, parseable again.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "in={},out={}", self.input, self.output)
    }
}

impl ReflectSpec {
    /// The port's name among the daemon's ports (`stats`, `move`): a queue
    /// has one consumer, so its input queue names a reflector.
    pub fn port_name(&self) -> String {
        port_name(self.input)
    }
}

/// The name of the reflector consuming queue `input`.
pub fn port_name(input: u16) -> String {
    format!("reflect:{input}")
}

/// What `reflect del` stops: `in=Q`, or the text add was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReflectTarget {
    pub input: u16,
}

impl FromStr for ReflectTarget {
    type Err = ReflectSpecError;

    fn from_str(s: &str) -> Result<Self, ReflectSpecError> {
        match pairs(s)? {
            (Some(input), _) => Ok(ReflectTarget { input }),
            (None, _) => Err(ReflectSpecError::Missing(s.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_queues_parse_in_any_order_and_round_trip() {
        let s: ReflectSpec = "in=1,out=0".parse().unwrap();
        assert_eq!(
            s,
            ReflectSpec {
                input: 1,
                output: 0
            }
        );
        assert_eq!("out=0,in=1".parse::<ReflectSpec>().unwrap(), s);
        assert_eq!(s.to_string(), "in=1,out=0");
        assert_eq!(s.to_string().parse::<ReflectSpec>().unwrap(), s);
        assert_eq!(s.port_name(), "reflect:1");
        let t: ReflectTarget = "in=1".parse().unwrap();
        assert_eq!(t.input, 1);
        assert_eq!("in=3,out=0".parse::<ReflectTarget>().unwrap().input, 3);
    }

    #[test]
    fn bad_input_is_one_line_naming_the_fix() {
        let cases: &[(&str, &str)] = &[
            ("", "--reflect : needs in=Q (the queue it consumes) and out=Q"),
            ("1>0", "--reflect 1>0: unknown option \"1>0\" (use in=Q, the queue it consumes, and out=Q, the queue the replies go into: --reflect in=Q,out=Q)"),
            ("in=1", "--reflect in=1: needs in=Q (the queue it consumes) and out=Q (the queue the replies go into): --reflect in=Q,out=Q"),
            ("out=1", "needs in=Q"),
            ("in=x,out=0", "--reflect in=x,out=0: \"x\" is not a cluster queue number (0..1024)"),
            ("in=1,out=1024", "\"1024\" is not a cluster queue number"),
            ("in=1,out=-1", "\"-1\" is not a cluster queue number"),
            ("in=1,out=0,in=2", "--reflect in=1,out=0,in=2: in is given twice"),
            ("in=1,out=0,rx=2", "unknown option \"rx=2\""),
            ("in=2,out=2", "--reflect in=2,out=2: in and out are both queue 2: every reply would come straight back to the reflector; use two queues"),
        ];
        for (input, want) in cases {
            let e = input.parse::<ReflectSpec>().unwrap_err().to_string();
            assert!(e.starts_with(want) || e.contains(want), "{input:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
        let e = "out=1".parse::<ReflectTarget>().unwrap_err().to_string();
        assert!(e.contains("needs in=Q"), "{e}");
    }
}
