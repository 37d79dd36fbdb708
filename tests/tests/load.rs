#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]
use jit_gate_tests::env::PinDir;

#[test]
fn program_passes_the_verifier_and_pins_its_maps() {
    let pins = PinDir::new();
    let gate = pins.open_gate();
    assert!(pins.path.join("program").exists());
    for name in jit_gate_common::maps::names::ALL {
        assert!(pins.path.join(name).exists(), "map {name} not pinned");
    }
    drop(gate);
}
