//! Reading a set's elements straight from its dump's answers
//! (`NFT_MSG_NEWSETELEM`): each element's key and time left, borrowed from
//! the receive buffer, where libnftnl would allocate per element (a dump
//! of a million elements is read every reconciliation).

use std::time::Duration;

// From <linux/netlink.h> and <linux/netfilter/nf_tables.h>.
const NLMSG_HDRLEN: usize = size_of::<libc::nlmsghdr>();
const NFGENMSG_LEN: usize = 4;
const NLA_HDRLEN: usize = 4;
/// `nla_type` without its flags (`NLA_F_NESTED`, `NLA_F_NET_BYTEORDER`).
const NLA_TYPE_MASK: u16 = 0x3fff;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_EXPIRATION: u16 = 5;
const NFTA_DATA_VALUE: u16 = 1;

/// Calls `each` with the key (empty if it has none) and the time left
/// (`None`: it never expires) of every element in one answer of a
/// set-element dump, header included; returns false if the answer is
/// malformed.
pub(super) fn parse(msg: &[u8], mut each: impl FnMut(&[u8], Option<Duration>)) -> bool {
    let len = msg
        .get(..4)
        .map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")) as usize);
    let Some(body) = len.and_then(|len| msg.get(NLMSG_HDRLEN + NFGENMSG_LEN..len)) else {
        return false;
    };
    walk(body, |kind, list| {
        kind != NFTA_SET_ELEM_LIST_ELEMENTS
            || walk(list, |kind, element| {
                kind != NFTA_LIST_ELEM || parse_element(element, &mut each)
            })
    })
}

fn parse_element(element: &[u8], each: &mut impl FnMut(&[u8], Option<Duration>)) -> bool {
    let (mut key, mut expires_in) = (None, None);
    let parsed = walk(element, |kind, value| match kind {
        NFTA_SET_ELEM_KEY => walk(value, |kind, data| {
            if kind == NFTA_DATA_VALUE {
                key = Some(data);
            }
            true
        }),
        NFTA_SET_ELEM_EXPIRATION => match value.try_into() {
            Ok(ms) => {
                expires_in = Some(Duration::from_millis(u64::from_be_bytes(ms)));
                true
            }
            Err(_) => false,
        },
        _ => true,
    });
    if parsed {
        each(key.unwrap_or_default(), expires_in);
    }
    parsed
}

/// Calls `each` with the type and payload of every attribute in `attrs`
/// until it returns false; returns false then or if `attrs` is malformed.
fn walk<'a>(mut attrs: &'a [u8], mut each: impl FnMut(u16, &'a [u8]) -> bool) -> bool {
    while !attrs.is_empty() {
        let Some(header) = attrs.get(..NLA_HDRLEN) else {
            return false;
        };
        let len = usize::from(u16::from_ne_bytes([header[0], header[1]]));
        let kind = u16::from_ne_bytes([header[2], header[3]]) & NLA_TYPE_MASK;
        let Some(payload) = attrs.get(NLA_HDRLEN..len) else {
            return false;
        };
        if !each(kind, payload) {
            return false;
        }
        // The last attribute's padding may be left out.
        attrs = attrs.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(
            u16::try_from(NLA_HDRLEN + payload.len())
                .unwrap()
                .to_ne_bytes(),
        );
        out.extend(kind.to_ne_bytes());
        out.extend(payload);
        out.resize(out.len().next_multiple_of(4), 0);
        out
    }

    const NESTED: u16 = 0x8000;

    fn message(elements: &[Vec<u8>]) -> Vec<u8> {
        let list: Vec<u8> = elements
            .iter()
            .flat_map(|e| attr(NFTA_LIST_ELEM | NESTED, e))
            .collect();
        let mut body = attr(2, b"allow\0");
        body.extend(attr(NFTA_SET_ELEM_LIST_ELEMENTS | NESTED, &list));
        let mut msg = vec![0; NLMSG_HDRLEN + NFGENMSG_LEN];
        msg.extend(body);
        let len = u32::try_from(msg.len()).unwrap();
        msg[..4].copy_from_slice(&len.to_ne_bytes());
        msg
    }

    fn element(key: &[u8], expiration_ms: Option<u64>) -> Vec<u8> {
        let mut out = attr(NFTA_SET_ELEM_KEY | NESTED, &attr(NFTA_DATA_VALUE, key));
        out.extend(attr(4, &60_000u64.to_be_bytes()));
        if let Some(ms) = expiration_ms {
            out.extend(attr(NFTA_SET_ELEM_EXPIRATION, &ms.to_be_bytes()));
        }
        out
    }

    fn parsed(msg: &[u8]) -> Option<Vec<(Vec<u8>, Option<Duration>)>> {
        let mut out = Vec::new();
        parse(msg, |key, left| out.push((key.to_vec(), left))).then_some(out)
    }

    #[test]
    fn keys_and_time_left_are_read_from_nested_attributes() {
        let msg = message(&[
            element(&[192, 0, 2, 7, 0, 6, 0, 22], Some(1500)),
            element(&[1, 2, 3], None),
        ]);
        assert_eq!(
            parsed(&msg),
            Some(vec![
                (
                    vec![192, 0, 2, 7, 0, 6, 0, 22],
                    Some(Duration::from_millis(1500))
                ),
                (vec![1, 2, 3], None),
            ])
        );
    }

    #[test]
    fn a_truncated_or_malformed_answer_is_refused() {
        let msg = message(&[element(&[192, 0, 2, 7], Some(1500))]);
        // Claims more than it holds.
        let mut long = msg.clone();
        long[..4].copy_from_slice(&(msg.len() as u32 + 8).to_ne_bytes());
        assert_eq!(parsed(&long), None);
        // An attribute longer than what is left.
        let mut cut = msg.clone();
        cut.truncate(msg.len() - 4);
        let cut_len = cut.len() as u32;
        cut[..4].copy_from_slice(&cut_len.to_ne_bytes());
        assert_eq!(parsed(&cut), None);
        // An expiration that is not 8 bytes.
        let bad = message(&[attr(NFTA_SET_ELEM_EXPIRATION, &[0; 4])]);
        assert_eq!(parsed(&bad), None);
        assert_eq!(parsed(&[0; 3]), None);
    }
}
