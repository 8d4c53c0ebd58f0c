"""Reads an offline W&B run back the way wandb itself stores it, for tests/trackers_wandb.rs.

wandb 0.31 keeps an offline run in `<dir>/wandb/offline-run-*/run-<id>.wandb`: W&B's
transaction log (a LevelDB-style log: a 7-byte header ":W&B" + 0xBEE1 + version, then 32 KiB
blocks of records framed by a CRC-32 of type and payload, a length and a FULL/FIRST/MIDDLE/LAST type), each
record a `wandb.proto.wandb_internal_pb2.Record` protobuf. The reader that used to live in
`wandb.sdk.internal.datastore` moved into the Go core in 0.31, so the framing is walked here
(checksums verified) and every record is decoded with wandb's own protobuf classes.

Usage: wandb_read.py WANDB_DIR
Prints one JSON object: {"run": {project, name, tags, id}, "config": {...},
"history": {step: {key: value}}, "summary": {key: value}, "exit_code": N}.
"""
import glob
import json
import os
import struct
import sys
import zlib

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path):
    data = open(path, "rb").read()
    magic, ident, version = data[:4], struct.unpack("<H", data[4:6])[0], data[6]
    assert magic == b":W&B" and ident == 0xBEE1 and version == 0, (magic, ident, version)
    off, pending = 7, b""
    while off + HEADER <= len(data):
        left = BLOCK - off % BLOCK
        if left < HEADER:
            off += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[off:off + HEADER])
        if length == 0 and kind == 0:
            off += left
            continue
        payload = data[off + HEADER:off + HEADER + length]
        assert crc == zlib.crc32(bytes([kind]) + payload), f"bad checksum at {off}"
        off += HEADER + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            yield pending + payload
            pending = b""


def key_of(item):
    return "/".join(item.nested_key) if len(item.nested_key) else item.key


def main():
    runs = glob.glob(os.path.join(sys.argv[1], "wandb", "offline-run-*", "run-*.wandb"))
    assert len(runs) == 1, runs
    out = {"run": {}, "config": {}, "history": {}, "summary": {}}
    for raw in records(runs[0]):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out["run"] = {"project": r.project, "name": r.display_name,
                          "tags": list(r.tags), "id": r.run_id, "entity": r.entity}
            for u in r.config.update:
                out["config"][key_of(u)] = json.loads(u.value_json)
        elif kind == "config":
            for u in rec.config.update:
                out["config"][key_of(u)] = json.loads(u.value_json)
        elif kind == "history":
            row = {key_of(i): json.loads(i.value_json) for i in rec.history.item}
            step = row.get("_step", rec.history.step.num)
            out["history"].setdefault(str(step), {}).update(row)
        elif kind == "summary":
            for u in rec.summary.update:
                out["summary"][key_of(u)] = json.loads(u.value_json)
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    out["config"].pop("_wandb", None)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
