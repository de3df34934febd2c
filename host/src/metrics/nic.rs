//! The interface port families: per `--nic` port, labelled with its name
//! (`nic:<ifname>@<queue>`, as `stats`, `move` and `nic del` name it).

use super::{counters, gauges, Labels};
use crate::port::nic::NicPortStats;
use prometheus_client::encoding::DescriptorEncoder;

pub(super) fn encode(
    enc: &mut DescriptorEncoder,
    cluster: &str,
    nics: &[NicPortStats],
) -> std::fmt::Result {
    let l = |n: &NicPortStats| -> Labels {
        vec![("cluster", cluster.to_string()), ("nic", n.name.clone())]
    };
    let with = |n: &NicPortStats, k: &'static str, v: &str| -> Labels {
        let mut labels = l(n);
        labels.push((k, v.to_string()));
        labels
    };
    type Field = fn(&NicPortStats) -> u64;
    let plain: [(&str, &str, Field); 6] = [
        (
            "zc_nic_rx_packets",
            "Packets received on the interface and put into the ingress queue.",
            |n| n.counters.rx_packets,
        ),
        (
            "zc_nic_rx_bytes",
            "Bytes received on the interface and put into the ingress queue.",
            |n| n.counters.rx_bytes,
        ),
        (
            "zc_nic_tx_packets",
            "Packets from the egress queue sent on the interface.",
            |n| n.counters.tx_packets,
        ),
        (
            "zc_nic_tx_bytes",
            "Bytes from the egress queue sent on the interface.",
            |n| n.counters.tx_bytes,
        ),
        ("zc_nic_tx_errors", "Sends the kernel refused.", |n| {
            n.counters.tx_errors
        }),
        (
            "zc_nic_bad_descs",
            "Descriptors from the kernel naming no buffer the port lent it (never expected).",
            |n| n.counters.bad_descs,
        ),
    ];
    for (name, help, f) in plain {
        counters(enc, name, help, nics.iter().map(|n| (l(n), f(n))))?;
    }
    counters(
        enc,
        "zc_nic_rx_copies",
        "Received packets by how they reached a pool buffer: zero_copy (the driver wrote into it), copied (the kernel or zc copied).",
        nics.iter().flat_map(|n| {
            [
                (with(n, "how", "zero_copy"), n.counters.rx_zero_copy),
                (with(n, "how", "copied"), n.counters.rx_copied),
            ]
        }),
    )?;
    counters(
        enc,
        "zc_nic_tx_copies",
        "Sent packets by how they left their pool buffer: zero_copy (the driver read it), copied.",
        nics.iter().flat_map(|n| {
            [
                (with(n, "how", "zero_copy"), n.counters.tx_zero_copy),
                (with(n, "how", "copied"), n.counters.tx_copied),
            ]
        }),
    )?;
    counters(
        enc,
        "zc_nic_rx_drops",
        "Received packets dropped, by reason: kernel_ring_full (the kernel's ring towards zc was full), fill_ring_empty (the kernel had no empty buffer), queue_full (the ingress cluster queue was full), too_long (longer than a pool buffer).",
        nics.iter().flat_map(|n| {
            let c = &n.counters;
            [
                (with(n, "reason", "kernel_ring_full"), c.drop_kernel_ring_full),
                (with(n, "reason", "fill_ring_empty"), c.drop_fill_ring_empty),
                (with(n, "reason", "queue_full"), c.drop_queue_full),
                (with(n, "reason", "too_long"), c.drop_too_long),
            ]
        }),
    )?;
    gauges(
        enc,
        "zc_nic_mode",
        "1 for the way the port reaches the kernel (mode xdp or packet) and whether AF_XDP runs zero-copy.",
        nics.iter().map(|n| {
            let mut labels = with(n, "mode", &n.counters.mode);
            labels.push(("zero_copy", n.counters.zero_copy.to_string()));
            (labels, 1u64)
        }),
    )
}

#[cfg(test)]
mod tests {
    use crate::metrics::{render_for_test, Snapshot};
    use crate::port::nic::{NicPortStats, NicStats};

    #[test]
    fn every_counter_of_stats_is_a_labelled_sample() {
        let n = NicPortStats {
            name: "nic:eth1@0".into(),
            ifname: "eth1".into(),
            ingress: Some(0),
            counters: NicStats {
                mode: "xdp".into(),
                rx_packets: 10,
                rx_bytes: 600,
                tx_packets: 3,
                rx_copied: 10,
                tx_zero_copy: 3,
                drop_kernel_ring_full: 1,
                drop_fill_ring_empty: 2,
                drop_queue_full: 4,
                drop_too_long: 5,
                ..Default::default()
            },
            ..Default::default()
        };
        let text = render_for_test(Snapshot {
            nics: vec![n],
            ..Default::default()
        });
        let l = "cluster=\"7\",nic=\"nic:eth1@0\"";
        for line in [
            format!("zc_nic_rx_packets_total{{{l}}} 10"),
            format!("zc_nic_rx_bytes_total{{{l}}} 600"),
            format!("zc_nic_tx_packets_total{{{l}}} 3"),
            format!("zc_nic_rx_copies_total{{{l},how=\"copied\"}} 10"),
            format!("zc_nic_rx_copies_total{{{l},how=\"zero_copy\"}} 0"),
            format!("zc_nic_tx_copies_total{{{l},how=\"zero_copy\"}} 3"),
            format!("zc_nic_rx_drops_total{{{l},reason=\"kernel_ring_full\"}} 1"),
            format!("zc_nic_rx_drops_total{{{l},reason=\"fill_ring_empty\"}} 2"),
            format!("zc_nic_rx_drops_total{{{l},reason=\"queue_full\"}} 4"),
            format!("zc_nic_rx_drops_total{{{l},reason=\"too_long\"}} 5"),
            format!("zc_nic_mode{{{l},mode=\"xdp\",zero_copy=\"false\"}} 1"),
        ] {
            assert!(text.lines().any(|t| t == line), "no {line:?} in:\n{text}");
        }
    }
}
