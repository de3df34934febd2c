//! Feature negotiation and the virtio device initialisation sequence
//! (virtio 1.x, 3.1.1), over whatever registers a transport has.

use thiserror::Error;

pub const F_NET_MAC: u64 = 1 << 5;
pub const F_NET_MRG_RXBUF: u64 = 1 << 15;
pub const F_RING_EVENT_IDX: u64 = 1 << 29;
pub const F_VERSION_1: u64 = 1 << 32;

pub const S_ACKNOWLEDGE: u8 = 1;
pub const S_DRIVER: u8 = 2;
pub const S_DRIVER_OK: u8 = 4;
pub const S_FEATURES_OK: u8 = 8;
pub const S_NEEDS_RESET: u8 = 64;
pub const S_FAILED: u8 = 128;

/// MSI-X "no vector": the driver takes no interrupts.
pub const NO_VECTOR: u16 = 0xffff;

/// The features this driver understands: VERSION_1 (required: 12-byte
/// header, little-endian rings), EVENT_IDX and MRG_RXBUF (the zc host
/// offers both; with one buffer per packet num_buffers is 1), MAC (read,
/// never written).
pub const DRIVER_FEATURES: u64 = F_VERSION_1 | F_RING_EVENT_IDX | F_NET_MRG_RXBUF | F_NET_MAC;

#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum InitError {
    #[error("the device does not offer VIRTIO_F_VERSION_1 (features {0:#x}); zc needs a modern virtio-net device")]
    NoVersion1(u64),
    #[error("the device refused features {0:#x} (FEATURES_OK did not stick)")]
    FeaturesRejected(u64),
    #[error("the device did not finish its reset within a second")]
    ResetTimeout,
    #[error("the device has {have} queues, the driver needs queue {want}")]
    QueueMissing { want: u16, have: u16 },
    #[error("queue {0} is not available (maximum size 0)")]
    QueueUnavailable(u16),
    #[error("the device failed during initialisation (status {0:#x})")]
    Failed(u8),
}

/// The features to accept from what the device offers.
pub fn negotiate(offered: u64) -> Result<u64, InitError> {
    if offered & F_VERSION_1 == 0 {
        return Err(InitError::NoVersion1(offered));
    }
    Ok(offered & DRIVER_FEATURES)
}

/// The registers of a virtio device's common configuration.
pub trait Regs {
    fn status(&self) -> u8;
    fn set_status(&mut self, s: u8);
    fn device_features(&mut self) -> u64;
    fn set_driver_features(&mut self, f: u64);
    fn num_queues(&self) -> u16;
    fn select_queue(&mut self, q: u16);
    /// The selected queue's size (the device's maximum until written).
    fn queue_size(&self) -> u16;
    fn set_queue_size(&mut self, n: u16);
    fn set_queue_vector(&mut self, v: u16);
    fn set_queue_addrs(&mut self, desc: u64, avail: u64, used: u64);
    fn set_queue_enable(&mut self);
}

