//! The process heap, where CPU tensors live. libtorch takes each tensor's memory from malloc and
//! frees it as soon as the tensor goes, many times per iteration. glibc's defaults serve a block
//! above a threshold that adapts up to 32 MiB (the activations of a frame of 512² and up) straight
//! from the kernel with `mmap` and unmap it when freed, and a thread other than the main one
//! allocates from an arena whose heaps are capped at 64 MiB, so its large blocks are always mapped
//! anew. Either way each pass of the network faults in and zeroes its activations again.
//! [`keep_freed_memory`] asks glibc (2.35 or newer: older ones refuse a threshold above 32 MiB, and
//! then nothing is changed) to serve blocks below 1 GiB from one heap and to keep up to 1 GiB of
//! freed memory in it. On a 2-core CPU that took 29 % off a bf16 iteration at 512², 35 % at
//! 1280×720, 15–16 % in f32, and 7 % off a video frame at 512 px, for up to 41 % more peak RSS in
//! the iteration benchmark (the heap fragments): see BENCHMARKS.md. A parameter the user sets
//! (`MALLOC_ARENA_MAX` and the like, or its `glibc.malloc.*` tunable) is left as the user set it.
//! The daemon gives freed memory back with [`give_back_freed_memory`] after each job.

/// Blocks smaller than this come from the heap, not from their own mapping.
pub const MMAP_THRESHOLD_BYTES: usize = 1 << 30;
/// Freed memory at the top of the heap is returned to the kernel only beyond this.
pub const TRIM_THRESHOLD_BYTES: usize = 1 << 30;

/// A glibc malloc parameter set here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parameter {
    /// Blocks below it come from the heap: [`MMAP_THRESHOLD_BYTES`]. Set first: without it the
    /// others do not pay.
    MmapThreshold,
    /// Free memory at the heap's top beyond it goes back to the kernel: [`TRIM_THRESHOLD_BYTES`].
    TrimThreshold,
    /// The most arenas: one, so a painter thread's blocks come from the main heap, which has no cap.
    ArenaMax,
}

impl Parameter {
    /// Every parameter set here, in the order they are set.
    pub const ALL: [Parameter; 3] = [Parameter::MmapThreshold, Parameter::TrimThreshold, Parameter::ArenaMax];

    /// The environment variable a user sets it by.
    pub fn variable(self) -> &'static str {
        match self {
            Parameter::MmapThreshold => "MALLOC_MMAP_THRESHOLD_",
            Parameter::TrimThreshold => "MALLOC_TRIM_THRESHOLD_",
            Parameter::ArenaMax => "MALLOC_ARENA_MAX",
        }
    }

    /// Its name inside `GLIBC_TUNABLES`.
    pub fn tunable(self) -> &'static str {
        match self {
            Parameter::MmapThreshold => "glibc.malloc.mmap_threshold",
            Parameter::TrimThreshold => "glibc.malloc.trim_threshold",
            Parameter::ArenaMax => "glibc.malloc.arena_max",
        }
    }

    /// The value set here.
    pub fn value(self) -> usize {
        match self {
            Parameter::MmapThreshold => MMAP_THRESHOLD_BYTES,
            Parameter::TrimThreshold => TRIM_THRESHOLD_BYTES,
            Parameter::ArenaMax => 1,
        }
    }

    /// Whether the process environment `vars` sets this parameter itself.
    pub fn set_by_user<'a>(self, vars: impl IntoIterator<Item = (&'a str, &'a str)>) -> bool {
        vars.into_iter().any(|(name, value)| {
            name == self.variable()
                || (name == "GLIBC_TUNABLES"
                    && value.split(':').any(|setting| setting.split('=').next() == Some(self.tunable())))
        })
    }
}

/// Keeps freed CPU memory in one heap for reuse (see the module's text). Call it at start, before
/// other threads allocate. Returns whether the heap keeps its blocks: false off glibc, where glibc
/// refuses the threshold, or where the user set the threshold.
pub fn keep_freed_memory() -> bool {
    let vars: Vec<(String, String)> = std::env::vars_os()
        .map(|(n, v)| (n.to_string_lossy().into_owned(), v.to_string_lossy().into_owned()))
        .collect();
    let user_sets = |parameter: Parameter| parameter.set_by_user(vars.iter().map(|(n, v)| (n.as_str(), v.as_str())));
    if user_sets(Parameter::MmapThreshold) || !set_malloc_option(Parameter::MmapThreshold) {
        return false;
    }
    for parameter in [Parameter::TrimThreshold, Parameter::ArenaMax] {
        if !user_sets(parameter) {
            set_malloc_option(parameter);
        }
    }
    true
}

/// Returns the heap's free memory to the kernel (glibc's `malloc_trim`), as the daemon does when a
/// job ends so that an idle node does not hold the last job's peak.
pub fn give_back_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory, under glibc's own arena locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Sets one parameter through `mallopt`; whether glibc took it.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_malloc_option(parameter: Parameter) -> bool {
    let option = match parameter {
        Parameter::MmapThreshold => libc::M_MMAP_THRESHOLD,
        Parameter::TrimThreshold => libc::M_TRIM_THRESHOLD,
        Parameter::ArenaMax => libc::M_ARENA_MAX,
    };
    let value = libc::c_int::try_from(parameter.value()).expect("fits a C int");
    // SAFETY: mallopt only changes glibc's allocation parameters, under its own arena lock.
    unsafe { libc::mallopt(option, value) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_malloc_option(_: Parameter) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parameter_the_user_sets_is_left_alone_and_only_that_one() {
        use Parameter::*;
        let user = [("PATH", "/usr/bin"), ("MALLOC_ARENA_MAX", "4"), ("MALLOC_CHECK_", "3")];
        assert!(ArenaMax.set_by_user(user));
        assert!(!MmapThreshold.set_by_user(user) && !TrimThreshold.set_by_user(user));
        let tunables = [("GLIBC_TUNABLES", "glibc.rtld.nns=2:glibc.malloc.trim_threshold=0")];
        assert!(TrimThreshold.set_by_user(tunables));
        assert!(!MmapThreshold.set_by_user(tunables) && !ArenaMax.set_by_user(tunables));
    }
}
