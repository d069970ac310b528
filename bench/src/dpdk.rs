//! DPDK's rte_acl as a peer classifier, through the C shim in `dpdk/acl_shim.c`. This module is
//! the bench crate's only unsafe code: FFI calls into the shim, each with the reason it holds.

use std::ffi::{c_char, c_int, c_void, CString};
use std::ptr::NonNull;
use std::sync::OnceLock;

use policy::key::FlowKey;
use policy::rule::{Match, Prefix};

/// A 5-tuple as rte_acl reads it: packed, network byte order.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Tuple5 {
    proto: u8,
    src: u32,
    dst: u32,
    sport: u16,
    dport: u16,
}

impl Tuple5 {
    pub(crate) fn from_key(k: &FlowKey) -> Tuple5 {
        Tuple5 {
            proto: k.proto,
            src: (k.src as u32).to_be(),
            dst: (k.dst as u32).to_be(),
            sport: k.sport.to_be(),
            dport: k.dport.to_be(),
        }
    }
}

#[repr(C)]
struct PcRule {
    src: u32,
    src_len: u32,
    dst: u32,
    dst_len: u32,
    sport_lo: u16,
    sport_hi: u16,
    dport_lo: u16,
    dport_hi: u16,
    proto: u8,
    proto_mask: u8,
}

extern "C" {
    fn pc_eal_init(argc: c_int, argv: *mut *mut c_char, err: *mut c_char, errlen: usize) -> c_int;
    fn pc_acl_build(
        name: *const c_char,
        rules: *const PcRule,
        n: u32,
        mem: *mut usize,
        err: *mut c_char,
        errlen: usize,
    ) -> *mut c_void;
    fn pc_acl_set_alg(ctx: *mut c_void, alg: c_int) -> c_int;
    fn pc_acl_classify(ctx: *mut c_void, keys: *const Tuple5, results: *mut u32, num: u32)
        -> c_int;
    fn pc_acl_free(ctx: *mut c_void);
}

/// rte_acl's classify methods (`enum rte_acl_classify_alg`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    Default = 0,
    Scalar = 1,
    Sse = 2,
    Avx2 = 3,
    Avx512x16 = 6,
    Avx512x32 = 7,
}

impl Method {
    pub(crate) const ALL: [Method; 6] = [
        Method::Default,
        Method::Scalar,
        Method::Sse,
        Method::Avx2,
        Method::Avx512x16,
        Method::Avx512x32,
    ];

    /// The methods one can select explicitly; `Default` is whichever rte_acl picked at create.
    pub(crate) const EXPLICIT: [Method; 5] = [
        Method::Scalar,
        Method::Sse,
        Method::Avx2,
        Method::Avx512x16,
        Method::Avx512x32,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Method::Default => "default",
            Method::Scalar => "scalar",
            Method::Sse => "sse",
            Method::Avx2 => "avx2",
            Method::Avx512x16 => "avx512x16",
            Method::Avx512x32 => "avx512x32",
        }
    }
}

