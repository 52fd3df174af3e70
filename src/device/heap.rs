//! The process heap, where CPU tensors live. libtorch takes each tensor's memory from malloc and
//! frees it as soon as the tensor goes, many times per iteration. glibc's defaults serve every block
//! above a few MiB (the activations of a frame of 512² and up) straight from the kernel with `mmap`
//! and unmap it when freed, and a thread other than the main one allocates from an arena whose heaps
//! are capped at 64 MiB, so its large blocks are always mapped anew. Either way each pass of the
//! network faults in and zeroes its activations again. [`keep_freed_memory`] asks glibc to serve
//! blocks below 1 GiB from one heap and to keep up to 1 GiB of freed memory in it. On a 2-core CPU
//! that took 22 % off an iteration at 512², a third at 1280×720 and 6 % off a video frame at 512
//! px, for more peak RSS (the heap fragments): see BENCHMARKS.md. Settings the user gives glibc
//! (`GLIBC_TUNABLES` malloc tunables, `MALLOC_*` variables) are left to win.

/// Blocks smaller than this come from the heap, not from their own mapping.
pub const MMAP_THRESHOLD_BYTES: usize = 1 << 30;
/// Freed memory at the top of the heap is returned to the kernel only beyond this.
pub const TRIM_THRESHOLD_BYTES: usize = 1 << 30;

/// Whether the process environment `vars` holds the user's own malloc settings for glibc.
pub fn user_tunes_malloc(vars: impl IntoIterator<Item = (String, String)>) -> bool {
    vars.into_iter().any(|(name, value)| {
        name.starts_with("MALLOC_") || (name == "GLIBC_TUNABLES" && value.contains("glibc.malloc."))
    })
}

/// Keeps freed CPU memory in one heap for reuse (see the module's text). Call it at start, before
/// other threads allocate; returns whether glibc took the settings (false off glibc, or where the
/// user's own settings are left to apply).
pub fn keep_freed_memory() -> bool {
    if user_tunes_malloc(std::env::vars_os().map(|(n, v)| (n.to_string_lossy().into(), v.to_string_lossy().into()))) {
        return false;
    }
    set_malloc_options()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_malloc_options() -> bool {
    let as_option = |bytes: usize| libc::c_int::try_from(bytes).expect("fits a C int");
    // SAFETY: mallopt only changes glibc's allocation parameters; it is called before the program
    // starts other threads, and glibc takes its own arena lock for it in any case.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1) == 1
            && libc::mallopt(libc::M_MMAP_THRESHOLD, as_option(MMAP_THRESHOLD_BYTES)) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, as_option(TRIM_THRESHOLD_BYTES)) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_malloc_options() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
    }

    #[test]
    fn the_users_own_malloc_settings_are_left_alone() {
        assert!(!user_tunes_malloc(vars(&[("PATH", "/usr/bin"), ("GLIBC_TUNABLES", "glibc.rtld.nns=2")])));
        assert!(user_tunes_malloc(vars(&[("MALLOC_ARENA_MAX", "4")])));
        assert!(user_tunes_malloc(vars(&[("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")])));
    }
}
