//! Go programs the tests run (kube-apiserver, kube-controller-manager, kube-scheduler, ...),
//! built from the Go module proxy once per machine and cached under
//! `~/.cache/overlay/<name>-<version>/bin`, keyed by a stamp file.
//!
//! [`build_go_packages`] is generic: a scratch module that requires a set of
//! modules (with `replace` lines where needed), `go build` of some of their
//! main packages (or of main packages written into the scratch module) into
//! the cache. Its users: [`kubernetes`] and [`flanneld`].

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};

/// The kubernetes release the tests run, shared with the tests crate
/// (`overlay_tests::control_plane`), which finds the binaries by it.
pub const KUBERNETES_VERSION: &str = include_str!("../../tests/kubernetes-version.txt");

/// The Go programs the Kubernetes tests and `lab --kubernetes` run.
pub const KUBERNETES_PACKAGES: [&str; 3] =
    ["k8s.io/kubernetes/cmd/kube-apiserver", "k8s.io/kubernetes/cmd/kube-controller-manager", "k8s.io/kubernetes/cmd/kube-scheduler"];

/// The scratch module's path.
const SCRATCH_MODULE: &str = "overlay.invalid/gotools";

/// What to build: a scratch module's requirements and replacements, and the
/// main packages to build from them.
#[derive(Debug, Clone)]
pub struct GoBuild {
    /// The cache entry's name, e.g. `kubernetes-v1.37.2`.
    pub key: String,
    /// `module version` requirements.
    pub require: Vec<(String, String)>,
    /// `module => module version` replacements.
    pub replace: Vec<(String, String)>,
    /// Main packages; each binary is named after the package's last element.
    pub packages: Vec<String>,
    /// `go build -ldflags` (`-s -w` strips; `-X` sets version variables).
    pub ldflags: String,
    /// Files written into the scratch module (path inside it, contents):
    /// main packages of our own, built as `overlay.invalid/gotools/<dir>`.
    pub sources: Vec<(String, String)>,
    /// Build with cgo (flanneld's udp backend is C), else `CGO_ENABLED=0`.
    pub cgo: bool,
}

impl GoBuild {
    /// The scratch module's go.mod.
    fn go_mod(&self) -> String {
        let mut text = format!("module {SCRATCH_MODULE}\n\ngo 1.26.0\n\nrequire (\n");
        for (module, version) in &self.require {
            text += &format!("\t{module} {version}\n");
        }
        text += ")\n\nreplace (\n";
        for (module, version) in &self.replace {
            text += &format!("\t{module} => {module} {version}\n");
        }
        text + ")\n"
    }

    /// What the stamp records: a change to any of it rebuilds.
    fn stamp(&self, go_version: &str) -> String {
        let sources: String = self.sources.iter().map(|(path, text)| format!("{path}\n{text}\n")).collect();
        // Without cgo and sources, the stamp of the builds before either existed.
        let cgo = if self.cgo { "cgo\n" } else { "" };
        format!("{go_version}\n{}\n{}\n{}\n{cgo}{sources}", self.go_mod(), self.packages.join("\n"), self.ldflags)
    }
}

/// The cache root: `~/.cache/overlay` (or `$XDG_CACHE_HOME/overlay`).
pub fn cache_root() -> anyhow::Result<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .context("neither XDG_CACHE_HOME nor HOME is set: no place for the Go build cache")?;
    Ok(base.join("overlay"))
}

/// The `go` binary: on PATH, else the official tarball's /usr/local/go/bin.
pub fn find_go() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("go")).find(|g| g.is_file()))
        .or_else(|| Some(PathBuf::from("/usr/local/go/bin/go")).filter(|g| g.is_file()))
}

