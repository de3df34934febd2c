//! `zc-hostd --metrics` scraped by a real Prometheus server (Debian's
//! `prometheus`, started here on loopback and stopped again): what
//! Prometheus stores for an export equals what the guest driver counted,
//! and the exposition has HELP and TYPE lines. No VM: the guest driver
//! runs over vhost-user.
//!
//! Needs the prometheus binary (scripts/setup.sh installs it); skips
//! without it unless CI is set.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A plain HTTP/1.0 GET on loopback: status line and body.
fn get(addr: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_string(), body.to_string())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The value Prometheus has for an instant query, if any.
fn query(prom: &str, q: &str) -> Option<f64> {
    let enc: String = q
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (_, body) = get(prom, &format!("/api/v1/query?query={enc}"));
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[test]
fn prometheus_scrapes_the_export_counters_the_guest_driver_counted() {
    let have = Command::new("prometheus")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !require(have, "prometheus (apt-get install prometheus)") {
        return;
    }
    let (d, sock) = Daemon::with_vm_export_and(&["--metrics", "127.0.0.1:0"]);
    let log = d.log_text();
    let metrics = log
        .lines()
        .find_map(|l| l.strip_prefix("zc-hostd: metrics on http://"))
        .and_then(|l| l.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("no metrics address in: {log}"))
        .to_string();

    // The exposition itself: OpenMetrics, HELP and TYPE per family.
    let (head, body) = get(&metrics, "/metrics");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    assert!(head.contains("application/openmetrics-text"), "{head}");
    let c = d.id;
    let export = sock.file_name().unwrap().to_str().unwrap();
    for line in [
        "# HELP zc_export_rx_packets Packets delivered to the guest.".to_string(),
        "# TYPE zc_export_rx_packets counter".to_string(),
        format!("zc_export_rx_packets_total{{cluster=\"{c}\",export=\"{export}\"}} 0"),
        format!("zc_cluster_buffers{{cluster=\"{c}\"}} 8192"),
        format!("zc_export_connected{{cluster=\"{c}\",export=\"{export}\"}} 0"),
        format!("zc_queue_depth{{cluster=\"{c}\",queue=\"0\"}} 0"),
    ] {
        assert!(body.lines().any(|l| l == line), "no {line:?} in:\n{body}");
    }
    let (head, _) = get(&metrics, "/other");
    assert!(head.contains(" 404"), "{head}");

    let dir = tempfile::tempdir().unwrap();
    let prom_addr = format!("127.0.0.1:{}", free_port());
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: zc\n    static_configs:\n      - targets: ['{metrics}']\n"
        ),
    )
    .unwrap();
    let prom = Prometheus(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={prom_addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .expect("start prometheus"),
    );

    // Host zsend -> export rx=0 -> guest driver zcount over vhost-user.
    const N: u64 = 20_000;
    let count = d
        .tool("zcount")
        .args([
            "-i",
            &d.name(0),
            "-n",
            &N.to_string(),
            "--json",
            "--vhost-user",
        ])
        .arg(&sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while export_named(&d, &sock).dev.connected == 0 {
        assert!(
            Instant::now() < deadline,
            "the guest driver did not connect"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = d
        .tool("zsend")
        .args(["-i", &d.name(0), "-n", &N.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let counted = json(&wait_output(count, Duration::from_secs(60)))["packets"]
        .as_u64()
        .unwrap();
    assert_eq!(counted, N);

    let q = format!("zc_export_rx_packets_total{{cluster=\"{c}\",export=\"{export}\"}}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if query(&prom_addr, &q) == Some(counted as f64) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus has {:?} for {q}, zcount counted {counted}; its log:\n{}",
            query(&prom_addr, &q),
            std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let q = format!("zc_export_rx_exchanged_total{{cluster=\"{c}\",export=\"{export}\"}}");
    assert_eq!(query(&prom_addr, &q), Some(counted as f64), "zero-copy");
    let q = format!("zc_queue_consumed_total{{cluster=\"{c}\",queue=\"0\"}}");
    assert_eq!(
        query(&prom_addr, &q),
        Some(counted as f64),
        "queue 0 consumed"
    );
    drop(prom);
}
