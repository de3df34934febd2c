//! Workers: a fixed set of poll threads, each running the steps of many
//! ports (OVS-DPDK's PMD threads are the model). A worker busy-polls its
//! ports while any of them moves packets; after a short idle spell it arms
//! every port's wake-ups and sleeps in `epoll_wait` on all their wake-up
//! descriptors at once, so an idle host uses no CPU.
//!
//! Ports are placed on the least loaded worker and can be moved: a port is
//! a value with every buffer it holds, taken out of one worker between two
//! steps and handed to another.

use crate::port::{Arm, Port};
pub use crate::stats::{PortLoad, WorkerStats};
use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use thiserror::Error;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use zc_proto::BufferIndex;

/// How long a worker keeps polling after the last packet before it sleeps,
/// unless told otherwise (`zc-hostd --idle-spin`): long enough to poll
/// through the gaps of steady traffic down to about 5 kpps.
pub const DEFAULT_IDLE_SPIN: Duration = Duration::from_micros(200);
/// Idle polls before the clock is even looked at.
const IDLE_POLLS: u32 = 64;
/// Longest sleep: every port is looked at again after it, wake-up or not.
const MAX_SLEEP: Duration = Duration::from_millis(500);
/// The window over which busy percentages are measured.
const WINDOW: Duration = Duration::from_secs(1);
/// How long a caller waits for a worker to answer a request.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// epoll data of the worker's own doorbell.
const INBOX: u64 = u64::MAX;

/// A port's identity among the workers (the daemon hands them out).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortId(pub u64);

#[derive(Debug, Error)]
pub enum WorkerError {
    #[error("cannot start worker {worker}: {source}")]
    Start { worker: usize, source: io::Error },
    #[error("worker {worker} did not answer within {} s", REPLY_TIMEOUT.as_secs())]
    Timeout { worker: usize },
    #[error("worker {worker} cannot wait for port {port}: {source}")]
    Register {
        worker: usize,
        port: String,
        source: io::Error,
    },
    #[error("there is no worker {worker}: this zc-hostd runs workers 0..{}", count - 1)]
    NoWorker { worker: usize, count: usize },
    #[error("no port {0} runs on the workers")]
    NoPort(String),
}

/// Cycles of a cheap, monotonic counter (the TSC on x86_64), and their
/// length, calibrated once: a worker reads it after every step that moved
/// packets, so it must cost a few nanoseconds, not a system call.
mod clock {
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    #[inline(always)]
    pub fn now() -> u64 {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: RDTSC has no preconditions on x86_64.
            unsafe { std::arch::x86_64::_rdtsc() }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            static START: OnceLock<Instant> = OnceLock::new();
            START.get_or_init(Instant::now).elapsed().as_nanos() as u64
        }
    }

    /// Cycles per second, measured against the monotonic clock once.
    pub fn hz() -> f64 {
        static HZ: OnceLock<f64> = OnceLock::new();
        *HZ.get_or_init(|| {
            let (t0, c0) = (Instant::now(), now());
            std::thread::sleep(Duration::from_millis(20));
            let (t1, c1) = (Instant::now(), now());
            (c1.wrapping_sub(c0)) as f64 / (t1 - t0).as_secs_f64().max(1e-9)
        })
    }

    pub fn cycles(d: Duration) -> u64 {
        (d.as_secs_f64() * hz()) as u64
    }
}

/// The answer to an add: the port comes back when it cannot be watched.
type Added = Result<(), (Box<dyn Port>, io::Error)>;

enum Cmd {
    Add {
        id: PortId,
        port: Box<dyn Port>,
        done: mpsc::Sender<Added>,
    },
    Take {
        id: PortId,
        reply: mpsc::Sender<Option<Box<dyn Port>>>,
    },
    /// Report every port's held buffers, then hold still until `resume`
    /// says so (or its sender is dropped).
    Pause {
        reply: mpsc::Sender<Vec<BufferIndex>>,
        resume: mpsc::Receiver<()>,
    },
    Quit,
}

