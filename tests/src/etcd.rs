//! A real etcd (Debian's `etcd-server`) for flannel's etcd mode, one or
//! more members inside a lab namespace, each on its own address. Dropping
//! an [`Etcd`] kills every member and removes their data.
//!
//! The test side talks to it with the same etcd v3 client the agent uses,
//! from a thread that enters the namespace.
//!
//! With TLS ([`Etcd::start_tls`]) the members serve clients over HTTPS
//! only and admit only clients with a certificate of the cluster's CA
//! (`--client-cert-auth`), as flannel's etcd deployments are set up; the
//! CA, the members' certificate and a client's are made with openssl
//! ([`EtcdTls`]).

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
    /// Its TLS files, when it serves clients over TLS.
    pub tls: Option<EtcdTls>,
}

/// An etcd cluster's TLS files (PEM): its CA, the certificate every member
/// serves (for all the members' addresses), and a client certificate of
/// that CA (the agents' `--etcd-certfile`/`--etcd-keyfile`).
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl EtcdTls {
    /// The client flags of this CA and client certificate, as flanneld and
    /// our agent both take them.
    pub fn client_flags(&self) -> [String; 3] {
        [
            format!("--etcd-cafile={}", self.ca.display()),
            format!("--etcd-certfile={}", self.client_cert.display()),
            format!("--etcd-keyfile={}", self.client_key.display()),
        ]
    }

    /// Makes a throwaway CA and the certificates under `dir`.
    pub fn make(dir: &std::path::Path, ips: &[Ipv4Addr]) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let openssl = |args: &[&str]| -> Result<(), String> {
            let out = Command::new("openssl").args(args).current_dir(dir).output().map_err(|e| format!("running openssl: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!("openssl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)))
            }
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=overlay-test-etcd-ca", "-keyout", "ca.key", "-out", "ca.crt"];
        ca.extend(ec);
        openssl(&ca)?;
        let san = format!("subjectAltName={}", ips.iter().map(|ip| format!("IP:{ip}")).collect::<Vec<_>>().join(","));
        for (name, subject, usage, san) in [
            ("server", "/CN=etcd", "extendedKeyUsage=serverAuth", Some(san.as_str())),
            ("client", "/CN=overlay-agent", "extendedKeyUsage=clientAuth", None),
        ] {
            let (key, csr, crt) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"));
            let mut req = vec!["req", "-new", "-subj", subject, "-keyout", &key, "-out", &csr, "-addext", usage];
            req.extend(ec);
            if let Some(san) = san {
                req.extend(["-addext", san]);
            }
            openssl(&req)?;
            openssl(&["x509", "-req", "-in", &csr, "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-copy_extensions", "copy", "-out", &crt])?;
        }
        Ok(Self {
            ca: dir.join("ca.crt"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.crt"),
            client_key: dir.join("client.key"),
        })
    }
}

impl Etcd {
    /// Starts one member per address (each already on an interface of
    /// `ns`), under `dir`, and waits until the cluster answers.
    pub fn start(ns: &NetNs, ips: &[Ipv4Addr], dir: PathBuf) -> Result<Self, String> {
        Self::start_with(ns, ips, dir, None)
    }

    /// [`Etcd::start`], serving clients over TLS only, to clients with a
    /// certificate of its CA only (certificates made under `dir/tls`).
    pub fn start_tls(ns: &NetNs, ips: &[Ipv4Addr], dir: PathBuf) -> Result<Self, String> {
        let tls = EtcdTls::make(&dir.join("tls"), ips)?;
        Self::start_with(ns, ips, dir, Some(tls))
    }

    fn start_with(ns: &NetNs, ips: &[Ipv4Addr], dir: PathBuf, tls: Option<EtcdTls>) -> Result<Self, String> {
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
        let mut etcd = Self { ns_name: ns.name().to_owned(), members, token: crate::unique_name("ovetcd"), tls };
        for i in 0..etcd.members.len() {
            etcd.start_member(i)?;
        }
        etcd.wait_healthy(Duration::from_secs(20))?;
        Ok(etcd)
    }

    /// The agents' `--etcd-endpoints`.
    pub fn endpoints(&self) -> String {
        self.members.iter().map(|m| self.client_url(m.ip)).collect::<Vec<_>>().join(",")
    }

    fn client_url(&self, ip: Ipv4Addr) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{ip}:{CLIENT_PORT}")
    }

    /// (Re)starts member `i` with its existing data, if any.
    pub fn start_member(&mut self, i: usize) -> Result<(), String> {
        let cluster = self
            .members
            .iter()
            .map(|m| format!("{}=http://{}:{PEER_PORT}", m.name, m.ip))
            .collect::<Vec<_>>()
            .join(",");
        let client_url = self.client_url(self.members[i].ip);
        let tls_args: Vec<String> = match &self.tls {
            Some(tls) => vec![
                format!("--cert-file={}", tls.server_cert.display()),
                format!("--key-file={}", tls.server_key.display()),
                "--client-cert-auth".to_owned(),
                format!("--trusted-ca-file={}", tls.ca.display()),
            ],
            None => Vec::new(),
        };
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
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(&tls_args)
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
        let endpoints: Vec<String> = self.members.iter().filter(|m| m.child.is_some()).map(|m| self.client_url(m.ip)).collect();
        let tls = self.tls.clone();
        std::thread::spawn(move || {
            // This thread ends with the operation, so it never leaves.
            let target = std::fs::File::open(format!("/run/netns/{ns}")).map_err(|e| format!("opening netns {ns}: {e}"))?;
            // SAFETY: a valid namespace fd; setns affects this thread only.
            if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&target), libc::CLONE_NEWNET) } != 0 {
                return Err(format!("setns {ns}: {}", std::io::Error::last_os_error()));
            }
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
            runtime.block_on(async move {
                let mut options = etcd_client::ConnectOptions::new()
                    .with_connect_timeout(Duration::from_secs(2))
                    .with_timeout(Duration::from_secs(5));
                if let Some(tls) = tls {
                    let read = |path: &PathBuf| std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()));
                    options = options.with_tls(
                        etcd_client::TlsOptions::new()
                            .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)?))
                            .identity(etcd_client::Identity::from_pem(read(&tls.client_cert)?, read(&tls.client_key)?)),
                    );
                }
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
