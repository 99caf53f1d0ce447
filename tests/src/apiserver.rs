//! A Kubernetes API server for Nodes only, faithful enough for the real
//! kube-rs client (`Api<Node>`, kube-runtime's watcher) to list, watch and
//! patch against, with controls to break it the ways a real one breaks.
//!
//! Served over plain HTTP without authentication:
//! - `GET /api/v1/nodes`: list, with `limit`/`continue` pages that are
//!   consistent with the first page's resourceVersion, `resourceVersion`
//!   with `resourceVersionMatch` (`NotOlderThan`, `Exact`), equality label
//!   selectors, and the Node field selectors (`metadata.name`, …).
//! - `GET /api/v1/nodes?watch=true`: newline-delimited events replayed
//!   from the history after `resourceVersion`, then live; BOOKMARKs every
//!   [`ApiServer::set_bookmark_interval`] when `allowWatchBookmarks=true`;
//!   a clean end after `timeoutSeconds`; `sendInitialEvents` (streaming
//!   lists); an `ERROR` event with a 410 `Expired` Status for a version
//!   older than the retained history.
//! - `GET`, `PUT`, `PATCH`, `DELETE /api/v1/nodes/{name}`, `POST
//!   /api/v1/nodes`, and `GET`, `PUT`, `PATCH /api/v1/nodes/{name}/status`.
//!   PATCH takes merge, strategic merge (Node merge keys) and JSON patches;
//!   server-side apply gets 415. The main resource ignores `status`, the
//!   status subresource changes only status, labels and annotations (the
//!   real node status strategy keeps only the spec). A write that changes nothing
//!   keeps the resourceVersion and emits no event.
//! - `/version`, `/api`, `/api/v1`, `/apis` for discovery.
//!
//! Errors are `Status` objects with the real server's codes and reasons.

mod http;
mod patch;
mod store;

use std::{
    fs::File,
    io,
    net::SocketAddr,
    os::fd::AsRawFd as _,
    path::Path,
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    thread,
    time::Duration,
};

use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::Value;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{oneshot, watch},
};

use crate::NetNs;
use store::Store;

/// How long [`ApiServer::set_down`] waits for every connection to close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// One request as the server received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    /// `GET`, `PATCH`, …
    pub method: String,
    /// The path, e.g. `/api/v1/nodes/node-1/status`.
    pub path: String,
    /// The raw (still percent-encoded) query string, without `?`.
    pub query: String,
}

impl RequestRecord {
    /// The decoded value of query parameter `key`.
    pub fn param(&self, key: &str) -> Option<String> {
        self.query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (http::percent_decode(k) == key).then(|| http::percent_decode(v))
        })
    }

    /// A watch of the Node collection.
    pub fn is_watch(&self) -> bool {
        self.method == "GET"
            && self.path == "/api/v1/nodes"
            && matches!(self.param("watch").as_deref(), Some("true" | "1"))
    }

    /// A list (one page) of the Node collection.
    pub fn is_list(&self) -> bool {
        self.method == "GET" && self.path == "/api/v1/nodes" && !self.is_watch()
    }

    /// A PATCH of a Node or its status.
    pub fn is_patch(&self) -> bool {
        self.method == "PATCH"
    }
}

/// The test API server. It runs on its own thread and tokio runtime; every
/// method is synchronous and thread-safe. Dropping it stops the server and
/// closes every socket.
pub struct ApiServer {
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
    /// The namespace to (re)bind the listener in.
    netns: Option<String>,
    /// Serialises [`ApiServer::set_down`] calls.
    control: Mutex<()>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

/// State shared by the control API and the server's tasks.
struct Shared {
    addr: SocketAddr,
    store: Mutex<Store>,
    /// The store's resourceVersion, for watches to wait on.
    rv: watch::Sender<u64>,
    /// Bumped by [`ApiServer::cut_watches`].
    cuts: watch::Sender<u64>,
    /// True during an outage.
    down: watch::Sender<bool>,
    /// Listeners and connections not yet closed.
    open: Mutex<usize>,
    closed: Condvar,
    requests: Mutex<Vec<RequestRecord>>,
    /// Events (`events.k8s.io/v1`) recorded by clients, as posted and
    /// patched.
    events: Mutex<Vec<Value>>,
    bookmark_interval: Mutex<Duration>,
}

impl Shared {
    /// Runs a write against the store and wakes the watches if it
    /// committed anything.
    fn write<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        let mut store = lock(&self.store);
        let result = f(&mut store);
        let rv = store.rv();
        // Sent under the store lock so that a watch that saw the old value
        // before reading the store cannot miss the wake-up.
        self.rv.send_if_modified(|seen| std::mem::replace(seen, rv) != rv);
        result
    }
}

