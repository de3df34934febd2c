//! Exports attached to running VMs (`zc-hostd attach` and `detach`): the
//! export on the host side, the pool and a virtio-net device in the VM
//! (over QEMU's QMP socket or through libvirt: `vmlink`), and the list of
//! attachments `zc-hostd stats` shows. The bookkeeping, rollback and
//! errors are the same whichever way the VM is reached.

use super::registry::{ExportError, Registry};
pub use crate::control::{AttachmentInfo, Detached, VmRef};
use crate::handover::{HandedAttachment, HandedExport};
use crate::hotplug::{NetPlug, PoolPlug, UNPLUG_TIMEOUT};
use crate::port::export::shared::ExportShared;
use crate::port::export::spec::MacDisplay;
use crate::port::export::ExportSpec;
use crate::vmlink::{self, LinkError};
use std::path::PathBuf;
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
    Link { vm: String, source: LinkError },
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
    vm: VmRef,
    /// One VM however it is named (the canonical QMP path).
    key: VmRef,
    export: Arc<ExportShared>,
}

pub struct Vms {
    registry: Arc<Registry>,
    /// `<run-dir>/<cluster>`: where attached exports' sockets live.
    dir: PathBuf,
    list: Mutex<Vec<Attachment>>,
    /// VMs whose pool device an attach added (and the last detach removes).
    pools: Mutex<Vec<VmRef>>,
    /// One attach or detach at a time: each is a sequence of QMP steps.
    op: Mutex<()>,
}

impl Attachment {
    fn is(&self, key: &VmRef, rx: Option<u16>, tx: Option<u16>) -> bool {
        self.key == *key && self.info.rx_queue == rx && self.info.tx_queue == tx
    }
}

fn key_of(vm: &VmRef) -> VmRef {
    match vm {
        VmRef::Qmp(p) => VmRef::Qmp(
            std::fs::canonicalize(p).map_or_else(|_| p.clone(), |c| c.display().to_string()),
        ),
        v => v.clone(),
    }
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
            pools: Mutex::new(Vec::new()),
            op: Mutex::new(()),
        }
    }

    /// The attachments, as a graceful restart hands them to the successor,
    /// by the slot of their export.
    pub fn handed(&self) -> Vec<(usize, HandedAttachment)> {
        let pools = lock(&self.pools);
        lock(&self.list)
            .iter()
            .map(|a| {
                (
                    a.export.slot,
                    HandedAttachment {
                        info: a.info.clone(),
                        vm: a.vm.clone(),
                        key: a.key.clone(),
                        mac: a.export.spec.mac,
                        pool_added: pools.contains(&a.key),
                    },
                )
            })
            .collect()
    }

    /// Takes back the attachments of a predecessor whose exports started
    /// again: `detach` finds them as if this daemon had made them.
    pub fn restore(&self, again: Vec<(HandedExport, Arc<ExportShared>)>) {
        let mut list = lock(&self.list);
        let mut pools = lock(&self.pools);
        for (h, export) in again {
            let Some(a) = h.attached else { continue };
            log::info!(
                "export {} attached to VM {} as device {} serves again",
                queues_text(a.info.rx_queue, a.info.tx_queue),
                a.info.vm,
                a.info.device
            );
            if a.pool_added && !pools.contains(&a.key) {
                pools.push(a.key.clone());
            }
            list.push(Attachment {
                info: a.info,
                vm: a.vm,
                key: a.key,
                export,
            });
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
    /// the VM lacks it) into the running VM `vm_ref`.
    pub fn attach(
        &self,
        vm_ref: &VmRef,
        rx: Option<u16>,
        tx: Option<u16>,
        mac: Option<[u8; 6]>,
    ) -> Result<AttachmentInfo, VmError> {
        let _op = lock(&self.op);
        let vm = vm_ref.to_string();
        let key = key_of(vm_ref);
        let queues = queues_text(rx, tx);
        if let Some(a) = lock(&self.list).iter().find(|a| a.is(&key, rx, tx)) {
            return Err(VmError::AlreadyAttached {
                vm,
                queues,
                device: a.info.device.clone(),
            });
        }
        let link_err = |source| VmError::Link {
            vm: vm.clone(),
            source,
        };
        let mut link = vmlink::open(vm_ref).map_err(link_err)?;
        link.check().map_err(link_err)?;
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
            let added = link.add_pool(&pool)?;
            let net = NetPlug {
                id: &device,
                socket: &export.spec.path,
                mac: export.mac,
            };
            if let Err(e) = link.add_net(&net) {
                if added {
                    let _ = link.remove_pool(&pool, UNPLUG_TIMEOUT);
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
                return Err(link_err(e));
            }
        };
        if pool_added {
            lock(&self.pools).push(key.clone());
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
            vm: vm_ref.clone(),
            key,
            export,
        });
        Ok(info)
    }

    /// Unplugs the export `rx`/`tx` from `vm` (and the pool when it was
    /// the VM's last one and an attach added it), stops the export and
    /// returns its buffers to the pool. A VM that is gone (its QMP socket
    /// no longer answers, libvirt has no running domain of that name) only
    /// has the host side removed.
    pub fn detach(
        &self,
        vm: &VmRef,
        rx: Option<u16>,
        tx: Option<u16>,
    ) -> Result<Detached, VmError> {
        self.detach_within(vm, rx, tx, UNPLUG_TIMEOUT)
    }

    /// At shutdown: takes every export out of its VM, so that no VM keeps
    /// a device (or a pool mapping) of a cluster that no longer exists.
    pub fn detach_all(&self, timeout: Duration) {
        let all: Vec<(VmRef, AttachmentInfo)> = lock(&self.list)
            .iter()
            .map(|a| (a.vm.clone(), a.info.clone()))
            .collect();
        for (vm, a) in all {
            match self.detach_within(&vm, a.rx_queue, a.tx_queue, timeout) {
                Ok(_) => log::info!("detached {} from VM {}", a.device, a.vm),
                Err(e) => log::warn!("{e}"),
            }
        }
    }

    fn detach_within(
        &self,
        vm_ref: &VmRef,
        rx: Option<u16>,
        tx: Option<u16>,
        timeout: Duration,
    ) -> Result<Detached, VmError> {
        let _op = lock(&self.op);
        let vm = vm_ref.to_string();
        let key = key_of(vm_ref);
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
        let link_err = |source| VmError::Link {
            vm: vm.clone(),
            source,
        };
        let (cluster, pool_path, pool_size) = self.cluster_id();
        let vm_gone = match vmlink::open(vm_ref) {
            Ok(mut link) => {
                let net = NetPlug {
                    id: &info.device,
                    socket: &export.spec.path,
                    mac: export.mac,
                };
                link.remove_net(&net, timeout).map_err(link_err)?;
                if others == 0 && lock(&self.pools).contains(&key) {
                    let pool = PoolPlug {
                        cluster,
                        path: &pool_path,
                        size: pool_size,
                    };
                    link.remove_pool(&pool, timeout).map_err(link_err)?;
                }
                None
            }
            Err(e) => match e.gone() {
                Some(why) => Some(why),
                None => return Err(link_err(e)),
            },
        };
        if others == 0 {
            lock(&self.pools).retain(|k| *k != key);
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
