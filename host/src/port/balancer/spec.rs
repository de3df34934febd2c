//! `--balance in=Q[+Q...],out=G[/G...][,hash=rr|ip|5tuple|fanout][,full=drop|wait]`:
//! what one balancer does. A parsed [`BalanceSpec`] is always a sensible one
//! (no queue twice, in and out apart, back-pressure only for one group);
//! only the cluster's queue count is checked later ([`BalanceSpec::check_queues`]),
//! because the spec is parsed before the cluster is known.

use super::hash::Hash;
use std::fmt;
use std::str::FromStr;
use thiserror::Error;

/// What a full output queue does to the packets for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Full {
    /// Drop for that queue only, and count it (the others still get it).
    Drop,
    /// Wait for room: back-pressure into the input queues.
    Wait,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BalanceSpec {
    inputs: Vec<u16>,
    groups: Vec<Vec<u16>>,
    hash: Hash,
    full: Full,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BalanceError {
    #[error("--balance {0}: unknown option {1:?} (use in=Q[+Q...], out=G[/G...], hash=rr|ip|5tuple|fanout, full=drop|wait)")]
    Option(String, String),
    #[error("--balance {0}: needs in=Q[+Q...], the queues to read")]
    NoInput(String),
    #[error("--balance {0}: needs out=G[/G...], the groups of queues to feed (e.g. out=1+2/3)")]
    NoOutput(String),
    #[error("--balance {0}: {1:?} is not a queue number")]
    Queue(String, String),
    #[error(
        "--balance {0}: {1:?} is an empty group; a group is Q+Q+..., groups are separated by /"
    )]
    EmptyGroup(String, String),
    #[error("--balance {0}: unknown hash {1:?}; use rr, ip, 5tuple or fanout")]
    Hash(String, String),
    #[error("--balance {0}: unknown full={1:?}; use drop or wait")]
    Full(String, String),
    #[error("--balance {0}: queue {1} is given twice; every queue belongs to one group (or is read once)")]
    Twice(String, u16),
    #[error("--balance {0}: queue {1} is both read (in) and fed (out); a balancer's outputs must be other queues")]
    InIsOut(String, u16),
    #[error("--balance {0}: full=wait holds the inputs back for one group of consumers; with {1} groups a slow one would stall the others: use full=drop, or one group")]
    WaitManyGroups(String, usize),
    #[error("--balance {0}: queue {1} does not exist: cluster {2} has queues 0..{3}")]
    Range(String, u16, u32, u16),
}

impl BalanceSpec {
    pub fn inputs(&self) -> &[u16] {
        &self.inputs
    }

    pub fn groups(&self) -> &[Vec<u16>] {
        &self.groups
    }

    pub fn hash(&self) -> Hash {
        self.hash
    }

    pub fn full(&self) -> Full {
        self.full
    }

    /// Every output queue, group by group.
    pub fn outputs(&self) -> impl Iterator<Item = u16> + '_ {
        self.groups.iter().flatten().copied()
    }

    /// Checks the queues against a cluster of `queues` queues.
    pub fn check_queues(&self, cluster: u32, queues: u16) -> Result<(), BalanceError> {
        match self
            .inputs
            .iter()
            .chain(self.outputs().collect::<Vec<_>>().iter())
            .find(|&&q| q >= queues)
        {
            Some(&q) => Err(BalanceError::Range(
                self.to_string(),
                q,
                cluster,
                queues - 1,
            )),
            None => Ok(()),
        }
    }

    /// How `stats` and `balance del` name it: `balance:in=0,out=1+2/3`.
    pub fn name(&self) -> String {
        format!("balance:{}", self.queues_text())
    }

    fn queues_text(&self) -> String {
        let join = |q: &[u16]| q.iter().map(u16::to_string).collect::<Vec<_>>().join("+");
        format!(
            "in={},out={}",
            join(&self.inputs),
            self.groups
                .iter()
                .map(|g| join(g))
                .collect::<Vec<_>>()
                .join("/")
        )
    }
}

impl fmt::Display for BalanceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let full = match self.full {
            Full::Drop => "drop",
            Full::Wait => "wait",
        };
        write!(
            f,
            "{},hash={},full={full}",
            self.queues_text(),
            self.hash.as_str()
        )
    }
}

impl FromStr for BalanceSpec {
    type Err = BalanceError;

