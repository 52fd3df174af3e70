//! The CPU thread count of one thread's libtorch work. `tch::set_num_threads` reaches further than
//! the thread that calls it: libtorch keeps the count it is given, and every thread that first uses
//! libtorch after that takes it up. A helper thread that wants fewer threads for itself (the optical
//! flow's many small operations run fastest on one, beside the stylizer) would so shrink every thread
//! started after it, the next job's stylizer included. OpenMP, which runs libtorch's CPU kernels,
//! keeps the count per thread: [`limit_this_thread`] asks it directly, for the calling thread only.

use std::ffi::c_int;
use std::sync::OnceLock;

/// OpenMP's `omp_set_num_threads`.
type SetNumThreads = unsafe extern "C" fn(c_int);

/// Sets the threads libtorch's CPU kernels use for work issued from the calling thread to
/// `threads` (at least 1); other threads keep theirs, and threads started later get the process's
/// count as before. Returns false, changing nothing, when libtorch runs without OpenMP.
pub fn limit_this_thread(threads: usize) -> bool {
    // libtorch sets a thread's OpenMP count from its kept one the first time the thread asks for
    // it: have that happen now, so it cannot undo the limit later
    let _ = tch::get_num_threads();
    let Some(set) = omp_set_num_threads() else { return false };
    let threads = c_int::try_from(threads.max(1)).unwrap_or(c_int::MAX);
    // SAFETY: the OpenMP runtime libtorch loaded; the call only sets the calling thread's count.
    unsafe { set(threads) };
    true
}

/// Runs `work` with the calling thread limited to `threads` libtorch threads (0: as they are), then
/// gives the thread its count back.
pub fn with_threads<T>(threads: usize, work: impl FnOnce() -> T) -> T {
    if threads == 0 {
        return work();
    }
    let before = tch::get_num_threads().max(1) as usize;
    let limited = limit_this_thread(threads);
    let result = work();
    if limited {
        limit_this_thread(before);
    }
    result
}

/// The OpenMP runtime's `omp_set_num_threads`, found among the libraries already loaded.
fn omp_set_num_threads() -> Option<SetNumThreads> {
    static FOUND: OnceLock<Option<SetNumThreads>> = OnceLock::new();
    *FOUND.get_or_init(|| {
        // SAFETY: a valid C string; RTLD_DEFAULT searches the libraries the program has loaded.
        let address = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"omp_set_num_threads".as_ptr()) };
        if address.is_null() {
            tracing::debug!("no OpenMP runtime found; per-thread thread counts are not available");
            return None;
        }
        // SAFETY: OpenMP declares it as `void omp_set_num_threads(int)`.
        Some(unsafe { std::mem::transmute::<*mut libc::c_void, SetNumThreads>(address) })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The thread count a new thread starts with.
    fn fresh_thread_count() -> i32 {
        std::thread::spawn(tch::get_num_threads).join().unwrap()
    }

    #[test]
    fn a_limited_thread_leaves_the_others_their_count() {
        let process = fresh_thread_count();
        let other = process + 1;
        let (limited, inside, after) = std::thread::spawn(move || {
            let limited = limit_this_thread(other as usize);
            let inside = tch::get_num_threads();
            (limited, inside, fresh_thread_count())
        })
        .join()
        .unwrap();
        assert!(limited, "libtorch's OpenMP runtime was not found");
        assert_eq!(inside, other);
        assert_eq!(after, process, "a thread started later took up the limited thread's count");
        assert_eq!(fresh_thread_count(), process);
    }

    #[test]
    fn the_count_comes_back_after_the_work() {
        std::thread::spawn(|| {
            let before = tch::get_num_threads();
            let during = with_threads(before as usize + 2, tch::get_num_threads);
            assert_eq!(during, before + 2);
            assert_eq!(tch::get_num_threads(), before);
        })
        .join()
        .unwrap();
    }
}
