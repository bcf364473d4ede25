//! Large allocations (activations of 32 MiB and more) mapped directly and kept for reuse
//! when freed.
//!
//! glibc serves every allocation above its largest mmap threshold (32 MiB) with a fresh
//! `mmap` and unmaps it on free, so each op whose output is that large paid the kernel for
//! zeroed pages: at 1024x1536 the VQGAN's outputs are 150-600 MB each, and page faults and
//! page clearing were ~15% of its time. The sampling loop and the VQGAN's blocks allocate the
//! same sizes over and over, so a freed block is kept and handed to the next allocation of
//! its size. A bounded store (see [`KEEP_BYTES`]): beyond it the oldest blocks are unmapped.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;

/// Allocations of at least this many bytes are blocks (glibc's maximum mmap threshold: the
/// smaller ones stay in its heap, which reuses memory itself).
pub const LARGE: usize = 32 << 20;

/// Block lengths are rounded up to this, so that sizes a few elements apart share blocks.
const GRANULE: usize = 2 << 20;

/// The most freed bytes kept for reuse: this, or twice the largest block freed so far (at
/// 1024x1536 the VQGAN's blocks make outputs of 151 and 604 MB, its last level 1.2 GB ones).
/// The process's peak memory is at most that much above what it would be without the store
/// (measured: +0.37 GiB for the mid model at 1024x1024, +1.1 GiB for the published sizes at
/// 1024x1536; at 256x256 none in f32, +0.15 GiB in bf16).
const KEEP_BYTES: usize = 512 << 20;

/// The most freed blocks kept for reuse.
const KEEP_BLOCKS: usize = 16;

/// A freed block: its address and length (0 for an empty slot), and when it was freed.
#[derive(Clone, Copy)]
struct Free {
    addr: usize,
    len: usize,
    freed: u64,
}

const EMPTY: Free = Free {
    addr: 0,
    len: 0,
    freed: 0,
};

struct Kept {
    blocks: [Free; KEEP_BLOCKS],
    bytes: usize,
    /// The largest block freed so far.
    largest: usize,
    /// Counts frees, to find the oldest block.
    clock: u64,
}

/// A fixed array: the allocator must not allocate.
static KEPT: Mutex<Kept> = Mutex::new(Kept {
    blocks: [EMPTY; KEEP_BLOCKS],
    bytes: 0,
    largest: 0,
    clock: 0,
});

fn kept() -> std::sync::MutexGuard<'static, Kept> {
    KEPT.lock().unwrap_or_else(|e| e.into_inner())
}

/// The allocator for blocks; alignments above a page go to the system allocator.
pub struct Blocks;

fn block_len(size: usize) -> usize {
    size.next_multiple_of(GRANULE)
}

fn served(layout: &Layout) -> bool {
    layout.align() <= 4096
}

/// A kept block of exactly `len` bytes, taken out of the store.
fn take(len: usize) -> Option<*mut u8> {
    let mut kept = kept();
    let slot = kept.blocks.iter_mut().find(|b| b.len == len)?;
    let addr = slot.addr;
    *slot = EMPTY;
    kept.bytes -= len;
    Some(addr as *mut u8)
}

/// Keeps the block for reuse, unmapping the oldest ones while over the limits.
fn keep(addr: usize, len: usize) {
    let mut evicted = Evicted::default();
    {
        let mut kept = kept();
        kept.clock += 1;
        let block = Free {
            addr,
            len,
            freed: kept.clock,
        };
        // an empty slot, else the oldest block's
        let slot = kept
            .blocks
            .iter_mut()
            .min_by_key(|b| (b.len != 0, b.freed))
            .expect("KEEP_BLOCKS > 0");
        let old = std::mem::replace(slot, block);
        kept.bytes = kept.bytes + len - old.len;
        evicted.push(old);
        kept.largest = kept.largest.max(len);
        let cap = KEEP_BYTES.max(kept.largest * 2);
        while kept.bytes > cap {
            evicted.push(kept.evict_oldest());
        }
    }
    evicted.unmap();
}

impl Kept {
    /// Empties the slot of the oldest kept block and returns the block (EMPTY if none).
    fn evict_oldest(&mut self) -> Free {
        let oldest = self.blocks.iter_mut().filter(|b| b.len != 0).min_by_key(|b| b.freed);
        let old = oldest.map_or(EMPTY, |b| std::mem::replace(b, EMPTY));
        self.bytes -= old.len;
        old
    }
}

