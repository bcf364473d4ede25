//! Weight files mapped into memory, and CPU tensors that live in those mappings.
//!
//! candle's CPU tensors own a `Vec`, so loading used to copy every tensor out of the
//! safetensors mapping into freshly faulted pages: 8-16x the time of reading the files, and
//! the weights twice in memory while the page cache still held them (where both do not fit,
//! the copy evicts the very pages it reads and falls back to the disk). Here a CPU tensor
//! stored in the dtype it runs in is a `Vec` that points into a read-only mapping of its
//! file. [`MappingAware`], the binary's global allocator, recognises such a vector when it is
//! freed and only counts it; a mapping is unmapped once its [`Mapping`] and every vector in it
//! are gone (the prior's weights go when `--low-memory` drops the prior). Without this
//! allocator (the library in another program, the unit tests) no such vector is made and
//! tensors are copied.
//!
//! Nothing may write to such a tensor: the pages are the file's, mapped read-only (candle's
//! ops write only to the outputs they allocate).

use std::alloc::{GlobalAlloc, Layout, System};
use std::fs::File;
use std::mem::ManuallyDrop;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// mimalloc for small allocations, the system allocator for larger ones and reused blocks for
/// the largest (see `SMALL`), plus vectors that point into registered mappings (see the
/// module docs).
pub struct MappingAware;

/// Every tensor op allocates its output; glibc serves allocations above 128 KiB with fresh
/// `mmap`s, so each op paid for zeroed pages from the kernel (a tenth of the CPU time at
/// mid size). Keeping freed blocks in the heap lets the next op reuse them (the largest,
/// from 32 MiB on, are [`crate::blocks`]'). The binary calls this first thing in `main`.
///
/// One arena: a worker thread's own arena grows in 64 MiB heaps, and glibc unmaps a grown heap
/// as soon as it is empty, whatever the trim threshold. The decoder's activations at
/// 1024x1536 (31.5 MB each) each took such a heap and gave it back: ~70 heaps mapped and
/// unmapped per decode, their pages faulted in afresh. In the main arena freed memory stays
/// until the trim threshold. Only allocations of 64 KiB and more reach glibc (see `SMALL`),
/// so the threads rarely meet at its lock.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; call it before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Set by the first allocation through [`MappingAware`]: it is the global allocator.
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// One registered mapping: its address range and how many owners (its `Mapping` and the
/// vectors in it) are left. `start == 0`: a free slot.
struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    owners: AtomicUsize,
}

/// More mappings than this (weight files held at once) are copied from instead.
const SLOTS: usize = 64;
static SLOTS_IN_USE: AtomicUsize = AtomicUsize::new(0);
/// One past the highest slot ever taken: lookups scan only below it (a handful of files).
static SLOTS_TAKEN: AtomicUsize = AtomicUsize::new(0);
static REGISTRY: [Slot; SLOTS] = [const {
    Slot {
        start: AtomicUsize::new(0),
        len: AtomicUsize::new(0),
        owners: AtomicUsize::new(0),
    }
}; SLOTS];
/// Serialises taking and freeing slots; lookups read the atomics without it.
static REGISTRY_LOCK: Mutex<()> = Mutex::new(());

/// The registered slot whose mapping holds `ptr`.
fn slot_of(ptr: *mut u8) -> Option<usize> {
    if SLOTS_IN_USE.load(Ordering::Acquire) == 0 {
        return None;
    }
    let p = ptr as usize;
    let taken = SLOTS_TAKEN.load(Ordering::Acquire);
    REGISTRY[..taken].iter().position(|s| {
        let start = s.start.load(Ordering::Acquire);
        start != 0 && p >= start && p < start + s.len.load(Ordering::Acquire)
    })
}

/// Whether `ptr` lies in a registered mapping (a tensor's data in place, not a copy).
pub fn is_mapped(ptr: *mut u8) -> bool {
    slot_of(ptr).is_some()
}

/// Drops the pages that `len` bytes at `ptr` span from this process (`MADV_DONTNEED`) where
/// they lie in a registered mapping: for a tensor kept in its mapping but served by a copy in
/// another layout. Safe for any page of a mapping, as [`Mapping::release`]: a read-only file
/// page read again faults back in with the same bytes.
pub fn release_pages(ptr: *const u8, len: usize) {
    if len == 0 || slot_of(ptr as *mut u8).is_none() {
        return;
    }
    #[cfg(unix)]
    // SAFETY: the pages lie in a read-only, file-backed mapping (checked above; mappings
    // start on a page and their last page is whole); see the function's docs.
    unsafe {
        let page = libc::sysconf(libc::_SC_PAGESIZE).max(1) as usize;
        let start = ptr as usize / page * page;
        let end = (ptr as usize + len).div_ceil(page) * page;
        libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
    }
}

