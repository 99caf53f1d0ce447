//! The HTTP side: routing, and the Node endpoints answered as the real
//! server answers them (bodies, status codes, `Status` errors, watch
//! framing).

use std::{convert::Infallible, io, ops::Bound, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::{Frame, Incoming},
    header,
};
use serde_json::{Value, json};
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};

use super::{
    RequestRecord, Shared, lock,
    patch::{self, PatchError, PatchKind},
    store::{Change, ChangeKind, RvError},
};

/// Response bodies: whole JSON documents, or a watch's event stream.
pub(super) type Body = UnsyncBoxBody<Bytes, io::Error>;

/// The real server picks a random timeout between 30 and 60 minutes when
/// the client sets none.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// An error answered with a `Status` object, as the real server formats it,
/// so that kube surfaces it as `kube::Error::Api` with the same code and
/// reason.
#[derive(Debug, thiserror::Error)]
pub(super) enum ApiError {
    #[error("nodes \"{0}\" not found")]
    NotFound(String),
    #[error("nodes \"{0}\" already exists")]
    AlreadyExists(String),
    #[error(
        "Operation cannot be fulfilled on nodes \"{0}\": the object has been modified; please apply your changes to the latest version and try again"
    )]
    Conflict(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Invalid(String),
    #[error(
        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json"
    )]
    UnsupportedMediaType,
    #[error("{0}")]
    Expired(String),
    #[error("Too large resource version: {requested}, current: {current}")]
    TooLargeResourceVersion { requested: u64, current: u64 },
    #[error("the server does not allow this method on the requested resource")]
    MethodNotAllowed,
    #[error("the server could not find the requested resource")]
    UnknownPath,
}

impl ApiError {
    fn code(&self) -> u16 {
        match self {
            Self::NotFound(_) | Self::UnknownPath => 404,
            Self::AlreadyExists(_) | Self::Conflict(_) => 409,
            Self::BadRequest(_) => 400,
            Self::Invalid(_) => 422,
            Self::UnsupportedMediaType => 415,
            Self::Expired(_) => 410,
            Self::TooLargeResourceVersion { .. } => 504,
            Self::MethodNotAllowed => 405,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::NotFound(_) | Self::UnknownPath => "NotFound",
            Self::AlreadyExists(_) => "AlreadyExists",
            Self::Conflict(_) => "Conflict",
            Self::BadRequest(_) => "BadRequest",
            Self::Invalid(_) => "Invalid",
            Self::UnsupportedMediaType => "UnsupportedMediaType",
            Self::Expired(_) => "Expired",
            Self::TooLargeResourceVersion { .. } => "Timeout",
            Self::MethodNotAllowed => "MethodNotAllowed",
        }
    }

    /// The `Status` object.
    fn status(&self) -> Value {
        let details = match self {
            Self::NotFound(name) | Self::AlreadyExists(name) | Self::Conflict(name) => {
                Some(json!({"name": name, "kind": "nodes"}))
            }
            Self::TooLargeResourceVersion { .. } => Some(json!({
                "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                "retryAfterSeconds": 1,
            })),
            _ => None,
        };
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
            "code": self.code(),
        });
        if let Some(details) = details {
            status["details"] = details;
        }
        status
    }

    fn response(&self) -> Response<Body> {
        json_response(
            StatusCode::from_u16(self.code()).expect("valid status codes"),
            &self.status(),
        )
    }
}

impl From<PatchError> for ApiError {
    fn from(e: PatchError) -> Self {
        match e {
            PatchError::Malformed(m) => Self::BadRequest(m),
            PatchError::Failed(m) => Self::Invalid(m),
        }
    }
}

/// Serves one request, logging it first.
pub(super) async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let record = RequestRecord {
        method: req.method().as_str().to_owned(),
        path: req.uri().path().to_owned(),
        query: req.uri().query().unwrap_or_default().to_owned(),
    };
    lock(&shared.requests).push(record.clone());
    Ok(route(&shared, req, &record).await.unwrap_or_else(|e| e.response()))
}

/// Which part of a Node a write goes to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    /// `/api/v1/nodes/{name}`: everything but `status`.
    Main,
    /// `/api/v1/nodes/{name}/status`: only `status`.
    Status,
}

