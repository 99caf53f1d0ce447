//! The node's netfilter rules for pod traffic, as flannel sets them:
//!
//! - **masquerade** (flannel's `--ip-masq`): pod traffic that leaves the
//!   cluster `Network` is masqueraded to the node's address, with fully
//!   random ports; pod to pod, and to multicast, keeps the pod's address.
//!   The rules live in the agent's own nftables table, `ip overlay`.
//! - **FORWARD accept**: on hosts whose iptables FORWARD policy is DROP
//!   (Docker sets it), kernel-forwarded pod traffic would die. An accept in
//!   our own nftables table cannot help: every base chain on a hook sees
//!   the packet, and a drop in any of them is final. So, as flannel's
//!   `FLANNEL-FWD`, the accept rules go into iptables' own FORWARD chain,
//!   through a chain of ours (`OVERLAY-FWD`), in each iptables that has a
//!   filter table: iptables-nft's and iptables-legacy's can coexist, and
//!   each one's drop is final.
//!
//! Everything is driven through the `nft` and `iptables-{nft,legacy}`
//! commands. No crate fits: `rustables` (pure Rust netlink) is GPL-3.0,
//! which the agent's MIT/Apache licence cannot ship; `nftnl` binds the C
//! libnftnl, which the static image cannot link; and iptables-legacy's
//! tables have no library at all. These commands run on a thread of their
//! own ([`PodTrafficRules`]), never on the event loop's: at start, when the
//! pod CIDR changes and every [`RECHECK`] (a check that rewrites only what
//! is missing), never per Node event.
//!
//! Rules stay in place when the agent stops, so traffic keeps flowing
//! across restarts; a restart finds them and adds nothing. `cleanup`
//! removes them.

use std::{
    io::Write as _,
    process::{Command, Stdio},
    time::Duration,
};

use ipnetwork::Ipv4Network;
use serde_json::{Value, json};

/// The agent's nftables table (family `ip`).
pub const NFT_TABLE: &str = "overlay";
/// Its NAT chain, at the postrouting hook.
pub const NFT_CHAIN: &str = "postrouting";
/// The iptables chain FORWARD jumps to.
pub const FORWARD_CHAIN: &str = "OVERLAY-FWD";
/// The comment on the jump and on each accept rule.
const FORWARD_COMMENT: &str = "overlay-agent: accept pod traffic";
/// kube-proxy's mark for traffic it masquerades itself (flannel skips it).
const KUBE_PROXY_MASQ_MARK: u32 = 0x4000;
/// Multicast, which flannel never masquerades.
const MULTICAST: &str = "224.0.0.0/4";

#[derive(Debug, thiserror::Error)]
pub enum NetfilterError {
    #[error("running {program}: not found on PATH; install it (Debian: apt-get install {package}){hint}")]
    Missing { program: String, package: &'static str, hint: &'static str },
    #[error("running {program}")]
    Spawn { program: String, #[source] source: std::io::Error },
    #[error("{program} {args} failed ({status}): {stderr}")]
    Failed { program: String, args: String, status: std::process::ExitStatus, stderr: String },
    #[error("reading {what}")]
    Read { what: &'static str, #[source] source: std::io::Error },
    #[error("nft printed JSON this agent cannot read")]
    Json(#[source] serde_json::Error),
    #[error("the nftables table ip {NFT_TABLE} is not the agent's ({what}), so the agent leaves it as it is: rename or remove it, or run the agent with --ip-masq=false")]
    ForeignTable { what: String },
}

/// What the node's rules are built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodTraffic {
    /// The cluster's pod network (`net-conf.json`'s `Network`).
    pub network: Ipv4Network,
    /// This node's pod CIDR.
    pub pod_cidr: Ipv4Network,
    /// Masquerade traffic leaving the cluster (flannel's `--ip-masq`).
    pub masquerade: bool,
}

/// How often the rules are looked at again after a check (flannel:
/// `--iptables-resync`, 5 s): someone flushing FORWARD, or a firewall
/// reload, is repaired within this (plus one check's time).
pub const RECHECK: Duration = Duration::from_secs(5);

/// What writes the rules: [`Commands`] in the agent, a fake in the loop's
/// tests. It runs on the rules' own thread.
pub trait RuleWriter: Send + 'static {
    /// Brings the rules to `traffic`, as [`ensure`] does.
    fn ensure(&mut self, traffic: &PodTraffic) -> Result<Changes, NetfilterError>;
}

/// The real rules, through the `nft` and `iptables` commands ([`ensure`]).
#[derive(Debug, Default)]
pub struct Commands;

impl RuleWriter for Commands {
    fn ensure(&mut self, traffic: &PodTraffic) -> Result<Changes, NetfilterError> {
        ensure(traffic)
    }
}

/// One check of the rules, done.
#[derive(Debug)]
pub struct Checked {
    pub traffic: PodTraffic,
    pub result: Result<Changes, NetfilterError>,
}

/// What [`PodTrafficRules::report`] logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Logged {
    /// Nothing: the rules were in place, or the failure was logged before.
    Nothing,
    /// Rules were (re)written.
    Written,
    /// A failure not logged before.
    Failed(String),
}

