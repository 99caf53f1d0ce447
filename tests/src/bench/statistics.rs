//! Statistics over a report: medians and spreads per variant, ratios to a
//! baseline paired by round, the machine's background load, and the check
//! that a finished run produced every figure.

use std::collections::BTreeMap;

use super::{Metric, Report, Variant, measurement::Test, variants::Setup};

/// Median and spread of one metric of one variant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

/// The median of `values`, or `None` when there are none.
fn median_of(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut values: Vec<f64> = values.collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(median(&values))
}

pub fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 }
}

impl Report {
    /// The value of `metric` for `variant`, per round.
    pub fn samples(&self, variant: &str, metric: Metric) -> BTreeMap<usize, f64> {
        self.records
            .iter()
            .filter(|r| r.variant == variant)
            .filter_map(|r| r.values.get(metric.key()).map(|v| (r.round, *v)))
            .collect()
    }

    pub fn stat(&self, variant: &str, metric: Metric) -> Option<Stat> {
        Self::stat_of(self.samples(variant, metric).into_values().collect())
    }

    /// The median, min and max over rounds of a side figure of `test`
    /// (a key of [`super::Record::extra`]), where its records have it.
    pub fn extra_stat(&self, variant: &str, test: &str, key: &str) -> Option<Stat> {
        Self::stat_of(
            self.records
                .iter()
                .filter(|r| r.variant == variant && r.test == test)
                .filter_map(|r| r.extra.get(key).copied())
                .collect(),
        )
    }

    fn stat_of(mut values: Vec<f64>) -> Option<Stat> {
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        Some(Stat { median: median(&values), min: values[0], max: values[values.len() - 1], n: values.len() })
    }

    /// `variant` over `base`, paired by round: the median of the per-round
    /// ratios, with their min and max. Both ran minutes apart at most in a
    /// round, so a shared machine's drift between rounds cancels; a ratio
    /// of medians would mix a quiet round of one with a loaded one of the
    /// other.
    pub fn paired_ratio(&self, variant: &str, base: &str, metric: Metric) -> Option<Stat> {
        let base = self.samples(base, metric);
        let mut ratios: Vec<f64> = self
            .samples(variant, metric)
            .into_iter()
            .filter_map(|(round, v)| base.get(&round).map(|b| v / b))
            .collect();
        if ratios.is_empty() {
            return None;
        }
        ratios.sort_by(f64::total_cmp);
        Some(Stat { median: median(&ratios), min: ratios[0], max: ratios[ratios.len() - 1], n: ratios.len() })
    }

    /// The headline ratio: the median of the per-round ratios.
    pub fn ratio(&self, variant: &str, base: &str, metric: Metric) -> Option<f64> {
        self.paired_ratio(variant, base, metric).map(|r| r.median)
    }

    pub(super) fn has(&self, variant: Variant) -> bool {
        self.variants.iter().any(|v| v.key == variant.key())
    }

    pub(super) fn rounds(&self) -> usize {
        self.records.iter().map(|r| r.round + 1).max().unwrap_or(0)
    }

    /// How many CPUs the CPU figures cover: the pinned one, or all.
    fn accounted_cpus(&self) -> f64 {
        if self.meta.pinned_cpu.is_some() { 1.0 } else { self.meta.cpus.max(1) as f64 }
    }

    /// The background CPU share of the machine, median over rounds.
    pub(super) fn background_share(&self) -> Option<f64> {
        median_of(
            self
                .background
                .iter()
                .map(|c| c.kernel() / (f64::from(self.meta.seconds) * self.accounted_cpus())),
        )
    }

    /// User-space CPU during the iperf3 tests, as a share of the machine:
    /// our tools use little of it, so it is mostly other jobs' load.
    pub(super) fn user_share_during_tests(&self) -> Option<f64> {
        median_of(
            self
                .records
                .iter()
                .filter(|r| r.test != Test::UdpPingPong.key() && r.test != Test::TcpPingPong.key() && r.wall > 0.0)
                .map(|r| r.cpu.user / (r.wall * self.accounted_cpus())),
        )
    }

    pub(super) fn background_user_share(&self) -> Option<f64> {
        median_of(
            self
                .background
                .iter()
                .map(|c| c.user / (f64::from(self.meta.seconds) * self.accounted_cpus())),
        )
    }
}

/// Checks a finished report: every variant produced every metric, every
/// value positive, and our variants' counters show our programs carried
/// traffic. Returns what is missing.
pub fn problems(report: &Report) -> Vec<String> {
    report
        .underlays()
        .into_iter()
        .flat_map(|u| problems_of_one_underlay(&report.for_underlay(u)).into_iter().map(move |p| format!("{} underlay: {p}", u.key())))
        .collect()
}

fn problems_of_one_underlay(report: &Report) -> Vec<String> {
    let mut problems = Vec::new();
    for v in &report.variants {
        for metric in Metric::ALL {
            match report.stat(&v.key, metric) {
                None => problems.push(format!("{}: no {}", v.key, metric.key())),
                Some(s) if !(s.min > 0.0 && s.max.is_finite()) => {
                    problems.push(format!("{}: {} is {:?}", v.key, metric.key(), s));
                }
                Some(_) => {}
            }
        }
        let counter = |name: &str| v.counters.get(name).copied().unwrap_or(0);
        match Variant::from_key(&v.key).map(Variant::setup) {
            Some(Setup::Ours { backend: "vxlan", .. }) if counter("encap_packets") == 0 || counter("decap_packets") == 0 => {
                problems.push(format!("{}: our counters show no VXLAN traffic: {:?}", v.key, v.counters));
            }
            Some(Setup::Ours { backend: "host-gw", .. }) if counter("direct_packets") == 0 => {
                problems.push(format!("{}: our counters show no direct traffic: {:?}", v.key, v.counters));
            }
            _ => {}
        }
        match Variant::from_key(&v.key).map(Variant::setup) {
            Some(Setup::Ours { forward: "bpf", .. }) if counter("fastpath_packets") == 0 => {
                problems.push(format!("{}: our counters show no fast-path traffic: {:?}", v.key, v.counters));
            }
            _ => {}
        }
        let drops: u64 = v.counters.iter().filter(|(k, _)| k.starts_with("drop_")).map(|(_, v)| v).sum();
        if drops > 0 {
            problems.push(format!("{}: our datapath dropped packets: {:?}", v.key, v.counters));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[1.0, 2.0, 9.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 4.0, 9.0]), 3.0);
    }
}
