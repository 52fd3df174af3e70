//! `weights::load` must give the same network from every file format a user may hold: safetensors,
//! PyTorch zip archives (read by libtorch) and PyTorch's legacy pickles (read by impasto's own pickle
//! machine), with torchvision or Gatys-style names, wrapped or not, in any float storage type; and it
//! must refuse damaged or wrong files with a message that names the file and the problem. The `.pth`
//! fixtures are written at test time from the shared VGG-16 by `tests/fixtures/write_pth.py`.

use std::path::{Path, PathBuf};
use std::process::Command;

use impasto::model::weights::{self, LoadedWeights};
use tch::{Kind, Tensor};
use tempfile::TempDir;

/// The shared VGG-16 safetensors file; fails (does not skip) when the shared folder is missing.
fn shared_weights() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models/vgg16_hed.safetensors");
    assert!(
        path.is_file(),
        "missing {}: these tests need the shared folder (../shared relative to the crate, see its README.md)",
        path.display()
    );
    path
}

/// Runs `write_pth.py` to write `file_name` in `dir` from the shared weights.
fn write_pth(dir: &Path, file_name: &str, args: &[&str]) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/write_pth.py");
    let output_path = dir.join(file_name);
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let output = Command::new(&python)
        .arg(&script)
        .arg(shared_weights())
        .arg(&output_path)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python} {}: {e}", script.display()));
    assert!(output.status.success(), "write_pth.py {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    output_path
}

