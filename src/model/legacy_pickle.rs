//! Reader for PyTorch's legacy (pre-1.6, non-zip) `torch.save` format, the format of torchvision's
//! original VGG weights and of `torch.save(..., _use_new_zipfile_serialization=False)`. libtorch only
//! reads zip archives, so this walks the file itself: five pickles in a row (magic number, protocol
//! version, system info, the saved object, the list of storage keys), run by the small pickle machine
//! in [`vm`], then each storage's 8-byte little-endian element count and raw little-endian data.
//! Tensors are strided views of those storages; float ones come back as f32.

pub(super) mod vm;

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::Path;

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use vm::{Input, Pickle, StorageRef, TensorRef, Value};

/// `torch.serialization.MAGIC_NUMBER`, the first pickle of every legacy file.
const MAGIC_NUMBER: i128 = 0x1950a86a20f9469cfc6c;
/// `torch.serialization.PROTOCOL_VERSION`, the second pickle.
const PROTOCOL_VERSION: i128 = 1001;
/// Most dimensions a tensor may have.
const MAX_DIMS: usize = 16;
/// Views may repeat elements (stride 0), but may hold more elements than their storage only up to
/// this many: a corrupt size must not make us allocate gigabytes.
const REPEATED_VIEW_ELEMENTS: u64 = 1 << 24;

/// Reads the named tensors of a legacy-format PyTorch file. Nested containers give dotted names
/// (`state_dict.features.0.weight`); float tensors are converted to f32, others keep their kind.
pub fn read(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut input = Input::new(BufReader::new(file), len);
    read_from(&mut input).map_err(|problem| Error::weights(path, problem))
}

/// The whole file from `input`; errors say what was expected and what was found.
fn read_from<R: Read>(input: &mut Input<R>) -> std::result::Result<Vec<(String, Tensor)>, String> {
    read_header(input)?;
    let saved = vm::load(input).map_err(|e| format!("the saved object's pickle is unreadable: {e}"))?;
    let keys = read_storage_keys(input)?;
    let named = saved.tensors()?;
    let storages = read_storages(input, &keys, &storage_types(&saved)?)?;
    named.iter().map(|(name, tensor)| Ok((name.clone(), materialize(name, tensor, &storages)?))).collect()
}

/// The magic number, protocol version and system-info pickles.
fn read_header<R: Read>(input: &mut Input<R>) -> std::result::Result<(), String> {
    let magic =
        vm::load(input).map_err(|e| format!("not a PyTorch file: the magic-number pickle is unreadable: {e}"))?;
    if magic.root != Value::Int(MAGIC_NUMBER) {
        return Err(format!(
            "not a PyTorch file: expected the magic number 0x{MAGIC_NUMBER:x} in the first pickle, found {:?}",
            magic.root
        ));
    }
    let version = vm::load(input).map_err(|e| format!("the protocol-version pickle is unreadable: {e}"))?;
    if version.root != Value::Int(PROTOCOL_VERSION) {
        return Err(format!("expected PyTorch serialization protocol {PROTOCOL_VERSION}, found {:?}", version.root));
    }
    let sys_info = vm::load(input).map_err(|e| format!("the system-info pickle is unreadable: {e}"))?;
    check_little_endian(&sys_info)
}

/// Refuses files saved on big-endian machines (their storages are in that byte order).
fn check_little_endian(sys_info: &Pickle) -> std::result::Result<(), String> {
    let Some(vm::Node::Dict(entries)) = sys_info.node(&sys_info.root) else {
        return Err("the system-info pickle is not a dict".into());
    };
    let little_endian = entries.iter().find(|(key, _)| vm::text_of(key).as_deref() == Some("little_endian"));
    match little_endian {
        Some((_, Value::Bool(false))) => {
            Err("the file was saved on a big-endian machine; only little-endian files are read".into())
        }
        _ => Ok(()),
    }
}

/// The pickled list of storage keys, in the order their data follows.
fn read_storage_keys<R: Read>(input: &mut Input<R>) -> std::result::Result<Vec<String>, String> {
    let keys = vm::load(input).map_err(|e| format!("the storage-key list is unreadable: {e}"))?;
    let Some(vm::Node::List(items)) = keys.node(&keys.root) else {
        return Err(format!("expected the list of storage keys after the saved object, found {:?}", keys.root));
    };
    items.iter().map(|item| vm::text_of(item).ok_or_else(|| format!("storage key {item:?} is not a string"))).collect()
}

/// Element type of each root storage key, from the persistent ids of the saved object.
fn storage_types(saved: &Pickle) -> std::result::Result<HashMap<String, (String, u64)>, String> {
    let mut types: HashMap<String, (String, u64)> = HashMap::new();
    for storage in saved.storages() {
        let entry = types.entry(storage.key.clone()).or_insert_with(|| (storage.type_name.clone(), storage.numel));
        if entry.0 != storage.type_name {
            return Err(format!("storage '{}' is used both as {} and as {}", storage.key, entry.0, storage.type_name));
        }
    }
    Ok(types)
}

