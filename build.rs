//! Build script: gives the binaries an rpath to libtorch so they run without LD_LIBRARY_PATH,
//! records that directory so the program can load the CUDA backend (`libtorch_cuda.so`) at start,
//! and compiles the small C++ layer (`src/device/tf32.cpp`: the TF32 switches of libtorch's global
//! context; `src/device/allocator.cpp`: the CUDA caching allocator's peak statistics;
//! `src/device/bf16.cpp`: whether the GPU runs bf16 convolutions natively; `src/device/products.cpp`:
//! the precision of float32 matrix products on the CPU) against the same libtorch headers tch itself is
//! built with.
//! torch-sys (a direct dependency for this reason) exports the directory as `DEP_TCH_LIBTORCH_LIB`.

use std::path::Path;

/// The C++ layer: what libtorch offers that tch does not expose.
const CPP_SOURCES: [&str; 4] =
    ["src/device/tf32.cpp", "src/device/allocator.cpp", "src/device/bf16.cpp", "src/device/products.cpp"];

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
        .files(CPP_SOURCES)
        .compile("impasto_cpp");
    println!("cargo:rustc-cfg=impasto_cpp_layer");
}
