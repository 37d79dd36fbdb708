//! libnftnl sets as owned values: a set's definition, its elements with
//! their timeouts, the messages that create the set or add, destroy and
//! flush its elements, and parsing of dumped sets and elements. nftnl's
//! safe `Set` cannot carry element timeouts, concatenated keys or set flags,
//! so this goes through `nftnl-sys`.

use std::{
    cell::Cell,
    ffi::{CStr, CString, c_char, c_void},
    ptr::NonNull,
};

use nftnl::nftnl_sys as sys;

use super::netlink::{self, Batch, Message, Received};

/// An nftnl set object.
pub(super) struct Set(NonNull<sys::nftnl_set>);

impl Set {
    fn alloc() -> Self {
        // SAFETY: allocation only; null (out of memory) is checked.
        let set = unsafe { sys::nftnl_set_alloc() };
        Set(NonNull::new(set).expect("libnftnl: out of memory"))
    }

    fn ptr(&self) -> *mut sys::nftnl_set {
        self.0.as_ptr()
    }

    fn set_str(&mut self, attr: u32, value: &CStr) {
        // SAFETY: a valid set and NUL-terminated string, which libnftnl copies.
        unsafe { sys::nftnl_set_set_str(self.ptr(), attr as u16, value.as_ptr()) };
    }

    fn set_u32(&mut self, attr: u32, value: u32) {
        // SAFETY: a valid set; u32 attributes are copied.
        unsafe { sys::nftnl_set_set_u32(self.ptr(), attr as u16, value) };
    }

    /// No set in particular of inet table `table`: a request for all of them.
    pub(super) fn any_of(table: &CStr) -> Self {
        let mut set = Set::alloc();
        set.set_str(sys::NFTNL_SET_TABLE, table);
        set.set_u32(sys::NFTNL_SET_FAMILY, libc::NFPROTO_INET as u32);
        set
    }

    /// The set `name` of inet table `table`, as requests and element
    /// messages name it.
    pub(super) fn named(table: &CStr, name: &CStr) -> Self {
        let mut set = Set::any_of(table);
        set.set_str(sys::NFTNL_SET_NAME, name);
        set
    }

    /// A set to define, keyed by the given type and length; `id` must be
    /// unique within the batch. Without the interval flag the kernel makes
    /// it a hash set.
    pub(super) fn with_key(
        table: &CStr,
        name: &CStr,
        id: u32,
        key_type: u32,
        key_len: u32,
        flags: u32,
    ) -> Self {
        let mut set = Set::named(table, name);
        set.set_u32(sys::NFTNL_SET_ID, id);
        set.set_u32(sys::NFTNL_SET_KEY_TYPE, key_type);
        set.set_u32(sys::NFTNL_SET_KEY_LEN, key_len);
        set.set_u32(sys::NFTNL_SET_FLAGS, flags);
        set
    }

    /// A constant verdict map to define: once a rule refers to it, the
    /// kernel refuses to add or remove its elements (EBUSY).
    pub(super) fn verdict_map(
        table: &CStr,
        name: &CStr,
        id: u32,
        key_type: u32,
        key_len: u32,
    ) -> Self {
        let mut map = Set::with_key(
            table,
            name,
            id,
            key_type,
            key_len,
            (libc::NFT_SET_MAP | libc::NFT_SET_CONSTANT) as u32,
        );
        map.set_u32(sys::NFTNL_SET_DATA_TYPE, libc::NFT_DATA_VERDICT);
        map
    }

    /// The inet set described by a GETSET answer.
    pub(super) fn parse(msg: Received<'_>) -> Option<Self> {
        let set = Set::alloc();
        // SAFETY: a complete netlink message and a valid set to fill.
        (unsafe { sys::nftnl_set_nlmsg_parse(msg.as_ptr(), set.ptr()) } >= 0).then_some(set)
    }

