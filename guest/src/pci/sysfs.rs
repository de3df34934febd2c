//! PCI devices through sysfs: discovery, resources, config space, driver
//! binding. Paths are relative to a root (normally /sys) so tests can use a
//! fake tree.

use crate::error::{GuestError, Result};
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub const VENDOR_VIRTIO: u16 = 0x1af4;
pub const DEV_IVSHMEM: u16 = 0x1110;
pub const DEV_NET_MODERN: u16 = 0x1041;
pub const DEV_NET_TRANSITIONAL: u16 = 0x1000;

pub const PCI_COMMAND: u64 = 0x04;
pub const CMD_MEMORY: u16 = 1 << 1;
pub const CMD_MASTER: u16 = 1 << 2;
pub const CMD_INTX_DISABLE: u16 = 1 << 10;

/// The sysfs root, `/sys` unless `$ZC_SYSFS` says otherwise (tests).
pub fn sys_root() -> PathBuf {
    std::env::var_os("ZC_SYSFS").map_or_else(|| PathBuf::from("/sys"), PathBuf::from)
}

/// One PCI function, e.g. `0000:00:04.0`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciDev {
    pub bdf: String,
    pub dir: PathBuf,
    pub vendor: u16,
    pub device: u16,
    pub subsystem_device: u16,
}

fn read_hex(p: &Path) -> Option<u16> {
    let s = fs::read_to_string(p).ok()?;
    u16::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

/// Every PCI function under `root`.
pub fn devices(root: &Path) -> Vec<PciDev> {
    let dir = root.join("bus/pci/devices");
    let Ok(rd) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut v: Vec<PciDev> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let bdf = e.file_name().to_string_lossy().into_owned();
            let d = dir.join(&bdf);
            Some(PciDev {
                vendor: read_hex(&d.join("vendor"))?,
                device: read_hex(&d.join("device"))?,
                subsystem_device: read_hex(&d.join("subsystem_device")).unwrap_or(0),
                bdf,
                dir: d,
            })
        })
        .collect();
    v.sort_by(|a, b| a.bdf.cmp(&b.bdf));
    v
}

impl PciDev {
    pub fn is_ivshmem(&self) -> bool {
        self.vendor == VENDOR_VIRTIO && self.device == DEV_IVSHMEM
    }

    /// A virtio-net function: modern 1af4:1041, or transitional 1af4:1000
    /// (subsystem device 1 = network).
    pub fn is_virtio_net(&self) -> bool {
        self.vendor == VENDOR_VIRTIO
            && (self.device == DEV_NET_MODERN
                || (self.device == DEV_NET_TRANSITIONAL && self.subsystem_device == 1))
    }

    /// (start, size) of BAR `n` from the `resource` file: the guest-physical
    /// address the device sees it at.
    pub fn bar(&self, n: usize) -> Result<(u64, u64)> {
        let p = self.dir.join("resource");
        let s = fs::read_to_string(&p).map_err(|e| GuestError::io(&p, e))?;
        let line = s
            .lines()
            .nth(n)
            .ok_or_else(|| self.err(format!("no BAR {n}")))?;
        let mut it = line
            .split_whitespace()
            .map(|x| u64::from_str_radix(x.trim_start_matches("0x"), 16));
        match (it.next(), it.next()) {
            (Some(Ok(start)), Some(Ok(end))) if end > start && start != 0 => {
                Ok((start, end - start + 1))
            }
            _ => Err(self.err(format!("BAR {n} is not assigned ({line})"))),
        }
    }

    pub fn resource_path(&self, n: u8) -> PathBuf {
        self.dir.join(format!("resource{n}"))
    }

    /// The name of the bound driver, if any.
    pub fn driver(&self) -> Option<String> {
        let l = fs::read_link(self.dir.join("driver")).ok()?;
        Some(l.file_name()?.to_string_lossy().into_owned())
    }

