//! zc-hostd exports driven by a test vhost-user frontend (the `vhost`
//! crate's frontend over a memfd "guest RAM" plus the pool file): both
//! data paths with exact counts and payloads, and hostile rings.

mod common;

use common::*;
use std::time::{Duration, Instant};
use zc_host::client::{HostRx, HostTx};
use zc_host::port::export::directory;
use zc_proto::layout::{EXPORT_ACTIVE, NO_QUEUE};
use zc_proto::{QueueEnd, Receiver, Sender};

/// Sends `pkts` on cluster queue `q` from a host process (a thread here).
fn host_send(h: &Hostd, q: u16, pkts: Vec<Vec<u8>>) -> std::thread::JoinHandle<()> {
    let mut tx = HostTx::open(&h.run_dir(), h.cluster, q).unwrap();
    std::thread::spawn(move || {
        let mut bufs = tx.take_buffers(32).unwrap();
        let view = tx.pool().clone();
        let deadline = Instant::now() + Duration::from_secs(20);
        for chunk in pkts.chunks(32) {
            for (b, p) in bufs.iter_mut().zip(chunk) {
                view.packet_mut(b).fill(p).unwrap();
            }
            let mut sent = 0;
            while sent < chunk.len() {
                let n = tx.send_burst(&mut bufs[sent..chunk.len()]);
                sent += n;
                if n == 0 {
                    assert!(Instant::now() < deadline, "host send stalled");
                    tx.wait_send(Duration::from_millis(1));
                }
            }
        }
    })
}

/// Receives exactly `n` packets from cluster queue `q` (a thread here),
/// then checks that no more arrive for a moment.
fn host_recv(h: &Hostd, q: u16, n: usize) -> std::thread::JoinHandle<Vec<Vec<u8>>> {
    let mut rx = HostRx::open(&h.run_dir(), h.cluster, q).unwrap();
    std::thread::spawn(move || {
        let mut bufs = rx.take_buffers(32).unwrap();
        let view = rx.pool().clone();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while out.len() < n && Instant::now() < deadline {
            let k = rx.recv_burst(&mut bufs);
            out.extend(bufs[..k].iter().map(|b| view.packet(b).to_vec()));
            if k == 0 {
                rx.wait_recv(Duration::from_millis(1));
            }
        }
        let quiet = Instant::now() + Duration::from_millis(200);
        while Instant::now() < quiet {
            let k = rx.recv_burst(&mut bufs);
            out.extend(bufs[..k].iter().map(|b| view.packet(b).to_vec()));
            std::thread::sleep(Duration::from_millis(5));
        }
        out
    })
}

/// Posts `count` single-descriptor RX buffers of `size` bytes in guest RAM.
fn post_rx_ram(f: &mut TestFrontend, count: usize, size: u32) -> Vec<u64> {
    let mut addrs = Vec::new();
    for _ in 0..count {
        let a = f.alloc(u64::from(size));
        f.rx.add(
            &f.mem,
            &[Seg {
                gpa: a,
                len: size,
                write: true,
            }],
        );
        addrs.push(a);
    }
    f.rx.publish(&f.mem);
    addrs
}

/// Posts the pool buffers `bufs` as single-descriptor RX buffers of a
/// whole packet plus header (the zero-copy path).
fn post_rx_pool(f: &mut TestFrontend, bufs: &[u32]) {
    let pool = f.mem.pool.as_ref().unwrap();
    let max = pool.layout.max_packet();
    for &b in bufs {
        f.rx.add(
            &f.mem,
            &[Seg {
                gpa: pool.desc_gpa(b),
                len: max + HDR as u32,
                write: true,
            }],
        );
    }
    f.rx.publish(&f.mem);
}

/// Sends `pkts` from the host on queue 0 and waits until the guest's RX
/// ring has used as many buffers; returns them.
fn deliver(h: &Hostd, f: &mut TestFrontend, pkts: Vec<Vec<u8>>) -> Vec<(u16, u32)> {
    let n = pkts.len();
    host_send(h, 0, pkts).join().unwrap();
    f.rx.wait_used(&f.mem, n)
}

/// Sends `pkts` through the guest's TX queue as [header][payload] chains.
fn guest_send(f: &mut TestFrontend, pkts: &[Vec<u8>]) {
    let hdr = f.alloc(HDR as u64);
    let mut done = 0;
    for chunk in pkts.chunks(64) {
        let mut bufs = Vec::new();
        for p in chunk {
            let a = f.alloc(p.len() as u64);
            f.mem.write(a, p);
            bufs.push(a);
            f.tx.add(
                &f.mem,
                &[
                    Seg {
                        gpa: hdr,
                        len: HDR as u32,
                        write: false,
                    },
                    Seg {
                        gpa: a,
                        len: p.len() as u32,
                        write: false,
                    },
                ],
            );
        }
        f.tx.publish(&f.mem);
        let used = f.tx.wait_used(&f.mem, chunk.len());
        for (id, len) in used {
            assert_eq!(len, 0, "TX used length");
            f.tx.recycle(&f.mem, id);
        }
        done += chunk.len();
        f.heap -= chunk
            .iter()
            .map(|p| (p.len() as u64 + 63) & !63)
            .sum::<u64>();
    }
    assert_eq!(done, pkts.len());
}

/// Sends `pkts` through the guest's TX queue from the pool buffers `bufs`
/// (the zero-copy path), one descriptor each; returns the heads.
fn guest_send_pool(f: &mut TestFrontend, bufs: &[u32], pkts: &[Vec<u8>]) -> Vec<u16> {
    let mut heads = Vec::new();
    for (&b, p) in bufs.iter().zip(pkts) {
        let gpa = f.mem.pool.as_ref().unwrap().desc_gpa(b);
        f.mem.write(gpa, &[0u8; HDR]);
        f.mem.write(gpa + HDR as u64, p);
        heads.push(f.tx.add(
            &f.mem,
            &[Seg {
                gpa,
                len: (HDR + p.len()) as u32,
                write: false,
            }],
        ));
    }
    f.tx.publish(&f.mem);
    heads
}