async fn route(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    record: &RequestRecord,
) -> Result<Response<Body>, ApiError> {
    let query = Query::parse(&record.query);
    let segments: Vec<&str> = record.path.split('/').filter(|s| !s.is_empty()).collect();
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let ok = |value: Value| Ok(json_response(StatusCode::OK, &value));
    match (record.method.as_str(), segments.as_slice()) {
        ("GET", ["version"]) => ok(json!({
            "major": "1",
            "minor": "33",
            "gitVersion": "v1.33.0",
            "gitCommit": "0000000000000000000000000000000000000000",
            "gitTreeState": "clean",
            "buildDate": "2025-04-23T00:00:00Z",
            "goVersion": "go1.24.2",
            "compiler": "gc",
            "platform": "linux/amd64",
        })),
        ("GET", ["api"]) => ok(json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": shared.addr.to_string()}],
        })),
        ("GET", ["apis"]) => ok(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []})),
        ("GET", ["api", "v1"]) => ok(json!({
            "kind": "APIResourceList",
            "groupVersion": "v1",
            "resources": [
                {"name": "nodes", "singularName": "node", "namespaced": false, "kind": "Node",
                 "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"], "shortNames": ["no"]},
                {"name": "nodes/status", "singularName": "", "namespaced": false, "kind": "Node",
                 "verbs": ["get", "patch", "update"]},
            ],
        })),
        ("GET", ["api", "v1", "nodes"]) => {
            if query.flag("watch") {
                watch(shared, &query)
            } else {
                list(shared, &query)
            }
        }
        ("POST", ["api", "v1", "nodes"]) => create(shared, &read_body(req).await?),
        ("GET", ["api", "v1", "nodes", name] | ["api", "v1", "nodes", name, "status"]) => {
            let store = lock(&shared.store);
            let node = store.get(name).ok_or_else(|| ApiError::NotFound((*name).to_owned()))?;
            ok(with_type_meta(node))
        }
        ("PUT", ["api", "v1", "nodes", name]) => replace(shared, name, Part::Main, &read_body(req).await?),
        ("PUT", ["api", "v1", "nodes", name, "status"]) => replace(shared, name, Part::Status, &read_body(req).await?),
        ("PATCH", ["api", "v1", "nodes", name]) => {
            patch(shared, name, Part::Main, &content_type, &read_body(req).await?)
        }
        ("PATCH", ["api", "v1", "nodes", name, "status"]) => {
            patch(shared, name, Part::Status, &content_type, &read_body(req).await?)
        }
        ("DELETE", ["api", "v1", "nodes", name]) => {
            let gone = shared
                .write(|store| store.remove(name))
                .ok_or_else(|| ApiError::NotFound((*name).to_owned()))?;
            ok(json!({
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": {"name": name, "kind": "nodes", "uid": gone["metadata"]["uid"]},
            }))
        }
        (_, ["api", "v1", "nodes", ..]) => Err(ApiError::MethodNotAllowed),
        // Events are only recorded, for tests to read: kube's Recorder
        // posts a new one, then patches its series on repeats.
        ("POST", ["apis", "events.k8s.io", "v1", "namespaces", namespace, "events"]) => {
            let mut event: Value = serde_json::from_slice(&read_body(req).await?)
                .map_err(|e| ApiError::BadRequest(format!("event is not JSON: {e}")))?;
            let mut events = lock(&shared.events);
            if event["metadata"]["name"].is_null() {
                let prefix = event["metadata"]["generateName"].as_str().unwrap_or("event.").to_owned();
                event["metadata"]["name"] = json!(format!("{prefix}{}", events.len()));
            }
            event["metadata"]["namespace"] = json!(namespace);
            events.push(event.clone());
            Ok(json_response(StatusCode::CREATED, &event))
        }
        ("PATCH", ["apis", "events.k8s.io", "v1", "namespaces", _, "events", name]) => {
            let patch: Value = serde_json::from_slice(&read_body(req).await?)
                .map_err(|e| ApiError::BadRequest(format!("patch is not JSON: {e}")))?;
            let mut events = lock(&shared.events);
            let event = events
                .iter_mut()
                .find(|e| e["metadata"]["name"] == *name)
                .ok_or_else(|| ApiError::NotFound((*name).to_owned()))?;
            json_patch::merge(event, &patch);
            ok(event.clone())
        }
        _ => Err(ApiError::UnknownPath),
    }
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    Ok(req
        .into_body()
        .collect()
        .await
        .map_err(|e| ApiError::BadRequest(format!("reading the request body: {e}")))?
        .to_bytes())
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    bytes_response(status, serde_json::to_vec(value).expect("serializing JSON values"))
}

