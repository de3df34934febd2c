//! A cluster's state in the daemon: the pool, the queues, who holds which
//! queue role, and the buffers nobody holds.
//!
//! Pool, queue area and owner table live in files that outlive the daemon
//! (the queue area and owner table beside the cluster lock, in
//! `/dev/shm/zc/<cluster>/`), so a daemon started after one that died
//! adopts them (`Cluster::open`): VMs keep the pool they map, packets
//! waiting in the queues stay there, buffers the guests hold stay theirs.
//! What the dead daemon held in its own hands is found by elimination
//! (neither in a ring nor a guest's) and goes back to the spare list.

use crate::control::{ClusterInfo, Role};
use crate::handover::{HandedExport, Handover, PortHands};
use crate::owner::OwnerTable;
use crate::paths::{self, Owned};
use crate::pool::{Backing, Pool, PoolError, PoolOptions};
use crate::queues::{QueueArea, QueueError, QueueGeometry};
use crate::stats::BufferUse;
use std::sync::Arc;
use thiserror::Error;
use zc_proto::{BufferIndex, PoolLayout};

/// Most buffers one connection may take at start-up.
pub const MAX_ALLOC: u32 = 65536;

/// Identifies one control connection.
pub type ConnId = u64;

#[derive(Debug, Error)]
pub enum CreateError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Queues(#[from] QueueError),
    #[error(transparent)]
    Path(#[from] crate::paths::PathError),
    #[error("cannot create the owner table {}: {source}", path.display())]
    Owners {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// What a daemon took over from one of the cluster that died.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Adopted {
    /// Buffers in the queues' rings (empty or holding packets).
    pub in_queues: usize,
    /// Buffers the exports' guests hold.
    pub in_guests: usize,
    /// Buffers back in the spare list: the dead daemon's hands and spares,
    /// and whatever its processes held.
    pub spare: usize,
    /// Ring slots that named no valid or an already counted buffer.
    pub repaired: usize,
    /// A graceful restart: the predecessor handed over its exports' hands,
    /// with this many buffers holding this many packets (`None`: it died).
    pub handed: Option<(usize, usize)>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AttachError {
    #[error("queue {queue} does not exist: cluster {cluster} has queues 0..{}", queues - 1)]
    QueueRange {
        cluster: u32,
        queue: u16,
        queues: u16,
    },
    #[error("queue {queue} of cluster {cluster} already has a {role} (pid {pid}); stop it first or use another queue")]
    RoleTaken {
        cluster: u32,
        queue: u16,
        role: Role,
        pid: u32,
    },
    #[error("queue {queue} of cluster {cluster} is the {role} side of the vhost-user export {export}; use another queue or drop that --export")]
    HeldByExport {
        cluster: u32,
        queue: u16,
        role: Role,
        export: String,
    },
    #[error("queue {queue} of cluster {cluster} is the {role} side of the interface port {port}; use another queue or remove that port")]
    HeldByNic {
        cluster: u32,
        queue: u16,
        role: Role,
        port: String,
    },
    #[error("queue {queue} of cluster {cluster} is the {role} side of port {port}; use another queue or remove that port")]
    HeldByPort {
        cluster: u32,
        queue: u16,
        role: Role,
        port: String,
    },
    #[error("cannot hand out {wanted} buffers: at most {MAX_ALLOC} per process")]
    AllocTooLarge { wanted: u32 },
    #[error(
        "cluster {cluster} has only {spare} spare buffers for the {wanted} asked; buffers held by processes \
         that exited return when every process has detached (or start zc-hostd with more --buffers)"
    )]
    NoSpare {
        cluster: u32,
        wanted: u32,
        spare: u32,
    },
}

/// What kind of port on the workers holds a queue role: it names the
/// holder in the refusal another attacher gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortKind {
    /// An interface port (`--nic`).
    Interface,
    /// A reflector or a balancer.
    Other,
}

#[derive(Clone, Debug)]
enum Holder {
    Process {
        conn: ConnId,
        pid: u32,
    },
    /// A vhost-user export's poll thread.
    Export {
        name: String,
    },
    /// An interface port (`--nic`), named `nic:<ifname>@<queue>`.
    Nic {
        name: String,
    },
    /// Another port on the workers (`reflect:<in>`, `balance:...`), by name.
    Port {
        name: String,
    },
}

