//! `zsend -f` replays captures into a queue and `zdump` writes what a queue
//! carries as pcap; tshark, an independent reader, checks the result.

mod common;

use common::*;
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketBlock;
use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption,
};
use pcap_file::pcapng::PcapNgWriter;
use pcap_file::DataLink;
use std::borrow::Cow;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Distinct Ethernet/IPv4/UDP-looking frames of lengths 60..=1514: every
/// byte depends on the frame's number, so a reordered, lost, duplicated or
/// damaged frame shows.
fn frames(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let len = 60 + (i * 397) % (1514 - 60 + 1);
            let mut f = vec![0u8; len];
            f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
            f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
            f[12..14].copy_from_slice(&[0x08, 0x00]);
            f[14..18].copy_from_slice(&(i as u32).to_be_bytes());
            for (j, b) in f.iter_mut().enumerate().skip(18) {
                *b = (i as u32).wrapping_mul(31).wrapping_add(j as u32 * 7) as u8;
            }
            f
        })
        .collect()
}

fn write_pcap(path: &Path, frames: &[Vec<u8>], datalink: DataLink, gap: Duration) {
    let header = PcapHeader {
        datalink,
        ..PcapHeader::default()
    };
    let mut w = PcapWriter::with_header(std::fs::File::create(path).unwrap(), header).unwrap();
    for (i, f) in frames.iter().enumerate() {
        let ts = Duration::from_secs(1_700_000_000) + gap * i as u32;
        w.write_packet(&PcapPacket::new(ts, f.len() as u32, f))
            .unwrap();
    }
}

/// pcapng with nanosecond timestamps (if_tsresol 9), so the units of its
/// timestamps are not the default microseconds.
fn write_pcapng(path: &Path, frames: &[Vec<u8>], gap: Duration) {
    let mut w = PcapNgWriter::new(std::fs::File::create(path).unwrap()).unwrap();
    let idb = InterfaceDescriptionBlock {
        linktype: DataLink::ETHERNET,
        snaplen: 0,
        options: vec![InterfaceDescriptionOption::IfTsResol(9)],
    };
    w.write_pcapng_block(idb).unwrap();
    for (i, f) in frames.iter().enumerate() {
        // The crate writes the Duration's nanoseconds as the raw count.
        let ts = Duration::from_secs(1_700_000_000) + gap * i as u32;
        let epb = EnhancedPacketBlock {
            interface_id: 0,
            timestamp: ts,
            original_len: f.len() as u32,
            data: Cow::Borrowed(f),
            options: vec![],
        };
        w.write_pcapng_block(epb).unwrap();
    }
}