#[test]
fn copy_path_delivers_exact_packets_both_ways() {
    let h = Hostd::start(&["a.sock,rx=0,tx=1"], &[]);
    let mut f = TestFrontend::connect(&h, "a.sock", Setup::default());
    // Host to guest: 600 packets of 60..1500 bytes, 128 guest buffers recycled.
    let pkts: Vec<Vec<u8>> = (0..600u32)
        .map(|i| payload(i, 60 + (i as usize * 37) % 1441))
        .collect();
    let addrs = post_rx_ram(&mut f, 128, 2048);
    let sender = host_send(&h, 0, pkts.clone());
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while got < pkts.len() {
        assert!(
            Instant::now() < deadline,
            "received {got} of {}",
            pkts.len()
        );
        for (id, len) in f.rx.take_used(&f.mem) {
            let a = f.rx.desc_addr(&f.mem, id);
            assert!(addrs.contains(&a), "copy path must not move the descriptor");
            let want = &pkts[got];
            assert_eq!(len as usize, HDR + want.len(), "packet {got}");
            let data = f.mem.read(a, len as usize);
            assert_eq!(&data[..10], &[0u8; 10], "virtio-net header flags and gso");
            assert_eq!(u16::from_le_bytes([data[10], data[11]]), 1, "num_buffers");
            assert_eq!(&data[HDR..], &want[..], "payload of packet {got}");
            got += 1;
            // Give the buffer back.
            f.rx.push_head(&f.mem, id);
        }
        f.rx.publish(&f.mem);
        std::thread::yield_now();
    }
    sender.join().unwrap();
    // Guest to host: 500 packets as two-descriptor chains.
    let out: Vec<Vec<u8>> = (0..500u32)
        .map(|i| payload(i + 7, 60 + (i as usize * 53) % 1441))
        .collect();
    let receiver = host_recv(&h, 1, out.len());
    guest_send(&mut f, &out);
    let received = receiver.join().unwrap();
    assert_eq!(received.len(), out.len());
    assert!(received == out, "payloads differ");
    let s = h.export("a.sock");
    assert_eq!(s.rx.packets, 600);
    assert_eq!(s.rx.copied, 600);
    assert_eq!(s.rx.exchanged, 0);
    assert_eq!(s.rx.bytes, pkts.iter().map(|p| p.len() as u64).sum::<u64>());
    assert_eq!(s.tx.packets, 500);
    assert_eq!(s.tx.copied, 500);
    assert_eq!(
        (s.tx.invalid_desc, s.rx.invalid_desc, s.tx.drop_bad_len),
        (0, 0, 0)
    );
    assert_eq!(s.dev.connected, 1);
}

#[test]
fn mergeable_rx_spreads_a_packet_over_buffers() {
    let h = Hostd::start(&["m.sock,rx=0"], &[]);
    let mut f = TestFrontend::connect(&h, "m.sock", Setup::default());
    let addrs = post_rx_ram(&mut f, 200, 256);
    let pkts: Vec<Vec<u8>> = (0..40u32).map(|i| payload(i, 1000)).collect();
    let sender = host_send(&h, 0, pkts.clone());
    // 1012 bytes in 256-byte buffers: 4 buffers per packet.
    let used = f.rx.wait_used(&f.mem, 160);
    sender.join().unwrap();
    for (p, heads) in pkts.iter().zip(used.chunks(4)) {
        let mut data = Vec::new();
        for (id, len) in heads {
            let a = f.rx.desc_addr(&f.mem, *id);
            assert!(addrs.contains(&a));
            data.extend(f.mem.read(a, *len as usize));
        }
        assert_eq!(u16::from_le_bytes([data[10], data[11]]), 4, "num_buffers");
        assert_eq!(data.len(), HDR + p.len());
        assert_eq!(&data[HDR..], &p[..]);
    }
    let s = h.export("m.sock");
    assert_eq!((s.rx.packets, s.rx.copied), (40, 40));
}

#[test]
fn without_mrg_rxbuf_a_too_big_packet_is_dropped_and_counted() {
    let h = Hostd::start(&["n.sock,rx=0"], &[]);
    let mut f = TestFrontend::connect(&h, "n.sock", Setup::with_features(VERSION_1));
    assert_eq!(f.features & MRG_RXBUF, 0);
    post_rx_ram(&mut f, 8, 256);
    host_send(&h, 0, vec![payload(1, 1000), payload(2, 100)])
        .join()
        .unwrap();
    let used = f.rx.wait_used(&f.mem, 1);
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].1 as usize, HDR + 100);
    let s = h.wait_stats("n.sock", "one drop", |s| s.rx.drop_too_big == 1);
    assert_eq!(s.rx.packets, 1);
}

#[test]
fn zero_copy_exchanges_pool_buffers_both_ways() {
    let h = Hostd::start(&["z.sock,rx=0,tx=1"], &[]);
    let mut f = TestFrontend::connect(&h, "z.sock", Setup::default());
    let pool = f.mem.pool.as_ref().unwrap();
    let stock = directory::read_stock(&pool.view(), 0);
    assert_eq!(stock.len(), 512);
    // Post 64 stock buffers as RX pool descriptors.
    let posted: Vec<u32> = stock[..64].to_vec();
    post_rx_pool(&mut f, &posted);
    let pkts: Vec<Vec<u8>> = (0..64u32)
        .map(|i| payload(i, 64 + i as usize * 20))
        .collect();
    let used = deliver(&h, &mut f, pkts.clone());
    let mut held = Vec::new();
    for (k, (id, len)) in used.iter().enumerate() {
        let gpa = f.rx.desc_addr(&f.mem, *id);
        let pool = f.mem.pool.as_ref().unwrap();
        let b = pool
            .buffer_of_gpa(gpa)
            .expect("descriptor names a pool buffer");
        assert!(!stock.contains(&b), "the guest got the packet's own buffer");
        assert_eq!(*len as usize, HDR + pkts[k].len());
        let data = f.mem.read(gpa, *len as usize);
        assert_eq!(u16::from_le_bytes([data[10], data[11]]), 1);
        assert_eq!(&data[HDR..], &pkts[k][..], "packet {k}");
        held.push(b);
        f.rx.recycle(&f.mem, *id);
    }
    let s = h.export("z.sock");
    assert_eq!((s.rx.exchanged, s.rx.copied, s.rx.packets), (64, 0, 64));
    // Posting a buffer the guest gave away is invalid: the host owns it now.
    post_rx_pool(&mut f, &posted[..1]);
    let bad = deliver(&h, &mut f, vec![payload(99, 100)]);
    assert_eq!(bad[0].1, 0, "an invalid descriptor comes back empty");
    h.wait_stats("z.sock", "invalid RX pool descriptor", |s| {
        s.rx.invalid_desc == 1
    });
    f.rx.recycle(&f.mem, bad[0].0);
    // Guest to host, zero-copy: send from the buffers the guest now holds.
    let out: Vec<Vec<u8>> = (0..64u32)
        .map(|i| payload(i + 500, 100 + i as usize))
        .collect();
    let receiver = host_recv(&h, 1, out.len());
    guest_send_pool(&mut f, &held, &out);
    let used = f.tx.wait_used(&f.mem, 64);
    let received = receiver.join().unwrap();
    assert!(received == out, "payloads differ");
    let pool = f.mem.pool.as_ref().unwrap();
    for (id, _) in used {
        let b = pool
            .buffer_of_gpa(f.tx.desc_addr(&f.mem, id))
            .expect("a pool buffer");
        assert!(
            !held.contains(&b),
            "TX completion hands the guest a fresh buffer"
        );
    }
    let s = h.export("z.sock");
    assert_eq!((s.tx.exchanged, s.tx.copied, s.tx.packets), (64, 0, 64));
}

