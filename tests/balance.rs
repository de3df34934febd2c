//! Distribution inside a cluster: zsend's multi-flow traffic, the balancer
//! (`zc-hostd --balance`) splitting it by a symmetric flow hash and fanning
//! it out by reference, as separate processes the way users run them.

mod common;

use common::*;
use std::process::Stdio;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn zsend_flows_reach_zcount_as_that_many_flows_both_ways() {
    let d = Daemon::start(&["-q", "1", "--buffers", "4096", "--no-hugepages"]);
    let name = d.name(0);
    let count = d
        .tool("zcount")
        .args(["-i", &name, "-n", "5000", "--verify", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let send = d
        .tool("zsend")
        .args(["-i", &name, "-n", "5000", "--flows", "100", "--seed", "3"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_output(send, TIMEOUT).status.success());
    let v = json(&wait_output(count, TIMEOUT));
    assert_eq!(v["packets"], 5000, "{v}");
    assert_eq!(v["flows"], 100, "{v}");
    assert_eq!(v["flow_directions"], 200, "{v}");
    assert_eq!(v["checksum_errors"], 0, "payloads are zsend's: {v}");
    assert_eq!(v["seq_errors"], 0, "{v}");
    // --seed without --flows is a usage error, before anything is opened.
    let out = d
        .tool("zsend")
        .args(["-i", &name, "-n", "1", "--seed", "3"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--flows"));
}
