//! The process heap as the binary sets it at start (`device::heap::keep_freed_memory`): a large CPU
//! tensor made on a thread other than main, as the painter's are, comes from the heap and not from a
//! mapping of its own. glibc applies the arena setting only to threads started after it, so the
//! check runs in a fresh process of this file without the test harness (no other threads), twice:
//! with the settings, and with glibc's defaults, where the same tensor must be mapped on its own (so
//! the check can tell the two apart). glibc only: elsewhere the settings are not made.
#![cfg_attr(not(all(target_os = "linux", target_env = "gnu")), allow(dead_code, unused_imports))]

use std::process::Command;

use impasto::device::heap::Parameter;

/// The environment variable that makes a run of this file one of the two measuring children.
const CHILD: &str = "IMPASTO_HEAP_CHILD";
/// The tensor's size, larger than the 64 MiB heaps of a thread's own arena.
const BLOCK_BYTES: usize = 256 << 20;

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn main() {}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn main() {
    match std::env::var(CHILD).as_deref() {
        Ok("settings") => {
            assert!(impasto::device::heap::keep_freed_memory(), "glibc refused the settings");
            println!("{}", mapped_growth_of_a_tensor());
        }
        Ok(_) => println!("{}", mapped_growth_of_a_tensor()),
        Err(_) => parent(),
    }
}

/// Runs both children and checks what each saw.
fn parent() {
    let with_settings = child("settings");
    let with_defaults = child("defaults");
    assert!(with_defaults >= BLOCK_BYTES, "glibc's defaults should map the tensor: {with_defaults} bytes");
    assert!(with_settings < BLOCK_BYTES, "the tensor was mapped on its own: {with_settings} bytes");
    println!("heap: ok (mapped on its own: {with_settings} bytes with the settings, {with_defaults} without)");
}

/// Bytes mapped on their own while a [`BLOCK_BYTES`] tensor is alive, in a run of this file as `kind`,
/// without the user's settings of the parameters impasto sets.
fn child(kind: &str) -> usize {
    let mut command = Command::new(std::env::current_exe().unwrap());
    for (name, value) in std::env::vars() {
        if Parameter::ALL.iter().any(|p| p.set_by_user([(name.as_str(), value.as_str())])) {
            command.env_remove(name);
        }
    }
    let output = command.env(CHILD, kind).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{kind}: {stdout}{}", String::from_utf8_lossy(&output.stderr));
    stdout.trim().parse().unwrap_or_else(|_| panic!("{kind}: {stdout}"))
}

/// How much glibc's memory mapped on its own grows while a thread holds a [`BLOCK_BYTES`] tensor.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn mapped_growth_of_a_tensor() -> usize {
    std::thread::spawn(|| {
        let before = mapped_bytes();
        let tensor = tch::Tensor::zeros([BLOCK_BYTES as i64], (tch::Kind::Uint8, tch::Device::Cpu));
        let growth = mapped_bytes().saturating_sub(before);
        drop(tensor);
        growth
    })
    .join()
    .unwrap()
}

/// Bytes glibc holds in blocks mapped on their own.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn mapped_bytes() -> usize {
    // SAFETY: mallinfo2 only reads glibc's statistics.
    unsafe { libc::mallinfo2() }.hblkhd
}