fn bytes_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(UnsyncBoxBody::new(
            Full::new(Bytes::from(body)).map_err(|never| match never {}),
        ))
        .expect("static response parts are valid")
}

/// A stored Node as served alone (get, patch, watch events): stored
/// objects lack `kind`/`apiVersion`, like the items of a list.
pub(super) fn with_type_meta(object: &Value) -> Value {
    let mut object = object.clone();
    if let Some(map) = object.as_object_mut() {
        map.insert("kind".into(), "Node".into());
        map.insert("apiVersion".into(), "v1".into());
    }
    object
}

fn list(shared: &Shared, query: &Query) -> Result<Response<Body>, ApiError> {
    let selector = Selector::from_query(query)?;
    let limit = match query.get("limit") {
        Some(l) => Some(parse_u64(l, "limit")?).filter(|&l| l > 0),
        None => None,
    };
    let rv = query.get("resourceVersion").filter(|s| !s.is_empty());
    let rv_match = query.get("resourceVersionMatch").filter(|s| !s.is_empty());
    let resume = query.get("continue").filter(|s| !s.is_empty());
    if rv_match.is_some() && rv.is_none() {
        return Err(ApiError::BadRequest(
            "resourceVersionMatch is forbidden unless resourceVersion is provided".into(),
        ));
    }
    let store = lock(&shared.store);
    let (at, after) = match resume {
        Some(token) => {
            if rv.is_some() || rv_match.is_some() {
                return Err(ApiError::BadRequest(
                    "specifying resource version is not allowed when using continue".into(),
                ));
            }
            let (at, after) = token
                .split_once('/')
                .and_then(|(at, after)| Some((at.parse::<u64>().ok()?, after)))
                .ok_or_else(|| ApiError::BadRequest("continue key is not valid".into()))?;
            (at, Some(after))
        }
        None => match (rv, rv_match) {
            (None | Some("0"), _) => (store.rv(), None),
            (Some(rv), Some("Exact")) => (parse_u64(rv, "resourceVersion")?, None),
            (Some(rv), None | Some("NotOlderThan")) => {
                let rv = parse_u64(rv, "resourceVersion")?;
                if rv > store.rv() {
                    return Err(ApiError::TooLargeResourceVersion {
                        requested: rv,
                        current: store.rv(),
                    });
                }
                (store.rv(), None)
            }
            (Some(_), Some(other)) => {
                return Err(ApiError::BadRequest(format!(
                    "unsupported resourceVersionMatch: {other}"
                )));
            }
        },
    };
    let snapshot = store.snapshot(at).map_err(|e| match (e, resume) {
        (RvError::TooOld { .. }, Some(_)) => ApiError::Expired(
            "The provided continue parameter is too old to display a consistent list result. \
             You can start a new list without the continue parameter."
                .into(),
        ),
        (RvError::TooOld { floor }, None) => ApiError::Expired(format!("too old resource version: {at} ({floor})")),
        (RvError::TooLarge { current }, _) => ApiError::TooLargeResourceVersion { requested: at, current },
    })?;
    let start = after.map_or(Bound::Unbounded, Bound::Excluded);
    let mut items = Vec::new();
    let mut last = None;
    let mut remaining = 0_u64;
    for (name, node) in snapshot.range::<str, _>((start, Bound::Unbounded)) {
        if !selector.matches(node) {
            continue;
        }
        if limit.is_some_and(|limit| items.len() as u64 >= limit) {
            remaining += 1;
            continue;
        }
        items.push(Arc::clone(node));
        last = Some(name.as_str());
    }
    let mut metadata = json!({"resourceVersion": at.to_string()});
    if remaining > 0 {
        metadata["continue"] = format!("{at}/{}", last.unwrap_or_default()).into();
        // Like the real server, the count is only given when it is exact.
        if selector.is_empty() {
            metadata["remainingItemCount"] = remaining.into();
        }
    }
    drop(snapshot);
    drop(store);
    let mut body = Vec::with_capacity(256 + items.len() * 512);
    body.extend_from_slice(br#"{"kind":"NodeList","apiVersion":"v1","metadata":"#);
    serde_json::to_writer(&mut body, &metadata).expect("serializing JSON values");
    body.extend_from_slice(br#","items":["#);
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        serde_json::to_writer(&mut body, &**item).expect("serializing JSON values");
    }
    body.extend_from_slice(b"]}");
    Ok(bytes_response(StatusCode::OK, body))
}

fn create(shared: &Shared, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let node: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("decoding the body: {e}")))?;
    let name = node["metadata"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::Invalid("Node is invalid: metadata.name: Required value: name is required".into()))?
        .to_owned();
    if node["metadata"]["resourceVersion"]
        .as_str()
        .is_some_and(|rv| !rv.is_empty())
    {
        return Err(ApiError::BadRequest(
            "resourceVersion should not be set on objects to be created".into(),
        ));
    }
    let stored = shared.write(|store| {
        if store.get(&name).is_some() {
            return Err(ApiError::AlreadyExists(name.clone()));
        }
        Ok(store.put(&name, node).expect("a new object is a change"))
    })?;
    Ok(json_response(StatusCode::CREATED, &with_type_meta(&stored)))
}

