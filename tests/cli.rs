//! The `impasto` binary as a user runs it: real files, real weights, real HTTP for `model fetch`.
//! Bad input must give a clear message naming the file, a distinct non-zero exit code, and no output.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Output;

use common::impasto_with_cache as impasto;

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn quick_image(cache: &Path, content: &Path, output: &Path, extra: &[&str]) -> Output {
    impasto(cache)
        .arg("image")
        .arg(content)
        .arg("--style")
        .arg(common::media("paintings/starry_night.jpg"))
        .arg("-o")
        .arg(output)
        .args(["--size", "48", "-n", "4", "--device", "cpu"])
        .args(extra)
        .output()
        .unwrap()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn image_writes_the_output_with_json_progress_and_intermediates() {
    let dir = tempfile::tempdir().unwrap();
    let output_path = dir.path().join("out.png");
    let output =
        quick_image(dir.path(), &common::media("photos/chelsea.png"), &output_path, &["--json", "--save-every", "2"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let lines: Vec<serde_json::Value> =
        String::from_utf8(output.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 5, "four progress lines and one done line");
    assert_eq!(lines[3]["step"], 4);
    assert!(lines[0]["losses"]["style"].as_f64().unwrap() > 0.0);
    assert_eq!(lines[4]["event"], "done");
    let image = image::open(&output_path).unwrap();
    assert_eq!((image.width(), image.height()), (48, 32));
    let names = files_in(dir.path());
    assert!(names.contains(&"out-0002.png".to_string()) && names.contains(&"out-0004.png".to_string()), "{names:?}");
    assert!(!names.iter().any(|n| n.contains("partial")), "{names:?}");
}

#[test]
fn missing_content_image_names_the_file_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let output_path = dir.path().join("out.png");
    let output = quick_image(dir.path(), &dir.path().join("nope.jpg"), &output_path, &[]);
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert!(stderr(&output).contains("nope.jpg") && stderr(&output).contains("not found"), "{}", stderr(&output));
    assert!(!output_path.exists());
}

#[test]
fn corrupt_style_image_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("style.jpg");
    let real = std::fs::read(common::media("paintings/starry_night.jpg")).unwrap();
    std::fs::write(&corrupt, &real[..real.len() / 3]).unwrap();
    let output_path = dir.path().join("out.png");
    let output = impasto(dir.path())
        .arg("image")
        .arg(common::media("photos/chelsea.png"))
        .arg("--style")
        .arg(&corrupt)
        .arg("-o")
        .arg(&output_path)
        .args(["--size", "32", "-n", "2"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert!(stderr(&output).contains("style.jpg"), "{}", stderr(&output));
    assert!(!output_path.exists());
}

#[test]
fn text_file_as_weights_is_an_unknown_format() {
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("weights.pth");
    std::fs::write(&weights, "this is not a model\n").unwrap();
    let output_path = dir.path().join("out.png");
    let output = quick_image(
        dir.path(),
        &common::media("photos/chelsea.png"),
        &output_path,
        &["--model", weights.to_str().unwrap()],
    );
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("weights.pth") && stderr(&output).contains("unknown weight format"),
        "{}",
        stderr(&output)
    );
    assert!(!output_path.exists());
}

#[test]
fn missing_output_directory_fails_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let output_path = dir.path().join("no/such/dir/out.png");
    let output = quick_image(dir.path(), &common::media("photos/chelsea.png"), &output_path, &[]);
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert!(stderr(&output).contains("output directory does not exist"), "{}", stderr(&output));
}

#[test]
fn profile_with_an_unknown_key_is_a_settings_error() {
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("typo.toml");
    std::fs::write(&profile, "[style]\nitterations = 5\n").unwrap();
    let output_path = dir.path().join("out.png");
    let output = quick_image(
        dir.path(),
        &common::media("photos/chelsea.png"),
        &output_path,
        &["--profile", profile.to_str().unwrap()],
    );
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("typo.toml") && stderr(&output).contains("itterations"), "{}", stderr(&output));
}