/// Counts a listener or connection as open until dropped.
struct Open(Arc<Shared>);

impl Open {
    fn new(shared: &Arc<Shared>) -> Self {
        *lock(&shared.open) += 1;
        Self(Arc::clone(shared))
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        *lock(&self.0.open) -= 1;
        self.0.closed.notify_all();
    }
}

/// Locks, ignoring poisoning: a panicking test thread must not take the
/// server down with it.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ApiServer {
    /// Starts serving on `bind` (port 0 picks a free port; see
    /// [`ApiServer::addr`]). With `ns`, the listening socket is created in
    /// that network namespace, so only that namespace can reach it.
    ///
    /// # Panics
    /// When the address cannot be bound.
    pub fn start(ns: Option<&NetNs>, bind: SocketAddr) -> Self {
        let netns = ns.map(|ns| ns.name().to_owned());
        let listener = bind_listener(netns.as_deref(), bind)
            .unwrap_or_else(|e| panic!("binding the test API server to {bind}: {e}"));
        let addr = listener.local_addr().expect("a bound listener has an address");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("building the API server's runtime");
        let store = Store::new();
        let shared = Arc::new(Shared {
            addr,
            rv: watch::channel(store.rv()).0,
            store: Mutex::new(store),
            cuts: watch::channel(0).0,
            down: watch::channel(false).0,
            open: Mutex::new(0),
            closed: Condvar::new(),
            requests: Mutex::new(Vec::new()),
            events: Mutex::new(Vec::new()),
            bookmark_interval: Mutex::new(Duration::from_secs(1)),
        });
        let handle = runtime.handle().clone();
        let (shutdown, stopped) = oneshot::channel::<()>();
        let thread = thread::Builder::new()
            .name("test-apiserver".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
                // Dropping the runtime drops every task, and with them
                // every socket.
                drop(runtime);
            })
            .expect("spawning the API server thread");
        let server = Self {
            shared,
            runtime: handle,
            netns,
            control: Mutex::new(()),
            shutdown: Some(shutdown),
            thread: Some(thread),
        };
        server.serve(listener);
        server
    }

    /// The address served, with the real port.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://IP:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// A kubeconfig (one cluster, context and user, no credentials) that
    /// points at this server.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: overlay-test
  cluster:
    server: {}
contexts:
- name: overlay-test
  context:
    cluster: overlay-test
    user: overlay-test
current-context: overlay-test
users:
- name: overlay-test
  user: {{}}
