#!/usr/bin/env bash
# Builds the release CLI and test binaries, and the Python wheel, and stages them in ./stage (git-ignored), ready
# to be carried to a GPU machine that has no Rust toolchain. The wheel needs maturin (MATURIN names it; default
# `python3 -m maturin`); without it the wheel is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf stage
mkdir -p stage/tests
cargo build --release -p flashattn-cli
cp target/release/flashattn stage/
# The README's borrowed-API example (a caller's own stream and buffers).
cargo build --release -p flashattn --example borrowed_stream
cp target/release/examples/borrowed_stream stage/
# The test executables, as cargo names them.
cargo test --release --workspace --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do cp "$exe" "stage/tests/$name"; done
strip stage/flashattn stage/borrowed_stream stage/tests/* 2>/dev/null || true
# The Python package as an abi3 wheel (one for every Python 3.9+ and every torch).
if ${MATURIN:-python3 -m maturin} --version >/dev/null 2>&1; then
    ${MATURIN:-python3 -m maturin} build --release --strip -m python/Cargo.toml -o stage/wheels
else
    echo "maturin not found: the Python wheel is not staged" >&2
fi
du -sh stage
ls -la stage stage/tests
