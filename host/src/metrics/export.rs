//! The export families: per vhost-user export, labelled with its name
//! (the socket's file name, as `stats` and `move` name it).

use super::{counters, gauges, Labels};
use crate::stats::ExportStats;
use prometheus_client::encoding::DescriptorEncoder;

pub(super) fn encode(
    enc: &mut DescriptorEncoder,
    cluster: &str,
    exports: &[ExportStats],
) -> std::fmt::Result {
    let l = |e: &ExportStats| -> Labels {
        vec![("cluster", cluster.to_string()), ("export", e.name.clone())]
    };
    let with = |e: &ExportStats, k: &'static str, v: &str| -> Labels {
        let mut labels = l(e);
        labels.push((k, v.to_string()));
        labels
    };
    type Field = fn(&ExportStats) -> u64;
    let plain: [(&str, &str, Field); 16] = [
        ("zc_export_rx_packets", "Packets delivered to the guest.", |e| e.rx.packets),
        ("zc_export_rx_bytes", "Bytes delivered to the guest.", |e| e.rx.bytes),
        ("zc_export_rx_copied", "Packets delivered by copying into guest memory.", |e| e.rx.copied),
        ("zc_export_rx_exchanged", "Packets delivered by exchanging a pool buffer (zero-copy).", |e| e.rx.exchanged),
        ("zc_export_rx_interrupts", "Interrupts sent to the guest for received packets.", |e| e.rx.interrupts),
        ("zc_export_tx_packets", "Packets the guest sent.", |e| e.tx.packets),
        ("zc_export_tx_bytes", "Bytes the guest sent.", |e| e.tx.bytes),
        ("zc_export_tx_copied", "Packets the guest sent that were copied.", |e| e.tx.copied),
        ("zc_export_tx_exchanged", "Pool buffers the guest sent, exchanged for empty ones (zero-copy).", |e| e.tx.exchanged),
        ("zc_export_tx_interrupts", "Interrupts sent to the guest for send completions.", |e| e.tx.interrupts),
        ("zc_export_connections", "Frontends that connected to the export's socket.", |e| e.dev.connections),
        ("zc_export_broken_rings", "Rings found structurally broken (the device was marked NEEDS_RESET).", |e| e.dev.broken_rings),
        ("zc_export_bad_mem_tables", "Memory tables refused (a region did not fit its file); that frontend was disconnected.", |e| e.dev.bad_mem_tables),
        ("zc_export_mem_faults", "Guest memory that vanished under the export (contained; NEEDS_RESET).", |e| e.dev.mem_faults),
        ("zc_export_kicks", "Guest notifications received.", |e| e.dev.kicks),
        ("zc_export_sleeps", "Times the export's worker slept with this export idle.", |e| e.dev.sleeps),
    ];
    for (name, help, f) in plain {
        counters(enc, name, help, exports.iter().map(|e| (l(e), f(e))))?;
    }
    counters(
        enc,
        "zc_export_rx_drops",
        "Packets for the guest dropped, by reason: too_big (larger than the guest's buffers), no_room (more than the guest's whole ring can hold at once), bad_desc (guest descriptors that failed validation).",
        exports.iter().flat_map(|e| {
            [
                (with(e, "reason", "too_big"), e.rx.drop_too_big),
                (with(e, "reason", "no_room"), e.rx.drop_no_room),
                (with(e, "reason", "bad_desc"), e.rx.invalid_desc),
            ]
        }),
    )?;
    counters(
        enc,
        "zc_export_tx_drops",
        "Packets from the guest dropped, by reason: no_queue (the export has no tx queue: a sink), bad_len (empty or longer than a buffer), bad_desc (descriptors that failed validation).",
        exports.iter().flat_map(|e| {
            [
                (with(e, "reason", "no_queue"), e.tx.drop_no_queue),
                (with(e, "reason", "bad_len"), e.tx.drop_bad_len),
                (with(e, "reason", "bad_desc"), e.tx.invalid_desc),
            ]
        }),
    )?;
    gauges(
        enc,
        "zc_export_connected",
        "1 while a frontend (a VM's QEMU, the guest driver) is connected.",
        exports.iter().map(|e| (l(e), e.dev.connected)),
    )?;
    gauges(
        enc,
        "zc_export_needs_reset",
        "1 while the device is stopped for a broken ring or vanished memory, until the guest resets it.",
        exports.iter().map(|e| (l(e), e.dev.needs_reset)),
    )
}

#[cfg(test)]
mod tests {
    use crate::metrics::{render_for_test, Snapshot};
    use crate::stats::ExportStats;

    #[test]
    fn every_drop_reason_of_stats_is_a_labelled_sample() {
        let mut e = ExportStats {
            name: "vm1.sock".into(),
            ..Default::default()
        };
        e.rx.drop_too_big = 1;
        e.rx.drop_no_room = 2;
        e.rx.invalid_desc = 3;
        e.tx.drop_no_queue = 4;
        e.tx.drop_bad_len = 5;
        e.tx.invalid_desc = 6;
        let text = render_for_test(Snapshot {
            exports: vec![e],
            ..Default::default()
        });
        for (dir, reason, n) in [
            ("rx", "too_big", 1),
            ("rx", "no_room", 2),
            ("rx", "bad_desc", 3),
            ("tx", "no_queue", 4),
            ("tx", "bad_len", 5),
            ("tx", "bad_desc", 6),
        ] {
            let line = format!(
                "zc_export_{dir}_drops_total{{cluster=\"7\",export=\"vm1.sock\",reason=\"{reason}\"}} {n}"
            );
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
    }
}
