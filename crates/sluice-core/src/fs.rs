//! Small files of state that must survive a crash or power loss.

use std::io::Write;
use std::path::Path;

/// Replaces `path` with `data` atomically and durably: a temporary file beside it, fsync,
/// rename, fsync of the directory (created if missing). After a crash the file holds either
/// the old or the new contents. Errors name the file.
pub fn write_durably(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let named = |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(named)?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(named)?;
    f.write_all(data).map_err(named)?;
    f.sync_all().map_err(named)?;
    std::fs::rename(&tmp, path).map_err(named)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(named)
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_contents_and_creates_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a").join("state.json");
        super::write_durably(&p, b"one").unwrap();
        super::write_durably(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert!(!p.with_extension("tmp").exists());
    }
}
