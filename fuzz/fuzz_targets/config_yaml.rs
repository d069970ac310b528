//! The gateway config loader on any text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    portcullis_fuzz::production_stack();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ =
        gateway::config::Config::parse(text, std::path::Path::new("/etc/portcullis/gateway.yaml"));
});
