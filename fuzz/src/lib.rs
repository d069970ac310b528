//! Shared by the fuzz targets.

/// The stack of the production threads that read the same inputs: workers and the Kubernetes
/// source run on Rust's default 2 MiB thread stack. libFuzzer runs inputs on the main thread,
/// whose stack is the `RLIMIT_STACK` the process started with (8 MiB by default), which would
/// hide an overflow production hits; `scripts/fuzz` starts every target under `ulimit -s 2048`.
pub const PRODUCTION_STACK: u64 = 2 << 20;

/// Panics (a finding libFuzzer reports at once) unless the main thread's stack is no larger than
/// the production threads'. Cheap: the limit is read once.
pub fn production_stack() {
    static CHECKED: std::sync::Once = std::sync::Once::new();
    CHECKED.call_once(|| {
        let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_STACK)
            .expect("getrlimit(RLIMIT_STACK)");
        assert!(
            soft <= PRODUCTION_STACK,
            "the stack limit is {soft} bytes, larger than the production threads' {PRODUCTION_STACK}: \
             run the targets through scripts/fuzz (it sets `ulimit -s 2048`)"
        );
    });
}

/// A little reader over the fuzzer's bytes: numbers out, zeros once they run out.
pub struct Bytes<'a>(pub &'a [u8]);

impl Bytes<'_> {
    pub fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
