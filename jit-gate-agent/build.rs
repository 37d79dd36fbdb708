//! Builds the XDP program (jit-gate-ebpf) for the BPF target with the nightly
//! toolchain and bpf-linker, and places the objects in OUT_DIR.
use std::path::Path;

fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../jit-gate-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path"))?;
    println!("cargo:rerun-if-changed={root}/../jit-gate-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "jit-gate-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )?;
    // Every binary of jit-gate-ebpf lands in OUT_DIR; tell dependents where.
    println!("cargo:object_dir={}", std::env::var("OUT_DIR")?);
    Ok(())
}
