//! The virtio-pci modern capabilities in a device's config space (virtio
//! 1.x, 4.1.4): where the common, notify, ISR and device configuration
//! structures live in which BAR.

pub const CAP_VENDOR: u8 = 0x09;
pub const TYPE_COMMON: u8 = 1;
pub const TYPE_NOTIFY: u8 = 2;
pub const TYPE_ISR: u8 = 3;
pub const TYPE_DEVICE: u8 = 4;

const PCI_STATUS: usize = 0x06;
const PCI_STATUS_CAP_LIST: u16 = 1 << 4;
const PCI_CAP_PTR: usize = 0x34;

/// One structure: `length` bytes at `offset` in BAR `bar`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub bar: u8,
    pub offset: u32,
    pub length: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioCaps {
    pub common: Region,
    pub notify: Region,
    pub notify_multiplier: u32,
    pub isr: Option<Region>,
    pub device: Option<Region>,
}

fn u16_at(c: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(c.get(o..o + 2)?.try_into().ok()?))
}

fn u32_at(c: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(c.get(o..o + 4)?.try_into().ok()?))
}

/// Walks the capability list of `config` (the bytes of the sysfs `config`
/// file). `None` if there is no common or notify structure. Loops and
/// out-of-range pointers end the walk.
pub fn walk(config: &[u8]) -> Option<VirtioCaps> {
    if u16_at(config, PCI_STATUS)? & PCI_STATUS_CAP_LIST == 0 {
        return None;
    }
    let mut at = usize::from(*config.get(PCI_CAP_PTR)? & !3);
    let (mut common, mut notify, mut mult, mut isr, mut device) = (None, None, 0, None, None);
    for _ in 0..48 {
        if at < 0x40 || at + 16 > config.len() {
            break;
        }
        let id = config[at];
        let next = usize::from(config[at + 1] & !3);
        if id == CAP_VENDOR && config[at + 2] >= 16 {
            let r = Region {
                bar: config[at + 4],
                offset: u32_at(config, at + 8)?,
                length: u32_at(config, at + 12)?,
            };
            // The first structure of each type is the one to use (4.1.4).
            match config[at + 3] {
                TYPE_COMMON if common.is_none() => common = Some(r),
                TYPE_NOTIFY if notify.is_none() && config[at + 2] >= 20 => {
                    notify = Some(r);
                    mult = u32_at(config, at + 16)?;
                }
                TYPE_ISR if isr.is_none() => isr = Some(r),
                TYPE_DEVICE if device.is_none() => device = Some(r),
                _ => {}
            }
        }
        if next == 0 {
            break;
        }
        at = next;
    }
    Some(VirtioCaps {
        common: common.filter(|r| r.bar < 6)?,
        notify: notify.filter(|r| r.bar < 6)?,
        notify_multiplier: mult,
        isr,
        device,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Config space of QEMU's virtio-net-pci as seen on this machine:
    /// common at BAR4+0, ISR at +0x1000, device at +0x2000, notify at
    /// +0x3000 with multiplier 4.
    pub fn qemu_net_config() -> Vec<u8> {
        let mut c = vec![0u8; 256];
        c[0..2].copy_from_slice(&0x1af4u16.to_le_bytes());
        c[2..4].copy_from_slice(&0x1000u16.to_le_bytes());
        c[PCI_STATUS..PCI_STATUS + 2].copy_from_slice(&PCI_STATUS_CAP_LIST.to_le_bytes());
        c[PCI_CAP_PTR] = 0x98;
        // MSI-X first (id 0x11), then the vendor capabilities.
        c[0x98] = 0x11;
        c[0x99] = 0x88;
        let mut put = |at: usize, next: u8, len: u8, ty: u8, off: u32, size: u32| {
            c[at] = CAP_VENDOR;
            c[at + 1] = next;
            c[at + 2] = len;
            c[at + 3] = ty;
            c[at + 4] = 4;
            c[at + 8..at + 12].copy_from_slice(&off.to_le_bytes());
            c[at + 12..at + 16].copy_from_slice(&size.to_le_bytes());
        };
        put(0x88, 0x78, 16, TYPE_COMMON, 0, 0x1000);
        put(0x78, 0x68, 16, TYPE_ISR, 0x1000, 0x1000);
        put(0x68, 0x54, 16, TYPE_DEVICE, 0x2000, 0x1000);
        put(0x54, 0x40, 20, TYPE_NOTIFY, 0x3000, 0x1000);
        // A PCI config access capability (type 5), ignored.
        put(0x40, 0, 20, 5, 0, 0);
        c[0x54 + 16..0x54 + 20].copy_from_slice(&4u32.to_le_bytes());
        c
    }

    #[test]
    fn finds_every_structure_of_qemus_layout() {
        let caps = walk(&qemu_net_config()).unwrap();
        assert_eq!(
            caps.common,
            Region {
                bar: 4,
                offset: 0,
                length: 0x1000
            }
        );
        assert_eq!(caps.notify.offset, 0x3000);
        assert_eq!(caps.notify_multiplier, 4);
        assert_eq!(caps.device.unwrap().offset, 0x2000);
        assert_eq!(caps.isr.unwrap().offset, 0x1000);
    }

    #[test]
    fn broken_lists_end_the_walk_without_panicking() {
        let mut c = qemu_net_config();
        c[0x99] = 0x98; // MSI-X points at itself: a loop
        assert_eq!(walk(&c), None);
        let mut c = qemu_net_config();
        c[PCI_CAP_PTR] = 0xfc; // runs off the end
        assert_eq!(walk(&c), None);
        let mut c = qemu_net_config();
        c[PCI_STATUS] = 0; // no capability list
        assert_eq!(walk(&c), None);
        assert_eq!(walk(&[]), None);
        let mut c = qemu_net_config();
        c[0x88 + 4] = 9; // common cfg in a BAR that does not exist
        assert_eq!(walk(&c), None);
    }
}