preferences: {{}}
",
            self.url()
        )
    }

    /// Writes [`ApiServer::kubeconfig`] to `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> io::Result<()> {
        std::fs::write(path, self.kubeconfig())
    }

    /// Creates (ADDED) or replaces (MODIFIED) a Node, keyed by
    /// `metadata.name`; the server sets `resourceVersion`, `uid` and
    /// `creationTimestamp` (the last two kept across replacements), and
    /// `status` is taken as given. A replacement identical to the stored
    /// Node changes nothing, as on the real server. Returns the stored
    /// Node.
    ///
    /// # Panics
    /// When `node` is not a map with a `metadata.name`.
    pub fn apply(&self, node: Value) -> Value {
        let name = node["metadata"]["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| panic!("a Node needs metadata.name: {node}"))
            .to_owned();
        let stored = self.shared.write(|store| match store.put(&name, node) {
            Some(stored) => stored,
            None => Arc::clone(store.get(&name).expect("an unchanged Node is stored")),
        });
        http::with_type_meta(&stored)
    }

    /// Deletes a Node (DELETED), returning its last state.
    pub fn delete(&self, name: &str) -> Option<Value> {
        self.shared
            .write(|store| store.remove(name))
            .map(|node| http::with_type_meta(&node))
    }

    /// A Node as `GET /api/v1/nodes/{name}` returns it.
    pub fn get(&self, name: &str) -> Option<Value> {
        lock(&self.shared.store)
            .get(name)
            .map(|node| http::with_type_meta(node))
    }

    /// The stored Nodes' names, sorted.
    pub fn names(&self) -> Vec<String> {
        lock(&self.shared.store).objects().keys().cloned().collect()
    }

    /// The newest resourceVersion (as a number; the API carries it as a
    /// string).
    pub fn resource_version(&self) -> u64 {
        lock(&self.shared.store).rv()
    }

    /// Aborts every open watch response mid-stream (the connection drops
    /// without the final chunk), so clients must reconnect. Their
    /// resourceVersion stays valid: no relist is needed.
    pub fn cut_watches(&self) {
        self.shared.cuts.send_modify(|cuts| *cuts += 1);
    }

    /// Drops the change history. The resourceVersion moves on by one (as
    /// writes to other resources move the real server's counter), so every
    /// resourceVersion handed out before is too old: open watches get the
    /// 410 `ERROR` event and end, new watches from an old version get it at
    /// once, and `continue` tokens of unfinished lists get 410. Clients
    /// must relist.
    pub fn compact(&self) {
        self.shared.write(Store::compact);
    }

    /// An outage: with `true`, closes the listener and every connection
    /// (clients see resets, then connection refused) and returns once they
    /// are closed; with `false`, binds the same address again, in the same
    /// namespace, serving the same state.
    ///
    /// # Panics
    /// When connections do not close within 10 s, or the address cannot be
    /// bound again.
    pub fn set_down(&self, down: bool) {
        let _control = lock(&self.control);
        if *self.shared.down.borrow() == down {
            return;
        }
        self.shared.down.send_replace(down);
        if down {
            let open = lock(&self.shared.open);
            let (open, wait) = self
                .shared
                .closed
                .wait_timeout_while(open, CLOSE_TIMEOUT, |open| *open > 0)
                .unwrap_or_else(PoisonError::into_inner);
            assert!(
                !wait.timed_out(),
                "{} listener(s)/connection(s) still open {CLOSE_TIMEOUT:?} into an outage",
                *open
            );
        } else {
            let listener = bind_listener(self.netns.as_deref(), self.shared.addr)
                .unwrap_or_else(|e| panic!("binding {} again after an outage: {e}", self.shared.addr));
            self.serve(listener);
        }
    }

    /// Whether [`ApiServer::set_down`] put the server down.
    pub fn is_down(&self) -> bool {
        *self.shared.down.borrow()
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared.requests).clone()
    }

    /// The events clients have recorded (`events.k8s.io/v1`, any
    /// namespace), latest state of each.
    pub fn events(&self) -> Vec<Value> {
        lock(&self.shared.events).clone()
    }

    /// Forgets the requests received so far.
    pub fn clear_requests(&self) {
        lock(&self.shared.requests).clear();
    }

    /// How often watches that allow bookmarks get one (default 1 s). Open
    /// watches follow the change from their next bookmark on.
    pub fn set_bookmark_interval(&self, interval: Duration) {
        *lock(&self.shared.bookmark_interval) = interval;
    }

    fn serve(&self, listener: std::net::TcpListener) {
        listener
            .set_nonblocking(true)
            .expect("making the listener non-blocking");
        let _runtime = self.runtime.enter();
        let listener = TcpListener::from_std(listener).expect("registering the listener with tokio");
        let open = Open::new(&self.shared);
        self.runtime.spawn(accept(Arc::clone(&self.shared), listener, open));
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Binds a listener in the namespace named `netns`, or in the caller's.
fn bind_listener(netns: Option<&str>, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let Some(name) = netns else {
        return std::net::TcpListener::bind(addr);
    };
    let path = format!("/run/netns/{name}");
    // setns() moves only the calling thread, so a throwaway thread creates
    // the socket; the socket stays in the namespace it was created in.
    thread::scope(|scope| {
        scope
            .spawn(|| {
                let ns = File::open(&path)?;
                // SAFETY: a valid namespace fd; setns affects only this
                // thread, which ends right after binding.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                std::net::TcpListener::bind(addr)
            })
            .join()
            .expect("the bind thread does not panic")
    })
}

async fn accept(shared: Arc<Shared>, listener: TcpListener, open: Open) {
    let mut down = shared.down.subscribe();
    loop {
        tokio::select! {
            () = until_down(&mut down) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let open = Open::new(&shared);
                    tokio::spawn(serve_connection(Arc::clone(&shared), stream, open));
                }
                // Transient, e.g. out of file descriptors: try again soon.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
        }
    }
    drop(listener);
    drop(open);
}

async fn serve_connection(shared: Arc<Shared>, stream: TcpStream, open: Open) {
    let mut down = shared.down.subscribe();
    let _ = stream.set_nodelay(true);
    let service = {
        let shared = Arc::clone(&shared);
        service_fn(move |req| http::handle(Arc::clone(&shared), req))
    };
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(stream), service);
    // Dropping the connection future closes the socket, whatever state the
    // exchange is in: that is the outage.
    tokio::select! {
        _ = connection => {}
        () = until_down(&mut down) => {}
    }
    drop(open);
}

async fn until_down(down: &mut watch::Receiver<bool>) {
    // The guard wait_for returns must not live across an await.
    let _ = down.wait_for(|down| *down).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_can_be_shared_between_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<ApiServer>();
    }
}
