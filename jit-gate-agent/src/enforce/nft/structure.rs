//! The table's structure as a comparable value: table flags, chains (hook,
//! priority, type, policy), rules by content and set definitions. Read
//! from the kernel by netlink dumps, and built from the very batch that
//! `install` sends, parsed by the same code, so what the gate writes and
//! what the kernel holds compare one to one. Set elements are not part of
//! it (they are compared against the grants).

use std::{
    collections::BTreeMap,
    ffi::{CStr, c_char},
    ptr::NonNull,
};

use nftnl::nftnl_sys as sys;

use super::{
    Result,
    keys::AllowSet,
    netlink::{self, Batch, Message, Received, Socket},
    ruleset::{ALLOW_CHAIN, GateTable},
    sets::Set,
};

/// `nf_tables` messages carry the subsystem in the high byte of their type.
const NFNL_SUBSYS_NFTABLES: i32 = 10;

/// What a table holds apart from set elements.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Structure {
    /// `None`: there is no such table.
    table_flags: Option<u32>,
    /// Chain name → its hook, priority, type and policy (empty for a
    /// regular chain).
    chains: BTreeMap<String, String>,
    /// Chain name → its rules, each as libnftnl prints its expressions.
    rules: BTreeMap<String, Vec<String>>,
    /// Set name → key type, key length and flags.
    sets: BTreeMap<String, String>,
}

impl Structure {
    /// The structure `batch` creates (as `install` builds it).
    pub(super) fn of_batch(batch: &Batch) -> Self {
        let mut structure = Structure::default();
        for msg in batch.messages() {
            structure.take(msg);
        }
        structure
    }

    /// Reads the structure of `table` from the kernel.
    pub(super) fn read(table: &GateTable, socket: &mut Socket) -> Result<Self> {
        let mut structure = Structure::default();
        for get in [Get::Table, Get::Chains, Get::Rules, Get::Sets] {
            let request = Request { table, get };
            let result = socket.dump(&table.what(get.what()), &request, |msg| {
                structure.take(msg);
                Ok(())
            });
            match result {
                Err(e) if e.is_not_found() => return Ok(Structure::default()),
                other => other?,
            }
        }
        Ok(structure)
    }

    /// The allow sets the table has.
    pub(super) fn allow_sets(&self) -> impl Iterator<Item = AllowSet> + '_ {
        self.sets
            .keys()
            .filter_map(|name| AllowSet::parse_name(name))
    }

    /// Adds what one NEW* message (or a DELTABLE) says.
    fn take(&mut self, msg: Received<'_>) {
        let subsystem_type = msg.msg_type();
        if subsystem_type >> 8 != NFNL_SUBSYS_NFTABLES {
            return;
        }
        match subsystem_type & 0xff {
            libc::NFT_MSG_NEWTABLE => {
                let table = Object::<sys::nftnl_table>::parse(msg);
                self.table_flags = Some(table.map_or(0, |t| {
                    // SAFETY: a parsed table.
                    unsafe { sys::nftnl_table_get_u32(t.ptr(), sys::NFTNL_TABLE_FLAGS as u16) }
                }));
            }
            libc::NFT_MSG_DELTABLE => *self = Structure::default(),
            libc::NFT_MSG_NEWCHAIN => {
                if let Some(chain) = Object::<sys::nftnl_chain>::parse(msg) {
                    let (name, definition) = chain_definition(&chain);
                    self.rules.entry(name.clone()).or_default();
                    self.chains.insert(name, definition);
                }
            }
            libc::NFT_MSG_NEWRULE => {
                if let Some(rule) = Object::<sys::nftnl_rule>::parse(msg) {
                    let (chain, text) = rule_text(&rule);
                    self.rules.entry(chain).or_default().push(text);
                }
            }
            libc::NFT_MSG_NEWSET => {
                if let Some(set) = Set::parse(msg)
                    && let Some(name) = set.name()
                {
                    self.sets.insert(name, set.definition());
                }
            }
            _ => {}
        }
    }

    /// What differs between `self` (the kernel's) and `wanted`, one line
    /// each; empty if nothing does.
    pub(super) fn differences(&self, wanted: &Structure) -> Vec<String> {
        let Some(flags) = self.table_flags else {
            return vec!["the table is missing".into()];
        };
        let mut out = Vec::new();
        if Some(flags) != wanted.table_flags {
            out.push(format!("table flags are {flags:#x} (dormant?)"));
        }
        compare_named("chain", &self.chains, &wanted.chains, &mut out);
        compare_named("set", &self.sets, &wanted.sets, &mut out);
        for (chain, want) in &wanted.rules {
            let mut have = self.rules.get(chain).cloned().unwrap_or_default();
            let mut want = want.clone();
            // One rule per allow set, in whatever order the sets came.
            if chain == ALLOW_CHAIN.to_str().unwrap_or_default() {
                have.sort();
                want.sort();
            }
            if have != want {
                let missing: Vec<&String> = want.iter().filter(|r| !have.contains(r)).collect();
                let extra: Vec<&String> = have.iter().filter(|r| !want.contains(r)).collect();
                out.push(match (missing.is_empty(), extra.is_empty()) {
                    (true, true) => format!("chain {chain} holds the gate's rules out of order"),
                    _ => format!(
                        "chain {chain} lacks {} of the gate's rules{} and holds {} others{}",
                        missing.len(),
                        listed(&missing),
                        extra.len(),
                        listed(&extra)
                    ),
                });
            }
        }
        out
    }
}