/// One owner of slot `i` is gone; the last one unmaps it and frees the slot.
fn release(i: usize) {
    let slot = &REGISTRY[i];
    if slot.owners.fetch_sub(1, Ordering::AcqRel) != 1 {
        return;
    }
    let _guard = REGISTRY_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (start, len) = (slot.start.load(Ordering::Acquire), slot.len.load(Ordering::Acquire));
    slot.start.store(0, Ordering::Release);
    slot.len.store(0, Ordering::Release);
    SLOTS_IN_USE.fetch_sub(1, Ordering::AcqRel);
    #[cfg(unix)]
    // SAFETY: the range was mapped by `Mapping::open` and nothing points into it any more.
    unsafe {
        libc::munmap(start as *mut libc::c_void, len);
    }
}

/// Allocations smaller than this go to mimalloc, larger ones (tensors, file buffers) to the
/// system allocator, and the largest ones to [`crate::blocks`]. Loading a tokenizer makes
/// ~200k small strings and hash tables, which glibc's malloc serves and frees in 25-28 ms
/// against mimalloc's 15-17 ms; the tensors stay with glibc, because sampling ran slower with
/// mimalloc serving them as well.
const SMALL: usize = 64 << 10;

/// Which allocator serves an allocation of `size` bytes: 0 mimalloc, 1 the system's,
/// 2 the reused blocks.
fn class(size: usize) -> u8 {
    #[cfg(unix)]
    let large = size >= crate::blocks::LARGE;
    #[cfg(not(unix))]
    let large = false;
    match size {
        _ if size < SMALL => 0,
        _ if large => 2,
        _ => 1,
    }
}

/// The allocator for an allocation of `size` bytes that is not in a mapping.
fn serves(size: usize) -> &'static dyn GlobalAlloc {
    match class(size) {
        0 => &mimalloc::MiMalloc,
        #[cfg(unix)]
        2 => &crate::blocks::Blocks,
        _ => &System,
    }
}

// SAFETY: every allocation comes from the allocator `serves` picks for its size, and is freed
// or resized by the same one (a resize into another allocator's sizes moves it); a pointer
// into a registered mapping was never allocated and is only counted when freed (and copied
// out of when reallocated).
unsafe impl GlobalAlloc for MappingAware {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !INSTALLED.load(Ordering::Relaxed) {
            INSTALLED.store(true, Ordering::Relaxed);
        }
        serves(layout.size()).alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        serves(layout.size()).alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match slot_of(ptr) {
            Some(i) => release(i),
            None => serves(layout.size()).dealloc(ptr, layout),
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let slot = slot_of(ptr);
        if slot.is_none() && class(layout.size()) == class(new_size) {
            return serves(new_size).realloc(ptr, layout, new_size);
        }
        let new = self.alloc(Layout::from_size_align_unchecked(new_size, layout.align()));
        if !new.is_null() {
            std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
            match slot {
                Some(i) => release(i),
                None => serves(layout.size()).dealloc(ptr, layout),
            }
        }
        new
    }
}

/// A weight file mapped read-only.
pub struct Mapping {
    map: ManuallyDrop<memmap2::Mmap>,
    /// the registry slot, when tensors may live in the mapping
    slot: Option<usize>,
}

impl Mapping {
    pub fn open(file: &File) -> std::io::Result<Self> {
        // SAFETY: the file is only read; a concurrent writer would be a user error that the
        // safetensors header and size checks make unlikely to go unnoticed.
        let map = unsafe { memmap2::Mmap::map(file) }?;
        let slot = register(&map);
        Ok(Self {
            map: ManuallyDrop::new(map),
            slot,
        })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Maps the pages of `range` in one call (`MADV_POPULATE_READ`) rather than one fault per
    /// 4 KiB page: about a page-cache read. Where the kernel cannot, they fault in as used.
    pub fn populate(&self, range: &Range<usize>) {
        #[cfg(target_os = "linux")]
        let _ = self
            .map
            .advise_range(memmap2::Advice::PopulateRead, range.start, range.len());
        #[cfg(not(target_os = "linux"))]
        let _ = range;
    }

    /// Drops the pages of `range` from this process once copied out (`MADV_DONTNEED`), so that
    /// they stop counting as its memory; the page cache keeps them. Safe for any page, also one
    /// a tensor in the mapping uses: a read-only file page faults back in with the same bytes.
    pub fn release(&self, range: &Range<usize>) {
        #[cfg(unix)]
        // SAFETY: see above; the mapping is read-only and file-backed.
        let _ = unsafe {
            self.map
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, range.start, range.len())
        };
        #[cfg(not(unix))]
        let _ = range;
    }