/// What the worker thread publishes for `stats` (control plane: locked
/// about once a second by the worker).
#[derive(Clone, Default)]
struct Report {
    busy_pct: f64,
    ports: Vec<PortLoad>,
    sleeps: u64,
    /// While asleep: when the current window began and how much of it was
    /// busy, so that a reader sees the load fall while the worker sleeps.
    asleep: Option<(Instant, Duration)>,
}

/// The part of a worker that other threads reach.
struct Shared {
    index: usize,
    core: Option<usize>,
    inbox: Mutex<VecDeque<Cmd>>,
    seq: AtomicU64,
    bell: EventFd,
    report: Mutex<Report>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn send(&self, cmd: Cmd) {
        lock(&self.inbox).push_back(cmd);
        self.seq.fetch_add(1, Ordering::Release);
        let _ = self.bell.write(1);
    }

    fn stats(&self) -> WorkerStats {
        let r = lock(&self.report).clone();
        let busy_pct = match r.asleep {
            Some((since, busy)) => {
                100.0 * busy.as_secs_f64() / since.elapsed().as_secs_f64().max(1e-9)
            }
            None => r.busy_pct,
        };
        let scale = if r.busy_pct > 0.0 {
            busy_pct / r.busy_pct
        } else {
            0.0
        };
        WorkerStats {
            worker: self.index,
            core: self.core,
            busy_pct: busy_pct.min(100.0),
            sleeps: r.sleeps,
            ports: r
                .ports
                .into_iter()
                .map(|p| PortLoad {
                    busy_pct: (p.busy_pct * scale).min(100.0),
                    ..p
                })
                .collect(),
        }
    }
}

struct Slot {
    id: PortId,
    port: Box<dyn Port>,
    fds: Vec<RawFd>,
    /// Cycles of this window spent in steps of this port that moved packets.
    busy: u64,
    busy_pct: f64,
}

/// The worker thread's own state: nobody else touches it.
struct Worker {
    shared: Arc<Shared>,
    epoll: Epoll,
    slots: Vec<Slot>,
    seen: u64,
    window_start: u64,
    window_busy: u64,
    window_len: u64,
    sleeps: u64,
    idle_spin: Duration,
}

impl Worker {
    fn run(mut self) {
        let mut idle: u32 = 0;
        let mut idle_since: u64 = 0;
        let idle_spin = clock::cycles(self.idle_spin);
        loop {
            if self.shared.seq.load(Ordering::Acquire) != self.seen && !self.control() {
                return;
            }
            let start = clock::now();
            let mut last = start;
            let mut moved = 0;
            for s in &mut self.slots {
                let m = s.port.step();
                if m > 0 {
                    let t = clock::now();
                    s.busy += t.wrapping_sub(last);
                    last = t;
                    moved += m;
                }
            }
            if moved > 0 {
                self.window_busy += last.wrapping_sub(start);
                idle = 0;
                if last.wrapping_sub(self.window_start) >= self.window_len {
                    self.publish(last);
                }
                continue;
            }
            idle += 1;
            // Back off a little: re-reading a guest's ring index in a tight
            // loop steals its cache line from the guest.
            for _ in 0..4 {
                std::hint::spin_loop();
            }
            if idle == IDLE_POLLS {
                idle_since = start;
            }
            if idle < IDLE_POLLS
                || !idle.is_multiple_of(IDLE_POLLS)
                || start.wrapping_sub(idle_since) < idle_spin
            {
                continue;
            }
            self.sleep();
            idle = 0;
        }
    }