/// Something in the daemon that holds buffers outside the rings: the
/// workers, whose ports have hands and lend buffers to guests. A reclaim
/// must not free what they hold.
pub trait BufferHolder: Send + Sync {
    /// Stops touching rings and buffers and returns every buffer held; the
    /// holder stays still until the returned value is dropped. `None` if it
    /// could not stop in time (then nothing is reclaimed).
    fn pause(&self) -> Option<Held>;
    fn name(&self) -> String;
}

/// What a paused holder holds; dropping it lets the holder go on.
pub struct Held {
    pub buffers: Vec<BufferIndex>,
    pub resume: Box<dyn Send>,
}

pub struct Cluster {
    pool: Arc<Pool>,
    queues: Arc<QueueArea>,
    spare: Vec<BufferIndex>,
    roles: Vec<[Option<Holder>; 2]>,
    /// Which export's guest holds which buffer (host-private).
    owners: Arc<OwnerTable>,
    holders: Vec<Arc<dyn BufferHolder>>,
    /// Connections that took buffers or a role and have not closed.
    active: std::collections::BTreeMap<ConnId, u32>,
    /// Buffers that left with processes that exited while others stayed.
    stranded: u64,
    /// The queue area's and owner table's files.
    state_files: Vec<Owned>,
    /// What a predecessor's exports held at a graceful restart, until the
    /// exports of those slots start again (`take_handed`).
    handed: Vec<HandedExport>,
}

/// Where a cluster's host-private files live: beside its lock.
pub fn state_dir(pool_opts: &PoolOptions) -> std::path::PathBuf {
    pool_opts
        .fallback_dir
        .join("zc")
        .join(pool_opts.layout.cluster_id.to_string())
}

const QUEUES_FILE: &str = "queues";
const OWNERS_FILE: &str = "owners";

fn role_slot(role: Role) -> usize {
    match role {
        Role::Producer => 0,
        Role::Consumer => 1,
    }
}

impl Cluster {
    /// A new cluster: a fresh pool, rings full of empty buffers, nobody
    /// holding anything. Leftovers of a daemon that died are replaced.
    pub fn create(pool_opts: &PoolOptions, geometry: QueueGeometry) -> Result<Self, CreateError> {
        let layout: PoolLayout = pool_opts.layout;
        geometry.check(&layout)?;
        let id = layout.cluster_id.to_string();
        let dir = paths::make_dirs(
            "cluster state directory",
            &pool_opts.fallback_dir,
            &["zc", &id],
        )?;
        let pool = Pool::create(pool_opts)?;
        let in_rings = usize::from(geometry.queue_count) * geometry.ring_size as usize;
        let all: Vec<BufferIndex> = (0..layout.buf_count).map(BufferIndex::new).collect();
        let mut state_files = Vec::new();
        let made = (|| {
            let qpath = dir.join(QUEUES_FILE);
            let queues = QueueArea::create(&qpath, geometry, &layout, &all[..in_rings]);
            if let Ok(o) = Owned::record(&qpath) {
                state_files.push(o);
            }
            let queues = queues?;
            let opath = dir.join(OWNERS_FILE);
            let owners = OwnerTable::create(&opath, layout.buf_count).map_err(|source| {
                CreateError::Owners {
                    path: opath.clone(),
                    source,
                }
            });
            if let Ok(o) = Owned::record(&opath) {
                state_files.push(o);
            }
            Ok::<_, CreateError>((queues, owners?))
        })();
        let (queues, owners) = match made {
            Ok(x) => x,
            Err(e) => {
                for f in &state_files {
                    f.remove();
                }
                pool.remove();
                return Err(e);
            }
        };
        // Popped from the end: hand out low indices first.
        let spare = all[in_rings..].iter().rev().copied().collect();
        Ok(Self::assemble(
            pool,
            queues,
            owners,
            spare,
            geometry,
            state_files,
        ))
    }

    fn assemble(
        pool: Pool,
        queues: QueueArea,
        owners: OwnerTable,
        spare: Vec<BufferIndex>,
        geometry: QueueGeometry,
        state_files: Vec<Owned>,
    ) -> Self {
        Cluster {
            pool: Arc::new(pool),
            queues: Arc::new(queues),
            spare,
            roles: vec![[None, None]; usize::from(geometry.queue_count)],
            owners: Arc::new(owners),
            holders: Vec::new(),
            active: Default::default(),
            stranded: 0,
            state_files,
            handed: Vec::new(),
        }
    }

