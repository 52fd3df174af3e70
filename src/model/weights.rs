//! Reading VGG convolution weights from `.safetensors` files and PyTorch pickles (`.pth`/`.pt`),
//! with torchvision names (`features.N.weight`) or layer names (`conv4_2.weight`). The file's format
//! is told by its first bytes, not its extension; shapes are checked against the architecture.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use super::convention::Convention;
use super::layers::{Arch, LayerId};
use crate::error::{Error, Result};

/// One convolution's parameters, f32 on the CPU.
#[derive(Debug)]
pub struct ConvWeights {
    /// Which convolution.
    pub layer: LayerId,
    /// `[out, in, 3, 3]`.
    pub weight: Tensor,
    /// `[out]`.
    pub bias: Tensor,
}

/// The convolution stack read from a file.
#[derive(Debug)]
pub struct LoadedWeights {
    /// VGG-16 or VGG-19, from the number of convolutions.
    pub arch: Arch,
    /// Convolutions in network order.
    pub convs: Vec<ConvWeights>,
    /// The input convention, if the file states it.
    pub convention: Option<Convention>,
    /// The file.
    pub path: PathBuf,
}

/// Weight-file formats impasto reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// Hugging Face safetensors.
    Safetensors,
    /// `torch.save` zip archive (PyTorch ≥ 1.6).
    TorchZip,
    /// `torch.save` legacy pickle stream (older files, e.g. torchvision's 2017 VGG weights).
    TorchLegacy,
}

/// Tells the format from the first bytes of the file.
pub fn sniff_format(path: &Path) -> Result<WeightFormat> {
    let mut head = [0u8; 16];
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let read = file.read(&mut head).map_err(|e| Error::io(path, e))?;
    let head = &head[..read];
    if head.starts_with(b"PK\x03\x04") {
        return Ok(WeightFormat::TorchZip);
    }
    if head.len() >= 2 && head[0] == 0x80 && (2..=5).contains(&head[1]) {
        return Ok(WeightFormat::TorchLegacy);
    }
    if head.len() >= 9 && head[8] == b'{' {
        return Ok(WeightFormat::Safetensors);
    }
    Err(Error::weights(
        path,
        "unknown weight format (expected .safetensors, or a PyTorch .pth/.pt saved by torch.save)",
    ))
}

/// Reads the convolution weights of a VGG-16 or VGG-19 from `path`.
pub fn load(path: &Path) -> Result<LoadedWeights> {
    let (named, metadata) = match sniff_format(path)? {
        WeightFormat::Safetensors => (read_safetensors(path)?, safetensors_metadata(path)?),
        WeightFormat::TorchZip => (read_torch_zip(path)?, BTreeMap::new()),
        WeightFormat::TorchLegacy => (super::legacy_pickle::read(path)?, BTreeMap::new()),
    };
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let convention = Convention::from_metadata(metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .or_else(|| Convention::from_known_file_name(&file_name));
    let (arch, convs) = assemble(path, named)?;
    Ok(LoadedWeights { arch, convs, convention, path: path.to_path_buf() })
}

fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    Tensor::read_safetensors(path).map_err(|e| Error::weights(path, format!("not a readable safetensors file: {e}")))
}

/// libtorch reads plain `{name: tensor}` archives once impasto has checked that the archive is whole
/// (a regression: libtorch crashed on some truncated archives); state dicts (`OrderedDict` with `_metadata`) and
/// nested checkpoints go to impasto's own reader when libtorch refuses them.
fn read_torch_zip(path: &Path) -> Result<Vec<(String, Tensor)>> {
    super::torch_zip::check_whole(path)
        .map_err(|problem| Error::weights(path, format!("not a readable PyTorch archive: {problem}")))?;
    Tensor::loadz_multi(path).or_else(|libtorch_error| {
        super::torch_zip::read(path).map_err(|problem| {
            let text = libtorch_error.to_string();
            let first_line = text.lines().next().unwrap_or_default();
            let libtorch =
                first_line.trim_start_matches("Internal torch error: ").split(". ").next().unwrap_or_default();
            Error::weights(path, format!("not a readable PyTorch archive: {problem} (libtorch: {libtorch})"))
        })
    })
}

/// The `__metadata__` table of a safetensors header.
pub fn safetensors_metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| Error::io(path, e))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(Error::weights(path, "safetensors header larger than 100 MB"));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let header: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| Error::weights(path, format!("safetensors header is not JSON: {e}")))?;
    let mut metadata = BTreeMap::new();
    if let Some(table) = header.get("__metadata__").and_then(|m| m.as_object()) {
        for (key, value) in table {
            if let Some(text) = value.as_str() {
                metadata.insert(key.clone(), text.to_string());
            }
        }
    }
    Ok(metadata)
}

