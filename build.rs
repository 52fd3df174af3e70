//! Build script: gives the binaries an rpath to libtorch so they run without LD_LIBRARY_PATH,
//! records that directory so the program can load the CUDA backend (`libtorch_cuda.so`) at start,
//! and compiles the small C++ layer (`src/device/tf32.cpp`: the TF32 switches of libtorch's global
//! context; `src/device/allocator.cpp`: the CUDA caching allocator's peak statistics;
//! `src/device/bf16.cpp`: whether the GPU runs bf16 convolutions natively; `src/device/products.cpp`:
//! the precision of float32 matrix products on the CPU) against the same libtorch headers tch itself
//! is built with, and apart from it L-BFGS's kernels on the CPU, which need OpenMP:
//! `src/device/bf16_rows.cpp` (bf16 rows read against float32 vectors) and
//! `src/device/pair_rows.cpp` (the passes over a new pair and over a proposal, each one read).
//! torch-sys (a direct dependency for this reason) exports the directory as `DEP_TCH_LIBTORCH_LIB`.

use std::path::Path;

/// The C++ layer: what libtorch offers that tch does not expose.
const CPP_SOURCES: [&str; 4] =
    ["src/device/tf32.cpp", "src/device/allocator.cpp", "src/device/bf16.cpp", "src/device/products.cpp"];

/// L-BFGS's kernels on the CPU, built apart: they need OpenMP and a compiler that takes
/// `target_clones`, and without them only they are left out.
const ROW_KERNEL_SOURCES: [&str; 2] = ["src/device/bf16_rows.cpp", "src/device/pair_rows.cpp"];

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    for source in CPP_SOURCES.iter().chain(&ROW_KERNEL_SOURCES) {
        println!("cargo:rerun-if-changed={source}");
    }
    println!("cargo::rustc-check-cfg=cfg(impasto_cpp_layer)");
    println!("cargo::rustc-check-cfg=cfg(impasto_row_kernels)");
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
            "cargo:warning=libtorch headers not found at {}; --precision tf32 will be refused, CUDA peaks unknown, L-BFGS's pairs f32 on the CPU",
            include.display()
        );
        return;
    }
    cpp_build(&include).files(CPP_SOURCES).compile("impasto_cpp");
    println!("cargo:rustc-cfg=impasto_cpp_layer");
    compile_row_kernels(&include, lib_dir);
}

/// A C++ build against libtorch's headers in `include`.
fn cpp_build(include: &Path) -> cc::Build {
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
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"));
    build
}

/// Compiles L-BFGS's kernels where libtorch ships its own OpenMP runtime (GNU's, as in the pip
/// wheels) and the compiler takes them, linking that runtime so that the process has one. Else
/// L-BFGS keeps to libtorch's operations: its bf16 pairs are widened chunk by chunk and `auto`
/// keeps them in f32.
fn compile_row_kernels(include: &Path, lib_dir: &Path) {
    let Some(runtime) = libtorch_openmp(lib_dir) else {
        println!("cargo:warning=no GNU OpenMP runtime beside libtorch: L-BFGS's pairs stay f32 on the CPU");
        return;
    };
    let mut build = cpp_build(include);
    // the loops split among OpenMP's threads, their multiply-adds fused
    build.flag("-fopenmp").flag("-ffp-contract=fast");
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("x86_64") {
        // whole AVX-512 registers in the loops' AVX-512 versions
        build.flag("-mprefer-vector-width=512");
    }
    if let Err(error) = build.files(ROW_KERNEL_SOURCES).try_compile("impasto_row_kernels") {
        println!("cargo:warning=L-BFGS's kernels not built ({error}): its pairs stay f32 on the CPU");
        return;
    }
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-lib=dylib:+verbatim={runtime}");
    println!("cargo:rustc-cfg=impasto_row_kernels");
}

/// The GNU OpenMP runtime libtorch ships beside itself and runs its own kernels on: `libgomp.so.1`
/// in a pip wheel, `libgomp-<hash>.so.1` in some other builds.
fn libtorch_openmp(lib_dir: &Path) -> Option<String> {
    std::fs::read_dir(lib_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("libgomp") && name.ends_with(".so.1"))
        .min_by_key(|name| name != "libgomp.so.1")
}
