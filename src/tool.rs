//! What zsend and zcount share: pinning, Ctrl-C, and PF_RING-style statistics.

use crate::Sender;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Packets per burst: the unit of work of every loop.
pub const BURST: usize = 32;

/// `-g CORE`: pins the calling thread to one of the cores this process may
/// run on (checked the same way as zc-hostd's `-g`).
pub fn pin_to_core(core: usize) -> Result<(), String> {
    zc_host::cpu::pin_to(core).map_err(|e| format!("-g: {e}"))
}

/// Prepares the calling thread to sleep and wake once per packet: timer
/// slack of 1 ns, so that a wait until a deadline ends then and not up to
/// the default 50 us later; and the shortest time slice the scheduler
/// grants (100 us, EEVDF's custom slice, Linux 6.12 and later), so that on
/// waking it preempts a busy poller it shares a core with at once, not
/// after the rest of that poller's slice. Older kernels ignore the slice;
/// a thread that runs real-time already (`chrt`) keeps its policy.
pub fn wake_promptly() {
    // SAFETY: PR_SET_TIMERSLACK takes a number and touches no memory.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    // SAFETY: sched_getscheduler only reads this thread's policy.
    if unsafe { libc::sched_getscheduler(0) } != libc::SCHED_OTHER {
        return;
    }
    // SAFETY: sched_attr is plain data.
    let mut attr: libc::sched_attr = unsafe { std::mem::zeroed() };
    attr.size = std::mem::size_of::<libc::sched_attr>() as u32;
    attr.sched_policy = libc::SCHED_OTHER as u32;
    attr.sched_runtime = 100_000;
    // SAFETY: sched_setattr reads the attr we own, for this thread (0).
    unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr, 0) };
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Makes Ctrl-C and SIGTERM set a flag the loops poll, so tools stop
/// cleanly and print their summary. Blocking waits return early (no
/// SA_RESTART).
pub fn stop_on_signals() -> &'static AtomicBool {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
    }
    &STOP
}

/// Counters the busy loop publishes once per burst (plain stores of its own
/// totals: no read-modify-write on the data path) and the reporter reads.
#[derive(Default)]
pub struct Counters {
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    pub drops: AtomicU64,
}

impl Counters {
    #[inline(always)]
    pub fn publish(&self, packets: u64, bytes: u64) {
        self.packets.store(packets, Ordering::Relaxed);
        self.bytes.store(bytes, Ordering::Relaxed);
    }

    fn read(&self) -> (u64, u64, u64) {
        (
            self.packets.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
            self.drops.load(Ordering::Relaxed),
        )
    }
}

fn gbps(bytes: f64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes * 8.0 / secs / 1e9
    } else {
        0.0
    }
}

/// The two PF_RING lines, between rules, as zcount and zsend print them.
pub fn stats_block(total: (u64, u64, u64), delta: (u64, u64, u64), secs: f64) -> String {
    let rate = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    format!(
        "=========================\n\
         Absolute Stats: {} pkts ({} drops) - {} bytes\n\
         Actual Stats: {:.2} pps ({:.2} drops) - {:.2} Gbps\n\
         =========================",
        total.0,
        total.2,
        total.1,
        rate(delta.0),
        rate(delta.2),
        gbps(delta.1 as f64, secs),
    )
}

/// Prints `stats_block` to stderr once a second until dropped.
pub struct Reporter {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Reporter {
    pub fn start(counters: Arc<Counters>) -> Reporter {
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let thread = std::thread::spawn(move || {
            let mut last = counters.read();
            let mut t = Instant::now();
            while !d.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                if t.elapsed() < Duration::from_secs(1) {
                    continue;
                }
                let now = counters.read();
                let secs = t.elapsed().as_secs_f64();
                t = Instant::now();
                let delta = (now.0 - last.0, now.1 - last.1, now.2 - last.2);
                eprintln!("{}", stats_block(now, delta, secs));
                last = now;
            }
        });
        Reporter {
            done,
            thread: Some(thread),
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The final result, printed as one JSON line with `--json`.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub name: String,
    pub packets: u64,
    pub bytes: u64,
    pub drops: u64,
    pub seconds: f64,
    pub pps: f64,
    pub gbps: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq_errors: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checksum_errors: Option<u64>,
    /// zcount --json: distinct flows, each direction of a flow counted once
    /// together (`flows`) and apart (`flow_directions`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flows: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flow_directions: Option<u64>,
}

impl Summary {
    pub fn new(name: &str, packets: u64, bytes: u64, drops: u64, elapsed: Duration) -> Summary {
        let seconds = elapsed.as_secs_f64();
        Summary {
            name: name.to_string(),
            packets,
            bytes,
            drops,
            seconds,
            pps: if seconds > 0.0 {
                packets as f64 / seconds
            } else {
                0.0
            },
            gbps: gbps(bytes as f64, seconds),
            seq_errors: None,
            checksum_errors: None,
            flows: None,
            flow_directions: None,
        }
    }

    /// The human summary for stderr.
    pub fn text(&self) -> String {
        let mut s = format!(
            "=========================\n\
             Absolute Stats: {} pkts ({} drops) - {} bytes\n\
             Total: {} pkts in {:.3} s: {:.2} pps - {:.2} Gbps",
            self.packets, self.drops, self.bytes, self.packets, self.seconds, self.pps, self.gbps
        );
        if let (Some(q), Some(c)) = (self.seq_errors, self.checksum_errors) {
            s.push_str(&format!(
                "\nVerify: {q} sequence errors, {c} checksum errors"
            ));
        }
        s.push_str("\n=========================");
        s
    }

