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
//! tables have no library at all. These commands run at start, when the
//! pod CIDR changes and at housekeeping (every few seconds, a check that
//! rewrites only what is missing), never per Node event.
//!
//! Rules stay in place when the agent stops, so traffic keeps flowing
//! across restarts; a restart finds them and adds nothing. `cleanup`
//! removes them.

use std::{
    io::Write as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
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

/// How often [`PodTrafficRules::keep`] looks again at rules it wrote
/// (flannel: `--iptables-resync`, 5 s): someone flushing FORWARD, or a
/// firewall reload, is repaired within this.
pub const RECHECK: Duration = Duration::from_secs(5);

/// The agent's side of the rules: what it last wrote, and when it last
/// looked, so that Node events (thousands in a relist) start no process.
#[derive(Debug)]
pub struct PodTrafficRules {
    masquerade: bool,
    applied: Option<PodTraffic>,
    checked: Option<Instant>,
}

impl PodTrafficRules {
    pub fn new(masquerade: bool) -> Self {
        Self { masquerade, applied: None, checked: None }
    }

    /// Whether traffic leaving the cluster is masqueraded (what
    /// `subnet.env`'s `FLANNEL_IPMASQ` must say).
    pub fn masquerade(&self) -> bool {
        self.masquerade
    }

    /// [`ensure`]s the rules for `network` and our `pod_cidr` when they
    /// changed, or when the last look (successful or not) is [`RECHECK`]
    /// old: a failure is retried at that pace, not on every Node event.
    /// Returns `None` when it was not time to look.
    pub fn keep(&mut self, network: Ipv4Network, pod_cidr: Ipv4Network) -> Option<Result<Changes, NetfilterError>> {
        let wanted = PodTraffic { network, pod_cidr, masquerade: self.masquerade };
        let due = self.applied != Some(wanted) || self.checked.is_none_or(|at| at.elapsed() >= RECHECK);
        if !due {
            return None;
        }
        let result = ensure(&wanted);
        self.applied = Some(wanted);
        self.checked = Some(Instant::now());
        Some(result)
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
    /// The iptables (`nft`, `legacy`) our FORWARD rules were removed from.
    pub forward: Vec<&'static str>,
}

/// Brings the node's rules to what `traffic` asks for, rewriting only what
/// is missing or different. Cheap enough to call every few seconds.
pub fn ensure(traffic: &PodTraffic) -> Result<Changes, NetfilterError> {
    let mut changes = Changes::default();
    let present = masquerade_comments()?;
    if traffic.masquerade {
        let wanted = masquerade_rules(traffic);
        let wanted_comments: Vec<&str> = wanted.iter().map(|(comment, _)| comment.as_str()).collect();
        if present.as_deref().map(|p| p.iter().map(String::as_str).collect::<Vec<_>>()) != Some(wanted_comments) {
            nft_batch(&replace_table_batch(&wanted))?;
            changes.masquerade_written = true;
        }
    } else if present.is_some() {
        nft_batch(&delete_table_batch())?;
        changes.masquerade_removed = true;
    }
    for iptables in Iptables::with_filter_table()? {
        if iptables.ensure_forward(traffic.network)? {
            changes.forward_written.push(iptables.variant);
        }
    }
    Ok(changes)
}

/// Removes the masquerade table and the FORWARD rules, wherever present.
pub fn remove() -> Result<Removed, NetfilterError> {
    let mut removed = Removed::default();
    if masquerade_comments()?.is_some() {
        nft_batch(&delete_table_batch())?;
        removed.masquerade_table = true;
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

/// The comments of the rules in our table's chain, in order; `None` when
/// the table does not exist.
fn masquerade_comments() -> Result<Option<Vec<String>>, NetfilterError> {
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
    let listing: Value = serde_json::from_slice(&out.stdout).map_err(NetfilterError::Json)?;
    let comments = listing["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| item.get("rule"))
        .filter(|rule| rule["chain"] == NFT_CHAIN)
        .map(|rule| rule["comment"].as_str().unwrap_or_default().to_owned())
        .collect();
    Ok(Some(comments))
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

    /// Runs a query whose exit status is the answer.
    fn check(&self, args: &[&str]) -> Result<bool, NetfilterError> {
        let mut full = vec!["-w", "5", "-t", "filter"];
        full.extend_from_slice(args);
        let status = Command::new(self.program)
            .args(&full)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| spawn_error(self.program, "iptables", "", e))?;
        Ok(status.success())
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

    fn traffic() -> PodTraffic {
        PodTraffic { network: "10.244.0.0/16".parse().unwrap(), pod_cidr: "10.244.1.0/24".parse().unwrap(), masquerade: true }
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

    #[test]
    fn a_changed_pod_cidr_reads_as_different_rules() {
        let mut other = traffic();
        other.pod_cidr = "10.244.2.0/24".parse().unwrap();
        let comments = |t: &PodTraffic| masquerade_rules(t).into_iter().map(|(c, _)| c).collect::<Vec<_>>();
        assert_ne!(comments(&traffic()), comments(&other));
    }
}
