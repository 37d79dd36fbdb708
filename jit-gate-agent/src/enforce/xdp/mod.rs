//! The XDP enforcer: loads the jit-gate program, attaches it to interfaces,
//! pins program, links and maps under a bpffs directory so enforcement
//! outlives the process, re-adopts them after a restart, and offers typed
//! operations on the maps.
//!
//! Pin layout (`<pin_dir>` is `/sys/fs/bpf/jit-gate` in production):
//! `<pin_dir>/<MAP_NAME>` for every map, `<pin_dir>/program`, and
//! `<pin_dir>/link-<ifname>` for each attachment.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::ErrorKind,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{ProgramError, Xdp, links::LinkError},
};
use ipnet::IpNet;
use jit_gate_common::{
    family,
    maps::{
        CIDR_KEY_FIXED_BITS, CidrDataV4, CidrDataV6, DenyEvent, FlowKey, FlowValue, GateConfig,
        GrantKeyV4, GrantKeyV6, GrantValue, PROGRAM_NAME, PortCounters, capacity, cidr_data, names,
        protected,
    },
    verdict::Reason,
};

use crate::net::{GrantTarget, Protocol};

mod attach;

/// The compiled XDP object, built by build.rs.
static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/jit-gate"));

/// Default pin directory.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/jit-gate";

const PROGRAM_PIN: &str = "program";
const LINK_PIN_PREFIX: &str = "link-";

#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error("{path} is not on a mounted bpffs (mount -t bpf bpf /sys/fs/bpf)")]
    NoBpffs { path: PathBuf },
    #[error("cannot create pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot load the XDP program: {0}")]
    Load(#[from] Box<aya::EbpfError>),
    #[error("XDP program {what}: {source}")]
    Program {
        what: String,
        source: Box<ProgramError>,
    },
    #[error("XDP link {what}: {source}")]
    Link { what: String, source: LinkError },
    #[error("pin {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("map {map}: {source}")]
    Map { map: &'static str, source: MapError },
    #[error("no interface named {ifname} in this network namespace")]
    NoInterface { ifname: String },
    #[error("map {0} missing from the program object")]
    MissingMap(&'static str),
    #[error("interface {ifname}: cannot attach in native ({native}) or generic ({generic}) mode")]
    Attach {
        ifname: String,
        native: Box<ProgramError>,
        generic: Box<ProgramError>,
    },
    #[error(
        "too many protected ports: at most {} distinct ports",
        capacity::PORT_COUNTER_SLOTS
    )]
    TooManyPorts,
    #[error("removing {path}: {source}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
}

type Result<T, E = XdpError> = std::result::Result<T, E>;

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> XdpError {
    move |source| XdpError::Map { map, source }
}

/// How the program runs on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// In the driver (native XDP).
    Native,
    /// In the kernel's generic path (SKB mode), where the driver has no XDP.
    Generic,
}

/// How an interface came to be attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// Newly attached in this mode.
    Attached(AttachMode),
    /// A pinned link from an earlier run was found and now runs this
    /// program; the interface was never without the gate.
    Adopted,
}

/// One entry of a grant map, as read back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrantEntry {
    pub target: GrantTarget,
    pub expires_at_boot_ns: u64,
    pub grant_id: u64,
}

/// A tracked flow, as read back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub key: FlowKey,
    pub value: FlowValue,
}

/// A denied packet as reported on the deny-event ring buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeniedPacket {
    pub source: IpAddr,
    pub protocol: &'static str,
    pub port: u16,
    pub reason: &'static str,
    /// Denied packets from the same source not reported since the previous report.
    pub suppressed_before: u64,
}