    /// The cluster a daemon that died left behind, taken over as it is, if
    /// its pool, queue area and owner table are all there and fit these
    /// options; else a new one (`create`). The caller holds the cluster
    /// lock: files of the cluster that are there belong to no running daemon.
    pub fn open(
        pool_opts: &PoolOptions,
        geometry: QueueGeometry,
    ) -> Result<(Self, Option<Adopted>), CreateError> {
        geometry.check(&pool_opts.layout)?;
        match Self::adopt(pool_opts, geometry) {
            Some((c, a)) => Ok((c, Some(a))),
            None => {
                Handover::remove(&state_dir(pool_opts));
                if state_dir(pool_opts).join(QUEUES_FILE).exists() {
                    log::warn!(
                        "the cluster {} a zc-hostd that died left behind does not fit these options \
                         (--queues, --queue-len, --buffers, --buf-size): it is replaced by a new one, \
                         and VMs on its pool must be restarted",
                        pool_opts.layout.cluster_id
                    );
                }
                Ok((Self::create(pool_opts, geometry)?, None))
            }
        }
    }

    fn adopt(pool_opts: &PoolOptions, geometry: QueueGeometry) -> Option<(Self, Adopted)> {
        let layout = pool_opts.layout;
        let dir = state_dir(pool_opts);
        let (qpath, opath) = (dir.join(QUEUES_FILE), dir.join(OWNERS_FILE));
        let queues = QueueArea::adopt(&qpath, geometry, &layout)?;
        let owners = OwnerTable::adopt(&opath, layout.buf_count)?;
        let pool = Pool::adopt(pool_opts)?;
        let state_files = vec![Owned::record(&qpath).ok()?, Owned::record(&opath).ok()?];
        let count = layout.buf_count as usize;
        // The rings first: a slot is the truth about its buffer (the ring
        // protocol leaves every slot whole whenever a side dies).
        let mut used = vec![false; count];
        let mut broken = Vec::new();
        let mut in_queues = 0;
        for q in 0..geometry.queue_count {
            for (i, slot) in queues.contents(q).into_iter().enumerate() {
                match slot {
                    Some(b) if !used[b.get() as usize] => {
                        used[b.get() as usize] = true;
                        in_queues += 1;
                    }
                    _ => broken.push((q, i as u32)),
                }
            }
        }
        let mut in_guests = 0;
        for (b, _) in owners.all_guest_buffers() {
            if std::mem::replace(&mut used[b.get() as usize], true) {
                // In a ring as well: the ring wins.
                owners.take_from_guest(b);
            } else {
                in_guests += 1;
            }
        }
        // A graceful restart: the hands of the predecessor's exports, each
        // taken whole or (naming a buffer out of range or counted already)
        // not at all.
        let handover = Handover::take(&dir);
        let graceful = handover.is_some();
        let mut handed = handover.map(|h| h.exports).unwrap_or_default();
        let (mut in_hands, mut packets) = (0, 0);
        for e in &mut handed {
            let bufs: Vec<u32> = e.hands.buffers().collect();
            let fits = bufs.iter().all(|&b| (b as usize) < count)
                && bufs
                    .iter()
                    .enumerate()
                    .all(|(i, b)| !used[*b as usize] && !bufs[..i].contains(b));
            if !fits {
                log::warn!(
                    "the handover of export {} names buffers that are elsewhere; its hands are found by elimination",
                    e.path.display()
                );
                e.hands = PortHands::default();
                continue;
            }
            for b in bufs {
                used[b as usize] = true;
                in_hands += 1;
            }
            packets += e.hands.packets();
        }
        let mut spare: Vec<BufferIndex> = (0..count as u32)
            .rev()
            .filter(|&i| !used[i as usize])
            .map(BufferIndex::new)
            .collect();
        let mut repaired = 0;
        for (q, i) in &broken {
            if let Some(b) = spare.pop() {
                queues.repair_slot(*q, *i, b);
                in_queues += 1;
                repaired += 1;
            }
        }
        let adopted = Adopted {
            in_queues,
            in_guests,
            spare: spare.len(),
            repaired,
            handed: graceful.then_some((in_hands, packets)),
        };
        let mut c = Self::assemble(pool, queues, owners, spare, geometry, state_files);
        c.handed = handed;
        Some((c, adopted))
    }

    /// After an adoption, the exports that run again are known: buffers
    /// held by guests of any other slot (an export that was not started
    /// again) come back to the spare list. Returns how many.
    pub fn release_guests_except(&mut self, slots: &[usize]) -> usize {
        let mut n = 0;
        for (b, slot) in self.owners.all_guest_buffers() {
            if !slots.contains(&slot) {
                self.owners.take_from_guest(b);
                self.spare.push(b);
                n += 1;
            }
        }
        n
    }

