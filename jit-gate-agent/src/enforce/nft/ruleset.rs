//! The table's chains, rules and set definitions, as nftables would print
//! them:
//!
//! ```text
//! table inet <name> {
//!   set protected { type inet_proto . inet_service; }
//!   set allow_v4_24_0 { type ipv4_addr . inet_proto . inet_service; flags timeout; }
//!   …                                   (one set per shard, 0 to SHARDS - 1)
//!   map allow_v4_24 { type mark : verdict; flags constant;
//!                     elements = { 0 : jump allow_v4_24_0, … } }
//!   chain input {
//!     type filter hook input priority filter - 10; policy accept;
//!     meta l4proto . th dport @protected jump gate
//!   }
//!   chain gate {
//!     ct state established,related accept
//!     jump allow
//!     counter drop
//!   }
//!   chain allow {
//!     jhash ip saddr & 255.255.255.0 . meta l4proto . th dport mod 64 seed … vmap @allow_v4_24
//!   }
//!   chain allow_v4_24_0 {
//!     ip saddr & 255.255.255.0 . meta l4proto . th dport @allow_v4_24_0 accept
//!   }
//!   …
//! }
//! ```
//!
//! `allow` gets one rule per allow group (family and prefix length),
//! appended when the group is created; their order does not matter. The
//! rule jumps to the shard chain of the packet's key; a packet its shard
//! does not accept returns to `allow`, then to `gate` and its drop.

use std::{
    cell::Cell,
    ffi::{CStr, CString},
    ptr::NonNull,
};

use nftnl::{
    Chain, ChainType, Hook, MsgType, Policy, ProtoFamily, Rule, Table,
    expr::{
        Bitwise, Cmp, CmpOp, Conntrack, Counter, Expression, Ipv4HeaderField, Ipv6HeaderField,
        Meta, NetworkHeaderField, Payload, Verdict, ct::States,
    },
    nftnl_sys as sys,
};

use super::{
    keys::{
        AllowSet, Family, PROTECTED_KEY_LEN, PROTECTED_KEY_TYPE, PROTECTED_SET, SHARD_KEY_LEN,
        SHARD_KEY_TYPE,
    },
    netlink::{Batch, Op},
    sets::{ElementOp, Set, c_name},
    shards::{SEED, SHARDS},
};

const INPUT_CHAIN: &CStr = c"input";
const GATE_CHAIN: &CStr = c"gate";
pub(super) const ALLOW_CHAIN: &CStr = c"allow";

/// `filter - 10`: after conntrack (-200), so `ct state` is known, and ahead
/// of the usual filter chains at 0. Order is not what makes the gate hold:
/// a drop in any base chain is final, an accept only ends its own chain.
const PRIORITY: i32 = -10;

/// The gate's inet table, named.
pub(super) struct GateTable {
    table: Table,
    /// The last set id handed out: the kernel wants one per new set, unique
    /// within a transaction.
    set_id: Cell<u32>,
}

impl GateTable {
    pub(super) fn new(name: &CStr) -> Self {
        GateTable {
            table: Table::new(name, ProtoFamily::Inet),
            set_id: Cell::new(0),
        }
    }

    fn next_set_id(&self) -> u32 {
        self.set_id.set(self.set_id.get() + 1);
        self.set_id.get()
    }

    pub(super) fn name(&self) -> &CStr {
        self.table.get_name()
    }

    /// Appends the deletion of the table with everything in it.
    pub(super) fn push_delete(&self, batch: &mut Batch) {
        batch.push(&Op(&self.table, MsgType::Del), self.what("delete table"));
    }