    pub(super) fn name(&self) -> Option<String> {
        // SAFETY: a valid set; the string (if set) lives as long as the set.
        let name = unsafe { sys::nftnl_set_get_str(self.ptr(), sys::NFTNL_SET_NAME as u16) };
        // SAFETY: non-null names are NUL-terminated strings owned by the set.
        (!name.is_null()).then(|| {
            unsafe { CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned()
        })
    }

    /// The definition of a set read back: key type, key length, flags.
    pub(super) fn definition(&self) -> String {
        let get = |attr: u32| {
            // SAFETY: a valid set; an absent attribute reads as 0.
            unsafe { sys::nftnl_set_get_u32(self.ptr(), attr as u16) }
        };
        format!(
            "type {:#x} length {} flags {:#x} data {:#x}",
            get(sys::NFTNL_SET_KEY_TYPE),
            get(sys::NFTNL_SET_KEY_LEN),
            get(sys::NFTNL_SET_FLAGS),
            get(sys::NFTNL_SET_DATA_TYPE)
        )
    }

    /// Adds an element with `key`, expiring after `timeout_ms` if given.
    pub(super) fn add_element(&mut self, key: &[u8], timeout_ms: Option<u64>) {
        let elem = self.new_element(key);
        if let Some(ms) = timeout_ms {
            // SAFETY: an element of this set.
            unsafe {
                sys::nftnl_set_elem_set_u64(elem.as_ptr(), sys::NFTNL_SET_ELEM_TIMEOUT as u16, ms);
            }
        }
    }

    /// Adds a verdict map element: `key : jump <chain>`.
    pub(super) fn add_jump_element(&mut self, key: &[u8], chain: &CStr) {
        let elem = self.new_element(key);
        // SAFETY: an element of this set; libnftnl copies the chain name.
        unsafe {
            sys::nftnl_set_elem_set_u32(
                elem.as_ptr(),
                sys::NFTNL_SET_ELEM_VERDICT as u16,
                libc::NFT_JUMP as u32,
            );
            sys::nftnl_set_elem_set_str(
                elem.as_ptr(),
                sys::NFTNL_SET_ELEM_CHAIN as u16,
                chain.as_ptr(),
            );
        }
    }

    /// A new element with `key`, owned by this set.
    fn new_element(&mut self, key: &[u8]) -> NonNull<sys::nftnl_set_elem> {
        // SAFETY: allocation only; null (out of memory) is checked.
        let elem =
            NonNull::new(unsafe { sys::nftnl_set_elem_alloc() }).expect("libnftnl: out of memory");
        // SAFETY: a fresh element; libnftnl copies the key, and the set takes
        // ownership of the element (which lives as long as the set).
        unsafe {
            sys::nftnl_set_elem_set(
                elem.as_ptr(),
                sys::NFTNL_SET_ELEM_KEY as u16,
                key.as_ptr().cast::<c_void>(),
                key.len() as u32,
            );
            sys::nftnl_set_elem_add(self.ptr(), elem.as_ptr());
        }
        elem
    }

    /// Appends this set's definition (NEWSET, failing if it exists).
    pub(super) fn push_definition(&self, batch: &mut Batch, what: impl Into<String>) {
        batch.push(&Definition(self), what);
    }

    /// Appends this set's elements in as many messages as they need (the
    /// kernel caps an element list at 64 KiB). `Add` creates elements;
    /// `Destroy` removes them, ignoring absent ones.
    pub(super) fn push_elements(&self, batch: &mut Batch, op: ElementOp, what: &str) {
        let iter = ElementsIter::new(self);
        let more = Cell::new(true);
        // SAFETY: a live iterator over this set.
        while more.get() && !unsafe { sys::nftnl_set_elems_iter_cur(iter.0.as_ptr()) }.is_null() {
            let chunk = Elements {
                iter: &iter,
                op,
                more: &more,
            };
            batch.push(&chunk, what);
        }
    }

    /// Appends a message that removes every element of the set this
    /// object names (it must hold no elements itself, as from `named`).
    pub(super) fn push_flush(&self, batch: &mut Batch, what: impl Into<String>) {
        batch.push(&Flush(self), what);
    }

    /// A request for every set of this one's table.
    pub(super) fn list_request(&self) -> impl Message + '_ {
        Dump {
            set: self,
            of: Listing::Sets,
        }
    }

    /// A request for the elements of this set.
    pub(super) fn elements_request(&self) -> impl Message + '_ {
        Dump {
            set: self,
            of: Listing::Elements,
        }
    }
}

impl Drop for Set {
    fn drop(&mut self) {
        // SAFETY: the set is owned and freed once; it frees its elements.
        unsafe { sys::nftnl_set_free(self.ptr()) };
    }
}

/// What an element message does.
#[derive(Clone, Copy)]
pub(super) enum ElementOp {
    /// Adds elements; one that exists is not an error.
    Add,
    /// Adds elements that must not exist yet: one that exists fails the
    /// transaction with `EEXIST` (its timeout is never silently kept).
    Create,
    Destroy,
}

/// `NFT_MSG_DESTROYSETELEM` (Linux 6.3): like DELSETELEM, but absent
/// elements are not an error. Newer than the libc crate's constants.
const NFT_MSG_DESTROYSETELEM: i32 = 30;

