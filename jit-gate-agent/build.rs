//! Builds the XDP program (jit-gate-ebpf) for the BPF target with the nightly
//! toolchain and bpf-linker, and places the objects in `OUT_DIR`; compiles the
//! gRPC contract (`proto/jit_gate.proto`) with protoc.
use std::path::{Path, PathBuf};

fn main() -> anyhow::Result<()> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    build_xdp(&manifest.join("../jit-gate-ebpf"))?;
    build_proto(&manifest.join("../proto"))?;
    Ok(())
}

fn build_xdp(root: &Path) -> anyhow::Result<()> {
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

fn build_proto(dir: &Path) -> anyhow::Result<()> {
    let proto = dir.join("jit_gate.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    // The descriptor set feeds gRPC server reflection.
    let descriptors = PathBuf::from(std::env::var("OUT_DIR")?).join("jit_gate_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptors)
        .compile_protos(&[proto.as_path()], &[dir])
        .map_err(|e| {
            anyhow::anyhow!(
                "compiling {}: {e} (protoc and the well-known types come from Debian's \
                 protobuf-compiler and libprotobuf-dev; `cargo xtask bootstrap` installs them)",
                proto.display()
            )
        })?;
    Ok(())
}
