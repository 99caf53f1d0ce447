//! The patch formats the server accepts for Nodes: JSON merge patch
//! (RFC 7386), Kubernetes' strategic merge patch, and JSON patch (RFC 6902).

use serde_json::{Map, Value};

/// A patch the server cannot apply, split as the real server answers.
#[derive(Debug, thiserror::Error)]
pub(super) enum PatchError {
    /// The body does not parse as the declared format (400 BadRequest).
    #[error("{0}")]
    Malformed(String),
    /// The patch parses but does not apply, e.g. a failed JSON patch `test`
    /// (422 Invalid).
    #[error("{0}")]
    Failed(String),
}

/// The supported `Content-Type`s of a PATCH.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PatchKind {
    Merge,
    Strategic,
    Json,
}

impl PatchKind {
    /// `None` for anything else, server-side apply included.
    pub(super) fn from_content_type(content_type: &str) -> Option<Self> {
        let media = content_type.split(';').next().unwrap_or("").trim();
        match media.to_ascii_lowercase().as_str() {
            "application/merge-patch+json" => Some(Self::Merge),
            "application/strategic-merge-patch+json" => Some(Self::Strategic),
            "application/json-patch+json" => Some(Self::Json),
            _ => None,
        }
    }
}

/// Applies `body`, a patch of `kind`, to the Node `doc`.
pub(super) fn apply(kind: PatchKind, doc: &mut Value, body: &[u8]) -> Result<(), PatchError> {
    match kind {
        PatchKind::Merge => {
            let patch: Value = parse(body)?;
            if !patch.is_object() {
                return Err(PatchError::Malformed("a merge patch must be a JSON object".into()));
            }
            json_patch::merge(doc, &patch);
        }
        PatchKind::Strategic => {
            let Value::Object(patch) = parse(body)? else {
                return Err(PatchError::Malformed(
                    "a strategic merge patch must be a JSON object".into(),
                ));
            };
            let Value::Object(target) = doc else {
                return Err(PatchError::Failed("the stored object is not a map".into()));
            };
            strategic_merge(target, &patch, &mut Vec::new())?;
        }
        PatchKind::Json => {
            let patch: json_patch::Patch = parse(body)?;
            json_patch::patch(doc, &patch.0).map_err(|e| PatchError::Failed(e.to_string()))?;
        }
    }
    Ok(())
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, PatchError> {
    serde_json::from_slice(body).map_err(|e| PatchError::Malformed(format!("error decoding patch: {e}")))
}

/// How a list field of a Node merges, from the `patchStrategy` and
/// `patchMergeKey` tags of the Kubernetes Go types. Lists not named here
/// (taints, images, …) are replaced whole.
enum ListStrategy {
    Replace,
    /// A list of maps, merged item by item on this key.
    MergeByKey(&'static str),
    /// A set of scalars: the patch's values are added.
    MergePrimitive,
}

fn list_strategy(path: &[String]) -> ListStrategy {
    let path: Vec<&str> = path.iter().map(String::as_str).collect();
    match path.as_slice() {
        ["status", "conditions" | "addresses"] => ListStrategy::MergeByKey("type"),
        ["metadata", "ownerReferences"] => ListStrategy::MergeByKey("uid"),
        ["metadata", "finalizers"] | ["spec", "podCIDRs"] => ListStrategy::MergePrimitive,
        _ => ListStrategy::Replace,
    }
}

fn directive(map: &Map<String, Value>) -> Option<&str> {
    map.get("$patch").and_then(Value::as_str)
}

/// Strategic merge of `patch` into `target`, at `path` (map keys from the
/// object's root; list items share their list's path). Supports `null` to
/// delete a field, `$patch: replace|delete`, `$retainKeys` and
/// `$deleteFromPrimitiveList/`; `$setElementOrder/` is accepted and ignored.
fn strategic_merge(
    target: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    path: &mut Vec<String>,
) -> Result<(), PatchError> {
    match directive(patch) {
        None => {}
        Some("replace") => {
            let mut clean = Map::new();
            let rest: Map<String, Value> = patch
                .iter()
                .filter(|(k, _)| *k != "$patch")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            strategic_merge(&mut clean, &rest, path)?;
            *target = clean;
            return Ok(());
        }
        Some(other) => return Err(PatchError::Malformed(format!("unknown patch type: {other:?} in map"))),
    }
    if let Some(keys) = patch.get("$retainKeys") {
        let keys = keys
            .as_array()
            .ok_or_else(|| PatchError::Malformed("$retainKeys must be a list".into()))?;
        target.retain(|k, _| keys.iter().any(|key| key.as_str() == Some(k.as_str())));
    }
    for (key, value) in patch {
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(items)), Value::Array(gone)) = (target.get_mut(field), value) {
                items.retain(|item| !gone.contains(item));
            }
            continue;
        }
        if key.starts_with('$') {
            continue;
        }
        path.push(key.clone());
        match value {
            Value::Null => {
                target.remove(key);
            }
            Value::Object(sub) if directive(sub) == Some("delete") => {
                target.remove(key);
            }
            Value::Object(sub) => match target.get_mut(key) {
                Some(Value::Object(existing)) => strategic_merge(existing, sub, path)?,
                _ => {
                    let mut fresh = Map::new();
                    strategic_merge(&mut fresh, sub, path)?;
                    target.insert(key.clone(), Value::Object(fresh));
                }
            },
            Value::Array(items) => {
                let strategy = list_strategy(path);
                let mut list = match target.remove(key) {
                    Some(Value::Array(existing)) => existing,
                    _ => Vec::new(),
                };
                match strategy {
                    ListStrategy::Replace => list.clone_from(items),
                    ListStrategy::MergeByKey(merge_key) => merge_keyed(&mut list, items, merge_key, path)?,
                    ListStrategy::MergePrimitive => {
                        for item in items {
                            if !list.contains(item) {
                                list.push(item.clone());
                            }
                        }
                    }
                }
                target.insert(key.clone(), Value::Array(list));
            }
            scalar => {
                target.insert(key.clone(), scalar.clone());
            }
        }
        path.pop();
    }
    Ok(())
}

