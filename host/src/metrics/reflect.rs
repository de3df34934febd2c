//! The reflector families: per `--reflect` port, labelled with its name
//! (`reflect:<in>`, as `stats` and `move` name it).

use super::{counters, Labels};
use crate::port::reflect::ReflectPortStats;
use prometheus_client::encoding::DescriptorEncoder;

pub(super) fn encode(
    enc: &mut DescriptorEncoder,
    cluster: &str,
    ports: &[ReflectPortStats],
) -> std::fmt::Result {
    let l = |p: &ReflectPortStats| -> Labels {
        vec![
            ("cluster", cluster.to_string()),
            ("reflect", p.name.clone()),
        ]
    };
    counters(
        enc,
        "zc_reflect_packets",
        "Packets the reflector sent back, MAC addresses swapped.",
        ports.iter().map(|p| (l(p), p.counters.reflected)),
    )?;
    counters(
        enc,
        "zc_reflect_bytes",
        "Bytes the reflector sent back.",
        ports.iter().map(|p| (l(p), p.counters.bytes)),
    )?;
    counters(
        enc,
        "zc_reflect_drops",
        "Packets the reflector dropped, by reason: queue_full (no room in its out queue), runt (shorter than two MAC addresses).",
        ports.iter().flat_map(|p| {
            let with = |v: &str| {
                let mut labels = l(p);
                labels.push(("reason", v.to_string()));
                labels
            };
            [
                (with("queue_full"), p.counters.drop_queue_full),
                (with("runt"), p.counters.drop_runt),
            ]
        }),
    )
}

#[cfg(test)]
mod tests {
    use crate::metrics::{render_for_test, Snapshot};
    use crate::port::reflect::{ReflectPortStats, ReflectStats};

    #[test]
    fn every_counter_of_stats_is_a_labelled_sample() {
        let p = ReflectPortStats {
            name: "reflect:1".into(),
            input: 1,
            output: 0,
            worker: Some(0),
            counters: ReflectStats {
                reflected: 10,
                bytes: 640,
                drop_queue_full: 3,
                drop_runt: 2,
                bad_slots: 0,
            },
        };
        let text = render_for_test(Snapshot {
            reflectors: vec![p],
            ..Default::default()
        });
        let l = "cluster=\"7\",reflect=\"reflect:1\"";
        for line in [
            format!("zc_reflect_packets_total{{{l}}} 10"),
            format!("zc_reflect_bytes_total{{{l}}} 640"),
            format!("zc_reflect_drops_total{{{l},reason=\"queue_full\"}} 3"),
            format!("zc_reflect_drops_total{{{l},reason=\"runt\"}} 2"),
        ] {
            assert!(text.lines().any(|t| t == line), "no {line:?} in:\n{text}");
        }
    }
}