/// Builds `build`'s packages into `<cache>/<key>/bin` unless the stamp says
/// they are there already; returns that directory. Go's module and build
/// caches live next to it (`<cache>/go/`), so a rebuild after a version bump
/// reuses what did not change.
pub fn build_go_packages(go: &Path, build: &GoBuild) -> anyhow::Result<PathBuf> {
    let root = cache_root()?;
    let dir = root.join(&build.key);
    let bin = dir.join("bin");
    let stamp_path = dir.join("stamp");
    let go_version = output(Command::new(go).arg("version"))?;
    let stamp = build.stamp(go_version.trim());
    let binaries_present = build.packages.iter().all(|p| bin.join(binary_name(p)).is_file());
    if binaries_present && fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) {
        return Ok(bin);
    }
    let module = dir.join("module");
    fs::create_dir_all(&module).with_context(|| format!("creating {}", module.display()))?;
    let _ = fs::remove_file(&stamp_path);
    fs::write(module.join("go.mod"), build.go_mod()).context("writing the scratch go.mod")?;
    for (path, text) in &build.sources {
        let path = module.join(path);
        fs::create_dir_all(path.parent().unwrap_or(&module)).with_context(|| format!("creating the directory of {}", path.display()))?;
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    // Imports for `go mod tidy`, which then pins every dependency in go.sum
    // (the scratch module's own packages it finds by itself; a main package
    // cannot be imported).
    let imports: String = build
        .packages
        .iter()
        .filter(|p| !p.starts_with(SCRATCH_MODULE))
        .map(|p| format!("\t_ \"{p}\"\n"))
        .collect();
    fs::write(module.join("tools.go"), format!("//go:build tools\n\npackage tools\n\nimport (\n{imports})\n"))
        .context("writing tools.go")?;
    eprintln!("setup: building {} from the Go module proxy into {} (once per machine; the cold build is about 20 CPU-minutes)", build.packages.join(" "), bin.display());
    let started = Instant::now();
    let go_env = |cmd: &mut Command| {
        cmd.current_dir(&module)
            .env("GOCACHE", root.join("go/build"))
            .env("GOMODCACHE", root.join("go/mod"))
            .env("GOFLAGS", "-trimpath")
            .env("GOTOOLCHAIN", "local")
            .env("CGO_ENABLED", if build.cgo { "1" } else { "0" });
    };
    let mut tidy = Command::new(go);
    tidy.args(["mod", "tidy"]);
    go_env(&mut tidy);
    crate::setup::run(&mut tidy)?;
    let mut compile = Command::new(go);
    compile.arg("build").arg(format!("-ldflags={}", build.ldflags)).arg("-o").arg(format!("{}/", bin.display())).args(&build.packages);
    go_env(&mut compile);
    crate::setup::run(&mut compile)?;
    fs::write(&stamp_path, stamp).context("writing the stamp")?;
    eprintln!("setup: built {} in {:.0?}", build.key, started.elapsed());
    Ok(bin)
}

fn binary_name(package: &str) -> &str {
    package.rsplit('/').next().unwrap_or(package)
}

/// kube-apiserver, kube-controller-manager and kube-scheduler at
/// [`KUBERNETES_VERSION`].
///
/// k8s.io/kubernetes requires its staging modules (k8s.io/api,
/// k8s.io/apimachinery, ...) at v0.0.0 and replaces them with
/// `./staging/...`, which only works inside its own repository. A module
/// that requires k8s.io/kubernetes replaces each of them with its published
/// release: v0.X.Y for kubernetes v1.X.Y.
pub fn kubernetes(go: &Path) -> anyhow::Result<PathBuf> {
    let version = KUBERNETES_VERSION.trim();
    let staging_version = version
        .strip_prefix("v1.")
        .map(|rest| format!("v0.{rest}"))
        .with_context(|| format!("{version} is not a v1.x.y kubernetes version"))?;
    let go_mod_path = go_mod_download(go, "k8s.io/kubernetes", version, "GoMod")?;
    let go_mod = fs::read_to_string(&go_mod_path).with_context(|| format!("reading {go_mod_path}"))?;
    let staging = staging_modules(&go_mod);
    if staging.is_empty() {
        bail!("k8s.io/kubernetes@{version}'s go.mod requires no staging module at v0.0.0: has its layout changed?");
    }
    let build = GoBuild {
        key: format!("kubernetes-{version}"),
        require: vec![("k8s.io/kubernetes".to_owned(), version.to_owned())],
        replace: staging.into_iter().map(|m| (m, staging_version.clone())).collect(),
        packages: KUBERNETES_PACKAGES.iter().map(|p| (*p).to_owned()).collect(),
        ldflags: kubernetes_ldflags(version),
        sources: Vec::new(),
        cgo: false,
    };
    build_go_packages(go, &build)
}