/// ` [a | b]`, or nothing for no rules.
fn listed(rules: &[&String]) -> String {
    if rules.is_empty() {
        String::new()
    } else {
        let texts: Vec<&str> = rules.iter().map(|r| r.as_str()).collect();
        format!(" [{}]", texts.join(" | "))
    }
}

/// Register numbers as the kernel reports them: the 4-byte registers
/// that start a 16-byte one (`NFT_REG32_00`, 04, 08, 12) read back as
/// that register (`NFT_REG_1` to 4), the others as written.
fn kernel_register(reg: u32) -> u32 {
    match reg {
        8..=23 if (reg - 8).is_multiple_of(4) => 1 + (reg - 8) / 4,
        _ => reg,
    }
}

/// `text` with every `reg N` written as the kernel reports it, also where
/// the word before it or the number carries punctuation (`jhash(reg 8,`).
fn normalise_registers(text: &str) -> String {
    let mut out = Vec::new();
    let mut words = text.split(' ').peekable();
    while let Some(word) = words.next() {
        out.push(word.to_owned());
        if !word.ends_with("reg") {
            continue;
        }
        let Some(next) = words.peek() else { continue };
        let digits = next.len() - next.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if let Ok(n) = next[..digits].parse::<u32>() {
            out.push(format!("{}{}", kernel_register(n), &next[digits..]));
            words.next();
        }
    }
    out.join(" ")
}

fn compare_named(
    what: &str,
    have: &BTreeMap<String, String>,
    want: &BTreeMap<String, String>,
    out: &mut Vec<String>,
) {
    for (name, definition) in want {
        match have.get(name) {
            None => out.push(format!("{what} {name} is missing")),
            Some(d) if d != definition => {
                out.push(format!("{what} {name} is {d}, not {definition}"));
            }
            Some(_) => {}
        }
    }
    for name in have.keys().filter(|n| !want.contains_key(*n)) {
        out.push(format!("{what} {name} is not the gate's"));
    }
}

/// The structure `install` would create with these allow sets.
pub(super) fn wanted(
    table: &GateTable,
    allow_sets: impl IntoIterator<Item = AllowSet>,
) -> Structure {
    let mut batch = Batch::new();
    table.push_fresh(&mut batch);
    for set in allow_sets {
        table.push_allow_set(&mut batch, set);
    }
    Structure::of_batch(&batch)
}

