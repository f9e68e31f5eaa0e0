//! Mapped files that shrink while in use.
//!
//! A model is memory-mapped and ggml reads its weights in place. If the file is truncated
//! or replaced in place while mapped, reading a page past its new end raises SIGBUS,
//! which kills the process by default; checking sizes up front cannot help, since the
//! change comes later. So a SIGBUS whose address lies in a watched mapping is absorbed:
//! the handler maps a page of zeros over the lost page, flags the mapping and returns,
//! and the read goes on with zeros. Every mapping [`super::map_file`] makes is watched;
//! its owner asks [`super::Mapped::intact`] after its work and turns a damaged mapping
//! into an error naming the file, so results computed from the zeros are never returned. A SIGBUS anywhere else
//! goes to the handler that was there before (a JVM's, say) or to the default action.
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Mappings watched at once; a mapping beyond them is not watched (and a SIGBUS in it
/// kills the process, as without this module).
const SLOTS: usize = 64;

static BASE: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static LEN: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static HIT: [AtomicBool; SLOTS] = [const { AtomicBool::new(false) }; SLOTS];
static PAGE: AtomicUsize = AtomicUsize::new(4096);
static DISABLED: AtomicBool = AtomicBool::new(false);
/// The SIGBUS disposition before ours, to pass other faults on to.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// A watched mapping; dropping it stops the watch (drop it before unmapping).
#[derive(Debug)]
pub struct MapGuard {
    slot: usize,
}

impl MapGuard {
    /// Watches `len` bytes at `map` (a read-only file mapping). `None` when every slot is
    /// taken or the handler cannot be installed.
    pub fn watch(map: &[u8]) -> Option<MapGuard> {
        if DISABLED.load(Ordering::Acquire) {
            return None;
        }
        install()?;
        let (base, len) = (map.as_ptr() as usize, map.len());
        if len == 0 {
            return None;
        }
        for slot in 0..SLOTS {
            if LEN[slot]
                .compare_exchange(0, usize::MAX, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                HIT[slot].store(false, Ordering::Release);
                BASE[slot].store(base, Ordering::Release);
                LEN[slot].store(len, Ordering::Release);
                return Some(MapGuard { slot });
            }
        }
        None
    }

    /// Leaves SIGBUS alone from now on (mappings opened later are not watched), for a
    /// host that owns the process's signals: HotSpot JVMs, whose handlers may only be
    /// chained through their `libjsig`. Android's runtime chains native handlers itself.
    pub fn disable() {
        DISABLED.store(true, Ordering::Release);
    }

    /// Whether a read of the mapping faulted since it was watched: the file shrank, and
    /// what was read from the lost pages was zeros.
    pub fn damaged(&self) -> bool {
        HIT[self.slot].load(Ordering::Acquire)
    }
}

impl Drop for MapGuard {
    fn drop(&mut self) {
        BASE[self.slot].store(0, Ordering::Release);
        LEN[self.slot].store(0, Ordering::Release);
    }
}

fn install() -> Option<()> {
    PREVIOUS
        .get_or_init(|| {
            // SAFETY: sysconf and sigaction with valid arguments; the handler only does
            // what is safe in a signal handler (atomics, mmap, and calling the previous
            // handler).
            unsafe {
                let page = libc::sysconf(libc::_SC_PAGESIZE);
                if page > 0 {
                    PAGE.store(page as usize, Ordering::Relaxed);
                }
                let mut new: libc::sigaction = std::mem::zeroed();
                new.sa_sigaction = on_sigbus as *const () as usize;
                new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
                libc::sigemptyset(&mut new.sa_mask);
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(libc::SIGBUS, &new, &mut old) != 0 {
                    old.sa_sigaction = usize::MAX; // marks "not installed"
                }
                old
            }
        })
        .sa_sigaction
        .ne(&usize::MAX)
        .then_some(())
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    let page = PAGE.load(Ordering::Relaxed);
    for slot in 0..SLOTS {
        let (base, len) = (
            BASE[slot].load(Ordering::Acquire),
            LEN[slot].load(Ordering::Acquire),
        );
        if base != 0 && len != usize::MAX && addr >= base && addr < base + len {
            // SAFETY: the page lies inside a live read-only file mapping of ours (watched
            // mappings are unwatched before they are unmapped); replacing it with a
            // private zero page changes what reads of it see, nothing else.
            let p = unsafe {
                libc::mmap(
                    (addr & !(page - 1)) as *mut libc::c_void,
                    page,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                HIT[slot].store(true, Ordering::Release);
                return;
            }
        }
    }
    // Not ours: what was there before.
    let Some(prev) = PREVIOUS.get() else {
        return default(sig);
    };
    match prev.sa_sigaction {
        libc::SIG_DFL | libc::SIG_IGN => default(sig),
        h if prev.sa_flags & libc::SA_SIGINFO != 0 => {
            // SAFETY: the previous handler was installed for SIGBUS with SA_SIGINFO.
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                unsafe { std::mem::transmute(h) };
            f(sig, info, ctx)
        }
        h => {
            // SAFETY: the previous handler was installed for SIGBUS without SA_SIGINFO.
            let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(h) };
            f(sig)
        }
    }
}

/// Restores the default action; returning re-runs the faulting read, which then ends
/// the process as it would have without us (ignoring a fault would loop forever).
fn default(sig: libc::c_int) {
    // SAFETY: signal() is async-signal-safe.
    unsafe { libc::signal(sig, libc::SIG_DFL) };
}
