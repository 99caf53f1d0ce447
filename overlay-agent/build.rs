//! Builds the eBPF programs (`overlay-ebpf`) with aya-build and leaves the
//! object at `$OUT_DIR/overlay` for `include_bytes_aligned!`.
//!
//! `OVERLAY_EBPF_BUILD` decides what happens when no eBPF toolchain is found:
//! - unset (`auto`): build when a toolchain is there, otherwise embed an empty
//!   placeholder and warn; the agent then refuses to start with a clear error.
//!   This keeps `cargo check` and clippy working without the eBPF toolchain.
//! - `require`: a missing toolchain is a build error (xtask and CI use this).
//! - `skip`: always embed the placeholder (fast lint builds).

use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};

use overlay_toolchain as toolchain;

const OVERLAY_EBPF_BUILD: &str = "OVERLAY_EBPF_BUILD";
const OUT_DIR: &str = "OUT_DIR";
const OBJECT_NAME: &str = "overlay";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed={OVERLAY_EBPF_BUILD}");
    println!("cargo:rerun-if-env-changed={}", toolchain::OVERLAY_EBPF_TOOLCHAIN);
    let out_dir = PathBuf::from(env::var_os(OUT_DIR).ok_or_else(|| anyhow!("{OUT_DIR} not set"))?);
    let object = out_dir.join(OBJECT_NAME);

    let mode = env::var(OVERLAY_EBPF_BUILD).unwrap_or_else(|_| "auto".to_owned());
    let chosen = match mode.as_str() {
        "skip" => None,
        "auto" | "require" => match toolchain::detect() {
            Ok(chosen) => Some(chosen),
            Err(missing) if mode == "require" => {
                return Err(anyhow!("{OVERLAY_EBPF_BUILD}=require, but {missing}"));
            }
            Err(missing) => {
                for line in missing.to_string().lines() {
                    println!("cargo:warning={line}");
                }
                None
            }
        },
        other => {
            return Err(anyhow!(
                "{OVERLAY_EBPF_BUILD}={other} is not one of auto, require, skip"
            ));
        }
    };

    let Some(chosen) = chosen else {
        println!("cargo:warning=embedding an empty eBPF object; the agent will refuse to load it");
        // Rerun once the toolchain appears.
        println!("cargo:rerun-if-changed={}", toolchain::cargo_bin_dir().display());
        fs::write(&object, []).with_context(|| format!("writing {}", object.display()))?;
        return Ok(());
    };

    if chosen.needs_bootstrap {
        // SAFETY: build scripts are single-threaded at this point.
        unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };
    }
    // aya-build runs bpf-linker through cargo; make sure it is on PATH even
    // when ~/.cargo/bin is not (fresh root shells).
    let path = env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = env::split_paths(&path).collect();
    dirs.push(toolchain::cargo_bin_dir());
    // SAFETY: as above.
    unsafe { env::set_var("PATH", env::join_paths(dirs)?) };

    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("../overlay-ebpf").canonicalize()?;
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path to overlay-ebpf")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "overlay-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&chosen.name),
    )
    .with_context(|| format!("building overlay-ebpf with toolchain {} ({})", chosen.name, chosen.reason))?;
    Ok(())
}