/// A libnftnl object of one of the kinds parsed here, freed on drop.
struct Object<T: Kind>(NonNull<T>);

trait Kind {
    fn alloc() -> *mut Self;
    /// # Safety
    /// `nlh` must be a complete message and `obj` a valid object.
    unsafe fn parse(nlh: *const libc::nlmsghdr, obj: *mut Self) -> i32;
    /// # Safety
    /// `obj` must be a valid object, freed once.
    unsafe fn free(obj: *mut Self);
}

macro_rules! kind {
    ($ty:ty, $alloc:ident, $parse:ident, $free:ident) => {
        impl Kind for $ty {
            fn alloc() -> *mut Self {
                // SAFETY: allocation only.
                unsafe { sys::$alloc() }
            }
            unsafe fn parse(nlh: *const libc::nlmsghdr, obj: *mut Self) -> i32 {
                // SAFETY: forwarded from the caller.
                unsafe { sys::$parse(nlh, obj) }
            }
            unsafe fn free(obj: *mut Self) {
                // SAFETY: forwarded from the caller.
                unsafe { sys::$free(obj) }
            }
        }
    };
}

kind!(
    sys::nftnl_table,
    nftnl_table_alloc,
    nftnl_table_nlmsg_parse,
    nftnl_table_free
);
kind!(
    sys::nftnl_chain,
    nftnl_chain_alloc,
    nftnl_chain_nlmsg_parse,
    nftnl_chain_free
);
kind!(
    sys::nftnl_rule,
    nftnl_rule_alloc,
    nftnl_rule_nlmsg_parse,
    nftnl_rule_free
);

impl<T: Kind> Object<T> {
    fn parse(msg: Received<'_>) -> Option<Self> {
        let object = Object(NonNull::new(T::alloc()).expect("libnftnl: out of memory"));
        // SAFETY: a complete netlink message and a fresh object.
        (unsafe { T::parse(msg.as_ptr(), object.ptr()) } >= 0).then_some(object)
    }

    fn ptr(&self) -> *mut T {
        self.0.as_ptr()
    }
}

impl<T: Kind> Drop for Object<T> {
    fn drop(&mut self) {
        // SAFETY: owned, freed once.
        unsafe { T::free(self.ptr()) }
    }
}

/// A string attribute of a libnftnl object, or "".
fn text(ptr: *const c_char) -> String {
    if ptr.is_null() {
        return String::new();
    }
    // SAFETY: non-null strings of libnftnl objects are NUL-terminated and
    // live as long as the object, which outlives this call.
    unsafe { CStr::from_ptr(ptr) }
        .to_string_lossy()
        .into_owned()
}

fn chain_definition(chain: &Object<sys::nftnl_chain>) -> (String, String) {
    let c = chain.ptr();
    let is_set = |attr: u32| {
        // SAFETY: a parsed chain.
        unsafe { sys::nftnl_chain_is_set(c, attr as u16) }
    };
    // SAFETY: a parsed chain; attributes are read only when set.
    unsafe {
        let name = text(sys::nftnl_chain_get_str(c, sys::NFTNL_CHAIN_NAME as u16));
        if !is_set(sys::NFTNL_CHAIN_HOOKNUM) {
            return (name, String::new());
        }
        let policy = if is_set(sys::NFTNL_CHAIN_POLICY) {
            sys::nftnl_chain_get_u32(c, sys::NFTNL_CHAIN_POLICY as u16).to_string()
        } else {
            "-".into()
        };
        let definition = format!(
            "type {} hook {} priority {} policy {}",
            text(sys::nftnl_chain_get_str(c, sys::NFTNL_CHAIN_TYPE as u16)),
            sys::nftnl_chain_get_u32(c, sys::NFTNL_CHAIN_HOOKNUM as u16),
            sys::nftnl_chain_get_s32(c, sys::NFTNL_CHAIN_PRIO as u16),
            policy,
        );
        (name, definition)
    }
}