/// A storage type's element size in bytes and libtorch kind.
pub(super) fn element_type(type_name: &str) -> Option<(u64, Kind)> {
    let class = type_name.strip_prefix("torch.cuda.").or_else(|| type_name.strip_prefix("torch."))?;
    Some(match class {
        "FloatStorage" => (4, Kind::Float),
        "DoubleStorage" => (8, Kind::Double),
        "HalfStorage" => (2, Kind::Half),
        "BFloat16Storage" => (2, Kind::BFloat16),
        "LongStorage" => (8, Kind::Int64),
        "IntStorage" => (4, Kind::Int),
        "ShortStorage" => (2, Kind::Int16),
        "CharStorage" => (1, Kind::Int8),
        "ByteStorage" => (1, Kind::Uint8),
        "BoolStorage" => (1, Kind::Bool),
        _ => return None,
    })
}

/// Reads every storage's data after the pickles, as one-dimensional tensors by key.
fn read_storages<R: Read>(
    input: &mut Input<R>,
    keys: &[String],
    types: &HashMap<String, (String, u64)>,
) -> std::result::Result<HashMap<String, Tensor>, String> {
    let mut storages = HashMap::new();
    for (position, key) in keys.iter().enumerate() {
        let (type_name, numel) = types
            .get(key)
            .ok_or_else(|| format!("the storage list names '{key}', which no tensor in the file uses"))?;
        let label = format!("storage '{key}' ({} of {}, {type_name})", position + 1, keys.len());
        let data = read_storage(input, type_name, *numel).map_err(|problem| format!("{label}: {problem}"))?;
        storages.insert(key.clone(), data);
    }
    Ok(storages)
}

/// One storage: its element count, which must match the persistent id, then its bytes.
fn read_storage<R: Read>(input: &mut Input<R>, type_name: &str, numel: u64) -> std::result::Result<Tensor, String> {
    let (element_size, kind) =
        element_type(type_name).ok_or_else(|| format!("unsupported storage type {type_name}"))?;
    let count = u64::from_le_bytes(input.array().map_err(|e| e.to_string())?);
    if count != numel {
        return Err(format!("the file holds {count} elements, the pickle said {numel}"));
    }
    let byte_count = count.checked_mul(element_size).ok_or_else(|| format!("{count} elements is too many"))?;
    let bytes = input.bytes(byte_count).map_err(|e| e.to_string())?;
    let len = i64::try_from(count).map_err(|_| format!("{count} elements is too many"))?;
    Tensor::f_from_data_size(&bytes, &[len], kind).map_err(|e| format!("libtorch refused the data: {e}"))
}

/// The tensor `tensor` describes, copied contiguously out of its storage (float kinds as f32).
pub(super) fn materialize(
    name: &str,
    tensor: &TensorRef,
    storages: &HashMap<String, Tensor>,
) -> std::result::Result<Tensor, String> {
    let storage = storages.get(&tensor.storage.key).ok_or_else(|| {
        format!("tensor '{name}' uses storage '{}', which the file does not hold", tensor.storage.key)
    })?;
    let view_start =
        view_start(&tensor.storage, storage.numel() as u64).map_err(|p| format!("tensor '{name}': {p}"))?;
    let offset =
        check_extent(tensor, view_start, storage.numel() as u64).map_err(|p| format!("tensor '{name}': {p}"))?;
    let view = storage
        .f_as_strided(&tensor.size, &tensor.stride, Some(offset))
        .map_err(|e| format!("tensor '{name}': {e}"))?;
    let kind = match view.kind() {
        Kind::Half | Kind::BFloat16 | Kind::Double | Kind::Float => Kind::Float,
        other => other,
    };
    let mut copy =
        Tensor::f_empty(&tensor.size, (kind, tch::Device::Cpu)).map_err(|e| format!("tensor '{name}': {e}"))?;
    copy.f_copy_(&view).map_err(|e| format!("tensor '{name}': {e}"))?;
    Ok(copy)
}

/// Where an old-style storage view starts in its root storage (0 for plain storages).
fn view_start(storage: &StorageRef, root_numel: u64) -> std::result::Result<u64, String> {
    let Some((_, offset, len)) = &storage.view else { return Ok(0) };
    match offset.checked_add(*len) {
        Some(end) if end <= root_numel => Ok(*offset),
        _ => Err(format!("storage view [{offset}, +{len}) lies outside a storage of {root_numel} elements")),
    }
}

