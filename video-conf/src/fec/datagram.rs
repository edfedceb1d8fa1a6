//! The repair datagram: one Reed–Solomon symbol of one block of one stream, or a stream's
//! final size alone.

use bytes::{BufMut, Bytes, BytesMut};

use super::{FLAG_LAST, HEADER_LEN, MAGIC, VERSION};
use crate::conference_wire::WireError;

/// One repair symbol of one block of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    pub stream: u64,
    pub start: u64,
    pub len: u32,
    pub t: u16,
    pub k: u16,
    pub m: u16,
    pub index: u16,
    /// The block ends the stream.
    pub last: bool,
    pub data: Bytes,
}

impl Repair {
    /// Not a repair: the stream's final size (its last block was sent without the flag).
    pub fn end(stream: u64, size: u64) -> Repair {
        Repair {
            stream,
            start: size,
            len: 0,
            t: 0,
            k: 0,
            m: 0,
            index: 0,
            last: true,
            data: Bytes::new(),
        }
    }

    /// The stream's final size, if this says so.
    pub fn final_size(&self) -> Option<u64> {
        self.last.then_some(self.start + u64::from(self.len))
    }

    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(HEADER_LEN + self.data.len());
        b.put_u8(MAGIC);
        b.put_u8(VERSION);
        b.put_u8(if self.last { FLAG_LAST } else { 0 });
        b.put_u64(self.stream);
        b.put_u32(self.start as u32);
        b.put_u32(self.len);
        b.put_u16(self.t);
        b.put_u16(self.k);
        b.put_u16(self.m);
        b.put_u16(self.index);
        b.put_slice(&self.data);
        b.freeze()
    }

    pub fn decode(d: &Bytes) -> Result<Repair, WireError> {
        let bad = |detail: String| WireError::Malformed {
            what: "repair datagram",
            detail,
        };
        if d.len() < HEADER_LEN {
            return Err(bad(format!("{} bytes, shorter than its header", d.len())));
        }
        if d[0] != MAGIC {
            return Err(bad(format!("magic {:#04x}, not {MAGIC:#04x}", d[0])));
        }
        if d[1] != VERSION {
            return Err(WireError::Version(u32::from(d[1])));
        }
        let u16_at = |i: usize| u16::from_be_bytes([d[i], d[i + 1]]);
        let u32_at = |i: usize| u32::from_be_bytes(d[i..i + 4].try_into().expect("4 bytes"));
        let r = Repair {
            stream: u64::from_be_bytes(d[3..11].try_into().expect("8 bytes")),
            start: u64::from(u32_at(11)),
            len: u32_at(15),
            t: u16_at(19),
            k: u16_at(21),
            m: u16_at(23),
            index: u16_at(25),
            last: d[2] & FLAG_LAST != 0,
            data: d.slice(HEADER_LEN..),
        };
        let (t, k, len) = (usize::from(r.t), usize::from(r.k), r.len as usize);
        if r.last && k == 0 && t == 0 && len == 0 && r.m == 0 && r.data.is_empty() {
            return Ok(r); // a final size alone
        }
        if t == 0 || t % 2 != 0 || r.data.len() != t {
            return Err(bad(format!(
                "symbol size {t} with {} bytes of symbol",
                r.data.len()
            )));
        }
        if k == 0 || len == 0 || len > k * t || len <= (k - 1) * t {
            return Err(bad(format!("{len} bytes in {k} symbols of {t}")));
        }
        if r.m == 0 || r.index >= r.m {
            return Err(bad(format!("repair symbol {} of {}", r.index, r.m)));
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fec::{Params, protect, stream_bytes};

    #[test]
    fn repair_datagrams_round_trip_and_bad_ones_are_named() {
        let p = Params::for_datagram(1200).unwrap();
        assert_eq!(p.t, 1152);
        let data = stream_bytes(5000);
        let rs = protect(4, 100, &data, p, false);
        assert_eq!(rs.len(), 3, "k=5: three repair symbols at least");
        let d = rs[1].encode();
        assert_eq!(Repair::decode(&d).unwrap(), rs[1]);
        let mut bad = d.to_vec();
        bad[0] = 0x47; // MPEG-TS sync byte
        assert!(
            Repair::decode(&Bytes::from(bad))
                .unwrap_err()
                .to_string()
                .contains("magic")
        );
        let mut v2 = d.to_vec();
        v2[1] = 2;
        assert_eq!(
            Repair::decode(&Bytes::from(v2)).unwrap_err(),
            WireError::Version(2)
        );
        assert!(Repair::decode(&d.slice(..30)).is_err(), "truncated symbol");
        let mut k = d.to_vec();
        k[22] = 9; // nine symbols for 5,000 bytes of 1,152
        assert!(Repair::decode(&Bytes::from(k)).is_err());
    }
}