/// Packets and bytes the gate's drop rule counted (the table's only
/// counter: `counter drop` at the end of chain `gate`); `None` without the
/// table.
pub(super) fn drop_counter(table: &GateTable, socket: &mut Socket) -> Result<Option<(u64, u64)>> {
    let mut counted = (0, 0);
    let request = Request {
        table,
        get: Get::Rules,
    };
    let result = socket.dump(&table.what("read the drop counter"), &request, |msg| {
        if msg.msg_type() >> 8 == NFNL_SUBSYS_NFTABLES
            && msg.msg_type() & 0xff == libc::NFT_MSG_NEWRULE
            && let Some(rule) = Object::<sys::nftnl_rule>::parse(msg)
        {
            let (packets, bytes) = counter_values(&rule);
            counted.0 += packets;
            counted.1 += bytes;
        }
        Ok(())
    });
    match result {
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
        Ok(()) => Ok(Some(counted)),
    }
}

/// The packets and bytes of a rule's counter expressions.
fn counter_values(rule: &Object<sys::nftnl_rule>) -> (u64, u64) {
    let mut counted = (0, 0);
    // SAFETY: a parsed rule; the iterator is destroyed before the rule.
    unsafe {
        let iter = sys::nftnl_expr_iter_create(rule.ptr());
        if iter.is_null() {
            return counted;
        }
        let mut expr = sys::nftnl_expr_iter_next(iter);
        while !expr.is_null() {
            if text(sys::nftnl_expr_get_str(expr, sys::NFTNL_EXPR_NAME as u16)) == "counter" {
                counted.0 += sys::nftnl_expr_get_u64(expr, sys::NFTNL_EXPR_CTR_PACKETS as u16);
                counted.1 += sys::nftnl_expr_get_u64(expr, sys::NFTNL_EXPR_CTR_BYTES as u16);
            }
            expr = sys::nftnl_expr_iter_next(iter);
        }
        sys::nftnl_expr_iter_destroy(iter);
    }
    counted
}

/// The chain of a rule and its expressions as libnftnl prints them, with
/// counter values left out (they change as packets pass).
fn rule_text(rule: &Object<sys::nftnl_rule>) -> (String, String) {
    let r = rule.ptr();
    // SAFETY: a parsed rule.
    let chain = text(unsafe { sys::nftnl_rule_get_str(r, sys::NFTNL_RULE_CHAIN as u16) });
    let mut parts = Vec::new();
    // SAFETY: a parsed rule; the iterator is destroyed before the rule.
    unsafe {
        let iter = sys::nftnl_expr_iter_create(r);
        if iter.is_null() {
            return (chain, String::new());
        }
        let mut expr = sys::nftnl_expr_iter_next(iter);
        while !expr.is_null() {
            let name = text(sys::nftnl_expr_get_str(expr, sys::NFTNL_EXPR_NAME as u16));
            if name == "counter" {
                parts.push(name);
            } else {
                let mut buf: [c_char; 512] = [0; 512];
                sys::nftnl_expr_snprintf(
                    buf.as_mut_ptr(),
                    buf.len(),
                    expr,
                    sys::NFTNL_OUTPUT_DEFAULT,
                    0,
                );
                parts.push(format!("{name} {}", text(buf.as_ptr())));
            }
            expr = sys::nftnl_expr_iter_next(iter);
        }
        sys::nftnl_expr_iter_destroy(iter);
    }
    (chain, normalise_registers(&parts.join(" ; ")))
}

#[derive(Clone, Copy)]
enum Get {
    Table,
    Chains,
    Rules,
    Sets,
}

impl Get {
    fn what(self) -> &'static str {
        match self {
            Get::Table => "read the table",
            Get::Chains => "read the chains",
            Get::Rules => "read the rules",
            Get::Sets => "read the sets",
        }
    }
}

