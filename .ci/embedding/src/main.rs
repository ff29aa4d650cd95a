// The README's borrowed-API example, built here beside cudarc's `dynamic-linking`.
include!("../../../crates/flashattn/examples/borrowed_stream.rs");
