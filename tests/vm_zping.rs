//! zping in a TCG guest, through the zc guest driver's PCI transport and an
//! export, both ways round, in one boot:
//!
//! 1. the guest's zping (one device: it sends into queue 1, receives from
//!    queue 0) to a host reflector (consumes 1, produces 0);
//! 2. host zping (sends into 0, receives from 1) to the guest's reflector,
//!    which sends each packet back in the buffer it arrived in.
//!
//! Exact counts, and every reply in the buffer its probe left in (zero-copy
//! through guest, export and host); times under TCG are not asserted. First,
//! naming one device twice (-i and -o) is one line saying so.
//! Needs root and qemu-system-x86_64; skips without them unless CI is set.

mod common;

use common::vm::{self, Guest, GuestSpec};
use common::*;
use std::process::Stdio;
use std::time::Duration;

const N: u64 = 1000;
const BOOT_AND_RUN: Duration = Duration::from_secs(300);

fn exact(v: &serde_json::Value, what: &str) {
    for (k, want) in [
        ("sent", N),
        ("received", N),
        ("lost", 0),
        ("duplicates", 0),
        ("bad", 0),
        ("skipped", 0),
        ("same_buffer", N),
    ] {
        assert_eq!(v[k], want, "{what}: {k} in {v}");
    }
    assert!(v["rtt_ns"]["min"].as_u64().unwrap() > 0, "{what}: {v}");
}

#[test]
fn zping_in_a_guest_to_a_host_reflector_and_back_exactly() {
    if !require(vm::have_qemu() && is_root(), "root and qemu-system-x86_64") {
        return;
    }
    let _one_at_a_time = vm::serialise();
    let (d, sock) = Daemon::with_vm_export();
    let c = d.id;
    let host_reflector = d
        .tool("zping")
        .args(["--reflect", "-i", &d.name(1), "-o", &d.name(0)])
        .args(["-c", &N.to_string(), "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Replies may take long under TCG: a generous timeout, so that none is
    // counted lost while the guest is merely slow.
    let mut g = Guest::boot(&GuestSpec {
        name: "zping".into(),
        run: format!(
            "zping -i zc:{c}@1 -o zc:{c}@0 -c 1 2>/tmp/e; echo ZC-SAME $(cat /tmp/e); \
             zping -i zc:{c}@1 -c {N} -r 200 --timeout 30 --json >/tmp/a 2>/tmp/e; echo ZC-P1 $(cat /tmp/a) $(tail -1 /tmp/e); \
             zping --reflect -i zc:{c}@0 -c {N} --json >/tmp/b 2>/tmp/e & h=$!; sleep 5; echo ZC-S2; \
             wait $h; echo ZC-P2 $(cat /tmp/b) $(tail -1 /tmp/e)"
        ),
        qemu_args: d.qemu_args(&sock, "1G"),
        ..Default::default()
    });
    // Two names for one device: one line saying so (the device is given
    // back, so the runs below can open it).
    let same = g.line("ZC-SAME", BOOT_AND_RUN);
    assert!(
        same.starts_with(&format!(
            "zping: -i zc:{c}@1 and -o zc:{c}@0 lead to the same device ("
        )) && same.ends_with("which carries both directions: leave out -o"),
        "{same}"
    );
    let p1 = g.line("ZC-P1", BOOT_AND_RUN);
    let v: serde_json::Value = serde_json::from_str(json_part(&p1))
        .unwrap_or_else(|e| panic!("guest zping: {p1:?}: {e}\n{}", g.serial()));
    exact(&v, "guest zping");
    let out = wait_output(host_reflector, Duration::from_secs(30));
    assert_eq!(json(&out)["packets"], N, "the host reflector's count");
    let e = export_named(&d, &sock);
    assert_eq!((e.tx.exchanged, e.tx.copied), (N, 0), "{e:?}");
    assert_eq!((e.rx.exchanged, e.rx.copied), (N, 0), "{e:?}");

    g.line("ZC-S2", BOOT_AND_RUN);
    let ping = d
        .tool("zping")
        .args(["-i", &d.name(0), "-o", &d.name(1), "-c", &N.to_string()])
        .args(["-r", "200", "--timeout", "30", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_output(ping, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exact(&json(&out), "host zping to the guest's reflector");
    let run = g.wait_exit(BOOT_AND_RUN);
    assert_eq!(run.status, 0, "{}", run.log);
    let p2 = g.line("ZC-P2", Duration::from_secs(1));
    let v: serde_json::Value = serde_json::from_str(json_part(&p2)).unwrap();
    assert_eq!(v["packets"], N, "the guest reflector's count: {p2}");
    assert_eq!(v["drops"], 0);
    let e = export_named(&d, &sock);
    assert_eq!((e.tx.exchanged, e.tx.copied), (2 * N, 0), "{e:?}");
    assert_eq!((e.rx.exchanged, e.rx.copied), (2 * N, 0), "{e:?}");
}

/// The JSON object at the start of a result line (the tool's last stderr
/// line follows it, for diagnosis).
fn json_part(line: &str) -> &str {
    let mut depth = 0;
    for (i, ch) in line.char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return &line[..=i];
                }
            }
            _ => {}
        }
    }
    line
}
