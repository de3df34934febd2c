//! `zc::open_*`: from a name to a transport.

use std::io;
use std::path::PathBuf;
use std::time::Duration;
use thiserror::Error;
use zc_host::client::{self, ClientError, HostRx, HostTx};
use zc_proto::{BufferHandle, Name, NameError, PoolView, QueueEnd, Receiver, Sender};

#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("{name}: {source}")]
    Host { name: String, source: ClientError },
    #[error("{0}: interface names are for the zc guest driver inside a VM; on the host, open a cluster queue such as zc:99@0")]
    InterfaceOnHost(String),
}

/// Where to look for clusters.
#[derive(Clone, Debug)]
pub struct Options {
    /// Directory of cluster control sockets (default `$ZC_RUN_DIR` or /run/zc).
    pub run_dir: PathBuf,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            run_dir: client::run_dir_from_env(),
        }
    }
}

/// The receiving end of a queue, whatever the transport.
pub enum Rx {
    Host(HostRx),
}

/// The sending end of a queue, whatever the transport.
pub enum Tx {
    Host(HostTx),
}

fn resolve(name: &str) -> Result<(u32, u16), Error> {
    match name.parse::<Name>()? {
        Name::Queue { cluster, queue } => Ok((cluster.0, queue.0)),
        Name::Interface(_) => Err(Error::InterfaceOnHost(name.to_string())),
    }
}

/// Opens `name` (e.g. `zc:99@0`) for receiving.
pub fn open_rx(name: &str) -> Result<Rx, Error> {
    open_rx_with(name, &Options::default())
}

pub fn open_rx_with(name: &str, opts: &Options) -> Result<Rx, Error> {
    let (cluster, queue) = resolve(name)?;
    HostRx::open(&opts.run_dir, cluster, queue)
        .map(Rx::Host)
        .map_err(|source| Error::Host {
            name: name.to_string(),
            source,
        })
}

/// Opens `name` (e.g. `zc:99@0`) for sending.
pub fn open_tx(name: &str) -> Result<Tx, Error> {
    open_tx_with(name, &Options::default())
}

pub fn open_tx_with(name: &str, opts: &Options) -> Result<Tx, Error> {
    let (cluster, queue) = resolve(name)?;
    HostTx::open(&opts.run_dir, cluster, queue)
        .map(Tx::Host)
        .map_err(|source| Error::Host {
            name: name.to_string(),
            source,
        })
}

impl QueueEnd for Rx {
    fn take_buffers(&mut self, n: usize) -> io::Result<Vec<BufferHandle>> {
        match self {
            Rx::Host(q) => q.take_buffers(n),
        }
    }

    fn pool(&self) -> &PoolView {
        match self {
            Rx::Host(q) => q.pool(),
        }
    }
}

impl Receiver for Rx {
    #[inline]
    fn recv_burst(&mut self, bufs: &mut [BufferHandle]) -> usize {
        match self {
            Rx::Host(q) => q.recv_burst(bufs),
        }
    }

    fn wait_recv(&mut self, timeout: Duration) {
        match self {
            Rx::Host(q) => q.wait_recv(timeout),
        }
    }
}

impl QueueEnd for Tx {
    fn take_buffers(&mut self, n: usize) -> io::Result<Vec<BufferHandle>> {
        match self {
            Tx::Host(q) => q.take_buffers(n),
        }
    }

    fn pool(&self) -> &PoolView {
        match self {
            Tx::Host(q) => q.pool(),
        }
    }
}

impl Sender for Tx {
    #[inline]
    fn send_burst(&mut self, bufs: &mut [BufferHandle]) -> usize {
        match self {
            Tx::Host(q) => q.send_burst(bufs),
        }
    }

    fn wait_send(&mut self, timeout: Duration) {
        match self {
            Tx::Host(q) => q.wait_send(timeout),
        }
    }
}
