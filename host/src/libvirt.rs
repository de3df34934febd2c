//! The libvirt side of zc: the domain XML that gives a VM an export (the
//! shared memory vhost-user needs, the vhost-user interface and the pool
//! as an ivshmem-plain shmem), for `zc-hostd --libvirt-xml` and for
//! hot-plug through `virsh attach-device --live`, and the `virsh` runs
//! that attach and detach them. libvirt owns its domains' QMP monitors,
//! so this is how `attach --libvirt` reaches them.

use crate::hotplug::{NetPlug, PoolPlug};
use crate::port::export::qemu_args::pool_object_id;
use crate::port::export::spec::MacDisplay;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Seconds between QEMU's attempts to reach a restarted zc-hostd.
pub const RECONNECT_S: u32 = 1;

/// The connection `attach --libvirt` uses unless `--connect` says otherwise.
pub const DEFAULT_URI: &str = "qemu:///system";

#[derive(Debug, Error)]
pub enum LibvirtError {
    #[error("virsh is not installed (apt-get install libvirt-clients)")]
    NoVirsh,
    #[error("cannot reach libvirt at {uri}: {message} (is libvirtd running?)")]
    Unreachable { uri: String, message: String },
    #[error("libvirt at {uri} has no domain named {domain} (see virsh -c {uri} list --all)")]
    NoDomain { uri: String, domain: String },
    #[error("the domain is not running (it is {state}): start it first, or add the devices to its definition (zc-hostd --libvirt-xml prints them)")]
    NotRunning { state: String },
    #[error("its memory is not shared, which vhost-user needs: add <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking> to its definition (zc-hostd --libvirt-xml prints it) and restart it")]
    NoSharedMemory,
    #[error("libvirt refused {command}: {message}")]
    Refused { command: String, message: String },
    #[error("the guest did not release device {alias} within {timeout:?} (is it running, with ACPI PCI hot-plug?)")]
    Timeout { alias: String, timeout: Duration },
    #[error("virsh {command}: {source}")]
    Io {
        command: String,
        source: std::io::Error,
    },
}

impl LibvirtError {
    /// The domain is gone: detach removes only the host side.
    pub fn gone(&self) -> Option<String> {
        match self {
            LibvirtError::NoDomain { .. } => Some("libvirt no longer has it".into()),
            LibvirtError::NotRunning { state } => Some(format!("the domain is {state}")),
            _ => None,
        }
    }
}

/// `s` as XML attribute or text content.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// Shared guest RAM: vhost-user maps it (in `<domain>`).
pub fn memory_backing() -> String {
    "<memoryBacking>\n  <source type='memfd'/>\n  <access mode='shared'/>\n</memoryBacking>".into()
}

/// The alias libvirt gives a device zc plugs (user aliases start with `ua-`).
fn alias(id: &str) -> String {
    format!("ua-{id}")
}

/// The vhost-user interface of an export, with the same device options as
/// `--qemu-args` (`OFFLOADS_OFF`, mergeable RX buffers); `alias` names it
/// for a later detach.
pub fn interface(socket: &str, mac: [u8; 6], alias: Option<&str>) -> String {
    let alias = alias.map_or(String::new(), |a| {
        format!("  <alias name='{}'/>\n", escape(a))
    });
    // <reconnect> makes a restarted zc-hostd reconnected to, as the
    // --qemu-args chardev's reconnect-ms does. libvirt's timeout is whole
    // seconds (it becomes the chardev's `reconnect=`, which QEMU 10 still
    // takes), so 1 is the shortest.
    format!(
        "<interface type='vhostuser'>\n  <mac address='{}'/>\n  <source type='unix' path='{}' mode='client'>\n    \
         <reconnect enabled='yes' timeout='{RECONNECT_S}'/>\n  </source>\n  \
         <model type='virtio'/>\n  <driver>\n    \
         <host csum='off' gso='off' tso4='off' tso6='off' ecn='off' ufo='off' mrg_rxbuf='on'/>\n    \
         <guest csum='off' tso4='off' tso6='off' ecn='off' ufo='off'/>\n  </driver>\n{alias}</interface>",
        MacDisplay(&mac),
        escape(socket),
    )
}

/// The pool as an ivshmem-plain device: libvirt maps `/dev/shm/<name>`,
/// the link zc-hostd keeps to the pool file.
pub fn shmem(cluster: u32, pool_size: u64, alias: Option<&str>) -> String {
    let alias = alias.map_or(String::new(), |a| {
        format!("  <alias name='{}'/>\n", escape(a))
    });
    // Pools are powers of two of at least 2 MiB, so this is exact.
    format!(
        "<shmem name='{}'>\n  <model type='ivshmem-plain'/>\n  <size unit='M'>{}</size>\n{alias}</shmem>",
        pool_object_id(cluster),
        pool_size >> 20
    )
}

/// One running domain, reached through `virsh -c <uri>`.
pub struct Domain {
    uri: String,
    name: String,
}

/// The error lines virsh printed, as one: "error: a\nerror: b" -> "a: b".
fn virsh_message(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr)
        .lines()
        .map(|l| l.trim().trim_start_matches("error:").trim())
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(": ")
}

impl Domain {
    /// The running domain `name` on `uri`.
    pub fn connect(uri: &str, name: &str) -> Result<Domain, LibvirtError> {
        let d = Domain {
            uri: uri.into(),
            name: name.into(),
        };
        let state = d.virsh(&["domstate", name], None)?;
        let state = state.trim();
        if state != "running" && state != "paused" {
            return Err(LibvirtError::NotRunning {
                state: state.into(),
            });
        }
        Ok(d)
    }

