//! The XDP enforcer: loads the jit-gate program, attaches it to interfaces,
//! pins program, links and maps under a bpffs directory so enforcement
//! outlives the process, re-adopts them after a restart, and offers typed
//! operations on the maps.
//!
//! Pin layout (`<pin_dir>` is `/sys/fs/bpf/jit-gate` in production):
//! `<pin_dir>/<MAP_NAME>` for every map, `<pin_dir>/program`, and
//! `<pin_dir>/link-<ifname>` for each attachment. Map pins are stamped with
//! the layout version (`pins`); flows, per-grant flow counters, counters
//! and deny events are read and written in `flows`.

mod attach;
mod clock;
mod flows;
mod grants;
mod pins;
mod reader;
mod source_filter;

use source_filter::SourceFilter;

pub use flows::{Counters, DeniedPacket, Flow, GrantFlowCounts, parse_deny_event};
pub use reader::GrantReader;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, RingBuf},
    programs::{ProgramError, Xdp, links::LinkError},
};
use jit_gate_common::maps::{
    CidrDataV4, CidrDataV6, FlowKey, FlowValue, GateConfig, GrantKeyV4, GrantKeyV6, GrantOpens,
    GrantValue, PROGRAM_NAME, PortCounters, capacity, defaults, names, protected,
};

use crate::net::{GrantTarget, Protocol};

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
    #[error("map {map}: mapping it into memory: {source}")]
    MapMemory {
        map: &'static str,
        source: std::io::Error,
    },
    #[error("starting the thread that publishes boot time to the program: {0}")]
    ClockThread(std::io::Error),
    #[error("counting the possible CPUs: {0}")]
    Cpus(std::io::Error),
    #[error("the program object does not parse: {0}")]
    Object(#[from] Box<aya_obj::ParseError>),
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

/// How the gate is sized and tuned (from the agent's configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GateOptions {
    /// Entries of the flow table (fixed when its map is created).
    pub flow_capacity: u32,
    /// Connections a grant may hold open at once.
    pub flow_quota: u32,
    /// How long a TCP flow whose handshake has not completed is honoured.
    pub half_open_timeout: Duration,
}

impl Default for GateOptions {
    fn default() -> Self {
        GateOptions {
            flow_capacity: capacity::FLOWS,
            flow_quota: defaults::FLOW_QUOTA,
            half_open_timeout: Duration::from_nanos(defaults::HALF_OPEN_TIMEOUT_NS),
        }
    }
}

/// The flow limits of one grant entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrantLimits {
    /// Connections the grant may hold open at once.
    pub flow_quota: u32,
    /// Connections the grant may ever open; 0: no limit.
    pub max_opens: u32,
}

/// One entry of a grant map, as read back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrantEntry {
    pub target: GrantTarget,
    pub expires_at_boot_ns: u64,
    pub grant_id: u64,
    pub limits: GrantLimits,
}

struct Maps {
    protected_ports: Array<MapData, u32>,
    grants_v4: HashMap<MapData, GrantKeyV4, GrantValue>,
    grants_v6: HashMap<MapData, GrantKeyV6, GrantValue>,
    cidr_v4: LpmTrie<MapData, CidrDataV4, GrantValue>,
    cidr_v6: LpmTrie<MapData, CidrDataV6, GrantValue>,
    flows: HashMap<MapData, FlowKey, FlowValue>,
    grant_opens: HashMap<MapData, u64, GrantOpens>,
    grant_closes: HashMap<MapData, u64, u64>,
    reason_counters: PerCpuArray<MapData, u64>,
    port_counters: PerCpuArray<MapData, PortCounters>,
    config: Array<MapData, GateConfig>,
    layout: Array<MapData, u32>,
    deny_events: Option<RingBuf<MapData>>,
}

