//! Capture files: reading pcap and pcapng for `zsend -f`, writing pcap for
//! `zdump`. The formats are the `pcap-file` crate's; this module adds what
//! the tools need on top: one reader for both formats, the link-type rule
//! (zc queues carry Ethernet frames), pcapng timestamp units, and errors a
//! user can act on.

use pcap_file::pcap::{PcapHeader, PcapPacket, PcapReader, PcapWriter};
use pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionOption;
use pcap_file::pcapng::{Block, PcapNgReader};
use pcap_file::{DataLink, Endianness, PcapError, TsResolution};
use std::cell::RefCell;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CaptureError {
    #[error("{}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("{}: not a pcap or pcapng file (its first bytes are no capture magic number)", path.display())]
    NotCapture { path: PathBuf },
    #[error("{}: link type {linktype} is not Ethernet: zc queues carry Ethernet frames (convert it first, e.g. with tcprewrite --dlt=enet)", path.display())]
    LinkType { path: PathBuf, linktype: String },
    #[error("{}: corrupt or truncated after packet {packets}: {detail}", path.display())]
    Corrupt {
        path: PathBuf,
        packets: u64,
        detail: String,
    },
}

/// One packet of a capture: when it was captured and its bytes (what the
/// file holds of it: a capture made with a snap length may hold less than
/// was on the wire).
pub struct Frame<'a> {
    pub timestamp: Duration,
    pub data: &'a [u8],
}

enum Format {
    Pcap(PcapReader<BufReader<File>>),
    PcapNg {
        reader: PcapNgReader<BufReader<File>>,
        /// Link type and timestamp units per second of each interface of
        /// the current section, as its description blocks said.
        interfaces: Vec<(DataLink, u64)>,
    },
}

/// Reads the packets of a pcap or pcapng file in order.
pub struct CaptureReader {
    path: PathBuf,
    format: Format,
    packets: u64,
    buf: Vec<u8>,
}

/// pcap magic numbers (both byte orders, micro- and nanosecond) and the
/// pcapng section header block type.
const PCAP_MAGICS: [[u8; 4]; 4] = [
    [0xa1, 0xb2, 0xc3, 0xd4],
    [0xd4, 0xc3, 0xb2, 0xa1],
    [0xa1, 0xb2, 0x3c, 0x4d],
    [0x4d, 0x3c, 0xb2, 0xa1],
];
const PCAPNG_MAGIC: [u8; 4] = [0x0a, 0x0d, 0x0d, 0x0a];

fn link_name(l: DataLink) -> String {
    format!("{} ({l:?})", u32::from(l))
}

/// Units per second an interface's `if_tsresol` option names (default:
/// microseconds). Bit 7 set: a power of two, else a power of ten.
fn ts_units(options: &[InterfaceDescriptionOption]) -> u64 {
    for o in options {
        if let InterfaceDescriptionOption::IfTsResol(r) = o {
            let exp = u32::from(r & 0x7f);
            return if r & 0x80 != 0 {
                1u64.checked_shl(exp).unwrap_or(0)
            } else {
                10u64.checked_pow(exp).unwrap_or(0)
            };
        }
    }
    1_000_000
}

