"""Verifies a jit-gate audit log from its SQLite database, independently
of the agent, following README "Audit log". Prints one JSON object:
{"intact", "records", "pruned", "broken_sequence", "problem"}.

usage: verify_audit.py DATABASE [rehash | edit SEQ MESSAGE]
With "rehash", first rewrites every hash as a forger would (after editing a
record) and exits. With "edit", rewrites record SEQ's message in place as a
forger would (in whichever form the row stores it), leaving its hash.
"""

import hashlib
import json
import sqlite3
import sys
import time
import zlib

PROTOCOLS = {6: "tcp", 17: "udp"}


def u64(n):
    return n.to_bytes(8, "big")


def text(value):
    data = value.encode()
    return u64(len(data)) + data


def preimage(message, details):
    return text(message) + text(details)


def split_preimage(data):
    """(message, details) from a payload preimage."""
    n = int.from_bytes(data[:8], "big")
    message, rest = data[8 : 8 + n].decode(), data[8 + n :]
    m = int.from_bytes(rest[:8], "big")
    return message, rest[8 : 8 + m].decode()


def record_hash(previous, seq, at_ms, kind, principal, grant_id, digest):
    data = (
        previous
        + u64(seq)
        + at_ms.to_bytes(8, "big", signed=True)
        + text(kind)
        + text(principal)
        + u64(grant_id)
        + digest
    )
    return hashlib.sha256(data).digest()


def dictionaries(db):
    return dict(db.execute("SELECT id, bytes FROM audit_dictionaries"))


def inflate(stored, dicts):
    """The preimage a deflated payload column holds (None: not readable)."""
    try:
        d = zlib.decompressobj(wbits=-15, zdict=dicts[stored[0]])
        data = d.decompress(stored[1:]) + d.flush()
        return data if d.eof else None
    except (KeyError, zlib.error):
        return None


def grant_created(stored, at, grant):
    """The preimage of a grant-created payload kept as a reference (byte 0)
    to its grant's row: what the agent's message and details say of it."""
    if grant[0] is None or len(stored) > 5:
        return None
    gid, source, protocol, port, request_id, requester, justification, ticket, granted, limit = grant
    end = at // 1000 + int.from_bytes(stored[1:], "big")
    message = "grant %d for %s -> %d/%s until %s to %s%s" % (
        gid,
        source,
        port,
        PROTOCOLS.get(protocol, "?"),
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(end)),
        requester,
        ", at most %d connections" % limit if limit else "",
    )
    details = {
        "request_id": request_id,
        "requester": requester,
        "justification": justification,
        "ticket": ticket,
        "duration_ms": max(granted or 0, 0),
        "max_connections": limit,
    }
    text = json.dumps(details, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return preimage(message, text)


def rows(db):
    """Each record as (seq, at_ms, kind name, principal, grant_id, preimage
    or None if pruned, stored digest or None, hash)."""
    dicts = dictionaries(db)
    out = []
    for row in db.execute(
        "SELECT seq, at_ms, audit_kinds.name, audit.principal, grant_id, message, details, "
        "payload, payload_sha256, hash, g.id, g.source, g.protocol, g.port, g.request_id, "
        "g.requester, g.justification, g.ticket, g.granted_ms, g.max_connections "
        "FROM audit LEFT JOIN audit_kinds ON audit_kinds.code = audit.kind "
        "LEFT JOIN grants AS g ON g.id = audit.grant_id ORDER BY seq"
    ):
        seq, at, kind, principal, grant, message, details, payload, digest, stored = row[:10]
        if message is not None:
            data = preimage(message, details or "")
        elif payload is not None and payload[:1] == b"\0":
            data = grant_created(payload, at, row[10:]) or b"unreadable"
        elif payload is not None:
            data = inflate(payload, dicts) or b"unreadable"
        else:
            data = None
        out.append((seq, at, kind, principal, grant, data, digest, stored))
    return out


def verify(db):
    previous, records, pruned = bytes(32), 0, 0
    for seq, at, kind, principal, grant, data, digest, stored in rows(db):
        if seq != records + 1:
            return {"intact": False, "broken_sequence": seq, "problem": "gap"}
        if data is None:
            if kind != "access-denied":
                return {"intact": False, "broken_sequence": seq, "problem": "pruned"}
            pruned += 1
        else:
            computed = hashlib.sha256(data).digest()
            if digest is not None and computed != digest:
                return {"intact": False, "broken_sequence": seq, "problem": "payload"}
            digest = computed
        if digest is None or kind is None:
            return {"intact": False, "broken_sequence": seq, "problem": "digest or kind"}
        if record_hash(previous, seq, at, kind, principal, grant, digest) != stored:
            return {"intact": False, "broken_sequence": seq, "problem": "hash"}
        previous, records = stored, records + 1
    return {"intact": True, "records": records, "pruned": pruned}


def rehash(db):
    previous = bytes(32)
    for seq, at, kind, principal, grant, data, digest, _ in rows(db):
        if data is not None:
            digest = hashlib.sha256(data).digest()
        new = record_hash(previous, seq, at, kind, principal, grant, digest)
        # A stored digest is rewritten too; a row that derives it keeps none.
        db.execute(
            "UPDATE audit SET payload_sha256 = CASE WHEN payload_sha256 IS NULL THEN NULL "
            "ELSE ? END, hash = ? WHERE seq = ?",
            (digest, new, seq),
        )
        previous = new
    db.commit()
    return {"rehashed": True}


def edit(db, seq, message):
    stored_message = db.execute("SELECT message FROM audit WHERE seq = ?", (seq,)).fetchone()[0]
    if stored_message is not None:
        db.execute("UPDATE audit SET message = ? WHERE seq = ?", (message, seq))
    else:
        # A reference to the grant's row is replaced by the forged text deflated.
        data = next(r[5] for r in rows(db) if r[0] == seq)
        _, details = split_preimage(data)
        dicts = dictionaries(db)
        first = max(dicts)
        c = zlib.compressobj(9, zlib.DEFLATED, -15, zdict=dicts[first])
        forged = bytes([first]) + c.compress(preimage(message, details)) + c.flush()
        db.execute("UPDATE audit SET payload = ? WHERE seq = ?", (forged, seq))
    db.commit()
    return {"edited": seq}


def main():
    db = sqlite3.connect(sys.argv[1])
    if sys.argv[2:] == ["rehash"]:
        result = rehash(db)
    elif sys.argv[2:3] == ["edit"]:
        result = edit(db, int(sys.argv[3]), sys.argv[4])
    else:
        result = verify(db)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