fn replace(shared: &Shared, name: &str, part: Part, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let proposed: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("decoding the body: {e}")))?;
    write_node(shared, name, part, |_| Ok(proposed))
}

fn patch(shared: &Shared, name: &str, part: Part, content_type: &str, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let kind = PatchKind::from_content_type(content_type).ok_or(ApiError::UnsupportedMediaType)?;
    write_node(shared, name, part, |current| {
        // Patches see the object as a client does, `kind` included, so a
        // JSON patch `test` of /kind behaves.
        let mut doc = with_type_meta(current);
        patch::apply(kind, &mut doc, body)?;
        Ok(doc)
    })
}

/// The write path shared by PUT and PATCH: computes the proposed object
/// from the current one, checks it, keeps it to `part`, and commits it
/// unless nothing changed.
fn write_node(
    shared: &Shared,
    name: &str,
    part: Part,
    propose: impl FnOnce(&Value) -> Result<Value, ApiError>,
) -> Result<Response<Body>, ApiError> {
    let stored = shared.write(|store| {
        let current = Arc::clone(store.get(name).ok_or_else(|| ApiError::NotFound(name.to_owned()))?);
        let proposed = propose(&current)?;
        if !proposed.is_object() {
            return Err(ApiError::BadRequest("the object must be a JSON map".into()));
        }
        if let Some(other) = proposed["metadata"]["name"].as_str().filter(|n| *n != name) {
            return Err(ApiError::BadRequest(format!(
                "the name of the object ({other}) does not match the name on the URL ({name})"
            )));
        }
        // Optimistic concurrency: a resourceVersion in the written object
        // is a precondition.
        let expected = &current["metadata"]["resourceVersion"];
        if let Some(rv) = proposed["metadata"]["resourceVersion"]
            .as_str()
            .filter(|rv| !rv.is_empty())
            && expected.as_str() != Some(rv)
        {
            return Err(ApiError::Conflict(name.to_owned()));
        }
        let next = match part {
            Part::Main => with_status_of(proposed, &current),
            // As the real node status strategy: spec stays, metadata
            // (annotations, labels) and status come from the write, which
            // is how flannel publishes its annotations with nothing but
            // nodes/status patch.
            Part::Status => with_labels_and_annotations_of(with_status_of((*current).clone(), &proposed), &proposed),
        };
        Ok(store.put(name, next).unwrap_or(current))
    })?;
    Ok(json_response(StatusCode::OK, &with_type_meta(&stored)))
}

