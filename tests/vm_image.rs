//! The guest image boots, runs the kernel command line's command with the zc
//! tools present, and reports its exit status.

mod common;

use common::vm::{self, Guest, GuestSpec};
use common::*;
use std::time::Duration;

#[test]
fn guest_runs_the_command_line_command_and_reports_its_status() {
    if !require(vm::have_qemu(), "qemu-system-x86_64") {
        return;
    }
    let _one_at_a_time = vm::serialise();
    let mut g = Guest::boot(&GuestSpec {
        name: "image".into(),
        run: "uname -r; grep -c ^virtio_net /proc/modules; zcount --version; zping --version; zsend -i zc:1@0 -n 1; exit 3".into(),
        ..Default::default()
    });
    let run = g.wait_exit(Duration::from_secs(180));
    assert_eq!(run.status, 3, "{}", run.log);
    let lines: Vec<&str> = run.output.lines().map(str::trim).collect();
    assert!(
        lines[0].ends_with("-amd64"),
        "kernel release: {}",
        run.output
    );
    assert_eq!(lines[1], "1", "virtio_net is loaded: {}", run.output);
    assert!(lines[2].starts_with("zcount "), "{}", run.output);
    assert!(lines[3].starts_with("zping "), "{}", run.output);
    assert!(
        run.output.lines().any(|l| l.starts_with("zsend: zc:1@0: ")),
        "the tools run inside the guest and explain themselves: {}",
        run.output
    );
}