/// Every frame of a capture, as tshark reads it, in order.
fn tshark_frames(path: &Path) -> Vec<Vec<u8>> {
    let out = Command::new("tshark")
        .args(["-r"])
        .arg(path)
        .args(["-T", "json", "-x"])
        .stderr(Stdio::piped())
        .output()
        .expect("run tshark");
    assert!(
        out.status.success(),
        "tshark -r {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    parse_tshark_json(&out.stdout)
}

fn parse_tshark_json(stdout: &[u8]) -> Vec<Vec<u8>> {
    let v: serde_json::Value = serde_json::from_slice(stdout).expect("tshark JSON");
    v.as_array()
        .expect("a list of packets")
        .iter()
        .map(|p| {
            let hex = p["_source"]["layers"]["frame_raw"][0]
                .as_str()
                .unwrap_or_else(|| panic!("no frame_raw in {p}"));
            (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect()
        })
        .collect()
}

fn have_tshark() -> bool {
    require(
        Command::new("tshark").arg("--version").output().is_ok(),
        "tshark (apt-get install tshark; scripts/setup.sh installs it)",
    )
}

fn daemon() -> Daemon {
    Daemon::start(&["-q", "1", "--buffers", "4096", "--no-hugepages"])
}

fn zsend_file(d: &Daemon, file: &Path, extra: &[&str]) -> std::process::Output {
    d.tool("zsend")
        .args(["-i", &d.name(0), "-f"])
        .arg(file)
        .args(extra)
        .arg("--json")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn assert_same(got: &[Vec<u8>], want: &[Vec<u8>]) {
    assert_eq!(got.len(), want.len(), "frame count");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g == w,
            "frame {i} differs: {} vs {} bytes",
            g.len(),
            w.len()
        );
    }
}

#[test]
fn a_replayed_capture_is_dumped_byte_for_byte_and_in_order() {
    if !have_tshark() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.pcap");
    let output = dir.path().join("out.pcap");
    let want = frames(300);
    write_pcap(&input, &want, DataLink::ETHERNET, Duration::from_micros(10));
    let d = daemon();
    let spare = d.info().spare_buffers;
    let dump = d
        .tool("zdump")
        .args(["-i", &d.name(0), "-w"])
        .arg(&output)
        .args(["-c", "600", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let sent = zsend_file(&d, &input, &["-n", "2"]);
    assert!(
        sent.status.success(),
        "zsend: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let total: u64 = want.iter().map(|f| f.len() as u64).sum();
    assert_eq!(json(&sent)["packets"], 600);
    assert_eq!(json(&sent)["bytes"], 2 * total);
    let dumped = wait_output(dump, TIMEOUT);
    assert!(
        dumped.status.success(),
        "zdump: {}",
        String::from_utf8_lossy(&dumped.stderr)
    );
    assert_eq!(json(&dumped)["packets"], 600);
    assert_eq!(json(&dumped)["bytes"], 2 * total);
    let twice: Vec<Vec<u8>> = want.iter().chain(&want).cloned().collect();
    assert_same(&tshark_frames(&output), &twice);
    // Nanosecond pcap: the magic number says so (tcpdump's "nano" format).
    let head = std::fs::read(&output).unwrap();
    assert_eq!(&head[..4], &0xa1b2_3c4d_u32.to_ne_bytes());
    // Both tools are gone: every buffer is back.
    assert_eq!(d.info().spare_buffers, spare);
}

#[test]
// zdump is waited for once tshark has read the end of its stream; clippy
// counts the asserts in between as paths that skip the wait.
#[allow(clippy::zombie_processes)]
fn pcapng_with_original_timing_keeps_the_gaps_and_a_stream_feeds_tshark() {
    if !have_tshark() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.pcapng");
    let want = frames(21);
    // 20 gaps of 50 ms: one second of capture.
    write_pcapng(&input, &want, Duration::from_millis(50));
    let d = daemon();
    // zdump -w - | tshark -r -: the capture is a stream that tshark reads.
    let mut dump = d
        .tool("zdump")
        .args(["-i", &d.name(0), "-w", "-", "-c", "21"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its output goes to a file: a pipe nobody reads while we wait would fill.
    let json_out = dir.path().join("tshark.json");
    let tshark = Command::new("tshark")
        .args(["-r", "-", "-T", "json", "-x"])
        .stdin(dump.stdout.take().unwrap())
        .stdout(std::fs::File::create(&json_out).unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let sent = zsend_file(&d, &input, &["--timing", "original"]);
    let took = t.elapsed();
    assert!(
        sent.status.success(),
        "zsend: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    assert_eq!(json(&sent)["packets"], 21);
    assert!(
        took >= Duration::from_millis(990) && took < Duration::from_secs(5),
        "a one-second capture replayed in {took:?}"
    );
    let read = wait_output(tshark, TIMEOUT);
    assert!(
        read.status.success(),
        "tshark: {}",
        String::from_utf8_lossy(&read.stderr)
    );
    assert_same(
        &parse_tshark_json(&std::fs::read(&json_out).unwrap()),
        &want,
    );

    // -r paces a replay too: 100 packets at 500 per second take 0.2 s.
    let output = dir.path().join("out.pcap");
    let dump = d
        .tool("zdump")
        .args(["-i", &d.name(0), "-w"])
        .arg(&output)
        .args(["-c", "105"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let sent = zsend_file(&d, &input, &["-n", "5", "-r", "500"]);
    let took = t.elapsed();
    assert_eq!(json(&sent)["packets"], 105);
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(5),
        "105 packets at 500 pps took {took:?}"
    );
    assert!(wait_output(dump, TIMEOUT).status.success());
    let five: Vec<Vec<u8>> = (0..5).flat_map(|_| want.iter().cloned()).collect();
    assert_same(&tshark_frames(&output), &five);
}

#[test]
fn snaplen_keeps_the_head_of_each_packet_and_its_length() {
    if !have_tshark() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.pcap");
    let output = dir.path().join("out.pcap");
    let want = frames(40);
    write_pcap(&input, &want, DataLink::ETHERNET, Duration::ZERO);
    let d = daemon();
    let dump = d
        .tool("zdump")
        .args(["-i", &d.name(0), "-w"])
        .arg(&output)
        .args(["-c", "40", "-s", "100"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(zsend_file(&d, &input, &[]).status.success());
    assert!(wait_output(dump, TIMEOUT).status.success());
    let heads: Vec<Vec<u8>> = want
        .iter()
        .map(|f| f[..f.len().min(100)].to_vec())
        .collect();
    assert_same(&tshark_frames(&output), &heads);
    let lens = Command::new("tshark")
        .arg("-r")
        .arg(&output)
        .args(["-T", "fields", "-e", "frame.len"])
        .stderr(Stdio::null())
        .output()
        .unwrap();
    let lens: Vec<usize> = String::from_utf8_lossy(&lens.stdout)
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(lens, want.iter().map(Vec::len).collect::<Vec<_>>());
    // A snapped capture (packets longer on the wire than in the file)
    // replays what the file holds of each.
    let again = dir.path().join("again.pcap");
    let dump = d
        .tool("zdump")
        .args(["-i", &d.name(0), "-w"])
        .arg(&again)
        .args(["-c", "40"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let sent = zsend_file(&d, &output, &[]);
    assert!(
        sent.status.success(),
        "zsend: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    assert!(wait_output(dump, TIMEOUT).status.success());
    assert_same(&tshark_frames(&again), &heads);
}

#[test]
fn bad_captures_are_one_line_errors_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon();
    let spare = d.info().spare_buffers;
    let f = |name: &str| dir.path().join(name);

    write_pcap(&f("raw.pcap"), &frames(3), DataLink::RAW, Duration::ZERO);
    let out = zsend_file(&d, &f("raw.pcap"), &[]);
    assert_one_line_error(
        &out,
        "raw.pcap: link type 101 (RAW) is not Ethernet: zc queues carry Ethernet frames",
    );

    std::fs::write(f("junk.pcap"), b"this is not a capture file at all").unwrap();
    assert_one_line_error(
        &zsend_file(&d, &f("junk.pcap"), &[]),
        "junk.pcap: not a pcap or pcapng file",
    );
    std::fs::write(f("empty.pcap"), b"").unwrap();
    assert_one_line_error(
        &zsend_file(&d, &f("empty.pcap"), &[]),
        "empty.pcap: not a pcap or pcapng file",
    );
    assert_one_line_error(
        &zsend_file(&d, &f("missing.pcap"), &[]),
        "missing.pcap: No such file or directory",
    );

    // A capture cut off in the middle of its fourth packet: the three
    // whole ones go out, then the error says where the file broke.
    write_pcap(
        &f("cut.pcap"),
        &frames(4),
        DataLink::ETHERNET,
        Duration::ZERO,
    );
    let bytes = std::fs::read(f("cut.pcap")).unwrap();
    std::fs::write(f("cut.pcap"), &bytes[..bytes.len() - 10]).unwrap();
    let dump = d
        .tool("zdump")
        .args(["-i", &d.name(0), "-w"])
        .arg(f("cut-out.pcap"))
        .args(["-c", "3", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert_one_line_error(
        &zsend_file(&d, &f("cut.pcap"), &[]),
        "cut.pcap: corrupt or truncated after packet 3: the file ends inside a block",
    );
    assert_eq!(json(&wait_output(dump, TIMEOUT))["packets"], 3);

    // A pcapng whose packet names an interface it never described (the
    // crate's writer refuses to write one: the bytes are spelled out).
    let mut noif = Vec::new();
    for w in [0x0a0d_0d0a_u32, 28, 0x1a2b_3c4d, 1] {
        noif.extend_from_slice(&w.to_le_bytes());
    }
    noif.extend_from_slice(&(-1i64).to_le_bytes());
    noif.extend_from_slice(&28u32.to_le_bytes());
    for w in [6u32, 32 + 60, 0, 0, 0, 60, 60] {
        noif.extend_from_slice(&w.to_le_bytes());
    }
    noif.extend_from_slice(&[0u8; 60]);
    noif.extend_from_slice(&(32u32 + 60).to_le_bytes());
    std::fs::write(f("noif.pcapng"), noif).unwrap();
    assert_one_line_error(
        &zsend_file(&d, &f("noif.pcapng"), &[]),
        "noif.pcapng: corrupt or truncated after packet 0: a packet names interface 0",
    );

    // Flags that contradict each other.
    let out = d
        .tool("zdump")
        .args(["-i", &d.name(0), "-w", "-", "--json"])
        .output()
        .unwrap();
    assert_one_line_error(&out, "--json prints to stdout, which -w - fills");
    assert_eq!(d.info().spare_buffers, spare);
}

#[test]
fn a_full_disk_ends_zdump_with_one_line() {
    let d = daemon();
    let spare = d.info().spare_buffers;
    let dump = d
        .tool("zdump")
        .args(["-i", &d.name(0), "-w", "/dev/full"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let send = d
        .tool("zsend")
        .args(["-i", &d.name(0), "-n", "100", "-l", "1000"])
        .output()
        .unwrap();
    assert!(send.status.success());
    let out = wait_output(dump, TIMEOUT);
    assert_one_line_error(
        &out,
        "zdump: /dev/full: cannot write the capture: No space left on device",
    );
    assert_eq!(d.info().spare_buffers, spare);
}

#[test]
fn a_full_tmpfs_ends_zdump_with_one_line() {
    if !require(is_root(), "root (to mount a tmpfs)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("tiny");
    std::fs::create_dir(&mnt).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tiny"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _u = Unmount(&mnt);
    let d = daemon();
    let file = mnt.join("cap.pcap");
    let dump = d
        .tool("zdump")
        .args(["-i", &d.name(0), "-w"])
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // 200 kB of packets into 64 kB of file system.
    let send = d
        .tool("zsend")
        .args(["-i", &d.name(0), "-n", "200", "-l", "1000"])
        .output()
        .unwrap();
    assert!(send.status.success());
    let out = wait_output(dump, TIMEOUT);
    assert_one_line_error(
        &out,
        &format!(
            "zdump: {}: cannot write the capture: No space left on device",
            file.display()
        ),
    );
}
