"""fairseq's --log-format json records (as written by --log-file, or in a console log)."""

import json
from pathlib import Path


def json_records(path):
    """Every JSON object of the log PATH, in order (text around them and broken lines are skipped); [] when the
    log does not exist yet."""
    if not Path(path).exists():
        return []
    out = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        i = line.find('{"')
        try:
            rec = json.loads(line[i:]) if i >= 0 else None
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def parse_log(path):
    """{'train_inner': [...], 'valid': [...]} of a fairseq json log, sorted by update; a record repeated for the
    same update by a resumed session replaces the earlier one. Values stay as fairseq wrote them (strings)."""
    out = {"train_inner": {}, "valid": {}}
    for rec in json_records(path):
        if "valid_num_updates" in rec:
            out["valid"][int(float(rec["valid_num_updates"]))] = rec
        elif "num_updates" in rec and "loss" in rec and "train_loss" not in rec:
            out["train_inner"][int(float(rec["num_updates"]))] = rec
    return {k: [v[u] for u in sorted(v)] for k, v in out.items()}
