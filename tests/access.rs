//! Who may attach to a cluster: the control socket's group (`--group`,
//! `--mode`), checked by the socket's file mode and by the daemon on each
//! peer's credentials, and queues reserved with `--allow`. The tools run
//! as non-root users through setpriv (uid 65534 = nobody, and uids and
//! gids that need no passwd or group entry), so nothing is created on the
//! machine.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

/// The control socket's group in these tests, and a second one for
/// `--allow Q=@GROUP`: numeric, no group entry needed.
const GROUP: u32 = 61_234;
const OTHER_GROUP: u32 = 61_236;
/// A second non-root uid besides nobody's.
const OTHER_UID: u32 = 61_235;
const NOBODY: u32 = 65_534;

/// The tools, copied where any user may run them (the build's own
/// directory may be under a home that other users cannot enter).
struct Tools(tempfile::TempDir);

impl Tools {
    fn new() -> Tools {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        for t in ["zc-hostd", "zcount", "zsend"] {
            std::fs::copy(bin(t), dir.path().join(t)).unwrap();
        }
        Tools(dir)
    }

    /// `tool` of the cluster of `d`, run as `uid` with primary group `gid`
    /// and exactly the supplementary `groups`.
    fn as_user(&self, d: &Daemon, uid: u32, gid: u32, groups: &[u32], tool: &str) -> Command {
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"));
        if groups.is_empty() {
            c.arg("--clear-groups");
        } else {
            let list: Vec<String> = groups.iter().map(u32::to_string).collect();
            c.arg(format!("--groups={}", list.join(",")));
        }
        c.arg(self.0.path().join(tool))
            .env("ZC_RUN_DIR", d.run_dir.path());
        c
    }
}

/// A daemon whose run directory other users may enter.
fn daemon(args: &[&str]) -> Daemon {
    let mut all = vec!["-q", "4", "--buffers", "8192", "--no-hugepages"];
    all.extend_from_slice(args);
    let d = Daemon::start(&all);
    open_to_all(d.run_dir.path());
    d
}

fn open_to_all(dir: &Path) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn run(mut c: Command) -> Output {
    wait_output(
        c.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
        Duration::from_secs(60),
    )
}

fn refusal(cluster: u32, uid: u32) -> String {
    format!(
        "cluster {cluster}: uid {uid} may not attach: its control socket is for group {}; run as a member of that group or as root",
        zc_host::access::group_text(GROUP)
    )
}

fn group_flag() -> String {
    GROUP.to_string()
}

#[test]
fn a_user_outside_the_group_is_refused_with_one_line_naming_cluster_and_group() {
    if !require(is_root(), "root (setpriv to other users)") {
        return;
    }
    let tools = Tools::new();
    let g = group_flag();
    // 0660: the socket's file mode stops the process; its client says why.
    // 0666: the process connects, the daemon checks its credentials.
    for mode in ["0660", "0666"] {
        let d = daemon(&["--group", &g, "--mode", mode]);
        let meta = std::fs::metadata(d.ctl()).unwrap();
        assert_eq!(
            meta.permissions().mode() & 0o777,
            u32::from_str_radix(mode, 8).unwrap()
        );
        assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), GROUP);
        for tool in ["zcount", "zsend"] {
            let mut c = tools.as_user(&d, NOBODY, NOBODY, &[], tool);
            c.args(["-i", &d.name(0), "-n", "10"]);
            let out = run(c);
            assert_one_line_error(&out, &refusal(d.id, NOBODY));
        }
        if mode == "0666" {
            assert!(
                d.log_text().contains(&refusal(d.id, NOBODY)),
                "{}",
                d.log_text()
            );
        }
        // Refused peers left nothing behind: the queue is free for root.
        let mut c = d.tool("zsend");
        c.args(["-i", &d.name(0), "-n", "10"]);
        assert!(run(c).status.success());
    }
}