    /// The elements of `range` (bytes) as a vector that lives in the mapping, without a copy;
    /// `None` where that cannot be (no [`MappingAware`] allocator, an empty or misaligned range).
    pub fn vec<T: Copy>(&self, range: Range<usize>) -> Option<Vec<T>> {
        let slot = self.slot?;
        let bytes = self.map.get(range)?;
        let size = std::mem::size_of::<T>();
        let ptr = bytes.as_ptr();
        if bytes.is_empty() || bytes.len() % size != 0 || ptr as usize % std::mem::align_of::<T>() != 0 {
            return None;
        }
        REGISTRY[slot].owners.fetch_add(1, Ordering::AcqRel);
        let n = bytes.len() / size;
        // SAFETY: aligned, initialised (file bytes are valid for the float types asked for),
        // and freeing the vector goes through `MappingAware::dealloc`, which counts it instead.
        Some(unsafe { Vec::from_raw_parts(ptr as *mut T, n, n) })
    }
}

/// A slot for `map` when vectors may live in it: the allocator is installed, the platform can
/// unmap a range, and a slot is free.
fn register(map: &memmap2::Mmap) -> Option<usize> {
    if !cfg!(unix) || !INSTALLED.load(Ordering::Relaxed) || map.is_empty() {
        return None;
    }
    let _guard = REGISTRY_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let i = REGISTRY.iter().position(|s| s.start.load(Ordering::Acquire) == 0)?;
    let slot = &REGISTRY[i];
    slot.owners.store(1, Ordering::Release);
    slot.len.store(map.len(), Ordering::Release);
    slot.start.store(map.as_ptr() as usize, Ordering::Release);
    SLOTS_IN_USE.fetch_add(1, Ordering::AcqRel);
    SLOTS_TAKEN.fetch_max(i + 1, Ordering::AcqRel);
    Some(i)
}

impl Drop for Mapping {
    fn drop(&mut self) {
        match self.slot {
            Some(i) => release(i),
            // SAFETY: dropped once, here; no vector lives in an unregistered mapping.
            None => unsafe { ManuallyDrop::drop(&mut self.map) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The unit tests install `MappingAware` (lib.rs): vectors live in the mapping, are counted
    /// as owners, and the last owner to go unregisters it.
    #[test]
    fn vectors_live_in_the_mapping_until_the_last_owner_goes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.bin");
        let values: Vec<f32> = (0..4096).map(|i| i as f32 * 0.5).collect();
        std::fs::write(&path, values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
        let map = Mapping::open(&File::open(&path).unwrap()).unwrap();
        let slot = map.slot.expect("registered: the allocator is installed");
        let start = map.bytes().as_ptr() as usize;
        let a: Vec<f32> = map.vec(0..4096 * 4).unwrap();
        let b: Vec<f32> = map.vec(400..800).unwrap();
        assert_eq!(a, values);
        assert_eq!(b[..], values[100..200]);
        assert_eq!(a.as_ptr() as usize, start, "not a copy");
        assert_eq!(REGISTRY[slot].owners.load(Ordering::Acquire), 3);
        assert!(map.vec::<f32>(1..5).is_none(), "misaligned");
        // dropping the pages of a vector in the mapping keeps its values
        release_pages(b.as_ptr().cast(), 400);
        release_pages(a.as_ptr().cast(), 4096 * 4);
        assert_eq!(a, values);
        assert_eq!(b[..], values[100..200]);
        drop(map);
        drop(a);
        assert_eq!(REGISTRY[slot].owners.load(Ordering::Acquire), 1);
        assert_eq!(slot_of(b.as_ptr() as *mut u8), Some(slot));
        drop(b);
        // unmapped and unregistered (another test may have taken the slot for another file)
        assert_ne!(REGISTRY[slot].start.load(Ordering::Acquire), start);
    }
}
