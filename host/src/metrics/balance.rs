//! The balancer families: per `--balance` port (labelled with its name,
//! `balance:in=..,out=..`) and per output queue.

use super::{counters, Labels};
use crate::port::balancer::BalancePortStats;
use prometheus_client::encoding::DescriptorEncoder;

pub(super) fn encode(
    enc: &mut DescriptorEncoder,
    cluster: &str,
    ports: &[BalancePortStats],
) -> std::fmt::Result {
    let l = |p: &BalancePortStats| -> Labels {
        vec![
            ("cluster", cluster.to_string()),
            ("balance", p.name.clone()),
        ]
    };
    let per_queue = |p: &BalancePortStats, q: u16, g: usize| -> Labels {
        let mut labels = l(p);
        labels.push(("queue", q.to_string()));
        labels.push(("group", g.to_string()));
        labels
    };
    counters(
        enc,
        "zc_balance_in_packets",
        "Packets the balancer read from its in queues.",
        ports.iter().map(|p| (l(p), p.counters.packets_in)),
    )?;
    counters(
        enc,
        "zc_balance_forwarded_packets",
        "Packets the balancer put into an output queue.",
        ports.iter().flat_map(|p| {
            p.counters
                .outputs
                .iter()
                .map(move |o| (per_queue(p, o.queue, o.group), o.forwarded))
        }),
    )?;
    counters(
        enc,
        "zc_balance_dropped_packets",
        "Packets for an output queue dropped because it was full (full=drop).",
        ports.iter().flat_map(|p| {
            p.counters
                .outputs
                .iter()
                .map(move |o| (per_queue(p, o.queue, o.group), o.dropped))
        }),
    )?;
    counters(
        enc,
        "zc_balance_copied_bytes",
        "Bytes the balancer copied for fan-out destinations.",
        ports.iter().flat_map(|p| {
            p.counters
                .outputs
                .iter()
                .map(move |o| (per_queue(p, o.queue, o.group), o.bytes_copied))
        }),
    )
}

#[cfg(test)]
mod tests {
    use crate::metrics::{render_for_test, Snapshot};
    use crate::port::balancer::{BalancePortStats, BalanceStats, OutputStats};

    #[test]
    fn every_output_queue_is_a_labelled_sample() {
        let out = |queue, group, forwarded, dropped| OutputStats {
            queue,
            group,
            forwarded,
            bytes: forwarded * 60,
            dropped,
            copied: 0,
            bytes_copied: 0,
        };
        let p = BalancePortStats::new(
            "balance:in=0,out=1+2/3".into(),
            "in=0,out=1+2/3,hash=5tuple,full=drop".into(),
            Some(0),
            BalanceStats {
                packets_in: 10,
                bad_slots: 0,
                bytes_copied: 0,
                outputs: vec![out(1, 0, 6, 0), out(2, 0, 4, 0), out(3, 1, 7, 3)],
            },
        );
        assert_eq!(p.groups[0].forwarded, 10);
        assert_eq!((p.groups[1].forwarded, p.groups[1].dropped), (7, 3));
        let text = render_for_test(Snapshot {
            balancers: vec![p],
            ..Default::default()
        });
        let l = "cluster=\"7\",balance=\"balance:in=0,out=1+2/3\"";
        for line in [
            format!("zc_balance_in_packets_total{{{l}}} 10"),
            format!("zc_balance_forwarded_packets_total{{{l},queue=\"1\",group=\"0\"}} 6"),
            format!("zc_balance_dropped_packets_total{{{l},queue=\"3\",group=\"1\"}} 3"),
            format!("zc_balance_copied_bytes_total{{{l},queue=\"2\",group=\"0\"}} 0"),
        ] {
            assert!(text.lines().any(|t| t == line), "no {line:?} in:\n{text}");
        }
    }
}