    /// Closes the load window that ends at `now`.
    fn publish(&mut self, now: u64) {
        let len = now.wrapping_sub(self.window_start).max(1) as f64;
        let mut r = lock(&self.shared.report);
        r.busy_pct = 100.0 * self.window_busy as f64 / len;
        r.ports = self
            .slots
            .iter_mut()
            .map(|s| {
                s.busy_pct = 100.0 * std::mem::take(&mut s.busy) as f64 / len;
                PortLoad {
                    name: s.port.name().to_string(),
                    busy_pct: s.busy_pct,
                }
            })
            .collect();
        r.sleeps = self.sleeps;
        r.asleep = None;
        drop(r);
        self.window_start = now;
        self.window_busy = 0;
    }

    fn sleep(&mut self) {
        let mut arm = Arm::Sleep;
        for s in &mut self.slots {
            arm = arm.combine(s.port.arm());
        }
        if self.shared.seq.load(Ordering::Acquire) != self.seen {
            arm = Arm::Busy;
        }
        let timeout = match arm {
            Arm::Busy => None,
            Arm::Sleep => Some(MAX_SLEEP),
            Arm::SleepAtMost(d) => Some(d.min(MAX_SLEEP)),
        };
        let slept = timeout.is_some();
        if let Some(t) = timeout {
            self.sleeps += 1;
            let now = clock::now();
            if now.wrapping_sub(self.window_start) >= self.window_len {
                self.publish(now);
            }
            {
                let hz = clock::hz();
                let mut r = lock(&self.shared.report);
                let began = now.wrapping_sub(self.window_start) as f64 / hz;
                r.asleep = Some((
                    Instant::now() - Duration::from_secs_f64(began),
                    Duration::from_secs_f64(self.window_busy as f64 / hz),
                ));
                r.sleeps = self.sleeps;
            }
            // epoll counts in milliseconds: round up, never to 0 (a spin).
            let ms = t.as_micros().div_ceil(1000).max(1) as i32;
            let mut events = [EpollEvent::default(); 16];
            // Interrupted or failed waits are harmless: every port is
            // stepped again and the worker sleeps again if still idle.
            let _ = self.epoll.wait(ms, &mut events);
            lock(&self.shared.report).asleep = None;
        }
        for s in &mut self.slots {
            s.port.disarm(slept);
        }
    }

    fn watch(&self, fds: &[RawFd], add: bool) -> io::Result<()> {
        for &fd in fds {
            let ev = EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, fd as u64);
            let op = if add {
                ControlOperation::Add
            } else {
                ControlOperation::Delete
            };
            self.epoll.ctl(op, fd, ev)?;
        }
        Ok(())
    }

    /// Handles queued requests; false when the worker must end.
    fn control(&mut self) -> bool {
        self.seen = self.shared.seq.load(Ordering::Acquire);
        loop {
            let Some(cmd) = lock(&self.shared.inbox).pop_front() else {
                return true;
            };
            match cmd {
                Cmd::Add { id, port, done } => {
                    let fds = port.wake_fds();
                    match self.watch(&fds, true) {
                        Ok(()) => {
                            self.slots.push(Slot {
                                id,
                                port,
                                fds,
                                busy: 0,
                                busy_pct: 0.0,
                            });
                            let _ = done.send(Ok(()));
                        }
                        Err(e) => {
                            let _ = self.watch(&fds, false);
                            let _ = done.send(Err((port, e)));
                        }
                    }
                }
                Cmd::Take { id, reply } => {
                    let port = self.slots.iter().position(|s| s.id == id).map(|i| {
                        let s = self.slots.remove(i);
                        let _ = self.watch(&s.fds, false);
                        s.port
                    });
                    let _ = reply.send(port);
                }
                Cmd::Pause { reply, resume } => {
                    let held = self.slots.iter().flat_map(|s| s.port.held()).collect();
                    if reply.send(held).is_ok() {
                        let _ = resume.recv();
                    }
                }
                Cmd::Quit => return false,
            }
        }
    }
}

