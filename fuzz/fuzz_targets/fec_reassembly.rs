//! A group stream's reassembly (`video-conf/src/fec/reassembly.rs`): segments of the stream
//! in any order, overlapping and duplicated, the honest sender's repair symbols (any subset,
//! any order), and a hostile peer's own repair datagrams and wrong bytes. Holds: no panic; the
//! bytes handed on are contiguous (as many as `delivered()` says); without hostile input they
//! are the stream's own bytes, never a wrong one, and once every segment has arrived the
//! whole stream has been handed on.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tiandi_video::fec::{BLOCK_MAX_BYTES, Params, Reassembly, Repair, protect};

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let (Some(len), Some(t64)) = (inp.u16(), inp.u8()) else {
        return;
    };
    let len = usize::from(len) + 1;
    let p = Params {
        t: (usize::from(t64) % 22 + 1) * 64,
        pct: 25,
    };
    let stream: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    let mut repairs = Vec::new();
    for s in (0..len).step_by(BLOCK_MAX_BYTES) {
        let e = (s + BLOCK_MAX_BYTES).min(len);
        repairs.extend(protect(5, s as u64, &stream[s..e], p, e == len));
    }
    let mut asm = Reassembly::default();
    let mut out: Vec<u8> = Vec::new();
    let mut hostile = false;
    let mut ops = 0;
    while let Some(op) = inp.u8() {
        ops += 1;
        if ops > 256 {
            break;
        }
        match op % 4 {
            0 => {
                let (Some(off), Some(n)) = (inp.u16(), inp.u16()) else {
                    break;
                };
                let s = usize::from(off) % len;
                let e = (s + usize::from(n) % 4096 + 1).min(len);
                asm.data(s as u64, Bytes::copy_from_slice(&stream[s..e]));
                asm.retry();
            }
            1 => {
                let Some(i) = inp.u16() else { break };
                if !repairs.is_empty() {
                    asm.repair(repairs[usize::from(i) % repairs.len()].clone());
                }
            }
            2 => {
                let Some(n) = inp.u16() else { break };
                let d = Bytes::copy_from_slice(inp.bytes(usize::from(n)));
                if let Ok(r) = Repair::decode(&d) {
                    hostile = true;
                    asm.repair(r);
                }
            }
            _ => {
                let (Some(off), Some(n), Some(fill)) = (inp.u16(), inp.u16(), inp.u8()) else {
                    break;
                };
                hostile = true;
                let n = usize::from(n) % 4096 + 1;
                asm.data(u64::from(off), Bytes::from(vec![fill; n]));
                asm.retry();
            }
        }
        for b in asm.ready() {
            out.extend_from_slice(&b);
        }
        assert_eq!(out.len() as u64, asm.delivered());
        if !hostile {
            assert!(
                out.len() <= len && out[..] == stream[..out.len()],
                "a wrong byte"
            );
        }
    }
    // QUIC's retransmissions: every segment arrives in the end.
    for (i, c) in stream.chunks(1200).enumerate() {
        asm.data((i * 1200) as u64, Bytes::copy_from_slice(c));
        asm.retry();
        for b in asm.ready() {
            out.extend_from_slice(&b);
        }
    }
    assert_eq!(out.len() as u64, asm.delivered());
    if !hostile {
        assert!(out == stream, "the whole stream, once, in order");
    }
});