/// Resets the device and waits until it reads back 0.
pub fn reset<R: Regs>(r: &mut R) -> Result<(), InitError> {
    r.set_status(0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    while r.status() != 0 {
        if std::time::Instant::now() > deadline {
            return Err(InitError::ResetTimeout);
        }
        std::thread::sleep(std::time::Duration::from_micros(100));
    }
    Ok(())
}

/// Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK (checked). Returns the
/// negotiated features.
pub fn begin<R: Regs>(r: &mut R) -> Result<u64, InitError> {
    reset(r)?;
    r.set_status(S_ACKNOWLEDGE);
    r.set_status(S_ACKNOWLEDGE | S_DRIVER);
    let f = match negotiate(r.device_features()) {
        Ok(f) => f,
        Err(e) => {
            r.set_status(S_FAILED);
            return Err(e);
        }
    };
    r.set_driver_features(f);
    r.set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    if r.status() & S_FEATURES_OK == 0 {
        r.set_status(S_FAILED);
        return Err(InitError::FeaturesRejected(f));
    }
    Ok(f)
}

/// The largest power-of-two size up to `limit` that queue `q` supports.
pub fn queue_size<R: Regs>(r: &mut R, q: u16, limit: u16) -> Result<u16, InitError> {
    let have = r.num_queues();
    if q >= have {
        return Err(InitError::QueueMissing { want: q, have });
    }
    r.select_queue(q);
    let max = r.queue_size().min(limit);
    if max == 0 {
        return Err(InitError::QueueUnavailable(q));
    }
    Ok(1 << (15 - max.leading_zeros()))
}

/// Guest-physical addresses of one queue's parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueAddrs {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// Programs and enables queue `q` (no interrupt vector: poll mode).
pub fn setup_queue<R: Regs>(r: &mut R, q: u16, a: QueueAddrs) {
    r.select_queue(q);
    r.set_queue_size(a.size);
    r.set_queue_vector(NO_VECTOR);
    r.set_queue_addrs(a.desc, a.avail, a.used);
    r.set_queue_enable();
}

/// DRIVER_OK: the device may start.
pub fn finish<R: Regs>(r: &mut R) -> Result<(), InitError> {
    r.set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    let s = r.status();
    if s & (S_NEEDS_RESET | S_FAILED) != 0 || s & S_DRIVER_OK == 0 {
        return Err(InitError::Failed(s));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (max size, size, enabled, (desc, avail, used)) of one queue.
    type QueueState = (u16, u16, bool, (u64, u64, u64));

    /// A device model that enforces the ordering rules the spec gives.
    #[derive(Default)]
    struct Model {
        status: u8,
        offered: u64,
        accepted: u64,
        queues: Vec<QueueState>,
        sel: u16,
        log: Vec<String>,
    }

    impl Regs for Model {
        fn status(&self) -> u8 {
            self.status
        }
        fn set_status(&mut self, s: u8) {
            self.log.push(format!("status {s}"));
            if s == 0 {
                self.status = 0;
                self.accepted = 0;
                return;
            }
            let mut s = s;
            if s & S_FEATURES_OK != 0 && self.accepted & !self.offered != 0 {
                s &= !S_FEATURES_OK;
            }
            self.status = s;
        }
        fn device_features(&mut self) -> u64 {
            self.offered
        }
        fn set_driver_features(&mut self, f: u64) {
            assert_eq!(
                self.status,
                S_ACKNOWLEDGE | S_DRIVER,
                "features before DRIVER"
            );
            self.accepted = f;
        }
        fn num_queues(&self) -> u16 {
            self.queues.len() as u16
        }
        fn select_queue(&mut self, q: u16) {
            self.sel = q;
        }
        fn queue_size(&self) -> u16 {
            self.queues[self.sel as usize].0
        }
        fn set_queue_size(&mut self, n: u16) {
            assert!(self.status & S_FEATURES_OK != 0, "queues after FEATURES_OK");
            self.queues[self.sel as usize].1 = n;
        }
        fn set_queue_vector(&mut self, _: u16) {}
        fn set_queue_addrs(&mut self, d: u64, a: u64, u: u64) {
            self.queues[self.sel as usize].3 = (d, a, u);
        }
        fn set_queue_enable(&mut self) {
            self.queues[self.sel as usize].2 = true;
        }
    }

    fn model(offered: u64, sizes: &[u16]) -> Model {
        Model {
            status: S_DRIVER_OK | S_DRIVER | S_ACKNOWLEDGE | S_FEATURES_OK,
            offered,
            queues: sizes.iter().map(|&s| (s, 0, false, (0, 0, 0))).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn full_sequence_negotiates_only_what_both_know() {
        let offered = F_VERSION_1 | F_RING_EVENT_IDX | F_NET_MRG_RXBUF | (1 << 0) | (1 << 16);
        let mut m = model(offered, &[256, 256, 64]);
        let f = begin(&mut m).unwrap();
        assert_eq!(f, F_VERSION_1 | F_RING_EVENT_IDX | F_NET_MRG_RXBUF);
        assert_eq!(queue_size(&mut m, 0, 512).unwrap(), 256);
        assert_eq!(queue_size(&mut m, 1, 100).unwrap(), 64);
        let a = QueueAddrs {
            size: 256,
            desc: 0x1000,
            avail: 0x2000,
            used: 0x3000,
        };
        setup_queue(&mut m, 0, a);
        finish(&mut m).unwrap();
        assert_eq!(m.queues[0], (256, 256, true, (0x1000, 0x2000, 0x3000)));
        assert!(!m.queues[1].2);
        assert_eq!(
            m.log[0], "status 0",
            "reset first: a crashed driver's device is recovered"
        );
        assert_eq!(m.status & S_DRIVER_OK, S_DRIVER_OK);
    }

    #[test]
    fn devices_without_version_1_or_queues_are_refused() {
        let mut m = model(F_RING_EVENT_IDX, &[256]);
        assert_eq!(begin(&mut m), Err(InitError::NoVersion1(F_RING_EVENT_IDX)));
        assert_eq!(m.status, S_FAILED);
        let mut m = model(F_VERSION_1, &[0]);
        begin(&mut m).unwrap();
        assert_eq!(
            queue_size(&mut m, 0, 512),
            Err(InitError::QueueUnavailable(0))
        );
        assert_eq!(
            queue_size(&mut m, 1, 512),
            Err(InitError::QueueMissing { want: 1, have: 1 })
        );
    }

    #[test]
    fn a_device_that_drops_features_ok_is_reported() {
        struct Stubborn(Model);
        impl Regs for Stubborn {
            fn status(&self) -> u8 {
                self.0.status & !S_FEATURES_OK
            }
            fn set_status(&mut self, s: u8) {
                self.0.set_status(s)
            }
            fn device_features(&mut self) -> u64 {
                self.0.offered
            }
            fn set_driver_features(&mut self, f: u64) {
                self.0.set_driver_features(f)
            }
            fn num_queues(&self) -> u16 {
                0
            }
            fn select_queue(&mut self, _: u16) {}
            fn queue_size(&self) -> u16 {
                0
            }
            fn set_queue_size(&mut self, _: u16) {}
            fn set_queue_vector(&mut self, _: u16) {}
            fn set_queue_addrs(&mut self, _: u64, _: u64, _: u64) {}
            fn set_queue_enable(&mut self) {}
        }
        let mut m = Stubborn(model(F_VERSION_1, &[]));
        assert_eq!(begin(&mut m), Err(InitError::FeaturesRejected(F_VERSION_1)));
    }
}