/// Decodes one ring-buffer record; `None` if it is not a deny event.
pub fn parse_deny_event(record: &[u8]) -> Option<DeniedPacket> {
    if record.len() < size_of::<DenyEvent>() {
        return None;
    }
    // SAFETY: the record holds at least one DenyEvent, a plain-old-data
    // struct written by the XDP program; read_unaligned tolerates any alignment.
    let event: DenyEvent = unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) };
    let source = match event.family {
        family::V4 => IpAddr::from([event.src[0], event.src[1], event.src[2], event.src[3]]),
        family::V6 => IpAddr::from(event.src),
        _ => return None,
    };
    Some(DeniedPacket {
        source,
        protocol: Protocol::from_number(event.protocol).map_or("other", Protocol::name),
        port: event.dst_port,
        reason: Reason::from_u32(event.reason).map_or("unknown", Reason::name),
        suppressed_before: event.suppressed_before,
    })
}

/// Counters summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub by_reason: BTreeMap<Reason, u64>,
    pub by_port: BTreeMap<(Protocol, u16), PortCounters>,
}

struct Maps {
    protected_ports: Array<MapData, u32>,
    grants_v4: HashMap<MapData, GrantKeyV4, GrantValue>,
    grants_v6: HashMap<MapData, GrantKeyV6, GrantValue>,
    cidr_v4: LpmTrie<MapData, CidrDataV4, GrantValue>,
    cidr_v6: LpmTrie<MapData, CidrDataV6, GrantValue>,
    flows: HashMap<MapData, FlowKey, FlowValue>,
    reason_counters: PerCpuArray<MapData, u64>,
    port_counters: PerCpuArray<MapData, PortCounters>,
    config: Array<MapData, GateConfig>,
    deny_events: Option<RingBuf<MapData>>,
}

