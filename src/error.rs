//! Errors a user can act on. Everything else travels as `anyhow::Error` with context;
//! `main` maps these types to exit codes (input 2, interrupted 130, anything else 1).

use std::path::PathBuf;

/// Bad usage or bad input: exit code 2, checked before any model loads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InputError(pub String);

impl InputError {
    pub fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

/// A problem with the model files: which component, which file, which key.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model folder {path} does not exist{hint}")]
    MissingFolder { path: PathBuf, hint: String },
    #[error("{component}: missing file {path}")]
    MissingFile { component: String, path: PathBuf },
    #[error("{component}: {path}: {message}")]
    BadFile {
        component: String,
        path: PathBuf,
        message: String,
    },
    #[error("{component}: tensor `{key}` not found in {files}")]
    MissingTensor {
        component: String,
        key: String,
        files: String,
    },
    #[error("{component}: tensor `{key}` in {file} has shape {found:?}, but config.json implies {expected:?}")]
    ShapeMismatch {
        component: String,
        key: String,
        file: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{component}: invalid config: {message}")]
    BadConfig { component: String, message: String },
}

impl ModelError {
    pub fn bad_file(component: &str, path: &std::path::Path, message: impl Into<String>) -> Self {
        Self::BadFile {
            component: component.to_string(),
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

/// The user pressed Ctrl-C: exit code 130.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;
