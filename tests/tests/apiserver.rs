//! The test API server driven by the real kube client: pagination, the
//! kube-runtime watcher through changes, bookmarks, compaction, cut
//! watches and outages, and the three patch formats. No root needed,
//! except for the network-namespace test, which skips without it.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use futures::{StreamExt as _, TryStreamExt as _, stream::BoxStream};
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client, Config, ResourceExt,
    api::{ListParams, Patch, PatchParams, WatchEvent, WatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        watcher::{self, Event},
    },
};
use overlay_tests::{NetNs, apiserver::ApiServer, require_root, unique_name};
use serde_json::{Value, json};
use tokio::{sync::mpsc, task::JoinHandle};

/// The longest any single expected event may take.
const STEP: Duration = Duration::from_secs(5);

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn node(name: &str) -> Value {
    json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24"]},
        "status": {
            "addresses": [{"type": "InternalIP", "address": "192.168.0.1"}, {"type": "Hostname", "address": name}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
        },
    })
}

/// A kube client configured the way the agent will be: from a kubeconfig
/// file.
async fn client(server: &ApiServer) -> Client {
    let path = std::env::temp_dir().join(unique_name("overlay-kubeconfig-"));
    server.write_kubeconfig(&path).expect("writing the kubeconfig");
    let kubeconfig = Kubeconfig::read_from(&path);
    let _ = std::fs::remove_file(&path);
    let config = Config::from_custom_kubeconfig(
        kubeconfig.expect("reading the kubeconfig"),
        &KubeConfigOptions::default(),
    )
    .await
    .expect("a config from the kubeconfig");
    Client::try_from(config).expect("a client")
}

async fn nodes(server: &ApiServer) -> Api<Node> {
    Api::all(client(server).await)
}

fn api_error(err: kube::Error) -> (u16, String) {
    match err {
        kube::Error::Api(status) => (status.code, status.reason),
        other => panic!("expected a Status error, got {other:?}"),
    }
}