/// An export without a tx queue is the consumer of what its guest sends:
/// each pool buffer is exchanged for an empty one from the export's hand
/// (owner table updated), the packet is dropped, and the guest's stock
/// keeps its size. Anything else is counted and dropped without exchange.
#[test]
fn a_tx_less_export_consumes_pool_buffers_by_exchange() {
    let h = Hostd::start(&["s.sock,rx=0"], &[]);
    let spare0 = h.stats().0.spare_buffers;
    let mut f = TestFrontend::connect(&h, "s.sock", Setup::default());
    let pool = f.mem.pool.as_ref().unwrap();
    let stock = directory::read_stock(&pool.view(), 0);
    assert_eq!(stock.len(), 512);
    // Rounds of 64 from what the guest holds now: the hand (BURST = 32)
    // turns many times, and buffers it handed out are sent again, which
    // the owner table must allow.
    let mut held: Vec<u32> = stock.clone();
    const ROUNDS: usize = 10;
    for round in 0..ROUNDS {
        let sent: Vec<u32> = held.drain(..64).collect();
        let pkts: Vec<Vec<u8>> = (0..64)
            .map(|i| payload((round * 64 + i) as u32, 60 + i))
            .collect();
        let heads = guest_send_pool(&mut f, &sent, &pkts);
        let used = f.tx.wait_used(&f.mem, 64);
        let pool = f.mem.pool.as_ref().unwrap();
        for (id, len) in used {
            assert_eq!(len, 0, "TX used length");
            let k = heads.iter().position(|&h| h == id).expect("a head we sent");
            let b = pool
                .buffer_of_gpa(f.tx.desc_addr(&f.mem, id))
                .expect("the descriptor names a pool buffer");
            assert_ne!(b, sent[k], "the guest gets a different, empty buffer");
            assert!(!held.contains(&b), "buffer {b} handed out twice");
            held.push(b);
            f.tx.recycle(&f.mem, id);
        }
    }
    let n = (ROUNDS * 64) as u64;
    let s = h.export("s.sock");
    assert_eq!(
        (s.tx.packets, s.tx.exchanged, s.tx.drop_no_queue),
        (n, n, n),
        "every packet exchanged, and dropped for want of a queue"
    );
    assert_eq!(
        (s.tx.copied, s.tx.invalid_desc, s.tx.drop_bad_len),
        (0, 0, 0)
    );
    // A buffer the guest gave away is the export's now: sending it again
    // is invalid.
    let pool = f.mem.pool.as_ref().unwrap();
    let gone = *stock.iter().find(|b| !held.contains(b)).unwrap();
    f.tx.add(
        &f.mem,
        &[Seg {
            gpa: pool.desc_gpa(gone),
            len: HDR as u32 + 60,
            write: false,
        }],
    );
    f.tx.publish(&f.mem);
    let bad = f.tx.wait_used(&f.mem, 1);
    f.tx.recycle(&f.mem, bad[0].0);
    h.wait_stats("s.sock", "invalid TX pool descriptor", |s| {
        s.tx.invalid_desc == 1
    });
    // The copy path (guest RAM) is counted and dropped, not exchanged.
    guest_send(&mut f, &[payload(7, 80)]);
    h.wait_stats("s.sock", "copy-path packet", |s| s.tx.packets == n + 1);
    let s = h.export("s.sock");
    assert_eq!((s.tx.exchanged, s.tx.drop_no_queue), (n, n + 1));
    // After the frontend leaves, the export lists exactly what the guest
    // held as its stock: as many buffers as before, and the daemon's
    // spare list did not move.
    drop(f);
    h.wait_stats("s.sock", "disconnect", |s| s.dev.connected == 0);
    let (info, _) = h.stats();
    let pool = PoolMap::open(&info);
    let mut after = directory::read_stock(&pool.view(), 0);
    after.sort();
    held.sort();
    assert_eq!(after, held, "the stock is what the guest held");
    assert_eq!(info.spare_buffers, spare0, "no buffer lost or gained");
}

#[test]
fn hostile_descriptors_are_dropped_and_counted() {
    let h = Hostd::start(&["h.sock,rx=0,tx=1"], &[]);
    let mut f = TestFrontend::connect(&h, "h.sock", Setup::default());
    let good = payload(1, 200);
    let g = f.alloc(HDR as u64 + 200);
    let big = f.alloc(70000);
    let pool = f.mem.pool.as_ref().unwrap();
    let layout = pool.layout;
    f.mem.write(g + HDR as u64, &good);
    let good_seg = Seg {
        gpa: g,
        len: (HDR + 200) as u32,
        write: false,
    };
    let receiver = host_recv(&h, 1, 3);
    // Valid, then one of each bad kind, valid in between.
    let size = f.tx.size;
    let mut posted = 0;
    f.tx.add(&f.mem, &[good_seg]);
    posted += 1;
    let bad: Vec<(&str, Vec<Seg>)> = vec![
        (
            "outside memory",
            vec![Seg {
                gpa: 0x8000_0000,
                len: 100,
                write: false,
            }],
        ),
        (
            "zero length",
            vec![Seg {
                gpa: g,
                len: 0,
                write: false,
            }],
        ),
        (
            "straddles the end of RAM",
            vec![Seg {
                gpa: RAM_SIZE as u64 - 10,
                len: 100,
                write: false,
            }],
        ),
        (
            "device-writable in TX",
            vec![Seg {
                gpa: g,
                len: 100,
                write: true,
            }],
        ),
        (
            "pool header",
            vec![Seg {
                gpa: POOL_GPA,
                len: 100,
                write: false,
            }],
        ),
        (
            "pool buffer the guest does not hold",
            vec![Seg {
                gpa: pool.desc_gpa(0),
                len: 100,
                write: false,
            }],
        ),
        (
            "pool range not at a packet offset",
            vec![Seg {
                gpa: pool.desc_gpa(directory::read_stock(&pool.view(), 0)[0]) + 4,
                len: 100,
                write: false,
            }],
        ),
    ];
    let nbad = bad.len() as u64;
    for (_, segs) in &bad {
        f.tx.add(&f.mem, segs);
        posted += 1;
    }
    // Chain faults written by hand: next out of range, a loop, indirect.
    for (flags, next) in [(1u16, size + 5), (1, u16::MAX), (4, 0)] {
        let head = f.tx.add(&f.mem, &[good_seg]);
        f.tx.write_desc(&f.mem, head, g, 100, flags, next);
        posted += 1;
    }
    let looped = f.tx.add(&f.mem, &[good_seg]);
    f.tx.write_desc(&f.mem, looped, g, 100, 1, looped);
    posted += 1;
    // A chain longer than the export follows (64 descriptors).
    let long: Vec<Seg> = (0..65)
        .map(|_| Seg {
            gpa: g,
            len: 10,
            write: false,
        })
        .collect();
    f.tx.add(&f.mem, &long);
    posted += 1;
    // Lengths: header only, and larger than a buffer.
    f.tx.add(
        &f.mem,
        &[Seg {
            gpa: g,
            len: HDR as u32,
            write: false,
        }],
    );
    f.tx.add(
        &f.mem,
        &[Seg {
            gpa: big,
            len: layout.max_packet() + HDR as u32 + 1,
            write: false,
        }],
    );
    posted += 2;
    f.tx.add(&f.mem, &[good_seg]);
    f.tx.add(&f.mem, &[good_seg]);
    posted += 2;
    f.tx.publish(&f.mem);
    let used = f.tx.wait_used(&f.mem, posted);
    assert_eq!(used.len(), posted, "every chain, good or bad, is returned");
    let got = receiver.join().unwrap();
    assert_eq!(got.len(), 3, "exactly the valid packets arrive");
    assert!(got.iter().all(|p| p == &good));
    let s = h.export("h.sock");
    assert_eq!(s.tx.invalid_desc, nbad + 5, "{s:#?}");
    assert_eq!(s.tx.drop_bad_len, 2);
    assert_eq!(s.tx.packets, 3);
    assert_eq!(
        s.dev.needs_reset, 0,
        "bad descriptors do not break the ring"
    );
    // RX: a device-readable buffer is refused; a good one after it is used.
    let a = f.alloc(2048);
    f.rx.add(
        &f.mem,
        &[Seg {
            gpa: a,
            len: 2048,
            write: false,
        }],
    );
    f.rx.add(
        &f.mem,
        &[Seg {
            gpa: a,
            len: 2048,
            write: true,
        }],
    );
    f.rx.publish(&f.mem);
    host_send(&h, 0, vec![payload(5, 300)]).join().unwrap();
    let used = f.rx.wait_used(&f.mem, 2);
    assert_eq!(used[0].1, 0);
    assert_eq!(used[1].1 as usize, HDR + 300);
    assert_eq!(f.mem.read(a + HDR as u64, 300), payload(5, 300));
    let s = h.export("h.sock");
    assert_eq!((s.rx.invalid_desc, s.rx.packets), (1, 1));
}

