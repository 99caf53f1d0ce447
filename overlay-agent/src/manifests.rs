//! Node source: a directory of Kubernetes Node manifests (YAML or JSON).
//!
//! Polled rather than watched with inotify: a scan of a few thousand small
//! files is cheap, works on every filesystem (including ConfigMap mounts,
//! which swap symlinks), and meets the one-second budget.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use k8s_openapi::api::core::v1::Node;

use crate::node::{NodeError, NodeInfo};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("reading nodes directory {dir}: {source}")]
    ReadDir { dir: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: not valid YAML/JSON: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("{path}: kind is {kind:?}, not Node (only Node manifests belong in the nodes directory)")]
    NotANode { path: PathBuf, kind: String },
    #[error("{path}: {source}")]
    Node { path: PathBuf, source: NodeError },
}

/// What a scan found: the nodes that parsed, and the files that did not.
#[derive(Debug, Default)]
pub struct Scan {
    pub nodes: Vec<NodeInfo>,
    pub errors: Vec<ManifestError>,
}

/// A polled manifest directory that notices changes by mtime and size.
pub struct ManifestDir {
    dir: PathBuf,
    fingerprint: BTreeMap<PathBuf, (SystemTime, u64)>,
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), fingerprint: BTreeMap::new() }
    }

    /// Scans the directory when anything in it changed since the last call
    /// (always on the first call); `Ok(None)` means nothing changed.
    pub fn scan_if_changed(&mut self) -> Result<Option<Scan>, ManifestError> {
        let fingerprint = fingerprint(&self.dir)?;
        if !self.fingerprint.is_empty() && fingerprint == self.fingerprint {
            return Ok(None);
        }
        self.fingerprint = fingerprint;
        Ok(Some(scan(&self.dir)?))
    }
}

fn manifest_paths(dir: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let entries = fs::read_dir(dir).map_err(|source| ManifestError::ReadDir { dir: dir.to_owned(), source })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
                && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    paths.sort();
    Ok(paths)
}

fn fingerprint(dir: &Path) -> Result<BTreeMap<PathBuf, (SystemTime, u64)>, ManifestError> {
    Ok(manifest_paths(dir)?
        .into_iter()
        .filter_map(|p| {
            let meta = fs::metadata(&p).ok()?;
            Some((p, (meta.modified().ok()?, meta.len())))
        })
        .collect())
}

/// Reads every manifest; a bad file is reported and skipped.
pub fn scan(dir: &Path) -> Result<Scan, ManifestError> {
    let mut result = Scan::default();
    for path in manifest_paths(dir)? {
        match read_manifest(&path) {
            Ok(node) => result.nodes.push(node),
            Err(err) => result.errors.push(err),
        }
    }
    Ok(result)
}

/// Parses one manifest file into a [`NodeInfo`].
pub fn read_manifest(path: &Path) -> Result<NodeInfo, ManifestError> {
    let text = fs::read_to_string(path).map_err(|source| ManifestError::Read { path: path.to_owned(), source })?;
    // JSON is YAML, so one parser reads both.
    let value: serde_json::Value = serde_norway::from_str(&text)
        .map_err(|e| ManifestError::Parse { path: path.to_owned(), reason: e.to_string() })?;
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
    if kind != "Node" {
        return Err(ManifestError::NotANode { path: path.to_owned(), kind: kind.to_owned() });
    }
    let node: Node = serde_json::from_value(value)
        .map_err(|e| ManifestError::Parse { path: path.to_owned(), reason: e.to_string() })?;
    NodeInfo::from_node(&node).map_err(|source| ManifestError::Node { path: path.to_owned(), source })
}