/// Blocks taken out of the store, unmapped after its lock is released.
#[derive(Default)]
struct Evicted {
    blocks: [Option<Free>; KEEP_BLOCKS + 1],
    n: usize,
}

impl Evicted {
    fn push(&mut self, block: Free) {
        if block.len != 0 {
            self.blocks[self.n] = Some(block);
            self.n += 1;
        }
    }

    fn unmap(self) {
        for b in self.blocks.into_iter().flatten() {
            unmap(b.addr, b.len);
        }
    }
}

/// A new block of `len` bytes: a kept one of that length, else a fresh mapping.
fn block(len: usize) -> (*mut u8, bool) {
    match take(len) {
        Some(ptr) => (ptr, true),
        None => (map(len), false),
    }
}

fn map(len: usize) -> *mut u8 {
    // SAFETY: a private anonymous mapping; no file, no fixed address.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        std::ptr::null_mut()
    } else {
        ptr.cast()
    }
}

fn unmap(addr: usize, len: usize) {
    // SAFETY: `addr..addr + len` was mapped by `map` and nothing refers to it any more.
    unsafe { libc::munmap(addr as *mut libc::c_void, len) };
}

// SAFETY: a block is a page-aligned mapping of `block_len(size)` bytes, owned by one
// allocation from `alloc` until `dealloc`, then by the store until taken or unmapped.
unsafe impl GlobalAlloc for Blocks {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !served(&layout) {
            return System.alloc(layout);
        }
        block(block_len(layout.size())).0
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !served(&layout) {
            return System.alloc_zeroed(layout);
        }
        let (ptr, reused) = block(block_len(layout.size()));
        if reused {
            std::ptr::write_bytes(ptr, 0, layout.size()); // fresh pages are zero already
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !served(&layout) {
            return System.dealloc(ptr, layout);
        }
        keep(ptr as usize, block_len(layout.size()));
    }

    /// Only between two large sizes: [`crate::mapping::MappingAware`] moves an allocation
    /// across allocators itself.
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !served(&layout) {
            return System.realloc(ptr, layout, new_size);
        }
        if block_len(new_size) == block_len(layout.size()) {
            return ptr;
        }
        let new = self.alloc(Layout::from_size_align_unchecked(new_size, layout.align()));
        if !new.is_null() {
            std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
            self.dealloc(ptr, layout);
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A freed block comes back for the next allocation of its length, zeroed where asked.
    #[test]
    fn freed_blocks_are_reused() {
        // an odd length, which no other test's allocations share
        let layout = Layout::from_size_align(LARGE + 7 * GRANULE + 12345, 64).unwrap();
        unsafe {
            let a = Blocks.alloc(layout);
            assert!(!a.is_null());
            a.write_bytes(7, layout.size());
            Blocks.dealloc(a, layout);
            let b = Blocks.alloc_zeroed(layout);
            assert_eq!(b, a, "the freed block is reused");
            assert!(std::slice::from_raw_parts(b, layout.size()).iter().all(|&x| x == 0));
            Blocks.dealloc(b, layout);
        }
    }

    /// Freeing more blocks than the store holds unmaps the oldest: it stays within its limits.
    #[test]
    fn the_store_stays_bounded() {
        let layouts: Vec<Layout> = (0..KEEP_BLOCKS + 4)
            .map(|i| Layout::from_size_align(LARGE + (9 + i) * GRANULE, 64).unwrap())
            .collect();
        unsafe {
            let blocks: Vec<*mut u8> = layouts.iter().map(|&l| Blocks.alloc(l)).collect();
            for (&b, &l) in blocks.iter().zip(&layouts) {
                Blocks.dealloc(b, l);
            }
        }
        let kept = kept();
        let held = kept.blocks.iter().filter(|b| b.len != 0).map(|b| b.len).sum::<usize>();
        assert_eq!(held, kept.bytes);
        assert!(
            kept.bytes <= KEEP_BYTES.max(kept.largest * 2),
            "{} bytes kept",
            kept.bytes
        );
        let newest = block_len(layouts.last().unwrap().size());
        assert!(kept.blocks.iter().any(|b| b.len == newest), "the newest block is kept");
    }
}