fn load(path: &Path) -> LoadedWeights {
    weights::load(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The error message of loading `path`, checked to name the file.
fn load_error(path: &Path) -> String {
    let message = match weights::load(path) {
        Ok(loaded) => panic!("{} loaded as a {} but should fail", path.display(), loaded.arch),
        Err(error) => error.to_string(),
    };
    assert!(message.contains(&path.display().to_string()), "message does not name the file: {message}");
    message
}

/// Same architecture and bit-identical weights and biases, layer by layer.
fn assert_same(expected: &LoadedWeights, actual: &LoadedWeights) {
    let label = actual.path.display();
    assert_eq!(expected.arch, actual.arch, "{label}");
    assert_eq!(expected.convs.len(), actual.convs.len(), "{label}");
    for (want, got) in expected.convs.iter().zip(&actual.convs) {
        assert_eq!(want.layer, got.layer, "{label}");
        assert_eq!(got.weight.kind(), Kind::Float, "{label} {}", got.layer);
        assert!(want.weight.equal(&got.weight), "{label}: {} weight differs", got.layer);
        assert!(want.bias.equal(&got.bias), "{label}: {} bias differs", got.layer);
    }
}

/// The shared weights rounded through `kind` and back to f32, as a file of that kind holds them.
fn rounded_through(reference: &LoadedWeights, kind: Kind) -> LoadedWeights {
    let convs = reference
        .convs
        .iter()
        .map(|c| weights::ConvWeights {
            layer: c.layer,
            weight: c.weight.to_kind(kind).to_kind(Kind::Float),
            bias: c.bias.to_kind(kind).to_kind(Kind::Float),
        })
        .collect();
    LoadedWeights { arch: reference.arch, convs, convention: None, path: reference.path.clone() }
}

/// Writes the same options as a zip and as a legacy file and checks both against `expected`.
fn check_both_formats(expected: &LoadedWeights, stem: &str, args: &[&str]) {
    let dir = TempDir::new().expect("temp dir");
    for format in ["zip", "legacy"] {
        let mut all_args = vec!["--format", format];
        all_args.extend_from_slice(args);
        let path = write_pth(dir.path(), &format!("{stem}_{format}.pth"), &all_args);
        assert_same(expected, &load(&path));
    }
}

#[test]
fn torchvision_names_read_the_same_from_all_formats() {
    let reference = load(&shared_weights());
    assert_eq!(reference.convs.len(), 13);
    check_both_formats(&reference, "torchvision", &["--layout", "torchvision"]);
}

#[test]
fn gatys_layer_names_read_the_same_from_all_formats() {
    check_both_formats(&load(&shared_weights()), "named", &["--layout", "named"]);
}

#[test]
fn wrapped_and_prefixed_state_dicts_read_the_same() {
    let reference = load(&shared_weights());
    check_both_formats(&reference, "wrapped", &["--wrap", "state_dict"]);
    check_both_formats(
        &reference,
        "wrapped_named",
        &["--wrap", "state_dict", "--layout", "named", "--prefix", "module."],
    );
}

#[test]
fn strided_views_of_one_shared_storage_read_the_same() {
    check_both_formats(&load(&shared_weights()), "views", &["--views"]);
}

#[test]
fn half_bfloat16_and_double_storages_read_as_f32() {
    let reference = load(&shared_weights());
    for (dtype, kind) in [("float16", Kind::Half), ("bfloat16", Kind::BFloat16), ("float64", Kind::Double)] {
        check_both_formats(&rounded_through(&reference, kind), dtype, &["--dtype", dtype]);
    }
}

#[test]
fn truncated_files_are_refused_with_the_file_and_the_cut() {
    let dir = TempDir::new().expect("temp dir");
    for format in ["legacy", "zip"] {
        let whole = std::fs::read(write_pth(dir.path(), &format!("whole_{format}.pth"), &["--format", format]))
            .expect("fixture");
        for keep in [30, 5_000, whole.len() / 2, whole.len() - 100] {
            let path = dir.path().join(format!("cut_{format}_{keep}.pth"));
            std::fs::write(&path, &whole[..keep]).expect("write");
            let message = load_error(&path);
            let expected = if format == "legacy" { "truncated" } else { "not a readable PyTorch archive" };
            assert!(message.contains(expected), "{format} cut at {keep}: {message}");
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift64).
fn noise(count: usize, mut state: u64) -> Vec<u8> {
    (0..count)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

#[test]
fn random_bytes_are_refused_with_the_file_and_the_problem() {
    let dir = TempDir::new().expect("temp dir");
    let cases: [(&[u8], &str); 3] =
        [(b"", "unknown weight format"), (b"\x80\x02", "PyTorch"), (b"PK\x03\x04", "PyTorch archive")];
    for (seed, (head, expected)) in cases.iter().enumerate() {
        for length in [64, 100_000] {
            let mut bytes = head.to_vec();
            bytes.extend(noise(length, 0x9e37_79b9_7f4a_7c15 + seed as u64));
            let path = dir.path().join(format!("noise_{seed}_{length}.pth"));
            std::fs::write(&path, &bytes).expect("write");
            let message = load_error(&path);
            assert!(message.contains(expected), "{}: {message}", path.display());
        }
    }
}

#[test]
fn a_wrong_convolution_shape_is_refused_naming_the_layer() {
    let dir = TempDir::new().expect("temp dir");
    for format in ["zip", "legacy"] {
        let path = write_pth(
            dir.path(),
            &format!("shape_{format}.pth"),
            &["--format", format, "--wrong-shape", "features.10.weight"],
        );
        let message = load_error(&path);
        assert!(
            message.contains("conv3_1: weight [128, 256, 3, 3]") && message.contains("expected [256, 128, 3, 3]"),
            "{message}"
        );
    }
}

#[test]
fn twelve_convolutions_are_refused_with_the_count() {
    let dir = TempDir::new().expect("temp dir");
    for format in ["zip", "legacy"] {
        let args = ["--format", format, "--drop", "features.28.weight", "--drop", "features.28.bias"];
        let message = load_error(&write_pth(dir.path(), &format!("twelve_{format}.pth"), &args));
        assert!(message.contains("found 12 convolution weights"), "{message}");
    }
}

#[test]
fn libtorch_reads_the_zip_fixtures_plain_dicts() {
    // The check that write_pth.py writes PyTorch's real archive layout: libtorch's own loader
    // (`loadz_multi`, which takes plain {name: tensor} dicts) reads it, strided and f16 storages too.
    let dir = TempDir::new().expect("temp dir");
    let mut reference: Vec<(String, Tensor)> = Tensor::read_safetensors(shared_weights()).expect("safetensors");
    reference.sort_by(|a, b| a.0.cmp(&b.0));
    for (stem, extra) in [("plain", None), ("plain_views", Some("--views")), ("plain_half", Some("--dtype=float16"))] {
        let mut args = vec!["--format", "zip", "--plain-dict"];
        args.extend(extra);
        let path = write_pth(dir.path(), &format!("{stem}.pth"), &args);
        let mut named = Tensor::loadz_multi(&path).unwrap_or_else(|e| panic!("libtorch cannot read {stem}: {e}"));
        named.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(named.len(), reference.len(), "{stem}");
        for ((name, got), (want_name, want)) in named.iter().zip(&reference) {
            assert_eq!(name, want_name, "{stem}");
            let want = if stem == "plain_half" { want.to_kind(Kind::Half) } else { want.shallow_clone() };
            assert!(got.equal(&want), "{stem}: {name} differs");
        }
    }
}

#[test]
fn tensors_from_a_shared_storage_come_back_as_separate_contiguous_copies() {
    let dir = TempDir::new().expect("temp dir");
    for format in ["zip", "legacy"] {
        let loaded = load(&write_pth(dir.path(), &format!("views_{format}.pth"), &["--format", format, "--views"]));
        let total: usize = loaded.convs.iter().map(|c| c.weight.numel() + c.bias.numel()).sum();
        assert_eq!(total, 14_714_688, "{format}");
        assert!(loaded.convs.iter().all(|c| c.weight.is_contiguous() && c.bias.is_contiguous()), "{format}");
    }
}