    /// Appends the table afresh (deleting any earlier one in the same
    /// transaction), its chains, the protected set (empty) and the rules
    /// that do not depend on grants.
    pub(super) fn push_fresh(&self, batch: &mut Batch) {
        // Adding first makes the deletion valid whether or not it existed.
        batch.push(&Op(&self.table, MsgType::Add), self.what("add table"));
        self.push_delete(batch);
        batch.push(&Op(&self.table, MsgType::Add), self.what("add table"));

        let mut input = Chain::new(INPUT_CHAIN, &self.table);
        input.set_hook(Hook::In, PRIORITY);
        input.set_type(ChainType::Filter);
        input.set_policy(Policy::Accept);
        let gate = Chain::new(GATE_CHAIN, &self.table);
        let allow = Chain::new(ALLOW_CHAIN, &self.table);
        for chain in [&input, &gate, &allow] {
            batch.push(&Op(chain, MsgType::Add), self.what("add chain"));
        }

        Set::with_key(
            self.name(),
            &c_name(PROTECTED_SET),
            self.next_set_id(),
            PROTECTED_KEY_TYPE,
            PROTECTED_KEY_LEN,
            0,
        )
        .push_definition(batch, self.what("add set protected"));

        // meta l4proto . th dport @protected jump gate
        let mut rule = Rule::new(&input);
        rule.add_expr(&Meta::L4Proto);
        rule.add_expr(&Load::dport(KEY_START + 1));
        rule.add_expr(&Lookup::key(&c_name(PROTECTED_SET)));
        rule.add_expr(&Verdict::Jump {
            chain: GATE_CHAIN.to_owned(),
        });
        self.push_rule(batch, &rule, "add rule to chain input");

        // ct state established,related accept
        let mut rule = Rule::new(&gate);
        rule.add_expr(&Conntrack::State);
        rule.add_expr(&Bitwise::new(
            (States::ESTABLISHED | States::RELATED).bits(),
            0u32,
        ));
        rule.add_expr(&Cmp::new(CmpOp::Neq, 0u32));
        rule.add_expr(&Verdict::Accept);
        self.push_rule(batch, &rule, "add rule to chain gate");

        // jump allow
        let mut rule = Rule::new(&gate);
        rule.add_expr(&Verdict::Jump {
            chain: ALLOW_CHAIN.to_owned(),
        });
        self.push_rule(batch, &rule, "add rule to chain gate");

        // counter drop
        let mut rule = Rule::new(&gate);
        rule.add_expr(&Counter);
        rule.add_expr(&Verdict::Drop);
        self.push_rule(batch, &rule, "add rule to chain gate");
    }

    /// Appends an allow group: its shard sets, a chain per shard that
    /// accepts what its set holds (`<family> saddr & <mask> . meta l4proto
    /// . th dport @<shard> accept`), the constant map from shard number to
    /// chain, and the rule in `allow` that hashes the same key and jumps to
    /// its shard's chain through the map.
    pub(super) fn push_allow_set(&self, batch: &mut Batch, allow: AllowSet) {
        for shard in 0..SHARDS {
            let name = c_name(&allow.shard_name(shard));
            Set::with_key(
                self.name(),
                &name,
                self.next_set_id(),
                allow.key_type(),
                allow.key_len(),
                libc::NFT_SET_TIMEOUT as u32,
            )
            .push_definition(
                batch,
                self.what(&format!("add set {}", allow.shard_name(shard))),
            );

            let chain = Chain::new(&name, &self.table);
            batch.push(&Op(&chain, MsgType::Add), self.what("add chain"));
            let mut rule = Rule::new(&chain);
            push_key(&mut rule, allow);
            rule.add_expr(&Lookup::key(&name));
            rule.add_expr(&Verdict::Accept);
            self.push_rule(
                batch,
                &rule,
                &format!("add rule to chain {}", allow.shard_name(shard)),
            );
        }

        let map_name = c_name(&allow.name());
        let mut map = Set::verdict_map(
            self.name(),
            &map_name,
            self.next_set_id(),
            SHARD_KEY_TYPE,
            SHARD_KEY_LEN,
        );
        for shard in 0..SHARDS {
            map.add_jump_element(&shard.to_ne_bytes(), &c_name(&allow.shard_name(shard)));
        }
        map.push_definition(batch, self.what(&format!("add map {}", allow.name())));
        map.push_elements(
            batch,
            ElementOp::Add,
            &self.what(&format!("add elements to map {}", allow.name())),
        );

        let chain = Chain::new(ALLOW_CHAIN, &self.table);
        let mut rule = Rule::new(&chain);
        push_key(&mut rule, allow);
        let shard_reg = KEY_START + allow.key_len() / 4;
        rule.add_expr(&ShardHash {
            key_len: allow.key_len(),
            dreg: shard_reg,
        });
        rule.add_expr(&Lookup::dispatch(&map_name, shard_reg));
        self.push_rule(batch, &rule, &format!("add rule for map {}", allow.name()));
    }