/// `object` with its `metadata.labels` and `metadata.annotations` taken
/// from `source`.
fn with_labels_and_annotations_of(mut object: Value, source: &Value) -> Value {
    for field in ["labels", "annotations"] {
        let metadata = object["metadata"].as_object_mut().expect("a Node has metadata");
        match source["metadata"].get(field) {
            Some(value) => metadata.insert(field.into(), value.clone()),
            None => metadata.remove(field),
        };
    }
    object
}

/// `object` with its `status` taken from `source`.
fn with_status_of(mut object: Value, source: &Value) -> Value {
    let map = object.as_object_mut().expect("checked to be an object");
    match source.get("status") {
        Some(status) => map.insert("status".into(), status.clone()),
        None => map.remove("status"),
    };
    object
}

fn watch(shared: &Arc<Shared>, query: &Query) -> Result<Response<Body>, ApiError> {
    let selector = Selector::from_query(query)?;
    let bookmarks = query.flag("allowWatchBookmarks");
    let send_initial = query.flag("sendInitialEvents");
    let timeout = match query.get("timeoutSeconds") {
        Some(t) => Duration::from_secs(parse_u64(t, "timeoutSeconds")?),
        None => DEFAULT_WATCH_TIMEOUT,
    };
    if send_initial && (!bookmarks || query.get("resourceVersionMatch") != Some("NotOlderThan")) {
        return Err(ApiError::Invalid(
            "sendInitialEvents requires allowWatchBookmarks=true and resourceVersionMatch=NotOlderThan".into(),
        ));
    }
    let rv = match query.get("resourceVersion").filter(|s| !s.is_empty()) {
        Some(rv) => Some(parse_u64(rv, "resourceVersion")?),
        None => None,
    };
    // Subscribed before reading the store, so no change slips in between.
    let cuts = shared.cuts.subscribe();
    let changes = shared.rv.subscribe();
    let (start, initial) = {
        let store = lock(&shared.store);
        match rv {
            // No version, "0", or a streaming list: the current state as
            // synthetic ADDED events, then what follows.
            _ if send_initial => (store.rv(), matching(store.objects(), &selector)),
            None | Some(0) => (store.rv(), matching(store.objects(), &selector)),
            Some(rv) if rv < store.floor() => {
                let status = ApiError::Expired(format!("too old resource version: {rv} ({})", store.floor()));
                return Ok(bytes_response(StatusCode::OK, error_line(&status)));
            }
            Some(rv) if rv > store.rv() => {
                let status = ApiError::TooLargeResourceVersion {
                    requested: rv,
                    current: store.rv(),
                };
                return Ok(bytes_response(StatusCode::OK, error_line(&status)));
            }
            Some(rv) => (rv, Vec::new()),
        }
    };
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(stream_events(
        Arc::clone(shared),
        WatchPlan {
            position: start,
            initial,
            initial_end: send_initial,
            selector,
            bookmarks,
            deadline: Instant::now() + timeout,
            cuts,
            changes,
        },
        tx,
    ));
    let events = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|frame| (frame, rx)) });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(UnsyncBoxBody::new(StreamBody::new(events)))
        .expect("static response parts are valid"))
}

fn matching(objects: &std::collections::BTreeMap<String, Arc<Value>>, selector: &Selector) -> Vec<Arc<Value>> {
    objects.values().filter(|o| selector.matches(o)).cloned().collect()
}

struct WatchPlan {
    /// The resourceVersion the client has seen everything up to.
    position: u64,
    /// Objects sent as ADDED first.
    initial: Vec<Arc<Value>>,
    /// Whether to mark the end of `initial` with a bookmark (streaming
    /// lists).
    initial_end: bool,
    selector: Selector,
    bookmarks: bool,
    deadline: Instant,
    cuts: watch::Receiver<u64>,
    changes: watch::Receiver<u64>,
}

type FrameSender = mpsc::Sender<io::Result<Frame<Bytes>>>;