/// The loaded gate: program and maps, pinned under `pin_dir`.
pub struct XdpGate {
    pin_dir: PathBuf,
    ebpf: Ebpf,
    maps: Maps,
    /// The kernel's id of each pinned map, to pin it again from.
    map_ids: Vec<(&'static str, u32)>,
    /// The links the agent holds, by interface name.
    links: BTreeMap<String, attach::HeldLink>,
}

fn take<T: TryFrom<Map, Error = MapError>>(ebpf: &mut Ebpf, name: &'static str) -> Result<T> {
    let map = ebpf.take_map(name).ok_or(XdpError::MissingMap(name))?;
    T::try_from(map).map_err(map_err(name))
}

impl XdpGate {
    /// Loads the program with its maps pinned under `pin_dir`: maps pinned by
    /// an earlier run are reused as they are (grants, flows and counters
    /// survive), missing ones are created and pinned. The program is pinned
    /// too, replacing an earlier pin.
    pub fn open(pin_dir: impl Into<PathBuf>) -> Result<Self> {
        let pin_dir = pin_dir.into();
        ensure_bpffs(&pin_dir)?;
        fs::create_dir_all(&pin_dir).map_err(|source| XdpError::PinDir {
            path: pin_dir.clone(),
            source,
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .load(PROGRAM_OBJECT)
            .map_err(Box::new)?;
        let program = xdp_program(&mut ebpf)?;
        program.load().map_err(|source| XdpError::Program {
            what: "load (verifier)".into(),
            source: Box::new(source),
        })?;
        let program_pin = pin_dir.join(PROGRAM_PIN);
        remove_if_exists(&program_pin)?;
        program.pin(&program_pin).map_err(|source| XdpError::Pin {
            path: program_pin,
            source,
        })?;
        let maps = Maps {
            protected_ports: take(&mut ebpf, names::PROTECTED_PORTS)?,
            grants_v4: take(&mut ebpf, names::GRANTS_V4)?,
            grants_v6: take(&mut ebpf, names::GRANTS_V6)?,
            cidr_v4: take(&mut ebpf, names::CIDR_GRANTS_V4)?,
            cidr_v6: take(&mut ebpf, names::CIDR_GRANTS_V6)?,
            flows: take(&mut ebpf, names::FLOWS)?,
            reason_counters: take(&mut ebpf, names::REASON_COUNTERS)?,
            port_counters: take(&mut ebpf, names::PORT_COUNTERS)?,
            config: take(&mut ebpf, names::CONFIG)?,
            deny_events: Some(take(&mut ebpf, names::DENY_EVENTS)?),
        };
        let map_ids = names::ALL
            .iter()
            .map(|&name| {
                let path = pin_dir.join(name);
                let id = MapData::from_pin(&path)
                    .and_then(|map| map.info())
                    .map_err(map_err(name))?
                    .id();
                Ok((name, id))
            })
            .collect::<Result<_>>()?;
        let mut gate = XdpGate {
            pin_dir,
            ebpf,
            maps,
            map_ids,
            links: BTreeMap::new(),
        };
        gate.recount_cidr_entries()?;
        Ok(gate)
    }

    /// The loaded program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn program(&self) -> &Xdp {
        self.ebpf
            .program(PROGRAM_NAME)
            .and_then(|p| <&Xdp>::try_from(p).ok())
            .expect("the program was checked to be XDP in open()")
    }

    fn link_pin(&self, ifname: &str) -> PathBuf {
        self.pin_dir.join(format!("{LINK_PIN_PREFIX}{ifname}"))
    }

    /// Makes exactly `ports` protected; every other port becomes unprotected.
    /// Counter slots are kept for ports that stay protected.
    pub fn set_protected_ports(&mut self, ports: &BTreeSet<(Protocol, u16)>) -> Result<()> {
        let mut wanted: BTreeMap<u16, u32> = BTreeMap::new();
        for (protocol, port) in ports {
            *wanted.entry(*port).or_default() |= protected::bit_for(protocol.number());
        }
        let current = self.protected_ports()?;
        let mut used_slots: BTreeSet<u32> = BTreeSet::new();
        let mut slot_of: BTreeMap<u16, u32> = BTreeMap::new();
        for (port, value) in &current {
            if wanted.contains_key(port) {
                slot_of.insert(*port, protected::slot(*value));
                used_slots.insert(protected::slot(*value));
            }
        }
        let mut free_slots = (0..capacity::PORT_COUNTER_SLOTS).filter(|s| !used_slots.contains(s));
        let map = &mut self.maps.protected_ports;
        for (port, bits) in &wanted {
            let slot = match slot_of.get(port) {
                Some(slot) => *slot,
                None => free_slots.next().ok_or(XdpError::TooManyPorts)?,
            };
            let value = protected::encode(*bits, slot);
            if current.get(port) != Some(&value) {
                map.set(u32::from(*port), value, 0)
                    .map_err(map_err(names::PROTECTED_PORTS))?;
            }
        }
        for port in current.keys().filter(|p| !wanted.contains_key(p)) {
            map.set(u32::from(*port), 0, 0)
                .map_err(map_err(names::PROTECTED_PORTS))?;
        }
        Ok(())
    }

    /// Non-zero entries of the protected-ports array, by port.
    fn protected_ports(&self) -> Result<BTreeMap<u16, u32>> {
        let mut out = BTreeMap::new();
        for (port, value) in self.maps.protected_ports.iter().enumerate() {
            let value = value.map_err(map_err(names::PROTECTED_PORTS))?;
            if value != 0 {
                out.insert(port as u16, value);
            }
        }
        Ok(out)
    }

    /// Whether (protocol, port) is protected: one lookup, unlike `protected`.
    pub fn is_protected(&self, protocol: Protocol, port: u16) -> Result<bool> {
        let value = self
            .maps
            .protected_ports
            .get(&u32::from(port), 0)
            .map_err(map_err(names::PROTECTED_PORTS))?;
        Ok(value & protected::bit_for(protocol.number()) != 0)
    }

    /// The protected (protocol, port) pairs.
    pub fn protected(&self) -> Result<BTreeSet<(Protocol, u16)>> {
        let mut out = BTreeSet::new();
        for (port, value) in self.protected_ports()? {
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                if value & protected::bit_for(protocol.number()) != 0 {
                    out.insert((protocol, port));
                }
            }
        }
        Ok(out)
    }

