//! Reader for `torch.save` zip archives (PyTorch ≥ 1.6) with impasto's own pickle machine, for the
//! archives libtorch's `Tensor::loadz_multi` refuses: it wants a plain `{name: tensor}` dict, but
//! `torch.save(model.state_dict())` pickles an `OrderedDict` carrying `_metadata` (a `BUILD` opcode
//! libtorch's loader misreads), and checkpoints nest the state dict (`{'state_dict': {...}}`).
//! The archive's entries are stored uncompressed: `<name>/data.pkl` holds the pickle, and each
//! storage key `k` names the raw little-endian bytes of `<name>/data/k`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use tch::Tensor;

use super::legacy_pickle::{self, vm};

/// Signatures and sizes of the zip records this reads.
const END_OF_DIRECTORY: u32 = 0x0605_4b50;
const ZIP64_LOCATOR: u32 = 0x0706_4b50;
const ZIP64_END_OF_DIRECTORY: u32 = 0x0606_4b50;
const DIRECTORY_ENTRY: u32 = 0x0201_4b50;
const LOCAL_HEADER: u32 = 0x0403_4b50;
const END_OF_DIRECTORY_LEN: u64 = 22;
/// Largest central directory accepted (a VGG checkpoint's is a few kilobytes).
const MAX_DIRECTORY_BYTES: u64 = 64 << 20;

/// Reads the named tensors of a `torch.save` zip archive; the error says what is wrong with it.
pub fn read(path: &Path) -> Result<Vec<(String, Tensor)>, String> {
    let mut file = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let len = file.metadata().map_err(|e| format!("cannot read: {e}"))?.len();
    let entries = read_directory(&mut file, len)?;
    let prefix = archive_prefix(&entries)?;
    if let Some(order) = entries.get(&format!("{prefix}byteorder"))
        && read_entry(&mut file, order, "byteorder")? == b"big"
    {
        return Err("the archive was saved on a big-endian machine; only little-endian files are read".into());
    }
    let pickle_entry =
        entries.get(&format!("{prefix}data.pkl")).ok_or_else(|| format!("no {prefix}data.pkl in the archive"))?;
    let pickle_bytes = read_entry(&mut file, pickle_entry, "data.pkl")?;
    let saved = vm::load(&mut vm::Input::new(pickle_bytes.as_slice(), pickle_bytes.len() as u64))
        .map_err(|e| format!("data.pkl is unreadable: {e}"))?;
    let named = saved.tensors()?;
    let mut storages = HashMap::new();
    for storage in saved.storages() {
        if !storages.contains_key(&storage.key) {
            let data = read_storage(&mut file, &entries, &prefix, storage)?;
            storages.insert(storage.key.clone(), data);
        }
    }
    named
        .iter()
        .map(|(name, tensor)| Ok((name.clone(), legacy_pickle::materialize(name, tensor, &storages)?)))
        .collect()
}

/// Checks that the archive is whole: its end records and central directory are readable and every
/// entry's bytes lie inside the file. libtorch's zip reader reads past the end of some truncated
/// archives (a crash, not an error), so nothing reaches it before this passes.
pub fn check_whole(path: &Path) -> Result<(), String> {
    let mut file = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let len = file.metadata().map_err(|e| format!("cannot read: {e}"))?.len();
    let entries = read_directory(&mut file, len)?;
    for (name, entry) in &entries {
        let header = read_at(&mut file, entry.header_offset, 30, name)?;
        if le32(&header, 0) != LOCAL_HEADER {
            return Err(format!("{name}: no local header at byte {}", entry.header_offset));
        }
        let data_start = entry.header_offset + 30 + u64::from(le16(&header, 26)) + u64::from(le16(&header, 28));
        if data_start.checked_add(entry.size).is_none_or(|end| end > len) {
            return Err(format!(
                "file truncated: {name} needs bytes {data_start}..{} but the file has {len}",
                data_start + entry.size
            ));
        }
    }
    Ok(())
}