/// The flannel release the lab's flannel nodes, the interop tests and the
/// bench run, shared with the tests crate (`overlay_tests::FLANNEL_VERSION`).
pub const FLANNEL_VERSION: &str = include_str!("../../tests/flannel-version.txt");
const FLANNEL_MODULE: &str = "github.com/flannel-io/flannel";
/// flanneld's main.go imports this backend, whose dependency the Go module
/// proxy refuses to serve:
/// `github.com/tencentcloud/tencentcloud-sdk-go/tencentcloud/vpc@v1.3.188`
/// (403, "This module version is not available").
const FLANNEL_REFUSED_BACKEND: &str = "github.com/flannel-io/flannel/pkg/backend/tencentvpc";

/// flanneld at [`FLANNEL_VERSION`]: flannel's own main.go, without the one
/// backend import whose module the proxy refuses, as a main package of the
/// scratch module that requires flannel's module; every other backend
/// (vxlan, host-gw, ...) is flannel's code as released, at the dependency
/// versions flannel's go.mod gives.
pub fn flanneld(go: &Path) -> anyhow::Result<PathBuf> {
    let version = FLANNEL_VERSION.trim();
    let dir = download_module(go, FLANNEL_MODULE, version)?;
    let main_go = dir.join("main.go");
    let main = fs::read_to_string(&main_go).with_context(|| format!("reading {}", main_go.display()))?;
    if !main.contains(FLANNEL_REFUSED_BACKEND) {
        bail!("{} no longer imports {FLANNEL_REFUSED_BACKEND}: check whether `go install {FLANNEL_MODULE}@{version}` works now", main_go.display());
    }
    let main: String = main.lines().filter(|l| !l.contains(FLANNEL_REFUSED_BACKEND)).map(|l| format!("{l}\n")).collect();
    let build = GoBuild {
        key: format!("flanneld-{version}"),
        require: vec![(FLANNEL_MODULE.to_owned(), version.to_owned())],
        replace: Vec::new(),
        packages: vec![format!("{SCRATCH_MODULE}/flanneld")],
        ldflags: format!("-s -w -X {FLANNEL_MODULE}/pkg/version.Version={version}"),
        sources: vec![("flanneld/main.go".to_owned(), main)],
        // As flannel's release build: its udp backend's proxy is C.
        cgo: true,
    };
    build_go_packages(go, &build)
}

/// The CNI plugins release whose `bridge`, `host-local` and `portmap` the
/// tests plumb pods with, shared with the tests crate
/// (`overlay_tests::CNI_PLUGINS_VERSION`).
pub const CNI_PLUGINS_VERSION: &str = include_str!("../../tests/cni-plugins-version.txt");
const CNI_PLUGINS_MODULE: &str = "github.com/containernetworking/plugins";

/// The CNI plugins flannel's CNI plugin delegates to (`bridge` with
/// `host-local` IPAM) and chains (`portmap`), at [`CNI_PLUGINS_VERSION`].
/// flannel's CNI plugin itself the Go module proxy refuses
/// (`github.com/flannel-io/cni-plugin`: 403, "This module version is not
/// available").
pub fn cni_plugins(go: &Path) -> anyhow::Result<PathBuf> {
    let version = CNI_PLUGINS_VERSION.trim();
    let build = GoBuild {
        key: format!("cni-plugins-{version}"),
        require: vec![(CNI_PLUGINS_MODULE.to_owned(), version.to_owned())],
        replace: Vec::new(),
        packages: ["plugins/main/bridge", "plugins/ipam/host-local", "plugins/meta/portmap"]
            .iter()
            .map(|p| format!("{CNI_PLUGINS_MODULE}/{p}"))
            .collect(),
        ldflags: "-s -w".to_owned(),
        sources: Vec::new(),
        cgo: false,
    };
    build_go_packages(go, &build)
}

/// `go mod download` of one module into the cache's module cache; returns
/// its source directory.
fn download_module(go: &Path, module: &str, version: &str) -> anyhow::Result<PathBuf> {
    go_mod_download(go, module, version, "Dir").map(PathBuf::from)
}