/// Which convolution a tensor name belongs to and whether it is the weight (else the bias).
enum NameKey {
    FeatureIndex(usize),
    Layer(LayerId),
}

fn parse_name(name: &str) -> Option<(NameKey, bool)> {
    let (stem, leaf) = name.rsplit_once('.')?;
    let is_weight = match leaf {
        "weight" => true,
        "bias" => false,
        _ => return None,
    };
    let stem = stem.rsplit_once("features.").map(|(_, rest)| rest).unwrap_or(stem);
    if let Ok(index) = stem.parse::<usize>() {
        return Some((NameKey::FeatureIndex(index), is_weight));
    }
    let last = stem.rsplit('.').next().unwrap_or(stem);
    last.starts_with("conv").then(|| last.parse::<LayerId>().ok()).flatten().map(|l| (NameKey::Layer(l), is_weight))
}

fn assemble(path: &Path, named: Vec<(String, Tensor)>) -> Result<(Arch, Vec<ConvWeights>)> {
    let mut by_index: BTreeMap<usize, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    let mut by_layer: BTreeMap<LayerId, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    for (name, tensor) in named {
        let Some((key, is_weight)) = parse_name(&name) else { continue };
        if name.contains("classifier") {
            continue;
        }
        let slot = match key {
            NameKey::FeatureIndex(i) => by_index.entry(i).or_default(),
            NameKey::Layer(l) => by_layer.entry(l).or_default(),
        };
        if is_weight { slot.0 = Some(tensor) } else { slot.1 = Some(tensor) }
    }
    let conv_count =
        by_index.values().chain(by_layer.values()).filter(|(w, _)| w.as_ref().is_some_and(|w| w.dim() == 4)).count();
    let arch = Arch::from_conv_count(conv_count).ok_or_else(|| {
        Error::weights(path, format!("found {conv_count} convolution weights; a VGG-16 has 13 and a VGG-19 16"))
    })?;
    let mut convs = Vec::new();
    for (layer, features_index) in arch.convs() {
        let pair = if by_layer.is_empty() { by_index.remove(&features_index) } else { by_layer.remove(&layer) };
        let missing = || Error::weights(path, format!("no weight/bias for {layer} (features.{features_index})"));
        let (Some(weight), Some(bias)) = pair.ok_or_else(missing)? else { return Err(missing()) };
        let want_weight = [arch.out_channels(layer), arch.in_channels(layer), 3, 3];
        if weight.size() != want_weight || bias.size() != [want_weight[0]] {
            return Err(Error::weights(
                path,
                format!(
                    "{layer}: weight {:?} / bias {:?}, expected {:?} / [{}] for a {arch}",
                    weight.size(),
                    bias.size(),
                    want_weight,
                    want_weight[0]
                ),
            ));
        }
        convs.push(ConvWeights { layer, weight: weight.to_kind(Kind::Float), bias: bias.to_kind(Kind::Float) });
    }
    Ok((arch, convs))
}

/// Writes convolution weights as safetensors with torchvision names and the convention in the metadata.
pub fn save_safetensors(path: &Path, arch: Arch, convs: &[ConvWeights], convention: Convention) -> Result<()> {
    let indices: BTreeMap<LayerId, usize> = arch.convs().into_iter().collect();
    let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for conv in convs {
        let index = indices[&conv.layer];
        for (leaf, tensor) in [("weight", &conv.weight), ("bias", &conv.bias)] {
            let tensor = tensor.to_kind(Kind::Float).contiguous().to_device(tch::Device::Cpu);
            let shape: Vec<usize> = tensor.size().iter().map(|&d| d as usize).collect();
            let numel = tensor.numel();
            let mut values = vec![0f32; numel];
            tensor.copy_data(&mut values, numel);
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            buffers.push((format!("features.{index}.{leaf}"), shape, bytes));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = buffers
        .iter()
        .map(|(name, shape, bytes)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .expect("shape and byte count agree");
            (name.clone(), view)
        })
        .collect();
    let metadata: std::collections::HashMap<String, String> = [
        ("convention".to_string(), convention.to_string()),
        ("layout".to_string(), format!("torchvision {arch} features.N; weight [out,in,kh,kw] float32")),
    ]
    .into_iter()
    .collect();
    crate::fsutil::write_atomically(path, |temp| {
        safetensors::serialize_to_file(views, Some(metadata), temp)
            .map_err(|e| Error::weights(path, format!("cannot write: {e}")))
    })
}