async fn within<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(STEP, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Polls `condition` until it holds.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    within(what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

type WatcherItem = Result<Event<Node>, watcher::Error>;

/// A watcher polled continuously by its own task, as the agent's would be,
/// with its events forwarded here.
struct Watched {
    events: mpsc::UnboundedReceiver<WatcherItem>,
    task: JoinHandle<()>,
}

impl Watched {
    fn start(stream: BoxStream<'static, WatcherItem>) -> Self {
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut stream = stream;
            while let Some(item) = stream.next().await {
                if tx.send(item).is_err() {
                    return;
                }
            }
        });
        Self { events, task }
    }

    async fn next(&mut self) -> WatcherItem {
        within("a watcher event", self.events.recv())
            .await
            .expect("the watcher stream does not end")
    }

    async fn next_ok(&mut self) -> Event<Node> {
        self.next()
            .await
            .unwrap_or_else(|e| panic!("unexpected watcher error: {e}"))
    }

    /// Consumes an Init … InitDone sequence, returning the listed names.
    async fn initial_list(&mut self) -> Vec<String> {
        assert!(matches!(self.next_ok().await, Event::Init), "expected Init");
        let mut names = Vec::new();
        loop {
            match self.next_ok().await {
                Event::InitApply(node) => names.push(node.name_any()),
                Event::InitDone => return names,
                other => panic!("unexpected event during the initial list: {other:?}"),
            }
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The watcher's view of the Nodes, kept the way a reflector keeps it.
#[derive(Default)]
struct Mirror {
    nodes: BTreeMap<String, Node>,
    relisting: Option<BTreeMap<String, Node>>,
    lists: usize,
    errors: Vec<watcher::Error>,
}

impl Mirror {
    fn apply(&mut self, item: WatcherItem) {
        match item {
            Ok(Event::Init) => self.relisting = Some(BTreeMap::new()),
            Ok(Event::InitApply(node)) => {
                self.relisting
                    .as_mut()
                    .expect("InitApply inside Init/InitDone")
                    .insert(node.name_any(), node);
            }
            Ok(Event::InitDone) => {
                self.nodes = self.relisting.take().expect("InitDone after Init");
                self.lists += 1;
            }
            Ok(Event::Apply(node)) => {
                self.nodes.insert(node.name_any(), node);
            }
            Ok(Event::Delete(node)) => {
                self.nodes.remove(&node.name_any());
            }
            Err(e) => self.errors.push(e),
        }
    }

    fn names(&self) -> Vec<String> {
        self.nodes.keys().cloned().collect()
    }

    /// Feeds events from `watched` until `done` holds.
    async fn until(&mut self, watched: &mut Watched, what: &str, done: impl Fn(&Self) -> bool) {
        within(what, async {
            while !done(self) {
                let item = watched.events.recv().await.expect("the watcher stream does not end");
                self.apply(item);
            }
        })
        .await;
    }
}

#[tokio::test]
async fn list_pages_are_consistent_with_the_first_page() {
    let server = ApiServer::start(None, loopback());
    for i in 0..1200 {
        server.apply(node(&format!("node-{i:04}")));
    }
    let api = nodes(&server).await;

    let first = api.list(&ListParams::default().limit(500)).await.unwrap();
    assert_eq!(first.items.len(), 500);
    assert_eq!(first.metadata.remaining_item_count, Some(700));
    let snapshot_rv = first.metadata.resource_version.clone().unwrap();
    assert_eq!(snapshot_rv, server.resource_version().to_string());
    for node in &first.items {
        let meta = &node.metadata;
        assert!(meta.resource_version.is_some() && meta.uid.is_some() && meta.creation_timestamp.is_some());
    }

    // Changes between pages must not show in later pages of the same list.
    server.delete("node-1100");
    let mut changed = node("node-0900");
    changed["metadata"]["labels"]["changed"] = "yes".into();
    server.apply(changed);
    server.apply(node("node-0999x"));

    let mut names: Vec<String> = first.items.iter().map(ResourceExt::name_any).collect();
    let mut token = first.metadata.continue_.clone().unwrap();
    let mut pages = 1;
    loop {
        let page = api
            .list(&ListParams::default().limit(500).continue_token(&token))
            .await
            .unwrap();
        pages += 1;
        assert_eq!(page.metadata.resource_version.as_deref(), Some(snapshot_rv.as_str()));
        for node in &page.items {
            if node.name_any() == "node-0900" {
                assert!(!node.labels().contains_key("changed"), "page shows a later change");
            }
        }
        names.extend(page.items.iter().map(ResourceExt::name_any));
        match page.metadata.continue_ {
            Some(next) => token = next,
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let expected: Vec<String> = (0..1200).map(|i| format!("node-{i:04}")).collect();
    assert_eq!(names, expected);

    let whole = api.list(&ListParams::default()).await.unwrap();
    assert_eq!(whole.items.len(), 1200);
    assert!(whole.metadata.continue_.is_none());
    assert!(whole.items.iter().any(|n| n.name_any() == "node-0999x"));
    assert!(!whole.items.iter().any(|n| n.name_any() == "node-1100"));

    let lists: Vec<_> = server.requests().into_iter().filter(|r| r.is_list()).collect();
    assert_eq!(lists.len(), 4, "{lists:?}");
    assert_eq!(
        lists[1].param("continue").as_deref(),
        first.metadata.continue_.as_deref()
    );

    // A continue token from before a compaction is expired.
    server.compact();
    let err = api
        .list(&ListParams::default().limit(500).continue_token(&token))
        .await
        .unwrap_err();
    assert_eq!(api_error(err), (410, "Expired".to_owned()));
    let err = api.get("missing").await.unwrap_err();
    assert_eq!(api_error(err), (404, "NotFound".to_owned()));
    assert!(api.get_opt("missing").await.unwrap().is_none());
    let version = api.clone().into_client().apiserver_version().await.unwrap();
    assert_eq!((version.major.as_str(), version.minor.as_str()), ("1", "33"));
}

#[tokio::test]
async fn watcher_lists_5000_nodes_in_pages() {
    let server = ApiServer::start(None, loopback());
    for i in 0..5000 {
        server.apply(node(&format!("node-{i:04}")));
    }
    let mut watched = Watched::start(watcher::watcher(nodes(&server).await, watcher::Config::default()).boxed());
    let names = watched.initial_list().await;
    assert_eq!(names.len(), 5000);
    assert_eq!(names, server.names());
    let lists: Vec<_> = server.requests().into_iter().filter(|r| r.is_list()).collect();
    assert_eq!(lists.len(), 10, "{lists:?}");
    assert!(
        lists.iter().all(|r| r.param("limit").as_deref() == Some("500")),
        "{lists:?}"
    );
    assert!(lists[1..].iter().all(|r| r.param("continue").is_some()), "{lists:?}");
}

#[tokio::test]
async fn watcher_sees_changes_in_order() {
    let server = ApiServer::start(None, loopback());
    server.apply(node("a"));
    server.apply(node("b"));
    let api = nodes(&server).await;
    let mut watched = Watched::start(watcher::watcher(api.clone(), watcher::Config::default()).boxed());
    assert_eq!(watched.initial_list().await, ["a", "b"]);

    let added = server.apply(node("c"));
    let mut changed = node("a");
    changed["metadata"]["labels"]["zone"] = "z1".into();
    let modified = server.apply(changed);
    let deleted = server.delete("b").unwrap();
    let patched = api
        .patch(
            "c",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"x": "1"}}})),
        )
        .await
        .unwrap();

    let rv = |v: &Value| v["metadata"]["resourceVersion"].as_str().unwrap().to_owned();
    match watched.next_ok().await {
        Event::Apply(n) if n.name_any() == "c" => assert_eq!(n.resource_version().unwrap(), rv(&added)),
        other => panic!("expected c added, got {other:?}"),
    }
    match watched.next_ok().await {
        Event::Apply(n) if n.name_any() == "a" => {
            assert_eq!(n.labels()["zone"], "z1");
            assert_eq!(n.resource_version().unwrap(), rv(&modified));
        }
        other => panic!("expected a modified, got {other:?}"),
    }
    match watched.next_ok().await {
        Event::Delete(n) if n.name_any() == "b" => assert_eq!(n.resource_version().unwrap(), rv(&deleted)),
        other => panic!("expected b deleted, got {other:?}"),
    }
    match watched.next_ok().await {
        Event::Apply(n) if n.name_any() == "c" => {
            assert_eq!(n.annotations()["x"], "1");
            assert_eq!(n.resource_version(), patched.resource_version());
        }
        other => panic!("expected c patched, got {other:?}"),
    }
    let watches: Vec<_> = server.requests().into_iter().filter(|r| r.is_watch()).collect();
    assert_eq!(watches.len(), 1, "{watches:?}");
    assert_eq!(watches[0].param("allowWatchBookmarks").as_deref(), Some("true"));

    // watch_object watches one Node through a metadata.name field selector.
    let mut one = Watched::start(
        watcher::watch_object(api, "a")
            .map_ok(|node| match node {
                Some(node) => Event::Apply(node),
                None => Event::Delete(Node::default()),
            })
            .boxed(),
    );
    assert!(matches!(one.next_ok().await, Event::Apply(n) if n.name_any() == "a"));
    server.apply(node("d"));
    server.delete("a");
    assert!(
        matches!(one.next_ok().await, Event::Delete(_)),
        "only a's deletion shows"
    );
    let selected = server
        .requests()
        .into_iter()
        .filter(|r| r.param("fieldSelector").as_deref() == Some("metadata.name=a"))
        .count();
    assert_eq!(selected, 2, "one list and one watch with the field selector");
}

