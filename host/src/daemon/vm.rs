//! Exports attached to running VMs over QMP (`zc-hostd attach` and
//! `detach`): the export on the host side, the pool and a virtio-net device
//! in the VM, and the list of attachments `zc-hostd stats` shows.

use super::registry::{ExportError, Registry};
pub use crate::control::{AttachmentInfo, Detached};
use crate::hotplug::{NetPlug, PoolPlug, UNPLUG_TIMEOUT};
use crate::port::export::shared::ExportShared;
use crate::port::export::spec::MacDisplay;
use crate::port::export::ExportSpec;
use crate::qmp::{Qmp, QmpError};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use thiserror::Error;

/// The queues of an export, as the user writes them: `rx=0,tx=1`.
pub fn queues_text(rx: Option<u16>, tx: Option<u16>) -> String {
    let mut v = Vec::new();
    if let Some(q) = rx {
        v.push(format!("rx={q}"));
    }
    if let Some(q) = tx {
        v.push(format!("tx={q}"));
    }
    v.join(",")
}

#[derive(Debug, Error)]
pub enum VmError {
    #[error("VM {vm}: {source}")]
    Qmp { vm: String, source: QmpError },
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error("VM {vm} already has the export {queues} (QEMU device {device}); detach it first")]
    AlreadyAttached {
        vm: String,
        queues: String,
        device: String,
    },
    #[error("VM {vm} has no export {queues} attached by this zc-hostd; attached: {attached}")]
    NotAttached {
        vm: String,
        queues: String,
        attached: String,
    },
    #[error("VM {vm}: the device is gone but the export {queues} did not stop: {source}")]
    Stop {
        vm: String,
        queues: String,
        source: ExportError,
    },
}

struct Attachment {
    info: AttachmentInfo,
    /// The canonical QMP path: one VM however its socket is named.
    key: PathBuf,
    export: Arc<ExportShared>,
}

pub struct Vms {
    registry: Arc<Registry>,
    /// `<run-dir>/<cluster>`: where attached exports' sockets live.
    dir: PathBuf,
    list: Mutex<Vec<Attachment>>,
    /// VMs whose pool device an attach added (and the last detach removes).
    pools: Mutex<BTreeSet<PathBuf>>,
    /// One attach or detach at a time: each is a sequence of QMP steps.
    op: Mutex<()>,
}

impl Attachment {
    fn is(&self, key: &Path, rx: Option<u16>, tx: Option<u16>) -> bool {
        self.key == key && self.info.rx_queue == rx && self.info.tx_queue == tx
    }
}

