//! A vhost-user relay between the frontend and vhost-user-backend that
//! answers one message the `vhost` crate would otherwise reject.
//!
//! QEMU's virtio-net enables its vhost-user rings (VHOST_USER_SET_VRING_ENABLE)
//! when the guest driver acknowledges its features, which is before QEMU
//! sends VHOST_USER_SET_FEATURES to the backend; the `vhost` crate's request
//! dispatcher treats that as a protocol error and drops the connection.
//! (QEMU sends the enable again after SET_FEATURES, in vhost_dev_start.)
//! So the relay acknowledges such early enables itself, remembers them, and
//! replays them to the backend right after SET_FEATURES; everything else
//! goes through unchanged, with its file descriptors.
//!
//! The relay is also where a memory table is checked before the backend
//! maps it (`mem_table`): a table whose regions do not fit their files is
//! refused (a failure reply if the frontend asked for one) and the
//! connection closed, so that only this frontend is turned away.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use thiserror::Error;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::mem_table::{self, TableError};

/// Why a relay ended other than by a clean close.
#[derive(Debug, Error)]
pub enum RelayError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("refused the frontend's memory table: {0}")]
    Table(#[from] TableError),
}

const SET_FEATURES: u32 = 2;
const SET_VRING_ENABLE: u32 = 18;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
/// VHOST_USER_F_PROTOCOL_FEATURES.
const PROTOCOL_FEATURES: u64 = 1 << 30;
/// Largest message body relayed (the memory table of 8 regions is 328 bytes;
/// vhost-user bodies are small).
const MAX_BODY: usize = 64 << 10;
const MAX_FDS: usize = 32;

/// One message: 12-byte header, body, descriptors.
struct Msg {
    hdr: [u8; 12],
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Msg {
    fn request(&self) -> u32 {
        u32::from_le_bytes([self.hdr[0], self.hdr[1], self.hdr[2], self.hdr[3]])
    }
    fn flags(&self) -> u32 {
        u32::from_le_bytes([self.hdr[4], self.hdr[5], self.hdr[6], self.hdr[7]])
    }
}

/// Reads one message; `None` at a clean end of stream.
fn read_msg(s: &UnixStream) -> io::Result<Option<Msg>> {
    let mut hdr = [0u8; 12];
    let mut raw = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: hdr.len(),
    }];
    // SAFETY: the iovec points at `hdr`, which we own and may be overwritten.
    let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut raw) }.map_err(io::Error::from)?;
    // SAFETY: recv_with_fds returned `nfds` fresh descriptors that we now own.
    let fds = raw[..nfds]
        .iter()
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    (&*s).read_exact(&mut hdr[n..])?;
    let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
    if size > MAX_BODY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vhost-user message of {size} bytes"),
        ));
    }
    let mut body = vec![0u8; size];
    (&*s).read_exact(&mut body)?;
    Ok(Some(Msg { hdr, body, fds }))
}

fn write_msg(s: &UnixStream, m: &Msg) -> io::Result<()> {
    let fds: Vec<RawFd> = m.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let mut frame = m.hdr.to_vec();
    frame.extend_from_slice(&m.body);
    let n = s
        .send_with_fds(&[&frame[..]], &fds)
        .map_err(io::Error::from)?;
    (&*s).write_all(&frame[n..])
}

/// A reply to `req` saying whether it succeeded (REPLY_ACK's u64: 0 is
/// success).
fn ack(req: u32, ok: bool) -> Msg {
    let mut hdr = [0u8; 12];
    hdr[..4].copy_from_slice(&req.to_le_bytes());
    hdr[4..8].copy_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
    hdr[8..].copy_from_slice(&8u32.to_le_bytes());
    Msg {
        hdr,
        body: u64::from(!ok).to_le_bytes().to_vec(),
        fds: Vec::new(),
    }
}

