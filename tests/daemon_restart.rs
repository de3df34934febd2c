//! A zc-hostd killed with SIGKILL and started again with the same options
//! takes its cluster over (issue 14): the same pool file, the queues with
//! the packets waiting in them, the exports on the same sockets, and every
//! buffer accounted for.

mod common;

use common::*;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

fn inode(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().ino()
}

#[test]
fn a_killed_daemon_is_taken_over_with_its_pool_queued_packets_and_exports() {
    let (mut d, sock) = Daemon::with_vm_export();
    let id = d.id;
    let before = d.info();
    let pool = Path::new(&before.pool_path).to_path_buf();
    let ino = inode(&pool);
    // 500 packets wait in queue 2, which nobody consumes.
    let sent = d
        .tool("zsend")
        .args(["-i", &d.name(2), "-n", "500", "-l", "100", "--json"])
        .output()
        .unwrap();
    assert!(sent.status.success(), "{sent:?}");
    assert_eq!(json(&sent)["packets"], 500);
    d.stop(libc::SIGKILL);
    let state = Path::new("/dev/shm/zc").join(id.to_string());
    assert!(
        state.join("queues").exists() && state.join("owners").exists(),
        "a killed daemon leaves its state"
    );
    let run_dir = std::mem::replace(&mut d.run_dir, tempfile::tempdir().unwrap());
    let export = format!("{},rx=0,tx=1", sock.display());
    let mut d2 = Daemon::start_in(
        id,
        run_dir,
        &["--buffers", "8192", "--no-hugepages", "--export", &export],
    );
    let log = d2.log_text();
    assert!(
        log.contains(&format!(
            "zc-hostd: cluster {id} taken over from a zc-hostd that died: same pool {}, \
             4096 buffers in the queues, 1024 held by guests, {} spare",
            pool.display(),
            8192 - 4096 - 1024
        )),
        "{log}"
    );
    let after = d2.info();
    assert_eq!(after.pool_path, before.pool_path);
    assert_eq!(inode(&pool), ino, "the same pool file, not a new one");
    assert_eq!(
        after.spare_buffers, before.spare_buffers,
        "the dead daemon's hands are back; the new export took the same again"
    );
    assert_eq!(
        export_named(&d2, &sock).path,
        sock.display().to_string(),
        "the export serves its socket again"
    );
    // The waiting packets are still there, in order, intact.
    let count = d2
        .tool("zcount")
        .args([
            "-i",
            &d2.name(2),
            "-n",
            "500",
            "--verify",
            "--json",
            "-t",
            "20",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let v = json(&wait_output(count, Duration::from_secs(30)));
    assert_eq!(
        (&v["packets"], &v["seq_errors"], &v["checksum_errors"]),
        (&500.into(), &0.into(), &0.into()),
        "{v}"
    );
    d2.stop(libc::SIGTERM);
    assert!(
        !state.exists(),
        "a clean stop removes the state of the cluster"
    );
    assert!(!pool.exists());
}

#[test]
fn other_options_after_a_kill_make_a_new_cluster() {
    let mut d = Daemon::start(&["-q", "2", "--buffers", "4096", "--no-hugepages"]);
    let id = d.id;
    let pool = std::path::PathBuf::from(d.info().pool_path);
    let ino = inode(&pool);
    d.stop(libc::SIGKILL);
    let run_dir = std::mem::replace(&mut d.run_dir, tempfile::tempdir().unwrap());
    let d2 = Daemon::start_in(
        id,
        run_dir,
        &["-q", "1", "--buffers", "4096", "--no-hugepages"],
    );
    assert!(
        d2.log_text().contains(&format!(
            "the cluster {id} a zc-hostd that died left behind does not fit these options \
             (--queues, --queue-len, --buffers, --buf-size): it is replaced by a new one"
        )),
        "{}",
        d2.log_text()
    );
    assert_ne!(inode(&pool), ino, "a new pool file");
    assert_eq!(d2.info().spare_buffers, 4096 - 1024);
}