impl CaptureReader {
    pub fn open(path: &Path) -> Result<CaptureReader, CaptureError> {
        let open_err = |source| CaptureError::Open {
            path: path.into(),
            source,
        };
        let mut file = File::open(path).map_err(open_err)?;
        let mut magic = [0u8; 4];
        let not_capture = || CaptureError::NotCapture { path: path.into() };
        match file.read_exact(&mut magic) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(not_capture()),
            Err(e) => return Err(open_err(e)),
        }
        let file = File::open(path).map_err(open_err)?;
        let corrupt = |e: PcapError| CaptureError::Corrupt {
            path: path.into(),
            packets: 0,
            detail: describe(e),
        };
        let format = if PCAP_MAGICS.contains(&magic) {
            let reader = PcapReader::new(BufReader::new(file)).map_err(corrupt)?;
            let linktype = reader.header().datalink;
            if linktype != DataLink::ETHERNET {
                return Err(CaptureError::LinkType {
                    path: path.into(),
                    linktype: link_name(linktype),
                });
            }
            Format::Pcap(reader)
        } else if magic == PCAPNG_MAGIC {
            let reader = PcapNgReader::new(BufReader::new(file)).map_err(corrupt)?;
            Format::PcapNg {
                reader,
                interfaces: Vec::new(),
            }
        } else {
            return Err(not_capture());
        };
        Ok(CaptureReader {
            path: path.into(),
            format,
            packets: 0,
            buf: Vec::new(),
        })
    }

    /// Packets read so far.
    pub fn packets(&self) -> u64 {
        self.packets
    }

    /// The next packet, `None` at the end of the file.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, CaptureError> {
        let packets = self.packets;
        let path = &self.path;
        let corrupt = |detail| CaptureError::Corrupt {
            path: path.clone(),
            packets,
            detail,
        };
        match &mut self.format {
            Format::Pcap(r) => {
                let nano = r.header().ts_resolution == TsResolution::NanoSecond;
                // Raw packets: the crate's checked ones refuse a packet
                // longer than the snap length on the wire, which is every
                // packet of a `tcpdump -s` capture.
                match r.next_raw_packet() {
                    None => Ok(None),
                    Some(Err(e)) => Err(corrupt(describe(e))),
                    Some(Ok(p)) => {
                        let frac_ns = if nano {
                            Some(p.ts_frac).filter(|&f| f < 1_000_000_000)
                        } else {
                            Some(p.ts_frac).filter(|&f| f < 1_000_000).map(|f| f * 1000)
                        };
                        let Some(frac_ns) = frac_ns else {
                            return Err(corrupt(format!(
                                "packet {} has a timestamp fraction of {} (too large)",
                                packets + 1,
                                p.ts_frac
                            )));
                        };
                        let std::borrow::Cow::Borrowed(data) = p.data else {
                            return Err(corrupt("packet data not borrowed".into()));
                        };
                        self.packets += 1;
                        Ok(Some(Frame {
                            timestamp: Duration::new(u64::from(p.ts_sec), frac_ns),
                            data,
                        }))
                    }
                }
            }
            Format::PcapNg { reader, interfaces } => loop {
                let block = match reader.next_block() {
                    None => return Ok(None),
                    Some(Err(e)) => return Err(corrupt(describe(e))),
                    Some(Ok(b)) => b,
                };
                let (iface, ts, data) = match block {
                    Block::SectionHeader(_) => {
                        interfaces.clear();
                        continue;
                    }
                    Block::InterfaceDescription(idb) => {
                        interfaces.push((idb.linktype, ts_units(&idb.options)));
                        continue;
                    }
                    Block::EnhancedPacket(epb) => {
                        // The crate stores the raw 64-bit timestamp as
                        // nanoseconds whatever the interface's units.
                        let raw = epb.timestamp.as_nanos() as u64;
                        (epb.interface_id as usize, Some(raw), epb.data)
                    }
                    Block::SimplePacket(spb) => (0, None, spb.data),
                    Block::Packet(pb) => {
                        let raw = pb.timestamp;
                        (usize::from(pb.interface_id), Some(raw), pb.data)
                    }
                    _ => continue,
                };
                let Some(&(linktype, units)) = interfaces.get(iface) else {
                    return Err(corrupt(format!(
                        "a packet names interface {iface}, which no interface description block before it describes"
                    )));
                };
                if linktype != DataLink::ETHERNET {
                    return Err(CaptureError::LinkType {
                        path: path.clone(),
                        linktype: link_name(linktype),
                    });
                }
                let timestamp = match (ts, units) {
                    (Some(raw), u) if u > 0 => {
                        let ns = u128::from(raw) * 1_000_000_000 / u128::from(u);
                        Duration::from_nanos(ns.min(u128::from(u64::MAX)) as u64)
                    }
                    _ => Duration::ZERO,
                };
                // Copied out: a borrow of the reader cannot leave this loop.
                self.buf.clear();
                self.buf.extend_from_slice(&data);
                self.packets += 1;
                return Ok(Some(Frame {
                    timestamp,
                    data: &self.buf,
                }));
            },
        }
    }
}