    fn from_str(s: &str) -> Result<Self, BalanceError> {
        let whole = || s.to_string();
        let queue = |v: &str| {
            v.parse::<u16>()
                .ok()
                .filter(|&q| q != zc_proto::layout::NO_QUEUE)
                .ok_or_else(|| BalanceError::Queue(whole(), v.into()))
        };
        let list = |v: &str| -> Result<Vec<u16>, BalanceError> {
            if v.is_empty() {
                return Err(BalanceError::EmptyGroup(whole(), v.into()));
            }
            v.split('+').map(queue).collect()
        };
        let (mut inputs, mut groups, mut hash, mut full) =
            (None, None, Hash::FiveTuple, Full::Drop);
        for opt in s.split(',') {
            match opt.split_once('=') {
                Some(("in", v)) => inputs = Some(list(v)?),
                Some(("out", v)) => {
                    groups = Some(v.split('/').map(list).collect::<Result<Vec<_>, _>>()?)
                }
                Some(("hash", v)) => {
                    hash = match v {
                        "rr" => Hash::Rr,
                        "ip" => Hash::Ip,
                        "5tuple" => Hash::FiveTuple,
                        "fanout" => Hash::Fanout,
                        _ => return Err(BalanceError::Hash(whole(), v.into())),
                    }
                }
                Some(("full", v)) => {
                    full = match v {
                        "drop" => Full::Drop,
                        "wait" => Full::Wait,
                        _ => return Err(BalanceError::Full(whole(), v.into())),
                    }
                }
                _ => return Err(BalanceError::Option(whole(), opt.into())),
            }
        }
        let inputs = inputs.ok_or_else(|| BalanceError::NoInput(whole()))?;
        let groups = groups.ok_or_else(|| BalanceError::NoOutput(whole()))?;
        let mut seen = std::collections::BTreeSet::new();
        for &q in &inputs {
            if !seen.insert(q) {
                return Err(BalanceError::Twice(whole(), q));
            }
        }
        let mut out_seen = std::collections::BTreeSet::new();
        for &q in groups.iter().flatten() {
            if inputs.contains(&q) {
                return Err(BalanceError::InIsOut(whole(), q));
            }
            if !out_seen.insert(q) {
                return Err(BalanceError::Twice(whole(), q));
            }
        }
        if full == Full::Wait && groups.len() > 1 {
            return Err(BalanceError::WaitManyGroups(whole(), groups.len()));
        }
        Ok(BalanceSpec {
            inputs,
            groups,
            hash,
            full,
        })
    }
}

impl TryFrom<String> for BalanceSpec {
    type Error = BalanceError;
    fn try_from(s: String) -> Result<Self, BalanceError> {
        s.parse()
    }
}

impl From<BalanceSpec> for String {
    fn from(s: BalanceSpec) -> String {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> String {
        s.parse::<BalanceSpec>().unwrap_err().to_string()
    }

    #[test]
    fn parses_groups_hashes_and_back_pressure() {
        let s: BalanceSpec = "in=0+5,out=1+2+3/4,hash=5tuple".parse().unwrap();
        assert_eq!(s.inputs(), [0, 5]);
        assert_eq!(s.groups(), [vec![1, 2, 3], vec![4]]);
        assert_eq!((s.hash(), s.full()), (Hash::FiveTuple, Full::Drop));
        assert_eq!(s.outputs().collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert_eq!(s.name(), "balance:in=0+5,out=1+2+3/4");
        assert_eq!(s.to_string(), "in=0+5,out=1+2+3/4,hash=5tuple,full=drop");
        // Round trip through the text (the control protocol carries it so).
        assert_eq!(s.to_string().parse::<BalanceSpec>().unwrap(), s);
        let s: BalanceSpec = "out=2,in=1,full=wait,hash=rr".parse().unwrap();
        assert_eq!((s.hash(), s.full()), (Hash::Rr, Full::Wait));
        assert_eq!(s.check_queues(99, 3), Ok(()));
        assert_eq!(
            s.check_queues(99, 2).unwrap_err().to_string(),
            "--balance in=1,out=2,hash=rr,full=wait: queue 2 does not exist: cluster 99 has queues 0..1"
        );
    }

    #[test]
    fn bad_specs_say_what_is_wrong_in_one_line() {
        assert_eq!(
            err("in=0,out=1+2/2"),
            "--balance in=0,out=1+2/2: queue 2 is given twice; every queue belongs to one group (or is read once)"
        );
        assert_eq!(
            err("in=0,out=1/0"),
            "--balance in=0,out=1/0: queue 0 is both read (in) and fed (out); a balancer's outputs must be other queues"
        );
        assert_eq!(
            err("in=0,out=1,hash=crc"),
            "--balance in=0,out=1,hash=crc: unknown hash \"crc\"; use rr, ip, 5tuple or fanout"
        );
        assert_eq!(
            err("in=0,out=1/2,full=wait"),
            "--balance in=0,out=1/2,full=wait: full=wait holds the inputs back for one group of consumers; with 2 groups a slow one would stall the others: use full=drop, or one group"
        );
        assert!(matches!(
            "in=0+0,out=1".parse::<BalanceSpec>(),
            Err(BalanceError::Twice(_, 0))
        ));
        assert!(matches!(
            "out=1".parse::<BalanceSpec>(),
            Err(BalanceError::NoInput(_))
        ));
        assert!(matches!(
            "in=1".parse::<BalanceSpec>(),
            Err(BalanceError::NoOutput(_))
        ));
        assert!(matches!(
            "in=0,out=1//2".parse::<BalanceSpec>(),
            Err(BalanceError::EmptyGroup(..))
        ));
        assert!(matches!(
            "in=0,out=1+x".parse::<BalanceSpec>(),
            Err(BalanceError::Queue(..))
        ));
        assert!(matches!(
            "in=0,out=1,full=block".parse::<BalanceSpec>(),
            Err(BalanceError::Full(..))
        ));
        assert!(matches!(
            "in=0,out=1,speed=9".parse::<BalanceSpec>(),
            Err(BalanceError::Option(..))
        ));
    }
}
