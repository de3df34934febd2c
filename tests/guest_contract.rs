//! What the guest driver and the host export must agree on, checked against
//! both crates: the stock list's place and format, and the features.

use zc_guest::init::{DRIVER_FEATURES, F_NET_MRG_RXBUF, F_RING_EVENT_IDX, F_VERSION_1};
use zc_guest::pool::{create_pool_file, PoolMap};
use zc_host::port::export::{backend, directory};
use zc_proto::{BufferIndex, PoolLayout};

#[test]
fn guest_reads_the_stock_list_the_host_writes() {
    assert_eq!(zc_guest::pool::STOCK_OFFSET, directory::STOCK_OFFSET);
    assert_eq!(zc_guest::pool::MAX_STOCK, directory::MAX_STOCK);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let layout = PoolLayout::new(5, 2048, 256).unwrap();
    let f = create_pool_file(&path, &layout).unwrap();
    let map = std::sync::Arc::new(PoolMap::map(&f, layout.pool_size, &path).unwrap());
    let stock: Vec<BufferIndex> = (100..200).map(BufferIndex::new).collect();
    directory::write_stock(&map.view(), 4, &stock);
    assert_eq!(map.stock(4).unwrap(), stock);
    // And what the guest hands back on close, the host reads.
    map.write_stock(4, &stock[..10]);
    assert_eq!(
        directory::read_stock(&map.view(), 4),
        (100..110).collect::<Vec<u32>>()
    );
}

#[test]
fn guest_accepts_the_features_the_host_offers_that_the_contract_needs() {
    let acked = zc_guest::init::negotiate(backend::FEATURES).unwrap();
    assert_eq!(
        acked & (F_VERSION_1 | F_RING_EVENT_IDX | F_NET_MRG_RXBUF),
        F_VERSION_1 | F_RING_EVENT_IDX | F_NET_MRG_RXBUF
    );
    assert_eq!(acked & !DRIVER_FEATURES, 0);
}