    /// The kernel network interface on this function (`<bdf>/virtioN/net/<ifname>`).
    fn kernel_net_dir(&self) -> Option<PathBuf> {
        for e in fs::read_dir(&self.dir).ok()?.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("virtio") {
                continue;
            }
            if let Some(n) = fs::read_dir(e.path().join("net"))
                .ok()?
                .filter_map(|e| e.ok())
                .next()
            {
                return Some(n.path());
            }
        }
        None
    }

    /// MAC of the kernel network interface on this function, if one is up.
    pub fn kernel_mac(&self) -> Option<[u8; 6]> {
        let a = fs::read_to_string(self.kernel_net_dir()?.join("address")).ok()?;
        crate::error::parse_mac(&a)
    }

    /// Name of the kernel network interface on this function, if any.
    pub fn kernel_ifname(&self) -> Option<String> {
        Some(
            self.kernel_net_dir()?
                .file_name()?
                .to_string_lossy()
                .into_owned(),
        )
    }

    pub fn config(&self) -> Result<Vec<u8>> {
        let p = self.dir.join("config");
        fs::read(&p).map_err(|e| GuestError::io(&p, e))
    }

    pub fn command(&self) -> Result<u16> {
        let p = self.dir.join("config");
        let f = fs::File::open(&p).map_err(|e| GuestError::io(&p, e))?;
        let mut b = [0u8; 2];
        f.read_exact_at(&mut b, PCI_COMMAND)
            .map_err(|e| GuestError::io(&p, e))?;
        Ok(u16::from_le_bytes(b))
    }

    pub fn set_command(&self, v: u16) -> Result<()> {
        let p = self.dir.join("config");
        let f = fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(|e| GuestError::io(&p, e))?;
        f.write_all_at(&v.to_le_bytes(), PCI_COMMAND)
            .map_err(|e| GuestError::io(&p, e))
    }

    fn write(&self, p: &Path, what: &str) -> Result<()> {
        fs::write(p, what).map_err(|e| GuestError::io(p, e))
    }

    /// Unbinds the kernel driver, if one is bound.
    pub fn unbind(&self) -> Result<()> {
        if self.driver().is_some() {
            self.write(&self.dir.join("driver/unbind"), &self.bdf)?;
        }
        Ok(())
    }

    /// Stops (`Some("zc-guest")`) or allows (`None`) drivers probing this
    /// function while the zc driver owns it.
    pub fn set_override(&self, name: Option<&str>) -> Result<()> {
        let p = self.dir.join("driver_override");
        if !p.exists() {
            return Ok(());
        }
        self.write(&p, name.unwrap_or("\n"))
    }

    /// Binds `driver` (e.g. virtio-pci) again.
    pub fn bind(&self, root: &Path, driver: &str) -> Result<()> {
        if self.driver().as_deref() == Some(driver) {
            return Ok(());
        }
        self.write(
            &root.join("bus/pci/drivers").join(driver).join("bind"),
            &self.bdf,
        )
    }

    /// Turns memory decoding on through the sysfs `enable` file.
    pub fn enable(&self) -> Result<bool> {
        let p = self.dir.join("enable");
        let on = fs::read_to_string(&p)
            .map(|s| s.trim() != "0")
            .unwrap_or(true);
        if !on {
            self.write(&p, "1")?;
        }
        Ok(!on)
    }

    pub fn disable(&self) -> Result<()> {
        self.write(&self.dir.join("enable"), "0")
    }

    fn err(&self, msg: String) -> GuestError {
        GuestError::Device {
            bdf: self.bdf.clone(),
            msg,
        }
    }
}

/// The PCI function behind network interface `ifname`.
pub fn interface_device(root: &Path, ifname: &str) -> Option<PathBuf> {
    // /sys/class/net/<if>/device -> .../<bdf>/virtioN
    let dev = fs::canonicalize(root.join("class/net").join(ifname).join("device")).ok()?;
    let parent = dev.parent()?;
    parent.join("vendor").exists().then(|| parent.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn fake_device(root: &Path, bdf: &str, vendor: u16, device: u16, sub: u16) -> PathBuf {
        let d = root.join("bus/pci/devices").join(bdf);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("vendor"), format!("0x{vendor:04x}\n")).unwrap();
        fs::write(d.join("device"), format!("0x{device:04x}\n")).unwrap();
        fs::write(d.join("subsystem_device"), format!("0x{sub:04x}\n")).unwrap();
        d
    }

    #[test]
    fn discovery_reads_ids_bars_and_config() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let iv = fake_device(root, "0000:00:05.0", 0x1af4, 0x1110, 0x1100);
        fs::write(
            iv.join("resource"),
            "0x00000000fe000000 0x00000000fe0000ff 0x0000000000040200\n\
             0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
             0x00000000f8000000 0x00000000fbffffff 0x000000000014220c\n",
        )
        .unwrap();
        let net = fake_device(root, "0000:00:04.0", 0x1af4, 0x1000, 1);
        fake_device(root, "0000:00:03.0", 0x1af4, 0x1000, 2); // transitional blk
        fake_device(root, "0000:00:06.0", 0x1af4, 0x1041, 0x1100);
        let mut cfg = vec![0u8; 64];
        cfg[4] = 0x07;
        fs::write(net.join("config"), &cfg).unwrap();
        let devs = devices(root);
        assert_eq!(devs.len(), 4);
        let nets: Vec<&str> = devs
            .iter()
            .filter(|d| d.is_virtio_net())
            .map(|d| d.bdf.as_str())
            .collect();
        assert_eq!(nets, ["0000:00:04.0", "0000:00:06.0"]);
        let ivd = devs.iter().find(|d| d.is_ivshmem()).unwrap();
        assert_eq!(ivd.bar(2).unwrap(), (0xf800_0000, 64 << 20));
        assert!(ivd.bar(1).is_err());
        assert!(ivd.bar(5).is_err());
        let n = devs.iter().find(|d| d.bdf == "0000:00:04.0").unwrap();
        assert_eq!(n.command().unwrap(), 7);
        n.set_command(0x0406).unwrap();
        assert_eq!(n.command().unwrap(), 0x0406);
        assert_eq!(n.driver(), None);
        n.unbind().unwrap();
    }
}