/// The loaded gate: program and maps, pinned under `pin_dir`.
pub struct XdpGate {
    pin_dir: PathBuf,
    ebpf: Ebpf,
    maps: Maps,
    source_filter: SourceFilter,
    options: GateOptions,
    /// Why the pinned state was not reused, if it was not.
    rebuilt: Option<String>,
    /// Removals of exact entries before the source filter is rebuilt.
    filter_removals_left: usize,
    /// Exact entries the source filter was sized for, plus those admitted
    /// since (an entry written again counts again, erring towards growing).
    filter_entries: u64,
    /// The kernel's id of each pinned map, to pin it again from.
    map_ids: Vec<(&'static str, u32)>,
    /// The links the agent holds, by interface name.
    links: BTreeMap<String, attach::HeldLink>,
    /// Publishes boot time for the program's flow stamps while open.
    clock: clock::ClockPublisher,
}

fn take<T: TryFrom<Map, Error = MapError>>(ebpf: &mut Ebpf, name: &'static str) -> Result<T> {
    let map = ebpf.take_map(name).ok_or(XdpError::MissingMap(name))?;
    T::try_from(map).map_err(map_err(name))
}

impl XdpGate {
    /// [`XdpGate::open_with`] with the default options.
    pub fn open(pin_dir: impl Into<PathBuf>) -> Result<Self> {
        Self::open_with(pin_dir, GateOptions::default())
    }

    /// Loads the program with its maps pinned under `pin_dir`. Maps pinned
    /// by an earlier run of this layout version, with the definitions this
    /// program has, are reused (grants, flows and counters survive); any
    /// other pinned state is unpinned, never reused, and the maps start
    /// empty (see [`XdpGate::rebuilt`]): the program still attached keeps
    /// the old maps until [`XdpGate::attach`] swaps this one into its link,
    /// so the caller fills the new maps first. The program is pinned too,
    /// replacing an earlier pin.
    pub fn open_with(pin_dir: impl Into<PathBuf>, options: GateOptions) -> Result<Self> {
        let pin_dir = pin_dir.into();
        ensure_bpffs(&pin_dir)?;
        fs::create_dir_all(&pin_dir).map_err(|source| XdpError::PinDir {
            path: pin_dir.clone(),
            source,
        })?;
        let rebuilt = pins::retire_stale(&pin_dir, PROGRAM_OBJECT, &options)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .map_max_entries(names::FLOWS, options.flow_capacity)
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
            grant_opens: take(&mut ebpf, names::GRANT_OPENS)?,
            grant_closes: take(&mut ebpf, names::GRANT_CLOSES)?,
            reason_counters: take(&mut ebpf, names::REASON_COUNTERS)?,
            port_counters: take(&mut ebpf, names::PORT_COUNTERS)?,
            config: take(&mut ebpf, names::CONFIG)?,
            layout: take(&mut ebpf, names::LAYOUT)?,
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
        let source_filter = SourceFilter::map(
            ebpf.take_map(names::SOURCE_FILTER)
                .ok_or(XdpError::MissingMap(names::SOURCE_FILTER))?,
        )?;
        let clock = clock::ClockPublisher::start(take(&mut ebpf, names::PUBLISHED_CLOCK)?)?;
        let mut gate = XdpGate {
            pin_dir,
            ebpf,
            maps,
            source_filter,
            options,
            rebuilt,
            filter_removals_left: 0,
            filter_entries: 0,
            map_ids,
            links: BTreeMap::new(),
            clock,
        };
        gate.rebuild_source_filter()?;
        gate.configure()?;
        gate.apply_flow_quota()?;
        pins::stamp(&mut gate.maps.layout)?;
        Ok(gate)
    }

    /// Why the pinned state found at open was not reused (another layout
    /// version, or maps defined differently); `None` if it was reused or
    /// there was none.
    pub fn rebuilt(&self) -> Option<&str> {
        self.rebuilt.as_deref()
    }