/// A running worker thread and the way to reach it.
struct Handle {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// The daemon's workers.
pub struct Workers {
    handles: Vec<Handle>,
    /// Which worker runs which port (control plane).
    placement: Mutex<Vec<(PortId, usize)>>,
}

/// Keeps every worker parked; they resume when this is dropped.
pub struct Paused {
    _resume: Vec<mpsc::Sender<()>>,
}

impl Workers {
    /// Starts `n` workers; worker i is pinned to `cores[i % cores.len()]`
    /// when cores are given (checked by the caller with `cpu::check_cores`;
    /// `cpu::pin_to` refuses any other core without panicking).
    pub fn start(n: usize, cores: &[usize]) -> Result<Workers, WorkerError> {
        Self::start_spinning(n, cores, DEFAULT_IDLE_SPIN)
    }

    /// As [`Workers::start`], each worker polling for `idle_spin` after its
    /// last packet before it sleeps (longer: lower latency at low rates,
    /// at the price of a busy core between packets).
    pub fn start_spinning(
        n: usize,
        cores: &[usize],
        idle_spin: Duration,
    ) -> Result<Workers, WorkerError> {
        let mut handles = Vec::new();
        for index in 0..n.max(1) {
            let start = |source| WorkerError::Start {
                worker: index,
                source,
            };
            let core = (!cores.is_empty()).then(|| cores[index % cores.len()]);
            let shared = Arc::new(Shared {
                index,
                core,
                inbox: Mutex::new(VecDeque::new()),
                seq: AtomicU64::new(0),
                bell: EventFd::new(EFD_NONBLOCK).map_err(start)?,
                report: Mutex::new(Report::default()),
            });
            let epoll = Epoll::new().map_err(start)?;
            let bell = EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, INBOX);
            use std::os::fd::AsRawFd;
            epoll
                .ctl(ControlOperation::Add, shared.bell.as_raw_fd(), bell)
                .map_err(start)?;
            let worker = Worker {
                shared: shared.clone(),
                epoll,
                slots: Vec::new(),
                seen: 0,
                window_start: clock::now(),
                window_busy: 0,
                window_len: clock::cycles(WINDOW),
                sleeps: 0,
                idle_spin,
            };
            let thread = std::thread::Builder::new()
                .name(format!("zc-worker-{index}"))
                .spawn(move || {
                    if let Some(core) = core {
                        if let Err(e) = crate::cpu::pin_to(core) {
                            log::warn!("worker {index}: {e}");
                        }
                    }
                    worker.run()
                })
                .map_err(start)?;
            handles.push(Handle {
                shared,
                thread: Some(thread),
            });
        }
        Ok(Workers {
            handles,
            placement: Mutex::new(Vec::new()),
        })
    }

    pub fn count(&self) -> usize {
        self.handles.len()
    }

    fn worker(&self, index: usize) -> Result<&Handle, WorkerError> {
        self.handles.get(index).ok_or(WorkerError::NoWorker {
            worker: index,
            count: self.handles.len(),
        })
    }

    /// The worker with the least load: lowest busy share, then fewest ports.
    fn least_loaded(&self, placement: &[(PortId, usize)]) -> usize {
        let mut best = (f64::INFINITY, usize::MAX, 0);
        for h in &self.handles {
            let busy = h.shared.stats().busy_pct;
            let ports = placement.iter().filter(|p| p.1 == h.shared.index).count();
            if (busy, ports) < (best.0, best.1) {
                best = (busy, ports, h.shared.index);
            }
        }
        best.2
    }

    fn hand_over(&self, worker: usize, id: PortId, port: Box<dyn Port>) -> Result<(), AddError> {
        let h = self.worker(worker).map_err(|e| AddError::new(None, e))?;
        let (done, rx) = mpsc::channel();
        let name = port.name().to_string();
        h.shared.send(Cmd::Add { id, port, done });
        match rx.recv_timeout(REPLY_TIMEOUT) {
            Ok(Ok(())) => Ok(()),
            Ok(Err((port, source))) => Err(AddError::new(
                Some(port),
                WorkerError::Register {
                    worker,
                    port: name,
                    source,
                },
            )),
            Err(_) => Err(AddError::new(None, WorkerError::Timeout { worker })),
        }
    }