fn merge_keyed(
    list: &mut Vec<Value>,
    patch: &[Value],
    merge_key: &str,
    path: &mut Vec<String>,
) -> Result<(), PatchError> {
    let replace = patch
        .iter()
        .any(|item| item.as_object().and_then(directive) == Some("replace"));
    if replace {
        list.clear();
    }
    for item in patch {
        let Value::Object(item) = item else {
            return Err(PatchError::Malformed(format!(
                "list {} merges on {merge_key:?}, but an item is not a map: {item}",
                path.join(".")
            )));
        };
        if item.len() == 1 && directive(item).is_some() {
            continue;
        }
        let Some(key) = item.get(merge_key) else {
            return Err(PatchError::Malformed(format!(
                "map: {} does not contain declared merge key: {merge_key}",
                Value::Object(item.clone())
            )));
        };
        if directive(item) == Some("delete") {
            list.retain(|existing| existing.get(merge_key) != Some(key));
            continue;
        }
        match list.iter_mut().find(|existing| existing.get(merge_key) == Some(key)) {
            Some(Value::Object(existing)) => strategic_merge(existing, item, path)?,
            _ => {
                let mut fresh = Map::new();
                strategic_merge(&mut fresh, item, path)?;
                list.push(Value::Object(fresh));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn smp(mut doc: Value, patch: Value) -> Value {
        apply(PatchKind::Strategic, &mut doc, patch.to_string().as_bytes()).unwrap();
        doc
    }

    #[test]
    fn conditions_merge_by_type() {
        let doc = json!({"status": {"conditions": [
            {"type": "Ready", "status": "True"},
            {"type": "NetworkUnavailable", "status": "True", "reason": "NoRoute"},
        ]}});
        let out = smp(
            doc,
            json!({"status": {"conditions": [{"type": "NetworkUnavailable", "status": "False", "reason": null}]}}),
        );
        assert_eq!(
            out,
            json!({"status": {"conditions": [
                {"type": "Ready", "status": "True"},
                {"type": "NetworkUnavailable", "status": "False"},
            ]}})
        );
    }

    #[test]
    fn directives() {
        let doc = json!({
            "metadata": {"finalizers": ["a", "b"], "labels": {"x": "1", "y": "2"}},
            "spec": {"taints": [{"key": "k", "effect": "NoSchedule"}], "podCIDRs": ["10.0.0.0/24"]},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.1.1.1"}, {"type": "Hostname", "address": "n"}]},
        });
        let out = smp(
            doc,
            json!({
                "metadata": {"finalizers": ["c"], "$deleteFromPrimitiveList/finalizers": ["a"], "labels": {"$patch": "replace", "z": "3"}},
                "spec": {"taints": [], "podCIDRs": ["fd00::/64"]},
                "status": {"addresses": [{"type": "Hostname", "$patch": "delete"}], "$setElementOrder/addresses": []},
            }),
        );
        assert_eq!(
            out,
            json!({
                "metadata": {"finalizers": ["b", "c"], "labels": {"z": "3"}},
                "spec": {"taints": [], "podCIDRs": ["10.0.0.0/24", "fd00::/64"]},
                "status": {"addresses": [{"type": "InternalIP", "address": "10.1.1.1"}]},
            })
        );
    }

    #[test]
    fn errors_are_split_by_status() {
        let mut doc = json!({"metadata": {}});
        let bad = apply(PatchKind::Json, &mut doc, b"{");
        assert!(matches!(bad, Err(PatchError::Malformed(_))), "{bad:?}");
        let failed = apply(
            PatchKind::Json,
            &mut doc,
            br#"[{"op":"test","path":"/metadata","value":1}]"#,
        );
        assert!(matches!(failed, Err(PatchError::Failed(_))), "{failed:?}");
        let no_key = apply(
            PatchKind::Strategic,
            &mut doc,
            br#"{"status":{"conditions":[{"status":"True"}]}}"#,
        );
        assert!(matches!(no_key, Err(PatchError::Malformed(_))), "{no_key:?}");
    }
}