/// The agent's side of the rules. The checks start processes (`nft`,
/// `iptables`, tens to hundreds of milliseconds, once 521 ms on a busy
/// node), so they run on a thread of their own, never on the event loop's:
/// a Node event arriving meanwhile does not wait for them. The thread
/// checks when the wanted rules change and every [`RECHECK`] after its last
/// check (which also retries a failure at that pace, not on every Node
/// event), and sends each outcome back ([`Self::checked`]) for the loop to
/// [`Self::report`].
///
/// Dropping it waits for a check under way: an agent stopping mid-check
/// would leave a half-written FORWARD chain, or an `iptables` process
/// still adding a rule after `cleanup` removed ours.
pub struct PodTrafficRules {
    masquerade: bool,
    /// What was last handed to the thread.
    wanted: Option<PodTraffic>,
    to_thread: Option<std::sync::mpsc::Sender<PodTraffic>>,
    from_thread: tokio::sync::mpsc::UnboundedReceiver<Checked>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Failures logged, until a check succeeds.
    reported: std::collections::BTreeSet<String>,
}

impl PodTrafficRules {
    /// Rules written by the `nft` and `iptables` commands.
    pub fn new(masquerade: bool) -> Self {
        Self::with_writer(masquerade, Commands, RECHECK)
    }

    /// Rules written by `writer`, looked at again `recheck` after each check.
    pub fn with_writer(masquerade: bool, mut writer: impl RuleWriter, recheck: Duration) -> Self {
        let (to_thread, wanted_rx) = std::sync::mpsc::channel::<PodTraffic>();
        let (checked_tx, from_thread) = tokio::sync::mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("netfilter".into())
            .spawn(move || {
                let mut wanted: Option<PodTraffic> = None;
                loop {
                    let next = match wanted {
                        Some(_) => wanted_rx.recv_timeout(recheck),
                        None => wanted_rx.recv().map_err(Into::into),
                    };
                    match next {
                        Ok(traffic) => wanted = Some(traffic),
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        // The agent stops: no check after the one done.
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                    // Only the latest of what queued up meanwhile counts.
                    while let Ok(traffic) = wanted_rx.try_recv() {
                        wanted = Some(traffic);
                    }
                    let Some(traffic) = wanted else { continue };
                    let result = writer.ensure(&traffic);
                    if checked_tx.send(Checked { traffic, result }).is_err() {
                        return;
                    }
                }
            })
            .expect("spawning the netfilter thread");
        Self { masquerade, wanted: None, to_thread: Some(to_thread), from_thread, thread: Some(thread), reported: Default::default() }
    }

    /// Whether traffic leaving the cluster is masqueraded (what
    /// `subnet.env`'s `FLANNEL_IPMASQ` must say).
    pub fn masquerade(&self) -> bool {
        self.masquerade
    }

    /// Asks for the rules for `network` and our `pod_cidr`: hands them to
    /// the rules' thread when they changed, which checks them at once and
    /// then every [`RECHECK`]. Never waits.
    pub fn keep(&mut self, network: Ipv4Network, pod_cidr: Ipv4Network) {
        let wanted = PodTraffic { network, pod_cidr, masquerade: self.masquerade };
        if self.wanted == Some(wanted) {
            return;
        }
        if let Some(to_thread) = &self.to_thread {
            // A thread that died (a panic) is reported by stop's join.
            let _ = to_thread.send(wanted);
        }
        self.wanted = Some(wanted);
    }

    /// The next check done on the rules' thread; pending for ever once the
    /// thread is gone. Cancel-safe: a check is never lost to a `select!`.
    pub async fn checked(&mut self) -> Checked {
        match self.from_thread.recv().await {
            Some(checked) => checked,
            None => std::future::pending().await,
        }
    }

    /// Logs a check's outcome: what it wrote, and each failure once until
    /// a check succeeds.
    pub fn report(&mut self, checked: Checked) -> Logged {
        let PodTraffic { network, pod_cidr, masquerade } = checked.traffic;
        match checked.result {
            Ok(changes) => {
                self.reported.clear();
                if !changes.any() {
                    return Logged::Nothing;
                }
                tracing::info!(
                    masquerade,
                    masquerade_written = changes.masquerade_written,
                    masquerade_removed = changes.masquerade_removed,
                    forward_accept_written = ?changes.forward_written,
                    %network, %pod_cidr,
                    "pod traffic rules in place (nftables table ip overlay; iptables FORWARD -> OVERLAY-FWD)"
                );
                Logged::Written
            }
            Err(err) => {
                let problem = crate::report::Chain(&err).to_string();
                if !self.reported.insert(problem.clone()) {
                    return Logged::Nothing;
                }
                tracing::error!(error = %problem, "installing the masquerade and FORWARD rules; will retry");
                Logged::Failed(problem)
            }
        }
    }

    /// Stops the rules' thread after the check under way, if any, and
    /// reports what the checks not reported yet did. The rules stay.
    pub fn stop(&mut self) {
        self.to_thread = None;
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the netfilter thread panicked; the rules are as it left them");
        }
        while let Ok(checked) = self.from_thread.try_recv() {
            self.report(checked);
        }
    }
}

