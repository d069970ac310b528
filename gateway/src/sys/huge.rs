//! Large fixed arrays on transparent huge pages: the connection tracker's slots and bucket
//! heads, which every packet reads at a random place. On 4 KiB pages a table of a million flows
//! spans 65,000 pages and nearly every lookup misses the TLB as well as the cache (a page walk,
//! itself often a miss); on 2 MiB pages the whole table fits the second-level TLB. DPDK puts
//! its hash tables on huge pages for the same reason.
//!
//! The array is an anonymous mapping aligned to 2 MiB, marked `MADV_HUGEPAGE` before any page is
//! touched (so it works with the kernel's default `madvise` THP mode), then filled element by
//! element. Where huge pages are unavailable (THP `never`, no contiguous memory) the kernel backs
//! it with small pages: slower, never wrong. Small arrays (under one huge page) use the heap.

use std::ops::Deref;
use std::ptr::NonNull;

const HUGE: usize = 2 << 20;

/// A fixed-length array, on huge pages when it is large enough to use them.
pub struct HugeArray<T> {
    ptr: NonNull<T>,
    len: usize,
    /// The mapping's length in bytes; 0 when the elements are a boxed slice on the heap
    /// (`ptr` came from `Box::into_raw`).
    mapped: usize,
}

// SAFETY: a `HugeArray<T>` owns its elements exactly as a `Box<[T]>` does (nothing else holds
// the pointer), so it may move to, and be shared with, other threads when `T` may.
unsafe impl<T: Send> Send for HugeArray<T> {}
// SAFETY: as above: `&HugeArray<T>` only hands out `&[T]`.
unsafe impl<T: Sync> Sync for HugeArray<T> {}

impl<T> HugeArray<T> {
    /// `len` elements, element `i` being `f(i)`.
    pub fn from_fn(len: usize, mut f: impl FnMut(usize) -> T) -> HugeArray<T> {
        let bytes = len.saturating_mul(std::mem::size_of::<T>());
        if bytes < HUGE || std::mem::align_of::<T>() > HUGE {
            return Self::on_heap((0..len).map(f).collect());
        }
        let Some(base) = map_aligned(bytes) else {
            return Self::on_heap((0..len).map(f).collect());
        };
        let ptr = base.cast::<T>();
        for i in 0..len {
            // SAFETY: `ptr` is 2 MiB aligned (so aligned for `T`, whose alignment is at most
            // that, checked above) and the mapping holds `bytes` = len * size_of::<T>() bytes, so
            // element `i < len` is in bounds; it is uninitialised, and `write` does not drop
            // the old contents.
            unsafe { ptr.as_ptr().add(i).write(f(i)) };
        }
        HugeArray {
            ptr,
            len,
            mapped: bytes.next_multiple_of(HUGE),
        }
    }

    fn on_heap(b: Box<[T]>) -> HugeArray<T> {
        let len = b.len();
        let raw = Box::into_raw(b);
        HugeArray {
            ptr: NonNull::new(raw.cast::<T>()).unwrap_or(NonNull::dangling()),
            len,
            mapped: 0,
        }
    }

    /// Whether the array is a huge-page mapping (else it is on the heap).
    pub fn mapped(&self) -> bool {
        self.mapped != 0
    }
}

/// The kernel's transparent huge page mode (`always`, `madvise` or `never`), when it says.
pub fn thp_mode() -> Option<String> {
    let s = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok()?;
    let start = s.find('[')? + 1;
    let end = start + s[start..].find(']')?;
    Some(s[start..end].to_string())
}

/// An anonymous read-write mapping of at least `bytes` bytes, 2 MiB aligned, advised to use huge
/// pages; `None` if the kernel refused the mapping.
fn map_aligned(bytes: usize) -> Option<NonNull<u8>> {
    let len = bytes.next_multiple_of(HUGE);
    let over = len + HUGE;
    // SAFETY: a fresh anonymous private mapping at an address the kernel picks: it aliases
    // nothing of ours.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            over,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return None;
    }
    let start = raw as usize;
    let aligned = start.next_multiple_of(HUGE);
    let (head, tail) = (aligned - start, over - (aligned - start) - len);
    // SAFETY: `[start, aligned)` and `[aligned + len, start + over)` lie inside the mapping just
    // made, which nothing references yet; unmapping them leaves `[aligned, aligned + len)`.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
        // Advice only: where THP is off this fails, and small pages back the mapping.
        libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
    NonNull::new(aligned as *mut u8)
}

impl<T> Deref for HugeArray<T> {
    type Target = [T];
    #[inline(always)]
    fn deref(&self) -> &[T] {
        // SAFETY: `ptr` points at `len` initialised elements that live as long as `self`: the
        // mapping's (written in `from_fn`, unmapped only in `drop`) or the boxed slice's
        // (`on_heap`, freed only in `drop`). Both are only ever read through shared references.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> Drop for HugeArray<T> {
    fn drop(&mut self) {
        if self.mapped == 0 {
            // SAFETY: `ptr` and `len` are the boxed slice `on_heap` turned into a raw pointer
            // (a zero-length one may be dangling, which `Box` accepts for an empty slice); it is
            // turned back once, here, and nothing refers to it any more.
            drop(unsafe {
                Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                    self.ptr.as_ptr(),
                    self.len,
                ))
            });
            return;
        }
        // SAFETY: the `len` elements were initialised in `from_fn` and are dropped once, here;
        // then the mapping (`mapped` bytes from `ptr`, made by `map_aligned`) is unmapped, and
        // nothing refers to it any more (`self` is being dropped).
        unsafe {
            std::ptr::drop_in_place(std::ptr::slice_from_raw_parts_mut(
                self.ptr.as_ptr(),
                self.len,
            ));
            libc::munmap(self.ptr.as_ptr().cast(), self.mapped);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn small_arrays_live_on_the_heap_and_large_ones_are_mapped() {
        let small = HugeArray::from_fn(10, |i| AtomicU64::new(i as u64));
        assert!(!small.mapped());
        assert_eq!(small[9].load(Ordering::Relaxed), 9);
        let n = (HUGE / 8) * 3 + 5;
        let large = HugeArray::from_fn(n, |i| AtomicU64::new(i as u64));
        assert!(large.mapped());
        assert_eq!(large.len(), n);
        assert_eq!(large.as_ptr() as usize % HUGE, 0);
        assert!(large
            .iter()
            .enumerate()
            .all(|(i, v)| v.load(Ordering::Relaxed) == i as u64));
        large[n - 1].store(7, Ordering::Relaxed);
        assert_eq!(large[n - 1].load(Ordering::Relaxed), 7);
    }

    #[test]
    fn the_thp_mode_is_one_of_the_kernels() {
        if let Some(m) = thp_mode() {
            assert!(["always", "madvise", "never"].contains(&m.as_str()), "{m}");
        }
    }

    #[test]
    fn elements_are_dropped() {
        let counter = std::sync::Arc::new(());
        let n = HUGE / std::mem::size_of::<std::sync::Arc<()>>() + 1;
        let a = HugeArray::from_fn(n, |_| std::sync::Arc::clone(&counter));
        assert!(a.mapped());
        assert_eq!(std::sync::Arc::strong_count(&counter), n + 1);
        drop(a);
        assert_eq!(std::sync::Arc::strong_count(&counter), 1);
    }
}