/// Where an entry's bytes are.
#[derive(Clone, Copy, Debug)]
struct Entry {
    /// 0 for stored; anything else is compressed.
    method: u16,
    /// Bytes as stored.
    size: u64,
    /// Offset of its local header.
    header_offset: u64,
    /// Position in the directory, to find the first entry.
    index: usize,
}

/// One storage's bytes (`data/<key>`), checked against the persistent id's element count.
fn read_storage(
    file: &mut File,
    entries: &HashMap<String, Entry>,
    prefix: &str,
    storage: &vm::StorageRef,
) -> Result<Tensor, String> {
    let name = format!("{prefix}data/{}", storage.key);
    let entry = entries.get(&name).ok_or_else(|| format!("storage '{}' has no {name} in the archive", storage.key))?;
    let (element_size, kind) = legacy_pickle::element_type(&storage.type_name)
        .ok_or_else(|| format!("storage '{}': unsupported storage type {}", storage.key, storage.type_name))?;
    let expected = storage.numel.checked_mul(element_size).ok_or("storage size overflows")?;
    if entry.size != expected {
        return Err(format!(
            "{name} holds {} bytes, but {} {} elements need {expected}",
            entry.size, storage.numel, storage.type_name
        ));
    }
    let bytes = read_entry(file, entry, &name)?;
    let numel = i64::try_from(storage.numel).map_err(|_| "storage too large".to_string())?;
    Tensor::f_from_data_size(&bytes, &[numel], kind).map_err(|e| format!("{name}: libtorch refused the data: {e}"))
}

/// The folder all entries live in (`vgg19/` for `vgg19.pth`), from the first entry as libtorch does.
fn archive_prefix(entries: &HashMap<String, Entry>) -> Result<String, String> {
    let first = entries.iter().min_by_key(|(_, e)| e.index).map(|(name, _)| name).ok_or("the archive is empty")?;
    let (folder, _) = first.split_once('/').ok_or_else(|| format!("entry '{first}' is not in a folder"))?;
    Ok(format!("{folder}/"))
}

/// The bytes of a stored entry.
fn read_entry(file: &mut File, entry: &Entry, name: &str) -> Result<Vec<u8>, String> {
    if entry.method != 0 {
        return Err(format!("{name} is compressed (method {}); torch.save stores entries uncompressed", entry.method));
    }
    let header = read_at(file, entry.header_offset, 30, name)?;
    if le32(&header, 0) != LOCAL_HEADER {
        return Err(format!("{name}: no local header at byte {}", entry.header_offset));
    }
    let data_start = entry.header_offset + 30 + u64::from(le16(&header, 26)) + u64::from(le16(&header, 28));
    read_at(file, data_start, entry.size, name)
}

/// `count` bytes at `offset`; an error naming `what` if the file is shorter.
fn read_at(file: &mut File, offset: u64, count: u64, what: &str) -> Result<Vec<u8>, String> {
    let len = file.metadata().map_err(|e| format!("cannot read: {e}"))?.len();
    if offset.checked_add(count).is_none_or(|end| end > len) {
        return Err(format!(
            "file truncated: {what} needs bytes {offset}..{} but the file has {len}",
            offset.saturating_add(count)
        ));
    }
    let mut buffer = vec![0u8; count as usize];
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.read_exact(&mut buffer))
        .map_err(|e| format!("{what}: {e}"))?;
    Ok(buffer)
}

/// The central directory: entry name → where its bytes are.
fn read_directory(file: &mut File, len: u64) -> Result<HashMap<String, Entry>, String> {
    let (count, size, offset) = find_directory(file, len)?;
    if size > MAX_DIRECTORY_BYTES {
        return Err(format!("zip central directory of {size} bytes is implausibly large"));
    }
    let directory = read_at(file, offset, size, "the zip central directory")?;
    let mut entries = HashMap::new();
    let mut at = 0usize;
    for index in 0..count {
        let (name, entry, next) = parse_entry(&directory, at, index)?;
        entries.insert(name, entry);
        at = next;
    }
    Ok(entries)
}

