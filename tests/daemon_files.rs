//! What zc-hostd does to files that are not its own (nothing), to a
//! running cluster's pool when a second daemon of its id starts (nothing),
//! and with cores it cannot use (refuses them before creating anything):
//! real zc-hostd processes, the exact error lines, the files checked after.

mod common;

use common::*;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const SMALL: &[&str] = &["-q", "2", "--buffers", "4096", "--no-hugepages"];

/// `zc-hostd -c ID --run-dir RUN <args>` that is expected to fail at start
/// (a daemon that starts instead is killed after a while: a failure).
fn hostd_fails(id: u32, run: &Path, args: &[&str]) -> Output {
    let child = Command::new(bin("zc-hostd"))
        .args(["-c", &id.to_string(), "--run-dir"])
        .arg(run)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_output(child, Duration::from_secs(20))
}

/// The run failed with exactly `line` on stderr and nothing else.
fn assert_error_line(out: &Output, line: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure; stderr: {stderr}");
    assert_eq!(stderr.lines().collect::<Vec<_>>(), [line], "{stderr}");
}

/// Nothing of cluster `id` is left: run directory, lock, pool.
fn assert_no_cluster_files(id: u32, run: &Path) {
    for p in [
        run.join(id.to_string()),
        PathBuf::from(format!("/dev/shm/zc/{id}")),
        PathBuf::from(format!("/dev/hugepages/zc/{id}")),
    ] {
        assert!(!p.exists(), "{} was left behind", p.display());
    }
}

