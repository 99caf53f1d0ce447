//! The Node store: current objects, the change history that watches replay
//! and consistent list pages are rebuilt from, and resourceVersion
//! bookkeeping.

use std::{
    borrow::Cow,
    collections::{BTreeMap, VecDeque},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{Map, Value};

/// The first resourceVersion handed out. Not 1, so that a client that
/// confuses "0" (any version) with a real version is caught.
const FIRST_RV: u64 = 1000;

/// What a change did, named as its watch event type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

/// One committed change, kept until the next compaction.
#[derive(Clone, Debug)]
pub(super) struct Change {
    pub(super) rv: u64,
    pub(super) kind: ChangeKind,
    pub(super) name: String,
    /// The object after the change; for a deletion, its last state stamped
    /// with the deletion's resourceVersion, as the real server sends it.
    pub(super) object: Arc<Value>,
    /// The object before the change; `None` for an addition.
    pub(super) previous: Option<Arc<Value>>,
}

/// Why a resourceVersion cannot be served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RvError {
    /// Older than the oldest retained history (`floor`).
    TooOld { floor: u64 },
    /// Newer than anything committed.
    TooLarge { current: u64 },
}

/// Objects are kept as list items are served: without `kind`/`apiVersion`.
pub(super) struct Store {
    objects: BTreeMap<String, Arc<Value>>,
    rv: u64,
    /// The oldest resourceVersion a watch can resume from or a list page can
    /// be rebuilt at: every change after it is in `history`.
    floor: u64,
    history: VecDeque<Change>,
    uid_seed: u64,
    uids: u64,
}