    fn push_rule(&self, batch: &mut Batch, rule: &Rule<'_>, what: &str) {
        batch.push(&Op(rule, MsgType::Add), self.what(what));
    }

    /// "<action> of inet <table>", for error reports.
    pub(super) fn what(&self, action: &str) -> String {
        format!("{action} of inet {}", self.name().to_string_lossy())
    }
}

/// Appends the expressions that load an allow group's key into the
/// registers from `KEY_START`: `<family> saddr & <mask> . meta l4proto .
/// th dport`, for packets of the group's family only.
fn push_key(rule: &mut Rule<'_>, allow: AllowSet) {
    rule.add_expr(&Meta::NfProto);
    rule.add_expr(&Cmp::new(CmpOp::Eq, allow.family.nfproto()));
    rule.add_expr(&Payload::Network(match allow.family {
        Family::V4 => NetworkHeaderField::Ipv4(Ipv4HeaderField::Saddr),
        Family::V6 => NetworkHeaderField::Ipv6(Ipv6HeaderField::Saddr),
    }));
    // Host prefixes need no mask.
    if usize::from(allow.prefix_len) < allow.family.addr_len() * 8 {
        rule.add_expr(&Bitwise::new(allow.netmask(), allow.family.unspecified()));
    }
    let after_addr = KEY_START + (allow.family.addr_len() / 4) as u32;
    rule.add_expr(&Load::l4proto(after_addr));
    rule.add_expr(&Load::dport(after_addr + 1));
}

/// The register where keys start: the first 4-byte register, which is also
/// the storage of `NFT_REG_1`, where nftnl's own expressions load.
const KEY_START: u32 = libc::NFT_REG32_00 as u32;

fn alloc_expr(name: &CStr) -> NonNull<sys::nftnl_expr> {
    // SAFETY: allocation only; null (unknown name or out of memory) is checked.
    NonNull::new(unsafe { sys::nftnl_expr_alloc(name.as_ptr()) })
        .expect("libnftnl: expression allocation failed")
}

/// A load into a chosen 4-byte register. nftnl's loads all target
/// register 1, but the fields of a concatenated key must sit in consecutive
/// registers.
enum Load {
    L4Proto { dreg: u32 },
    Dport { dreg: u32 },
}

impl Load {
    /// `meta l4proto`
    fn l4proto(dreg: u32) -> Self {
        Load::L4Proto { dreg }
    }

    /// `th dport`: the 2 bytes at offset 2 of the TCP or UDP header.
    fn dport(dreg: u32) -> Self {
        Load::Dport { dreg }
    }
}

