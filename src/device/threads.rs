//! The CPU thread count of one thread's libtorch work. `tch::set_num_threads` reaches further than
//! the thread that calls it: libtorch keeps the count it is given, and every thread that first uses
//! libtorch after that takes it up. A helper thread that wants fewer threads for itself (the optical
//! flow's many small operations run fastest on one, beside the stylizer) would so shrink every thread
//! started after it, the next job's stylizer included. OpenMP, which runs libtorch's CPU kernels,
//! keeps the count per thread: [`limit_this_thread`] asks it directly, for the calling thread only.
//! OpenMP also keeps each thread's workers parked for that thread's next parallel work, and parked
//! workers of threads that have handed their work on slow the thread that paints:
//! [`release_this_thread`] lets them go.

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

/// Lets go of the OpenMP workers that the calling thread's libtorch work started. libgomp parks a
/// thread's workers for its next parallel work, and while the threads it manages outnumber the
/// cores, every one of them gives up spinning at a barrier almost at once and sleeps until woken.
/// A network iteration crosses hundreds of barriers: on a 2-core machine, with a video job's motion
/// stage's workers parked beside the painting thread's, an iteration at 160×90 took 38 ms instead
/// of 29. A thread that hands its libtorch work on to another and waits calls this; its next
/// parallel work starts workers afresh (a thread start, microseconds). Returns false, doing nothing,
/// where libtorch's OpenMP runtime is not libgomp (elsewhere a pause may reach every thread's
/// workers), or inside a parallel region.
pub fn release_this_thread() -> bool {
    let Some(pause) = libgomp_pause_host() else { return false };
    // SAFETY: libgomp's `omp_pause_resource_all` pauses the host by freeing the calling thread's
    // parked workers only (the others keep theirs); inside a parallel region it fails, doing nothing.
    unsafe { pause(PAUSE_SOFT) == 0 }
}

/// OpenMP 5.0's `int omp_pause_resource_all(omp_pause_resource_t)`, the enum passed as an int.
type PauseResourceAll = unsafe extern "C" fn(c_int) -> c_int;

/// `omp_pause_soft`: the runtime may keep what it needs to start threads again.
const PAUSE_SOFT: c_int = 1;

/// libgomp's `omp_pause_resource_all`, where the loaded OpenMP runtime is libgomp.
fn libgomp_pause_host() -> Option<PauseResourceAll> {
    static FOUND: OnceLock<Option<PauseResourceAll>> = OnceLock::new();
    *FOUND.get_or_init(|| {
        let address = loaded_symbol(c"omp_pause_resource_all")?;
        if !defined_in_libgomp(address) {
            tracing::debug!("the OpenMP runtime is not libgomp; parked workers are left as they are");
            return None;
        }
        // SAFETY: the symbol's declared type.
        Some(unsafe { std::mem::transmute::<*mut libc::c_void, PauseResourceAll>(address) })
    })
}

/// Whether `address` lies in a library whose file name says libgomp.
fn defined_in_libgomp(address: *mut libc::c_void) -> bool {
    // SAFETY: dladdr only reads `address` and fills `info`; an all-zero Dl_info is a valid start.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `info` outlives the call.
    if unsafe { libc::dladdr(address, &mut info) } == 0 || info.dli_fname.is_null() {
        return false;
    }
    // SAFETY: dladdr gives a NUL-terminated path owned by the loader, valid while the library is loaded.
    let file = unsafe { std::ffi::CStr::from_ptr(info.dli_fname) };
    file.to_bytes().windows(b"libgomp".len()).any(|name| name == b"libgomp")
}

/// The address of `name` among the libraries the program has loaded, if any has it.
fn loaded_symbol(name: &std::ffi::CStr) -> Option<*mut libc::c_void> {
    // SAFETY: a valid C string; RTLD_DEFAULT searches the libraries the program has loaded.
    let address = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    if address.is_null() {
        let effect = "thread counts and parked workers are left as they are";
        tracing::debug!(symbol = ?name, "no OpenMP runtime loaded has it; {effect}");
        return None;
    }
    Some(address)
}

/// The OpenMP runtime's `omp_set_num_threads`, found among the libraries already loaded.
fn omp_set_num_threads() -> Option<SetNumThreads> {
    static FOUND: OnceLock<Option<SetNumThreads>> = OnceLock::new();
    *FOUND.get_or_init(|| {
        let address = loaded_symbol(c"omp_set_num_threads")?;
        // SAFETY: OpenMP declares it as `void omp_set_num_threads(int)`.
        Some(unsafe { std::mem::transmute::<*mut libc::c_void, SetNumThreads>(address) })
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use tch::Tensor;

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

    /// The threads of this process named `name` (new threads take their creator's name).
    pub fn threads_named(name: &str) -> usize {
        let tasks = std::fs::read_dir("/proc/self/task").expect("/proc/self/task");
        tasks
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .filter(|comm| comm.trim_end() == name)
            .count()
    }

    /// Waits until `name` has `count` threads (up to 10 s: libgomp joins released workers at once);
    /// the count it ended at.
    pub fn settle_threads_named(name: &str, count: usize) -> usize {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while threads_named(name) != count && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        threads_named(name)
    }

    /// Names the calling thread `name` (at most 15 bytes) as the kernel shows it; threads it starts
    /// take the name.
    pub fn name_this_thread(name: &str) {
        let name = std::ffi::CString::new(name).expect("no NUL");
        // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes, the rest cut off.
        assert_eq!(unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) }, 0);
    }

    /// Work libtorch splits across the calling thread's OpenMP threads (above its grain of 32768).
    pub fn parallel_work() -> f64 {
        (Tensor::ones([1 << 20], (tch::Kind::Float, tch::Device::Cpu)) * 3.0).sum(tch::Kind::Double).double_value(&[])
    }

    #[test]
    fn a_released_thread_lets_its_parked_openmp_workers_go_and_starts_new_ones_for_its_next_work() {
        let name = "omp-release";
        let (parked, released, again, sums) = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                assert!(limit_this_thread(2), "libtorch's OpenMP runtime was not found");
                let first = parallel_work();
                let parked = threads_named(name);
                assert!(release_this_thread(), "the OpenMP runtime did not pause the host");
                let released = settle_threads_named(name, 1);
                let second = parallel_work();
                let again = threads_named(name);
                release_this_thread();
                (parked, released, again, (first, second))
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(parked, 2, "the thread and its one parked worker");
        assert_eq!(released, 1, "the worker is still there after the release");
        assert_eq!(again, 2, "the next parallel work starts a worker again");
        assert_eq!(sums, (3.0 * (1 << 20) as f64, 3.0 * (1 << 20) as f64));
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
