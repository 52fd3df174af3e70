//! Build script: gives the binaries an rpath to libtorch so they run without LD_LIBRARY_PATH,
//! records that directory so the program can load the CUDA backend (`libtorch_cuda.so`) at start,
//! and compiles the small C++ layer (`src/device/tf32.cpp`: the TF32 switches of libtorch's global
//! context; `src/device/allocator.cpp`: the CUDA caching allocator's peak statistics;
//! `src/device/bf16.cpp`: whether the GPU runs bf16 convolutions natively; `src/device/products.cpp`:
//! the precision of float32 matrix products on the CPU; `src/device/bf16_rows.cpp`: bf16 rows read
//! against float32 vectors on the CPU, for L-BFGS's pairs) against the same libtorch headers tch itself is
//! built with.
//! torch-sys (a direct dependency for this reason) exports the directory as `DEP_TCH_LIBTORCH_LIB`.

use std::path::Path;

/// The C++ layer: what libtorch offers that tch does not expose.
const CPP_SOURCES: [&str; 5] = [
    "src/device/tf32.cpp",
    "src/device/allocator.cpp",
    "src/device/bf16.cpp",
    "src/device/products.cpp",
    "src/device/bf16_rows.cpp",
];

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    for source in CPP_SOURCES {
        println!("cargo:rerun-if-changed={source}");
    }
    println!("cargo::rustc-check-cfg=cfg(impasto_cpp_layer)");
    if let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
        println!("cargo:rustc-env=IMPASTO_LIBTORCH_LIB={lib_dir}");
        compile_cpp_layer(Path::new(&lib_dir));
    } else {
        println!("cargo:rustc-env=IMPASTO_LIBTORCH_LIB=");
    }
}

/// Compiles the C++ layer when libtorch's headers sit beside its libraries (`lib/../include`).
fn compile_cpp_layer(lib_dir: &Path) {
    let Some(include) = lib_dir.parent().map(|root| root.join("include")) else { return };
    if !include.join("ATen/Context.h").is_file() {
        println!(
            "cargo:warning=libtorch headers not found at {}; --precision tf32 will be refused and CUDA peaks unknown",
            include.display()
        );
        return;
    }
    // the same ABI switch torch-sys compiles its own C++ layer with
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .cargo_warnings(false)
        .flag("-isystem")
        .flag(include.display().to_string())
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        // at::parallel_for is inline OpenMP: without it, bf16_rows.cpp would run on one thread
        .flag("-fopenmp")
        // bf16_rows.cpp's loops: fused multiply-adds and whole AVX-512 registers where the CPU has them
        .flag("-ffp-contract=fast")
        .flag("-mprefer-vector-width=512")
        .files(CPP_SOURCES)
        .compile("impasto_cpp");
    // the OpenMP runtime libtorch ships and itself runs on, so that the process has only one
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-lib=dylib:+verbatim=libgomp.so.1");
    println!("cargo:rustc-cfg=impasto_cpp_layer");
}
