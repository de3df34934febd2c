//! Who may do what on a cluster's control socket, decided on the peer's
//! credentials (see `peer`):
//! - attach at all: root, the daemon's own user, and members of the
//!   socket's group (`--group`, default the daemon's group), whatever the
//!   socket's file mode lets connect;
//! - take a queue reserved with `--allow Q=uid|@group`: root and the uids
//!   and members of the groups it was reserved for;
//! - change the daemon (hot-plug into VMs, add interface ports or
//!   reflectors, move ports): root and the daemon's user, since the daemon does these with
//!   its own rights.
//!
//! Root always passes: it can read the pool file and every process's
//! memory anyway, so refusing it would protect nothing.

use crate::access::{self, GroupError};
use crate::peer::Peer;
use std::collections::BTreeMap;
use thiserror::Error;

/// Whom a reserved queue is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Principal {
    Uid(u32),
    Group(u32),
}

impl Principal {
    fn admits(self, peer: &Peer) -> bool {
        match self {
            Principal::Uid(u) => peer.uid == u,
            Principal::Group(g) => peer.in_group(g),
        }
    }
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Uid(u) => write!(f, "uid {u}"),
            Principal::Group(g) => write!(f, "group {}", access::group_text(*g)),
        }
    }
}

/// One `--allow Q=uid|@group`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allow {
    pub queue: u16,
    pub who: Principal,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AllowError {
    #[error("--allow {0}: give QUEUE=USER or QUEUE=@GROUP (a name or a number), e.g. --allow 3=1000 or --allow 3=@tenant-a")]
    Syntax(String),
    #[error(transparent)]
    Name(#[from] GroupError),
    #[error("--allow {text}: cluster {cluster} has queues 0..{last}")]
    NoQueue {
        text: String,
        cluster: u32,
        last: u16,
    },
}

impl Allow {
    /// Parses `Q=USER` or `Q=@GROUP`, looking names up.
    pub fn parse(text: &str) -> Result<Allow, AllowError> {
        let syntax = || AllowError::Syntax(text.into());
        let (q, who) = text.split_once('=').ok_or_else(syntax)?;
        let queue = q.trim().parse::<u16>().map_err(|_| syntax())?;
        let who = match who.strip_prefix('@') {
            Some("") => return Err(syntax()),
            Some(g) => Principal::Group(access::group_id("--allow", g)?),
            None if who.is_empty() => return Err(syntax()),
            None => Principal::Uid(access::user_id("--allow", who)?),
        };
        Ok(Allow { queue, who })
    }
}

/// The rules of one cluster's control socket.
#[derive(Clone, Debug)]
pub struct Policy {
    cluster: u32,
    /// The daemon's effective uid: the socket's owner.
    owner: u32,
    /// The socket's group: its members may attach.
    group: u32,
    reserved: BTreeMap<u16, Vec<Principal>>,
}

impl Policy {
    /// `group` is the control socket's group; `allow` the reservations,
    /// checked against the cluster's `queues`.
    pub fn new(
        cluster: u32,
        owner: u32,
        group: u32,
        queues: u16,
        allow: &[(String, Allow)],
    ) -> Result<Policy, AllowError> {
        let mut reserved: BTreeMap<u16, Vec<Principal>> = BTreeMap::new();
        for (text, a) in allow {
            if a.queue >= queues {
                return Err(AllowError::NoQueue {
                    text: text.clone(),
                    cluster,
                    last: queues.saturating_sub(1),
                });
            }
            reserved.entry(a.queue).or_default().push(a.who);
        }
        Ok(Policy {
            cluster,
            owner,
            group,
            reserved,
        })
    }

    fn privileged(&self, peer: &Peer) -> bool {
        peer.uid == 0 || peer.uid == self.owner
    }

    /// May `peer` use the control socket at all? `Err`: the line it gets.
    pub fn admit(&self, peer: &Peer) -> Result<(), String> {
        if self.privileged(peer) || peer.in_group(self.group) {
            return Ok(());
        }
        Err(access::refusal_line(self.cluster, peer.uid, self.group))
    }

    /// May `peer` take a role on `queue`?
    pub fn may_take(&self, peer: &Peer, queue: u16) -> Result<(), String> {
        let Some(who) = self.reserved.get(&queue) else {
            return Ok(());
        };
        if self.privileged(peer) || who.iter().any(|p| p.admits(peer)) {
            return Ok(());
        }
        let list: Vec<String> = who.iter().map(Principal::to_string).collect();
        Err(format!(
            "cluster {}: queue {queue} is reserved for {} (zc-hostd --allow): uid {} may not take it",
            self.cluster,
            list.join(" and "),
            peer.uid
        ))
    }

    /// May `peer` make the daemon act with its own rights (`what`: the
    /// request, for the line)?
    pub fn may_administer(&self, peer: &Peer, what: &str) -> Result<(), String> {
        if self.privileged(peer) {
            return Ok(());
        }
        Err(format!(
            "cluster {}: uid {} may not {what}: only root (or zc-hostd's own user) may",
            self.cluster, peer.uid
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer {
            pid: 1,
            uid,
            gid,
            groups: groups.to_vec(),
        }
    }

    fn allow(s: &str) -> (String, Allow) {
        (s.into(), Allow::parse(s).unwrap())
    }

    #[test]
    fn allow_takes_numbers_and_names() {
        assert_eq!(
            Allow::parse("3=1000"),
            Ok(Allow {
                queue: 3,
                who: Principal::Uid(1000)
            })
        );
        assert_eq!(Allow::parse("0=root").unwrap().who, Principal::Uid(0));
        assert_eq!(Allow::parse("1=@4242").unwrap().who, Principal::Group(4242));
        assert_eq!(Allow::parse("1=@root").unwrap().who, Principal::Group(0));
        for bad in ["3", "x=1000", "3=", "3=@", "-1=5", "70000=5"] {
            assert_eq!(
                Allow::parse(bad).unwrap_err().to_string(),
                format!("--allow {bad}: give QUEUE=USER or QUEUE=@GROUP (a name or a number), e.g. --allow 3=1000 or --allow 3=@tenant-a")
            );
        }
        assert_eq!(
            Allow::parse("3=@no-such-group-zc").unwrap_err().to_string(),
            "--allow no-such-group-zc: no such group (see getent group; or give a numeric gid)"
        );
        let e = Policy::new(99, 0, 0, 4, &[allow("4=1000")]).unwrap_err();
        assert_eq!(e.to_string(), "--allow 4=1000: cluster 99 has queues 0..3");
    }

    #[test]
    fn the_socket_admits_root_its_owner_and_its_group() {
        let p = Policy::new(99, 500, 4242, 4, &[]).unwrap();
        assert_eq!(p.admit(&peer(0, 0, &[])), Ok(()));
        assert_eq!(p.admit(&peer(500, 500, &[])), Ok(()));
        assert_eq!(p.admit(&peer(1000, 4242, &[])), Ok(()));
        assert_eq!(p.admit(&peer(1000, 1000, &[7, 4242])), Ok(()));
        assert_eq!(
            p.admit(&peer(1000, 1000, &[7])).unwrap_err(),
            "cluster 99: uid 1000 may not attach: its control socket is for group gid 4242; run as a member of that group or as root"
        );
    }

    #[test]
    fn reserved_queues_admit_root_and_whom_they_are_for() {
        let p = Policy::new(99, 0, 4242, 4, &[allow("1=1000"), allow("1=@4343")]).unwrap();
        assert_eq!(p.may_take(&peer(1001, 1001, &[]), 0), Ok(()));
        assert_eq!(p.may_take(&peer(1000, 1000, &[]), 1), Ok(()));
        assert_eq!(p.may_take(&peer(1002, 1002, &[4343]), 1), Ok(()));
        assert_eq!(p.may_take(&peer(0, 0, &[]), 1), Ok(()));
        assert_eq!(
            p.may_take(&peer(1001, 4242, &[]), 1).unwrap_err(),
            "cluster 99: queue 1 is reserved for uid 1000 and group gid 4343 (zc-hostd --allow): uid 1001 may not take it"
        );
    }

    #[test]
    fn only_root_and_the_owner_administer() {
        let p = Policy::new(99, 500, 4242, 4, &[]).unwrap();
        assert_eq!(p.may_administer(&peer(500, 1, &[]), "move ports"), Ok(()));
        assert_eq!(
            p.may_administer(&peer(1000, 4242, &[]), "move ports")
                .unwrap_err(),
            "cluster 99: uid 1000 may not move ports: only root (or zc-hostd's own user) may"
        );
    }
}