    /// Writes the kernel entry for `target`: live until `expires_at_boot_ns`.
    pub fn upsert_grant(
        &mut self,
        target: &GrantTarget,
        expires_at_boot_ns: u64,
        grant_id: u64,
    ) -> Result<()> {
        let value = GrantValue {
            expires_at_boot_ns,
            grant_id,
        };
        let (protocol, port) = (target.protocol.number(), target.port);
        match (target.source, target.is_exact()) {
            (IpNet::V4(net), true) => self
                .maps
                .grants_v4
                .insert(
                    GrantKeyV4::new(net.addr().octets(), protocol, port),
                    value,
                    0,
                )
                .map_err(map_err(names::GRANTS_V4)),
            (IpNet::V6(net), true) => self
                .maps
                .grants_v6
                .insert(
                    GrantKeyV6::new(net.addr().octets(), protocol, port),
                    value,
                    0,
                )
                .map_err(map_err(names::GRANTS_V6)),
            (IpNet::V4(net), false) => {
                let key = cidr_key_v4(target, net);
                let trie = &mut self.maps.cidr_v4;
                let added = trie.get(&key, 0).is_err();
                trie.insert(&key, value, 0)
                    .map_err(map_err(names::CIDR_GRANTS_V4))?;
                if added {
                    self.adjust_cidr_count(family::V4, 1)?;
                }
                Ok(())
            }
            (IpNet::V6(net), false) => {
                let key = cidr_key_v6(target, net);
                let trie = &mut self.maps.cidr_v6;
                let added = trie.get(&key, 0).is_err();
                trie.insert(&key, value, 0)
                    .map_err(map_err(names::CIDR_GRANTS_V6))?;
                if added {
                    self.adjust_cidr_count(family::V6, 1)?;
                }
                Ok(())
            }
        }
    }

    /// Removes the kernel entry for `target`; returns whether one existed.
    pub fn remove_grant(&mut self, target: &GrantTarget) -> Result<bool> {
        let (protocol, port) = (target.protocol.number(), target.port);
        let removed = match (target.source, target.is_exact()) {
            (IpNet::V4(net), true) => {
                self.maps
                    .grants_v4
                    .remove(&GrantKeyV4::new(net.addr().octets(), protocol, port))
            }
            (IpNet::V6(net), true) => {
                self.maps
                    .grants_v6
                    .remove(&GrantKeyV6::new(net.addr().octets(), protocol, port))
            }
            (IpNet::V4(net), false) => {
                let removed = self.maps.cidr_v4.remove(&cidr_key_v4(target, net));
                if removed.is_ok() {
                    self.adjust_cidr_count(family::V4, -1)?;
                }
                removed
            }
            (IpNet::V6(net), false) => {
                let removed = self.maps.cidr_v6.remove(&cidr_key_v6(target, net));
                if removed.is_ok() {
                    self.adjust_cidr_count(family::V6, -1)?;
                }
                removed
            }
        };
        existed(removed).map_err(map_err("grants"))
    }

    /// Every grant entry in the kernel.
    pub fn grants(&self) -> Result<Vec<GrantEntry>> {
        let mut out = Vec::new();
        let entry = |source: IpNet, protocol: u8, port: u16, value: GrantValue| {
            Protocol::from_number(protocol).map(|protocol| GrantEntry {
                target: GrantTarget {
                    source,
                    protocol,
                    port,
                },
                expires_at_boot_ns: value.expires_at_boot_ns,
                grant_id: value.grant_id,
            })
        };
        for item in &self.maps.grants_v4 {
            let (k, v) = item.map_err(map_err(names::GRANTS_V4))?;
            let source = IpNet::from(IpAddr::from(k.addr));
            out.extend(entry(source, k.protocol, k.port, v));
        }
        for item in &self.maps.grants_v6 {
            let (k, v) = item.map_err(map_err(names::GRANTS_V6))?;
            let source = IpNet::from(IpAddr::from(k.addr));
            out.extend(entry(source, k.protocol, k.port, v));
        }
        for item in &self.maps.cidr_v4 {
            let (k, v) = item.map_err(map_err(names::CIDR_GRANTS_V4))?;
            let (protocol, port, addr, len) = split_cidr_key::<7, 4>(&k);
            let source = IpNet::new(IpAddr::from(addr), len).expect("trie prefix fits the family");
            out.extend(entry(source, protocol, port, v));
        }
        for item in &self.maps.cidr_v6 {
            let (k, v) = item.map_err(map_err(names::CIDR_GRANTS_V6))?;
            let (protocol, port, addr, len) = split_cidr_key::<19, 16>(&k);
            let source = IpNet::new(IpAddr::from(addr), len).expect("trie prefix fits the family");
            out.extend(entry(source, protocol, port, v));
        }
        Ok(out)
    }

