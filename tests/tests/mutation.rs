//! The mutation check: the gate program built with exactly one rule broken
//! (`jit-gate-ebpf/src/mutants.rs`, one XDP program per mutant, sharing the
//! gate's maps) must fail README's cases against the spec. A mutant no case
//! catches means the tests cannot see that rule go wrong.
#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use aya::{EbpfLoader, programs::Xdp};
use jit_gate_tests::{cases::cases, env::PinDir, scenario::Sides};

static MUTANTS_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("JIT_GATE_EBPF_OBJECTS"), "/jit-gate-mutants"));

/// Every program of the mutants object, with the rule it breaks.
const MUTANTS: [(&str, &str); 11] = [
    ("mutant_vlan_bound_four", "VLAN tags followed: four"),
    (
        "mutant_ipv4_ah_not_walked",
        "IPv4 authentication headers not walked",
    ),
    (
        "mutant_fast_path_ignores_ihl",
        "the fast path reads the port past IPv4 options",
    ),
    ("mutant_short_header_walk", "extension headers walked: four"),
    (
        "mutant_grants_outlive_expiry",
        "grants live an hour past expiry",
    ),
    (
        "mutant_syn_passes_as_flow",
        "a SYN passes as a tracked flow",
    ),
    (
        "mutant_half_open_forever",
        "half-open flows honoured forever",
    ),
    (
        "mutant_never_established",
        "no flow is ever marked established",
    ),
    ("mutant_no_flow_limits", "no quota, no single use"),
    ("mutant_max_opens_ignored", "single use ignored"),
    ("mutant_udp_flows_not_recorded", "UDP flows not recorded"),
];

/// The names of the cases in which `program` disagrees with the spec.
fn catching_cases(sides: &mut Sides, program: &Xdp) -> Vec<String> {
    sides.reset();
    let mut caught = Vec::new();
    for case in cases() {
        let disagrees = case
            .steps
            .iter()
            .map(|(frame, _)| sides.run_through(program, frame))
            .fold(false, |any, run| any | !run.agrees());
        if disagrees {
            caught.push(case.name);
        }
    }
    caught
}

#[test]
fn every_mutant_fails_readmes_cases() {
    let pins = PinDir::new();
    let mut sides = Sides::new(&pins);
    // The mutants share the gate's pinned maps.
    let mut mutants = EbpfLoader::new()
        .default_map_pin_directory(&pins.path)
        .load(MUTANTS_OBJECT)
        .unwrap_or_else(|e| panic!("loading the mutants object: {e}"));
    let in_object: Vec<String> = mutants
        .programs()
        .map(|(name, _)| name.to_owned())
        .collect();
    assert_eq!(
        in_object.len(),
        MUTANTS.len(),
        "the object's programs {in_object:?} and this test's list differ"
    );
    let mut survivors = Vec::new();
    for (name, rule) in MUTANTS {
        let program: &mut Xdp = mutants
            .program_mut(name)
            .unwrap_or_else(|| panic!("{name} missing from the mutants object"))
            .try_into()
            .unwrap_or_else(|e| panic!("{name} is not XDP: {e}"));
        program
            .load()
            .unwrap_or_else(|e| panic!("{name} fails the verifier: {e}"));
        let caught = catching_cases(&mut sides, program);
        if caught.is_empty() {
            survivors.push(format!("{name} ({rule})"));
        } else {
            println!(
                "{name} ({rule}) caught by {} cases, first: {}",
                caught.len(),
                caught[0]
            );
        }
    }
    assert!(
        survivors.is_empty(),
        "mutants no case of README's list catches: {survivors:?}"
    );
}
