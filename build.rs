//! Build script: gives the binaries an rpath to libtorch so they run without LD_LIBRARY_PATH,
//! and records that directory so the program can load the CUDA backend (`libtorch_cuda.so`) at start.
//! torch-sys (a direct dependency for this reason) exports the directory as `DEP_TCH_LIBTORCH_LIB`.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
        println!("cargo:rustc-env=IMPASTO_LIBTORCH_LIB={lib_dir}");
    } else {
        println!("cargo:rustc-env=IMPASTO_LIBTORCH_LIB=");
    }
}
