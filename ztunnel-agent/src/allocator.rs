//! The allocator's unused memory handed back to the kernel on demand.
//!
//! jemalloc (the agent's allocator: `src/main.rs`) returns freed pages to the kernel over its
//! decay time (3 s), which suits a busy proxy. A one-time burst is better returned at once:
//! loading eBPF at start-up (aya reads and parses the kernel's BTF, /sys/kernel/btf/vmlinux)
//! leaves about 9 MiB freed, and until decay
//! returns it the agent's RSS is 1.6 times its idle size (21 MiB against 12.6 on this
//! machine): what an operator reads in `kubectl top` right after a start.

/// Returns every arena's unused dirty pages to the kernel now; returns how many arenas did.
/// Called once, at start-up (two callers at once could leave an arena purging on every free).
#[cfg(feature = "jemalloc")]
pub fn release_unused() -> usize {
    use tikv_jemalloc_ctl::{arenas, Access, AsName};
    let Ok(count) = arenas::narenas::read() else {
        return 0;
    };
    (0..count)
        .filter(|i| {
            // A decay time of 0 purges the arena's unused dirty pages at once (jemalloc's
            // `arena.<i>.dirty_decay_ms`); the arena's own time is then put back. Arenas not
            // yet used answer an error and hold nothing; an arena that never purges (-1) or
            // always does (0) is left as it is.
            let key = format!("arena.{i}.dirty_decay_ms\0");
            let name = key.as_bytes().name();
            match Access::<isize>::read(name) {
                // Two writes, not `update`: tikv-jemalloc-ctl's `update` hands jemalloc one
                // buffer for the old and the new value, so jemalloc writes back the old one.
                Ok(ms) if ms > 0 => match name.write(0isize) {
                    Ok(()) => {
                        if let Err(e) = name.write(ms) {
                            tracing::warn!(arena = i, error = %e, "jemalloc: the arena's decay time was not restored; it returns freed pages at once");
                        }
                        true
                    }
                    Err(_) => false,
                },
                _ => false,
            }
        })
        .count()
}

/// Without jemalloc (the `jemalloc` feature off) there is nothing to return.
#[cfg(not(feature = "jemalloc"))]
pub fn release_unused() -> usize {
    0
}

/// The unit tests run on jemalloc too (with its default options: `src/main.rs` sets the
/// agent's).
#[cfg(all(test, feature = "jemalloc"))]
#[global_allocator]
static TESTS_ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[cfg(all(test, feature = "jemalloc"))]
mod tests {
    use tikv_jemalloc_ctl::{epoch, Access, AsName};

    /// Unused dirty pages of all arenas, in pages.
    fn dirty_pages() -> usize {
        epoch::advance().expect("epoch");
        Access::<usize>::read(b"stats.arenas.4096.pdirty\0".name()).expect("pdirty")
    }

    #[test]
    fn freed_memory_goes_back_to_the_kernel_at_once() {
        // 4 MiB in 64 KiB blocks, written and freed, stays cached as dirty pages for the
        // decay time...
        let blocks: Vec<Vec<u8>> = (0..64).map(|_| vec![1u8; 64 * 1024]).collect();
        drop(std::hint::black_box(blocks));
        let before = dirty_pages();
        assert!(
            before >= 512,
            "4 MiB freed should leave dirty pages, found {before}"
        );
        // ...until released, the arenas keeping their decay time.
        let decay =
            || Access::<isize>::read(b"arena.0.dirty_decay_ms\0".name()).expect("decay time");
        let decay_before = decay();
        assert!(super::release_unused() > 0, "no arena released its pages");
        assert_eq!(decay(), decay_before, "the decay time was put back");
        // Other tests run beside this one and free memory too: at least the 4 MiB went.
        let after = dirty_pages();
        assert!(
            after + 512 <= before,
            "dirty pages {before} before the release, {after} after"
        );
    }
}
