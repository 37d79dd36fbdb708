//! The gate's hold on interfaces: attaching the program (native, else
//! generic), adopting a link pinned by an earlier run, and keeping every
//! link's own handle in the agent, so that removing a pin (or the whole
//! pin directory) never detaches the gate while the agent runs; `repin`
//! then puts program, map and link pins back from those handles.

use std::{fs, path::Path};

use aya::{
    maps::MapData,
    programs::{
        XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};

use super::{
    AttachMode, Attachment, LINK_PIN_PREFIX, PROGRAM_PIN, Result, XdpError, XdpGate,
    attached_interfaces, ensure_bpffs, remove_if_exists, xdp_program,
};

/// A link the agent holds: while it does, the kernel keeps the link (and
/// the program on the interface) whatever happens to its pin.
pub(super) struct HeldLink {
    /// The interface it was attached to (a re-created interface gets a new one).
    pub(super) index: u32,
    link: PinnedLink,
}

impl XdpGate {
    /// The kernel's id of the loaded program, as interfaces report it.
    pub fn program_id(&self) -> Result<u32> {
        self.program()
            .info()
            .map(|info| info.id())
            .map_err(|source| XdpError::Program {
                what: "info".into(),
                source: Box::new(source),
            })
    }

    /// Attaches the program to interface `ifname` of the calling thread's
    /// network namespace, pins the link and holds it. A link pinned by an earlier run is adopted:
    /// the program replaces the old one in it atomically (`bpf_link_update`),
    /// so the interface is never without the gate; a pinned link that can no
    /// longer be adopted (detached meanwhile) is replaced by a new one.
    pub fn attach(&mut self, ifname: &str) -> Result<Attachment> {
        let index =
            crate::config::interface_index(ifname).ok_or_else(|| XdpError::NoInterface {
                ifname: ifname.to_owned(),
            })?;
        let link_pin = self.link_pin(ifname);
        self.links.remove(ifname);
        if link_pin.exists() {
            match self.adopt(ifname, &link_pin) {
                Ok(link) => {
                    self.links
                        .insert(ifname.to_owned(), HeldLink { index, link });
                    return Ok(Attachment::Adopted);
                }
                Err(e) => {
                    tracing::warn!(
                        "the link pinned for {ifname} cannot be adopted ({e}); attaching anew"
                    );
                    remove_if_exists(&link_pin)?;
                }
            }
        }
        let program = xdp_program(&mut self.ebpf)?;
        let (id, mode) = match program.attach(ifname, XdpMode::Driver) {
            Ok(id) => (id, AttachMode::Native),
            Err(native) => match program.attach(ifname, XdpMode::Skb) {
                Ok(id) => (id, AttachMode::Generic),
                Err(generic) => {
                    return Err(XdpError::Attach {
                        ifname: ifname.into(),
                        native: Box::new(native),
                        generic: Box::new(generic),
                    });
                }
            },
        };
        let link = program.take_link(id).map_err(|source| XdpError::Program {
            what: format!("take link on {ifname}"),
            source: Box::new(source),
        })?;
        let fd_link = FdLink::try_from(link).map_err(|source| XdpError::Link {
            what: format!("on {ifname} is not a bpf_link (kernel too old?)"),
            source,
        })?;
        let link = fd_link.pin(&link_pin).map_err(|source| XdpError::Pin {
            path: link_pin,
            source,
        })?;
        self.links
            .insert(ifname.to_owned(), HeldLink { index, link });
        Ok(Attachment::Attached(mode))
    }

    fn adopt(&mut self, ifname: &str, link_pin: &Path) -> Result<PinnedLink> {
        let link_err = |what: &str| {
            let what = format!("{what} {}", link_pin.display());
            move |source| XdpError::Link { what, source }
        };
        let pinned = PinnedLink::from_pin(link_pin).map_err(link_err("open"))?;
        let link = XdpLink::try_from(FdLink::from(pinned)).map_err(link_err("adopt"))?;
        let program = xdp_program(&mut self.ebpf)?;
        let id = program
            .attach_to_link(link)
            .map_err(|source| XdpError::Program {
                what: format!("replace in link on {ifname}"),
                source: Box::new(source),
            })?;
        // The program's own handle goes; the pin keeps the link meanwhile,
        // and the one held from now on is opened from the pin.
        let _ = program.take_link(id);
        PinnedLink::from_pin(link_pin).map_err(link_err("hold"))
    }

    /// Lets go of interface `ifname`: drops the held link and its pin,
    /// which detaches the program (if the link still runs it).
    pub fn detach(&mut self, ifname: &str) -> Result<()> {
        self.links.remove(ifname);
        remove_if_exists(&self.link_pin(ifname))
    }

    /// Interfaces with a pinned link.
    pub fn attached_interfaces(&self) -> Result<Vec<String>> {
        attached_interfaces(&self.pin_dir)
    }

    /// The interface index each held link was attached to, by name.
    pub fn held(&self) -> impl Iterator<Item = (&str, u32)> {
        self.links
            .iter()
            .map(|(name, held)| (name.as_str(), held.index))
    }

    /// What is missing of the pins (program, maps, held links), without
    /// changing anything.
    pub fn missing_pins(&self) -> Vec<String> {
        let mut missing = Vec::new();
        if !self.pin_dir.join(PROGRAM_PIN).exists() {
            missing.push(PROGRAM_PIN.to_owned());
        }
        for (name, _) in &self.map_ids {
            if !self.pin_dir.join(name).exists() {
                missing.push((*name).to_owned());
            }
        }
        for name in self.links.keys() {
            if !self.link_pin(name).exists() {
                missing.push(format!("{LINK_PIN_PREFIX}{name}"));
            }
        }
        missing
    }

    /// Pins again whatever of program, maps and held links lost its pin
    /// (the pin directory removed behind the agent's back), from the
    /// handles the agent holds; returns what was missing. Until this runs,
    /// the gate keeps working (the agent's handles keep everything alive),
    /// but would not outlive the agent.
    pub fn repin(&mut self) -> Result<Vec<String>> {
        let missing = self.missing_pins();
        if missing.is_empty() {
            return Ok(missing);
        }
        ensure_bpffs(&self.pin_dir)?;
        fs::create_dir_all(&self.pin_dir).map_err(|source| XdpError::PinDir {
            path: self.pin_dir.clone(),
            source,
        })?;
        let program_pin = self.pin_dir.join(PROGRAM_PIN);
        if !program_pin.exists() {
            xdp_program(&mut self.ebpf)?
                .pin(&program_pin)
                .map_err(|source| XdpError::Pin {
                    path: program_pin,
                    source,
                })?;
        }
        for (name, id) in &self.map_ids {
            let path = self.pin_dir.join(name);
            if !path.exists() {
                let map =
                    MapData::from_id(*id).map_err(|source| XdpError::Map { map: name, source })?;
                map.pin(&path)
                    .map_err(|source| XdpError::Pin { path, source })?;
            }
        }
        let unpinned: Vec<String> = self
            .links
            .keys()
            .filter(|name| !self.link_pin(name).exists())
            .cloned()
            .collect();
        for name in unpinned {
            let Some(held) = self.links.remove(&name) else {
                continue;
            };
            let path = self.link_pin(&name);
            // Pinning consumes the handle: if it failed, the link would be
            // gone, so the directory is checked first; a failure anyway is
            // healed by the next check of the interface, which attaches anew.
            match FdLink::from(held.link).pin(&path) {
                Ok(link) => {
                    self.links.insert(
                        name,
                        HeldLink {
                            index: held.index,
                            link,
                        },
                    );
                }
                Err(source) => return Err(XdpError::Pin { path, source }),
            }
        }
        Ok(missing)
    }
}