    /// The hands the predecessor's export in `slot` on socket `path`
    /// handed over (a graceful restart), for the export starting there.
    pub fn take_handed(&mut self, slot: usize, path: &std::path::Path) -> Option<PortHands> {
        let e = self
            .handed
            .iter_mut()
            .find(|e| e.slot == slot && e.path == path)?;
        Some(std::mem::take(&mut e.hands))
    }

    /// The exports `attach` had added before a graceful restart, to be
    /// started again in their slots.
    pub fn handed_attachments(&self) -> Vec<HandedExport> {
        self.handed
            .iter()
            .filter(|e| e.attached.is_some())
            .cloned()
            .collect()
    }

    /// Hands that no export took over go back to the spare list (their
    /// exports were not started again): returns (buffers, packets lost).
    pub fn release_handed(&mut self) -> (usize, usize) {
        let (mut n, mut lost) = (0, 0);
        for e in std::mem::take(&mut self.handed) {
            lost += e.hands.packets();
            for b in e.hands.buffers() {
                self.spare.push(BufferIndex::new(b));
                n += 1;
            }
        }
        (n, lost)
    }

    pub fn id(&self) -> u32 {
        self.pool.layout().cluster_id
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    pub fn queues(&self) -> &Arc<QueueArea> {
        &self.queues
    }

    pub fn info(&self) -> ClusterInfo {
        let l = self.pool.layout();
        let g = self.queues.geometry();
        ClusterInfo {
            cluster: l.cluster_id,
            queues: g.queue_count,
            ring_size: g.ring_size,
            buf_size: l.buf_size,
            buf_count: l.buf_count,
            pool_size: l.pool_size,
            pool_path: self.pool.path().display().to_string(),
            hugepages: matches!(self.pool.backing(), Backing::Hugepages),
            daemon_pid: std::process::id(),
            spare_buffers: self.spare.len() as u32,
        }
    }

    /// Gives `role` on `queue` to `holder`, unless someone holds it already.
    fn take_role(&mut self, queue: u16, role: Role, holder: Holder) -> Result<(), AttachError> {
        let cluster = self.id();
        let queues = self.queues.geometry().queue_count;
        let slot = self
            .roles
            .get_mut(usize::from(queue))
            .ok_or(AttachError::QueueRange {
                cluster,
                queue,
                queues,
            })?;
        if let Some(h) = &slot[role_slot(role)] {
            return Err(match h {
                Holder::Process { pid, .. } => AttachError::RoleTaken {
                    cluster,
                    queue,
                    role,
                    pid: *pid,
                },
                Holder::Nic { name } => AttachError::HeldByNic {
                    cluster,
                    queue,
                    role,
                    port: name.clone(),
                },
                Holder::Port { name } => AttachError::HeldByPort {
                    cluster,
                    queue,
                    role,
                    port: name.clone(),
                },
                Holder::Export { name } => AttachError::HeldByExport {
                    cluster,
                    queue,
                    role,
                    export: name.clone(),
                },
            });
        }
        slot[role_slot(role)] = Some(holder);
        Ok(())
    }

    pub fn attach(
        &mut self,
        conn: ConnId,
        pid: u32,
        queue: u16,
        role: Role,
    ) -> Result<(), AttachError> {
        self.take_role(queue, role, Holder::Process { conn, pid })?;
        self.active.entry(conn).or_insert(0);
        log::info!("pid {pid} attached to queue {queue} as {role}");
        Ok(())
    }

    pub fn alloc(&mut self, conn: ConnId, count: u32) -> Result<Vec<u32>, AttachError> {
        if count > MAX_ALLOC {
            return Err(AttachError::AllocTooLarge { wanted: count });
        }
        if count as usize > self.spare.len() {
            return Err(AttachError::NoSpare {
                cluster: self.id(),
                wanted: count,
                spare: self.spare.len() as u32,
            });
        }
        let at = self.spare.len() - count as usize;
        let out = self
            .spare
            .split_off(at)
            .into_iter()
            .rev()
            .map(BufferIndex::get)
            .collect();
        *self.active.entry(conn).or_insert(0) += count;
        Ok(out)
    }

    /// A connection closed: release its roles; when nothing is attached any
    /// more, take back every buffer that is not in a ring.
    pub fn release(&mut self, conn: ConnId) {
        for (q, slot) in self.roles.iter_mut().enumerate() {
            for (r, h) in slot.iter_mut().enumerate() {
                if let Some(Holder::Process { conn: c, pid }) = h {
                    if *c != conn {
                        continue;
                    }
                    let role = if r == 0 {
                        Role::Producer
                    } else {
                        Role::Consumer
                    };
                    log::info!("pid {pid} detached from queue {q} ({role})");
                    *h = None;
                }
            }
        }
        if let Some(n) = self.active.remove(&conn) {
            self.stranded += u64::from(n);
        }
        if self.active.is_empty() && self.stranded > 0 {
            self.reclaim();
        }
    }

    /// Rebuilds the spare list from the rings while no process is attached:
    /// every buffer not in a ring is free. Duplicate or corrupt slots (a
    /// process killed mid-swap cannot cause them, memory corruption could)
    /// are repaired with a spare buffer.
    fn reclaim(&mut self) {
        let count = self.pool.layout().buf_count as usize;
        let mut in_ring = vec![false; count];
        // Ports keep running while processes come and go: park them so
        // their hands hold still, and keep everything they hold.
        let mut paused: Vec<Held> = Vec::new();
        for h in &self.holders {
            match h.pause() {
                Some(held) => {
                    for b in &held.buffers {
                        if let Some(x) = in_ring.get_mut(b.get() as usize) {
                            *x = true;
                        }
                    }
                    paused.push(held);
                }
                None => {
                    log::warn!(
                        "{} did not pause; buffers of exited processes stay stranded",
                        h.name()
                    );
                    return;
                }
            }
        }
        let mut broken = Vec::new();
        for q in 0..self.queues.geometry().queue_count {
            for (i, slot) in self.queues.contents(q).into_iter().enumerate() {
                match slot {
                    Some(b) if !in_ring[b.get() as usize] => in_ring[b.get() as usize] = true,
                    _ => broken.push((q, i as u32)),
                }
            }
        }
        let mut free: Vec<BufferIndex> = (0..count as u32)
            .rev()
            .filter(|&i| !in_ring[i as usize])
            .map(BufferIndex::new)
            .collect();
        for (q, i) in &broken {
            if let Some(b) = free.pop() {
                self.queues.repair_slot(*q, *i, b);
            }
        }
        if !broken.is_empty() {
            log::warn!("repaired {} corrupt queue slots", broken.len());
        }
        log::info!(
            "all processes detached: {} buffers back in the spare list (was {})",
            free.len(),
            self.spare.len()
        );
        self.spare = free;
        self.stranded = 0;
        drop(paused);
    }

    /// An export takes `role` on `queue` until it is removed.
    pub fn attach_export(&mut self, name: &str, queue: u16, role: Role) -> Result<(), AttachError> {
        self.take_role(queue, role, Holder::Export { name: name.into() })
    }

    /// Port `name` (of `kind`) takes every `(queue, role)` of `roles` and
    /// `buffers` spare buffers: all or nothing.
    pub fn claim_port(
        &mut self,
        kind: PortKind,
        name: &str,
        roles: &[(u16, Role)],
        buffers: u32,
    ) -> Result<Vec<BufferIndex>, AttachError> {
        for (i, &(q, role)) in roles.iter().enumerate() {
            let holder = match kind {
                PortKind::Interface => Holder::Nic { name: name.into() },
                PortKind::Other => Holder::Port { name: name.into() },
            };
            if let Err(e) = self.take_role(q, role, holder) {
                self.detach_port(name, &roles[..i]);
                return Err(e);
            }
        }
        self.take_spare(buffers)
            .inspect_err(|_| self.detach_port(name, roles))
    }

    /// Port `name` no longer holds the roles it took (`(queue, role)`s).
    pub fn detach_port(&mut self, name: &str, roles: &[(u16, Role)]) {
        for &(q, role) in roles {
            let Some(slot) = self.roles.get_mut(usize::from(q)) else {
                continue;
            };
            let r = &mut slot[role_slot(role)];
            if matches!(r, Some(Holder::Nic { name: n } | Holder::Port { name: n }) if n == name) {
                *r = None;
            }
        }
    }

    /// Buffers for an export (its hands and its guest's stock), from the spare list.
    pub fn take_spare(&mut self, count: u32) -> Result<Vec<BufferIndex>, AttachError> {
        if count as usize > self.spare.len() {
            return Err(AttachError::NoSpare {
                cluster: self.id(),
                wanted: count,
                spare: self.spare.len() as u32,
            });
        }
        let at = self.spare.len() - count as usize;
        Ok(self.spare.split_off(at).into_iter().rev().collect())
    }

    /// `h` holds buffers outside the rings from now on (until the cluster goes).
    pub fn add_buffer_holder(&mut self, h: Arc<dyn BufferHolder>) {
        self.holders.push(h);
    }

    /// An export is removed (or failed to start): it no longer holds its
    /// queue roles (rx: consumer, tx: producer, taken under `name`).
    pub fn detach_export(&mut self, name: &str, rx: Option<u16>, tx: Option<u16>) {
        for (q, role) in [(rx, Role::Consumer), (tx, Role::Producer)] {
            let Some(slot) = q.and_then(|q| self.roles.get_mut(usize::from(q))) else {
                continue;
            };
            let r = &mut slot[role_slot(role)];
            if matches!(r, Some(Holder::Export { name: n }) if n == name) {
                *r = None;
            }
        }
    }

    /// Buffers an export held come back (it was removed).
    pub fn give_spare(&mut self, bufs: Vec<BufferIndex>) {
        self.spare.extend(bufs);
    }

    pub fn owners(&self) -> &Arc<OwnerTable> {
        &self.owners
    }

    pub fn spare_count(&self) -> usize {
        self.spare.len()
    }

    /// Where the buffers are. The ports' share is what the others do not
    /// hold: the ports keep their counts constant (every exchange is one
    /// for one) without telling the cluster about each.
    pub fn buffer_use(&self) -> BufferUse {
        let total = u64::from(self.pool.layout().buf_count);
        let g = self.queues.geometry();
        let queues = u64::from(g.queue_count) * u64::from(g.ring_size);
        let spare = self.spare.len() as u64;
        let processes: u64 = self.active.values().map(|&n| u64::from(n)).sum();
        let stranded = self.stranded;
        BufferUse {
            total,
            spare,
            queues,
            processes,
            ports: total.saturating_sub(spare + queues + processes + stranded),
            stranded,
        }
    }

    /// Deletes the pool file, the queue area and the owner table (at
    /// shutdown).
    pub fn remove_files(&self) {
        for f in &self.state_files {
            f.remove();
        }
        self.pool.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zc_proto::BufferHandle;

    fn cluster(dir: &std::path::Path) -> Cluster {
        let layout = PoolLayout::new(7, 2048, 1024).unwrap();
        let opts = PoolOptions {
            layout,
            hugepages_dir: dir.join("none"),
            fallback_dir: dir.to_path_buf(),
            force_fallback: true,
        };
        Cluster::create(
            &opts,
            QueueGeometry {
                queue_count: 2,
                ring_size: 256,
            },
        )
        .unwrap()
    }

    fn options(dir: &std::path::Path) -> (PoolOptions, QueueGeometry) {
        (
            PoolOptions {
                layout: PoolLayout::new(7, 2048, 1024).unwrap(),
                hugepages_dir: dir.join("none"),
                fallback_dir: dir.to_path_buf(),
                force_fallback: true,
            },
            QueueGeometry {
                queue_count: 2,
                ring_size: 256,
            },
        )
    }

    fn inode(p: &std::path::Path) -> u64 {
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap())
    }

    #[test]
    fn a_cluster_left_by_a_dead_daemon_is_taken_over_with_its_packets_and_guest_buffers() {
        let dir = tempfile::tempdir().unwrap();
        let (opts, geometry) = options(dir.path());
        let (mut c, adopted) = Cluster::open(&opts, geometry).unwrap();
        assert_eq!(adopted, None, "nothing to take over");
        // A process holds 100 buffers and sends one packet into queue 1; a
        // guest of export 2 holds 3 buffers.
        c.attach(1, 100, 1, Role::Producer).unwrap();
        let mut held: Vec<BufferHandle> = c
            .alloc(1, 100)
            .unwrap()
            .into_iter()
            // SAFETY: allocated to this test alone.
            .map(|i| unsafe { BufferHandle::from_raw(BufferIndex::new(i), 0) })
            .collect();
        let view = c.pool().view().clone();
        view.packet_mut(&mut held[0]).fill(b"survives").unwrap();
        let mut p = c.queues().producer(1);
        assert_eq!(p.send_burst(&mut held[..1]), 1);
        let guest = c.take_spare(3).unwrap();
        for b in &guest {
            c.owners().give_to_guest(*b, 2);
        }
        let pool = c.pool().path().to_path_buf();
        let ino = inode(&pool);
        drop(c); // killed: nothing is removed
        let (mut c, adopted) = Cluster::open(&opts, geometry).unwrap();
        assert_eq!(
            adopted,
            Some(Adopted {
                in_queues: 512,
                in_guests: 3,
                spare: 1024 - 512 - 3,
                repaired: 0,
                handed: None
            }),
            "the process's buffers and the old spares are spare again"
        );
        assert_eq!(c.spare_count(), 509);
        assert_eq!(inode(&pool), ino, "the same pool file");
        assert_eq!(c.owners().guest_buffers(2), guest);
        let mut got = c.take_spare(1).unwrap();
        // SAFETY: taken from the spare list for this test.
        let mut h = [unsafe { BufferHandle::from_raw(got.remove(0), 0) }];
        assert_eq!(c.queues().consumer(1).recv_burst(&mut h), 1);
        assert_eq!(c.pool().view().packet(&h[0]).to_vec(), b"survives");
        // Export 2 does not start again: its guest's buffers come back.
        assert_eq!(c.release_guests_except(&[0]), 3);
        assert_eq!(c.spare_count(), 508 + 3);
        drop(c);
        // Other options: a new cluster.
        let other = QueueGeometry {
            queue_count: 1,
            ..geometry
        };
        let (c, adopted) = Cluster::open(&opts, other).unwrap();
        assert_eq!(adopted, None);
        assert_eq!(c.spare_count(), 1024 - 256);
        c.remove_files();
        assert!(
            !dir.path().join("zc/7").exists(),
            "pool, queue area and owner table are gone"
        );
    }

    #[test]
    fn a_graceful_handover_keeps_the_hands_out_of_the_spare_list() {
        use crate::handover::HandedExport;
        let dir = tempfile::tempdir().unwrap();
        let (opts, geometry) = options(dir.path());
        let (mut c, _) = Cluster::open(&opts, geometry).unwrap();
        let hands: Vec<u32> = c.take_spare(4).unwrap().iter().map(|b| b.get()).collect();
        drop(c);
        let exports = vec![
            HandedExport {
                slot: 0,
                path: "/tmp/a.sock".into(),
                hands: PortHands {
                    rx_packets: vec![(hands[0], 60)],
                    rx_empty: vec![hands[1]],
                    tx_pending: vec![(hands[2], 70)],
                    tx_empty: vec![],
                },
                attached: None,
            },
            // Names a buffer that is in a ring: not taken over.
            HandedExport {
                slot: 1,
                path: "/tmp/b.sock".into(),
                hands: PortHands {
                    rx_empty: vec![hands[3], 0],
                    ..Default::default()
                },
                attached: None,
            },
        ];
        Handover { exports }.write(&state_dir(&opts)).unwrap();
        let (mut c, adopted) = Cluster::open(&opts, geometry).unwrap();
        let a = adopted.unwrap();
        assert_eq!(a.handed, Some((3, 2)));
        assert_eq!(c.spare_count(), 512 - 3);
        assert!(!Handover::path(&state_dir(&opts)).exists(), "read once");
        assert_eq!(c.take_handed(1, "/tmp/a.sock".as_ref()), None, "wrong slot");
        let h = c.take_handed(0, "/tmp/a.sock".as_ref()).unwrap();
        assert_eq!(h.rx_packets, [(hands[0], 60)]);
        assert_eq!(c.release_handed(), (0, 0), "slot 1's hands were refused");
        drop(c);
        // A crash after this: no handover, the hands are spare again.
        let (c, adopted) = Cluster::open(&opts, geometry).unwrap();
        assert_eq!(adopted.unwrap().handed, None);
        assert_eq!(c.spare_count(), 512);
        c.remove_files();
    }

    #[test]
    fn roles_are_exclusive_and_released_on_close() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cluster(dir.path());
        c.attach(1, 100, 0, Role::Consumer).unwrap();
        c.attach(2, 200, 0, Role::Producer).unwrap();
        assert_eq!(
            c.attach(3, 300, 0, Role::Consumer),
            Err(AttachError::RoleTaken {
                cluster: 7,
                queue: 0,
                role: Role::Consumer,
                pid: 100
            })
        );
        assert_eq!(
            c.attach(3, 300, 2, Role::Consumer).unwrap_err().to_string(),
            "queue 2 does not exist: cluster 7 has queues 0..1"
        );
        c.release(1);
        c.attach(3, 300, 0, Role::Consumer).unwrap();
        c.remove_files();
    }