struct ElementsIter(NonNull<sys::nftnl_set_elems_iter>);

impl ElementsIter {
    fn new(set: &Set) -> Self {
        // SAFETY: a valid set; null (out of memory) is checked.
        let iter = unsafe { sys::nftnl_set_elems_iter_create(set.ptr()) };
        ElementsIter(NonNull::new(iter).expect("libnftnl: out of memory"))
    }
}

impl Drop for ElementsIter {
    fn drop(&mut self) {
        // SAFETY: owned, destroyed once.
        unsafe { sys::nftnl_set_elems_iter_destroy(self.0.as_ptr()) };
    }
}

struct Definition<'a>(&'a Set);

// SAFETY: a set definition is far below the maximum message size.
unsafe impl Message for Definition<'_> {
    unsafe fn write(&self, buf: *mut c_char, seq: u32) {
        let flags = libc::NLM_F_CREATE | libc::NLM_F_EXCL | libc::NLM_F_ACK;
        // SAFETY: `buf` has room for the largest message (our contract).
        unsafe {
            let nlh = netlink::header(buf, libc::NFT_MSG_NEWSET, flags, seq);
            sys::nftnl_set_nlmsg_build_payload(nlh, self.0.ptr());
        }
    }
}

/// The next chunk of a set's elements, up to the 64 KiB an element list
/// may take; `more` tells whether elements remain after it.
struct Elements<'a> {
    iter: &'a ElementsIter,
    op: ElementOp,
    more: &'a Cell<bool>,
}

// SAFETY: libnftnl stops filling the element list before it exceeds 64 KiB,
// which nft_nlmsg_maxsize() allows for.
unsafe impl Message for Elements<'_> {
    unsafe fn write(&self, buf: *mut c_char, seq: u32) {
        let (msg_type, flags) = match self.op {
            // No NLM_F_EXCL: adding an element that exists is not an error.
            ElementOp::Add => (libc::NFT_MSG_NEWSETELEM, libc::NLM_F_CREATE),
            ElementOp::Create => (
                libc::NFT_MSG_NEWSETELEM,
                libc::NLM_F_CREATE | libc::NLM_F_EXCL,
            ),
            ElementOp::Destroy => (NFT_MSG_DESTROYSETELEM, 0),
        };
        // SAFETY: `buf` has room for the largest message (our contract); the
        // iterator belongs to this set.
        let rest = unsafe {
            let nlh = netlink::header(buf, msg_type, flags | libc::NLM_F_ACK, seq);
            sys::nftnl_set_elems_nlmsg_build_payload_iter(nlh, self.iter.0.as_ptr())
        };
        self.more.set(rest > 0);
    }
}

enum Listing {
    /// The sets of the table.
    Sets,
    /// The elements of the set.
    Elements,
}

/// A dump request for what the set object names.
struct Dump<'a> {
    set: &'a Set,
    of: Listing,
}

// SAFETY: a table's and set's names are far below the maximum size.
unsafe impl Message for Dump<'_> {
    unsafe fn write(&self, buf: *mut c_char, seq: u32) {
        // SAFETY: `buf` has room for the largest message (our contract).
        unsafe {
            match self.of {
                Listing::Sets => {
                    let nlh = netlink::header(buf, libc::NFT_MSG_GETSET, libc::NLM_F_DUMP, seq);
                    sys::nftnl_set_nlmsg_build_payload(nlh, self.set.ptr());
                }
                Listing::Elements => {
                    let nlh = netlink::header(buf, libc::NFT_MSG_GETSETELEM, libc::NLM_F_DUMP, seq);
                    sys::nftnl_set_elems_nlmsg_build_payload(nlh, self.set.ptr());
                }
            }
        }
    }
}

struct Flush<'a>(&'a Set);

// SAFETY: a set's name and table are far below the maximum message size.
unsafe impl Message for Flush<'_> {
    unsafe fn write(&self, buf: *mut c_char, seq: u32) {
        // SAFETY: `buf` has room for the largest message (our contract). A
        // DELSETELEM without an element list flushes the set.
        unsafe {
            let nlh = netlink::header(buf, libc::NFT_MSG_DELSETELEM, libc::NLM_F_ACK, seq);
            sys::nftnl_set_elems_nlmsg_build_payload(nlh, self.0.ptr());
        }
    }
}

/// A C string from a name the caller built; names never contain NUL.
pub(super) fn c_name(name: &str) -> CString {
    CString::new(name).expect("nftables names contain no NUL byte")
}