    /// Runs `port` on worker `on`, or on the least loaded one; returns the
    /// worker's index. On failure the port comes back (unless the worker
    /// did not answer: then it keeps it).
    pub fn add(
        &self,
        id: PortId,
        port: Box<dyn Port>,
        on: Option<usize>,
    ) -> Result<usize, AddError> {
        let mut placement = lock(&self.placement);
        let worker = match on {
            Some(w) => w,
            None => self.least_loaded(&placement),
        };
        self.hand_over(worker, id, port)?;
        placement.push((id, worker));
        Ok(worker)
    }

    fn take_from(&self, worker: usize, id: PortId) -> Result<Box<dyn Port>, WorkerError> {
        let (reply, rx) = mpsc::channel();
        self.worker(worker)?.shared.send(Cmd::Take { id, reply });
        match rx.recv_timeout(REPLY_TIMEOUT) {
            Ok(Some(p)) => Ok(p),
            Ok(None) => Err(WorkerError::NoPort(format!("{id:?}"))),
            Err(_) => Err(WorkerError::Timeout { worker }),
        }
    }

    /// Takes port `id` off its worker (between two of its steps).
    pub fn take(&self, id: PortId) -> Result<Box<dyn Port>, WorkerError> {
        let mut placement = lock(&self.placement);
        let i = placement
            .iter()
            .position(|p| p.0 == id)
            .ok_or_else(|| WorkerError::NoPort(format!("{id:?}")))?;
        let port = self.take_from(placement[i].1, id)?;
        placement.remove(i);
        Ok(port)
    }

    /// Moves port `id` to worker `to`; returns the worker it ran on.
    /// Nothing it holds is lost: it is not stepped in between.
    pub fn move_port(&self, id: PortId, to: usize) -> Result<usize, WorkerError> {
        self.worker(to)?;
        let mut placement = lock(&self.placement);
        let i = placement
            .iter()
            .position(|p| p.0 == id)
            .ok_or_else(|| WorkerError::NoPort(format!("{id:?}")))?;
        let from = placement[i].1;
        if from == to {
            return Ok(from);
        }
        let port = self.take_from(from, id)?;
        match self.hand_over(to, id, port) {
            Ok(()) => placement[i].1 = to,
            Err(e) => {
                // Back where it came from; that worker accepted it before.
                match e.port {
                    Some(p) => self
                        .hand_over(from, id, p)
                        .map_err(|e| e.error)
                        .map(|_| ())?,
                    None => {
                        placement.remove(i);
                    }
                }
                return Err(e.error);
            }
        }
        Ok(from)
    }

    /// Parks every worker and returns the buffers all ports hold; the
    /// workers stay parked until the returned guard is dropped. `None` if a
    /// worker did not answer (then nothing may be concluded from holdings).
    pub fn pause(&self) -> Option<(Vec<BufferIndex>, Paused)> {
        let mut held = Vec::new();
        let mut resume = Vec::new();
        for h in &self.handles {
            let (reply, rx) = mpsc::channel();
            let (go, wait) = mpsc::channel();
            h.shared.send(Cmd::Pause {
                reply,
                resume: wait,
            });
            resume.push(go);
            match rx.recv_timeout(REPLY_TIMEOUT) {
                Ok(b) => held.extend(b),
                Err(_) => return None,
            }
        }
        Some((held, Paused { _resume: resume }))
    }

    pub fn stats(&self) -> Vec<WorkerStats> {
        self.handles.iter().map(|h| h.shared.stats()).collect()
    }

    /// Which worker runs port `id`.
    pub fn placement_of(&self, id: PortId) -> Option<usize> {
        lock(&self.placement)
            .iter()
            .find(|p| p.0 == id)
            .map(|p| p.1)
    }
}

