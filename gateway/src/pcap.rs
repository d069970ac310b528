//! Classic pcap files (<https://www.tcpdump.org/manpages/pcap-savefile.5.html>), as written by
//! `tcpdump -w`: either byte order, microsecond or nanosecond timestamps, Ethernet link type.
//! Reading is strict: a truncated or inconsistent file is an error naming the file and the byte
//! offset, never a panic, and never a partial result passed off as complete.

use std::path::{Path, PathBuf};

/// One captured frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// Capture time, nanoseconds since the Unix epoch.
    pub ts_ns: u64,
    /// The captured bytes (possibly fewer than were on the wire).
    pub data: Vec<u8>,
    /// The frame's length on the wire.
    pub wire_len: u32,
}

/// Why a pcap file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum PcapError {
    #[error("{}: cannot read", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: offset {offset}: {what}", file.display())]
    Format {
        file: PathBuf,
        offset: usize,
        what: String,
    },
}

const LINKTYPE_ETHERNET: u32 = 1;
/// Larger than any frame the gateway handles (jumbo frames are 9 KiB).
const MAX_SNAPLEN: u32 = 256 * 1024;

/// Reads every frame of the pcap file at `path`.
pub fn read(path: &Path) -> Result<Vec<Packet>, PcapError> {
    let bytes = std::fs::read(path).map_err(|source| PcapError::Read {
        file: path.to_path_buf(),
        source,
    })?;
    parse(&bytes).map_err(|(offset, what)| PcapError::Format {
        file: path.to_path_buf(),
        offset,
        what,
    })
}

/// Parses a pcap file's bytes; an error is (offset, what is wrong).
pub fn parse(b: &[u8]) -> Result<Vec<Packet>, (usize, String)> {
    if b.len() < 24 {
        return Err((
            0,
            format!(
                "not a pcap file: {} bytes, shorter than the 24-byte header",
                b.len()
            ),
        ));
    }
    let magic = [b[0], b[1], b[2], b[3]];
    let (le, nanos) = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] => (true, false),
        [0xa1, 0xb2, 0xc3, 0xd4] => (false, false),
        [0x4d, 0x3c, 0xb2, 0xa1] => (true, true),
        [0xa1, 0xb2, 0x3c, 0x4d] => (false, true),
        [0x0a, 0x0d, 0x0d, 0x0a] => return Err((
            0,
            "this is pcapng; convert it with `editcap -F pcap IN OUT` or capture with `tcpdump -w`"
                .into(),
        )),
        m => return Err((0, format!("not a pcap file (magic {m:02x?})"))),
    };
    let u32_at = |at: usize| -> u32 {
        let w = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        if le {
            u32::from_le_bytes(w)
        } else {
            u32::from_be_bytes(w)
        }
    };
    let linktype = u32_at(20) & 0x0fff_ffff;
    if linktype != LINKTYPE_ETHERNET {
        return Err((
            20,
            format!("link type {linktype} is not Ethernet (1): capture on the interface itself, not `any`"),
        ));
    }
    let mut out = Vec::new();
    let mut at = 24;
    while at < b.len() {
        if b.len() - at < 16 {
            return Err((
                at,
                format!("truncated record header ({} of 16 bytes)", b.len() - at),
            ));
        }
        let (sec, frac, incl, orig) = (u32_at(at), u32_at(at + 4), u32_at(at + 8), u32_at(at + 12));
        if incl > MAX_SNAPLEN {
            return Err((
                at + 8,
                format!("record length {incl} is implausible (over {MAX_SNAPLEN})"),
            ));
        }
        if (nanos && frac >= 1_000_000_000) || (!nanos && frac >= 1_000_000) {
            return Err((at + 4, format!("timestamp fraction {frac} is out of range")));
        }
        let data_at = at + 16;
        let end = data_at + incl as usize;
        if end > b.len() {
            return Err((
                data_at,
                format!(
                    "truncated record: {incl} bytes announced, {} present",
                    b.len() - data_at
                ),
            ));
        }
        out.push(Packet {
            ts_ns: sec as u64 * 1_000_000_000
                + if nanos {
                    frac as u64
                } else {
                    frac as u64 * 1000
                },
            data: b[data_at..end].to_vec(),
            wire_len: orig,
        });
        at = end;
    }
    Ok(out)
}

/// Writes frames as a classic pcap file (microseconds, little-endian, Ethernet): what tests and
/// users feed back to `replay`.
pub fn write(path: &Path, packets: &[Packet]) -> std::io::Result<()> {
    let mut w = Writer::create(path)?;
    for p in packets {
        w.write(p)?;
    }
    Ok(())
}

/// A pcap file written frame by frame, each one flushed: the file is whole after every frame
/// (`portcullis monitor --pcap`, which may be stopped at any moment).
pub struct Writer {
    file: std::fs::File,
}

impl Writer {
    pub fn create(path: &Path) -> std::io::Result<Writer> {
        use std::io::Write;
        let mut file = std::fs::File::create(path)?;
        let mut b = Vec::with_capacity(24);
        b.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        b.extend_from_slice(&2u16.to_le_bytes());
        b.extend_from_slice(&4u16.to_le_bytes());
        b.extend_from_slice(&[0; 8]);
        b.extend_from_slice(&65535u32.to_le_bytes());
        b.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        file.write_all(&b)?;
        Ok(Writer { file })
    }

    pub fn write(&mut self, p: &Packet) -> std::io::Result<()> {
        use std::io::Write;
        let mut b = Vec::with_capacity(16 + p.data.len());
        b.extend_from_slice(&((p.ts_ns / 1_000_000_000) as u32).to_le_bytes());
        b.extend_from_slice(&((p.ts_ns % 1_000_000_000 / 1000) as u32).to_le_bytes());
        b.extend_from_slice(&(p.data.len() as u32).to_le_bytes());
        b.extend_from_slice(&p.wire_len.max(p.data.len() as u32).to_le_bytes());
        b.extend_from_slice(&p.data);
        self.file.write_all(&b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_names_the_offset_of_damage() {
        let dir = std::env::temp_dir().join(format!("pc-pcap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("a.pcap");
        let pkts = vec![
            Packet {
                ts_ns: 1_000_002_000,
                data: vec![1, 2, 3],
                wire_len: 60,
            },
            Packet {
                ts_ns: 2_000_000_000,
                data: vec![4; 70],
                wire_len: 70,
            },
        ];
        write(&f, &pkts).unwrap();
        assert_eq!(read(&f).unwrap(), pkts);
        let bytes = std::fs::read(&f).unwrap();
        let e = parse(&bytes[..bytes.len() - 5]).unwrap_err();
        assert_eq!(e.0, 24 + 16 + 3 + 16, "{e:?}");
        assert!(e.1.contains("truncated record"), "{e:?}");
        assert_eq!(parse(&bytes[..30]).unwrap_err().0, 24);
        assert!(parse(b"hello").unwrap_err().1.contains("not a pcap"));
        let mut ng = bytes.clone();
        ng[..4].copy_from_slice(&[0x0a, 0x0d, 0x0d, 0x0a]);
        assert!(parse(&ng).unwrap_err().1.contains("pcapng"));
        let err = read(&dir.join("missing.pcap")).unwrap_err();
        assert!(err.to_string().contains("missing.pcap: cannot read"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut base = Vec::new();
        base.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        base.extend_from_slice(&[
            2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255, 0, 0, 1, 0, 0, 0,
        ]);
        for _ in 0..20_000 {
            let mut b = base.clone();
            let n = (next() % 200) as usize;
            b.extend((0..n).map(|_| next() as u8));
            let _ = parse(&b);
        }
    }
}
