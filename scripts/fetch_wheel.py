#!/usr/bin/env python3
"""Unpacks a binary wheel from PyPI into a folder, with the standard library only (for machines without pip).

Usage: fetch_wheel.py NAME==VERSION DEST
"""
import json
import platform
import sys
import urllib.request
import zipfile
from io import BytesIO
from urllib.parse import urljoin


def main() -> None:
    if len(sys.argv) != 3 or "==" not in sys.argv[1]:
        sys.exit(__doc__)
    name, version = sys.argv[1].split("==")
    dest = sys.argv[2]
    index = f"https://pypi.org/pypi/{name}/json"
    with urllib.request.urlopen(index, timeout=60) as r:
        files = json.load(r)["releases"].get(version, [])
    machine = platform.machine()
    wheels = [f for f in files if f["filename"].endswith(".whl") and "linux" in f["filename"] and machine in f["filename"]]
    if not wheels:
        sys.exit(f"no Linux {machine} wheel of {name} {version} on PyPI")
    print(f"fetching {wheels[0]['filename']}", file=sys.stderr)
    with urllib.request.urlopen(urljoin(index, wheels[0]["url"]), timeout=600) as r:
        zipfile.ZipFile(BytesIO(r.read())).extractall(dest)


if __name__ == "__main__":
    main()