/// Puts the TX ring of `f` into a broken state with `breakage`, checks that
/// the device is marked NEEDS_RESET, and that export `other` keeps working.
fn breaks(h: &Hostd, name: &str, breakage: impl FnOnce(&mut TestFrontend)) {
    let mut f = TestFrontend::connect(h, name, Setup::default());
    breakage(&mut f);
    h.wait_stats(name, "NEEDS_RESET", |s| s.dev.needs_reset == 1);
    drop(f);
    // A new frontend resets the device.
    let mut f = TestFrontend::connect(h, name, Setup::default());
    h.wait_stats(name, "reset", |s| {
        s.dev.needs_reset == 0 && s.dev.connected == 1
    });
    let before = h.export(name).tx.packets;
    guest_send(&mut f, &[payload(1, 60)]);
    h.wait_stats(name, "traffic after reset", |s| s.tx.packets == before + 1);
}

#[test]
fn broken_rings_need_reset_and_other_exports_keep_running() {
    let h = Hostd::start(&["bad.sock,tx=1", "ok.sock,tx=2"], &[]);
    // The other export's traffic runs throughout.
    let receiver = host_recv(&h, 2, 3000);
    let mut ok = TestFrontend::connect(&h, "ok.sock", Setup::default());
    let good: Vec<Vec<u8>> = (0..1000u32).map(|i| payload(i, 64)).collect();
    guest_send(&mut ok, &good);
    breaks(&h, "bad.sock", |f| {
        // The avail index runs ahead of the ring.
        f.tx.avail_idx = f.tx.size + 1;
        f.tx.publish(&f.mem);
    });
    guest_send(&mut ok, &good);
    breaks(&h, "bad.sock", |f| {
        // The avail ring names a descriptor outside the table.
        let n = f.tx.size;
        f.tx.push_head(&f.mem, n + 3);
        f.tx.publish(&f.mem);
    });
    breaks(&h, "bad.sock", |f| {
        // The descriptor table lies in the pool's buffers, outside this
        // export's ring area.
        let va = f.mem.pool.as_ref().unwrap().map.as_ptr() as u64
            + zc_proto::layout::BUFFERS_OFFSET
            + 0x10000;
        let cfg = vhost::VringConfigData {
            queue_max_size: 256,
            queue_size: 256,
            flags: 0,
            desc_table_addr: va,
            used_ring_addr: f.ram_va(f.tx.used),
            avail_ring_addr: f.ram_va(f.tx.avail),
            log_addr: None,
        };
        use vhost::VhostBackend;
        f.fe.get_vring_base(1).unwrap();
        f.fe.set_vring_addr(1, &cfg).unwrap();
        f.fe.set_vring_base(1, 0).unwrap();
        f.fe.set_vring_kick(1, &f.tx.kick).unwrap();
        let _ = f.tx.kick.write(1);
    });
    guest_send(&mut ok, &good);
    let got = receiver.join().unwrap();
    assert_eq!(got.len(), 3000, "the healthy export lost nothing");
    assert_eq!(
        h.log_count("NEEDS_RESET"),
        3,
        "one log line per broken ring"
    );
    let s = h.export("bad.sock");
    assert_eq!(s.dev.broken_rings, 3);
    let o = h.export("ok.sock");
    assert_eq!(
        (o.tx.packets, o.dev.needs_reset, o.dev.broken_rings),
        (3000, 0, 0)
    );
}

#[test]
fn frontend_disconnect_and_reconnect_on_the_same_socket() {
    let h = Hostd::start(&["r.sock,rx=0,tx=1"], &[]);
    let receiver = host_recv(&h, 1, 30);
    for round in 0..3u32 {
        let mut f = TestFrontend::connect(&h, "r.sock", Setup::default());
        let pkts: Vec<Vec<u8>> = (0..10).map(|i| payload(round * 10 + i, 80)).collect();
        guest_send(&mut f, &pkts);
        drop(f);
        h.wait_stats("r.sock", "disconnect", |s| s.dev.connected == 0);
    }
    let got = receiver.join().unwrap();
    let want: Vec<Vec<u8>> = (0..30).map(|i| payload(i, 80)).collect();
    assert!(got == want);
    let s = h.export("r.sock");
    assert_eq!((s.dev.connections, s.tx.packets), (3, 30));
    // The guest's stock survives the reconnects.
    let (info, _) = h.stats();
    let pool = PoolMap::open(&info);
    assert_eq!(directory::read_stock(&pool.view(), 0).len(), 512);
}