impl Store {
    pub(super) fn new() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self {
            objects: BTreeMap::new(),
            rv: FIRST_RV,
            floor: FIRST_RV,
            history: VecDeque::new(),
            uid_seed: nanos ^ u64::from(std::process::id()).rotate_left(32),
            uids: 0,
        }
    }

    pub(super) fn rv(&self) -> u64 {
        self.rv
    }

    pub(super) fn floor(&self) -> u64 {
        self.floor
    }

    pub(super) fn objects(&self) -> &BTreeMap<String, Arc<Value>> {
        &self.objects
    }

    pub(super) fn get(&self, name: &str) -> Option<&Arc<Value>> {
        self.objects.get(name)
    }

    /// Creates or replaces `name`. The server owns `uid`,
    /// `creationTimestamp` and `resourceVersion` (kept across replacements);
    /// `kind`/`apiVersion` are dropped. Returns `None` when the result equals
    /// the stored object: like the real server, a no-op write neither bumps
    /// the resourceVersion nor emits an event.
    pub(super) fn put(&mut self, name: &str, mut object: Value) -> Option<Arc<Value>> {
        let previous = self.objects.get(name).cloned();
        let map = object.as_object_mut().expect("callers pass objects");
        map.remove("kind");
        map.remove("apiVersion");
        let meta = map.entry("metadata").or_insert_with(|| Value::Object(Map::new()));
        if !meta.is_object() {
            *meta = Value::Object(Map::new());
        }
        let meta = meta.as_object_mut().expect("made an object above");
        meta.insert("name".into(), name.into());
        let kept = |field: &str| previous.as_ref().and_then(|p| p["metadata"].get(field)).cloned();
        let uid = kept("uid").unwrap_or_else(|| self.next_uid().into());
        let created = kept("creationTimestamp").unwrap_or_else(|| now_rfc3339().into());
        meta.insert("uid".into(), uid);
        meta.insert("creationTimestamp".into(), created);
        match &previous {
            Some(p) => {
                meta.insert("resourceVersion".into(), p["metadata"]["resourceVersion"].clone());
                if **p == object {
                    return None;
                }
            }
            None => {
                meta.remove("resourceVersion");
            }
        }
        self.rv += 1;
        object["metadata"]["resourceVersion"] = self.rv.to_string().into();
        let object = Arc::new(object);
        self.objects.insert(name.to_owned(), Arc::clone(&object));
        self.history.push_back(Change {
            rv: self.rv,
            kind: if previous.is_some() {
                ChangeKind::Modified
            } else {
                ChangeKind::Added
            },
            name: name.to_owned(),
            object: Arc::clone(&object),
            previous,
        });
        Some(object)
    }

    /// Deletes `name`, returning its last state stamped with the deletion's
    /// resourceVersion.
    pub(super) fn remove(&mut self, name: &str) -> Option<Arc<Value>> {
        let previous = self.objects.remove(name)?;
        self.rv += 1;
        let mut last = (*previous).clone();
        last["metadata"]["resourceVersion"] = self.rv.to_string().into();
        let last = Arc::new(last);
        self.history.push_back(Change {
            rv: self.rv,
            kind: ChangeKind::Deleted,
            name: name.to_owned(),
            object: Arc::clone(&last),
            previous: Some(previous),
        });
        Some(last)
    }

    /// Forgets all history. The resourceVersion moves on by one, as writes
    /// to other resources move the real server's shared counter, so that
    /// every resourceVersion handed out so far, including the newest one,
    /// is now too old to watch from: any client must relist.
    pub(super) fn compact(&mut self) {
        self.rv += 1;
        self.floor = self.rv;
        self.history.clear();
    }

    /// The changes after `rv`, oldest first.
    pub(super) fn changes_after(&self, rv: u64) -> Result<Vec<Change>, RvError> {
        self.check(rv)?;
        let first = self.history.partition_point(|c| c.rv <= rv);
        Ok(self.history.range(first..).cloned().collect())
    }

    /// The objects as they were at `rv`, rebuilt by undoing later changes.
    pub(super) fn snapshot(&self, rv: u64) -> Result<Cow<'_, BTreeMap<String, Arc<Value>>>, RvError> {
        self.check(rv)?;
        if rv == self.rv {
            return Ok(Cow::Borrowed(&self.objects));
        }
        let mut objects = self.objects.clone();
        for change in self.history.iter().rev().take_while(|c| c.rv > rv) {
            match &change.previous {
                Some(previous) => objects.insert(change.name.clone(), Arc::clone(previous)),
                None => objects.remove(&change.name),
            };
        }
        Ok(Cow::Owned(objects))
    }

    fn check(&self, rv: u64) -> Result<(), RvError> {
        if rv < self.floor {
            Err(RvError::TooOld { floor: self.floor })
        } else if rv > self.rv {
            Err(RvError::TooLarge { current: self.rv })
        } else {
            Ok(())
        }
    }

    /// A random-looking version 4 UUID, unique within this store.
    fn next_uid(&mut self) -> String {
        self.uids += 1;
        let hi = splitmix64(self.uid_seed ^ self.uids);
        let lo = splitmix64(hi ^ self.uids.rotate_left(17));
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            hi >> 32,
            (hi >> 16) & 0xffff,
            hi & 0xfff,
            0x8000 | ((lo >> 48) & 0x3fff),
            lo & 0xffff_ffff_ffff
        )
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The current time as Kubernetes writes timestamps (RFC 3339, UTC, whole
/// seconds).
pub(super) fn now_rfc3339() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm), so
    // the tests need no date crate.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn snapshot_undoes_later_changes() {
        let mut store = Store::new();
        store.put("a", json!({"spec": {"podCIDR": "10.0.0.0/24"}}));
        store.put("b", json!({}));
        let at = store.rv();
        store.put("a", json!({"spec": {"podCIDR": "10.0.1.0/24"}}));
        store.remove("b");
        store.put("c", json!({}));
        let snapshot = store.snapshot(at).unwrap();
        assert_eq!(snapshot.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(snapshot["a"]["spec"]["podCIDR"], "10.0.0.0/24");
        assert_eq!(snapshot["a"]["metadata"]["resourceVersion"], (FIRST_RV + 1).to_string());
    }

    #[test]
    fn no_op_put_keeps_the_version() {
        let mut store = Store::new();
        let first = store.put("a", json!({"kind": "Node", "spec": {}})).unwrap();
        assert!(store.put("a", json!({"spec": {}})).is_none());
        assert_eq!(store.get("a").unwrap(), &first);
        assert_eq!(store.rv(), FIRST_RV + 1);
    }

    #[test]
    fn compaction_expires_every_handed_out_version() {
        let mut store = Store::new();
        store.put("a", json!({}));
        let rv = store.rv();
        store.compact();
        assert_eq!(store.changes_after(rv).unwrap_err(), RvError::TooOld { floor: rv + 1 });
        assert!(store.changes_after(rv + 1).unwrap().is_empty());
    }

    #[test]
    fn timestamp_format() {
        let ts = now_rfc3339();
        assert_eq!(ts.len(), 20, "{ts}");
        assert!(ts.starts_with("20") && ts.ends_with('Z'), "{ts}");
    }
}