    pub fn json(&self) -> String {
        serde_json::to_string(self).expect("summary serialises")
    }
}

/// Busy-polls while work comes, sleeps after this many empty polls.
pub const IDLE_POLLS: u32 = 20_000;
/// How long one idle sleep lasts before stop conditions are re-checked.
pub const IDLE_SLEEP: Duration = Duration::from_millis(50);

/// Sends `hand` whole, waiting for room; returns how many went (fewer
/// only when stopped).
#[inline]
pub fn send_all(
    tx: &mut crate::Tx,
    hand: &mut [crate::BufferHandle],
    stop: &AtomicBool,
    name: &str,
) -> Result<usize, String> {
    let mut done = 0;
    let mut idle = 0u32;
    while done < hand.len() {
        let n = tx.send_burst(&mut hand[done..]);
        done += n;
        if n == 0 {
            idle += 1;
            if idle > IDLE_POLLS {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if let Some(e) = tx.failure() {
                    return Err(format!("{name}: {e}"));
                }
                tx.wait_send(IDLE_SLEEP);
            }
        }
    }
    Ok(done)
}

/// The flags zsend and zcount share.
#[derive(clap::Args, Debug)]
pub struct CommonArgs {
    /// Pin the busy-polling thread to this CPU core.
    #[arg(short = 'g', value_name = "CORE")]
    pub core: Option<usize>,

    /// Print the final summary as one JSON line on stdout.
    #[arg(long)]
    pub json: bool,

    /// Run the zc guest driver as the vhost-user frontend of the export at
    /// this socket (no VM needed: containers, tests), for the export that
    /// serves the queue NAME names.
    #[arg(long = "vhost-user", value_name = "PATH")]
    pub vhost_user: Option<std::path::PathBuf>,

    /// With --vhost-user: the cluster's pool file (default: asked from the
    /// cluster's zc-hostd, else /dev/hugepages/zc/<cluster>/pool or
    /// /dev/shm/zc/<cluster>/pool).
    #[arg(long, value_name = "PATH", requires = "vhost_user")]
    pub pool: Option<std::path::PathBuf>,

    /// If NAME is not there yet (no cluster, pool or device: a VM whose
    /// export `zc-hostd attach` is still hot-plugging), retry for up to
    /// SECONDS instead of failing at once.
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    pub wait: Option<std::time::Duration>,
}

impl CommonArgs {
    /// How `zc::open_*_with` should resolve the name.
    pub fn options(&self) -> crate::Options {
        crate::Options {
            vhost_user: self.vhost_user.clone(),
            pool: self.pool.clone(),
            wait: self.wait,
            ..crate::Options::default()
        }
    }
}

/// Seconds as a user writes them: `60`, `0.5`; at most a day.
pub fn parse_seconds(s: &str) -> Result<std::time::Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=86400.0).contains(&v) => Ok(std::time::Duration::from_secs_f64(v)),
        _ => Err(format!(
            "{s:?} is not a number of seconds from 0 to 86400, like 60 or 0.5"
        )),
    }
}

/// A tool's exit: errors are one line, prefixed with the tool's name.
pub fn exit(tool: &str, result: Result<(), String>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{tool}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_takes_plain_seconds_only() {
        assert_eq!(
            parse_seconds("0.5"),
            Ok(std::time::Duration::from_millis(500))
        );
        for bad in ["nan", "-1", "inf", "1e9", "soon"] {
            assert!(parse_seconds(bad)
                .unwrap_err()
                .contains("is not a number of seconds"));
        }
    }

    #[test]
    fn stats_lines_have_the_pf_ring_shape() {
        let s = stats_block((1000, 64000, 2), (500, 32000, 1), 1.0);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "=========================");
        assert_eq!(
            lines[1],
            "Absolute Stats: 1000 pkts (2 drops) - 64000 bytes"
        );
        assert_eq!(
            lines[2],
            "Actual Stats: 500.00 pps (1.00 drops) - 0.00 Gbps"
        );
        assert_eq!(lines[3], "=========================");
    }

    #[test]
    fn summary_json_has_the_documented_fields() {
        let mut s = Summary::new("zc:1@0", 10, 640, 0, Duration::from_secs(2));
        s.seq_errors = Some(0);
        s.checksum_errors = Some(1);
        let v: serde_json::Value = serde_json::from_str(&s.json()).unwrap();
        assert_eq!(v["packets"], 10);
        assert_eq!(v["bytes"], 640);
        assert_eq!(v["seconds"], 2.0);
        assert_eq!(v["pps"], 5.0);
        assert_eq!(v["checksum_errors"], 1);
        let plain = Summary::new("zc:1@0", 1, 1, 0, Duration::from_secs(1)).json();
        assert!(!plain.contains("seq_errors"));
    }

    #[test]
    fn pinning_to_a_missing_core_is_a_clear_error() {
        let e = pin_to_core(100_000).unwrap_err();
        assert!(
            e.starts_with("-g: core 100000 is not available: this process may run on cores "),
            "{e}"
        );
    }
}