/// A port that could not be added, given back when the worker still could.
pub struct AddError {
    pub port: Option<Box<dyn Port>>,
    pub error: WorkerError,
}

impl AddError {
    fn new(port: Option<Box<dyn Port>>, error: WorkerError) -> Self {
        AddError { port, error }
    }
}

impl std::fmt::Debug for AddError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for h in &self.handles {
            h.shared.send(Cmd::Quit);
        }
        for h in &mut self.handles {
            if let Some(t) = h.thread.take() {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::sync::atomic::AtomicBool;

    /// A port that moves numbers from an input list to an output list, and
    /// is woken through an eventfd like a real port.
    struct Fake {
        name: String,
        input: Arc<Mutex<VecDeque<u64>>>,
        output: Arc<Mutex<Vec<u64>>>,
        bell: Arc<EventFd>,
        armed: Arc<AtomicBool>,
        held: Vec<BufferIndex>,
    }

    /// The test's side of a fake port.
    #[derive(Clone)]
    struct Feed {
        input: Arc<Mutex<VecDeque<u64>>>,
        output: Arc<Mutex<Vec<u64>>>,
        bell: Arc<EventFd>,
        armed: Arc<AtomicBool>,
    }

    impl Feed {
        fn push(&self, v: impl IntoIterator<Item = u64>) {
            lock(&self.input).extend(v);
            if self.armed.load(Ordering::SeqCst) {
                self.bell.write(1).unwrap();
            }
        }
        fn out(&self) -> Vec<u64> {
            lock(&self.output).clone()
        }
        fn wait_for(&self, n: usize, within: Duration) -> Duration {
            let t = Instant::now();
            while lock(&self.output).len() < n {
                assert!(
                    t.elapsed() < within,
                    "{} of {n} moved",
                    lock(&self.output).len()
                );
                std::thread::yield_now();
            }
            t.elapsed()
        }
    }

    fn fake(name: &str, held: &[u32]) -> (Box<dyn Port>, Feed) {
        let feed = Feed {
            input: Default::default(),
            output: Default::default(),
            bell: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            armed: Default::default(),
        };
        let port = Fake {
            name: name.into(),
            input: feed.input.clone(),
            output: feed.output.clone(),
            bell: feed.bell.clone(),
            armed: feed.armed.clone(),
            held: held.iter().map(|&b| BufferIndex::new(b)).collect(),
        };
        (Box::new(port), feed)
    }

    impl Port for Fake {
        fn name(&self) -> &str {
            &self.name
        }
        fn step(&mut self) -> usize {
            let mut input = lock(&self.input);
            let n = input.len().min(32);
            lock(&self.output).extend(input.drain(..n));
            n
        }
        fn arm(&mut self) -> Arm {
            self.armed.store(true, Ordering::SeqCst);
            if lock(&self.input).is_empty() {
                Arm::Sleep
            } else {
                Arm::Busy
            }
        }
        fn disarm(&mut self, _slept: bool) {
            self.armed.store(false, Ordering::SeqCst);
        }
        fn wake_fds(&self) -> Vec<RawFd> {
            vec![self.bell.as_raw_fd()]
        }
        fn held(&self) -> Vec<BufferIndex> {
            self.held.clone()
        }
        fn stop(self: Box<Self>) -> Vec<BufferIndex> {
            self.held
        }
    }

    #[test]
    fn ports_spread_over_workers_and_idle_workers_sleep() {
        let w = Workers::start(2, &[]).unwrap();
        let (a, fa) = fake("a", &[]);
        let (b, fb) = fake("b", &[]);
        let (c, _) = fake("c", &[]);
        assert_eq!(w.add(PortId(1), a, None).unwrap(), 0);
        assert_eq!(w.add(PortId(2), b, None).unwrap(), 1);
        assert_eq!(w.add(PortId(3), c, None).unwrap(), 0);
        assert_eq!(w.placement_of(PortId(3)), Some(0));
        // Both asleep once idle; then few wake-ups (the 500 ms safety net
        // only), not a spinning loop.
        std::thread::sleep(Duration::from_millis(100));
        let before: Vec<u64> = w.stats().iter().map(|s| s.sleeps).collect();
        assert!(before.iter().all(|&n| n >= 1), "{before:?}");
        std::thread::sleep(Duration::from_millis(1000));
        let after: Vec<u64> = w.stats().iter().map(|s| s.sleeps).collect();
        for (x, y) in before.iter().zip(&after) {
            assert!(y - x <= 4, "an idle worker woke {} times in 1 s", y - x);
        }
        let st = w.stats();
        assert!(st.iter().all(|s| s.busy_pct < 1.0), "{st:?}");
        assert_eq!(st[0].ports.len(), 2);
        // A sleeping worker is woken by its port's descriptor at once.
        fa.push(0..100);
        let took = fa.wait_for(100, Duration::from_secs(2));
        assert!(took < Duration::from_millis(100), "woke after {took:?}");
        fb.push(0..7);
        fb.wait_for(7, Duration::from_secs(2));
        assert_eq!(fa.out(), (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn a_worker_told_to_spin_longer_polls_through_a_gap_instead_of_sleeping() {
        let w = Workers::start_spinning(1, &[], Duration::from_secs(5)).unwrap();
        let (a, fa) = fake("a", &[]);
        w.add(PortId(1), a, None).unwrap();
        fa.push(0..10);
        fa.wait_for(10, Duration::from_secs(2));
        // A gap far longer than the default spin, far shorter than this one.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(w.stats()[0].sleeps, 0, "it kept polling");
        fa.push(10..20);
        fa.wait_for(20, Duration::from_secs(2));
        assert_eq!(w.stats()[0].sleeps, 0);
    }

    #[test]
    fn a_port_moved_under_traffic_loses_and_reorders_nothing() {
        let w = Workers::start(2, &[]).unwrap();
        let (p, feed) = fake("mover", &[]);
        w.add(PortId(9), p, Some(0)).unwrap();
        let f2 = feed.clone();
        const N: u64 = 200_000;
        let producer = std::thread::spawn(move || {
            for chunk in (0..N).collect::<Vec<_>>().chunks(50) {
                f2.push(chunk.iter().copied());
            }
        });
        for i in 0..20 {
            assert_eq!(w.move_port(PortId(9), (i + 1) % 2).unwrap(), i % 2);
        }
        producer.join().unwrap();
        feed.wait_for(N as usize, Duration::from_secs(20));
        assert_eq!(feed.out(), (0..N).collect::<Vec<_>>());
        assert_eq!(w.placement_of(PortId(9)), Some(0));
        assert_eq!(
            w.move_port(PortId(9), 2).unwrap_err().to_string(),
            "there is no worker 2: this zc-hostd runs workers 0..1"
        );
        assert!(matches!(
            w.move_port(PortId(8), 1),
            Err(WorkerError::NoPort(_))
        ));
    }

    #[test]
    fn pause_reports_what_every_port_holds_and_take_returns_the_port() {
        let w = Workers::start(2, &[]).unwrap();
        let (a, fa) = fake("a", &[1, 2]);
        let (b, _) = fake("b", &[7]);
        w.add(PortId(1), a, Some(0)).unwrap();
        w.add(PortId(2), b, Some(1)).unwrap();
        let (mut held, paused) = w.pause().unwrap();
        held.sort();
        assert_eq!(held, [1, 2, 7].map(BufferIndex::new));
        // Parked: nothing moves until the guard goes.
        fa.push([5]);
        std::thread::sleep(Duration::from_millis(50));
        assert!(fa.out().is_empty());
        drop(paused);
        fa.wait_for(1, Duration::from_secs(2));
        let a = w.take(PortId(1)).unwrap();
        assert_eq!(a.stop(), [1, 2].map(BufferIndex::new));
        assert!(w.take(PortId(1)).is_err());
    }
}