/// `go mod download -json` of one module into the cache's module cache;
/// returns `field` of what it prints (`Dir`: the source directory,
/// `GoMod`: its go.mod file).
fn go_mod_download(go: &Path, module: &str, version: &str, field: &str) -> anyhow::Result<String> {
    let mut download = Command::new(go);
    download
        .args(["mod", "download", "-json", &format!("{module}@{version}")])
        .env("GOMODCACHE", cache_root()?.join("go/mod"))
        .env("GOTOOLCHAIN", "local");
    // Outside any module: `go mod download` of a named module needs none.
    download.current_dir(std::env::temp_dir());
    let info = output(&mut download).with_context(|| format!("the Go module proxy refused {module}@{version}"))?;
    let prefix = format!("\"{field}\": \"");
    info.lines()
        .find_map(|l| Some(l.trim().strip_prefix(&prefix)?.strip_suffix("\",")?.to_owned()))
        .with_context(|| format!("`go mod download -json {module}@{version}` named no {field}"))
}

/// What Kubernetes' own build (hack/lib/version.sh) stamps into its
/// binaries, so `/version` says the release rather than `v0.0.0-master`.
fn kubernetes_ldflags(version: &str) -> String {
    let mut parts = version.trim_start_matches('v').split('.');
    let (major, minor) = (parts.next().unwrap_or("1"), parts.next().unwrap_or("0"));
    let mut flags = String::from("-s -w");
    for package in ["k8s.io/component-base/version", "k8s.io/client-go/pkg/version"] {
        flags += &format!(
            " -X {package}.gitVersion={version} -X {package}.gitMajor={major} -X {package}.gitMinor={minor} -X {package}.gitTreeState=clean"
        );
    }
    flags
}

/// The `k8s.io/...` modules k8s.io/kubernetes requires at `v0.0.0` (its
/// staging modules, replaced by local paths in its own go.mod).
fn staging_modules(go_mod: &str) -> Vec<String> {
    let mut in_require = false;
    let mut modules = Vec::new();
    for line in go_mod.lines().map(str::trim) {
        if line.starts_with("require (") {
            in_require = true;
        } else if line == ")" {
            in_require = false;
        } else if in_require
            && let [module, "v0.0.0", ..] = line.split_whitespace().collect::<Vec<_>>()[..]
            && module.starts_with("k8s.io/")
        {
            modules.push(module.to_owned());
        }
    }
    modules
}


fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_modules_are_the_v0_0_0_requirements() {
        let go_mod = "module k8s.io/kubernetes\n\nrequire (\n\tgithub.com/x/y v1.2.3\n\tk8s.io/api v0.0.0\n\tk8s.io/klog/v2 v2.130.1\n)\n\nrequire (\n\tk8s.io/kms v0.0.0 // indirect\n)\n\nreplace (\n\tk8s.io/api => ./staging/src/k8s.io/api\n)\n";
        assert_eq!(staging_modules(go_mod), ["k8s.io/api", "k8s.io/kms"]);
    }

    #[test]
    fn the_scratch_module_replaces_each_staging_module_by_its_release() {
        let build = GoBuild {
            key: "k".into(),
            require: vec![("k8s.io/kubernetes".into(), "v1.37.2".into())],
            replace: vec![("k8s.io/api".into(), "v0.37.2".into())],
            packages: vec!["k8s.io/kubernetes/cmd/kube-apiserver".into()],
            ldflags: kubernetes_ldflags("v1.37.2"),
            sources: Vec::new(),
            cgo: false,
        };
        assert!(build.ldflags.contains("-X k8s.io/component-base/version.gitVersion=v1.37.2 -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=37"), "{}", build.ldflags);
        let go_mod = build.go_mod();
        assert!(go_mod.contains("\tk8s.io/kubernetes v1.37.2\n"), "{go_mod}");
        assert!(go_mod.contains("\tk8s.io/api => k8s.io/api v0.37.2\n"), "{go_mod}");
        assert_eq!(binary_name(&build.packages[0]), "kube-apiserver");
    }
}