fn err_string(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Starts DPDK's EAL once for the process, for a VM: no hugepages (`mem_mib` of ordinary
/// memory, the first caller's size), no PCI, one lcore, in memory, SIMD up to 512 bits so the
/// AVX-512 methods can be chosen.
pub(crate) fn eal_init(mem_mib: usize) -> Result<(), String> {
    static INIT: OnceLock<Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| {
        let mem = mem_mib.to_string();
        let args = [
            "portcullis-bench",
            "--no-huge",
            "-m",
            mem.as_str(),
            "--no-pci",
            "--no-shconf",
            "-l",
            "0",
            "--log-level",
            "lib.eal:error",
            "--no-telemetry",
            "--force-max-simd-bitwidth=512",
        ];
        let owned: Vec<CString> = args
            .iter()
            .map(|a| CString::new(*a).unwrap_or_default())
            .collect();
        let mut argv: Vec<*mut c_char> = owned.iter().map(|c| c.as_ptr() as *mut c_char).collect();
        let mut err = [0u8; 256];
        // SAFETY: argv points to NUL-terminated strings that outlive the call (`owned`), and the
        // EAL keeps no pointer into them past the call; `err` is a writable buffer of its length.
        let r = unsafe {
            pc_eal_init(
                argv.len() as c_int,
                argv.as_mut_ptr(),
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        if r < 0 {
            return Err(format!(
                "{} (DPDK's EAL could not start without hugepages; see its message above)",
                err_string(&err)
            ));
        }
        Ok(())
    })
    .clone()
}

/// A built rte_acl context.
pub(crate) struct Acl {
    ctx: NonNull<c_void>,
    /// Heap bytes the context took (rte_malloc statistics around the build).
    pub memory: usize,
}

fn prefix_of(m: &policy::rule::AddrSet) -> Result<(u32, u32), String> {
    match m.include.as_slice() {
        [] => Ok((0, 0)),
        [Prefix {
            v6: false,
            bits,
            len,
        }] if m.except.is_empty() => Ok((*bits as u32, *len as u32)),
        _ => Err("rte_acl takes one IPv4 prefix per field".into()),
    }
}

impl Acl {
    /// Builds a context from IPv4 5-tuple matches; index order is priority order.
    pub(crate) fn build(name: &str, matches: &[Match]) -> Result<Acl, String> {
        let mut rules = Vec::with_capacity(matches.len());
        for m in matches {
            let (src, src_len) = prefix_of(&m.src)?;
            let (dst, dst_len) = prefix_of(&m.dst)?;
            rules.push(PcRule {
                src,
                src_len,
                dst,
                dst_len,
                sport_lo: m.sport.lo,
                sport_hi: m.sport.hi,
                dport_lo: m.dport.lo,
                dport_hi: m.dport.hi,
                proto: m.proto.unwrap_or(0),
                proto_mask: if m.proto.is_some() { 0xff } else { 0 },
            });
        }
        let cname = CString::new(name).map_err(|e| e.to_string())?;
        let mut mem = 0usize;
        let mut err = [0u8; 256];
        // SAFETY: `rules` is a live array of `rules.len()` repr(C) structs matching `struct pc_rule`;
        // the shim copies them into the context and keeps no pointer to them, nor to `cname`.
        let ctx = unsafe {
            pc_acl_build(
                cname.as_ptr(),
                rules.as_ptr(),
                rules.len() as u32,
                &mut mem,
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        NonNull::new(ctx)
            .map(|ctx| Acl { ctx, memory: mem })
            .ok_or_else(|| err_string(&err))
    }

    /// Chooses the classify method; an error when this CPU or DPDK build lacks it.
    pub(crate) fn set_method(&mut self, m: Method) -> Result<(), String> {
        // SAFETY: `self.ctx` is a live context from `pc_acl_build`, used by this thread only.
        let r = unsafe { pc_acl_set_alg(self.ctx.as_ptr(), m as c_int) };
        if r == 0 {
            Ok(())
        } else {
            Err(format!(
                "{} is not supported here ({})",
                m.name(),
                std::io::Error::from_raw_os_error(-r)
            ))
        }
    }

    /// Classifies a burst through rte_acl's batch API; `out[i]` is the first matching rule's index,
    /// or `u32::MAX` for none.
    #[inline]
    pub(crate) fn classify(&self, keys: &[Tuple5], out: &mut [u32]) {
        let n = keys.len().min(out.len());
        // SAFETY: `keys` and `out` are live for `n` elements; the context is live and not shared
        // across threads; rte_acl writes exactly `n` results.
        unsafe { pc_acl_classify(self.ctx.as_ptr(), keys.as_ptr(), out.as_mut_ptr(), n as u32) };
        for o in &mut out[..n] {
            *o = o.wrapping_sub(1); // userdata is index + 1; 0 (no match) becomes u32::MAX
        }
    }
}

impl Drop for Acl {
    fn drop(&mut self) {
        // SAFETY: the context came from `pc_acl_build` and is freed once, here.
        unsafe { pc_acl_free(self.ctx.as_ptr()) };
    }
}