#[test]
fn bundled_profiles_parse_and_default_matches_the_built_in_defaults() {
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config");
    for entry in std::fs::read_dir(&config).unwrap() {
        let path = entry.unwrap().path();
        // impasto.toml is the daemon's configuration, not a profile (its own test reads it)
        if path.extension().is_some_and(|e| e == "toml") && !path.ends_with("impasto.toml") {
            impasto::profile::Profile::load(path.to_str().unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }
    let (default, _) = impasto::profile::Profile::load(config.join("default.toml").to_str().unwrap()).unwrap();
    assert_eq!(default, impasto::profile::Profile::default());
}

#[test]
fn score_prints_both_distances() {
    let dir = tempfile::tempdir().unwrap();
    let photo = common::media("photos/astronaut.png");
    let output = impasto(dir.path())
        .arg("score")
        .arg(&photo)
        .arg(common::media("paintings/starry_night.jpg"))
        .arg(&photo)
        .arg("--json")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let score: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    // the photo scored against itself: zero content distance, clearly far from the painting
    assert!(score["content"].as_f64().unwrap() < 1e-6, "{score}");
    assert!(score["style"].as_f64().unwrap() > 0.5, "{score}");
    assert_eq!(score["style_layers"].as_array().unwrap().len(), 5);
}

#[test]
fn bench_prints_one_json_row_per_size() {
    let dir = tempfile::tempdir().unwrap();
    let output = impasto(dir.path())
        .args(["bench", "--sizes", "32,48x32", "--iterations", "1", "--warmup", "1", "--device", "cpu"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let rows: Vec<serde_json::Value> =
        String::from_utf8(output.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2);
    assert_eq!((rows[1]["width"].as_i64(), rows[1]["height"].as_i64()), (Some(48), Some(32)));
    assert!(rows[0]["seconds_per_iteration"].as_f64().unwrap() > 0.0);
    assert!(rows[0]["gflop_per_iteration"].as_f64().unwrap() > 0.0);
}

/// Serves one file over HTTP on a loopback port, once; returns the address.
fn serve_once(body: Vec<u8>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = format!("http://{}/vgg.safetensors", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = [0u8; 4096];
        let _ = stream.read(&mut request);
        let header = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
        stream.write_all(header.as_bytes()).unwrap();
        stream.write_all(&body).unwrap();
    });
    address
}

#[test]
fn model_fetch_downloads_verifies_and_converts() {
    let dir = tempfile::tempdir().unwrap();
    let body = std::fs::read(common::vgg16_weights()).unwrap();
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&body))
    };
    let address = serve_once(body);
    let output = impasto(dir.path())
        .env_remove("IMPASTO_MODEL")
        .args(["model", "fetch", "--url", &address, "--sha256", &digest, "--convention", "caffe"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let cached = dir.path().join("models/vgg19.safetensors");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), cached.to_string_lossy());
    let loaded = impasto::model::weights::load(&cached).unwrap();
    assert_eq!(loaded.convention, Some(impasto::model::Convention::Caffe));
    // the fetched model is now what impasto uses when nothing else is named
    let info = impasto(dir.path()).env_remove("IMPASTO_MODEL").args(["model", "info"]).output().unwrap();
    assert!(String::from_utf8_lossy(&info.stdout).contains("vgg19.safetensors"), "{}", stderr(&info));
}

#[test]
fn model_fetch_with_a_wrong_checksum_keeps_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let address = serve_once(std::fs::read(common::vgg16_weights()).unwrap());
    let output =
        impasto(dir.path()).args(["model", "fetch", "--url", &address, "--sha256", "00ff00ff"]).output().unwrap();
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert!(stderr(&output).contains("checksum mismatch"), "{}", stderr(&output));
    assert!(!dir.path().join("models/vgg19.safetensors").exists());
    assert!(files_in(&dir.path().join("models")).is_empty());
}

#[test]
fn model_fetch_offline_says_how_to_supply_weights() {
    let dir = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let output =
        impasto(dir.path()).args(["model", "fetch", "--url", &format!("http://{closed}/vgg19.pth")]).output().unwrap();
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(message.contains("could not download") && message.contains("--model"), "{message}");
}

#[test]
fn no_weights_anywhere_explains_the_resolution_order() {
    let dir = tempfile::tempdir().unwrap();
    let output = impasto(dir.path()).env_remove("IMPASTO_MODEL").args(["model", "info"]).output().unwrap();
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(
        message.contains("--model") && message.contains("IMPASTO_MODEL") && message.contains("model fetch"),
        "{message}"
    );
}

#[test]
fn threads_set_libtorch_cpu_threads_and_zero_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let output = impasto(dir.path())
        .args(["--threads", "1", "bench", "--sizes", "32", "--random", "vgg16", "--iterations", "1", "--warmup", "0"])
        .args(["--device", "cpu"])
        .env_remove("OMP_NUM_THREADS")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let row: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(row["threads"], 1, "{row}");
    let refused = impasto(dir.path()).args(["--threads", "0", "bench"]).output().unwrap();
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("--threads"), "{}", stderr(&refused));
}
