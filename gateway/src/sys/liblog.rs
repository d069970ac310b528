//! libbpf's and libxdp's own messages, through `tracing` instead of raw lines on stderr: they
//! then follow `--log-format json` and `RUST_LOG` like every other line. Their levels map to
//! tracing's (WARN to warn, INFO to info, DEBUG to debug) under the targets `libbpf` and
//! `libxdp`. Most of their warnings are capability probes that fail by design (libxdp tries to
//! load a test program to learn what the kernel supports), so the default filter leaves them out
//! (`libbpf=off,libxdp=off` unless RUST_LOG says otherwise); a call that really fails returns an
//! error the gateway reports itself.

use std::ffi::{c_char, c_int, c_uint, CStr};

use libxdp_sys::__va_list_tag;

type PrintFn = Option<unsafe extern "C" fn(c_uint, *const c_char, *mut __va_list_tag) -> c_int>;

unsafe extern "C" {
    /// libbpf's (not in libxdp-sys' bindings; libbpf is linked in with libxdp).
    fn libbpf_set_print(f: PrintFn) -> PrintFn;
    fn vsnprintf(s: *mut c_char, n: usize, fmt: *const c_char, ap: *mut __va_list_tag) -> c_int;
}

/// Formats a printf-style message from its va_list.
///
/// # Safety
/// `fmt` and `ap` are what libbpf or libxdp passed to their print callback.
unsafe fn format(fmt: *const c_char, ap: *mut __va_list_tag) -> String {
    let mut buf = [0 as c_char; 1024];
    // SAFETY: the buffer is writable for its whole length, which is what we pass; `fmt` and `ap`
    // are the library's own format and arguments, valid for the duration of the callback, and
    // consumed exactly once here.
    let n = unsafe { vsnprintf(buf.as_mut_ptr(), buf.len(), fmt, ap) };
    if n < 0 {
        return String::new();
    }
    // SAFETY: vsnprintf NUL-terminates within the buffer (it truncates to len - 1 characters).
    let s = unsafe { CStr::from_ptr(buf.as_ptr()) };
    s.to_string_lossy().trim_end().to_string()
}

fn emit(target: &'static str, level: c_uint, msg: &str) {
    if msg.is_empty() {
        return;
    }
    // Both libraries number their levels WARN = 0, INFO = 1, DEBUG = 2.
    match (target, level) {
        ("libbpf", 0) => tracing::warn!(target: "libbpf", "{msg}"),
        ("libbpf", 1) => tracing::info!(target: "libbpf", "{msg}"),
        ("libbpf", _) => tracing::debug!(target: "libbpf", "{msg}"),
        (_, 0) => tracing::warn!(target: "libxdp", "{msg}"),
        (_, 1) => tracing::info!(target: "libxdp", "{msg}"),
        _ => tracing::debug!(target: "libxdp", "{msg}"),
    }
}

unsafe extern "C" fn libbpf_print(
    level: c_uint,
    fmt: *const c_char,
    ap: *mut __va_list_tag,
) -> c_int {
    // SAFETY: called by libbpf with its format and arguments.
    let msg = unsafe { format(fmt, ap) };
    emit("libbpf", level, &msg);
    0
}

unsafe extern "C" fn libxdp_print(
    level: c_uint,
    fmt: *const c_char,
    ap: *mut __va_list_tag,
) -> c_int {
    // SAFETY: called by libxdp with its format and arguments.
    let msg = unsafe { format(fmt, ap) };
    emit("libxdp", level, &msg);
    0
}

/// Routes both libraries' messages through `tracing`. Call once, before the first socket.
pub fn route_library_logs() {
    // SAFETY: both setters only store the function pointer; the callbacks are `extern "C"`,
    // never unwind (tracing's macros do not panic on a message) and live for the whole program.
    unsafe {
        libbpf_set_print(Some(libbpf_print));
        libxdp_sys::libxdp_set_print(Some(libxdp_print));
    }
}