#[test]
fn export_roles_directory_and_reclaim() {
    let h = Hostd::start(
        &["d0.sock,rx=0,tx=1,mac=02:11:22:33:44:55", "d1.sock,tx=3"],
        &[],
    );
    // Processes cannot take an export's queue roles.
    let e = HostRx::open(&h.run_dir(), h.cluster, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("d0.sock") && e.contains("consumer"), "{e}");
    let e = HostTx::open(&h.run_dir(), h.cluster, 3)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("d1.sock") && e.contains("producer"), "{e}");
    // The export directory in the pool header.
    let (info, _) = h.stats();
    let pool = PoolMap::open(&info);
    let v = pool.view();
    let d0 = directory::read_entry(&v, 0).unwrap();
    assert_eq!(d0.state, EXPORT_ACTIVE);
    assert_eq!(d0.mac, [0x02, 0x11, 0x22, 0x33, 0x44, 0x55]);
    assert_eq!((d0.rx_queue, d0.tx_queue), (0, 1));
    assert_eq!(
        d0.ring_offset,
        zc_proto::PoolLayout::ring_area_offset(0).unwrap()
    );
    assert_eq!(d0.ring_size, zc_proto::layout::RING_AREA_SIZE);
    let d1 = directory::read_entry(&v, 1).unwrap();
    assert_eq!((d1.rx_queue, d1.tx_queue), (NO_QUEUE, 3));
    let c = h.cluster.to_be_bytes();
    assert_eq!(
        d1.mac,
        [0x02, 0x7a, c[2], c[3], 0x80, 3],
        "the cluster's low 16 bits, tx-only queue 3"
    );
    assert_eq!(directory::read_entry(&v, 2).unwrap().state, 0);
    // SAFETY: the header lies in the mapping; export_seq is even when idle.
    let seq = unsafe { std::ptr::read_volatile(pool.map.as_ptr().add(64).cast::<u32>()) };
    assert_eq!(seq % 2, 0);
    let s0 = directory::read_stock(&v, 0);
    let s1 = directory::read_stock(&v, 1);
    let mut all: Vec<u32> = s0.iter().chain(&s1).copied().collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 1024, "stocks are distinct");
    // A process takes buffers and exits while another stays; when both
    // are gone the daemon reclaims, but never an export's buffers.
    let spare0 = h.stats().0.spare_buffers;
    let mut a = HostTx::open(&h.run_dir(), h.cluster, 2).unwrap();
    let _bufs = a.take_buffers(100).unwrap();
    let b = HostRx::open(&h.run_dir(), h.cluster, 2).unwrap();
    drop(a);
    assert_eq!(h.stats().0.spare_buffers, spare0 - 100);
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.stats().0.spare_buffers != spare0 {
        assert!(
            Instant::now() < deadline,
            "reclaim: {} != {spare0}",
            h.stats().0.spare_buffers
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // And the exports still move packets afterwards.
    let mut f = TestFrontend::connect(&h, "d1.sock", Setup::default());
    let receiver = host_recv(&h, 3, 5);
    guest_send(&mut f, &(0..5).map(|i| payload(i, 70)).collect::<Vec<_>>());
    assert_eq!(receiver.join().unwrap().len(), 5);
}

#[test]
fn qemu_args_and_stats_from_the_command_line() {
    let h = Hostd::start(&["q.sock,rx=0,tx=1"], &[]);
    let run = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_zc-hostd"))
            .args(["-c", &h.cluster.to_string(), "--run-dir"])
            .arg(h.run_dir())
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let sock = h.sock("q.sock");
    let q = run(&["--qemu-args", sock.to_str().unwrap(), "--vm-mem", "512M"]);
    let (info, _) = h.stats();
    assert!(
        q.contains("memory-backend-memfd,id=zcmem,size=512M,share=on -numa node,memdev=zcmem"),
        "{q}"
    );
    assert!(
        q.contains(&format!(
            "mem-path={},size={},share=on",
            info.pool_path, info.pool_size
        )),
        "{q}"
    );
    assert!(q.contains("ivshmem-plain"), "{q}");
    assert!(q.contains(&format!("path={}", sock.display())), "{q}");
    let c = h.cluster.to_be_bytes();
    assert!(
        q.contains(&format!("mac=02:7a:{:02x}:{:02x}:00:00", c[2], c[3])),
        "{q}"
    );
    let j: serde_json::Value = serde_json::from_str(&run(&["stats", "--json"])).unwrap();
    assert_eq!(j["exports"][0]["rx_queue"], 0);
    assert_eq!(j["exports"][0]["tx"]["packets"], 0);
    assert_eq!(j["cluster"]["cluster"], h.cluster);
    let text = run(&["stats"]);
    assert!(text.contains("export q.sock: waiting"), "{text}");
}

/// CPU ticks (user + system) the daemon's worker 0 used.
fn poll_thread_ticks(pid: u32) -> u64 {
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = t.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() == "zc-worker-0" {
            let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
            // Fields after the ")" that ends the command name: utime is the
            // 12th, stime the 13th.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            return f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        }
    }
    panic!("no zc-worker-0 thread in pid {pid}");
}

/// How long a sleeping poll thread may take to move a packet once woken:
/// far below its longest sleep (500 ms), after which it looks anyway.
const WAKE_LATENCY: Duration = Duration::from_millis(250);

#[test]
fn an_idle_export_sleeps_and_wakes_for_traffic() {
    let h = Hostd::start(&["i.sock,rx=0,tx=1"], &[]);
    let mut f = TestFrontend::connect(&h, "i.sock", Setup::default());
    let mut rx = HostRx::open(&h.run_dir(), h.cluster, 1).unwrap();
    let mut rx_bufs = rx.take_buffers(4).unwrap();
    guest_send(&mut f, &[payload(1, 60)]);
    h.wait_asleep("i.sock");
    let t0 = poll_thread_ticks(h.child.id());
    std::thread::sleep(Duration::from_secs(2));
    let used = poll_thread_ticks(h.child.id()) - t0;
    // 2 s are 200 ticks at the usual 100 Hz: an idle thread uses next to none.
    assert!(used <= 10, "idle poll thread used {used} ticks in 2 s");
    assert!(h.export("i.sock").dev.sleeps > 0);
    let mut recv = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        while got.len() < n {
            assert!(Instant::now() < deadline, "received {} of {n}", got.len());
            let k = rx.recv_burst(&mut rx_bufs);
            got.extend(rx_bufs[..k].iter().map(|b| rx.pool().packet(b).to_vec()));
            if k == 0 {
                std::thread::yield_now();
            }
        }
        got
    };
    assert_eq!(recv(1), vec![payload(1, 60)]);
    // Each wake-up is timed from the moment the thread went to sleep: a
    // thread that is not woken finds the packet only at the end of its
    // sleep, about 500 ms later.
    let mut tx = HostTx::open(&h.run_dir(), h.cluster, 0).unwrap();
    let mut tx_bufs = tx.take_buffers(1).unwrap();
    for round in 0..3u32 {
        // A guest kick wakes it ...
        h.wait_asleep("i.sock");
        let t = Instant::now();
        guest_send(&mut f, &[payload(10 + round, 60)]);
        assert_eq!(recv(1), vec![payload(10 + round, 60)]);
        let latency = t.elapsed();
        assert!(
            latency < WAKE_LATENCY,
            "round {round}: a kick took {latency:?} to move a packet"
        );
        // ... and so does a host packet for the guest.
        post_rx_ram(&mut f, 1, 2048);
        h.wait_asleep("i.sock");
        let t = Instant::now();
        let p = payload(20 + round, 100);
        tx.pool().packet_mut(&mut tx_bufs[0]).fill(&p).unwrap();
        assert_eq!(tx.send_burst(&mut tx_bufs), 1);
        let used = f.rx.wait_used(&f.mem, 1);
        let latency = t.elapsed();
        assert_eq!(used[0].1 as usize, HDR + 100);
        assert_eq!(
            f.mem
                .read(f.rx.desc_addr(&f.mem, used[0].0) + HDR as u64, 100),
            p
        );
        assert!(
            latency < WAKE_LATENCY,
            "round {round}: a host packet took {latency:?} to reach the guest"
        );
    }
}

