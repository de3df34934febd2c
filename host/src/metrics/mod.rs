//! `zc-hostd --metrics ADDR:PORT`: Prometheus text exposition (OpenMetrics,
//! with `prometheus-client`) on `/metrics`, served by `tiny_http` on a
//! thread of its own. A scrape reads the snapshots `zc-hostd stats` reads
//! (counters the ports publish with relaxed stores, the workers' load
//! reports, the queues' indices); nothing on the packet path waits for it.
//!
//! Each kind of thing the daemon runs has one module that turns its
//! snapshot into metric families (`cluster`, `export`, `nic`, `reflect`, `worker`); a new
//! kind of port adds its own module and a field to [`Snapshot`].

mod balance;
mod cluster;
mod export;
mod nic;
mod reflect;
mod worker;

pub use cluster::QueueTotals;

use crate::control::ClusterInfo;
use crate::stats::{BufferUse, ExportStats, WorkerStats};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use thiserror::Error;

/// Everything one scrape reports, taken at once.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub info: Option<ClusterInfo>,
    pub buffers: BufferUse,
    /// Per queue: (produced, consumed, depth).
    pub queues: Vec<(u64, u64, u32)>,
    pub exports: Vec<ExportStats>,
    pub workers: Vec<WorkerStats>,
    pub nics: Vec<crate::port::nic::NicPortStats>,
    pub reflectors: Vec<crate::port::reflect::ReflectPortStats>,
    pub balancers: Vec<crate::port::balancer::BalancePortStats>,
}

/// Where the snapshots come from (the daemon).
pub trait Source: Send + Sync + 'static {
    fn snapshot(&self) -> Snapshot;
}

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("--metrics {addr}: cannot listen there: {why} (choose another ADDR:PORT)")]
    Listen { addr: String, why: String },
}

/// One label set: `[("cluster", "99"), ("export", "vm1.sock")]`.
type Labels = Vec<(&'static str, String)>;

/// Writes one counter family: HELP, TYPE and a sample per label set
/// (the encoder adds `_total`).
fn counters(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, u64)>,
) -> std::fmt::Result {
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in samples {
        ConstCounter::new(v).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Writes one gauge family.
fn gauges<V>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, V)>,
) -> std::fmt::Result
where
    ConstGauge<V>: EncodeMetric,
{
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in samples {
        ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

struct Scrape(Arc<dyn Source>);

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("zc-hostd metrics")
    }
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let s = self.0.snapshot();
        let Some(info) = &s.info else {
            return Ok(());
        };
        let c = info.cluster.to_string();
        cluster::encode(&mut enc, &c, info, &s.buffers, &s.queues)?;
        export::encode(&mut enc, &c, &s.exports)?;
        nic::encode(&mut enc, &c, &s.nics)?;
        reflect::encode(&mut enc, &c, &s.reflectors)?;
        balance::encode(&mut enc, &c, &s.balancers)?;
        worker::encode(&mut enc, &c, &s.workers)
    }
}

/// The exposition of one snapshot source, as a scrape gets it.
pub fn render(source: Arc<dyn Source>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape(source)));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// What the renderers' tests check: `snapshot` rendered as the metrics of
/// cluster 7.
#[cfg(test)]
fn render_for_test(snapshot: Snapshot) -> String {
    struct Fixed(Snapshot);
    impl Source for Fixed {
        fn snapshot(&self) -> Snapshot {
            self.0.clone()
        }
    }
    let info = crate::control::ClusterInfo {
        cluster: 7,
        queues: 4,
        ring_size: 64,
        buf_size: 2048,
        buf_count: 1024,
        pool_size: 1 << 21,
        pool_path: "/dev/shm/zc-7".into(),
        hugepages: false,
        daemon_pid: 1,
        spare_buffers: 64,
    };
    render(Arc::new(Fixed(Snapshot {
        info: Some(info),
        ..snapshot
    })))
}

/// The HTTP server; stops when dropped.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A listening socket that does not serve yet: bound before the daemon
/// creates anything, so that a port in use fails the start cleanly.
pub struct Bound {
    server: tiny_http::Server,
    addr: SocketAddr,
}

impl Bound {
    /// Listens on `addr` (port 0: any free port).
    pub fn listen(addr: &str) -> Result<Bound, MetricsError> {
        let listen = |why: String| MetricsError::Listen {
            addr: addr.into(),
            why,
        };
        let server = tiny_http::Server::http(addr).map_err(|e| listen(e.to_string()))?;
        let addr = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| listen("not an IP address".into()))?;
        Ok(Bound { server, addr })
    }

    /// Serves `/metrics` from `source` on a thread of its own.
    pub fn serve(self, source: Arc<dyn Source>) -> std::io::Result<MetricsServer> {
        let server = Arc::new(self.server);
        let s2 = server.clone();
        let thread = std::thread::Builder::new()
            .name("zc-metrics".into())
            .spawn(move || {
                for rq in s2.incoming_requests() {
                    let response = if rq.url() == "/metrics" || rq.url().starts_with("/metrics?") {
                        let header =
                            tiny_http::Header::from_bytes("Content-Type", CONTENT_TYPE).unwrap();
                        tiny_http::Response::from_string(render(source.clone())).with_header(header)
                    } else {
                        tiny_http::Response::from_string("zc-hostd serves /metrics\n")
                            .with_status_code(404)
                    };
                    if let Err(e) = rq.respond(response) {
                        log::debug!("metrics: reply failed: {e}");
                    }
                }
            })?;
        Ok(MetricsServer {
            server,
            addr: self.addr,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl MetricsServer {
    /// Where it listens (the port chosen when 0 was given).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
