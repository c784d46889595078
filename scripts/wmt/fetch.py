"""Fetch the WMT archives: download (resumable, with retries) or take local copies, then verify checksums.

    fetch.py --table TABLE --orig DIR FILE... [--archives DIR] [--mirror URL] [--checksums FILE] [--strict]

TABLE: one archive a line, ``FILE URL SHA256 MD5`` ('-' = not known), '#' comments (the table lives in
scripts/prepare-wmt14en2de.sh). --checksums FILE: lines in ``sha256sum`` format (``HEX  FILE``) that replace
the table's values for those files; ``-  FILE`` marks a file as having no known checksum.

Verification fails closed: a known checksum that does not match stops the run and the file is never used
(a bad download is renamed to FILE.bad). A file with no known checksum is used with a loud warning that
prints its sha256 so the user can record it (--strict makes that an error too).

An archive is at ORIG/FILE only once verified, and its sha256 in ORIG/FILE.sha256; downloads grow in
ORIG/FILE.part and resume from there. With --archives, ORIG/FILE is a link to the local copy (no copy of
several GB): extract.py hashes the bytes it reads and refuses them unless they match ORIG/FILE.sha256, so a
copy replaced after verification is never used.
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import time
from typing import Dict, NamedTuple, Optional

from wmt_common import RecipeError, atomic_path, die, log, main_guard, progress, warn, write_text_atomic


class ChecksumMismatch(RecipeError):
    pass


class Entry(NamedTuple):
    url: str
    sha256: Optional[str]
    md5: Optional[str]


def _hex_or_none(value: str, length: int, where: str) -> Optional[str]:
    if value == "-":
        return None
    value = value.lower()
    if len(value) != length or any(c not in "0123456789abcdef" for c in value):
        die(f"{where}: {value!r} is not a {length}-digit hex checksum (use '-' for unknown)")
    return value


def read_table(path: str) -> Dict[str, Entry]:
    table = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            cols = line.split()
            if len(cols) != 4:
                die(f"{path}:{n}: expected 'FILE URL SHA256 MD5', got {line!r}")
            name, url, sha, md5 = cols
            table[name] = Entry(url, _hex_or_none(sha, 64, f"{path}:{n}"), _hex_or_none(md5, 32, f"{path}:{n}"))
    return table


def apply_user_checksums(table: Dict[str, Entry], path: str) -> None:
    """sha256sum-format overrides: the user's value replaces both of the table's checksums for that file."""
    if not os.path.isfile(path):
        die(f"--checksums file not found: {path}")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(None, 1)
            if len(parts) != 2:
                die(f"{path}:{n}: expected 'SHA256  FILE' (sha256sum format), got {line!r}")
            sha, name = parts[0], os.path.basename(parts[1].strip().lstrip("*"))
            old = table.get(name, Entry("", None, None))
            table[name] = Entry(old.url, _hex_or_none(sha, 64, f"{path}:{n}"), None)


def digests(path: str):
    sha, md5 = hashlib.sha256(), hashlib.md5()
    size = os.path.getsize(path)
    with (
        open(path, "rb") as f,
        progress(total=size, unit="B", unit_scale=True, desc=f"checksum {os.path.basename(path)}", leave=False) as bar,
    ):
        for block in iter(lambda: f.read(1 << 22), b""):
            sha.update(block)
            md5.update(block)
            bar.update(len(block))
    return sha.hexdigest(), md5.hexdigest()


def verify(path: str, name: str, entry: Entry, strict: bool) -> str:
    """Return the sha256 of ``path``; raise on a known checksum that differs (fail closed)."""
    sha, md5 = digests(path)
    for alg, want, got in (("sha256", entry.sha256, sha), ("md5", entry.md5, md5)):
        if want is not None and want != got:
            raise ChecksumMismatch(
                f"checksum mismatch for {name}: expected {alg} {want}, got {got} ({path}). The file is corrupt, "
                f"incomplete or not the expected release. If you have checked that this file is genuine (e.g. "
                f"the publisher re-packed it), record its sha256 with --checksums or in the table of "
                f"scripts/prepare-wmt14en2de.sh"
            )
    if entry.sha256 is None and entry.md5 is None:
        msg = (
            f"no checksum known for {name}: it is UNVERIFIED. Its sha256 is {sha}; check it against a "
            f"trusted source and record it in the table of scripts/prepare-wmt14en2de.sh (or --checksums)"
        )
        if strict:
            die(msg + " (--strict-checksums)")
        warn(msg)
    else:
        log(f"[fetch] {name}: checksum ok ({'sha256' if entry.sha256 else 'md5'})")
    return sha


def _downloader(url: str, part: str):
    if shutil.which("curl"):
        # -C -: continue from the size of PART; -f: an HTTP error is a failure, not a saved error page.
        return [
            "curl",
            "-fL",
            "--retry",
            "3",
            "--retry-delay",
            "5",
            "--connect-timeout",
            "30",
            "--progress-bar",
            "-C",
            "-",
            "-o",
            part,
            url,
        ]
    if shutil.which("wget"):
        return ["wget", "-c", "--tries=3", "--waitretry=5", "--timeout=30", "-O", part, url]
    die("neither curl nor wget is installed: cannot download")


CURL_CANNOT_RESUME = {33, 36}  # server refuses byte ranges / bad resume offset: start over


def download(url: str, part: str, attempts: int) -> None:
    for attempt in range(1, attempts + 1):
        have = os.path.getsize(part) if os.path.exists(part) else 0
        log(
            f"[fetch] {url} -> {part} (attempt {attempt}/{attempts}"
            + (f", resuming after {have} bytes)" if have else ")")
        )
        rc = subprocess.call(_downloader(url, part))
        if rc == 0:
            return
        if rc in CURL_CANNOT_RESUME and os.path.exists(part):
            warn(f"the server cannot resume {url}: starting over")
            os.remove(part)
        if attempt < attempts:
            time.sleep(min(60, 5 * 2 ** (attempt - 1)))
    die(f"download failed after {attempts} attempts: {url}. The partial file {part} is kept: rerun to resume")


def fetch_one(
    name: str, entry: Entry, orig: str, archives: Optional[str], mirror: Optional[str], strict: bool, attempts: int
) -> None:
    final = os.path.join(orig, name)
    if os.path.exists(final):
        log(f"[fetch] {name}: already fetched and verified (its bytes are checked again as they are read)")
        return
    if archives:
        src = os.path.abspath(os.path.join(archives, name))
        if not os.path.isfile(src):
            die(f"archive not found: {src} (--archives DIR must hold {name})")
        if os.path.getsize(src) == 0:
            die(f"archive is empty: {src}")
        sha = verify(src, name, entry, strict)
        write_text_atomic(final + ".sha256", f"{sha}  {name}\n")
        with atomic_path(final) as tmp:  # a symlink, renamed into place: no copy of a multi-GB file
            os.remove(tmp)
            os.symlink(src, tmp)
        return
    url = f"{mirror.rstrip('/')}/{name}" if mirror else entry.url
    if not url:
        die(f"no URL known for {name}")
    part = final + ".part"
    download(url, part, attempts)
    if not os.path.exists(part) or os.path.getsize(part) == 0:
        die(f"download of {url} produced no data")
    try:
        sha = verify(part, name, entry, strict)
    except ChecksumMismatch:
        os.replace(part, final + ".bad")  # never resumed from, never used; kept for inspection
        log(f"[fetch] moved the bad download to {final}.bad; a rerun downloads {name} again")
        raise
    write_text_atomic(final + ".sha256", f"{sha}  {name}\n")
    os.replace(part, final)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="archive file names (rows of the table)")
    ap.add_argument("--table", required=True)
    ap.add_argument("--orig", required=True, help="directory of the verified archives")
    ap.add_argument("--archives", help="take the archives from this local directory instead of downloading")
    ap.add_argument("--mirror", help="download FILE from MIRROR/FILE instead of the table's URL (file:// works)")
    ap.add_argument("--checksums", help="sha256sum-format file whose values replace the table's")
    ap.add_argument("--strict", action="store_true", help="refuse archives with no known checksum")
    ap.add_argument("--attempts", type=int, default=5)
    args = ap.parse_args()
    if args.attempts < 1:
        ap.error(f"--attempts must be at least 1, got {args.attempts}")
    table = read_table(args.table)
    if args.checksums:
        apply_user_checksums(table, args.checksums)
    os.makedirs(args.orig, exist_ok=True)
    for name in args.files:
        if name not in table:
            die(f"{name} is not in the archive table {args.table}")
        fetch_one(name, table[name], args.orig, args.archives, args.mirror, args.strict, args.attempts)


if __name__ == "__main__":
    main_guard(main)