/// Relays between `front` (the frontend) and `back` (vhost-user-backend)
/// until either side closes or a memory table is refused; returns when both
/// directions ended.
pub fn relay(front: UnixStream, back: UnixStream) -> Result<(), RelayError> {
    let front_w = Arc::new(Mutex::new(front.try_clone()?));
    let back_r = back.try_clone()?;
    let front_shut = front.try_clone()?;
    let acked = Arc::new(AtomicBool::new(false));
    // Early enables: (ring index, state), in arrival order, latest wins.
    let mut early: Vec<(u32, u32)> = Vec::new();
    // Backend to frontend: replies, relayed as they are.
    let fw = front_w.clone();
    let up = std::thread::Builder::new()
        .name("zc-vhost-relay".into())
        .spawn(move || {
            while let Ok(Some(m)) = read_msg(&back_r) {
                let f = fw.lock().unwrap_or_else(|e| e.into_inner());
                if write_msg(&f, &m).is_err() {
                    break;
                }
            }
            let _ = front_shut.shutdown(std::net::Shutdown::Both);
        })?;
    // Frontend to backend.
    let r = (|| -> Result<(), RelayError> {
        while let Some(m) = read_msg(&front)? {
            if let Err(e) = mem_table::check(m.request(), &m.body, &m.fds) {
                if m.flags() & FLAG_NEED_REPLY != 0 {
                    let f = front_w.lock().unwrap_or_else(|e| e.into_inner());
                    let _ = write_msg(&f, &ack(m.request(), false));
                }
                return Err(e.into());
            }
            match m.request() {
                SET_FEATURES if m.body.len() >= 8 => {
                    let mut v = [0u8; 8];
                    v.copy_from_slice(&m.body[..8]);
                    let with_protocol = u64::from_le_bytes(v) & PROTOCOL_FEATURES != 0;
                    acked.store(with_protocol, Ordering::Relaxed);
                    write_msg(&back, &m)?;
                    if with_protocol {
                        for (index, num) in early.drain(..) {
                            let mut hdr = [0u8; 12];
                            hdr[..4].copy_from_slice(&SET_VRING_ENABLE.to_le_bytes());
                            hdr[4..8].copy_from_slice(&FLAG_VERSION.to_le_bytes());
                            hdr[8..].copy_from_slice(&8u32.to_le_bytes());
                            let mut body = index.to_le_bytes().to_vec();
                            body.extend_from_slice(&num.to_le_bytes());
                            write_msg(
                                &back,
                                &Msg {
                                    hdr,
                                    body,
                                    fds: Vec::new(),
                                },
                            )?;
                        }
                    }
                    continue;
                }
                SET_VRING_ENABLE if !acked.load(Ordering::Relaxed) => {
                    if m.body.len() >= 8 {
                        let index =
                            u32::from_le_bytes([m.body[0], m.body[1], m.body[2], m.body[3]]);
                        let num = u32::from_le_bytes([m.body[4], m.body[5], m.body[6], m.body[7]]);
                        early.retain(|&(i, _)| i != index);
                        early.push((index, num));
                    }
                    if m.flags() & FLAG_NEED_REPLY != 0 {
                        let f = front_w.lock().unwrap_or_else(|e| e.into_inner());
                        write_msg(&f, &ack(SET_VRING_ENABLE, true))?;
                    }
                    continue;
                }
                _ => {}
            }
            write_msg(&back, &m)?;
        }
        Ok(())
    })();
    let _ = back.shutdown(std::net::Shutdown::Both);
    let _ = front.shutdown(std::net::Shutdown::Both);
    let _ = up.join();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    const SET_VRING_KICK: u32 = 12;

    fn msg(req: u32, flags: u32, body: &[u8]) -> Vec<u8> {
        let mut v = req.to_le_bytes().to_vec();
        v.extend_from_slice(&flags.to_le_bytes());
        v.extend_from_slice(&(body.len() as u32).to_le_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn early_vring_enables_are_answered_then_replayed_and_the_rest_relayed_with_fds() {
        let (qemu, front) = UnixStream::pair().unwrap();
        let (back, backend) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || relay(front, back));
        // An early enable of ring 1 with NEED_REPLY: answered by the relay.
        let ring1_on = [1, 0, 0, 0, 1, 0, 0, 0];
        let flags = FLAG_VERSION | FLAG_NEED_REPLY;
        (&qemu)
            .write_all(&msg(SET_VRING_ENABLE, flags, &ring1_on))
            .unwrap();
        let reply = read_msg(&qemu).unwrap().unwrap();
        assert_eq!(reply.request(), SET_VRING_ENABLE);
        assert_eq!(reply.flags(), FLAG_VERSION | FLAG_REPLY);
        assert_eq!(reply.body, vec![0; 8]);
        // A message with a descriptor goes through, descriptor included.
        let f = tempfile::tempfile().unwrap();
        qemu.send_with_fds(
            &[&msg(SET_VRING_KICK, FLAG_VERSION, &[1, 2, 3])[..]],
            &[f.as_raw_fd()],
        )
        .unwrap();
        let got = read_msg(&backend).unwrap().unwrap();
        assert_eq!(got.request(), SET_VRING_KICK);
        assert_eq!((got.body.clone(), got.fds.len()), (vec![1, 2, 3], 1));
        // SET_FEATURES with PROTOCOL_FEATURES, then the early enable, replayed.
        let features = PROTOCOL_FEATURES.to_le_bytes();
        (&qemu)
            .write_all(&msg(SET_FEATURES, FLAG_VERSION, &features))
            .unwrap();
        assert_eq!(read_msg(&backend).unwrap().unwrap().request(), SET_FEATURES);
        let replayed = read_msg(&backend).unwrap().unwrap();
        assert_eq!(replayed.request(), SET_VRING_ENABLE);
        assert_eq!(replayed.flags(), FLAG_VERSION);
        assert_eq!(replayed.body, ring1_on);
        // Later enables are forwarded as they are.
        (&qemu)
            .write_all(&msg(SET_VRING_ENABLE, FLAG_VERSION, &[0; 8]))
            .unwrap();
        let later = read_msg(&backend).unwrap().unwrap();
        assert_eq!(
            (later.request(), later.body),
            (SET_VRING_ENABLE, vec![0; 8])
        );
        // Replies flow back.
        (&backend)
            .write_all(&msg(1, FLAG_VERSION | FLAG_REPLY, &[9; 8]))
            .unwrap();
        assert_eq!(read_msg(&qemu).unwrap().unwrap().body, vec![9; 8]);
        drop(qemu);
        t.join().unwrap().unwrap();
        assert!(read_msg(&backend).unwrap().is_none());
    }

    /// A memory table of one region larger than its file.
    fn short_table(file: &std::fs::File) -> Vec<u8> {
        file.set_len(4096).unwrap();
        let mut body = 1u32.to_le_bytes().to_vec();
        body.extend_from_slice(&[0; 4]);
        for v in [0u64, 16 << 20, 0x7f00_0000_0000, 0] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        body
    }

    #[test]
    fn a_memory_table_that_does_not_fit_is_refused_and_never_reaches_the_backend() {
        for need_reply in [true, false] {
            let (qemu, front) = UnixStream::pair().unwrap();
            let (back, backend) = UnixStream::pair().unwrap();
            let t = std::thread::spawn(move || relay(front, back));
            let f = tempfile::tempfile().unwrap();
            let flags = FLAG_VERSION | if need_reply { FLAG_NEED_REPLY } else { 0 };
            let table = msg(mem_table::SET_MEM_TABLE, flags, &short_table(&f));
            qemu.send_with_fds(&[&table[..]], &[f.as_raw_fd()]).unwrap();
            match t.join().unwrap() {
                Err(RelayError::Table(TableError::TooSmall { file_size, .. })) => {
                    assert_eq!(file_size, 4096)
                }
                r => panic!("relay ended with {r:?}"),
            }
            assert!(
                read_msg(&backend).unwrap().is_none(),
                "the backend never sees the table"
            );
            if need_reply {
                let reply = read_msg(&qemu).unwrap().unwrap();
                assert_eq!(reply.request(), mem_table::SET_MEM_TABLE);
                assert_eq!(reply.flags(), FLAG_VERSION | FLAG_REPLY);
                assert_eq!(reply.body, 1u64.to_le_bytes(), "a failure");
            }
            assert!(
                read_msg(&qemu).unwrap().is_none(),
                "the connection is closed"
            );
        }
    }
}
