//! What a daemon hands its successor at a graceful restart (`zc-hostd -c
//! ID restart`, SIGHUP): the buffers its export ports held in their hands,
//! with the packets in them, and the exports `attach` added at run time.
//!
//! Everything else a successor needs is in the cluster's files already
//! (pool, queues, owner table). A crash leaves no handover: the successor
//! then finds the dead daemon's hands by elimination, and their packets
//! are lost. The file is host-private (0600, beside the cluster lock),
//! written whole under another name and renamed, and removed by the
//! successor as soon as it has read it, so it never outlives the restart
//! it was written for.

use crate::control::{AttachmentInfo, VmRef};
use serde::{Deserialize, Serialize};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const FILE: &str = "handover";

/// What an export port held between two of its steps.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortHands {
    /// Packets taken from the rx queue, not yet delivered to the guest, in
    /// order: (buffer, length).
    pub rx_packets: Vec<(u32, u32)>,
    /// The rest of the rx hand: empty buffers.
    pub rx_empty: Vec<u32>,
    /// Packets taken from the guest, not yet in the tx queue, in order.
    pub tx_pending: Vec<(u32, u32)>,
    /// Empty buffers of the tx hand.
    pub tx_empty: Vec<u32>,
}

impl PortHands {
    /// Every buffer of the hands.
    pub fn buffers(&self) -> impl Iterator<Item = u32> + '_ {
        self.rx_packets
            .iter()
            .map(|p| p.0)
            .chain(self.rx_empty.iter().copied())
            .chain(self.tx_pending.iter().map(|p| p.0))
            .chain(self.tx_empty.iter().copied())
    }

    /// Packets in the hands (lost if nobody takes the hands over).
    pub fn packets(&self) -> usize {
        self.rx_packets.len() + self.tx_pending.len()
    }
}

/// An export `attach` added to a running VM: started again by the
/// successor, which keeps its record so that `detach` still finds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandedAttachment {
    pub info: AttachmentInfo,
    pub vm: VmRef,
    pub key: VmRef,
    pub mac: Option<[u8; 6]>,
    /// The attach also added the pool device to this VM.
    pub pool_added: bool,
}

/// One running export at the restart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandedExport {
    /// Its directory (and owner table) slot.
    pub slot: usize,
    pub path: PathBuf,
    pub hands: PortHands,
    pub attached: Option<HandedAttachment>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handover {
    pub exports: Vec<HandedExport>,
}

impl Handover {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(FILE)
    }

    /// Writes the handover into `state_dir`, whole or not at all.
    pub fn write(&self, state_dir: &Path) -> io::Result<()> {
        let tmp = state_dir.join(format!("{FILE}.new"));
        let text = serde_json::to_vec(self).map_err(io::Error::other)?;
        let mut f = crate::shm::create_private_file(&tmp, 0)?;
        f.write_all(&text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, Self::path(state_dir))
    }

    /// Reads and removes the handover a predecessor left in `state_dir`.
    /// One that does not parse is removed and ignored (the hands are then
    /// found by elimination, as after a crash).
    pub fn take(state_dir: &Path) -> Option<Handover> {
        let path = Self::path(state_dir);
        let f = crate::shm::open_private_file(&path)?;
        let read = serde_json::from_reader(io::BufReader::new(f));
        let _ = std::fs::remove_file(&path);
        match read {
            Ok(h) => Some(h),
            Err(e) => {
                log::warn!(
                    "{}: unreadable handover of a restart ({e}); its buffers are found by elimination",
                    path.display()
                );
                None
            }
        }
    }

    /// Removes a handover nobody took (the restart did not happen).
    pub fn remove(state_dir: &Path) {
        let _ = std::fs::remove_file(Self::path(state_dir));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handover_is_read_once() {
        let dir = tempfile::tempdir().unwrap();
        let h = Handover {
            exports: vec![HandedExport {
                slot: 1,
                path: "/tmp/x.sock".into(),
                hands: PortHands {
                    rx_packets: vec![(7, 60)],
                    rx_empty: vec![8],
                    tx_pending: vec![],
                    tx_empty: vec![9, 10],
                },
                attached: None,
            }],
        };
        h.write(dir.path()).unwrap();
        assert!(!dir.path().join("handover.new").exists());
        let got = Handover::take(dir.path()).unwrap();
        assert_eq!(got, h);
        assert_eq!(
            got.exports[0].hands.buffers().collect::<Vec<_>>(),
            [7, 8, 9, 10]
        );
        assert_eq!(got.exports[0].hands.packets(), 1);
        assert_eq!(Handover::take(dir.path()), None, "removed once read");
        std::fs::write(Handover::path(dir.path()), b"{not json").unwrap();
        assert_eq!(Handover::take(dir.path()), None);
        assert!(!Handover::path(dir.path()).exists());
    }
}