impl Expression for Load {
    fn to_expr(&self, _rule: &Rule<'_>) -> NonNull<sys::nftnl_expr> {
        let set = |expr: NonNull<sys::nftnl_expr>, attr: u32, value: u32| {
            // SAFETY: a valid expression of the kind the attribute belongs to.
            unsafe { sys::nftnl_expr_set_u32(expr.as_ptr(), attr as u16, value) }
        };
        match *self {
            Load::L4Proto { dreg } => {
                let expr = alloc_expr(c"meta");
                set(
                    expr,
                    sys::NFTNL_EXPR_META_KEY,
                    libc::NFT_META_L4PROTO as u32,
                );
                set(expr, sys::NFTNL_EXPR_META_DREG, dreg);
                expr
            }
            Load::Dport { dreg } => {
                let expr = alloc_expr(c"payload");
                set(
                    expr,
                    sys::NFTNL_EXPR_PAYLOAD_BASE,
                    libc::NFT_PAYLOAD_TRANSPORT_HEADER as u32,
                );
                set(expr, sys::NFTNL_EXPR_PAYLOAD_OFFSET, 2);
                set(expr, sys::NFTNL_EXPR_PAYLOAD_LEN, 2);
                set(expr, sys::NFTNL_EXPR_PAYLOAD_DREG, dreg);
                expr
            }
        }
    }
}

/// `enum nft_hash_types`: Jenkins' hash (the other is `symhash`).
const NFT_HASH_JENKINS: u32 = 0;

/// `jhash <key> mod SHARDS seed SEED` into `dreg`: the shard of the key
/// loaded from `KEY_START`, as `shards::shard_of` computes it.
struct ShardHash {
    key_len: u32,
    dreg: u32,
}

impl Expression for ShardHash {
    fn to_expr(&self, _rule: &Rule<'_>) -> NonNull<sys::nftnl_expr> {
        let expr = alloc_expr(c"hash");
        let set = |attr: u32, value: u32| {
            // SAFETY: a valid hash expression; u32 attributes are copied.
            unsafe { sys::nftnl_expr_set_u32(expr.as_ptr(), attr as u16, value) }
        };
        set(sys::NFTNL_EXPR_HASH_TYPE, NFT_HASH_JENKINS);
        set(sys::NFTNL_EXPR_HASH_SREG, KEY_START);
        set(sys::NFTNL_EXPR_HASH_LEN, self.key_len);
        set(sys::NFTNL_EXPR_HASH_MODULUS, SHARDS);
        set(sys::NFTNL_EXPR_HASH_SEED, SEED);
        set(sys::NFTNL_EXPR_HASH_DREG, self.dreg);
        expr
    }
}

/// A lookup in a named set of the rule's table (nftnl's needs its own set
/// object; ours may exist already): of the key at `KEY_START`, or of a
/// shard number in a verdict map, whose verdict the rule then takes.
struct Lookup {
    set: CString,
    sreg: u32,
    verdict: bool,
}

impl Lookup {
    /// Whether the key at `KEY_START` is in `set`.
    fn key(set: &CStr) -> Self {
        Lookup {
            set: set.to_owned(),
            sreg: KEY_START,
            verdict: false,
        }
    }

    /// The verdict map `map` holds for the shard number in `sreg`.
    fn dispatch(map: &CStr, sreg: u32) -> Self {
        Lookup {
            set: map.to_owned(),
            sreg,
            verdict: true,
        }
    }
}

impl Expression for Lookup {
    fn to_expr(&self, _rule: &Rule<'_>) -> NonNull<sys::nftnl_expr> {
        let expr = alloc_expr(c"lookup");
        // SAFETY: a valid lookup expression; libnftnl copies the name.
        unsafe {
            sys::nftnl_expr_set_u32(expr.as_ptr(), sys::NFTNL_EXPR_LOOKUP_SREG as u16, self.sreg);
            if self.verdict {
                sys::nftnl_expr_set_u32(
                    expr.as_ptr(),
                    sys::NFTNL_EXPR_LOOKUP_DREG as u16,
                    libc::NFT_REG_VERDICT as u32,
                );
            }
            // The kernel reports the flags whether set or not: set them, so
            // the rule reads back as written (`structure`).
            sys::nftnl_expr_set_u32(expr.as_ptr(), sys::NFTNL_EXPR_LOOKUP_FLAGS as u16, 0);
            sys::nftnl_expr_set_str(
                expr.as_ptr(),
                sys::NFTNL_EXPR_LOOKUP_SET as u16,
                self.set.as_ptr(),
            );
        }
        expr
    }
}
