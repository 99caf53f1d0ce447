//! A real etcd (Debian's `etcd-server`) for flannel's etcd mode, one or
//! more members inside a lab namespace, each on its own address. Dropping
//! an [`Etcd`] kills every member and removes their data.
//!
//! The test side talks to it with the same etcd v3 client the agent uses,
//! from a thread that enters the namespace.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::NetNs;

/// etcd's client port (flanneld's default endpoint).
pub const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;

struct Member {
    name: String,
    ip: Ipv4Addr,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A running etcd cluster inside namespace `ns`.
pub struct Etcd {
    ns_name: String,
    members: Vec<Member>,
    token: String,
}

impl Etcd {
    /// Starts one member per address (each already on an interface of
    /// `ns`), under `dir`, and waits until the cluster answers.
    pub fn start(ns: &NetNs, ips: &[Ipv4Addr], dir: PathBuf) -> Result<Self, String> {
        let members = ips
            .iter()
            .enumerate()
            .map(|(i, ip)| Member {
                name: format!("m{i}"),
                ip: *ip,
                data_dir: dir.join(format!("etcd-m{i}")),
                log: dir.join(format!("etcd-m{i}.log")),
                child: None,
            })
            .collect();
        let mut etcd = Self { ns_name: ns.name().to_owned(), members, token: crate::unique_name("ovetcd") };
        for i in 0..etcd.members.len() {
            etcd.start_member(i)?;
        }
        etcd.wait_healthy(Duration::from_secs(20))?;
        Ok(etcd)
    }

    /// The agents' `--etcd-endpoints`.
    pub fn endpoints(&self) -> String {
        self.members.iter().map(|m| format!("http://{}:{CLIENT_PORT}", m.ip)).collect::<Vec<_>>().join(",")
    }

    /// (Re)starts member `i` with its existing data, if any.
    pub fn start_member(&mut self, i: usize) -> Result<(), String> {
        let cluster = self
            .members
            .iter()
            .map(|m| format!("{}=http://{}:{PEER_PORT}", m.name, m.ip))
            .collect::<Vec<_>>()
            .join(",");
        let m = &mut self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .map_err(|e| format!("opening {}: {e}", m.log.display()))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns_name))
            .arg("etcd")
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &format!("http://{}:{CLIENT_PORT}", m.ip)])
            .args(["--advertise-client-urls", &format!("http://{}:{CLIENT_PORT}", m.ip)])
            .args(["--listen-peer-urls", &format!("http://{}:{PEER_PORT}", m.ip)])
            .args(["--initial-advertise-peer-urls", &format!("http://{}:{PEER_PORT}", m.ip)])
            .args(["--initial-cluster", &cluster, "--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", "new"])
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting etcd (cargo xtask setup installs etcd-server): {e}"))?;
        m.child = Some(child);
        Ok(())
    }

    /// Kills member `i` (SIGKILL, as a crash).
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until a put through every running member succeeds.
    pub fn wait_healthy(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.put("/overlay-test/health", "ok", None) {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(format!("etcd not healthy after {timeout:?}: {e}\n{}", self.logs())),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Every member's log.
    pub fn logs(&self) -> String {
        self.members.iter().map(|m| std::fs::read_to_string(&m.log).unwrap_or_default()).collect::<Vec<_>>().join("\n")
    }

    /// Runs `op` with a client inside the namespace.
    fn with_client<T: Send + 'static>(
        &self,
        op: impl FnOnce(etcd_client::Client) -> std::pin::Pin<Box<dyn Future<Output = Result<T, etcd_client::Error>>>> + Send + 'static,
    ) -> Result<T, String> {
        let ns = self.ns_name.clone();
        let endpoints: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("http://{}:{CLIENT_PORT}", m.ip))
            .collect();
        std::thread::spawn(move || {
            // This thread ends with the operation, so it never leaves.
            let target = std::fs::File::open(format!("/run/netns/{ns}")).map_err(|e| format!("opening netns {ns}: {e}"))?;
            // SAFETY: a valid namespace fd; setns affects this thread only.
            if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&target), libc::CLONE_NEWNET) } != 0 {
                return Err(format!("setns {ns}: {}", std::io::Error::last_os_error()));
            }
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
            runtime.block_on(async move {
                let options = etcd_client::ConnectOptions::new()
                    .with_connect_timeout(Duration::from_secs(2))
                    .with_timeout(Duration::from_secs(5));
                let client = etcd_client::Client::connect(endpoints, Some(options)).await.map_err(|e| e.to_string())?;
                op(client).await.map_err(|e| e.to_string())
            })
        })
        .join()
        .map_err(|_| "etcd client thread panicked".to_owned())?
    }

    /// Puts `key`, attached to a new lease of `ttl` if given.
    pub fn put(&self, key: &str, value: &str, ttl: Option<Duration>) -> Result<(), String> {
        let (key, value) = (key.to_owned(), value.to_owned());
        self.with_client(move |mut client| {
            Box::pin(async move {
                let mut options = None;
                if let Some(ttl) = ttl {
                    let lease = client.lease_grant(ttl.as_secs() as i64, None).await?;
                    options = Some(etcd_client::PutOptions::new().with_lease(lease.id()));
                }
                client.put(key, value, options).await.map(drop)
            })
        })
    }

    /// Deletes `key`.
    pub fn delete(&self, key: &str) -> Result<(), String> {
        let key = key.to_owned();
        self.with_client(move |mut client| Box::pin(async move { client.delete(key, None).await.map(drop) }))
    }

    /// Compacts the history up to the current revision, so a watch from an
    /// older one is told it fell behind.
    pub fn compact(&self) -> Result<(), String> {
        self.with_client(move |mut client| {
            Box::pin(async move {
                let revision = client.get("/", None).await?.header().map_or(0, |h| h.revision());
                client.compact(revision, Some(etcd_client::CompactionOptions::new().with_physical())).await.map(drop)
            })
        })
    }

    /// Every key under `prefix` with its value and the remaining TTL of its
    /// lease in seconds (-1 without a lease).
    pub fn list(&self, prefix: &str) -> Result<Vec<(String, String, i64)>, String> {
        let prefix = prefix.to_owned();
        self.with_client(move |mut client| {
            Box::pin(async move {
                let response = client.get(prefix, Some(etcd_client::GetOptions::new().with_prefix())).await?;
                let mut out = Vec::new();
                for kv in response.kvs() {
                    let ttl = if kv.lease() == 0 { -1 } else { client.lease_time_to_live(kv.lease(), None).await?.ttl() };
                    out.push((String::from_utf8_lossy(kv.key()).into_owned(), String::from_utf8_lossy(kv.value()).into_owned(), ttl));
                }
                Ok(out)
            })
        })
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill_member(i);
        }
        for m in &self.members {
            let _ = std::fs::remove_dir_all(&m.data_dir);
        }
    }
}