fn key_of(qmp: &Path) -> PathBuf {
    std::fs::canonicalize(qmp).unwrap_or_else(|_| qmp.to_path_buf())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Vms {
    pub fn new(registry: Arc<Registry>, dir: PathBuf) -> Self {
        Vms {
            registry,
            dir,
            list: Mutex::new(Vec::new()),
            pools: Mutex::new(BTreeSet::new()),
            op: Mutex::new(()),
        }
    }

    pub fn list(&self) -> Vec<AttachmentInfo> {
        lock(&self.list).iter().map(|a| a.info.clone()).collect()
    }

    fn cluster_id(&self) -> (u32, String, u64) {
        let c = lock(self.registry.cluster());
        let info = c.info();
        (info.cluster, info.pool_path, info.pool_size)
    }

    /// Starts an export for `rx`/`tx` and hot-plugs it (and the pool, if
    /// the VM lacks it) into the VM whose QMP socket is `qmp`.
    pub fn attach(
        &self,
        qmp_path: &Path,
        rx: Option<u16>,
        tx: Option<u16>,
        mac: Option<[u8; 6]>,
    ) -> Result<AttachmentInfo, VmError> {
        let _op = lock(&self.op);
        let vm = qmp_path.display().to_string();
        let key = key_of(qmp_path);
        let queues = queues_text(rx, tx);
        if let Some(a) = lock(&self.list).iter().find(|a| a.is(&key, rx, tx)) {
            return Err(VmError::AlreadyAttached {
                vm,
                queues,
                device: a.info.device.clone(),
            });
        }
        let qmp_err = |source| VmError::Qmp {
            vm: vm.clone(),
            source,
        };
        let mut qmp = Qmp::connect(qmp_path).map_err(qmp_err)?;
        let (cluster, pool_path, pool_size) = self.cluster_id();
        let tag = queues.replace('=', "").replace(',', "-");
        let spec = ExportSpec {
            path: self.dir.join(format!("attach-{tag}.sock")),
            rx,
            tx,
            mac,
        };
        let export = self.registry.add(spec)?;
        let device = format!("zc{cluster}-{tag}");
        let plugged = (|| {
            let pool = PoolPlug {
                cluster,
                path: &pool_path,
                size: pool_size,
            };
            let added = pool.add(&mut qmp)?;
            let net = NetPlug {
                id: &device,
                socket: &export.spec.path,
                mac: export.mac,
            };
            if let Err(e) = net.add(&mut qmp) {
                if added {
                    let _ = PoolPlug::remove(&mut qmp, cluster, UNPLUG_TIMEOUT);
                }
                return Err(e);
            }
            Ok(added)
        })();
        let pool_added = match plugged {
            Ok(a) => a,
            Err(e) => {
                if let Err(stop) = self.registry.remove(&export) {
                    log::error!("{stop}");
                }
                return Err(qmp_err(e));
            }
        };
        if pool_added {
            lock(&self.pools).insert(key.clone());
        }
        let info = AttachmentInfo {
            vm,
            device,
            socket: export.spec.path.display().to_string(),
            rx_queue: rx,
            tx_queue: tx,
            mac: MacDisplay(&export.mac).to_string(),
        };
        log::info!(
            "attached export {queues} to VM {} as device {} (mac {})",
            info.vm,
            info.device,
            info.mac
        );
        lock(&self.list).push(Attachment {
            info: info.clone(),
            key,
            export,
        });
        Ok(info)
    }

    /// Unplugs the export `rx`/`tx` from the VM at `qmp` (and the pool when
    /// it was the VM's last one and an attach added it), stops the export
    /// and returns its buffers to the pool. A VM that is gone (its QMP
    /// socket no longer answers) only has the host side removed.
    pub fn detach(
        &self,
        qmp_path: &Path,
        rx: Option<u16>,
        tx: Option<u16>,
    ) -> Result<Detached, VmError> {
        self.detach_within(qmp_path, rx, tx, UNPLUG_TIMEOUT)
    }

    /// At shutdown: takes every export out of its VM, so that no VM keeps
    /// a device (or a pool mapping) of a cluster that no longer exists.
    pub fn detach_all(&self, timeout: Duration) {
        for a in self.list() {
            let vm = Path::new(&a.vm);
            match self.detach_within(vm, a.rx_queue, a.tx_queue, timeout) {
                Ok(_) => log::info!("detached {} from VM {}", a.device, a.vm),
                Err(e) => log::warn!("{e}"),
            }
        }
    }

    fn detach_within(
        &self,
        qmp_path: &Path,
        rx: Option<u16>,
        tx: Option<u16>,
        timeout: Duration,
    ) -> Result<Detached, VmError> {
        let _op = lock(&self.op);
        let vm = qmp_path.display().to_string();
        let key = key_of(qmp_path);
        let queues = queues_text(rx, tx);
        let (info, export, others) = {
            let list = lock(&self.list);
            let Some(a) = list.iter().find(|a| a.is(&key, rx, tx)) else {
                let attached: Vec<String> = list
                    .iter()
                    .map(|a| {
                        format!(
                            "{} on {}",
                            queues_text(a.info.rx_queue, a.info.tx_queue),
                            a.info.vm
                        )
                    })
                    .collect();
                return Err(VmError::NotAttached {
                    vm,
                    queues,
                    attached: if attached.is_empty() {
                        "none".into()
                    } else {
                        attached.join("; ")
                    },
                });
            };
            let others = list.iter().filter(|o| o.key == key).count() - 1;
            (a.info.clone(), a.export.clone(), others)
        };
        let qmp_err = |source| VmError::Qmp {
            vm: vm.clone(),
            source,
        };
        let (cluster, _, _) = self.cluster_id();
        let vm_gone = match Qmp::connect(qmp_path) {
            Ok(mut qmp) => {
                let net = NetPlug {
                    id: &info.device,
                    socket: &export.spec.path,
                    mac: export.mac,
                };
                net.remove(&mut qmp, timeout).map_err(qmp_err)?;
                if others == 0 && lock(&self.pools).contains(&key) {
                    PoolPlug::remove(&mut qmp, cluster, timeout).map_err(qmp_err)?;
                }
                None
            }
            Err(QmpError::Connect { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                Some(format!("its QMP socket does not answer ({source})"))
            }
            Err(e) => return Err(qmp_err(e)),
        };
        if others == 0 {
            lock(&self.pools).remove(&key);
        }
        lock(&self.list).retain(|a| !Arc::ptr_eq(&a.export, &export));
        let returned = self
            .registry
            .remove(&export)
            .map_err(|source| VmError::Stop {
                vm: vm.clone(),
                queues: queues.clone(),
                source,
            })?;
        let spare = lock(self.registry.cluster()).spare_count() as u32;
        log::info!(
            "detached export {queues} from VM {vm}: {returned} buffers back in the pool ({spare} spare)"
        );
        Ok(Detached {
            attachment: info,
            returned: returned as u32,
            spare,
            vm_gone,
        })
    }
}
