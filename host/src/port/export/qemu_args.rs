//! The QEMU options that attach a VM to an export.

use super::spec::MacDisplay;

/// virtio-net-pci offloads an export's device turns off: zc exchanges
/// whole packets and negotiates none of them. Both the start-up options
/// here and the hot-plug (`crate::hotplug`) use this list.
pub const OFFLOADS_OFF: [&str; 11] = [
    "csum",
    "guest_csum",
    "gso",
    "guest_tso4",
    "guest_tso6",
    "guest_ecn",
    "guest_ufo",
    "host_tso4",
    "host_tso6",
    "host_ecn",
    "host_ufo",
];

/// How often QEMU tries to reconnect to an export's socket after losing
/// it (a zc-hostd restart): `reconnect-ms=` of the chardev (QEMU 9.2+;
/// QEMU stays the client, so the restarted daemon only has to listen).
pub const RECONNECT_MS: u32 = 500;

/// QEMU id of the memory backend on the pool of `cluster`: the same at
/// start-up and in hot-plug, so an attach recognises a VM that has it.
pub fn pool_object_id(cluster: u32) -> String {
    format!("zcpool{cluster}")
}

pub struct QemuArgs<'a> {
    pub cluster: u32,
    pub pool_path: &'a str,
    pub pool_size: u64,
    pub socket: &'a str,
    pub mac: [u8; 6],
    /// Guest RAM, e.g. "1G": shared, so the backend can map it.
    pub mem: &'a str,
    /// Distinguishes several exports of one VM.
    pub index: usize,
}

impl QemuArgs<'_> {
    /// One option group per line, ready to paste after `qemu-system-x86_64`.
    pub fn lines(&self) -> Vec<String> {
        let i = self.index;
        let pool = pool_object_id(self.cluster);
        let offloads: String = OFFLOADS_OFF.iter().map(|o| format!(",{o}=off")).collect();
        vec![
            format!(
                "-m {mem} -object memory-backend-memfd,id=zcmem,size={mem},share=on -numa node,memdev=zcmem",
                mem = self.mem
            ),
            format!(
                "-object memory-backend-file,id={pool},mem-path={},size={},share=on -device ivshmem-plain,memdev={pool}",
                self.pool_path, self.pool_size
            ),
            format!(
                "-chardev socket,id=zcchr{i},path={},reconnect-ms={RECONNECT_MS}",
                self.socket
            ),
            format!("-netdev vhost-user,id=zcnet{i},chardev=zcchr{i}"),
            format!(
                "-device virtio-net-pci,netdev=zcnet{i},mac={},mrg_rxbuf=on{offloads}",
                MacDisplay(&self.mac)
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_name_the_pool_socket_and_mac() {
        let a = QemuArgs {
            cluster: 99,
            pool_path: "/dev/hugepages/zc/99/pool",
            pool_size: 4 << 20,
            socket: "/tmp/vm1.sock",
            mac: [2, 0x7a, 0, 99, 0, 1],
            mem: "1G",
            index: 0,
        };
        let s = a.lines().join(" ");
        assert!(
            s.contains("memory-backend-memfd,id=zcmem,size=1G,share=on -numa node,memdev=zcmem")
        );
        assert!(s.contains("mem-path=/dev/hugepages/zc/99/pool,size=4194304,share=on"));
        assert!(s.contains("ivshmem-plain,memdev=zcpool99"));
        assert!(s.contains("-chardev socket,id=zcchr0,path=/tmp/vm1.sock,reconnect-ms=500 "));
        assert!(s.contains("virtio-net-pci,netdev=zcnet0,mac=02:7a:00:63:00:01,mrg_rxbuf=on,csum=off,guest_csum=off,gso=off,guest_tso4=off,guest_tso6=off,guest_ecn=off,guest_ufo=off,host_tso4=off,host_tso6=off,host_ecn=off,host_ufo=off"));
    }
}