#[test]
fn a_pool_region_added_later_enables_zero_copy() {
    let h = Hostd::start(&["p.sock,rx=0"], &[]);
    let mut f = TestFrontend::connect(
        &h,
        "p.sock",
        Setup {
            with_pool: false,
            ..Setup::default()
        },
    );
    // Without the pool in the memory table, RAM buffers take the copy path.
    post_rx_ram(&mut f, 4, 2048);
    deliver(&h, &mut f, (0..4).map(|i| payload(i, 100)).collect());
    // Hot-plug: the frontend's new table has the pool as a second region.
    let (info, _) = h.stats();
    f.mem.pool = Some(PoolMap::open(&info));
    let regions = f.mem.regions();
    use vhost::VhostBackend;
    f.fe.set_mem_table(&regions).unwrap();
    // A request with a reply: the export has handled the table before it.
    f.fe.get_features().unwrap();
    let stock = directory::read_stock(&f.mem.pool.as_ref().unwrap().view(), 0);
    post_rx_pool(&mut f, &stock[..8]);
    let pkts: Vec<Vec<u8>> = (0..8).map(|i| payload(i + 10, 200)).collect();
    let used = deliver(&h, &mut f, pkts.clone());
    let pool = f.mem.pool.as_ref().unwrap();
    for ((id, len), p) in used.iter().zip(&pkts) {
        let gpa = f.rx.desc_addr(&f.mem, *id);
        assert!(pool.buffer_of_gpa(gpa).is_some());
        assert_eq!(f.mem.read(gpa + HDR as u64, *len as usize - HDR), *p);
    }
    let s = h.export("p.sock");
    assert_eq!((s.rx.copied, s.rx.exchanged), (4, 8));
}

/// Waits up to 5 s for the RX queue's call eventfd; fails with `what`.
fn wait_rx_interrupt(f: &TestFrontend, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while f.rx.call.read().is_err() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn interrupts_follow_no_interrupt_and_event_idx() {
    let h = Hostd::start(&["n.sock,rx=0"], &[]);
    // Without EVENT_IDX: VRING_AVAIL_F_NO_INTERRUPT decides.
    let mut f = TestFrontend::connect(&h, "n.sock", Setup::with_features(VERSION_1 | MRG_RXBUF));
    assert_eq!(f.features & EVENT_IDX, 0);
    f.mem.w16(f.rx.avail, 1); // NO_INTERRUPT
    post_rx_ram(&mut f, 64, 2048);
    deliver(&h, &mut f, (0..20).map(|i| payload(i, 64)).collect());
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        f.rx.call.read().is_err(),
        "no interrupt while NO_INTERRUPT is set"
    );
    assert_eq!(h.export("n.sock").rx.interrupts, 0);
    f.mem.w16(f.rx.avail, 0);
    deliver(&h, &mut f, vec![payload(99, 64)]);
    wait_rx_interrupt(&f, "no interrupt once the guest wants them");
    drop(f);
    h.wait_stats("n.sock", "disconnect", |s| s.dev.connected == 0);
    // With EVENT_IDX: used_event decides. Ask for an interrupt only after
    // the 10th used buffer.
    let mut f = TestFrontend::connect(&h, "n.sock", Setup::default());
    assert_ne!(f.features & EVENT_IDX, 0);
    let used_event = f.rx.avail + 4 + 2 * u64::from(f.rx.size);
    f.mem.w16(used_event, 9);
    post_rx_ram(&mut f, 64, 2048);
    let before = h.export("n.sock").rx.interrupts;
    deliver(&h, &mut f, (0..5).map(|i| payload(i, 64)).collect());
    std::thread::sleep(Duration::from_millis(100));
    assert!(f.rx.call.read().is_err(), "5 used < used_event + 1");
    deliver(&h, &mut f, (0..5).map(|i| payload(i, 64)).collect());
    wait_rx_interrupt(&f, "no interrupt when used passed used_event");
    assert!(h.export("n.sock").rx.interrupts > before);
}

/// Sends `n` packets of 64 bytes from the guest of `f` (payloads from
/// `first` on) and checks that `rx` receives exactly those.
fn exact_tx(h: &Hostd, f: &mut TestFrontend, q: u16, first: u32, n: u32) {
    let pkts: Vec<Vec<u8>> = (first..first + n).map(|i| payload(i, 64)).collect();
    let receiver = host_recv(h, q, pkts.len());
    guest_send(f, &pkts);
    let got = receiver.join().unwrap();
    assert_eq!(got.len(), pkts.len(), "exact packet count");
    assert!(got == pkts, "payloads differ");
}

/// The verified crash of issue 17: a frontend whose memory fd is a 4 KiB
/// memfd while its table declares 16 MiB. The daemon refuses that table
/// (that frontend only), the export serves the next frontend, and another
/// export passes traffic throughout.
#[test]
fn a_memory_table_larger_than_its_file_is_refused_for_that_frontend_only() {
    let mut h = Hostd::start(&["short.sock,tx=1", "ok.sock,tx=2"], &[]);
    let mut ok = TestFrontend::connect(&h, "ok.sock", Setup::default());
    exact_tx(&h, &mut ok, 2, 0, 100);
    // 16 MiB declared and mapped by the test, 4 KiB of file behind it; the
    // test never touches past the file (that would be its own SIGBUS).
    let short = Setup {
        ram_size: 16 << 20,
        ram_file_len: Some(4096),
        ..Setup::default()
    };
    let mut bad = TestFrontend::try_connect(&h, "short.sock", short);
    if let Ok(f) = &mut bad {
        // Without the check the export maps the table and starts the
        // rings; its next look at them is past the file's end.
        let _ = f.tx.kick.write(1);
        std::thread::sleep(Duration::from_millis(500));
    }
    h.assert_running();
    assert!(bad.is_err(), "the table was refused");
    let s = h.wait_stats("short.sock", "refusal counted", |s| {
        s.dev.bad_mem_tables == 1 && s.dev.connected == 0
    });
    assert_eq!((s.dev.connections, s.dev.needs_reset), (1, 0));
    assert_eq!(
        h.log_count(
            "export short.sock: refused the frontend's memory table: region 0 asks for 16777216 \
             bytes at file offset 0 (guest-physical 0x0), but its file has 4096 bytes; \
             the frontend is disconnected"
        ),
        1,
        "one log line naming the export, the region and both sizes"
    );
    exact_tx(&h, &mut ok, 2, 100, 100);
    // The same export serves a well-behaved frontend next.
    let mut good = TestFrontend::connect(&h, "short.sock", Setup::default());
    exact_tx(&h, &mut good, 1, 500, 50);
    h.assert_running();
    let text = std::process::Command::new(env!("CARGO_BIN_EXE_zc-hostd"))
        .args(["-c", &h.cluster.to_string(), "--run-dir"])
        .arg(h.run_dir())
        .arg("stats")
        .output()
        .unwrap();
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.contains("export short.sock: connected")
            && text.contains("dev 0 broken rings, 1 bad mem tables, 0 mem faults"),
        "{text}"
    );
}

