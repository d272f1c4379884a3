//! Builds `rulebpf-ebpf` for the BPF target with aya-build, so that a plain
//! `cargo build` embeds the hook in the `rulebpf` binary.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "rulebpf-ebpf")
        .ok_or_else(|| anyhow!("rulebpf-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    // Same pinned nightly as the workspace (rust-toolchain.toml): its LLVM must
    // match bpf-linker's.
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "nightly".into());
    let toolchain = toolchain.split('-').take(4).collect::<Vec<_>>().join("-");
    println!("cargo:rerun-if-env-changed=RUSTUP_TOOLCHAIN");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