#[tokio::test]
async fn raw_watch_replays_bookmarks_and_times_out() {
    let server = ApiServer::start(None, loopback());
    server.set_bookmark_interval(Duration::from_millis(200));
    server.apply(node("a"));
    let from = server.resource_version();
    server.apply(node("b"));
    server.delete("a");
    let api = nodes(&server).await;

    let started = Instant::now();
    let mut events = api
        .watch(&WatchParams::default().timeout(2), &from.to_string())
        .await
        .unwrap()
        .boxed();
    assert!(matches!(within("b", events.try_next()).await.unwrap(), Some(WatchEvent::Added(n)) if n.name_any() == "b"));
    assert!(
        matches!(within("a", events.try_next()).await.unwrap(), Some(WatchEvent::Deleted(n)) if n.name_any() == "a")
    );
    let mut bookmarks = 0;
    while let Some(event) = within("the watch to end", events.try_next()).await.unwrap() {
        match event {
            WatchEvent::Bookmark(bookmark) => {
                assert_eq!(
                    bookmark.metadata.resource_version,
                    server.resource_version().to_string()
                );
                bookmarks += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert!((4..=12).contains(&bookmarks), "{bookmarks} bookmarks in 2 s at 200 ms");

    // Without allowWatchBookmarks there are none.
    let events: Vec<_> = api
        .watch(&WatchParams::default().timeout(1).disable_bookmarks(), "0")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert!(
        matches!(events.as_slice(), [WatchEvent::Added(n)] if n.name_any() == "b"),
        "resourceVersion 0 starts with the current state, then only changes: {events:?}"
    );

    // An open watch that compaction overtakes ends with a 410 ERROR event.
    let mut open = api
        .watch(&WatchParams::default(), &server.resource_version().to_string())
        .await
        .unwrap()
        .boxed();
    server.compact();
    match within("the 410", open.try_next()).await.unwrap() {
        Some(WatchEvent::Error(status)) => assert_eq!((status.code, status.reason.as_str()), (410, "Expired")),
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    assert!(within("the end", open.try_next()).await.unwrap().is_none());

    // A watch from a version older than the retained history: the same.
    let events: Vec<_> = api
        .watch(&WatchParams::default(), &from.to_string())
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    match events.as_slice() {
        [WatchEvent::Error(status)] => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
            assert!(
                status
                    .message
                    .starts_with(&format!("too old resource version: {from} (")),
                "{}",
                status.message
            );
        }
        other => panic!("expected one 410 ERROR event, got {other:?}"),
    }
}

#[tokio::test]
async fn compaction_makes_the_watcher_relist() {
    let server = ApiServer::start(None, loopback());
    for name in ["n0", "n1", "n2"] {
        server.apply(node(name));
    }
    let stream = watcher::watcher(nodes(&server).await, watcher::Config::default());
    let mut watched = Watched::start(stream.default_backoff().boxed());
    let mut mirror = Mirror::default();
    mirror.until(&mut watched, "the first list", |m| m.lists == 1).await;
    let lists = || server.requests().iter().filter(|r| r.is_list()).count();
    assert_eq!(lists(), 1);

    let listed_rv = server.resource_version().to_string();
    server.compact();
    mirror.until(&mut watched, "the relist", |m| m.lists == 2).await;
    assert_eq!(lists(), 2);
    let stale_watches = server
        .requests()
        .iter()
        .filter(|r| r.is_watch() && r.param("resourceVersion").as_deref() == Some(listed_rv.as_str()))
        .count();
    assert_eq!(stale_watches, 1, "the open watch got the 410; it was not retried");
    match mirror.errors.as_slice() {
        [watcher::Error::WatchError(status)] => assert_eq!((status.code, status.reason.as_str()), (410, "Expired")),
        other => panic!("expected one 410 watch error, got {other:?}"),
    }
    server.apply(node("n3"));
    server.delete("n0");
    mirror
        .until(&mut watched, "changes after the relist", |m| {
            m.names() == ["n1", "n2", "n3"]
        })
        .await;

    // Changes and a compaction while the watcher is cut off: it comes back
    // to a 410, relists, and ends with the right state.
    server.set_down(true);
    server.apply(node("n4"));
    server.delete("n1");
    server.compact();
    server.set_down(false);
    mirror
        .until(&mut watched, "the relist after the outage", |m| m.lists == 3)
        .await;
    assert_eq!(mirror.names(), ["n2", "n3", "n4"]);
    assert_eq!(mirror.names(), server.names());
    assert_eq!(lists(), 3);
}

#[tokio::test]
async fn cut_watches_resume_without_a_relist() {
    let server = ApiServer::start(None, loopback());
    server.apply(node("a"));
    let mut watched = Watched::start(watcher::watcher(nodes(&server).await, watcher::Config::default()).boxed());
    let mut mirror = Mirror::default();
    mirror.until(&mut watched, "the first list", |m| m.lists == 1).await;
    server.apply(node("b"));
    mirror.until(&mut watched, "b", |m| m.nodes.contains_key("b")).await;
    let seen_rv = server.resource_version();
    let watches = || {
        server
            .requests()
            .into_iter()
            .filter(|r| r.is_watch())
            .collect::<Vec<_>>()
    };
    assert_eq!(watches().len(), 1);

    server.cut_watches();
    eventually("the watcher to reconnect", || watches().len() == 2).await;
    let resumed = &watches()[1];
    assert_eq!(
        resumed.param("resourceVersion"),
        Some(seen_rv.to_string()),
        "resumes where it was"
    );
    server.apply(node("c"));
    mirror
        .until(&mut watched, "c after the cut", |m| m.nodes.contains_key("c"))
        .await;
    assert_eq!(mirror.lists, 1, "no relist");
    assert_eq!(server.requests().iter().filter(|r| r.is_list()).count(), 1);
    assert_eq!(mirror.names(), ["a", "b", "c"]);
}

/// A raw HTTP/1.1 watch request; returns the connection once the
/// response head and the first event have arrived.
fn raw_watch(server: &ApiServer, query: &str) -> (TcpStream, Vec<u8>) {
    let mut stream = TcpStream::connect(server.addr()).unwrap();
    stream.set_read_timeout(Some(STEP)).unwrap();
    let request = format!("GET /api/v1/nodes?watch=true&{query} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut received = Vec::new();
    let mut buf = [0; 4096];
    while !received.windows(7).any(|w| w == b"\"ADDED\"") {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&received));
        received.extend_from_slice(&buf[..n]);
    }
    (stream, received)
}

fn read_to_close(mut stream: TcpStream, mut received: Vec<u8>) -> String {
    let mut buf = [0; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return String::from_utf8_lossy(&received).into_owned(),
            Ok(n) => received.extend_from_slice(&buf[..n]),
        }
    }
}

#[test]
fn cut_drops_the_connection_where_a_timeout_ends_cleanly() {
    let server = ApiServer::start(None, loopback());
    server.apply(node("a"));
    let (stream, received) = raw_watch(&server, "resourceVersion=0");
    server.cut_watches();
    let cut = read_to_close(stream, received);
    assert!(
        cut.starts_with("HTTP/1.1 200") && cut.contains("transfer-encoding: chunked"),
        "{cut}"
    );
    assert!(!cut.ends_with("0\r\n\r\n"), "a cut watch has no last chunk: {cut:?}");

    let (stream, received) = raw_watch(&server, "resourceVersion=0&timeoutSeconds=1");
    let ended = read_to_close(stream, received);
    assert!(
        ended.ends_with("0\r\n\r\n"),
        "a timed out watch ends with the last chunk: {ended:?}"
    );

    // Dropping the server closes open watches and the listener.
    let (stream, received) = raw_watch(&server, "resourceVersion=0");
    let addr = server.addr();
    let started = Instant::now();
    drop(server);
    let _ = read_to_close(stream, received);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the watch outlived the server"
    );
    assert!(TcpStream::connect(addr).is_err(), "the listener outlived the server");
}