/// Feeds one watch response until its timeout (a clean end), a cut (an
/// error, which makes hyper drop the connection mid-body), or the client
/// going away.
async fn stream_events(shared: Arc<Shared>, mut plan: WatchPlan, tx: FrameSender) {
    async fn send(tx: &FrameSender, line: Vec<u8>) -> bool {
        tx.send(Ok(Frame::data(Bytes::from(line)))).await.is_ok()
    }
    for object in std::mem::take(&mut plan.initial) {
        if !send(&tx, event_line("ADDED", &object)).await {
            return;
        }
    }
    if plan.initial_end && !send(&tx, bookmark_line(plan.position, true)).await {
        return;
    }
    let mut last_bookmark = Instant::now();
    loop {
        plan.changes.borrow_and_update();
        let batch = {
            let store = lock(&shared.store);
            store.changes_after(plan.position).map(|changes| (changes, store.rv()))
        };
        let changes = match batch {
            Ok((changes, rv)) => {
                plan.position = rv;
                changes
            }
            // Compacted past what this watch has sent: the real server
            // ends such a watch the same way.
            Err(RvError::TooOld { floor }) => {
                let status = ApiError::Expired(format!("too old resource version: {} ({floor})", plan.position));
                let _ = send(&tx, error_line(&status)).await;
                return;
            }
            Err(RvError::TooLarge { .. }) => unreachable!("a watch position never passes the store"),
        };
        for change in &changes {
            if let Some((kind, object)) = visible(change, &plan.selector)
                && !send(&tx, event_line(kind, object)).await
            {
                return;
            }
        }
        let next_bookmark = last_bookmark + *lock(&shared.bookmark_interval);
        if plan.bookmarks && Instant::now() >= next_bookmark {
            if !send(&tx, bookmark_line(plan.position, false)).await {
                return;
            }
            last_bookmark = Instant::now();
            continue;
        }
        tokio::select! {
            biased;
            _ = plan.cuts.changed() => {
                let _ = tx.send(Err(io::Error::other("watch cut by the test"))).await;
                return;
            }
            () = tx.closed() => return,
            () = tokio::time::sleep_until(plan.deadline) => return,
            _ = plan.changes.changed() => {}
            () = tokio::time::sleep_until(next_bookmark), if plan.bookmarks => {}
        }
    }
}

/// How `change` looks through `selector`: an object moving into or out of
/// the selection is ADDED or DELETED, as the real server's filtered
/// watches report it.
fn visible<'a>(change: &'a Change, selector: &Selector) -> Option<(&'static str, &'a Value)> {
    let now = selector.matches(&change.object);
    let before = change.previous.as_deref().is_some_and(|p| selector.matches(p));
    let kind = match (change.kind, before, now) {
        (ChangeKind::Added, _, true) => "ADDED",
        (ChangeKind::Modified, true, true) => "MODIFIED",
        (ChangeKind::Modified, false, true) => "ADDED",
        (ChangeKind::Modified, true, false) | (ChangeKind::Deleted, true, _) => "DELETED",
        _ => return None,
    };
    Some((kind, &change.object))
}

fn event_line(kind: &str, object: &Value) -> Vec<u8> {
    line(&json!({"type": kind, "object": with_type_meta(object)}))
}

fn bookmark_line(rv: u64, initial_end: bool) -> Vec<u8> {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    line(&json!({"type": "BOOKMARK", "object": {"kind": "Node", "apiVersion": "v1", "metadata": metadata}}))
}

fn error_line(error: &ApiError) -> Vec<u8> {
    line(&json!({"type": "ERROR", "object": error.status()}))
}

fn line(value: &Value) -> Vec<u8> {
    let mut line = serde_json::to_vec(value).expect("serializing JSON values");
    line.push(b'\n');
    line
}

fn parse_u64(value: &str, what: &str) -> Result<u64, ApiError> {
    value
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("invalid {what}: {value:?}")))
}

/// A decoded query string.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: &str) -> Self {
        Self(
            raw.split('&')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                    (percent_decode(key), percent_decode(value))
                })
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }
}

/// Decodes `application/x-www-form-urlencoded` text, as Go's
/// `url.ParseQuery` does for the real server.
pub(super) fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A requirement of a label or field selector.
#[derive(Debug)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