/// zsend -> zcount on `queue` of `d`, with an exact count.
fn round(d: &Daemon, queue: u16, n: u64) {
    let count = d
        .tool("zcount")
        .args(["-i", &d.name(queue), "-n", &n.to_string(), "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let sent = d
        .tool("zsend")
        .args(["-i", &d.name(queue), "-n", &n.to_string(), "-l", "64"])
        .output()
        .unwrap();
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let v = json(&wait_output(count, Duration::from_secs(60)));
    assert_eq!(v["packets"], n, "{v}");
}

fn in_the_way(what: &str, path: &Path, kind: &str) -> String {
    format!(
        "zc-hostd: error: {what} {}: {kind} is in the way (zc-hostd replaces only a socket nobody listens on); remove it or choose another path",
        path.display()
    )
}

#[test]
fn an_export_onto_a_file_link_or_directory_fails_and_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let file = dir.path().join("precious");
    std::fs::write(&file, b"somebody's data").unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    let sub = dir.path().join("subdir");
    std::fs::create_dir(&sub).unwrap();
    for (path, kind) in [
        (&file, "a regular file"),
        (&link, "a symbolic link"),
        (&sub, "a directory"),
    ] {
        let id = unique_cluster();
        // An export that started before the bad one goes with the daemon.
        let first = dir.path().join("first.sock");
        let first_export = format!("{},rx=1", first.display());
        let export = format!("{},rx=0", path.display());
        let mut args = SMALL.to_vec();
        args.extend(["--export", &first_export, "--export", &export]);
        let out = hostd_fails(id, &run, &args);
        assert_error_line(&out, &in_the_way("export socket", path, kind));
        assert_no_cluster_files(id, &run);
        assert!(!first.exists());
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"somebody's data");
    assert_eq!(std::fs::read_link(&link).unwrap(), file);
    assert!(sub.is_dir());
}

#[test]
fn an_export_replaces_a_stale_socket_but_not_a_live_one() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    // A live socket of another process (this one).
    let other = UnixListener::bind(&sock).unwrap();
    let ino = std::fs::metadata(&sock).unwrap().ino();
    let id = unique_cluster();
    let run = dir.path().join("run");
    let export = format!("{},rx=0,tx=1", sock.display());
    let mut args = SMALL.to_vec();
    args.extend(["--export", &export]);
    let out = hostd_fails(id, &run, &args);
    assert_error_line(
        &out,
        &format!(
            "zc-hostd: error: export socket {}: another process is listening on it; stop that process or choose another path",
            sock.display()
        ),
    );
    assert_no_cluster_files(id, &run);
    assert_eq!(std::fs::metadata(&sock).unwrap().ino(), ino);
    UnixStream::connect(&sock).expect("the other process's socket still works");
    // Its process gone, the socket is stale: the export takes its place
    // and serves (guest driver zsend -> export -> host zcount).
    drop(other);
    let d = Daemon::start_in(id, tempfile::tempdir().unwrap(), &args);
    let count = d
        .tool("zcount")
        .args(["-i", &d.name(1), "-n", "1000", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let sent = d
        .tool("zsend")
        .args(["-i", &d.name(1), "-n", "1000", "--vhost-user"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    assert_eq!(
        json(&wait_output(count, Duration::from_secs(60)))["packets"],
        1000
    );
}

#[test]
fn a_control_socket_path_or_run_directory_in_the_way_is_refused() {
    let run = tempfile::tempdir().unwrap();
    // <run>/<id>/ctl is a regular file.
    let id = unique_cluster();
    let ctl = run.path().join(id.to_string()).join("ctl");
    std::fs::create_dir(ctl.parent().unwrap()).unwrap();
    std::fs::write(&ctl, b"keep me").unwrap();
    let out = hostd_fails(id, run.path(), SMALL);
    assert_error_line(&out, &in_the_way("control socket", &ctl, "a regular file"));
    assert_eq!(std::fs::read(&ctl).unwrap(), b"keep me");
    assert!(!Path::new(&format!("/dev/shm/zc/{id}")).exists());
    // <run>/<id>/ctl is another process's live socket.
    std::fs::remove_file(&ctl).unwrap();
    let _other = UnixListener::bind(&ctl).unwrap();
    let out = hostd_fails(id, run.path(), SMALL);
    assert_error_line(
        &out,
        &format!(
            "zc-hostd: error: control socket {}: another process is listening on it; stop that process or choose another path",
            ctl.display()
        ),
    );
    assert!(ctl.exists());
    // <run>/<id> is a regular file.
    let id = unique_cluster();
    let dir = run.path().join(id.to_string());
    std::fs::write(&dir, b"not a directory").unwrap();
    let out = hostd_fails(id, run.path(), SMALL);
    assert_error_line(
        &out,
        &format!(
            "zc-hostd: error: run directory {}: a regular file is in the way, not a directory; remove it or choose another directory",
            dir.display()
        ),
    );
    assert_eq!(std::fs::read(&dir).unwrap(), b"not a directory");
    assert!(!Path::new(&format!("/dev/shm/zc/{id}")).exists());
}

#[test]
fn a_pool_path_in_the_way_is_refused_and_kept() {
    let run = tempfile::tempdir().unwrap();
    let id = unique_cluster();
    let pool = PathBuf::from(format!("/dev/shm/zc/{id}/pool"));
    std::fs::create_dir_all(pool.parent().unwrap()).unwrap();
    std::fs::write(&pool, b"a file that only looks like a pool").unwrap();
    let out = hostd_fails(id, run.path(), SMALL);
    assert_error_line(
        &out,
        &format!(
            "zc-hostd: error: pool file {}: a regular file that is not a zc pool is in the way, not the pool of a stopped zc-hostd of cluster {id}; remove it if nothing needs it",
            pool.display()
        ),
    );
    assert_eq!(
        std::fs::read(&pool).unwrap(),
        b"a file that only looks like a pool"
    );
    assert!(!run.path().join(id.to_string()).exists());
    std::fs::remove_dir_all(pool.parent().unwrap()).unwrap();
}

#[test]
fn at_shutdown_files_that_replaced_the_daemons_own_stay() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let export = format!("{},rx=0", sock.display());
    let mut args = SMALL.to_vec();
    args.extend(["--export", &export]);
    let mut d = Daemon::start(&args);
    let pool = PathBuf::from(d.info().pool_path);
    let ctl = d.ctl();
    // Somebody replaces the daemon's socket files and its pool file.
    for (p, text) in [(&sock, "export"), (&ctl, "control"), (&pool, "pool")] {
        std::fs::remove_file(p).unwrap();
        std::fs::write(p, text).unwrap();
    }
    let status = d.stop(libc::SIGTERM);
    assert!(status.success(), "{status}: {}", d.log_text());
    for (p, text) in [(&sock, "export"), (&ctl, "control"), (&pool, "pool")] {
        assert_eq!(
            std::fs::read_to_string(p).unwrap(),
            text,
            "{} was removed",
            p.display()
        );
    }
    std::fs::remove_dir_all(pool.parent().unwrap()).unwrap();
}

/// A runs cluster `id`; B, the same id in another run directory, must fail
/// without touching A's pool, which keeps serving; after A, B starts.
fn second_daemon_leaves_the_first_alone(a_args: &[&str], b_args: &[&[&str]]) {
    let mut a = Daemon::start(a_args);
    let pool = PathBuf::from(a.info().pool_path);
    let before = std::fs::metadata(&pool).unwrap();
    let other = tempfile::tempdir().unwrap();
    for args in b_args {
        let out = hostd_fails(a.id, other.path(), args);
        assert_error_line(
            &out,
            &format!(
                "zc-hostd: error: cluster {} is already served by zc-hostd (pid {}, run directory {}); stop it first or pick another cluster id",
                a.id,
                a.pid(),
                a.run_dir.path().display()
            ),
        );
        let after = std::fs::metadata(&pool).expect("A's pool file is still there");
        assert_eq!(
            (after.ino(), after.len()),
            (before.ino(), before.len()),
            "A's pool file is the same file"
        );
        assert!(!other.path().join(a.id.to_string()).exists());
    }
    round(&a, 0, 10_000);
    assert!(a.stop(libc::SIGTERM).success());
    assert_no_cluster_files(a.id, a.run_dir.path());
    let b = Daemon::start_in(a.id, other, b_args[0]);
    round(&b, 1, 1000);
}

#[test]
fn a_second_daemon_of_a_cluster_with_another_run_dir_fails_and_the_pool_stays() {
    // Whatever B's pool directory: the lock is the cluster id's.
    second_daemon_leaves_the_first_alone(SMALL, &[SMALL, &["-q", "2", "--buffers", "4096"]]);
}

#[test]
fn a_second_daemon_cannot_replace_a_hugepage_pool_either() {
    if !require(
        is_root() && hugetlbfs_mounted() && free_hugepages() >= 32,
        "root and 32 free hugepages on /dev/hugepages",
    ) {
        return;
    }
    let hp: &[&str] = &["-q", "2", "--buffers", "4096"];
    second_daemon_leaves_the_first_alone(hp, &[hp, SMALL]);
}

#[test]
fn a_core_the_process_cannot_use_fails_at_start_and_creates_nothing() {
    // The cores this process may use, as the kernel writes them ("0-1").
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string();
    let last = |s: &str| -> usize { s.rsplit([',', '-']).next().unwrap().parse().unwrap() };
    let first: usize = list.split([',', '-']).next().unwrap().parse().unwrap();
    let past = last(&list) + 1;
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let sock = dir.path().join("vm.sock");
    let export = format!("{},rx=0", sock.display());
    for (g, core) in [
        ("1024".to_string(), 1024),
        (format!("{first},{past}"), past),
    ] {
        let id = unique_cluster();
        let mut args = SMALL.to_vec();
        args.extend(["--export", &export, "-g", &g]);
        let out = hostd_fails(id, &run, &args);
        assert_error_line(
            &out,
            &format!(
                "zc-hostd: error: -g: core {core} is not available: this process may run on cores {list}; pick one of those"
            ),
        );
        assert_no_cluster_files(id, &run);
        assert!(!sock.exists());
        assert!(!run.exists(), "not even the run directory is created");
    }
    // zsend and zcount check -g the same way.
    for tool in ["zsend", "zcount"] {
        let out = Command::new(bin(tool))
            .args(["-i", "zc:1@0", "-g", "1024"])
            .output()
            .unwrap();
        assert_error_line(
            &out,
            &format!(
                "{tool}: -g: core 1024 is not available: this process may run on cores {list}; pick one of those"
            ),
        );
    }
}
