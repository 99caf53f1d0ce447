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
    #[error("reading nodes directory {dir}")]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not valid YAML/JSON: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("{path}: kind is {kind:?}, not Node (only Node manifests belong in the nodes directory)")]
    NotANode { path: PathBuf, kind: String },
    #[error("{path}")]
    Node {
        path: PathBuf,
        #[source]
        source: NodeError,
    },
    /// A manifest that described a node stopped parsing: the node keeps
    /// the state it last parsed to (a typo must not cut a peer off).
    #[error("{}; keeping the last good state of node {node:?} until the file parses again", crate::report::Chain(error.as_ref()))]
    KeptLastGood { node: String, error: Box<ManifestError> },
    #[error("node {name:?} is defined by more than one manifest ({}); none of them is used until only one remains", paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    DuplicateName { name: String, paths: Vec<PathBuf> },
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
    /// What each file last parsed to, kept while it does not parse.
    last_good: BTreeMap<PathBuf, NodeInfo>,
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), fingerprint: BTreeMap::new(), last_good: BTreeMap::new() }
    }

    /// Scans the directory when anything in it changed since the last call
    /// (always on the first call); `Ok(None)` means nothing changed.
    pub fn scan_if_changed(&mut self) -> Result<Option<Scan>, ManifestError> {
        let fingerprint = fingerprint(&self.dir)?;
        if !self.fingerprint.is_empty() && fingerprint == self.fingerprint {
            return Ok(None);
        }
        self.fingerprint = fingerprint;
        Ok(Some(assemble(read_all(&self.dir)?, Some(&mut self.last_good))))
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

/// Reads every manifest; a bad file is reported and skipped, and so are
/// nodes defined by more than one file.
pub fn scan(dir: &Path) -> Result<Scan, ManifestError> {
    Ok(assemble(read_all(dir)?, None))
}

/// Each manifest file and what it parsed to.
type Files = Vec<(PathBuf, Result<NodeInfo, ManifestError>)>;

fn read_all(dir: &Path) -> Result<Files, ManifestError> {
    Ok(manifest_paths(dir)?.into_iter().map(|path| {
        let node = read_manifest(&path);
        (path, node)
    }).collect())
}

/// The nodes of one scan. With `last_good`, a file that stops parsing
/// keeps the node it last parsed to.
fn assemble(files: Files, mut last_good: Option<&mut BTreeMap<PathBuf, NodeInfo>>) -> Scan {
    let mut result = Scan::default();
    let mut by_name: BTreeMap<String, Vec<(PathBuf, NodeInfo)>> = BTreeMap::new();
    if let Some(last_good) = last_good.as_deref_mut() {
        last_good.retain(|path, _| files.iter().any(|(p, _)| p == path));
    }
    for (path, node) in files {
        let node = match (node, last_good.as_deref_mut()) {
            (Ok(node), Some(last_good)) => {
                last_good.insert(path.clone(), node.clone());
                node
            }
            (Ok(node), None) => node,
            (Err(error), Some(last_good)) if last_good.contains_key(&path) => {
                let node = last_good[&path].clone();
                result.errors.push(ManifestError::KeptLastGood { node: node.name.clone(), error: Box::new(error) });
                node
            }
            (Err(error), _) => {
                result.errors.push(error);
                continue;
            }
        };
        by_name.entry(node.name.clone()).or_default().push((path, node));
    }
    for (name, mut defined) in by_name {
        if defined.len() == 1 {
            result.nodes.extend(defined.pop().map(|(_, node)| node));
        } else {
            result.errors.push(ManifestError::DuplicateName { name, paths: defined.into_iter().map(|(p, _)| p).collect() });
        }
    }
    result
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_are_reported_by_name_and_skipped() {
        let dir = std::env::temp_dir().join(format!("overlay-manifests-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let good = "apiVersion: v1\nkind: Node\nmetadata: {name: a}\nspec: {podCIDR: 10.244.1.0/24}\nstatus: {addresses: [{type: InternalIP, address: 192.168.0.1}]}\n";
        fs::write(dir.join("a.yaml"), good).unwrap();
        fs::write(dir.join("b.json"), r#"{"kind":"Node","metadata":{"name":"b"},"spec":{"podCIDR":"10.244.2.0/24"},"status":{"addresses":[{"type":"InternalIP","address":"192.168.0.2"}]}}"#).unwrap();
        fs::write(dir.join("cm.yaml"), "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n").unwrap();
        fs::write(dir.join("broken.yaml"), "kind: Node\nmetadata: [unclosed\n").unwrap();
        fs::write(dir.join("noaddr.yaml"), "kind: Node\nmetadata: {name: c}\nspec: {podCIDR: 10.244.3.0/24}\n").unwrap();
        fs::write(dir.join("README.md"), "not a manifest").unwrap();

        let scan = scan(&dir).unwrap();
        let names: Vec<_> = scan.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        let errors: Vec<String> = scan.errors.iter().map(|e| crate::report::Chain(e).to_string()).collect();
        assert_eq!(errors.len(), 3, "{errors:#?}");
        assert!(errors.iter().any(|e| e.contains("broken.yaml") && e.contains("not valid YAML")), "{errors:#?}");
        assert!(errors.iter().any(|e| e.contains("cm.yaml") && e.contains("not Node")), "{errors:#?}");
        assert!(errors.iter().any(|e| e.contains("noaddr.yaml") && e.contains("InternalIP")), "{errors:#?}");

        let mut watched = ManifestDir::new(&dir);
        assert!(watched.scan_if_changed().unwrap().is_some(), "first scan always reports");
        assert!(watched.scan_if_changed().unwrap().is_none(), "nothing changed");
        fs::remove_file(dir.join("b.json")).unwrap();
        let rescan = watched.scan_if_changed().unwrap().expect("removal noticed");
        assert_eq!(rescan.nodes.len(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    fn node_yaml(name: &str, cidr: &str, ip: &str) -> String {
        format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nspec: {{podCIDR: {cidr}}}\nstatus: {{addresses: [{{type: InternalIP, address: {ip}}}]}}\n")
    }

    #[test]
    fn a_manifest_that_stops_parsing_keeps_its_nodes_last_good_state() {
        let dir = std::env::temp_dir().join(format!("overlay-manifests-typo-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("a.yaml"), node_yaml("a", "10.244.1.0/24", "192.168.0.1")).unwrap();
        fs::write(dir.join("b.yaml"), node_yaml("b", "10.244.2.0/24", "192.168.0.2")).unwrap();
        let mut watched = ManifestDir::new(&dir);
        assert_eq!(watched.scan_if_changed().unwrap().unwrap().nodes.len(), 2);
        // A typo while editing b.yaml.
        fs::write(dir.join("b.yaml"), "kind: Node\nmetadata: [unclosed\n").unwrap();
        let scan = watched.scan_if_changed().unwrap().expect("change noticed");
        let names: Vec<_> = scan.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a", "b"], "b must keep its last good state");
        let errors: Vec<String> = scan.errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("b.yaml") && errors[0].contains("last good state of node \"b\""), "{errors:?}");
        // Fixed: the new content counts.
        fs::write(dir.join("b.yaml"), node_yaml("b", "10.244.3.0/24", "192.168.0.2")).unwrap();
        let scan = watched.scan_if_changed().unwrap().unwrap();
        assert!(scan.errors.is_empty());
        assert_eq!(scan.nodes[1].pod_cidr.to_string(), "10.244.3.0/24");
        // Removed: the node goes.
        fs::remove_file(dir.join("b.yaml")).unwrap();
        assert_eq!(watched.scan_if_changed().unwrap().unwrap().nodes.len(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn duplicate_node_names_are_rejected_naming_both_files() {
        let dir = std::env::temp_dir().join(format!("overlay-manifests-dup-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("a.yaml"), node_yaml("a", "10.244.1.0/24", "192.168.0.1")).unwrap();
        fs::write(dir.join("b.yaml"), node_yaml("b", "10.244.2.0/24", "192.168.0.2")).unwrap();
        fs::write(dir.join("b-copy.yaml"), node_yaml("b", "10.244.9.0/24", "192.168.0.9")).unwrap();
        let scan = scan(&dir).unwrap();
        let names: Vec<_> = scan.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a"], "neither copy of b may be programmed");
        let errors: Vec<String> = scan.errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("b-copy.yaml") && errors[0].contains("b.yaml") && errors[0].contains("\"b\""), "{errors:?}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