    fn virsh(&self, args: &[&str], input: Option<&str>) -> Result<String, LibvirtError> {
        let command = args.first().copied().unwrap_or_default().to_string();
        let io = |source: std::io::Error| {
            if source.kind() == std::io::ErrorKind::NotFound {
                LibvirtError::NoVirsh
            } else {
                LibvirtError::Io {
                    command: command.clone(),
                    source,
                }
            }
        };
        let mut child = Command::new("virsh")
            .args(["-q", "-c", &self.uri])
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io)?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(text.as_bytes()).map_err(io)?;
        }
        let out = child.wait_with_output().map_err(io)?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let message = virsh_message(&out.stderr);
        Err(if message.contains("failed to connect to the hypervisor") {
            LibvirtError::Unreachable {
                uri: self.uri.clone(),
                message,
            }
        } else if message.contains("failed to get domain") || message.contains("Domain not found") {
            LibvirtError::NoDomain {
                uri: self.uri.clone(),
                domain: self.name.clone(),
            }
        } else {
            LibvirtError::Refused {
                command: format!("{command} on domain {}", self.name),
                message,
            }
        })
    }

    /// The live domain XML.
    pub fn xml(&self) -> Result<String, LibvirtError> {
        self.virsh(&["dumpxml", &self.name], None)
    }

    /// vhost-user needs the guest's RAM shared (a whole-domain memory
    /// backing or every NUMA cell's).
    pub fn check_shared_memory(&self) -> Result<(), LibvirtError> {
        let xml = self.xml()?;
        if xml.contains("<access mode='shared'/>") || xml.contains("memAccess='shared'") {
            Ok(())
        } else {
            Err(LibvirtError::NoSharedMemory)
        }
    }

    fn attach(&self, device: &str) -> Result<(), LibvirtError> {
        self.virsh(
            &["attach-device", &self.name, "/dev/stdin", "--live"],
            Some(device),
        )
        .map(drop)
    }

    /// Asks libvirt to unplug the device `alias`, then waits until it has
    /// left the live XML (the guest must release it first). A device that
    /// is not there is gone already.
    fn detach(&self, alias: &str, timeout: Duration) -> Result<(), LibvirtError> {
        let present = |xml: &str| xml.contains(&format!("<alias name='{}'/>", escape(alias)));
        if !present(&self.xml()?) {
            return Ok(());
        }
        self.virsh(&["detach-device-alias", &self.name, alias, "--live"], None)?;
        let deadline = Instant::now() + timeout;
        while present(&self.xml()?) {
            if Instant::now() >= deadline {
                return Err(LibvirtError::Timeout {
                    alias: alias.into(),
                    timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// Adds the pool unless the domain has it (defined with
    /// `--libvirt-xml`, or attached before); true when added here.
    pub fn add_pool(&self, pool: &PoolPlug) -> Result<bool, LibvirtError> {
        let name = pool_object_id(pool.cluster);
        if self.xml()?.contains(&format!("<shmem name='{name}'>")) {
            return Ok(false);
        }
        self.attach(&shmem(pool.cluster, pool.size, Some(&alias(&name))))?;
        Ok(true)
    }

    /// Removes a pool that `add_pool` added.
    pub fn remove_pool(&self, pool: &PoolPlug, timeout: Duration) -> Result<(), LibvirtError> {
        self.detach(&alias(&pool_object_id(pool.cluster)), timeout)
    }

    /// Adds the export's interface; libvirt undoes its own steps if QEMU
    /// refuses one.
    pub fn add_net(&self, net: &NetPlug) -> Result<(), LibvirtError> {
        let socket = net.socket.display().to_string();
        self.attach(&interface(&socket, net.mac, Some(&alias(net.id))))
    }

    /// Unplugs the export's interface (waiting for the guest to let go of
    /// it), which disconnects the export.
    pub fn remove_net(&self, net: &NetPlug, timeout: Duration) -> Result<(), LibvirtError> {
        self.detach(&alias(net.id), timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragments_carry_the_export_and_the_pool() {
        let i = interface(
            "/run/zc/a'b&.sock",
            [2, 0x7a, 0, 99, 0, 1],
            Some("ua-zc99-rx1"),
        );
        assert!(i.contains("<mac address='02:7a:00:63:00:01'/>"), "{i}");
        assert!(
            i.contains("path='/run/zc/a&apos;b&amp;.sock' mode='client'"),
            "{i}"
        );
        assert!(i.contains("mrg_rxbuf='on'"), "{i}");
        assert!(
            i.contains("mode='client'>\n    <reconnect enabled='yes' timeout='1'/>\n  </source>"),
            "{i}"
        );
        assert!(i.contains("<alias name='ua-zc99-rx1'/>"), "{i}");
        assert!(!interface("/s", [0; 6], None).contains("alias"));
        let s = shmem(99, 256 << 20, None);
        assert_eq!(
            s,
            "<shmem name='zcpool99'>\n  <model type='ivshmem-plain'/>\n  <size unit='M'>256</size>\n</shmem>"
        );
    }

    #[test]
    fn virsh_errors_become_one_line() {
        assert_eq!(
            virsh_message(b"error: failed to connect to the hypervisor\nerror: Failed to connect socket to '/x': No such file or directory\n"),
            "failed to connect to the hypervisor: Failed to connect socket to '/x': No such file or directory"
        );
    }
}
