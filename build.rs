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
            "cargo:warning=libtorch headers not found at {}; --precision tf32 will be refused, CUDA peaks unknown, and L-BFGS's bf16 pairs widened chunk by chunk",
            include.display()
        );
        return;
    }
    // the same ABI switch torch-sys compiles its own C++ layer with
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .cargo_warnings(false)
        .flag("-isystem")
        .flag(include.display().to_string())
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        // bf16_rows.cpp splits its loops among OpenMP's threads, and fuses their multiply-adds
        .flag("-fopenmp")
        .flag("-ffp-contract=fast");
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("x86_64") {
        // whole AVX-512 registers in the loops' AVX-512 versions
        build.flag("-mprefer-vector-width=512");
    }
    build.files(CPP_SOURCES).compile("impasto_cpp");
    link_libtorch_openmp(lib_dir);
    println!("cargo:rustc-cfg=impasto_cpp_layer");
}

/// Links the OpenMP runtime libtorch ships beside itself and runs its own kernels on, so that the
/// process has one: `libgomp.so.1` in a pip wheel, `libgomp-<hash>.so.1` in some other builds;
/// the system's where libtorch has none of its own.
fn link_libtorch_openmp(lib_dir: &Path) {
    let shipped = std::fs::read_dir(lib_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("libgomp") && name.ends_with(".so.1"))
        .min_by_key(|name| name != "libgomp.so.1");
    match shipped {
        Some(name) => {
            println!("cargo:rustc-link-search=native={}", lib_dir.display());
            println!("cargo:rustc-link-lib=dylib:+verbatim={name}");
        }
        None => println!("cargo:rustc-link-lib=gomp"),
    }
}