/// Checks that the strided view stays inside its storage and has a sane size; returns its offset
/// in the root storage.
fn check_extent(tensor: &TensorRef, view_start: u64, storage_numel: u64) -> std::result::Result<i64, String> {
    let (size, stride) = (&tensor.size, &tensor.stride);
    let invalid = || format!("invalid view: offset {}, size {size:?}, stride {stride:?}", tensor.offset);
    if size.len() > MAX_DIMS || size.iter().chain(stride).any(|&d| d < 0) || tensor.offset < 0 {
        return Err(invalid());
    }
    let offset =
        view_start.checked_add(tensor.offset as u64).filter(|&o| i64::try_from(o).is_ok()).ok_or_else(invalid)?;
    let numel = size.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64)).ok_or_else(invalid)?;
    if numel > storage_numel.max(REPEATED_VIEW_ELEMENTS) {
        return Err(format!("a view of {numel} elements of a storage of {storage_numel} is implausible"));
    }
    if numel == 0 {
        return Ok(offset as i64);
    }
    let last = size.iter().zip(stride).try_fold(offset, |reach, (&n, &s)| {
        (n as u64 - 1).checked_mul(s as u64).and_then(|span| reach.checked_add(span))
    });
    match last {
        Some(last) if last < storage_numel => Ok(offset as i64),
        _ => Err(format!(
            "view (offset {}, size {size:?}, stride {stride:?}) reaches past the {storage_numel} elements of storage '{}'",
            tensor.offset, tensor.storage.key
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Emits protocol-2 pickle opcodes for hand-made legacy files.
    struct Pickler(Vec<u8>);

    impl Pickler {
        fn new() -> Self {
            Pickler(b"\x80\x02".to_vec())
        }
        fn raw(&mut self, bytes: &[u8]) -> &mut Self {
            self.0.extend_from_slice(bytes);
            self
        }
        fn text(&mut self, text: &str) -> &mut Self {
            self.0.push(b'X');
            self.0.extend_from_slice(&(text.len() as u32).to_le_bytes());
            self.raw(text.as_bytes())
        }
        fn int(&mut self, value: i32) -> &mut Self {
            self.0.push(b'J');
            self.raw(&value.to_le_bytes())
        }
        fn ints(&mut self, values: &[i32]) -> &mut Self {
            self.0.push(b'(');
            for &value in values {
                self.int(value);
            }
            self.raw(b"t")
        }
        /// `_rebuild_tensor_v2(('storage', torch.<class>, key, 'cpu', numel, None), offset, size, stride, False, OrderedDict())`.
        fn tensor(
            &mut self,
            class: &str,
            key: &str,
            numel: i32,
            offset: i32,
            size: &[i32],
            stride: &[i32],
        ) -> &mut Self {
            self.raw(b"ctorch._utils\n_rebuild_tensor_v2\n((").text("storage");
            self.raw(format!("ctorch\n{class}\n").as_bytes()).text(key).text("cpu").int(numel).raw(b"NtQ");
            self.int(offset).ints(size).ints(stride).raw(b"\x89ccollections\nOrderedDict\n)RtR")
        }
        fn stop(&mut self) -> Vec<u8> {
            self.0.push(b'.');
            std::mem::take(&mut self.0)
        }
    }

    fn header() -> Vec<u8> {
        let mut bytes = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.".to_vec();
        bytes.extend_from_slice(b"\x80\x02M\xe9\x03.");
        bytes.extend(Pickler::new().raw(b"}").text("little_endian").raw(b"\x88s").stop());
        bytes
    }

    fn storage(count: u64, data: &[u8]) -> Vec<u8> {
        let mut bytes = count.to_le_bytes().to_vec();
        bytes.extend_from_slice(data);
        bytes
    }

    fn read_bytes(bytes: &[u8]) -> std::result::Result<Vec<(String, Tensor)>, String> {
        read_from(&mut Input::new(bytes, bytes.len() as u64))
    }

    fn values(tensor: &Tensor) -> Vec<f32> {
        let flat = tensor.flatten(0, -1);
        (0..flat.numel() as i64).map(|i| flat.double_value(&[i]) as f32).collect()
    }

    /// {'a': float view (offset 1, [2, 2], stride (1, 2)), 'b': half [3]}, storages keyed out of order.
    fn two_tensor_file() -> Vec<u8> {
        let mut bytes = header();
        let mut saved = Pickler::new();
        saved.raw(b"}(").text("a").tensor("FloatStorage", "9", 5, 1, &[2, 2], &[1, 2]);
        saved.text("b").tensor("HalfStorage", "10", 3, 0, &[3], &[1]).raw(b"u");
        bytes.extend(saved.stop());
        bytes.extend(Pickler::new().raw(b"(").text("10").text("9").raw(b"l").stop());
        let halves: Vec<u8> = [1.0f32, -2.0, 0.5].iter().flat_map(|&v| half_bits(v).to_le_bytes()).collect();
        bytes.extend(storage(3, &halves));
        let floats: Vec<u8> = [9.0f32, 1.0, 2.0, 3.0, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        bytes.extend(storage(5, &floats));
        bytes
    }

    /// f16 bits of values that f16 holds exactly.
    fn half_bits(value: f32) -> u16 {
        let bits = value.to_bits();
        let sign = ((bits >> 16) & 0x8000) as u16;
        let exponent = ((bits >> 23) & 0xff) as i32 - 127 + 15;
        let mantissa = ((bits >> 13) & 0x3ff) as u16;
        sign | ((exponent as u16) << 10) | mantissa
    }

    #[test]
    fn reads_strided_views_and_half_storages_in_key_list_order() {
        let tensors = read_bytes(&two_tensor_file()).expect("valid file");
        assert_eq!(tensors.len(), 2);
        let (name, a) = &tensors[0];
        assert_eq!((name.as_str(), a.size(), a.kind()), ("a", vec![2, 2], Kind::Float));
        assert_eq!(values(a), [1.0, 3.0, 2.0, 4.0]);
        let (name, b) = &tensors[1];
        assert_eq!((name.as_str(), b.kind()), ("b", Kind::Float));
        assert_eq!(values(b), [1.0, -2.0, 0.5]);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = two_tensor_file();
        for cut in [0, 1, 10, 17, 30, 60, 200, bytes.len() - 30, bytes.len() - 1] {
            let error = read_bytes(&bytes[..cut]).expect_err("truncated");
            assert!(error.contains("truncated"), "cut at {cut}: {error}");
        }
    }

    #[test]
    fn a_view_past_its_storage_is_refused() {
        let mut bytes = header();
        bytes.extend(Pickler::new().raw(b"}").text("w").tensor("FloatStorage", "0", 2, 1, &[2], &[1]).raw(b"s").stop());
        bytes.extend(Pickler::new().raw(b"]").text("0").raw(b"a").stop());
        bytes.extend(storage(2, &[0; 8]));
        let error = read_bytes(&bytes).expect_err("out of bounds");
        assert!(error.contains("tensor 'w'") && error.contains("reaches past the 2 elements"), "{error}");
    }

    #[test]
    fn mismatched_counts_and_unknown_keys_are_refused() {
        let saved = Pickler::new().raw(b"}").text("w").tensor("FloatStorage", "0", 2, 0, &[2], &[1]).raw(b"s").stop();
        let mut wrong_count = header();
        wrong_count.extend(saved.clone());
        wrong_count.extend(Pickler::new().raw(b"]").text("0").raw(b"a").stop());
        wrong_count.extend(storage(3, &[0; 12]));
        let error = read_bytes(&wrong_count).expect_err("count mismatch");
        assert!(error.contains("holds 3 elements, the pickle said 2"), "{error}");

        let mut unknown_key = header();
        unknown_key.extend(saved);
        unknown_key.extend(Pickler::new().raw(b"]").text("7").raw(b"a").stop());
        let error = read_bytes(&unknown_key).expect_err("unknown key");
        assert!(error.contains("names '7', which no tensor"), "{error}");
    }

    #[test]
    fn a_wrong_magic_number_or_big_endian_file_is_refused() {
        let error = read_bytes(b"\x80\x02K\x07.").expect_err("not torch");
        assert!(error.contains("magic number"), "{error}");
        let mut big_endian = header();
        let at = big_endian.len() - 3;
        big_endian[at] = 0x89; // NEWFALSE for little_endian
        big_endian.extend(Pickler::new().raw(b"}").stop());
        let error = read_bytes(&big_endian).expect_err("big endian");
        assert!(error.contains("big-endian"), "{error}");
    }

    #[test]
    fn damaged_files_give_errors_not_panics() {
        let original = two_tensor_file();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..5_000 {
            let mut bytes = original.clone();
            for _ in 0..1 + next() % 3 {
                let at = (next() % bytes.len() as u64) as usize;
                bytes[at] = next() as u8;
            }
            let _ = read_bytes(&bytes);
        }
    }

    #[test]
    fn repeated_views_beyond_the_cap_are_refused() {
        let mut bytes = header();
        bytes.extend(
            Pickler::new().raw(b"}").text("w").tensor("FloatStorage", "0", 1, 0, &[1 << 30], &[0]).raw(b"s").stop(),
        );
        bytes.extend(Pickler::new().raw(b"]").text("0").raw(b"a").stop());
        bytes.extend(storage(1, &[0; 4]));
        let error = read_bytes(&bytes).expect_err("too many elements");
        assert!(error.contains("implausible"), "{error}");
    }
}