    fn adjust_cidr_count(&mut self, fam: u8, delta: i64) -> Result<()> {
        let mut config = self.config()?;
        let count = if fam == family::V4 {
            &mut config.cidr_v4_entries
        } else {
            &mut config.cidr_v6_entries
        };
        *count = (i64::from(*count) + delta).max(0) as u32;
        self.set_config(config)
    }

    /// Sets the trie entry counts from the tries themselves (after adoption,
    /// or if a count drifted).
    fn recount_cidr_entries(&mut self) -> Result<()> {
        let mut config = self.config()?;
        config.cidr_v4_entries = self.maps.cidr_v4.keys().count() as u32;
        config.cidr_v6_entries = self.maps.cidr_v6.keys().count() as u32;
        self.set_config(config)
    }

    fn config(&self) -> Result<GateConfig> {
        self.maps.config.get(&0, 0).map_err(map_err(names::CONFIG))
    }

    fn set_config(&mut self, config: GateConfig) -> Result<()> {
        self.maps
            .config
            .set(0, config, 0)
            .map_err(map_err(names::CONFIG))
    }

    /// At most one deny event per source per `interval`; zero reports every one.
    pub fn set_deny_report_interval(&mut self, interval: Duration) -> Result<()> {
        let mut config = self.config()?;
        config.deny_report_interval_ns = u64::try_from(interval.as_nanos()).unwrap_or(u64::MAX);
        self.set_config(config)
    }

    /// Every tracked flow.
    pub fn flows(&self) -> Result<Vec<Flow>> {
        self.maps
            .flows
            .iter()
            .map(|item| {
                item.map(|(key, value)| Flow { key, value })
                    .map_err(map_err(names::FLOWS))
            })
            .collect()
    }

    /// Records a flow (seeding connections that predate the gate).
    pub fn insert_flow(&mut self, key: FlowKey, value: FlowValue) -> Result<()> {
        self.maps
            .flows
            .insert(key, value, 0)
            .map_err(map_err(names::FLOWS))
    }

    /// Forgets a flow; returns whether it was tracked.
    pub fn remove_flow(&mut self, key: &FlowKey) -> Result<bool> {
        existed(self.maps.flows.remove(key)).map_err(map_err(names::FLOWS))
    }

    /// Counters summed over all CPUs.
    pub fn counters(&self) -> Result<Counters> {
        let mut counters = Counters::default();
        for reason in Reason::ALL {
            let per_cpu = self
                .maps
                .reason_counters
                .get(&(reason as u32), 0)
                .map_err(map_err(names::REASON_COUNTERS))?;
            counters.by_reason.insert(reason, per_cpu.iter().sum());
        }
        for (port, value) in self.protected_ports()? {
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                if value & protected::bit_for(protocol.number()) == 0 {
                    continue;
                }
                let index = protected::counter_index(value, protocol.number());
                let per_cpu = self
                    .maps
                    .port_counters
                    .get(&index, 0)
                    .map_err(map_err(names::PORT_COUNTERS))?;
                let sum = per_cpu
                    .iter()
                    .fold(PortCounters::default(), |a, c| PortCounters {
                        passed: a.passed + c.passed,
                        dropped: a.dropped + c.dropped,
                    });
                counters.by_port.insert((protocol, port), sum);
            }
        }
        Ok(counters)
    }

    /// The deny-event ring buffer; taken once by whoever streams the events.
    pub fn take_deny_events(&mut self) -> Option<RingBuf<MapData>> {
        self.maps.deny_events.take()
    }

