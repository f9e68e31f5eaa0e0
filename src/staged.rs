//! Output files that appear whole or not at all: written to a hidden temporary file
//! beside the target, synced, then renamed over it (converted models, images,
//! synthetic checkpoints).
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The OS error inside one of `tempfile`'s, which would name the hidden staging file
/// rather than the target the user asked for.
fn os_error(e: std::io::Error) -> std::io::Error {
    let code = e
        .get_ref()
        .and_then(|r| r.source())
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .and_then(std::io::Error::raw_os_error);
    code.map_or(e, std::io::Error::from_raw_os_error)
}

/// Where an output is staged: a hidden temporary file beside the target, so the
/// final rename is atomic and never crosses file systems.
pub struct Staged {
    tmp: tempfile::NamedTempFile,
    target: PathBuf,
    force: bool,
}

impl Staged {
    pub fn new(target: &Path, force: bool) -> Result<Staged> {
        if target.exists() && !force {
            return Err(Error::Invalid(format!(
                "{}: output exists (use --force to overwrite)",
                target.display()
            )));
        }
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".tmp")
            .tempfile_in(&dir)
            .map_err(|e| Error::io(target, os_error(e)))?;
        Ok(Staged {
            tmp,
            target: target.to_path_buf(),
            force,
        })
    }
    pub fn file(&self) -> &File {
        self.tmp.as_file()
    }
    /// Syncs and renames into place. Dropping a `Staged` without committing removes it.
    pub fn commit(self) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        // Temporary files are created private (0600); the result is an ordinary file.
        let perm = std::fs::Permissions::from_mode(0o644);
        self.tmp
            .as_file()
            .set_permissions(perm)
            .map_err(|e| Error::io(&self.target, e))?;
        self.tmp
            .as_file()
            .sync_all()
            .map_err(|e| Error::io(&self.target, e))?;
        let r = if self.force {
            self.tmp.persist(&self.target).map(|_| ())
        } else {
            self.tmp.persist_noclobber(&self.target).map(|_| ())
        };
        r.map_err(|e| Error::io(&self.target, e.error))
    }
}