impl Drop for PodTrafficRules {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What [`ensure`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// The masquerade table was (re)written.
    pub masquerade_written: bool,
    /// A stale masquerade table (of a run with masquerade on) was removed.
    pub masquerade_removed: bool,
    /// The iptables (`nft`, `legacy`) whose FORWARD rules were (re)written.
    pub forward_written: Vec<&'static str>,
}

impl Changes {
    pub fn any(&self) -> bool {
        self.masquerade_written || self.masquerade_removed || !self.forward_written.is_empty()
    }
}

/// What [`remove`] removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub masquerade_table: bool,
    /// Why a table named as ours was left: it is not the agent's.
    pub foreign_table: Option<String>,
    /// The iptables (`nft`, `legacy`) our FORWARD rules were removed from.
    pub forward: Vec<&'static str>,
}

/// Brings the node's rules to what `traffic` asks for, rewriting only what
/// is missing or different. Cheap enough to call every few seconds.
///
/// The FORWARD rules do not wait on the masquerade table: another tool's
/// table under our name is reported, and pod traffic the kernel forwards
/// still gets past a FORWARD policy of DROP.
pub fn ensure(traffic: &PodTraffic) -> Result<Changes, NetfilterError> {
    let mut changes = Changes::default();
    let mut foreign = None;
    match (traffic.masquerade, masquerade_table()?) {
        // Reported once the FORWARD rules are in.
        (true, Table::Foreign(what)) => foreign = Some(what),
        (true, table) => {
            let present = match table {
                Table::Ours(comments) => Some(comments),
                _ => None,
            };
            let wanted = masquerade_rules(traffic);
            let wanted_comments: Vec<&str> = wanted.iter().map(|(comment, _)| comment.as_str()).collect();
            if present.as_deref().map(|p| p.iter().map(String::as_str).collect::<Vec<_>>()) != Some(wanted_comments) {
                nft_batch(&replace_table_batch(&wanted))?;
                changes.masquerade_written = true;
            }
        }
        // A stale table of a run with masquerade on; another tool's under
        // the name stays.
        (false, Table::Ours(_)) => {
            nft_batch(&delete_table_batch())?;
            changes.masquerade_removed = true;
        }
        (false, _) => {}
    }
    for iptables in Iptables::with_filter_table()? {
        if iptables.ensure_forward(traffic.network)? {
            changes.forward_written.push(iptables.variant);
        }
    }
    match foreign {
        Some(what) => Err(NetfilterError::ForeignTable { what }),
        None => Ok(changes),
    }
}

/// Removes the masquerade table and the FORWARD rules, wherever present;
/// a table of that name that is not the agent's stays
/// ([`Removed::foreign_table`]).
pub fn remove() -> Result<Removed, NetfilterError> {
    let mut removed = Removed::default();
    match masquerade_table()? {
        Table::Absent => {}
        Table::Ours(_) => {
            nft_batch(&delete_table_batch())?;
            removed.masquerade_table = true;
        }
        Table::Foreign(what) => removed.foreign_table = Some(what),
    }
    for iptables in Iptables::with_filter_table()? {
        if iptables.remove_forward()? {
            removed.forward.push(iptables.variant);
        }
    }
    Ok(removed)
}

