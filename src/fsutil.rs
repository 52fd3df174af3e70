//! Small file-system habits: outputs are written under a temporary name beside their destination
//! and renamed into place, so a crash never leaves a half-written file under the real name.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Moves `staged` to `destination` together with every other file in `staged`'s folder (the
/// segments of an HLS playlist), each under its own name into `destination`'s folder, `staged`
/// itself last, so that what it refers to is in place before it is. An HLS playlist already at
/// `destination` is replaced with its segments: those it lists under this output's segment names
/// that the new output does not bring are removed afterwards. Not atomic as a whole: a failure
/// part-way leaves the files moved so far.
pub fn move_with_companions(staged: &Path, destination: &Path) -> std::io::Result<()> {
    let (staging_folder, folder) = (folder_of(staged), folder_of(destination));
    let earlier = earlier_segments(destination);
    let mut moved = Vec::new();
    for entry in std::fs::read_dir(staging_folder)? {
        let entry = entry?;
        let path = entry.path();
        if path != staged
            && entry.file_type()?.is_file()
            && let Some(name) = path.file_name()
        {
            std::fs::rename(&path, folder.join(name))?;
            moved.push(name.to_owned());
        }
    }
    std::fs::rename(staged, destination)?;
    for name in earlier.iter().filter(|name| !moved.contains(name)) {
        let _ = std::fs::remove_file(folder.join(name));
    }
    Ok(())
}

/// The segments the HLS playlist at `playlist` (if there is one) lists under the names impasto
/// gives its own segments (`STEM-N.ts`, in its folder): never a file it merely refers to.
fn earlier_segments(playlist: &Path) -> Vec<std::ffi::OsString> {
    let Some((stem, text)) = playlist_text(playlist) else { return Vec::new() };
    text.lines().map(str::trim).filter(|line| is_own_segment(&stem, line)).map(Into::into).collect()
}

/// Whether `playlist` is an HLS playlist that lists nothing but segments under the names impasto
/// gives its own (`STEM-N.ts`): one that a stream restarted into it may continue, whose muxer then
/// deletes what falls out of its window. False where there is no such file.
pub fn lists_only_own_segments(playlist: &Path) -> bool {
    let Some((stem, text)) = playlist_text(playlist) else { return false };
    let mut listed = text.lines().map(str::trim).filter(|line| !line.is_empty() && !line.starts_with('#')).peekable();
    listed.peek().is_some() && listed.all(|line| is_own_segment(&stem, line))
}

/// The stem and text of the `.m3u8` playlist at `path`, if it is one that can be read.
fn playlist_text(path: &Path) -> Option<(String, String)> {
    let is_playlist = path.extension().is_some_and(|extension| extension.eq_ignore_ascii_case("m3u8"));
    let stem = path.file_stem()?.to_str()?.to_owned();
    is_playlist.then(|| std::fs::read_to_string(path).ok().map(|text| (stem, text))).flatten()
}

/// Where the muxer of the HLS playlist at `playlist` writes its segments: FFmpeg's pattern for
/// `STEM-N.ts` beside it (see [`is_own_segment`]).
pub fn hls_segment_pattern(playlist: &Path) -> PathBuf {
    let stem = playlist.file_stem().map(|stem| stem.to_string_lossy().into_owned()).unwrap_or_default();
    playlist.with_file_name(format!("{stem}-%d.ts"))
}

/// Whether `name` is `STEM-N.ts`, with N a number: the name of segment N of playlist `STEM.m3u8`.
fn is_own_segment(stem: &str, name: &str) -> bool {
    let number =
        name.strip_suffix(".ts").and_then(|name| name.strip_prefix(stem)).and_then(|rest| rest.strip_prefix('-'));
    number.is_some_and(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
}

/// The folder `path` is in: its parent, or "." for a bare file name.
pub fn folder_of(path: &Path) -> &Path {
    path.parent().filter(|parent| !parent.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// A hidden temporary name in the same directory as `path` (same file system, so rename is atomic),
/// new at each call: two threads writing the same file never share one.
pub fn temp_path_for(path: &Path) -> PathBuf {
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "output".into());
    let extension = path.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    path.with_file_name(format!(".{name}.{}-{call}.partial{extension}", std::process::id()))
}

/// Writes through `write` to a temporary file, then renames it to `path`; removes it on failure.
pub fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "output directory does not exist"),
        ));
    }
    let temp = temp_path_for(path);
    let result = write(&temp).and_then(|()| std::fs::rename(&temp, path).map_err(|e| Error::io(path, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

/// Writes the cache file at `path` through `write`, its folder made first and the file written as
/// [`write_atomically`] writes it. A cache is best effort: a failure is logged, naming `contents`,
/// and costs only recomputing next time.
pub fn write_cache_file(path: &Path, contents: &str, write: impl FnOnce(&Path) -> Result<()>) {
    let folder = folder_of(path);
    let result =
        std::fs::create_dir_all(folder).map_err(|e| Error::io(folder, e)).and_then(|()| write_atomically(path, write));
    if let Err(problem) = result {
        tracing::warn!(path = %path.display(), %problem, "could not cache {contents}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_playlist_moved_over_a_longer_one_takes_its_extra_segments_away_and_nothing_else() {
        let (destination_folder, staging_folder) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (folder, staging) = (destination_folder.path(), staging_folder.path());
        let playlist = |names: &[&str]| {
            let lines: Vec<String> = names.iter().map(|name| format!("#EXTINF:2.0,\n{name}")).collect();
            format!("#EXTM3U\n{}\n#EXT-X-ENDLIST\n", lines.join("\n"))
        };
        let earlier =
            ["out-0.ts", "out-1.ts", "out-2.ts", "out13.ts", "other-0.ts", "song.mp3", "out.ts", "out-1-0.ts"];
        std::fs::write(folder.join("out.m3u8"), playlist(&earlier)).unwrap();
        for name in earlier {
            std::fs::write(folder.join(name), "earlier").unwrap();
        }
        std::fs::write(staging.join("out.m3u8"), playlist(&["out-0.ts", "out-1.ts"])).unwrap();
        for name in ["out-0.ts", "out-1.ts"] {
            std::fs::write(staging.join(name), "new").unwrap();
        }

        move_with_companions(&staging.join("out.m3u8"), &folder.join("out.m3u8")).unwrap();

        let mut left: Vec<String> =
            std::fs::read_dir(folder).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(
            left,
            ["other-0.ts", "out-0.ts", "out-1-0.ts", "out-1.ts", "out.m3u8", "out.ts", "out13.ts", "song.mp3"]
        );
        assert!(lists_only_own_segments(&folder.join("out.m3u8")));
        std::fs::write(folder.join("out.m3u8"), playlist(&["out-0.ts", "song.mp3"])).unwrap();
        assert!(!lists_only_own_segments(&folder.join("out.m3u8")));
        assert!(!lists_only_own_segments(&folder.join("missing.m3u8")));
        assert_eq!(std::fs::read_to_string(folder.join("out-1.ts")).unwrap(), "new");
        assert!(std::fs::read_dir(staging).unwrap().next().is_none(), "everything staged was moved");
    }
}
