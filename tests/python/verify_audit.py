"""Verifies a jit-gate audit log from its SQLite database, independently
of the agent, following README "Audit log". Prints one JSON object:
{"intact", "records", "pruned", "broken_sequence", "problem"}.

usage: verify_audit.py DATABASE [rehash]
With "rehash", first rewrites every hash as a forger would (after editing a
record) and exits.
"""

import hashlib
import json
import sqlite3
import sys


def u64(n):
    return n.to_bytes(8, "big")


def text(value):
    data = value.encode()
    return u64(len(data)) + data


def payload_digest(message, details):
    return hashlib.sha256(text(message) + text(details)).hexdigest()


def record_hash(previous, seq, at_ms, kind, principal, grant_id, digest):
    data = (
        bytes.fromhex(previous)
        + u64(seq)
        + at_ms.to_bytes(8, "big", signed=True)
        + text(kind)
        + text(principal)
        + u64(grant_id)
        + bytes.fromhex(digest)
    )
    return hashlib.sha256(data).hexdigest()


def rows(db):
    return db.execute(
        "SELECT seq, at_ms, kind, principal, grant_id, message, details, payload_sha256, hash "
        "FROM audit ORDER BY seq"
    ).fetchall()


def verify(db):
    previous, records, pruned = "00" * 32, 0, 0
    for seq, at, kind, principal, grant, message, details, digest, stored in rows(db):
        if seq != records + 1:
            return {"intact": False, "broken_sequence": seq, "problem": "gap"}
        if message is None:
            if kind != "access-denied":
                return {"intact": False, "broken_sequence": seq, "problem": "pruned"}
            pruned += 1
        elif payload_digest(message, details) != digest:
            return {"intact": False, "broken_sequence": seq, "problem": "payload"}
        if record_hash(previous, seq, at, kind, principal, grant, digest) != stored:
            return {"intact": False, "broken_sequence": seq, "problem": "hash"}
        previous, records = stored, records + 1
    return {"intact": True, "records": records, "pruned": pruned}


def rehash(db):
    previous = "00" * 32
    for seq, at, kind, principal, grant, message, details, digest, _ in rows(db):
        if message is not None:
            digest = payload_digest(message, details)
        new = record_hash(previous, seq, at, kind, principal, grant, digest)
        db.execute(
            "UPDATE audit SET payload_sha256 = ?, hash = ? WHERE seq = ?", (digest, new, seq)
        )
        previous = new
    db.commit()
    return {"rehashed": True}


def main():
    db = sqlite3.connect(sys.argv[1])
    result = rehash(db) if sys.argv[2:] == ["rehash"] else verify(db)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