/// flannel's `FLANNEL-POSTRTG`, in its order, as (comment, nft JSON
/// expressions). The comments name the addresses, so a changed pod CIDR
/// or Network reads as different rules.
fn masquerade_rules(traffic: &PodTraffic) -> Vec<(String, Value)> {
    let (network, pod) = (traffic.network, traffic.pod_cidr);
    let addr = |field: &str, op: &str, net: Ipv4Network| {
        json!({"match": {"op": op, "left": {"payload": {"protocol": "ip", "field": field}},
                         "right": {"prefix": {"addr": net.network().to_string(), "len": net.prefix()}}}})
    };
    let multicast: Ipv4Network = MULTICAST.parse().expect("a valid CIDR");
    let masquerade = json!({"masquerade": {"flags": ["fully-random"]}});
    let ret = json!({"return": null});
    let counter = json!({"counter": null});
    vec![
        (
            "kube-proxy masquerades what it marked".to_owned(),
            json!([{"match": {"op": "==", "left": {"&": [{"meta": {"key": "mark"}}, KUBE_PROXY_MASQ_MARK]}, "right": KUBE_PROXY_MASQ_MARK}}, ret]),
        ),
        (format!("no NAT: pods {pod} to cluster {network}"), json!([addr("saddr", "==", pod), addr("daddr", "==", network), ret])),
        (format!("no NAT: cluster {network} to pods {pod}"), json!([addr("saddr", "==", network), addr("daddr", "==", pod), ret])),
        (format!("no NAT: outside to pods {pod}"), json!([addr("saddr", "!=", network), addr("daddr", "==", pod), ret])),
        (
            format!("masquerade: cluster {network} leaving it (not multicast)"),
            json!([addr("saddr", "==", network), addr("daddr", "!=", multicast), counter, masquerade]),
        ),
        (format!("masquerade: outside to cluster {network}"), json!([addr("saddr", "!=", network), addr("daddr", "==", network), counter, masquerade])),
    ]
}

