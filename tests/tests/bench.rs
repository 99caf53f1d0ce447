//! The benchmark harness itself: a quick run (1 round, 1 s per test) of
//! every default variant on both underlays must move traffic through each
//! and produce every figure. No timing is asserted: CI machines are shared
//! and noisy.

use std::{process::Command, time::Instant};

use overlay_tests::{
    TempDir, agent_binary,
    bench::{DEFAULT_VARIANTS, Metric, problems, read_report, summary_line},
    lab::Underlay,
    require_root, unique_name,
};

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn quick_run_measures_every_variant_and_leaves_nothing_behind() {
    require_root();
    // overlay-bench creates it.
    let out_dir = TempDir::at(std::env::temp_dir().join(unique_name("ovbench-out")));
    let out = out_dir.path();
    let started = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_overlay-bench"))
        .arg("--agent")
        .arg(agent_binary())
        .arg("--quick")
        .arg("--out")
        .arg(out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting overlay-bench");
    let prefix = format!("ovbench{}", child.id() % 100_000);
    let run = child.wait_with_output().expect("waiting for overlay-bench");
    eprintln!("quick bench took {:.0} s", started.elapsed().as_secs_f64());
    assert!(
        run.status.success(),
        "overlay-bench --quick failed ({}):\n{}\n{}",
        run.status,
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );

    let report = read_report(&out.join("results.json")).expect("results.json");
    assert_eq!(problems(&report), Vec::<String>::new());
    assert_eq!(report.underlays(), Underlay::ALL.to_vec(), "both underlays by default");
    for underlay in Underlay::ALL {
        let part = report.for_underlay(underlay);
        let keys: Vec<&str> = part.variants.iter().map(|v| v.key.as_str()).collect();
        assert_eq!(keys, DEFAULT_VARIANTS.map(|v| v.key()), "{} underlay", underlay.key());
        for v in DEFAULT_VARIANTS {
            for metric in Metric::ALL {
                let stat = part
                    .stat(v.key(), metric)
                    .unwrap_or_else(|| panic!("{} on {} has no {}", v.key(), underlay.key(), metric.key()));
                assert!(stat.median > 0.0 && stat.median.is_finite(), "{} {} {}: {stat:?}", underlay.key(), v.key(), metric.key());
            }
        }
    }
    let markdown = std::fs::read_to_string(out.join("results.md")).expect("results.md");
    for expected in [
        "## Wire-like underlay",
        "## Container-style underlay",
        "kernel vxlan (flannel)",
        "ours: VXLAN",
        "Ratios to flannel's kernel vxlan",
        "Targets of issue 12",
        "share one interleaved schedule",
    ] {
        assert!(markdown.contains(expected), "results.md lacks {expected:?}");
    }
    assert_eq!(markdown.matches("### Ratios to flannel's kernel vxlan").count(), 2, "one ratio table per underlay");
    let summary = summary_line(&report);
    assert!(summary.contains("wire-like underlay") && summary.contains("container-style underlay"), "{summary}");
    let svg = std::fs::read_to_string(out.join("results.svg")).expect("results.svg");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>") && svg.matches("<rect").count() > 80 && svg.contains("container-style underlay"), "results.svg looks wrong");
    drop(out_dir);

    let namespaces = String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output().expect("ip netns list").stdout).into_owned();
    let left: Vec<&str> = namespaces.lines().filter(|l| l.starts_with(&prefix)).collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    for dir in [overlay_agent::bpffs::BPFFS_MOUNT.into(), std::env::temp_dir()] {
        let left: Vec<_> = std::fs::read_dir(&dir)
            .map(|entries| entries.flatten().map(|e| e.file_name()).filter(|n| n.to_string_lossy().starts_with(&prefix)).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "left behind in {}: {left:?}", dir.display());
    }
}