/// A request for the table, or a dump of its chains, rules or sets.
struct Request<'a> {
    table: &'a GateTable,
    get: Get,
}

// SAFETY: a table name is far below the maximum message size.
unsafe impl Message for Request<'_> {
    unsafe fn write(&self, buf: *mut c_char, seq: u32) {
        let name = self.table.name();
        let family = libc::NFPROTO_INET as u32;
        // SAFETY: `buf` has room for the largest message (our contract); the
        // objects are fresh, filled with copied strings, and freed here.
        unsafe {
            match self.get {
                Get::Table => {
                    let t = sys::nftnl_table_alloc();
                    sys::nftnl_table_set_str(t, sys::NFTNL_TABLE_NAME as u16, name.as_ptr());
                    sys::nftnl_table_set_u32(t, sys::NFTNL_TABLE_FAMILY as u16, family);
                    let nlh = netlink::header(buf, libc::NFT_MSG_GETTABLE, libc::NLM_F_ACK, seq);
                    sys::nftnl_table_nlmsg_build_payload(nlh, t);
                    sys::nftnl_table_free(t);
                }
                Get::Chains => {
                    let c = sys::nftnl_chain_alloc();
                    sys::nftnl_chain_set_str(c, sys::NFTNL_CHAIN_TABLE as u16, name.as_ptr());
                    let nlh = netlink::header(buf, libc::NFT_MSG_GETCHAIN, libc::NLM_F_DUMP, seq);
                    sys::nftnl_chain_nlmsg_build_payload(nlh, c);
                    sys::nftnl_chain_free(c);
                }
                Get::Rules => {
                    let r = sys::nftnl_rule_alloc();
                    sys::nftnl_rule_set_str(r, sys::NFTNL_RULE_TABLE as u16, name.as_ptr());
                    let nlh = netlink::header(buf, libc::NFT_MSG_GETRULE, libc::NLM_F_DUMP, seq);
                    sys::nftnl_rule_nlmsg_build_payload(nlh, r);
                    sys::nftnl_rule_free(r);
                }
                Get::Sets => Set::any_of(name).list_request().write(buf, seq),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_read_back_as_the_kernel_reports_them() {
        assert_eq!(
            normalise_registers("lookup reg 8 set protected ; load => reg 9 ; cmp reg 12 x"),
            "lookup reg 1 set protected ; load => reg 9 ; cmp reg 2 x"
        );
        assert_eq!(
            normalise_registers("immediate reg 0 accept"),
            "immediate reg 0 accept"
        );
        assert_eq!(
            normalise_registers("hash reg 11 = jhash(reg 8, 12, 0x1) % mod 64"),
            "hash reg 11 = jhash(reg 1, 12, 0x1) % mod 64"
        );
        assert_eq!(
            normalise_registers("immediate reg 0 accept"),
            "immediate reg 0 accept"
        );
    }

    #[test]
    fn differences_name_what_is_missing() {
        let mut wanted = Structure {
            table_flags: Some(0),
            ..Structure::default()
        };
        wanted.chains.insert("gate".into(), String::new());
        wanted
            .rules
            .insert("gate".into(), vec!["accept".into(), "drop".into()]);
        assert!(wanted.differences(&wanted).is_empty());
        let mut flushed = wanted.clone();
        flushed.rules.insert("gate".into(), Vec::new());
        flushed.table_flags = Some(1);
        flushed.chains.insert("evil".into(), String::new());
        let found = flushed.differences(&wanted).join("; ");
        for needle in [
            "table flags are 0x1",
            "chain evil is not the gate's",
            "lacks 2 of the gate's rules [accept | drop]",
        ] {
            assert!(found.contains(needle), "{found}");
        }
        assert_eq!(
            Structure::default().differences(&wanted),
            ["the table is missing"]
        );
    }
}
