//! The frame parser: never panics, and the fixed-offset fast path agrees with etherparse on
//! every frame it accepts (DESIGN §4).
#![no_main]

use gateway::parse::{fast_path, parse_sliced, parse_tracked, Frame};
use libfuzzer_sys::fuzz_target;
use policy::rule::Direction;

fuzz_target!(|data: &[u8]| {
    portcullis_fuzz::production_stack();
    for dir in [Direction::Ingress, Direction::Egress] {
        let full = parse_tracked(data, dir);
        if let Some((key, flags)) = fast_path(data, dir) {
            let (frame, track) =
                parse_sliced(data, dir).expect("the fast path took a frame etherparse refuses");
            assert_eq!(frame, Frame::Ip(key), "fast path and etherparse disagree");
            assert_eq!(track.tcp_flags, flags);
            assert_eq!(full.map(|(f, _)| f), Ok(frame));
        }
    }
});
