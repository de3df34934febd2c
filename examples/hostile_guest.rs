//! A hostile zc guest, for tests only: the guest driver over an export's
//! vhost-user socket (as `zsend --vhost-user`), sending zsend's test
//! packets, that keeps rewriting every buffer after handing it over. A
//! guest maps the whole pool, so nothing stops it; what matters is that
//! the consumer counts the damage (`zcount --verify`) and that the daemon
//! and the cluster's other exports are unaffected.
//!
//!   hostile_guest --vhost-user SOCK -i zc:C@Q -n N -l LEN [--header]
//!
//! Prints one JSON line: `packets` sent, `rewrites` (buffer rewrites done).

use clap::Parser;
use std::collections::VecDeque;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use zc::testpkt::{Template, PATTERN_OFFSET};
use zc::tool::{self, BURST};
use zc::{PoolView, QueueEnd};
use zc_proto::BufferIndex;

/// How many of the latest handed-over buffers the rewriting loop keeps at.
const RECENT: usize = 1024;

#[derive(Parser, Debug)]
struct Args {
    #[arg(short = 'i', value_name = "NAME")]
    name: String,
    #[arg(long = "vhost-user", value_name = "PATH")]
    vhost_user: std::path::PathBuf,
    #[arg(short = 'n', value_name = "COUNT")]
    count: u64,
    #[arg(short = 'l', value_name = "LEN", default_value_t = 200)]
    len: usize,
    /// Also keep rewriting the pool header's geometry (its first 64 bytes:
    /// magic, version, sizes), which host processes must not depend on.
    #[arg(long)]
    header: bool,
}

/// The header bytes `--header` rewrites: everything before `export_seq`
/// (the directory's seqlock, which guest drivers follow to find exports).
const HEADER_GEOMETRY: usize = std::mem::offset_of!(zc_proto::PoolHeader, export_seq);

/// Overwrites the test pattern of buffer `index` (packet bytes
/// PATTERN_OFFSET..len) with `fill`.
fn rewrite(pool: &PoolView, index: u32, len: usize, fill: u8) {
    let Some(off) = pool.layout().packet_offset(BufferIndex::new(index)) else {
        return;
    };
    let max = pool.layout().max_packet() as usize;
    for i in PATTERN_OFFSET..len.min(max) {
        // SAFETY: `off + i` lies inside buffer `index` (i < max_packet),
        // inside the mapping the view keeps alive; volatile because the
        // host reads the same memory.
        unsafe { std::ptr::write_volatile(pool.base().add(off as usize + i), fill) };
    }
}

fn run(args: &Args) -> Result<(), String> {
    let opts = zc::Options {
        vhost_user: Some(args.vhost_user.clone()),
        wait: Some(Duration::from_secs(20)),
        ..zc::Options::default()
    };
    let mut tx = zc::open_tx_with(&args.name, &opts).map_err(|e| e.to_string())?;
    let pool = tx.pool().clone();
    let template = Template::new(args.len);
    let mut hand = tx
        .take_buffers(BURST)
        .map_err(|e| format!("{}: {e}", args.name))?;
    let recent = Arc::new(Mutex::new(VecDeque::<u32>::with_capacity(RECENT)));
    let stop = Arc::new(AtomicBool::new(false));
    let rewrites = Arc::new(AtomicU64::new(0));
    let looper = {
        let (pool, recent, stop, rewrites) =
            (pool.clone(), recent.clone(), stop.clone(), rewrites.clone());
        let (len, header) = (args.len, args.header);
        std::thread::spawn(move || {
            let mut pass = 0u8;
            while !stop.load(Ordering::Relaxed) {
                pass = pass.wrapping_add(1);
                if header {
                    for i in 0..HEADER_GEOMETRY {
                        // SAFETY: the header page starts the mapping the
                        // view keeps alive; volatile as above.
                        unsafe { std::ptr::write_volatile(pool.base().add(i), pass) };
                    }
                }
                let list: Vec<u32> = recent.lock().unwrap().iter().copied().collect();
                for &i in &list {
                    rewrite(&pool, i, len, pass);
                }
                rewrites.fetch_add(list.len() as u64, Ordering::Relaxed);
                if list.is_empty() {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        })
    };
    let never = AtomicBool::new(false);
    let mut sent = 0u64;
    while sent < args.count {
        let want = BURST.min((args.count - sent) as usize);
        for (i, h) in hand[..want].iter_mut().enumerate() {
            template.stamp(&mut pool.packet_mut(h), sent + i as u64);
        }
        let gone: Vec<u32> = hand[..want].iter().map(|h| h.index().get()).collect();
        let done = tool::send_all(&mut tx, &mut hand[..want], &never, &args.name)?;
        // Handed over: rewrite them at once, and keep at it in the loop.
        for &i in &gone[..done] {
            rewrite(&pool, i, args.len, 0xEE);
        }
        rewrites.fetch_add(done as u64, Ordering::Relaxed);
        let mut r = recent.lock().unwrap();
        for &i in &gone[..done] {
            if r.len() == RECENT {
                r.pop_front();
            }
            r.push_back(i);
        }
        drop(r);
        sent += done as u64;
    }
    let flushed = tx.flush(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    looper.join().map_err(|_| "the rewriting loop panicked")?;
    if !flushed {
        return Err(format!(
            "{}: the device did not complete the last packets",
            args.name
        ));
    }
    println!(
        "{}",
        serde_json::json!({
            "packets": sent,
            "rewrites": rewrites.load(Ordering::Relaxed),
        })
    );
    Ok(())
}

/// However the run goes (a daemon that vanished mid-test leaves the sender
/// waiting for room forever), the process ends: it keeps a core busy.
const LIFETIME: Duration = Duration::from_secs(120);

fn main() -> ExitCode {
    std::thread::spawn(|| {
        std::thread::sleep(LIFETIME);
        eprintln!("hostile_guest: still running after {LIFETIME:?}; giving up");
        std::process::exit(2);
    });
    tool::exit("hostile_guest", run(&Args::parse()))
}