/// (entry count, directory size, directory offset) from the end records, zip64 ones included.
fn find_directory(file: &mut File, len: u64) -> Result<(u64, u64, u64), String> {
    let tail_len = len.min(END_OF_DIRECTORY_LEN + 0xffff);
    let tail = read_at(file, len - tail_len, tail_len, "the zip end record")?;
    let end = (0..=tail.len().saturating_sub(END_OF_DIRECTORY_LEN as usize))
        .rev()
        .find(|&i| le32(&tail, i) == END_OF_DIRECTORY)
        .ok_or("no zip end-of-directory record (truncated or not a zip archive)")?;
    let end_offset = len - tail_len + end as u64;
    if end_offset >= 20 {
        let locator = read_at(file, end_offset - 20, 20, "the zip64 locator")?;
        if le32(&locator, 0) == ZIP64_LOCATOR {
            let record = read_at(file, le64(&locator, 8), 56, "the zip64 end record")?;
            if le32(&record, 0) != ZIP64_END_OF_DIRECTORY {
                return Err("the zip64 locator points at no zip64 end record".into());
            }
            return Ok((le64(&record, 32), le64(&record, 40), le64(&record, 48)));
        }
    }
    Ok((u64::from(le16(&tail, end + 10)), u64::from(le32(&tail, end + 12)), u64::from(le32(&tail, end + 16))))
}

/// One central-directory entry at `at`: its name, location and where the next entry starts.
fn parse_entry(directory: &[u8], at: usize, index: u64) -> Result<(String, Entry, usize), String> {
    let bad = || format!("zip central directory entry {index} is damaged");
    if at.checked_add(46).is_none_or(|end| end > directory.len()) || le32(directory, at) != DIRECTORY_ENTRY {
        return Err(bad());
    }
    let (name_len, extra_len, comment_len) =
        (le16(directory, at + 28) as usize, le16(directory, at + 30) as usize, le16(directory, at + 32) as usize);
    let next = at + 46 + name_len + extra_len + comment_len;
    if next > directory.len() {
        return Err(bad());
    }
    let name = String::from_utf8_lossy(&directory[at + 46..at + 46 + name_len]).into_owned();
    let extra = &directory[at + 46 + name_len..at + 46 + name_len + extra_len];
    let mut size = u64::from(le32(directory, at + 20));
    let mut header_offset = u64::from(le32(directory, at + 42));
    let uncompressed = u64::from(le32(directory, at + 24));
    apply_zip64_extra(extra, uncompressed, &mut size, &mut header_offset);
    let entry = Entry { method: le16(directory, at + 10), size, header_offset, index: index as usize };
    Ok((name, entry, next))
}

/// Replaces 0xffffffff sizes and offsets by the 64-bit values of the zip64 extra field (id 1).
fn apply_zip64_extra(extra: &[u8], uncompressed: u64, size: &mut u64, header_offset: &mut u64) {
    let mut at = 0;
    while at + 4 <= extra.len() {
        let (id, len) = (le16(extra, at), le16(extra, at + 2) as usize);
        let body = extra.get(at + 4..at + 4 + len).unwrap_or_default();
        if id == 1 {
            let mut values = body.chunks_exact(8).map(|c| le64(c, 0));
            if uncompressed == u64::from(u32::MAX) {
                values.next();
            }
            if *size == u64::from(u32::MAX) {
                *size = values.next().unwrap_or(*size);
            }
            if *header_offset == u64::from(u32::MAX) {
                *header_offset = values.next().unwrap_or(*header_offset);
            }
        }
        at += 4 + len;
    }
}

fn le16(bytes: &[u8], at: usize) -> u16 {
    bytes.get(at..at + 2).map_or(0, |b| u16::from_le_bytes([b[0], b[1]]))
}

fn le32(bytes: &[u8], at: usize) -> u32 {
    bytes.get(at..at + 4).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn le64(bytes: &[u8], at: usize) -> u64 {
    bytes.get(at..at + 8).map_or(0, |b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
}