    /// The options the gate was opened with.
    pub fn options(&self) -> &GateOptions {
        &self.options
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
        for (port, bits) in &wanted {
            let slot = if let Some(slot) = slot_of.get(port) {
                *slot
            } else {
                let slot = free_slots.next().ok_or(XdpError::TooManyPorts)?;
                // A freed slot still holds the counts of the port it served.
                clear_port_counters(&mut self.maps.port_counters, slot)?;
                slot
            };
            let value = protected::encode(*bits, slot);
            if current.get(port) != Some(&value) {
                self.maps
                    .protected_ports
                    .set(u32::from(*port), value, 0)
                    .map_err(map_err(names::PROTECTED_PORTS))?;
            }
        }
        for port in current.keys().filter(|p| !wanted.contains_key(p)) {
            self.maps
                .protected_ports
                .set(u32::from(*port), 0, 0)
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

    /// Writes the gate's configuration: the options, the deny-event budget,
    /// and the trie entry counts taken from the tries themselves (after
    /// adoption, or if a count drifted).
    fn configure(&mut self) -> Result<()> {
        let config = GateConfig {
            cidr_v4_entries: self.maps.cidr_v4.keys().count() as u32,
            cidr_v6_entries: self.maps.cidr_v6.keys().count() as u32,
            half_open_timeout_ns: duration_ns(self.options.half_open_timeout),
            ..GateConfig::initial()
        };
        self.set_config(config)
    }

    /// Gives every grant entry the configured quota (the configuration may
    /// have changed since the entries were written).
    fn apply_flow_quota(&mut self) -> Result<()> {
        for entry in self.grants()? {
            if entry.limits.flow_quota != self.options.flow_quota {
                let limits = GrantLimits {
                    flow_quota: self.options.flow_quota,
                    ..entry.limits
                };
                self.upsert_grant_with_limits(
                    &entry.target,
                    entry.expires_at_boot_ns,
                    entry.grant_id,
                    limits,
                )?;
            }
        }
        Ok(())
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

    /// At most `events` deny events per CPU per `window`.
    pub fn set_deny_budget(&mut self, events: u32, window: Duration) -> Result<()> {
        let config = GateConfig {
            deny_events_per_window: events,
            deny_window_ns: duration_ns(window),
            ..self.config()?
        };
        self.set_config(config)
    }

    /// Detaches from every interface and removes all pins (program, links,
    /// maps, and maps of earlier layouts): the explicit, complete removal
    /// of the gate.
    pub fn remove(pin_dir: &Path) -> Result<()> {
        if !pin_dir.exists() {
            return Ok(());
        }
        for ifname in attached_interfaces(pin_dir)? {
            remove_if_exists(&pin_dir.join(format!("{LINK_PIN_PREFIX}{ifname}")))?;
        }
        remove_if_exists(&pin_dir.join(PROGRAM_PIN))?;
        pins::remove_map_pins(pin_dir)?;
        fs::remove_dir(pin_dir).map_err(|source| XdpError::Remove {
            path: pin_dir.into(),
            source,
        })
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Zeroes the per-CPU counters of a port slot.
fn clear_port_counters(map: &mut PerCpuArray<MapData, PortCounters>, slot: u32) -> Result<()> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| XdpError::Cpus(e))?;
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let zeros = aya::maps::PerCpuValues::try_from(vec![PortCounters::default(); cpus])
            .map_err(XdpError::Cpus)?;
        let index = protected::counter_index(protected::encode(0, slot), protocol.number());
        map.set(index, zeros, 0)
            .map_err(map_err(names::PORT_COUNTERS))?;
    }
    Ok(())
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
    Ok(pin_names(pin_dir)?
        .into_iter()
        .filter_map(|n| n.strip_prefix(LINK_PIN_PREFIX).map(str::to_owned))
        .collect())
}

/// The names of the pins under `pin_dir`, sorted.
fn pin_names(pin_dir: &Path) -> Result<Vec<String>> {
    let entries = fs::read_dir(pin_dir).map_err(|source| XdpError::PinDir {
        path: pin_dir.into(),
        source,
    })?;
    let mut names: Vec<String> = entries
        .filter_map(std::result::Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names)
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
