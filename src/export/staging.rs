//! All-or-nothing destinations: an export writes into a hidden temporary sibling of its
//! destination, which becomes the destination only when complete ([`Staged::commit`]) and is
//! removed otherwise (on drop), so a failed or interrupted export leaves nothing half-written.
//! Existing files and non-empty folders are never overwritten.

use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Error, Result};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A file or folder being written under a temporary name.
#[derive(Debug)]
pub(crate) struct Staged {
    tmp: PathBuf,
    dest: PathBuf,
    is_dir: bool,
    committed: bool,
}

/// The error for a destination that is already taken.
fn exists_error(dest: &Path) -> Error {
    Error::Msg(format!(
        "{} already exists; refusing to overwrite it (choose another destination or remove it first)",
        dest.display()
    ))
}

/// Fails when `dest` exists, except for an empty folder when `allow_empty_dir`.
pub(crate) fn check_free(dest: &Path, allow_empty_dir: bool) -> Result<()> {
    match std::fs::symlink_metadata(dest) {
        Ok(meta) if allow_empty_dir && meta.is_dir() => {
            let mut entries = std::fs::read_dir(dest).map_err(|e| Error::io(dest, e))?;
            if entries.next().is_none() {
                Ok(())
            } else {
                Err(Error::Msg(format!(
                    "{} already exists and is not empty; refusing to overwrite it (choose another destination or remove it first)",
                    dest.display()
                )))
            }
        }
        Ok(_) => Err(exists_error(dest)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(dest, e)),
    }
}

/// The folder `dest` goes into, created if missing.
fn parent_of(dest: &Path) -> Result<PathBuf> {
    let name = dest.file_name().ok_or_else(|| Error::Msg(format!("{} is not a file or folder name to export to", dest.display())))?;
    if name.is_empty() {
        return Err(Error::Msg(format!("{} is not a file or folder name to export to", dest.display())));
    }
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| unwritable(&parent, e))?;
    Ok(parent)
}

fn unwritable(dir: &Path, e: std::io::Error) -> Error {
    Error::Msg(format!("cannot export into {}: the folder is not writable ({e})", dir.display()))
}

impl Staged {
    fn tmp_name(dest: &Path) -> Result<PathBuf> {
        let parent = parent_of(dest)?;
        let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        Ok(parent.join(format!(".{name}.partial-{}-{n}", std::process::id())))
    }

    /// Starts writing the folder `dest` (which must not exist, or be an empty folder).
    pub(crate) fn dir(dest: &Path) -> Result<Self> {
        check_free(dest, true)?;
        let tmp = Self::tmp_name(dest)?;
        let parent = tmp.parent().map(Path::to_path_buf).unwrap_or_default();
        std::fs::create_dir(&tmp).map_err(|e| unwritable(&parent, e))?;
        Ok(Staged { tmp, dest: dest.to_path_buf(), is_dir: true, committed: false })
    }

    /// Starts writing the file `dest` (which must not exist).
    pub(crate) fn file(dest: &Path) -> Result<Self> {
        check_free(dest, false)?;
        let tmp = Self::tmp_name(dest)?;
        let parent = tmp.parent().map(Path::to_path_buf).unwrap_or_default();
        File::create_new(&tmp).map_err(|e| unwritable(&parent, e))?;
        Ok(Staged { tmp, dest: dest.to_path_buf(), is_dir: false, committed: false })
    }

    /// Where to write now: the temporary folder (for [`Staged::dir`]) or file.
    pub(crate) fn tmp_path(&self) -> &Path {
        &self.tmp
    }

    /// The final destination.
    pub(crate) fn dest(&self) -> &Path {
        &self.dest
    }

    /// Syncs what was written and moves it into place without overwriting anything; returns
    /// its size in bytes.
    pub(crate) fn commit(mut self) -> Result<u64> {
        let bytes = if self.is_dir {
            let mut total = 0;
            for e in std::fs::read_dir(&self.tmp).map_err(|e| Error::io(&self.tmp, e))? {
                let e = e.map_err(|e| Error::io(&self.tmp, e))?;
                total += e.metadata().map_err(|err| Error::io(e.path(), err))?.len();
                readable(&e.path())?;
            }
            sync_dir(&self.tmp);
            check_free(&self.dest, true)?;
            // rename(2) replaces an empty folder and fails on a non-empty one.
            std::fs::rename(&self.tmp, &self.dest).map_err(|e| match e.kind() {
                ErrorKind::DirectoryNotEmpty | ErrorKind::AlreadyExists => exists_error(&self.dest),
                _ => Error::io(&self.dest, e),
            })?;
            total
        } else {
            readable(&self.tmp)?;
            sync_file(&self.tmp)?;
            let total = std::fs::metadata(&self.tmp).map_err(|e| Error::io(&self.tmp, e))?.len();
            // A hard link never replaces an existing file (unlike rename), so a file that
            // appeared meanwhile is not clobbered; where links are unsupported, check + rename.
            match std::fs::hard_link(&self.tmp, &self.dest) {
                Ok(()) => {
                    let _ = std::fs::remove_file(&self.tmp);
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => return Err(exists_error(&self.dest)),
                Err(_) => {
                    check_free(&self.dest, false)?;
                    std::fs::rename(&self.tmp, &self.dest).map_err(|e| Error::io(&self.dest, e))?;
                }
            }
            total
        };
        self.committed = true;
        if let Some(parent) = self.dest.parent() {
            sync_dir(if parent.as_os_str().is_empty() { Path::new(".") } else { parent });
        }
        Ok(bytes)
    }

    /// Removes a committed destination again (when a second file of the same export could not
    /// be committed).
    pub(crate) fn undo(dest: &Path, is_dir: bool) {
        let _ = if is_dir { std::fs::remove_dir_all(dest) } else { std::fs::remove_file(dest) };
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = if self.is_dir { std::fs::remove_dir_all(&self.tmp) } else { std::fs::remove_file(&self.tmp) };
        }
    }
}

/// Makes an exported file readable by everyone (rw-r--r--), as files a user creates are:
/// some writers (safetensors' temporary files, copies of them) create them owner-only.
fn readable(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if path.is_file() {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).map_err(|e| Error::io(path, e))?;
        }
    }
    Ok(())
}

/// fsyncs a written file.
pub(crate) fn sync_file(path: &Path) -> Result<()> {
    File::open(path).and_then(|f| f.sync_all()).map_err(|e| Error::io(path, e))
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_stage_leaves_nothing_and_a_commit_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.bin");
        {
            let s = Staged::file(&dest).unwrap();
            std::fs::write(s.tmp_path(), b"half").unwrap();
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the temporary file is removed");
        let s = Staged::file(&dest).unwrap();
        std::fs::write(s.tmp_path(), b"new").unwrap();
        std::fs::write(&dest, b"appeared meanwhile").unwrap();
        let err = s.commit().unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        assert_eq!(std::fs::read(&dest).unwrap(), b"appeared meanwhile");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "only the existing file is left");

        let folder = dir.path().join("folder");
        std::fs::create_dir(&folder).unwrap();
        let s = Staged::dir(&folder).unwrap();
        std::fs::write(s.tmp_path().join("a.txt"), b"abc").unwrap();
        assert_eq!(s.commit().unwrap(), 3, "an empty folder is replaced");
        assert_eq!(std::fs::read(folder.join("a.txt")).unwrap(), b"abc");
        let err = Staged::dir(&folder).unwrap_err().to_string();
        assert!(err.contains("not empty"), "{err}");
    }
}