#[tokio::test]
async fn outage_fails_requests_then_recovers() {
    let server = ApiServer::start(None, loopback());
    server.apply(node("a"));
    let api = nodes(&server).await;
    let mut watched = Watched::start(
        watcher::watcher(api.clone(), watcher::Config::default())
            .default_backoff()
            .boxed(),
    );
    let mut mirror = Mirror::default();
    mirror.until(&mut watched, "the first list", |m| m.lists == 1).await;

    server.set_down(true);
    assert!(server.is_down());
    let err = api.list(&ListParams::default()).await.unwrap_err();
    assert!(
        !matches!(err, kube::Error::Api(_)),
        "a connection error, not a Status: {err:?}"
    );
    assert!(TcpStream::connect(server.addr()).is_err(), "the listener is closed");
    mirror
        .until(&mut watched, "the watcher to notice", |m| !m.errors.is_empty())
        .await;
    server.apply(node("b"));
    server.delete("a");

    server.set_down(false);
    mirror
        .until(&mut watched, "the changes made during the outage", |m| {
            m.names() == ["b"]
        })
        .await;
    assert_eq!(mirror.lists, 1, "the history covers the outage: resumed, no relist");
    assert_eq!(api.list(&ListParams::default()).await.unwrap().items.len(), 1);
}