    #[test]
    fn buffers_of_exited_processes_return_when_all_detach() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cluster(dir.path());
        assert_eq!(c.spare_count(), 512);
        c.attach(1, 100, 0, Role::Producer).unwrap();
        let a = c.alloc(1, 500).unwrap();
        assert_eq!(a.len(), 500);
        assert!(
            a.iter().all(|&i| i >= 512),
            "ring buffers are not handed out twice"
        );
        c.attach(2, 200, 0, Role::Consumer).unwrap();
        assert!(matches!(
            c.alloc(2, 13),
            Err(AttachError::NoSpare { spare: 12, .. })
        ));
        c.release(1);
        assert_eq!(
            c.spare_count(),
            12,
            "producer gone but the consumer is still attached"
        );
        c.release(2);
        assert_eq!(c.spare_count(), 512);
        assert!(matches!(
            c.alloc(3, MAX_ALLOC + 1),
            Err(AttachError::AllocTooLarge { .. })
        ));
        c.remove_files();
    }

    struct FakeExport {
        held: Vec<BufferIndex>,
        pauses: std::sync::atomic::AtomicU32,
        resumes: Arc<std::sync::atomic::AtomicU32>,
        refuse: bool,
    }

    /// Counts a resume when the pause ends.
    struct Resume(Arc<std::sync::atomic::AtomicU32>);
    impl Drop for Resume {
        fn drop(&mut self) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    impl BufferHolder for FakeExport {
        fn pause(&self) -> Option<Held> {
            self.pauses
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            (!self.refuse).then(|| Held {
                buffers: self.held.clone(),
                resume: Box::new(Resume(self.resumes.clone())),
            })
        }
        fn name(&self) -> String {
            "fake".into()
        }
    }

    #[test]
    fn reclaim_never_frees_what_an_export_holds() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cluster(dir.path());
        c.attach_export("/tmp/vm.sock", 1, Role::Consumer).unwrap();
        assert_eq!(
            c.attach(9, 900, 1, Role::Consumer).unwrap_err().to_string(),
            "queue 1 of cluster 7 is the consumer side of the vhost-user export /tmp/vm.sock; use another queue or drop that --export"
        );
        assert!(matches!(
            c.attach_export("/tmp/other.sock", 1, Role::Consumer),
            Err(AttachError::HeldByExport { .. })
        ));
        let held = c.take_spare(40).unwrap();
        assert_eq!(c.spare_count(), 472);
        let fake = Arc::new(FakeExport {
            held: held.clone(),
            pauses: Default::default(),
            resumes: Default::default(),
            refuse: false,
        });
        c.add_buffer_holder(fake.clone());
        c.attach(1, 100, 0, Role::Producer).unwrap();
        c.alloc(1, 100).unwrap();
        c.release(1);
        assert_eq!(c.spare_count(), 472, "the export's 40 stay taken");
        assert!(c.spare.iter().all(|b| !held.contains(b)));
        assert_eq!(fake.pauses.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(fake.resumes.load(std::sync::atomic::Ordering::Relaxed), 1);
        // An export that cannot pause: nothing is reclaimed (never a guess).
        let stuck = Arc::new(FakeExport {
            held: vec![],
            pauses: Default::default(),
            resumes: Default::default(),
            refuse: true,
        });
        c.add_buffer_holder(stuck);
        c.attach(2, 200, 0, Role::Producer).unwrap();
        c.alloc(2, 10).unwrap();
        c.release(2);
        assert_eq!(c.spare_count(), 462);
        assert_eq!(fake.resumes.load(std::sync::atomic::Ordering::Relaxed), 2);
        c.remove_files();
    }

    #[test]
    fn rings_must_leave_spare_buffers() {
        let dir = tempfile::tempdir().unwrap();
        let layout = PoolLayout::new(7, 2048, 1024).unwrap();
        let opts = PoolOptions {
            layout,
            hugepages_dir: dir.path().join("none"),
            fallback_dir: dir.path().to_path_buf(),
            force_fallback: true,
        };
        let e = Cluster::create(
            &opts,
            QueueGeometry {
                queue_count: 4,
                ring_size: 256,
            },
        )
        .err()
        .unwrap();
        assert_eq!(
            e.to_string(),
            "4 queues of 256 slots need 2048 buffers, the pool has 1024: add --buffers or lower --queue-len"
        );
        assert!(!dir.path().join("zc/7/pool").exists());
    }
}