/// One nft transaction that leaves exactly our table with `rules`: `add`
/// (a no-op if it exists) then `delete` makes the removal never fail, and
/// the kernel applies the whole batch or none of it, so no packet sees a
/// half-written table and a restart never duplicates a rule.
fn replace_table_batch(rules: &[(String, Value)]) -> Value {
    let mut batch = delete_table_batch()["nftables"].as_array().cloned().unwrap_or_default();
    batch.push(json!({"add": {"table": {"family": "ip", "name": NFT_TABLE}}}));
    batch.push(json!({"add": {"chain": {"family": "ip", "table": NFT_TABLE, "name": NFT_CHAIN,
        "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}}}));
    for (comment, expr) in rules {
        batch.push(json!({"add": {"rule": {"family": "ip", "table": NFT_TABLE, "chain": NFT_CHAIN, "comment": comment, "expr": expr}}}));
    }
    json!({"nftables": batch})
}

fn delete_table_batch() -> Value {
    json!({"nftables": [
        {"add": {"table": {"family": "ip", "name": NFT_TABLE}}},
        {"delete": {"table": {"family": "ip", "name": NFT_TABLE}}},
    ]})
}

/// The table named [`NFT_TABLE`], as nft lists it.
#[derive(Debug, PartialEq, Eq)]
enum Table {
    Absent,
    /// The agent's: the comments of its chain's rules, in order.
    Ours(Vec<String>),
    /// Someone else's, and what tells: never ours to rewrite or delete.
    Foreign(String),
}

/// Whether a listing of the table (`nft -j list table`) is one the agent
/// wrote: only [`NFT_CHAIN`], a NAT chain at postrouting, whose every rule
/// carries one of the agent's comments ([`is_our_rule_comment`]). Anything
/// else under that name (another chain, a set, a rule without such a
/// comment, an empty table:
/// the agent writes the table and its rules in one transaction) is
/// another tool's.
fn classify_table(listing: &Value) -> Table {
    let mut comments = Vec::new();
    let mut our_chain = false;
    for item in listing["nftables"].as_array().into_iter().flatten() {
        if item.get("metainfo").is_some() || item.get("table").is_some() {
            continue;
        }
        if let Some(chain) = item.get("chain") {
            if chain["name"] != NFT_CHAIN || chain["type"] != "nat" || chain["hook"] != "postrouting" {
                return Table::Foreign(format!("it has the chain {}", chain["name"].as_str().unwrap_or("?")));
            }
            our_chain = true;
        } else if let Some(rule) = item.get("rule") {
            match rule["comment"].as_str() {
                Some(comment) if rule["chain"] == NFT_CHAIN && is_our_rule_comment(comment) => comments.push(comment.to_owned()),
                _ => return Table::Foreign(format!("a rule in its chain {} carries no comment of the agent's", rule["chain"].as_str().unwrap_or("?"))),
            }
        } else {
            let kind = item.as_object().and_then(|o| o.keys().next().cloned()).unwrap_or_default();
            return Table::Foreign(format!("it holds a {kind}"));
        }
    }
    if our_chain { Table::Ours(comments) } else { Table::Foreign("it has no chain of the agent's".to_owned()) }
}

/// Whether `comment` is one [`masquerade_rules`] writes (every release
/// has written these): another tool's comment makes the table its own.
fn is_our_rule_comment(comment: &str) -> bool {
    const OURS: [&str; 3] = ["kube-proxy masquerades what it marked", "no NAT: ", "masquerade: "];
    OURS.iter().any(|ours| comment.starts_with(ours))
}

/// Our table, if there is one ([`classify_table`]).
fn masquerade_table() -> Result<Table, NetfilterError> {
    let Some(listing) = list_table()? else { return Ok(Table::Absent) };
    Ok(classify_table(&listing))
}

/// `nft -j list table ip overlay`; `None` when the table does not exist.
fn list_table() -> Result<Option<Value>, NetfilterError> {
    let out = Command::new("nft")
        .args(["-j", "list", "table", "ip", NFT_TABLE])
        .output()
        .map_err(|e| spawn_error("nft", "nftables", ", or run the agent with --ip-masq=false", e))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("No such file or directory") {
            return Ok(None);
        }
        return Err(failed("nft", &["-j", "list", "table", "ip", NFT_TABLE], out.status, &stderr));
    }
    serde_json::from_slice(&out.stdout).map(Some).map_err(NetfilterError::Json)
}

fn nft_batch(batch: &Value) -> Result<(), NetfilterError> {
    let hint = ", or run the agent with --ip-masq=false";
    let mut child = Command::new("nft")
        .args(["-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| spawn_error("nft", "nftables", hint, e))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let written = stdin.write_all(batch.to_string().as_bytes());
    drop(stdin);
    let out = child.wait_with_output().map_err(|source| NetfilterError::Spawn { program: "nft".into(), source })?;
    written.map_err(|source| NetfilterError::Spawn { program: "nft".into(), source })?;
    if !out.status.success() {
        return Err(failed("nft", &["-j", "-f", "-"], out.status, &String::from_utf8_lossy(&out.stderr)));
    }
    Ok(())
}

/// One of the two iptables implementations, when it has a filter table.
struct Iptables {
    /// `nft` or `legacy`.
    variant: &'static str,
    program: &'static str,
}

impl Iptables {
    /// The iptables whose filter table exists. Looking must not create
    /// one: listing with iptables-legacy instantiates its filter table,
    /// so legacy's presence is read from `/proc/net/ip_tables_names`;
    /// iptables-nft's table is an nftables table, which `nft` lists without
    /// creating.
    fn with_filter_table() -> Result<Vec<Self>, NetfilterError> {
        let mut found = Vec::new();
        let nft_filter = Command::new("nft")
            .args(["list", "table", "ip", "filter"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| spawn_error("nft", "nftables", "", e))?;
        if nft_filter.success() {
            found.push(Self { variant: "nft", program: "iptables-nft" });
        }
        let legacy = match std::fs::read_to_string("/proc/net/ip_tables_names") {
            Ok(names) => names.lines().any(|l| l.trim() == "filter"),
            // No ip_tables module: no legacy table can drop anything.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(source) => return Err(NetfilterError::Read { what: "/proc/net/ip_tables_names", source }),
        };
        if legacy {
            found.push(Self { variant: "legacy", program: "iptables-legacy" });
        }
        Ok(found)
    }

    fn accept_rules(network: Ipv4Network) -> [Vec<String>; 2] {
        let rule = |direction: &str| {
            [direction, &network.to_string(), "-m", "comment", "--comment", FORWARD_COMMENT, "-j", "ACCEPT"].map(str::to_owned).to_vec()
        };
        [rule("-s"), rule("-d")]
    }

    fn jump_rule() -> Vec<String> {
        ["-m", "comment", "--comment", FORWARD_COMMENT, "-j", FORWARD_CHAIN].map(str::to_owned).to_vec()
    }

    /// Makes FORWARD jump to our chain, which accepts traffic from and to
    /// `network` (flannel's FLANNEL-FWD). The jump is appended, as
    /// flannel's: rules an operator put before it still decide first, and
    /// only the DROP policy at the end is what it overrides. Returns
    /// whether anything was written.
    fn ensure_forward(&self, network: Ipv4Network) -> Result<bool, NetfilterError> {
        let accepts = Self::accept_rules(network);
        let chain_ok = self.check(&["-S", FORWARD_CHAIN])?
            && self.rules_of_chain()? == accepts.len()
            && accepts.iter().all(|rule| self.check_rule(FORWARD_CHAIN, rule).unwrap_or(false));
        let jump_ok = self.check_rule("FORWARD", &Self::jump_rule())?;
        if chain_ok && jump_ok {
            return Ok(false);
        }
        if !chain_ok {
            if self.check(&["-S", FORWARD_CHAIN])? {
                self.run(&["-t", "filter", "-F", FORWARD_CHAIN])?;
            } else {
                self.run(&["-t", "filter", "-N", FORWARD_CHAIN])?;
            }
            for rule in &accepts {
                let mut args = vec!["-t", "filter", "-A", FORWARD_CHAIN];
                args.extend(rule.iter().map(String::as_str));
                self.run(&args)?;
            }
        }
        if !jump_ok {
            let mut args = vec!["-t", "filter", "-A", "FORWARD"];
            let jump = Self::jump_rule();
            args.extend(jump.iter().map(String::as_str));
            self.run(&args)?;
        }
        Ok(true)
    }

    /// Removes the jump (every copy) and our chain. Returns whether there
    /// was anything to remove.
    fn remove_forward(&self) -> Result<bool, NetfilterError> {
        let jump = Self::jump_rule();
        let mut removed = false;
        while self.check_rule("FORWARD", &jump)? {
            let mut args = vec!["-t", "filter", "-D", "FORWARD"];
            args.extend(jump.iter().map(String::as_str));
            self.run(&args)?;
            removed = true;
        }
        if self.check(&["-S", FORWARD_CHAIN])? {
            self.run(&["-t", "filter", "-F", FORWARD_CHAIN])?;
            self.run(&["-t", "filter", "-X", FORWARD_CHAIN])?;
            removed = true;
        }
        Ok(removed)
    }

    fn rules_of_chain(&self) -> Result<usize, NetfilterError> {
        let out = self.output(&["-t", "filter", "-S", FORWARD_CHAIN])?;
        Ok(out.lines().filter(|l| l.starts_with("-A ")).count())
    }

    fn check_rule(&self, chain: &str, rule: &[String]) -> Result<bool, NetfilterError> {
        let mut args = vec!["-C", chain];
        args.extend(rule.iter().map(String::as_str));
        self.check(&args)
    }

    /// Runs a query whose exit status is the answer: 0 yes; 1 no (no such
    /// rule or chain); 2 no, for a rule that jumps to a chain not made yet
    /// (a parameter problem otherwise, which the write that follows
    /// reports). Any other status is no answer: 4 is the xtables lock still
    /// held after our wait (kube-proxy restoring a large ruleset), and
    /// taking that for "absent" would append a second jump, flush our
    /// chain, or have `cleanup` report nothing to remove.
    fn check(&self, args: &[&str]) -> Result<bool, NetfilterError> {
        let mut full = vec!["-w", "5", "-t", "filter"];
        full.extend_from_slice(args);
        let out = Command::new(self.program)
            .args(&full)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| spawn_error(self.program, "iptables", "", e))?;
        match out.status.code() {
            Some(0) => Ok(true),
            Some(1 | 2) => Ok(false),
            _ => Err(failed(self.program, &full, out.status, &String::from_utf8_lossy(&out.stderr))),
        }
    }

    fn run(&self, args: &[&str]) -> Result<(), NetfilterError> {
        self.output(args).map(drop)
    }

    fn output(&self, args: &[&str]) -> Result<String, NetfilterError> {
        let mut full = vec!["-w", "5"];
        full.extend_from_slice(args);
        let out = Command::new(self.program)
            .args(&full)
            .output()
            .map_err(|e| spawn_error(self.program, "iptables", "", e))?;
        if !out.status.success() {
            return Err(failed(self.program, &full, out.status, &String::from_utf8_lossy(&out.stderr)));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn spawn_error(program: &str, package: &'static str, hint: &'static str, source: std::io::Error) -> NetfilterError {
    if source.kind() == std::io::ErrorKind::NotFound {
        NetfilterError::Missing { program: program.to_owned(), package, hint }
    } else {
        NetfilterError::Spawn { program: program.to_owned(), source }
    }
}

fn failed(program: &str, args: &[&str], status: std::process::ExitStatus, stderr: &str) -> NetfilterError {
    NetfilterError::Failed { program: program.to_owned(), args: args.join(" "), status, stderr: stderr.trim().to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `iptables` that answers every call with `status` and logs its
    /// arguments, one call per line: the real one cannot be made to find
    /// its lock held on demand.
    fn fake_iptables(dir: &std::path::Path, status: i32) -> (Iptables, std::path::PathBuf) {
        use std::os::unix::fs::PermissionsExt as _;
        let log = dir.join("calls");
        let program = dir.join("iptables");
        std::fs::write(&program, format!("#!/bin/sh\necho \"$*\" >> {}\necho 'Another app is currently holding the xtables lock' >&2\nexit {status}\n", log.display())).unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        let program: &'static str = Box::leak(program.display().to_string().into_boxed_str());
        (Iptables { variant: "nft", program }, log)
    }

    /// The xtables lock held past our wait (exit status 4) is no answer:
    /// nothing is written on it, and neither ensuring nor removing our
    /// rules reports success. (Shown failing before: it read as "absent",
    /// so ensuring went on to create the chain, and removing found nothing
    /// to remove.)
    #[test]
    fn iptables_that_cannot_answer_is_not_taken_for_absent_rules() {
        let dir = std::env::temp_dir().join(format!("overlay-fake-iptables-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (iptables, log) = fake_iptables(&dir, 4);
        let error = iptables.ensure_forward("10.244.0.0/16".parse().unwrap()).expect_err("ensuring under a held lock");
        let message = error.to_string();
        assert!(message.contains("xtables lock"), "{message}");
        let removing = iptables.remove_forward();
        let calls = std::fs::read_to_string(&log).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(removing.is_err(), "removing under a held lock: {removing:?}");
        for line in calls.lines() {
            assert!(line.contains(" -C ") || line.contains(" -S "), "a write without an answer: {line}");
        }
    }

    fn traffic() -> PodTraffic {
        PodTraffic { network: "10.244.0.0/16".parse().unwrap(), pod_cidr: "10.244.1.0/24".parse().unwrap(), masquerade: true }
    }

    #[test]
    fn only_a_table_as_the_agent_writes_it_is_the_agents() {
        let listing = |items: Vec<Value>| {
            let mut all = vec![json!({"metainfo": {"version": "1.0.6"}}), json!({"table": {"family": "ip", "name": "overlay"}})];
            all.extend(items);
            json!({"nftables": all})
        };
        let chain = |name: &str, kind: &str| json!({"chain": {"family": "ip", "table": "overlay", "name": name, "type": kind, "hook": "postrouting", "prio": 100, "policy": "accept"}});
        let rule = |chain: &str, comment: Option<&str>| {
            let mut rule = json!({"family": "ip", "table": "overlay", "chain": chain, "expr": []});
            if let Some(comment) = comment {
                rule["comment"] = json!(comment);
            }
            json!({"rule": rule})
        };
        let (a, b) = ("kube-proxy masquerades what it marked", "no NAT: pods 10.244.1.0/24 to cluster 10.244.0.0/16");
        let ours = listing(vec![chain("postrouting", "nat"), rule("postrouting", Some(a)), rule("postrouting", Some(b))]);
        assert_eq!(classify_table(&ours), Table::Ours(vec![a.to_owned(), b.to_owned()]));
        assert!(masquerade_rules(&traffic()).iter().all(|(comment, _)| is_our_rule_comment(comment)), "every comment the agent writes is known for its own");
        // Its rules flushed (an operator's `nft flush chain`): still the agent's chain.
        assert_eq!(classify_table(&listing(vec![chain("postrouting", "nat")])), Table::Ours(vec![]));
        for (foreign, tells) in [
            (listing(vec![chain("postrouting", "nat"), chain("forward", "filter")]), "the chain forward"),
            (listing(vec![chain("postrouting", "filter")]), "the chain postrouting"),
            (listing(vec![chain("postrouting", "nat"), rule("postrouting", None)]), "no comment"),
            // Another tool's comment is not the agent's (shown failing
            // before: any comment made the table the agent's).
            (listing(vec![chain("postrouting", "nat"), rule("postrouting", Some(a)), rule("postrouting", Some("an operator's rule"))]), "no comment"),
            (listing(vec![chain("postrouting", "nat"), json!({"set": {"name": "s"}})]), "holds a set"),
            (listing(vec![]), "no chain"),
        ] {
            match classify_table(&foreign) {
                Table::Foreign(what) => assert!(what.contains(tells), "{what}"),
                other => panic!("{foreign} read as {other:?}"),
            }
        }
    }

    #[test]
    fn masquerade_rules_are_flannels_in_its_order() {
        let rules = masquerade_rules(&traffic());
        let text: Vec<String> = rules.iter().map(|(_, expr)| expr.to_string()).collect();
        assert_eq!(rules.len(), 6);
        assert!(text[0].contains("\"mark\"") && text[0].contains("16384") && text[0].contains("return"));
        // pod to pod: no NAT, before any masquerade.
        assert!(text[1].contains("10.244.1.0") && text[1].contains("10.244.0.0") && text[1].contains("return"));
        // Leaving the cluster: masqueraded, fully random, never multicast.
        assert!(text[4].contains("\"!=\"") && text[4].contains("224.0.0.0") && text[4].contains("fully-random"));
        assert!(rules.iter().filter(|(_, e)| e.to_string().contains("masquerade")).all(|(_, e)| e.to_string().contains("fully-random")));
    }

    /// A writer answering from a script, one outcome per check, then
    /// success; it counts its checks.
    struct Scripted {
        outcomes: std::collections::VecDeque<Result<Changes, NetfilterError>>,
        checks: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl RuleWriter for Scripted {
        fn ensure(&mut self, _traffic: &PodTraffic) -> Result<Changes, NetfilterError> {
            self.checks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.outcomes.pop_front().unwrap_or_else(|| Ok(Changes::default()))
        }
    }

    fn missing() -> Result<Changes, NetfilterError> {
        Err(NetfilterError::Missing { program: "nft".into(), package: "nftables", hint: "" })
    }

    #[tokio::test]
    async fn rules_are_checked_again_unasked_and_each_failure_is_logged_once_until_a_check_succeeds() {
        let flushed = Ok(Changes { forward_written: vec!["nft"], ..Changes::default() });
        let outcomes = [missing(), missing(), flushed, Ok(Changes::default()), missing()].into_iter().collect();
        let checks = std::sync::Arc::default();
        let mut rules = PodTrafficRules::with_writer(true, Scripted { outcomes, checks: std::sync::Arc::clone(&checks) }, Duration::from_millis(5));
        rules.keep(traffic().network, traffic().pod_cidr);
        let mut logged = Vec::new();
        for _ in 0..5 {
            let checked = tokio::time::timeout(Duration::from_secs(5), rules.checked()).await.expect("a re-check within 5 s");
            assert_eq!(checked.traffic, traffic());
            logged.push(rules.report(checked));
        }
        let failed = Logged::Failed("running nft: not found on PATH; install it (Debian: apt-get install nftables)".into());
        // Someone flushed our FORWARD rules between the 2nd and 3rd checks:
        // the re-check, which no event asked for, wrote them again.
        assert_eq!(logged, [failed.clone(), Logged::Nothing, Logged::Written, Logged::Nothing, failed]);
        drop(rules);
        let after_stop = checks.load(std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(checks.load(std::sync::atomic::Ordering::SeqCst), after_stop, "no check after the rules are dropped");
    }

    /// A writer whose one check takes a while, and says when it is done.
    struct Slow(std::sync::Arc<std::sync::atomic::AtomicU8>);

    impl RuleWriter for Slow {
        fn ensure(&mut self, _traffic: &PodTraffic) -> Result<Changes, NetfilterError> {
            self.0.store(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(200));
            self.0.store(2, std::sync::atomic::Ordering::SeqCst);
            Ok(Changes::default())
        }
    }

    #[test]
    fn stopping_waits_for_the_check_under_way() {
        let state = std::sync::Arc::default();
        let mut rules = PodTrafficRules::with_writer(true, Slow(std::sync::Arc::clone(&state)), Duration::from_secs(3600));
        rules.keep(traffic().network, traffic().pod_cidr);
        while state.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(rules);
        // Else the agent could exit half way through writing FORWARD, or
        // leave an iptables process adding a rule after `cleanup`.
        assert_eq!(state.load(std::sync::atomic::Ordering::SeqCst), 2, "the check under way must finish before the rules are dropped");
    }

    #[test]
    fn a_changed_pod_cidr_reads_as_different_rules() {
        let mut other = traffic();
        other.pod_cidr = "10.244.2.0/24".parse().unwrap();
        let comments = |t: &PodTraffic| masquerade_rules(t).into_iter().map(|(c, _)| c).collect::<Vec<_>>();
        assert_ne!(comments(&traffic()), comments(&other));
    }
}
