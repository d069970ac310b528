//! The pcap reader of `portcullis replay`: any bytes give packets or an error with an offset
//! inside the file, and every packet it returns parses without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use policy::rule::Direction;

fuzz_target!(|data: &[u8]| {
    portcullis_fuzz::production_stack();
    match gateway::pcap::parse(data) {
        Ok(packets) => {
            for p in &packets {
                let _ = gateway::parse::parse_tracked(&p.data, Direction::Ingress);
            }
        }
        Err((offset, why)) => {
            assert!(
                offset <= data.len(),
                "offset {offset} past the end ({}): {why}",
                data.len()
            );
            assert!(!why.is_empty());
        }
    }
});
