#!/usr/bin/env bash
# Builds the release CLI and test binaries and stages them, with the device scripts, in ./stage (git-ignored),
# ready to be carried to a GPU machine that has no Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf stage
mkdir -p stage/tests
cargo build --release -p flashattn-cli
cp target/release/flashattn stage/
# The test executables, as cargo names them.
cargo test --release --workspace --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do cp "$exe" "stage/tests/$name"; done
strip stage/flashattn stage/tests/* 2>/dev/null || true
du -sh stage
ls -la stage stage/tests
