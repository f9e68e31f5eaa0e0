//! The library's error type. Every variant that concerns a file names it.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The OS error is part of the message, not a separate cause, so that a chain
    /// printer (anyhow's `{:#}`) does not say it twice.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    /// The file exists but its content is not what its format requires.
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A pickle tried to use something outside the allowed torch set.
    #[error("{path}: refused pickle global `{global}`: only torch tensor-rebuild globals are allowed, nothing in this file is executed")]
    UnsafePickle { path: PathBuf, global: String },
    #[error("{path}: {msg}")]
    Architecture { path: PathBuf, msg: String },
    #[error("{0}")]
    Invalid(String),
    #[error("ggml: {0}")]
    Ggml(String),
    /// A run cannot fit the memory budget it was given (found before any work).
    #[error("{0}")]
    OverBudget(String),
    #[error("interrupted")]
    Interrupted,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err: source,
        }
    }
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn arch(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Architecture {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
