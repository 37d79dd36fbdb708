//! Points the benchmark at the eBPF objects jit-gate-agent's build script
//! compiled (among them the bare floor programs), instead of building them twice.

fn main() {
    let dir = std::env::var("DEP_JIT_GATE_EBPF_OBJECT_DIR")
        .expect("jit-gate-agent's build script exports the eBPF object directory");
    println!("cargo:rustc-env=JIT_GATE_EBPF_OBJECTS={dir}");
}