#[tokio::test]
async fn patches_follow_kubernetes_semantics() {
    let server = ApiServer::start(None, loopback());
    let mut n = node("n");
    n["metadata"]["annotations"] = json!({"a": "1"});
    n["status"]["conditions"] = json!([
        {"type": "Ready", "status": "True", "reason": "KubeletReady"},
        {"type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated"},
    ]);
    server.apply(n);
    let api = nodes(&server).await;
    let pp = PatchParams::default();
    let rv = || server.resource_version();

    // Merge patch on the main resource: metadata changes, status is ignored.
    let before = rv();
    let merge = Patch::Merge(json!({
        "metadata": {"annotations": {"a": null, "b": "2"}},
        "status": {"conditions": []},
    }));
    let patched = api.patch("n", &pp, &merge).await.unwrap();
    assert_eq!(
        patched.annotations(),
        &BTreeMap::from([("b".to_owned(), "2".to_owned())])
    );
    assert_eq!(patched.status.as_ref().unwrap().conditions.as_ref().unwrap().len(), 2);
    assert_eq!(rv(), before + 1);
    assert_eq!(patched.resource_version(), Some(rv().to_string()));
    // The same patch again changes nothing and keeps the version.
    let again = api.patch("n", &pp, &merge).await.unwrap();
    assert_eq!(again.resource_version(), patched.resource_version());
    assert_eq!(rv(), before + 1);

    // Strategic merge on status: conditions merge by type; metadata in a
    // status patch is kept (the node status strategy resets only the spec,
    // which is how flanneld annotates with nodes/status patch alone), the
    // spec is not.
    let strategic = Patch::Strategic(json!({
        "metadata": {"labels": {"kept": "yes"}},
        "spec": {"podCIDR": "10.99.0.0/24"},
        "status": {
            "conditions": [{"type": "NetworkUnavailable", "status": "False", "reason": "RouteCreated"}],
            "addresses": [{"type": "InternalIP", "address": "192.168.0.9"}],
        },
    }));
    let patched = api.patch_status("n", &pp, &strategic).await.unwrap();
    let status = patched.status.clone().unwrap();
    let conditions: Vec<_> = status
        .conditions
        .unwrap()
        .into_iter()
        .map(|c| (c.type_, c.status, c.reason.unwrap_or_default()))
        .collect();
    let owned = |(a, b, c): (&str, &str, &str)| (a.to_owned(), b.to_owned(), c.to_owned());
    assert_eq!(
        conditions,
        [
            owned(("Ready", "True", "KubeletReady")),
            owned(("NetworkUnavailable", "False", "RouteCreated"))
        ]
    );
    let addresses: Vec<_> = status
        .addresses
        .unwrap()
        .into_iter()
        .map(|a| (a.type_, a.address))
        .collect();
    assert_eq!(
        addresses,
        [
            ("InternalIP".to_owned(), "192.168.0.9".to_owned()),
            ("Hostname".to_owned(), "n".to_owned())
        ]
    );
    assert_eq!(patched.labels().get("kept").map(String::as_str), Some("yes"));
    assert_ne!(patched.spec.as_ref().and_then(|s| s.pod_cidr.as_deref()), Some("10.99.0.0/24"));
    assert_eq!(rv(), before + 2);

    // JSON patch of annotations, then of status through /status.
    let ops = |ops: Value| Patch::Json::<()>(serde_json::from_value(ops).unwrap());
    let patched = api
        .patch(
            "n",
            &pp,
            &ops(json!([{"op": "add", "path": "/metadata/annotations/c", "value": "3"}])),
        )
        .await
        .unwrap();
    assert_eq!(patched.annotations()["c"], "3");
    let patched = api
        .patch_status(
            "n",
            &pp,
            &ops(json!([
                {"op": "test", "path": "/status/conditions/0/type", "value": "Ready"},
                {"op": "replace", "path": "/status/conditions/0/status", "value": "False"},
                {"op": "remove", "path": "/status/conditions/1"},
            ])),
        )
        .await
        .unwrap();
    let conditions = patched.status.unwrap().conditions.unwrap();
    assert_eq!(conditions.len(), 1);
    assert_eq!(
        (conditions[0].type_.as_str(), conditions[0].status.as_str()),
        ("Ready", "False")
    );
    assert_eq!(rv(), before + 4);

    // The errors the real server gives.
    let failing_test = ops(json!([{"op": "test", "path": "/metadata/name", "value": "other"}]));
    assert_eq!(
        api_error(api.patch("n", &pp, &failing_test).await.unwrap_err()),
        (422, "Invalid".to_owned())
    );
    let apply = Patch::Apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n"}}));
    let err = api
        .patch("n", &PatchParams::apply("test").force(), &apply)
        .await
        .unwrap_err();
    assert_eq!(api_error(err), (415, "UnsupportedMediaType".to_owned()));
    let err = api.patch("missing", &pp, &merge).await.unwrap_err();
    assert_eq!(api_error(err), (404, "NotFound".to_owned()));
    let stale = Patch::Merge(json!({"metadata": {"resourceVersion": before.to_string(), "labels": {"x": "y"}}}));
    assert_eq!(
        api_error(api.patch("n", &pp, &stale).await.unwrap_err()),
        (409, "Conflict".to_owned())
    );
    let not_a_map = Patch::Strategic(json!({"status": {"conditions": ["Ready"]}}));
    assert_eq!(
        api_error(api.patch_status("n", &pp, &not_a_map).await.unwrap_err()),
        (400, "BadRequest".to_owned())
    );
    assert_eq!(rv(), before + 4, "failed patches change nothing");
    assert_eq!(server.requests().iter().filter(|r| r.is_patch()).count(), 10);
}

/// Raw HTTP from inside `ns`: the status line and body of GET /version.
fn get_version_inside(ns: &NetNs, addr: SocketAddr) -> std::io::Result<String> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let _inside = ns.enter();
                let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
                stream.set_read_timeout(Some(STEP))?;
                stream.write_all(b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
                let mut response = String::new();
                stream.read_to_string(&mut response)?;
                Ok(response)
            })
            .join()
            .expect("the client thread does not panic")
    })
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn serves_inside_a_network_namespace() {
    require_root();
    let ns = NetNs::new();
    let server = ApiServer::start(Some(&ns), loopback());
    let addr = server.addr();
    let response = get_version_inside(&ns, addr).unwrap();
    assert!(
        response.starts_with("HTTP/1.1 200") && response.contains("v1.33.0"),
        "{response}"
    );
    assert!(
        TcpStream::connect(addr).is_err(),
        "not reachable from the root namespace"
    );

    server.set_down(true);
    assert!(get_version_inside(&ns, addr).is_err(), "refused during the outage");
    server.set_down(false);
    let response = get_version_inside(&ns, addr).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}