/// Guest RAM whose file shrinks while the export uses rings and buffers in
/// it: the daemon contains the SIGBUS, marks that device NEEDS_RESET and
/// counts it; the other export keeps its exact counts, and the damaged
/// export serves a new frontend afterwards.
#[test]
fn guest_memory_that_shrinks_under_an_export_stops_only_that_device() {
    let mut h = Hostd::start(&["shrink.sock,rx=0,tx=1", "ok.sock,tx=2"], &[]);
    let mut ok = TestFrontend::connect(&h, "ok.sock", Setup::default());
    exact_tx(&h, &mut ok, 2, 0, 100);
    let mut f = TestFrontend::connect(&h, "shrink.sock", Setup::default());
    // Both directions use the memfd: TX chains and RX buffers in it.
    exact_tx(&h, &mut f, 1, 0, 50);
    post_rx_ram(&mut f, 32, 2048);
    let used = deliver(&h, &mut f, (0..8).map(|i| payload(i, 100)).collect());
    assert_eq!(used.len(), 8);
    // The frontend's file shrinks to nothing under the daemon's mapping
    // (from here on the test must not touch it either). A kick makes the
    // export look at its rings: every page of them is gone.
    f.mem.ram.truncate(0);
    let _ = f.tx.kick.write(1);
    let s = h.wait_stats("shrink.sock", "NEEDS_RESET after the fault", |s| {
        s.dev.needs_reset == 1 && s.dev.mem_faults == 1
    });
    h.assert_running();
    assert_eq!(s.dev.broken_rings, 0, "a memory fault, not a broken ring");
    assert_eq!(
        h.log_count("export shrink.sock: guest memory vanished under the device"),
        1
    );
    // Still stopped a moment later (the device was dropped, not retried).
    let _ = f.tx.kick.write(1);
    std::thread::sleep(Duration::from_millis(200));
    let s = h.export("shrink.sock");
    assert_eq!((s.dev.needs_reset, s.dev.mem_faults), (1, 1));
    exact_tx(&h, &mut ok, 2, 100, 100);
    // A new, well-behaved frontend on the damaged export.
    drop(f);
    h.wait_stats("shrink.sock", "disconnect", |s| s.dev.connected == 0);
    let mut g = TestFrontend::connect(&h, "shrink.sock", Setup::default());
    h.wait_stats("shrink.sock", "reset by the new frontend", |s| {
        s.dev.needs_reset == 0 && s.dev.connected == 1
    });
    exact_tx(&h, &mut g, 1, 1000, 50);
    post_rx_ram(&mut g, 8, 2048);
    let pkts: Vec<Vec<u8>> = (0..8).map(|i| payload(i + 2000, 100)).collect();
    let used = deliver(&h, &mut g, pkts.clone());
    for ((id, len), p) in used.iter().zip(&pkts) {
        let a = g.rx.desc_addr(&g.mem, *id);
        assert_eq!(g.mem.read(a + HDR as u64, *len as usize - HDR), *p);
    }
    exact_tx(&h, &mut ok, 2, 200, 100);
    h.assert_running();
    let s = h.export("shrink.sock");
    assert_eq!((s.dev.mem_faults, s.dev.broken_rings), (1, 0));
}

/// A frontend whose RAM region starts at a guest-physical address that is
/// not page-aligned: rings at aligned guest addresses land on misaligned
/// host addresses. The export refuses such rings (NEEDS_RESET, counted,
/// one exact log line each) instead of reading them misaligned (undefined
/// behaviour, which a debug build of the daemon aborts on).
#[test]
fn rings_on_misaligned_host_addresses_are_refused() {
    let mut h = Hostd::start(&["odd.sock,rx=0,tx=1", "ok.sock,tx=2"], &[]);
    let mut ok = TestFrontend::connect(&h, "ok.sock", Setup::default());
    exact_tx(&h, &mut ok, 2, 0, 100);
    // The table puts RAM at guest-physical 2 and frontend address map + 2,
    // file offset 0: guest address g is file offset g - 2 for the daemon.
    // Ring i sits at guest (and frontend) addresses 0x.1000, 0x.2000,
    // 0x.3000, aligned as virtio and the vhost crate ask, which is two
    // bytes into a page of the daemon's mapping (aligned enough for
    // vhost-user-backend's own 16-bit read of the used index, not for a
    // descriptor or a 4-byte aligned used ring). `ring` gives the file
    // offsets the daemon reads.
    let mut f = TestFrontend::connect(
        &h,
        "odd.sock",
        Setup {
            ram_gpa: 2,
            start_queues: false,
            ..Setup::default()
        },
    );
    use vhost::vhost_user::VhostUserFrontend;
    use vhost::VhostBackend;
    let ring = |i: u64| 0x10000 * (i + 1) + 0x0ffe;
    // One packet waits in the TX ring, so that a daemon that takes the ring
    // reads a descriptor at once (byte copies: the test's own pointers are
    // misaligned too).
    let (desc, avail) = (ring(1), ring(1) + 0x1000);
    let mut d = 0x40000u64.to_le_bytes().to_vec();
    d.extend_from_slice(&(HDR as u32 + 60).to_le_bytes());
    d.extend_from_slice(&[0; 4]);
    f.mem.write(desc, &d);
    f.mem.write(avail + 2, &1u16.to_le_bytes());
    for i in 0..2u64 {
        let va = f.ram_va(ring(i) + 2);
        let cfg = vhost::VringConfigData {
            queue_max_size: 256,
            queue_size: 256,
            flags: 0,
            desc_table_addr: va,
            avail_ring_addr: va + 0x1000,
            used_ring_addr: va + 0x2000,
            log_addr: None,
        };
        let q = if i == 0 { &f.rx } else { &f.tx };
        f.fe.set_vring_num(i as usize, 256).unwrap();
        f.fe.set_vring_addr(i as usize, &cfg).unwrap();
        f.fe.set_vring_base(i as usize, 0).unwrap();
        f.fe.set_vring_call(i as usize, &q.call).unwrap();
        f.fe.set_vring_kick(i as usize, &q.kick).unwrap();
        f.fe.set_vring_enable(i as usize, true).unwrap();
    }
    let _ = f.tx.kick.write(1);
    let _ = f.fe.get_features();
    std::thread::sleep(Duration::from_millis(300));
    h.assert_running();
    let s = h.wait_stats("odd.sock", "both rings refused", |s| {
        s.dev.needs_reset == 1 && s.dev.broken_rings == 2
    });
    assert_eq!((s.tx.packets, s.tx.invalid_desc), (0, 0));
    for (i, gpa) in [0x11000u64, 0x21000].iter().enumerate() {
        let line = format!(
            "export odd.sock: descriptor ring at {gpa:#x} lands on a misaligned host address 0x"
        );
        assert_eq!(h.log_count(&line), 1, "ring {i}: {line}");
    }
    assert_eq!(
        h.log_count(
            "(its memory region starts at a guest-physical address that is not page-aligned): \
             device marked NEEDS_RESET"
        ),
        2
    );
    exact_tx(&h, &mut ok, 2, 100, 100);
    drop(f);
    let mut g = TestFrontend::connect(&h, "odd.sock", Setup::default());
    h.wait_stats("odd.sock", "reset", |s| s.dev.needs_reset == 0);
    exact_tx(&h, &mut g, 1, 0, 20);
    h.assert_running();
}