fn describe(e: PcapError) -> String {
    match e {
        PcapError::IncompleteBuffer => "the file ends inside a block".into(),
        PcapError::IoError(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            "the file ends inside a block".into()
        }
        PcapError::IoError(e) => e.to_string(),
        PcapError::InvalidField(f) => format!("invalid field ({f})"),
        other => other.to_string(),
    }
}

/// Writes packets as pcap with nanosecond timestamps (what tcpdump writes
/// with `--time-stamp-precision=nano`; tcpdump, tshark and Wireshark read it),
/// buffered, with a flush the caller controls (a stream to a pipe is flushed
/// whenever the queue runs dry).
pub struct CaptureWriter<W: Write> {
    writer: PcapWriter<Shared<W>>,
    out: Rc<RefCell<BufWriter<W>>>,
    snaplen: u32,
}

/// The writer `PcapWriter` owns, sharing the buffer with [`CaptureWriter`]
/// (pcap-file's writer lends its inner writer only by value).
struct Shared<W: Write>(Rc<RefCell<BufWriter<W>>>);

impl<W: Write> Write for Shared<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.borrow_mut().write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.borrow_mut().write_all(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.borrow_mut().flush()
    }
}

impl<W: Write> CaptureWriter<W> {
    pub fn new(out: W, snaplen: u32) -> io::Result<Self> {
        let header = PcapHeader {
            snaplen,
            datalink: DataLink::ETHERNET,
            ts_resolution: TsResolution::NanoSecond,
            endianness: Endianness::native(),
            ..PcapHeader::default()
        };
        let out = Rc::new(RefCell::new(BufWriter::with_capacity(1 << 16, out)));
        let writer = PcapWriter::with_header(Shared(out.clone()), header).map_err(into_io)?;
        Ok(CaptureWriter {
            writer,
            out,
            snaplen,
        })
    }

    /// Writes one packet captured at `timestamp` (since the epoch); at most
    /// the snap length of its bytes are kept, its original length is noted.
    pub fn write(&mut self, timestamp: Duration, data: &[u8]) -> io::Result<()> {
        let kept = data.len().min(self.snaplen as usize);
        let orig_len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let packet = PcapPacket::new(timestamp, orig_len, &data[..kept]);
        self.writer
            .write_packet(&packet)
            .map(|_| ())
            .map_err(into_io)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.borrow_mut().flush()
    }
}

fn into_io(e: PcapError) -> io::Error {
    match e {
        PcapError::IoError(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcapng_timestamp_units_follow_if_tsresol() {
        use InterfaceDescriptionOption::IfTsResol;
        assert_eq!(ts_units(&[]), 1_000_000);
        assert_eq!(ts_units(&[IfTsResol(9)]), 1_000_000_000);
        assert_eq!(ts_units(&[IfTsResol(0x80 | 10)]), 1024);
        // Nonsense exponents give no timing rather than an overflow.
        assert_eq!(ts_units(&[IfTsResol(0x7f)]), 0);
        assert_eq!(ts_units(&[IfTsResol(0xff)]), 0);
    }

    #[test]
    fn the_writer_keeps_snaplen_bytes_and_notes_the_full_length() {
        let mut out = Vec::new();
        {
            let mut w = CaptureWriter::new(&mut out, 4).unwrap();
            w.write(Duration::new(7, 123_456_789), &[1, 2, 3, 4, 5, 6])
                .unwrap();
            w.flush().unwrap();
        }
        let mut r = PcapReader::new(&out[..]).unwrap();
        assert_eq!(r.header().ts_resolution, TsResolution::NanoSecond);
        assert_eq!(r.header().snaplen, 4);
        let p = r.next_raw_packet().unwrap().unwrap();
        assert_eq!((p.ts_sec, p.ts_frac), (7, 123_456_789));
        assert_eq!((p.incl_len, p.orig_len), (4, 6));
        assert_eq!(&p.data[..], &[1, 2, 3, 4]);
        assert!(r.next_raw_packet().is_none());
    }
}