    /// Detaches from every interface and removes all pins (program, links,
    /// maps): the explicit, complete removal of the gate.
    pub fn remove(pin_dir: &Path) -> Result<()> {
        if !pin_dir.exists() {
            return Ok(());
        }
        for ifname in attached_interfaces(pin_dir)? {
            remove_if_exists(&pin_dir.join(format!("{LINK_PIN_PREFIX}{ifname}")))?;
        }
        remove_if_exists(&pin_dir.join(PROGRAM_PIN))?;
        for name in names::ALL {
            remove_if_exists(&pin_dir.join(name))?;
        }
        fs::remove_dir(pin_dir).map_err(|source| XdpError::Remove {
            path: pin_dir.into(),
            source,
        })
    }
}

/// Turns the result of a map deletion into whether the key existed. The
/// kernel reports a missing key as ENOENT from the syscall.
fn existed(removed: Result<(), MapError>) -> Result<bool, MapError> {
    match removed {
        Ok(()) => Ok(true),
        Err(MapError::KeyNotFound) => Ok(false),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    let program = ebpf
        .program_mut(PROGRAM_NAME)
        .ok_or_else(|| XdpError::Program {
            what: format!("{PROGRAM_NAME} missing from the object"),
            source: Box::new(ProgramError::NotLoaded),
        })?;
    program.try_into().map_err(|source| XdpError::Program {
        what: format!("{PROGRAM_NAME} is not XDP"),
        source: Box::new(source),
    })
}

fn attached_interfaces(pin_dir: &Path) -> Result<Vec<String>> {
    let entries = fs::read_dir(pin_dir).map_err(|source| XdpError::PinDir {
        path: pin_dir.into(),
        source,
    })?;
    let mut out: Vec<String> = entries
        .filter_map(std::result::Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix(LINK_PIN_PREFIX))
                .map(str::to_owned)
        })
        .collect();
    out.sort();
    Ok(out)
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(XdpError::Remove {
            path: path.into(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Pins only work on bpffs: check the directory (or its nearest existing
/// ancestor) is on one, to fail with an actionable message.
fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let mut probe = pin_dir;
    while !probe.exists() {
        probe = probe.parent().unwrap_or(Path::new("/"));
    }
    let c_path = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes()).map_err(|_| {
        XdpError::NoBpffs {
            path: pin_dir.into(),
        }
    })?;
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and writable statfs buffer.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &raw mut stat) };
    #[allow(
        trivial_numeric_casts,
        reason = "f_type's type differs between architectures"
    )]
    let f_type = stat.f_type as i64;
    if rc != 0 || f_type != BPF_FS_MAGIC {
        return Err(XdpError::NoBpffs {
            path: pin_dir.into(),
        });
    }
    Ok(())
}

fn cidr_key_v4(target: &GrantTarget, net: ipnet::Ipv4Net) -> Key<CidrDataV4> {
    let data = cidr_data(
        target.protocol.number(),
        target.port,
        &net.network().octets(),
    );
    Key::new(CIDR_KEY_FIXED_BITS + u32::from(net.prefix_len()), data)
}

fn cidr_key_v6(target: &GrantTarget, net: ipnet::Ipv6Net) -> Key<CidrDataV6> {
    let data = cidr_data(
        target.protocol.number(),
        target.port,
        &net.network().octets(),
    );
    Key::new(CIDR_KEY_FIXED_BITS + u32::from(net.prefix_len()), data)
}

/// (protocol, port, address, prefix length) from an LPM key.
fn split_cidr_key<const N: usize, const A: usize>(key: &Key<[u8; N]>) -> (u8, u16, [u8; A], u8)
where
    [u8; A]: Into<IpAddr>,
{
    let data = key.data();
    let mut addr = [0u8; A];
    addr.copy_from_slice(&data[3..3 + A]);
    let len = (key.prefix_len() - CIDR_KEY_FIXED_BITS) as u8;
    (data[0], u16::from_be_bytes([data[1], data[2]]), addr, len)
}