/// Checks the used elements `used` against `pkts`: each packet merged
/// from as many buffers as it says, with that `num_buffers`, byte for byte.
fn check_merged(f: &TestFrontend, used: &[(u16, u32)], pkts: &[(Vec<u8>, usize)]) {
    let mut at = 0;
    for (k, (p, per)) in pkts.iter().enumerate() {
        let heads = &used[at..at + per];
        at += per;
        let mut data = Vec::new();
        for (id, len) in heads {
            data.extend(f.mem.read(f.rx.desc_addr(&f.mem, *id), *len as usize));
        }
        assert!(data.len() >= HDR, "packet {k}: only {} bytes", data.len());
        assert_eq!(
            u16::from_le_bytes([data[10], data[11]]) as usize,
            *per,
            "num_buffers of packet {k}"
        );
        assert_eq!(&data[HDR..], &p[..], "payload of packet {k}");
    }
    assert_eq!(at, used.len(), "used elements beyond the packets");
}

/// A guest with a tiny RX ring (4 entries of 128 bytes, legal with
/// MRG_RXBUF): a packet that cannot fit even in all of it is dropped and
/// counted instead of blocking the ring; packets behind it are delivered;
/// a packet that fits only once the guest posts more waits for that
/// without spinning a core, and the guest's next kick (EVENT_IDX honoured,
/// as a real driver does) delivers it.
#[test]
fn a_tiny_rx_ring_drops_what_cannot_fit_and_does_not_spin() {
    let h = Hostd::start(&["t.sock,rx=0"], &[]);
    let mut f = TestFrontend::connect(
        &h,
        "t.sock",
        Setup {
            size: 4,
            ..Setup::default()
        },
    );
    assert_ne!(f.features & EVENT_IDX, 0);
    let event_idx = true;
    let bufs: Vec<u64> = (0..4).map(|_| f.alloc(128)).collect();
    let post = |f: &mut TestFrontend, a: u64| {
        f.rx.add(
            &f.mem,
            &[Seg {
                gpa: a,
                len: 128,
                write: true,
            }],
        );
    };
    for &a in &bufs {
        post(&mut f, a);
    }
    f.rx.publish_notify(&f.mem, event_idx);
    // 1000 bytes need 8 buffers of 128: never fit in a ring of 4. 100 fit
    // in one; 400 need all 4 (412 bytes with the header), but 3 are left.
    let (big, small, full) = (payload(1, 1000), payload(2, 100), payload(3, 400));
    host_send(&h, 0, vec![big, small.clone(), full.clone()])
        .join()
        .unwrap();
    let used = f.rx.wait_used(&f.mem, 1);
    check_merged(&f, &used, &[(small, 1)]);
    let s = h.wait_stats("t.sock", "the drop", |s| s.rx.drop_no_room == 1);
    assert_eq!((s.rx.packets, s.rx.copied), (1, 1), "{s:#?}");
    // The 400-byte packet waits for a fourth buffer: the daemon sleeps.
    let (c0, t0) = (h.cpu_seconds(), Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let cpu = (h.cpu_seconds() - c0) / t0.elapsed().as_secs_f64();
    eprintln!(
        "zc-hostd while a packet waited: {:.1}% of a core",
        cpu * 100.0
    );
    assert!(
        cpu < 0.3,
        "zc-hostd used {:.0}% of a core while a packet waited for buffers",
        cpu * 100.0
    );
    assert!(f.rx.take_used(&f.mem).is_empty(), "nothing fits yet");
    // Giving the used buffer back is the kick that lets it go.
    h.wait_asleep("t.sock");
    let t = Instant::now();
    f.rx.push_head(&f.mem, used[0].0);
    assert!(
        f.rx.publish_notify(&f.mem, event_idx),
        "the device asked for a kick"
    );
    let used = f.rx.wait_used(&f.mem, 4);
    let latency = t.elapsed();
    assert!(
        latency < Duration::from_millis(250),
        "the waiting packet left {latency:?} after the kick"
    );
    check_merged(&f, &used, &[(full, 4)]);
    // Every buffer back again: a packet too big for all four is dropped,
    // the one behind it delivered.
    for (id, _) in &used {
        f.rx.push_head(&f.mem, *id);
    }
    f.rx.publish_notify(&f.mem, event_idx);
    let last = payload(4, 60);
    host_send(&h, 0, vec![payload(5, 1500), last.clone()])
        .join()
        .unwrap();
    let used = f.rx.wait_used(&f.mem, 1);
    check_merged(&f, &used, &[(last, 1)]);
    let s = h.wait_stats("t.sock", "two drops", |s| s.rx.drop_no_room == 2);
    assert_eq!(
        (
            s.rx.packets,
            s.rx.copied,
            s.rx.invalid_desc,
            s.rx.drop_too_big
        ),
        (3, 3, 0, 0),
        "{s:#?}"
    );
    assert_eq!(s.dev.needs_reset, 0);
}

/// Buffers so small that a packet needs more than the 64 the export
/// follows: dropped and counted without consuming the guest's buffers;
/// the next packet uses them.
#[test]
fn a_packet_needing_more_than_64_buffers_is_dropped_and_counted() {
    let h = Hostd::start(&["c.sock,rx=0"], &[]);
    let mut f = TestFrontend::connect(&h, "c.sock", Setup::default());
    post_rx_ram(&mut f, 100, 16);
    // 1500 + 12 bytes are 95 buffers of 16; 500 + 12 are 32.
    let fits = payload(2, 500);
    host_send(&h, 0, vec![payload(1, 1500), fits.clone()])
        .join()
        .unwrap();
    let used = f.rx.wait_used(&f.mem, 32);
    check_merged(&f, &used, &[(fits, 32)]);
    let s = h.wait_stats("c.sock", "the drop", |s| s.rx.drop_no_room == 1);
    assert_eq!((s.rx.packets, s.rx.invalid_desc), (1, 0), "{s:#?}");
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        f.rx.take_used(&f.mem).is_empty(),
        "the dropped packet consumed none of the guest's buffers"
    );
}

/// An invalid buffer among those a packet spreads over (here a
/// device-readable one) is returned empty with the good ones before it,
/// counted, and the packet goes into the buffers after it: nothing is lost
/// to the guest's mistake.
#[test]
fn an_invalid_buffer_in_the_middle_of_a_packet_costs_buffers_not_the_packet() {
    let h = Hostd::start(&["v.sock,rx=0"], &[]);
    let mut f = TestFrontend::connect(&h, "v.sock", Setup::default());
    let a: Vec<u64> = (0..4).map(|_| f.alloc(128)).collect();
    for (i, &gpa) in a.iter().enumerate() {
        f.rx.add(
            &f.mem,
            &[Seg {
                gpa,
                len: 128,
                write: i != 1,
            }],
        );
    }
    f.rx.publish(&f.mem);
    // 200 + 12 bytes: two buffers of 128.
    let p = payload(7, 200);
    host_send(&h, 0, vec![p.clone()]).join().unwrap();
    let used = f.rx.wait_used(&f.mem, 4);
    let lens: Vec<u32> = used.iter().map(|u| u.1).collect();
    assert_eq!(lens, [0, 0, 128, 84], "{used:?}");
    check_merged(&f, &used[2..], &[(p, 2)]);
    let s = h.wait_stats("v.sock", "the packet", |s| s.rx.packets == 1);
    assert_eq!(
        (s.rx.invalid_desc, s.rx.drop_no_room, s.rx.copied),
        (1, 0, 1),
        "{s:#?}"
    );
}
