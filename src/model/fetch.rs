//! `impasto model fetch`: downloads the official VGG-19 weights with a progress bar, checks their
//! SHA-256, keeps only the convolutions, and caches them as safetensors that state their input
//! convention. Offline, it fails with a message that says how to supply weights instead.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::Convention;
use super::weights;
use crate::error::{Error, Result};

/// A downloadable set of weights.
#[derive(Clone, Debug)]
pub struct Source {
    /// Where to download from.
    pub url: String,
    /// Expected SHA-256 of the download, or a prefix of it (torchvision names files by one).
    pub sha256_prefix: String,
    /// The input convention the weights were trained with.
    pub convention: Convention,
}

/// torchvision's ImageNet VGG-19 (RGB, ImageNet mean/std).
pub fn torchvision_vgg19() -> Source {
    Source {
        url: "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth".into(),
        sha256_prefix: "dcbb9e9d".into(),
        convention: Convention::Torchvision,
    }
}

/// Where the fetched model is cached.
pub fn cached_model_path() -> PathBuf {
    super::cache_dir().join("models").join("vgg19.safetensors")
}

/// Downloads, verifies, converts and caches `source`; returns the cached file.
/// `progress` is called with (bytes so far, total bytes if known).
pub fn fetch(source: &Source, destination: &Path, progress: &mut dyn FnMut(u64, Option<u64>)) -> Result<PathBuf> {
    let dir = crate::fsutil::folder_of(destination);
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let download = crate::fsutil::temp_path_for(&dir.join("download.pth"));
    let result = download_to(source, &download, progress).and_then(|()| convert(source, &download, destination));
    let _ = std::fs::remove_file(&download);
    result.map(|()| destination.to_path_buf())
}

fn download_to(source: &Source, file: &Path, progress: &mut dyn FnMut(u64, Option<u64>)) -> Result<()> {
    let offline = |problem: String| {
        Error::NoModel(format!(
            "could not download {}: {problem}. Without network access, copy a VGG-16/19 weight file \
             (.safetensors or .pth) here and pass --model FILE, or set {}",
            source.url,
            super::MODEL_ENV
        ))
    };
    let response = ureq::get(&source.url).call().map_err(|e| offline(e.to_string()))?;
    let total = response.body().content_length();
    let mut reader = response.into_body().into_reader();
    let mut out = std::fs::File::create(file).map_err(|e| Error::io(file, e))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    let mut received = 0u64;
    loop {
        let n = reader.read(&mut buffer).map_err(|e| offline(e.to_string()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        out.write_all(&buffer[..n]).map_err(|e| Error::io(file, e))?;
        received += n as u64;
        progress(received, total);
    }
    out.sync_all().map_err(|e| Error::io(file, e))?;
    let digest = hex::encode(hasher.finalize());
    if !digest.starts_with(&source.sha256_prefix.to_ascii_lowercase()) {
        return Err(Error::weights(
            file,
            format!("checksum mismatch for {}: SHA-256 {digest}, expected {}…", source.url, source.sha256_prefix),
        ));
    }
    Ok(())
}

fn convert(source: &Source, download: &Path, destination: &Path) -> Result<()> {
    let loaded = weights::load(download)?;
    weights::save_safetensors(destination, loaded.arch, &loaded.convs, source.convention)
}