#[test]
fn members_of_the_group_attach_and_move_every_packet() {
    if !require(is_root(), "root (setpriv to other users)") {
        return;
    }
    let tools = Tools::new();
    let g = group_flag();
    let d = daemon(&["--group", &g]);
    let spare = d.info().spare_buffers;
    // A member by its primary group consumes, one by a supplementary group produces.
    let mut count = tools.as_user(&d, NOBODY, GROUP, &[], "zcount");
    count.args([
        "-i",
        &d.name(2),
        "-n",
        "5000",
        "--verify",
        "--json",
        "--wait",
        "20",
    ]);
    let count = count
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut send = tools.as_user(&d, OTHER_UID, OTHER_UID, &[OTHER_GROUP, GROUP], "zsend");
    send.args(["-i", &d.name(2), "-n", "5000", "-l", "200", "--wait", "20"]);
    let sent = run(send);
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let counted = wait_output(count, Duration::from_secs(60));
    assert!(
        counted.status.success(),
        "{}",
        String::from_utf8_lossy(&counted.stderr)
    );
    let v = json(&counted);
    assert_eq!(v["packets"], 5000, "{v}");
    assert_eq!(v["bytes"], 5000 * 200, "{v}");
    assert_eq!(v["seq_errors"], 0, "{v}");
    assert_eq!(v["checksum_errors"], 0, "{v}");
    // A member may read the statistics, but not make the daemon act with
    // its rights.
    let mut stats = tools.as_user(&d, NOBODY, GROUP, &[], "zc-hostd");
    stats.args(["-c", &d.id.to_string(), "stats"]);
    let out = run(stats);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut mv = tools.as_user(&d, NOBODY, GROUP, &[], "zc-hostd");
    mv.args(["-c", &d.id.to_string(), "move", "vm.sock", "0"]);
    assert_one_line_error(
        &run(mv),
        &format!(
            "zc-hostd: error: cluster {}: uid {NOBODY} may not move ports: only root (or zc-hostd's own user) may",
            d.id
        ),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while d.info().spare_buffers != spare {
        assert!(std::time::Instant::now() < deadline, "buffers not back");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_reserved_queue_refuses_other_uids_and_groups() {
    if !require(is_root(), "root (setpriv to other users)") {
        return;
    }
    let tools = Tools::new();
    let g = group_flag();
    let for_uid = format!("1={OTHER_UID}");
    let for_group = format!("3=@{OTHER_GROUP}");
    let d = daemon(&["--group", &g, "--allow", &for_uid, "--allow", &for_group]);
    let try_queue = |uid: u32, groups: &[u32], q: u16| {
        let mut c = tools.as_user(&d, uid, uid, groups, "zsend");
        c.args(["-i", &d.name(q), "-n", "10"]);
        run(c)
    };
    let reserved = |q: u16, who: &str, uid: u32| {
        format!(
            "zsend: {}: cluster {}: queue {q} is reserved for {who} (zc-hostd --allow): uid {uid} may not take it",
            d.name(q),
            d.id
        )
    };
    // Another tenant (in the socket's group, so let in) cannot take queue 1.
    let out = try_queue(NOBODY, &[GROUP], 1);
    assert_one_line_error(&out, &reserved(1, &format!("uid {OTHER_UID}"), NOBODY));
    // The uid it is reserved for can; so can root.
    for out in [
        try_queue(OTHER_UID, &[GROUP], 1),
        run({
            let mut c = d.tool("zsend");
            c.args(["-i", &d.name(1), "-n", "10"]);
            c
        }),
    ] {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Queue 3 is for the members of OTHER_GROUP.
    let out = try_queue(OTHER_UID, &[GROUP], 3);
    let who = format!("group {}", zc_host::access::group_text(OTHER_GROUP));
    assert_one_line_error(&out, &reserved(3, &who, OTHER_UID));
    let out = try_queue(NOBODY, &[GROUP, OTHER_GROUP], 3);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Queues without a reservation are any member's.
    let out = try_queue(NOBODY, &[GROUP], 0);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bad_access_options_are_one_line_errors() {
    let run_dir = tempfile::tempdir().unwrap();
    let id = unique_cluster().to_string();
    let hostd = |args: &[&str]| {
        let out = Command::new(bin("zc-hostd"))
            .args(["-c", &id, "-q", "4", "--no-hugepages", "--buffers", "8192"])
            .arg("--run-dir")
            .arg(run_dir.path())
            .args(args)
            .output()
            .unwrap();
        // Nothing was created.
        assert!(!run_dir.path().join(&id).exists());
        out
    };
    let g = group_flag();
    for (args, want) in [
        (
            vec!["--group", "no-such-group-zc"],
            "zc-hostd: error: --group no-such-group-zc: no such group (see getent group; or give a numeric gid)".to_string(),
        ),
        (
            vec!["--mode", "0999"],
            "zc-hostd: error: --mode 0999: not a file mode; give octal permissions like 0660".into(),
        ),
        (
            vec!["--mode", "0600", "--group", &g],
            format!("zc-hostd: error: --mode 0600 gives the control socket's group no read and write, so members of {} could not connect: give it both, e.g. --mode 0660", zc_host::access::group_text(GROUP)),
        ),
        (
            vec!["--allow", "4=1000"],
            format!("zc-hostd: error: --allow 4=1000: cluster {id} has queues 0..3"),
        ),
        (
            vec!["--allow", "1=no-such-user-zc"],
            "zc-hostd: error: --allow no-such-user-zc: no such user (see getent passwd; or give a numeric uid)".into(),
        ),
        (
            vec!["--allow", "1=@no-such-group-zc"],
            "zc-hostd: error: --allow no-such-group-zc: no such group (see getent group; or give a numeric gid)".into(),
        ),
        (
            vec!["--allow", "everyone"],
            "zc-hostd: error: --allow everyone: give QUEUE=USER or QUEUE=@GROUP (a name or a number), e.g. --allow 3=1000 or --allow 3=@tenant-a".into(),
        ),
    ] {
        let out = hostd(&args);
        assert_one_line_error(&out, &want);
        let line = String::from_utf8_lossy(&out.stderr);
        assert_eq!(line.trim_end(), want, "{args:?}");
    }
}
