//! The QEMU side of attaching an export to a running VM: the QMP commands
//! that hot-plug the pool (a memory backend on the pool file and an
//! ivshmem-plain device) and a vhost-user virtio-net device, and that
//! remove them again. A failed step undoes the steps before it, so a VM is
//! never left half-attached.

use crate::port::export::qemu_args::{pool_object_id, OFFLOADS_OFF, RECONNECT_MS};
use crate::port::export::spec::MacDisplay;
use crate::qmp::{Qmp, QmpError};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

/// How long a guest gets to release a device after `device_del` (ACPI
/// eject; seconds under TCG).
pub const UNPLUG_TIMEOUT: Duration = Duration::from_secs(60);

/// The pool of `cluster` as a VM sees it. The memory backend's id is the
/// one `zc-hostd --qemu-args` uses, so a VM started with those options is
/// recognised as having the pool already.
pub struct PoolPlug<'a> {
    pub cluster: u32,
    pub path: &'a str,
    pub size: u64,
}

impl PoolPlug<'_> {
    pub fn device_id(cluster: u32) -> String {
        format!("zcivshmem{cluster}")
    }

    /// Adds the pool unless the VM has it already; true when added here.
    pub fn add(&self, qmp: &mut Qmp) -> Result<bool, QmpError> {
        let obj = pool_object_id(self.cluster);
        let objects = qmp.execute("qom-list", json!({ "path": "/objects" }))?;
        if objects
            .as_array()
            .is_some_and(|a| a.iter().any(|o| o["name"] == obj.as_str()))
        {
            return Ok(false);
        }
        qmp.execute(
            "object-add",
            json!({
                "qom-type": "memory-backend-file",
                "id": obj,
                "mem-path": self.path,
                "size": self.size,
                "share": true,
            }),
        )?;
        let dev = json!({
            "driver": "ivshmem-plain",
            "id": Self::device_id(self.cluster),
            "memdev": obj,
        });
        if let Err(e) = qmp.execute("device_add", dev) {
            let _ = qmp.execute("object-del", json!({ "id": obj }));
            return Err(e);
        }
        Ok(true)
    }

    /// Removes a pool that `add` added.
    pub fn remove(qmp: &mut Qmp, cluster: u32, timeout: Duration) -> Result<(), QmpError> {
        gone_ok(device_del(qmp, &Self::device_id(cluster), timeout))?;
        gone_ok(
            qmp.execute("object-del", json!({ "id": pool_object_id(cluster) }))
                .map(drop),
        )
    }
}

/// A vhost-user virtio-net device: chardev `<id>-chr`, netdev `<id>-net`,
/// device `<id>`.
pub struct NetPlug<'a> {
    pub id: &'a str,
    pub socket: &'a Path,
    pub mac: [u8; 6],
}

impl NetPlug<'_> {
    fn chardev(&self) -> String {
        format!("{}-chr", self.id)
    }

    fn netdev(&self) -> String {
        format!("{}-net", self.id)
    }

    /// chardev-add (connects to the export's socket), netdev_add and
    /// device_add; undone step by step if one fails.
    pub fn add(&self, qmp: &mut Qmp) -> Result<(), QmpError> {
        let chr = self.chardev();
        let net = self.netdev();
        qmp.execute(
            "chardev-add",
            json!({
                "id": chr,
                "backend": { "type": "socket", "data": {
                    "addr": { "type": "unix", "data": { "path": self.socket } },
                    "server": false,
                    // A restarted zc-hostd is reconnected to (see qemu_args).
                    "reconnect-ms": RECONNECT_MS,
                }},
            }),
        )?;
        if let Err(e) = qmp.execute(
            "netdev_add",
            json!({ "type": "vhost-user", "id": net, "chardev": chr }),
        ) {
            let _ = qmp.execute("chardev-remove", json!({ "id": chr }));
            return Err(e);
        }
        if let Err(e) = qmp.execute("device_add", self.device()) {
            let _ = qmp.execute("netdev_del", json!({ "id": net }));
            let _ = qmp.execute("chardev-remove", json!({ "id": chr }));
            return Err(e);
        }
        Ok(())
    }

    /// The device with the same options as `--qemu-args`: no offloads.
    fn device(&self) -> Value {
        let mut d = json!({
            "driver": "virtio-net-pci",
            "id": self.id,
            "netdev": self.netdev(),
            "mac": MacDisplay(&self.mac).to_string(),
            "mrg_rxbuf": true,
        });
        for off in OFFLOADS_OFF {
            d[off] = json!(false);
        }
        d
    }

    /// Unplugs the device (waiting for the guest to let go of it), then
    /// removes its netdev, which disconnects the export. QEMU deletes a
    /// vhost-user netdev's chardev with it; one left over (an add that
    /// failed half-way) is removed. Steps already done are skipped, so a
    /// detach that failed half-way can be repeated.
    pub fn remove(&self, qmp: &mut Qmp, timeout: Duration) -> Result<(), QmpError> {
        gone_ok(device_del(qmp, self.id, timeout))?;
        gone_ok(
            qmp.execute("netdev_del", json!({ "id": self.netdev() }))
                .map(drop),
        )?;
        let chr = self.chardev();
        let chardevs = qmp.execute("query-chardev", json!({}))?;
        if chardevs
            .as_array()
            .is_some_and(|a| a.iter().any(|c| c["label"] == chr.as_str()))
        {
            qmp.execute("chardev-remove", json!({ "id": chr }))?;
        }
        Ok(())
    }
}

/// A removal of something QEMU no longer has is done.
fn gone_ok(r: Result<(), QmpError>) -> Result<(), QmpError> {
    match r {
        Err(QmpError::Command { class, desc, .. })
            if class == "DeviceNotFound" || desc.contains("not found") =>
        {
            Ok(())
        }
        r => r,
    }
}

/// `device_del` and the wait for its DEVICE_DELETED event: only then has
/// the guest released the device.
fn device_del(qmp: &mut Qmp, id: &str, timeout: Duration) -> Result<(), QmpError> {
    qmp.execute("device_del", json!({ "id": id }))?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ev = qmp.wait_event("DEVICE_DELETED", left).map_err(|e| match e {
            QmpError::Protocol(m) if m.starts_with("no DEVICE_DELETED") => QmpError::Protocol(format!(
                "the guest did not release device {id} within {timeout:?} (is it running, with ACPI PCI hot-plug?)"
            )),
            e => e,
        })?;
        if ev["data"]["device"] == id {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_has_the_qemu_args_options_as_json_booleans() {
        let n = NetPlug {
            id: "zc99-rx0-tx1",
            socket: Path::new("/run/zc/99/a.sock"),
            mac: [2, 0x7a, 0, 99, 0, 0],
        };
        let d = n.device();
        assert_eq!(d["netdev"], "zc99-rx0-tx1-net");
        assert_eq!(d["mac"], "02:7a:00:63:00:00");
        assert_eq!(d["mrg_rxbuf"], true);
        assert_eq!(d["csum"], false);
        assert_eq!(d["host_ufo"], false);
        assert_eq!(n.chardev(), "zc99-rx0-tx1-chr");
        assert_eq!(pool_object_id(99), "zcpool99");
    }
}