/// The equality-based label selectors and the field selectors the real
/// server supports for Nodes (`metadata.name`, `metadata.namespace`,
/// `spec.unschedulable`). Set-based label selectors (`in`, `notin`) are
/// refused with 400.
#[derive(Debug, Default)]
struct Selector {
    labels: Vec<Requirement>,
    fields: Vec<Requirement>,
}

impl Selector {
    fn from_query(query: &Query) -> Result<Self, ApiError> {
        let labels = parse_requirements(query.get("labelSelector").unwrap_or_default(), false)?;
        let fields = parse_requirements(query.get("fieldSelector").unwrap_or_default(), true)?;
        for field in &fields {
            let (Requirement::Equals(key, _) | Requirement::NotEquals(key, _)) = field else {
                unreachable!("field selectors parse to (in)equalities only");
            };
            if !matches!(
                key.as_str(),
                "metadata.name" | "metadata.namespace" | "spec.unschedulable"
            ) {
                return Err(ApiError::BadRequest(format!("field label not supported: {key}")));
            }
        }
        Ok(Self { labels, fields })
    }

    fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.fields.is_empty()
    }

    fn matches(&self, node: &Value) -> bool {
        let label = |key: &str| {
            node["metadata"]["labels"]
                .get(key)
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let field = |key: &str| match key {
            "metadata.name" => node["metadata"]["name"].as_str().map(str::to_owned),
            "metadata.namespace" => Some(String::new()),
            _ => Some(node["spec"]["unschedulable"].as_bool().unwrap_or(false).to_string()),
        };
        let holds = |requirement: &Requirement, get: &dyn Fn(&str) -> Option<String>| match requirement {
            Requirement::Equals(k, v) => get(k).as_deref() == Some(v.as_str()),
            Requirement::NotEquals(k, v) => get(k).as_deref() != Some(v.as_str()),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
        };
        self.labels.iter().all(|r| holds(r, &label)) && self.fields.iter().all(|r| holds(r, &field))
    }
}

fn parse_requirements(text: &str, fields: bool) -> Result<Vec<Requirement>, ApiError> {
    let kind = if fields { "field" } else { "label" };
    text.split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(|part| {
            let pair = |(k, v): (&str, &str)| (k.trim().to_owned(), v.trim().to_owned());
            if let Some((k, v)) = part.split_once("!=").map(pair) {
                Ok(Requirement::NotEquals(k, v))
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')).map(pair) {
                Ok(Requirement::Equals(k, v))
            } else if fields || part.contains([' ', '(']) {
                Err(ApiError::BadRequest(format!(
                    "unable to parse requirement: {part:?} in {kind} selector (this test server knows =, ==, != and existence)"
                )))
            } else if let Some(key) = part.strip_prefix('!') {
                Ok(Requirement::NotExists(key.trim().to_owned()))
            } else {
                Ok(Requirement::Exists(part.to_owned()))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        let query = Query::parse("fieldSelector=metadata.name%3Dnode-1&labelSelector=a+b&watch=true&x=%zz&y");
        assert_eq!(query.get("fieldSelector"), Some("metadata.name=node-1"));
        assert_eq!(query.get("labelSelector"), Some("a b"));
        assert_eq!(query.get("x"), Some("%zz"));
        assert_eq!(query.get("y"), Some(""));
        assert!(query.flag("watch"));
        assert_eq!(percent_decode("%4"), "%4");
    }

    #[test]
    fn selectors() {
        let node = json!({"metadata": {"name": "n1", "labels": {"role": "edge"}}});
        let select = |labels: &str, fields: &str| {
            let query = Query(vec![
                ("labelSelector".into(), labels.into()),
                ("fieldSelector".into(), fields.into()),
            ]);
            Selector::from_query(&query).map(|s| s.matches(&node))
        };
        assert!(select("role=edge", "metadata.name=n1").unwrap());
        assert!(!select("role!=edge", "").unwrap());
        assert!(select("!zone,role", "spec.unschedulable=false").unwrap());
        assert!(!select("", "metadata.name==n2").unwrap());
        assert!(select("role in (edge)", "").is_err());
        assert!(select("", "status.phase=Running").is_err());
    }
}
